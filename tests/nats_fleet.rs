//! Many gateways as one through NATS: a three-node cluster with gateway A on node 1 and B on
//! node 2; a downlink made on node 3 reaches devices on either; a device that moves from A to
//! B is closed on A within 1 s and gets the next downlink exactly once; presence and events
//! show the move. Fleet keys from a KV bucket reach both gateways within 1 s.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use usmp::{Client, ClientConfig, CloseReason, Transport};

mod common;
use common::gwproc::GatewayProc;
use common::nats_util::*;
use common::natsd::{cluster3, wait_jetstream, Natsd};

const BIN: &str = env!("CARGO_BIN_EXE_usmp-gateway");

/// A device on its own thread: forwards every message it receives; reports how its session
/// ended. Stops when told or when the session ends.
struct Device {
    got: std::sync::mpsc::Receiver<Vec<u8>>,
    ended: std::sync::mpsc::Receiver<(Option<CloseReason>, Instant)>,
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

fn device(cfg: ClientConfig) -> Device {
    let (got_tx, got) = std::sync::mpsc::channel();
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
    let (up_tx, up) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&cfg).await.unwrap();
            up_tx.send(()).unwrap();
            loop {
                match c.recv_timeout(Duration::from_millis(100)).await {
                    Ok(m) => got_tx.send(m).unwrap(),
                    Err(e) if e.kind() == usmp::ErrorKind::Timeout => {}
                    Err(_) => {
                        let _ = ended_tx.send((c.close_reason(), Instant::now()));
                        return;
                    }
                }
                if stop_rx.try_recv().is_ok() {
                    c.disconnect().await;
                    return;
                }
            }
        })
    });
    up.recv_timeout(Duration::from_secs(10)).expect("device connected");
    Device { got, ended, stop, thread }
}

impl Device {
    fn finish(self) {
        let _ = self.stop.send(());
        self.thread.join().unwrap();
    }
}

fn gateway(url: &str, id: &str, extra: &[&str]) -> GatewayProc {
    let mut args = vec!["--mode", "nats", "--nats", url, "--gateway-id", id, "--shards", "2"];
    args.extend_from_slice(extra);
    GatewayProc::start(BIN, &args)
}

#[test]
fn a_cluster_of_gateways_routes_downlinks_and_moves_devices() {
    let nodes = cluster3();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    for n in &nodes {
        rt.block_on(wait_jetstream(&n.url()));
    }
    let key = psk_hex();
    let a = gateway(&nodes[0].url(), "gw-a", &["--psk-hex", &key, "--metrics", "127.0.0.1:0"]);
    let b = gateway(&nodes[1].url(), "gw-b", &["--psk-hex", &key]);
    let nc = rt.block_on(async_nats::connect(nodes[2].url())).unwrap();
    let js = async_nats::jetstream::new(nc.clone());
    let mut events = rt.block_on(nc.subscribe("usmp.evt.>")).unwrap();
    rt.block_on(nc.flush()).unwrap();
    let (x, y) = (dev(4, 1), dev(4, 2));

    let dx = device(config(a.addr, Transport::Tcp, x));
    let dy = device(config(b.addr, Transport::Udp, y));
    // Downlinks made on node 3 reach each device wherever it is.
    let to = |d: &[u8; 6]| format!("usmp.down.{}", token(d));
    let send = |d: &[u8; 6], m: &str| rt.block_on(request_status(&nc, to(d), m.as_bytes()));
    // Routing takes effect once the holder's subscription has spread through the cluster.
    let end = Instant::now() + Duration::from_secs(5);
    let mut first = send(&x, "hello-x");
    while first != "delivered" && Instant::now() < end {
        // `queued` would be a routing failure: the device is online.
        assert_ne!(first, "queued", "a request for an online device was queued");
        std::thread::sleep(Duration::from_millis(100));
        first = send(&x, "hello-x");
    }
    assert_eq!(first, "delivered");
    assert_eq!(dx.got.recv_timeout(Duration::from_secs(5)).unwrap(), b"hello-x");
    assert_eq!(send(&y, "hello-y"), "delivered");
    assert_eq!(dy.got.recv_timeout(Duration::from_secs(5)).unwrap(), b"hello-y");

    // A's admin API reaches y on B, through NATS, and shows presence from the fleet bucket.
    let r = a.http("POST", &format!("/devices/{}/send", token(&y)), b"via-admin");
    assert!(r.starts_with("HTTP/1.1 200") && r.contains(r#""status":"delivered""#), "{r}");
    assert_eq!(dy.got.recv_timeout(Duration::from_secs(5)).unwrap(), b"via-admin");
    let r = a.http_get(&format!("/devices/{}", token(&y)));
    assert!(r.starts_with("HTTP/1.1 200") && r.contains(r#""gateway":"gw-b""#), "{r}");
    let r = a.http_get("/devices/0a04000000ff");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = a.http("POST", "/devices/0a04000000ff/send", &[0u8; 1809]);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");

    // x moves from A to B (its old TCP connection still open): A closes it within 1 s.
    let moved = Instant::now();
    let dx2 = device(config(b.addr, Transport::Tcp, x));
    let (reason, at) = dx.ended.recv_timeout(Duration::from_secs(3)).expect("old session closed");
    assert_eq!(reason, Some(CloseReason::PeerBye), "closed with BYE");
    assert!(at.duration_since(moved) < Duration::from_secs(1), "closed after {:?}", at.duration_since(moved));
    // The next downlink arrives exactly once, on the new session.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(send(&x, "after-move"), "delivered");
    assert_eq!(dx2.got.recv_timeout(Duration::from_secs(5)).unwrap(), b"after-move");
    std::thread::sleep(Duration::from_millis(300));
    assert!(dx2.got.try_recv().is_err(), "delivered once");
    assert!(dx.got.try_recv().is_err(), "not on the old session");
    // Presence names B; the events show the move.
    let kv = rt.block_on(js.get_key_value("USMP_PRESENCE")).unwrap();
    let p: serde_json::Value =
        serde_json::from_slice(&rt.block_on(kv.get(token(&x))).unwrap().unwrap()).unwrap();
    assert_eq!(p["gateway"], "gw-b");
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let Ok(Some(m)) = rt.block_on(tokio::time::timeout(Duration::from_millis(200), events.next())) else {
            continue;
        };
        if m.subject.contains(&token(&x)) {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            seen.push((
                m.subject.to_string(),
                v["gateway"].as_str().unwrap().to_string(),
                v["reason"].clone(),
            ));
        }
    }
    let connected_b = seen.iter().any(|(s, g, _)| s.ends_with(".connected") && g == "gw-b");
    let takeover_a =
        seen.iter().any(|(s, g, r)| s.ends_with(".disconnected") && g == "gw-a" && r == "takeover");
    assert!(connected_b && takeover_a, "events: {seen:?}");
    assert!(a.wait_log(&["device connected elsewhere"], Duration::from_secs(1)).is_some());
    dx.finish();
    dx2.finish();
    dy.finish();
}

#[test]
fn fleet_keys_from_a_kv_bucket_reach_every_gateway_within_a_second() {
    let natsd = Natsd::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let nc = rt.block_on(wait_jetstream(&natsd.url()));
    let js = async_nats::jetstream::new(nc.clone());
    let kv = rt
        .block_on(js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: "FLEET_KEYS".into(),
            ..Default::default()
        }))
        .unwrap();
    let a = gateway(&natsd.url(), "gw-ka", &["--psk-kv", "FLEET_KEYS", "--metrics", "127.0.0.1:0"]);
    let b = gateway(&natsd.url(), "gw-kb", &["--psk-kv", "FLEET_KEYS"]);
    let d = dev(5, 1);
    let cfg = |addr, key: &[u8]| ClientConfig {
        device_id: Some(d),
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::new(addr, key.to_vec())
    };
    // Connects within `within` of now (retrying), or not.
    let connects_within = |addr, key: &'static [u8], within: Duration| {
        let end = Instant::now() + within;
        usmp::block_on(async move {
            loop {
                if let Ok(c) = Client::connect(&cfg(addr, key)).await {
                    c.disconnect().await;
                    return true;
                }
                if Instant::now() > end {
                    return false;
                }
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    const K1: &[u8] = b"fleet-key-one-0123456789";
    const K2: &[u8] = b"fleet-key-two-0123456789";

    // Unknown at first.
    assert!(!connects_within(a.addr, K1, Duration::ZERO));
    // Added: both gateways accept within 1 s.
    rt.block_on(kv.put(token(&d), K1.to_vec().into())).unwrap();
    let t = Instant::now();
    assert!(connects_within(a.addr, K1, Duration::from_secs(1)), "A took the new key");
    assert!(
        connects_within(b.addr, K1, Duration::from_secs(1).saturating_sub(t.elapsed())),
        "B took the new key"
    );

    // Rotated: the live session ends with BYE, the old key stops working, the new one works.
    let live = device(cfg(a.addr, K1));
    rt.block_on(kv.put(token(&d), format!("hex:{}", hex(K2)).into())).unwrap();
    let (reason, _) = live.ended.recv_timeout(Duration::from_secs(2)).expect("rotated session ended");
    assert_eq!(reason, Some(CloseReason::PeerBye));
    assert!(connects_within(b.addr, K2, Duration::from_secs(1)));
    assert!(!connects_within(b.addr, K1, Duration::ZERO));

    // A value that is not a key is counted and ignored: the last good key stays.
    rt.block_on(kv.put(token(&d), "short".into())).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(connects_within(a.addr, K2, Duration::ZERO));
    assert!(a.wait_log(&["not a valid key"], Duration::from_secs(2)).is_some());

    // Deleted: the session ends with BYE on both, and the device is refused.
    let live_a = device(cfg(a.addr, K2));
    let live_b = device(cfg(b.addr, K2));
    rt.block_on(kv.delete(token(&d))).unwrap();
    for l in [&live_a, &live_b] {
        let (reason, _) =
            l.ended.recv_timeout(Duration::from_secs(2)).expect("deleted device's session ended");
        assert_eq!(reason, Some(CloseReason::PeerBye));
    }
    assert!(!connects_within(a.addr, K2, Duration::ZERO));
    // The wildcard entry serves every other device.
    rt.block_on(kv.put("_default", K1.to_vec().into())).unwrap();
    assert!(connects_within(b.addr, K1, Duration::from_secs(1)));
    // The operator sees all of it in the metrics.
    let m = a.http_get("/metrics");
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(value("usmp_nats_connected "), 1.0, "{m}");
    assert!(value("usmp_nats_kv_invalid_total ") >= 1.0, "{m}");
    assert!(value("usmp_nats_kv_applied_total ") >= 4.0, "{m}");
    assert!(value("usmp_nats_kv_watch_lag_seconds ") >= 0.0, "{m}");
    assert!(m.contains("usmp_nats_publish_ack_seconds_bucket"), "{m}");
    live.finish();
    live_a.finish();
    live_b.finish();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
