//! `--mode nats` when things go wrong: the gateway killed with SIGKILL loses nothing a UDP
//! device was acknowledged; NATS down for 10 s mid-traffic keeps TCP sessions up with bounded
//! memory, loses nothing acknowledged and resumes by itself; a NATS that is not there at start
//! is waited for; a misconfigured start exits 2 naming the flag; Debian's nats-server 2.9.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::{Client, Transport};

mod common;
use common::gwproc::GatewayProc;
use common::nats_util::*;
use common::natsd::{free_port, wait_jetstream, Natsd, Opts};

const BIN: &str = env!("CARGO_BIN_EXE_usmp-gateway");

fn nats_gateway(url: &str, extra: &[&str]) -> GatewayProc {
    let mut args = vec!["--mode", "nats", "--nats", url, "--psk-hex", PSK_HEX_STATIC, "--shards", "2"];
    args.extend_from_slice(extra);
    GatewayProc::start(BIN, &args)
}

/// `PSK` in hex (a constant for argument lists).
const PSK_HEX_STATIC: &str = "6e6174732d6272696467652d746573742d6b65792d30313233343536373839";

/// Payloads stored in USMP_UP, by subject.
fn stored_by_subject(
    rt: &tokio::runtime::Runtime,
    js: &async_nats::jetstream::Context,
) -> HashMap<String, Vec<String>> {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for m in rt.block_on(read_stream(js, "USMP_UP")) {
        by.entry(m.subject).or_default().push(String::from_utf8(m.payload).unwrap());
    }
    by
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn psk_constant_matches() {
    assert_eq!(PSK_HEX_STATIC, psk_hex());
}

#[test]
fn kill_9_loses_nothing_a_udp_device_was_acknowledged() {
    let natsd = Natsd::start();
    let mut gw = nats_gateway(&natsd.url(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let js = async_nats::jetstream::new(rt.block_on(wait_jetstream(&natsd.url())));
    let devices: Vec<[u8; 6]> = (1..=3).map(|n| dev(6, n)).collect();
    let mut senders: Vec<_> =
        devices.iter().map(|d| reference_sender(gw.addr, Transport::Udp, *d, 100_000, "k")).collect();
    std::thread::sleep(Duration::from_millis(1500));
    gw.kill9();
    let mut acked: HashMap<String, Vec<u64>> = HashMap::new();
    for (d, s) in devices.iter().zip(senders.iter_mut()) {
        let lines = lines_of(s);
        let _ = s.wait();
        let ids = lines.iter().filter_map(|l| l["acked"].as_u64()).collect();
        acked.insert(format!("usmp.up.{}", token(d)), ids);
    }
    let stored = stored_by_subject(&rt, &js);
    let mut total = 0;
    for (subject, ids) in &acked {
        let have: HashSet<&String> = stored.get(subject).map(|v| v.iter().collect()).unwrap_or_default();
        for i in ids {
            assert!(have.contains(&format!("k-{i}")), "{subject}: k-{i} was acknowledged but is not stored");
        }
        total += ids.len();
    }
    assert!(total >= 30, "too few acknowledged messages to mean anything: {total}");
}

/// SIGTERM mid-traffic: the gateway stores what it read and exits at once, not after its
/// whole shutdown grace (it used to wait for a count only the stopped shards could lower).
#[test]
fn sigterm_stores_what_was_read_and_exits_promptly() {
    let natsd = Natsd::start();
    let mut gw = nats_gateway(&natsd.url(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let nc = rt.block_on(wait_jetstream(&natsd.url()));
    let js = async_nats::jetstream::new(nc.clone());
    let mut goodbyes = rt.block_on(nc.subscribe("usmp.evt.*.disconnected")).unwrap();
    rt.block_on(nc.flush()).unwrap();
    let devices: Vec<[u8; 6]> = (1..=3).map(|n| dev(8, n)).collect();
    let mut senders: Vec<_> =
        devices.iter().map(|d| reference_sender(gw.addr, Transport::Udp, *d, 100_000, "s")).collect();
    // And 200 quiet TCP sessions, so that the farewells at shutdown take a while.
    let idle: Vec<[u8; 6]> = (1..=200).map(|n| dev(9, n)).collect();
    let (up_tx, up) = std::sync::mpsc::channel();
    let (addr, ids) = (gw.addr, idle.clone());
    let holder = std::thread::spawn(move || {
        usmp::block_on(async move {
            let mut clients = Vec::new();
            for d in ids {
                clients.push(Client::connect(&config(addr, Transport::Tcp, d)).await.unwrap());
            }
            up_tx.send(()).unwrap();
            for c in &clients {
                let _ = c.recv_timeout(Duration::from_secs(20)).await; // until the gateway's BYE
            }
        })
    });
    up.recv_timeout(Duration::from_secs(30)).expect("200 TCP sessions up");
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    assert_eq!(gw.terminate(), Some(0));
    let took = t0.elapsed();
    holder.join().unwrap();
    // Every session's farewell went out before the process ended: its disconnect event
    // (reason `shutdown`) and the removal of its presence entry.
    for _ in devices.iter().chain(&idle) {
        let m = rt
            .block_on(tokio::time::timeout(
                Duration::from_secs(2),
                futures_util::StreamExt::next(&mut goodbyes),
            ))
            .expect("a disconnect event per session")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["reason"], "shutdown", "{v}");
    }
    let kv = rt.block_on(js.get_key_value("USMP_PRESENCE")).unwrap();
    for d in devices.iter().chain(&idle) {
        assert!(rt.block_on(kv.get(token(d))).unwrap().is_none(), "presence of {} left behind", token(d));
    }
    let mut acked = 0;
    let stored = stored_by_subject(&rt, &js);
    for (d, s) in devices.iter().zip(senders.iter_mut()) {
        let lines = lines_of(s);
        let _ = s.wait();
        let have: HashSet<&String> =
            stored.get(&format!("usmp.up.{}", token(d))).map(|v| v.iter().collect()).unwrap_or_default();
        for i in lines.iter().filter_map(|l| l["acked"].as_u64()) {
            assert!(have.contains(&format!("s-{i}")), "s-{i} was acknowledged but is not stored");
            acked += 1;
        }
    }
    assert!(acked >= 30, "too few acknowledged messages to mean anything: {acked}");
    assert!(took < Duration::from_secs(3), "the gateway took {took:?} to stop");
}

#[test]
fn nats_down_for_10_s_keeps_sessions_bounded_and_resumes() {
    let mut natsd = Natsd::start();
    let gw = nats_gateway(&natsd.url(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    rt.block_on(wait_jetstream(&natsd.url()));
    let (tcp_dev, udp_dev) = (dev(7, 1), dev(7, 2));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let addr = gw.addr;
    let (st, sn) = (stop.clone(), sent.clone());
    let tcp = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, Transport::Tcp, tcp_dev)).await.unwrap();
            let session = c.session_id();
            while !st.load(Ordering::Relaxed) {
                c.send(format!("t-{}", sn.load(Ordering::Relaxed)).as_bytes()).await.unwrap();
                sn.fetch_add(1, Ordering::Relaxed);
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(c.close_reason().is_none(), "the TCP session survived");
            c.disconnect().await;
            session
        })
    });
    let mut udp = reference_sender(gw.addr, Transport::Udp, udp_dev, 100_000, "u");
    std::thread::sleep(Duration::from_secs(2));
    let pid = gw.child.0.id();
    let rss_before = rss_kib(pid);
    natsd.kill();
    let down_at = Instant::now();
    let mut rss_peak = rss_before;
    while down_at.elapsed() < Duration::from_secs(10) {
        rss_peak = rss_peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent_during = sent.load(Ordering::Relaxed);
    natsd.restart();
    // The UDP reference device gave up during the outage (its ARQ lasts about 3 s); whatever
    // it was acknowledged must be stored.
    let udp_lines = lines_of(&mut udp);
    let _ = udp.wait();
    let udp_acked: Vec<u64> = udp_lines.iter().filter_map(|l| l["acked"].as_u64()).collect();
    // Traffic resumes by itself: the TCP device goes on, a UDP device connects again.
    let end = Instant::now() + Duration::from_secs(20);
    while sent.load(Ordering::Relaxed) < sent_during + 200 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(sent.load(Ordering::Relaxed) >= sent_during + 200, "TCP traffic did not resume");
    let mut udp2 = reference_sender(gw.addr, Transport::Udp, udp_dev, 50, "v");
    let l2 = lines_of(&mut udp2);
    assert!(udp2.wait().unwrap().success(), "UDP after the outage: {:?}", l2.last());
    stop.store(true, Ordering::Relaxed);
    tcp.join().unwrap();
    let total_tcp = sent.load(Ordering::Relaxed);

    let js = async_nats::jetstream::new(rt.block_on(wait_jetstream(&natsd.url())));
    let end = Instant::now() + Duration::from_secs(20);
    let tcp_subject = format!("usmp.up.{}", token(&tcp_dev));
    let mut stored = stored_by_subject(&rt, &js);
    while stored.get(&tcp_subject).map_or(0, Vec::len) < total_tcp && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        stored = stored_by_subject(&rt, &js);
    }
    let want: Vec<String> = (0..total_tcp).map(|i| format!("t-{i}")).collect();
    assert_eq!(stored[&tcp_subject], want, "TCP: every message, once, in order, across the outage");
    let udp_stored: HashSet<&String> = stored[&format!("usmp.up.{}", token(&udp_dev))].iter().collect();
    for i in &udp_acked {
        assert!(udp_stored.contains(&format!("u-{i}")), "UDP u-{i} acknowledged but lost");
    }
    for i in 0..50 {
        assert!(udp_stored.contains(&format!("v-{i}")));
    }
    assert!(
        rss_peak < rss_before + 64 * 1024,
        "gateway RSS grew from {rss_before} KiB to {rss_peak} KiB during the outage"
    );
    assert!(gw.wait_log(&["nats: disconnected"], Duration::ZERO).is_some());
}

#[test]
fn a_nats_that_is_not_there_at_start_is_waited_for() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    let gw = nats_gateway(&url, &[]);
    assert!(started.elapsed() < Duration::from_secs(15), "the gateway starts without NATS");
    assert!(gw.wait_log(&["not reachable yet"], Duration::from_secs(1)).is_some());
    let addr = gw.addr;
    let device = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, Transport::Tcp, dev(8, 1))).await.unwrap();
            c.send(b"early").await.unwrap();
            monoio::time::sleep(Duration::from_secs(6)).await;
            c.disconnect().await;
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    let natsd = Natsd::start_with(Opts { port: Some(port), ..Opts::default() });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let js = async_nats::jetstream::new(rt.block_on(wait_jetstream(&natsd.url())));
    assert_eq!(rt.block_on(wait_stream_len(&js, "USMP_UP", 1, Duration::from_secs(15))), 1);
    device.join().unwrap();
}

#[test]
fn misconfigured_nats_starts_exit_2_naming_the_flag() {
    for (args, flag) in [
        (vec!["--mode", "nats", "--nats", "http://127.0.0.1:4222"], "--nats"),
        (vec!["--mode", "nats", "--nats", "nats://exa mple:1"], "--nats"),
        (vec!["--mode", "nats", "--nats-creds", "/nonexistent/usmp.creds"], "--nats-creds"),
        (vec!["--mode", "nats", "--nats-tls-ca", "/nonexistent/ca.pem"], "--nats-tls-ca"),
        (vec!["--mode", "nats", "--nats-user", "u"], "--nats-password"),
        (vec!["--mode", "nats", "--gateway-id", "a.b"], "--gateway-id"),
        (vec!["--mode", "nats", "--nats-prefix", "a b"], "--nats-prefix"),
        (vec!["--mode", "nats", "--psk-kv", "bad bucket"], "--psk-kv"),
        (vec!["--mode", "nats", "--nats-linger", "200000"], "--nats-linger"),
        (vec!["--psk-kv", "KEYS"], "--psk-kv"),
        (vec!["--nats", "nats://127.0.0.1:1"], "--nats"),
        (vec!["--mode", "nats", "--psk-kv", "KEYS", "--psk", "0123456789abcdef"], "--psk"),
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}

/// Debian 12's nats-server (2.9.10), where installed (`apt-get install nats-server`): the
/// bridge sets up only what 2.9 accepts. Uplink over both transports, a queued downlink
/// delivered on connect, presence.
#[test]
fn works_with_debian_nats_server_2_9_where_installed() {
    let Some(bin) = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(std::path::Path::new)
        .find(|p| p.exists())
    else {
        assert!(
            std::env::var_os("USMP_REQUIRE_DEBIAN_NATS").is_none(),
            "USMP_REQUIRE_DEBIAN_NATS is set but Debian's nats-server is not installed"
        );
        eprintln!(
            "SKIPPED: Debian's nats-server is not installed (apt-get install nats-server to run this test)"
        );
        return;
    };
    let version = Command::new(bin).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    eprintln!("testing against {}", version.trim());
    let natsd = Natsd::start_with(Opts { bin: Some(bin.into()), ..Opts::default() });
    let gw = nats_gateway(&natsd.url(), &["--downlink-ttl", "60"]);
    assert!(
        gw.wait_log(&["streams ready"], Duration::from_secs(10)).is_some(),
        "{:?}",
        gw.logs.lock().unwrap()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let nc = rt.block_on(wait_jetstream(&natsd.url()));
    let js = async_nats::jetstream::new(nc.clone());
    let d = dev(9, 1);
    assert_eq!(rt.block_on(request_status(&nc, format!("usmp.down.{}", token(&d)), b"queued-one")), "queued");
    // Two devices: one device id connecting again would take its first session over.
    let senders = [(Transport::Tcp, dev(9, 2)), (Transport::Udp, dev(9, 3))];
    for h in senders.map(|(t, d)| rust_sender(gw.addr, t, d, 20, "x")) {
        h.join().unwrap();
    }
    assert_eq!(rt.block_on(wait_stream_len(&js, "USMP_UP", 40, Duration::from_secs(10))), 40);
    let addr = gw.addr;
    let got = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, Transport::Udp, d)).await.unwrap();
            let m = c.recv_timeout(Duration::from_secs(10)).await.unwrap();
            c.disconnect().await;
            m
        })
    });
    assert_eq!(got.join().unwrap(), b"queued-one");
}
