//! The TCP gateway live: interop with the reference SDK in both directions, fail-fast rules
//! over real sockets, lockout, watchdog, cross-shard delivery and graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use usmp::proto::frame::{encode_frame, PacketType};
use usmp::psk::{PskSource, Registry};
use usmp::{Client, ClientConfig, DeviceId, ErrorKind, Gateway, GatewayHandle, Session};

const PSK: &[u8] = b"integration-test-key-0123";

async fn echo(s: Session) {
    while let Ok(m) = s.recv().await {
        if m == b"PANIC" {
            panic!("handler panics on purpose");
        }
        if m == b"BYE-ME" {
            s.bye().await;
            return;
        }
        if s.send(&m).await.is_err() {
            return;
        }
    }
}

fn gateway(shards: usize) -> Gateway {
    Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(shards)
        .psk(PskSource::single(PSK).unwrap())
        .serve(echo)
        .unwrap()
}

fn py_client(addr: SocketAddr, script: &str, psk: &[u8], extra: &[&str]) -> Value {
    common::pyref::client("tcp", addr.port(), psk, script, extra)
}

#[test]
fn python_client_against_our_gateway() {
    let gw = gateway(2);
    let addr = gw.local_addr();
    let r = py_client(addr, "echo-sizes", PSK, &[]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["oversize_error"], "PayloadError");
    assert_eq!(r["session_id"].as_str().unwrap().len(), 32);
    let r = py_client(addr, "rekey", PSK, &[]);
    assert_eq!(r["ok"], true, "{r}");
    let r = py_client(addr, "wrong-psk", b"a-different-key-0123456", &[]);
    assert!(r["error_kind"].is_string(), "{r}");
    let stats = gw.handle().stats();
    assert_eq!(stats.handshakes_bad_key, 1, "{stats:?}");
    assert!(stats.handshakes_ok >= 2);
    gw.shutdown();
}

#[test]
fn gateway_bye_reaches_the_python_client() {
    let gw = gateway(1);
    let h = gw.handle();
    let addr = gw.local_addr();
    let t = std::thread::spawn(move || py_client(addr, "hold", PSK, &[]));
    // Wait for the session, then kick it: the device sees BYE (ConnectionClosedError).
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.session_count() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let dev = h.sessions()[0].device_id;
    h.send_to(dev, b"downlink").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(h.kick(dev));
    let r = t.join().unwrap();
    assert_eq!(r["ended_by"], "ConnectionClosedError", "{r}");
    gw.shutdown();
}

#[test]
fn our_client_against_the_python_server() {
    let srv = common::pyref::RefServer::start("tcp", PSK, "rekey-echo");
    usmp::block_on(async {
        let c = Client::connect(&ClientConfig::new(srv.addr, PSK)).await.unwrap();
        assert_eq!(c.session_id().to_string().len(), 32);
        for n in [0usize, 1, 452, 453, 1808] {
            let m: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            c.send(&m).await.unwrap();
            assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), m, "size {n}");
        }
        let e = c.send(&[0; 1809]).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Payload);
        c.ping().unwrap();
        for i in 0..75u32 {
            c.send(&i.to_le_bytes()).await.unwrap();
            assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), i.to_le_bytes());
        }
        c.rekey().unwrap();
        c.send(b"after our rekey").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), b"after our rekey");
        c.send(b"REKEY-NOW").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), b"REKEYED");
        c.send(b"after their rekey").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), b"after their rekey");
        c.disconnect().await;
        // A wrong key fails the handshake.
        let e =
            Client::connect(&ClientConfig::new(srv.addr, &b"not-the-right-key-000"[..])).await.err().unwrap();
        assert!(matches!(e.kind(), ErrorKind::ConnectionClosed | ErrorKind::Handshake), "{e}");
    });
    let srv = common::pyref::RefServer::start("tcp", PSK, "bye-after-echo");
    usmp::block_on(async {
        let c = Client::connect(&ClientConfig::new(srv.addr, PSK)).await.unwrap();
        c.send(b"one").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), b"one");
        let e = c.recv_timeout(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionClosed);
        assert_eq!(c.close_reason(), Some(usmp::CloseReason::PeerBye));
    });
}

/// Write raw bytes; report whether the gateway closed the connection without sending a byte.
fn closed_silently(addr: SocketAddr, bytes: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn frame(t: PacketType, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = [0u8; 492];
    let n = encode_frame(t, seq, payload, &mut out).unwrap();
    out[..n].to_vec()
}

#[test]
fn garbage_is_refused_fast_and_other_sessions_live_on() {
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .handshake_timeout(Duration::from_millis(500))
        // Eight failures in a row from one address would lock it out after five: this test
        // is about each rule's reaction, the lockout test below about the lockout.
        .lockout(usmp::proto::lockout::LockoutPolicy { threshold: 100, ..Default::default() })
        .psk(PskSource::single(PSK).unwrap())
        .serve(echo)
        .unwrap();
    let addr = gw.local_addr();
    let h: GatewayHandle = gw.handle();
    usmp::block_on(async {
        let live = Client::connect(&ClientConfig::new(addr, PSK)).await.unwrap();
        let mut hello = frame(PacketType::Hello, 0, &[1; 38]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("bad magic", {
                let mut f = hello.clone();
                f[0] = 0;
                f
            }),
            ("bad version", {
                let mut f = hello.clone();
                f[2] = 3;
                f
            }),
            ("bad crc", {
                let mut f = hello.clone();
                f[20] ^= 1;
                f
            }),
            ("oversize length", {
                let mut f = hello.clone();
                f[8..10].copy_from_slice(&900u16.to_le_bytes());
                f
            }),
            ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("data before hello", frame(PacketType::Data, 0, &[0; 40])),
            ("short hello", frame(PacketType::Hello, 0, &[1; 37])),
            ("silence", vec![]),
        ];
        for (name, bytes) in &cases {
            // Blocking std I/O on this thread is fine: the gateway runs on its own threads.
            assert!(closed_silently(addr, bytes), "{name}: not closed silently");
            live.send(name.as_bytes()).await.unwrap();
            assert_eq!(live.recv_timeout(Duration::from_secs(5)).await.unwrap(), name.as_bytes(), "{name}");
        }
        hello.clear();
        // A handler that panics ends only its own session.
        let doomed = Client::connect(&ClientConfig::new(addr, PSK)).await.unwrap();
        doomed.send(b"PANIC").await.unwrap();
        assert!(doomed.recv_timeout(Duration::from_secs(5)).await.is_err());
        live.send(b"still here").await.unwrap();
        assert_eq!(live.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"still here");
        live.disconnect().await;
    });
    let s = h.stats();
    assert_eq!(s.handshakes_malformed + s.handshakes_timeout, 8, "{s:?}");
    assert!(s.handshakes_timeout >= 1, "silence counted as a timeout: {s:?}");
    gw.shutdown();
}

#[test]
fn lockout_after_five_failures_spans_shards_and_spares_known_devices() {
    let mut reg = Registry::new();
    reg.insert([1, 1, 1, 1, 1, 1], PSK).unwrap();
    reg.insert([2, 2, 2, 2, 2, 2], PSK).unwrap();
    reg.insert([3, 3, 3, 3, 3, 3], PSK).unwrap();
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .psk(PskSource::registry(reg))
        .serve(echo)
        .unwrap();
    let addr = gw.local_addr();
    let h = gw.handle();
    usmp::block_on(async {
        // Device 2 authenticated from this address before the attack.
        let other = ClientConfig { device_id: Some([2; 6]), ..ClientConfig::new(addr, PSK) };
        Client::connect(&other).await.unwrap().disconnect().await;
        let bad = ClientConfig {
            device_id: Some([1; 6]),
            ..ClientConfig::new(addr, &b"wrong-key-for-device-1"[..])
        };
        for _ in 0..5 {
            assert!(Client::connect(&bad).await.is_err());
        }
        // Failures landed on both shards (SO_REUSEPORT spreads accepts), yet the source is locked.
        let good = ClientConfig { device_id: Some([1; 6]), ..ClientConfig::new(addr, PSK) };
        for _ in 0..4 {
            assert!(Client::connect(&good).await.is_err(), "locked source must be refused");
        }
        let unseen = ClientConfig { device_id: Some([3; 6]), ..ClientConfig::new(addr, PSK) };
        assert!(Client::connect(&unseen).await.is_err(), "so is a device never seen from there");
        // A device that authenticated from the same address still gets in.
        Client::connect(&other).await.unwrap().disconnect().await;
        // After the 1 s lockout the right key works and clears the record.
        monoio::time::sleep(Duration::from_millis(1100)).await;
        Client::connect(&good).await.unwrap().disconnect().await;
    });
    let s = h.stats();
    assert_eq!(s.handshakes_bad_key, 5, "{s:?}");
    assert_eq!(s.lockouts_started, 1, "{s:?}");
    assert!(s.refused_locked_out >= 5, "{s:?}");
    gw.shutdown();
}

#[test]
fn watchdog_fires_for_a_silent_device_but_pings_keep_a_session_alive() {
    let timeouts = Arc::new(AtomicUsize::new(0));
    let t2 = timeouts.clone();
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .session_timeout(Duration::from_millis(1500))
        .psk(PskSource::single(PSK).unwrap())
        .on_timeout(move |dev, sid| {
            assert_eq!(dev.to_string().len(), 17);
            assert_eq!(sid.to_string().len(), 32);
            t2.fetch_add(1, Ordering::SeqCst);
        })
        // The handler never reads: PINGs must still be answered and refresh the watchdog.
        .serve(|s: Session| async move {
            monoio::time::sleep(Duration::from_secs(3600)).await;
            drop(s);
        })
        .unwrap();
    let addr = gw.local_addr();
    let r = py_client(addr, "ping-only", PSK, &["--seconds", "4"]);
    // 4 s of PINGs > the 1.5 s timeout: every PING answered, the session still usable...
    assert_eq!(r["pings"], 4, "{r}");
    assert_eq!(r["pongs_received"], 4, "{r}");
    assert_eq!(r["send_error"], Value::Null, "{r}");
    // ...and once the PINGs stop, the watchdog ends it with BYE (the handler never echoes).
    assert_eq!(r["recv_error"], "ConnectionClosedError", "{r}");
    assert_eq!(timeouts.load(Ordering::SeqCst), 1);
    usmp::block_on(async {
        let c = Client::connect(&ClientConfig::new(addr, PSK)).await.unwrap();
        let e = c.recv_timeout(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionClosed);
        assert_eq!(c.close_reason(), Some(usmp::CloseReason::PeerBye), "watchdog says BYE");
    });
    assert_eq!(timeouts.load(Ordering::SeqCst), 2);
    gw.shutdown();
}

#[test]
fn send_to_and_broadcast_cross_shards_and_shutdown_says_bye() {
    let gw = gateway(2);
    let addr = gw.local_addr();
    let h = gw.handle();
    let h2 = h.clone();
    usmp::block_on(async move {
        // SO_REUSEPORT places each connection by a hash of its addresses: 8 landed on one
        // shard about once in 128 runs; 20 do so about once in 500,000.
        const N: u8 = 20;
        let mut clients = vec![];
        for i in 0..N {
            let cfg = ClientConfig { device_id: Some([0xA0, 0, 0, 0, 0, i]), ..ClientConfig::new(addr, PSK) };
            clients.push(Client::connect(&cfg).await.unwrap());
        }
        let shards: std::collections::HashSet<usize> = h2.sessions().iter().map(|s| s.shard).collect();
        assert_eq!(shards.len(), 2, "{N} connections should spread over both shards");
        for (i, c) in clients.iter().enumerate() {
            h2.send_to(c.device_id(), format!("to {i}").as_bytes()).unwrap();
            assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), format!("to {i}").as_bytes());
        }
        assert_eq!(
            h2.send_to(DeviceId::new([0xa0, 0, 0, 0, 0, 0xff]), b"x").unwrap_err().kind(),
            ErrorKind::NotConnected
        );
        // A malformed id never gets that far: it is a parse error of the id.
        assert!("a0:00:00:00:00".parse::<DeviceId>().is_err());
        assert_eq!(h2.broadcast(b"all").unwrap(), N as usize);
        for c in &clients {
            assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"all");
        }
        h2.shutdown();
        for c in &clients {
            assert!(c.recv_timeout(Duration::from_secs(10)).await.is_err());
            assert_eq!(c.close_reason(), Some(usmp::CloseReason::PeerBye));
        }
    });
    gw.wait();
    assert_eq!(h.session_count(), 0);
}

#[test]
fn idle_sessions_park_their_keys_and_wake_on_the_next_frame() {
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .park_keys_after(Duration::from_millis(100))
        .psk(PskSource::single(PSK).unwrap())
        .serve(echo)
        .unwrap();
    let h = gw.handle();
    let addr = gw.local_addr();
    usmp::block_on(async move {
        let tcp = ClientConfig::new(addr, PSK);
        let udp = ClientConfig { transport: usmp::Transport::Udp, ..ClientConfig::new(addr, PSK) };
        let clients = [Client::connect(&tcp).await.unwrap(), Client::connect(&udp).await.unwrap()];
        for round in 0..3u8 {
            // Idle: the sweeper (1 s tick at most) parks both sessions' keys.
            let t = Instant::now();
            while h.stats().sessions_parked < 2 && t.elapsed() < Duration::from_secs(10) {
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(h.stats().sessions_parked, 2, "round {round}: {:?}", h.stats());
            // Both directions still work: the server opens with re-expanded rx keys and
            // seals the echo with re-expanded tx keys.
            for c in &clients {
                c.send(&[round; 100]).await.unwrap();
                assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), vec![round; 100]);
            }
        }
        for c in clients {
            c.disconnect().await;
        }
    });
    gw.shutdown();
}

const EACH_WAY: u32 = 1000;

/// The gateway's half of the REKEY exchange: take the device's messages in order while its
/// own 1000 go out; rekey when told to, then say so (`REKEYED`, in the downlink stream).
async fn rekeying_counterpart(s: Session) {
    let sender = s.clone();
    let mut downlinks = Some(monoio::spawn(async move {
        for i in 0..EACH_WAY {
            if sender.send(format!("down {i}").as_bytes()).await.is_err() {
                return;
            }
        }
    }));
    let mut next = 0u32;
    while let Ok(m) = s.recv().await {
        if m == b"REKEY-NOW" {
            s.rekey().unwrap();
            let _ = s.send(b"REKEYED").await;
            continue;
        }
        if m != format!("up {next}").as_bytes() {
            let _ = s.send(format!("WRONG {next}: {}", String::from_utf8_lossy(&m)).as_bytes()).await;
            return;
        }
        next += 1;
        if next == EACH_WAY {
            if let Some(d) = downlinks.take() {
                d.await;
            }
            let _ = s.send(b"UP-OK").await;
        }
    }
}

/// PROTOCOL.md §6: a REKEY switches keys at once, so frames the other side sealed before
/// it saw the REKEY arrive under the old key. Both sides keep the old receive key until a
/// frame under the new one verifies (and re-seal what was queued but not sent), so nothing
/// is lost: 1000 messages each way, pipelined, with REKEYs from both sides meanwhile.
#[test]
fn rekey_from_either_side_during_two_way_traffic_loses_nothing() {
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .psk(PskSource::single(PSK).unwrap())
        .serve(rekeying_counterpart)
        .unwrap();
    let addr = gw.local_addr();
    usmp::block_on(async move {
        let c = Client::connect(&ClientConfig::new(addr, PSK)).await.unwrap();
        let gateway_rekeyed = std::cell::Cell::new(false);
        let up = async {
            for i in 0..EACH_WAY {
                // Our REKEYs: one early, one after the gateway's own (never crossing it: the
                // protocol has no rule for two REKEYs in flight at once).
                if i == 750 {
                    while !gateway_rekeyed.get() {
                        monoio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                if i == 250 || i == 750 {
                    c.rekey().unwrap();
                }
                if i == 500 {
                    c.send(b"REKEY-NOW").await.unwrap();
                }
                c.send(format!("up {i}").as_bytes()).await.unwrap();
            }
        };
        let down = async {
            let mut next = 0u32;
            loop {
                let m = c
                    .recv_timeout(Duration::from_secs(20))
                    .await
                    .unwrap_or_else(|e| panic!("{e} after {next} downlinks, {:?}", c.close_reason()));
                match &m[..] {
                    b"REKEYED" => gateway_rekeyed.set(true),
                    b"UP-OK" => return next,
                    _ => {
                        assert_eq!(String::from_utf8_lossy(&m), format!("down {next}"));
                        next += 1;
                        // A slow reader: the gateway's frames (its REKEY among them) wait in
                        // the socket while ours, sealed under the old key, keep going out.
                        if next.is_multiple_of(20) {
                            monoio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                }
            }
        };
        let ((), got) = futures_util::future::join(up, down).await;
        assert_eq!(got, EACH_WAY);
        assert!(gateway_rekeyed.get());
        assert!(c.close_reason().is_none());
        c.disconnect().await;
    });
    gw.shutdown();
}
