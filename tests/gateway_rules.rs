//! The gateway's rules over real sockets: violations inside an established session, limits
//! enforced before any crypto, idle sockets that must not delay real devices, lockout backoff
//! and cap, and PSK resolvers.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::RawDevice;
use usmp::proto::frame::PacketType;
use usmp::proto::lockout::LockoutPolicy;
use usmp::proto::testing::seal_any;
use usmp::psk::{PskFuture, PskResolver, PskSource};
use usmp::{Client, ClientConfig, Gateway, Session};

const PSK: &[u8] = b"rules-test-key-0123456789";

/// A handler that reads and never answers, so "nothing sent back" is observable.
async fn sink(s: Session) {
    while s.recv().await.is_ok() {}
}

fn gateway_with(b: usmp::GatewayBuilder) -> Gateway {
    b.listen("127.0.0.1:0".parse().unwrap()).psk(PskSource::single(PSK).unwrap()).serve(sink).unwrap()
}

fn frame(dev: &mut RawDevice, t: PacketType, plain: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 600];
    let n = seal_any(&mut dev.session, t, plain, &mut out);
    out.truncate(n);
    out
}

#[test]
fn violations_inside_a_session_close_it_silently_and_spare_the_others() {
    let gw = gateway_with(Gateway::builder().shards(2));
    let addr = gw.local_addr();
    let h = gw.handle();
    let mut bystander = RawDevice::connect(addr, PSK, [9; 6]);
    type Case = (&'static str, fn(&mut RawDevice) -> Vec<u8>);
    let cases: Vec<Case> = vec![
        ("sequence gap", |d| {
            let _skipped = d.seal(b"one");
            d.seal(b"two")
        }),
        ("replayed frame", |d| {
            let f = d.seal(b"one");
            [f.clone(), f].concat()
        }),
        ("tampered tag", |d| {
            let mut f = d.seal(b"one");
            let last = f.len() - 1;
            f[last] ^= 1;
            usmp::proto::frame::finish_crc(&mut f);
            f
        }),
        ("tampered header (AAD)", |d| {
            let mut f = d.seal(b"one");
            f[3] = PacketType::DataFrag as u8;
            usmp::proto::frame::finish_crc(&mut f);
            f
        }),
        ("control frame mid-fragment", |d| {
            let first = frame(d, PacketType::DataFrag, &[1; 452]);
            [first, frame(d, PacketType::Ping, &[])].concat()
        }),
        ("fifth fragment", |d| (0..4).flat_map(|_| frame(d, PacketType::DataFrag, &[2; 452])).collect()),
        ("REKEY of 31 bytes", |d| frame(d, PacketType::Rekey, &[3; 31])),
        ("handshake frame in session", |_| {
            let mut out = [0u8; 64];
            let n = usmp::proto::frame::encode_frame(PacketType::Hello, 0, &[0; 38], &mut out).unwrap();
            out[..n].to_vec()
        }),
        ("oversize length", |_| {
            let mut f = vec![0xcd, 0xab, 2, 5, 0, 0, 0, 0, 0, 0, 0, 0];
            f[8..10].copy_from_slice(&600u16.to_le_bytes());
            f
        }),
    ];
    for (i, (name, make)) in cases.iter().enumerate() {
        let mut dev = RawDevice::connect(addr, PSK, [0xB0, 0, 0, 0, 0, i as u8]);
        let bytes = make(&mut dev);
        dev.write(&bytes);
        assert!(dev.closed_silently(), "{name}: the gateway must close without a byte");
        // The bystander is untouched: a valid frame from it still gets through (PING → PONG).
        let ping = frame(&mut bystander, PacketType::Ping, &[]);
        std::thread::sleep(Duration::from_millis(150)); // stay under the 8/s control budget
        bystander.write(&ping);
        let pong = bystander.next_frame().expect("bystander alive");
        assert_eq!(pong[3], PacketType::Pong as u8, "{name}");
    }
    let s = h.stats();
    assert_eq!(s.closed_protocol_error, cases.len() as u64, "{s:?}");
    gw.shutdown();
}

#[test]
fn session_limits_refuse_before_any_crypto() {
    let gw = gateway_with(Gateway::builder().shards(1).max_sessions(2));
    let addr = gw.local_addr();
    let _a = RawDevice::connect(addr, PSK, [1; 6]);
    let _b = RawDevice::connect(addr, PSK, [2; 6]);
    // Third: closed at accept; the HELLO never gets a CHALLENGE.
    let hello_only = TcpStream::connect(addr).unwrap();
    hello_only.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = RawDeviceProbe(hello_only);
    assert!(c.refused(), "over max_sessions");
    assert_eq!(gw.handle().stats().refused_over_limit, 1);
    assert_eq!(gw.handle().stats().handshakes_ok, 2);
    gw.shutdown();

    let gw = gateway_with(Gateway::builder().shards(1).max_per_ip(1));
    let addr = gw.local_addr();
    let _a = RawDevice::connect(addr, PSK, [1; 6]);
    let second = TcpStream::connect(addr).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(RawDeviceProbe(second).refused(), "second session from 127.0.0.1");
    // Another source address is another IP.
    usmp::block_on(async {
        let cfg = ClientConfig { bind: Some("127.0.0.2:0".parse().unwrap()), ..ClientConfig::new(addr, PSK) };
        Client::connect(&cfg).await.expect("127.0.0.2 is under its own limit").disconnect().await;
    });
    gw.shutdown();
}

/// A socket that sends a well-formed HELLO and reports whether the gateway refused it.
struct RawDeviceProbe(TcpStream);

impl RawDeviceProbe {
    fn refused(&mut self) -> bool {
        use std::io::{Read, Write};
        let mut out = [0u8; 64];
        let n = usmp::proto::frame::encode_frame(PacketType::Hello, 0, &[7; 38], &mut out).unwrap();
        let _ = self.0.write_all(&out[..n]);
        let mut b = [0u8; 128];
        match self.0.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

#[test]
fn idle_sockets_never_delay_a_real_handshake() {
    let gw = gateway_with(Gateway::builder().shards(1).handshake_timeout(Duration::from_secs(8)));
    let addr = gw.local_addr();
    // A dozen sockets that connect and say nothing (the reference's semaphore of 10 stalls here).
    let idle: Vec<TcpStream> = (0..12).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    usmp::block_on(async {
        Client::connect(&ClientConfig::new(addr, PSK)).await.unwrap().disconnect().await;
    });
    // Far below the 8 s an idle socket may hold its slot: nothing queued behind them.
    assert!(t.elapsed() < Duration::from_secs(3), "handshake took {:?}", t.elapsed());
    drop(idle);
    gw.shutdown();

    // The per-shard cap refuses extra handshakes at once instead of queueing them.
    let gw = gateway_with(Gateway::builder().shards(1).max_handshakes_per_shard(2));
    let addr = gw.local_addr();
    let _idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let third = TcpStream::connect(addr).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(RawDeviceProbe(third).refused());
    assert_eq!(gw.handle().stats().refused_over_limit, 1);
    gw.shutdown();
}

fn attempt(addr: SocketAddr, psk: &[u8]) -> bool {
    usmp::block_on(async {
        let cfg = ClientConfig {
            device_id: Some([4; 6]),
            connect_timeout: Duration::from_secs(5),
            ..ClientConfig::new(addr, psk)
        };
        match Client::connect(&cfg).await {
            Ok(c) => {
                c.disconnect().await;
                true
            }
            Err(_) => false,
        }
    })
}

#[test]
fn lockout_backoff_doubles_up_to_the_cap() {
    // Real rule, scaled down in time: 5 failures → 300 ms, doubling, capped at 1200 ms.
    let policy = LockoutPolicy {
        base: Duration::from_millis(300),
        cap: Duration::from_millis(1200),
        ..LockoutPolicy::default()
    };
    let gw = gateway_with(Gateway::builder().shards(2).lockout(policy));
    let addr = gw.local_addr();
    let h = gw.handle();
    let bad = b"not-the-key-0123456789";
    for _ in 0..5 {
        assert!(!attempt(addr, bad));
    }
    assert!(!attempt(addr, PSK), "locked right after the fifth failure");
    std::thread::sleep(Duration::from_millis(450));
    // Sixth failure: 600 ms. At +450 ms still locked (300 ms without doubling would have ended).
    assert!(!attempt(addr, bad));
    std::thread::sleep(Duration::from_millis(450));
    assert!(!attempt(addr, PSK), "doubled to 600 ms");
    let refused_before = h.stats().refused_locked_out;
    assert!(refused_before >= 2);
    // Failures 7 and 8: 1200 ms (cap), then 1200 ms again instead of 2400.
    std::thread::sleep(Duration::from_millis(700));
    assert!(!attempt(addr, bad));
    std::thread::sleep(Duration::from_millis(1300));
    assert!(!attempt(addr, bad));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(attempt(addr, PSK), "the cap bounds the lockout; the right key then clears it");
    assert!(attempt(addr, PSK));
    gw.shutdown();
}

struct SlowVault;

impl PskResolver for SlowVault {
    fn resolve(&self, device_id: [u8; 6]) -> PskFuture {
        Box::pin(async move {
            monoio::time::sleep(Duration::from_millis(50)).await; // a database round trip
            (device_id == [5; 6]).then(|| PSK.to_vec())
        })
    }
}

#[test]
fn async_resolver_supplies_keys_and_refuses_unknown_devices() {
    let (tx, rx) = mpsc::channel::<(String, Option<String>)>();
    let tx = Arc::new(std::sync::Mutex::new(tx));
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .psk(PskSource::resolver(SlowVault))
        .serve(move |s: Session| {
            let tx = tx.clone();
            async move {
                while s.recv().await.is_ok() {}
                let reason = s.close_reason().map(|r| r.as_str().to_string());
                let _ = tx.lock().unwrap().send((s.device_id().to_string(), reason));
            }
        })
        .unwrap();
    let addr = gw.local_addr();
    usmp::block_on(async {
        let known = ClientConfig { device_id: Some([5; 6]), ..ClientConfig::new(addr, PSK) };
        Client::connect(&known).await.unwrap().disconnect().await;
        let unknown = ClientConfig { device_id: Some([6; 6]), ..ClientConfig::new(addr, PSK) };
        assert!(Client::connect(&unknown).await.is_err());
    });
    // The device's BYE is what the gateway saw.
    let (dev, reason) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(dev, "05:05:05:05:05:05");
    assert_eq!(reason.as_deref(), Some("peer_bye"));
    assert_eq!(gw.handle().stats().handshakes_unknown_device, 1);
    gw.shutdown();
}

#[test]
fn python_client_disconnect_is_a_bye_at_the_gateway() {
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let tx = Arc::new(std::sync::Mutex::new(tx));
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .psk(PskSource::single(PSK).unwrap())
        .serve(move |s: Session| {
            let tx = tx.clone();
            async move {
                while let Ok(m) = s.recv().await {
                    let _ = s.send(&m).await;
                }
                let _ = tx.lock().unwrap().send(s.close_reason().map(|r| r.as_str().to_string()));
            }
        })
        .unwrap();
    let out = std::process::Command::new(common::pyref::python())
        .arg(common::pyref::script("ref_client.py"))
        .args(["--host", "127.0.0.1", "--port", &gw.local_addr().port().to_string(), "--protocol", "tcp"])
        .args(["--psk-hex", &PSK.iter().map(|b| format!("{b:02x}")).collect::<String>()])
        .args(["--script", "echo-sizes", "--timeout", "30"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().as_deref(), Some("peer_bye"));
    gw.shutdown();
}

#[test]
fn stalled_handshakes_are_evicted_under_pressure() {
    // 8 slots; a flood of 8 idle sockets fills them. Without eviction a real device would be
    // refused until the 10 s handshake timeout frees them.
    let gw = gateway_with(
        Gateway::builder().shards(1).max_handshakes_per_shard(8).handshake_timeout(Duration::from_secs(10)),
    );
    let addr = gw.local_addr();
    let idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let ok = usmp::block_on(async {
        // Same address as the idle sockets: evictions are no lockout failures (a reconnect storm
        // behind one NAT address must not lock it out).
        let cfg = ClientConfig { connect_timeout: Duration::from_secs(2), ..ClientConfig::new(addr, PSK) };
        loop {
            if let Ok(c) = Client::connect(&cfg).await {
                c.disconnect().await;
                return true;
            }
            if t.elapsed() > Duration::from_secs(5) {
                return false;
            }
            monoio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(ok, "a real device must get in well before the 10 s timeout");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let s = gw.handle().stats();
    // 8 of 8 slots taken (≥ ⅞): the oldest are evicted down to ¾, i.e. at least 2.
    assert!(s.handshakes_evicted >= 2, "{s:?}");
    assert!(s.handshakes_timeout >= 2, "evictions are counted as timeouts: {s:?}");
    assert_eq!(s.lockouts_started, 0, "…but never toward lockout: {s:?}");
    drop(idle);
    gw.shutdown();
}

#[test]
fn x25519_runs_within_the_per_shard_budget() {
    let gw = gateway_with(Gateway::builder().shards(1).handshake_rate_per_shard(2.0));
    let addr = gw.local_addr();
    usmp::block_on(async {
        let cfg = ClientConfig::new(addr, PSK);
        Client::connect(&cfg).await.unwrap().disconnect().await;
        assert!(Client::connect(&cfg).await.is_err(), "second handshake within 0.5 s is over budget");
        monoio::time::sleep(Duration::from_millis(600)).await;
        Client::connect(&cfg).await.unwrap().disconnect().await;
    });
    let s = gw.handle().stats();
    assert_eq!(s.refused_over_limit, 1, "{s:?}");
    assert_eq!(s.handshakes_ok, 2);
    assert_eq!(s.handshakes_bad_key + s.handshakes_malformed, 0, "a budget refusal is no failure: {s:?}");
    gw.shutdown();
}
