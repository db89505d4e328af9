//! The lockout as an attacker meets it (issue 15, item 3), over real sockets: failures count
//! per source whatever device ids they carry; devices that authenticated from the source
//! stay admitted; junk from elsewhere never frees a locked source; nothing before a HELLO
//! locks a NAT address.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use usmp::proto::lockout::LockoutPolicy;
use usmp::psk::{PskSource, Registry};
use usmp::{Client, ClientConfig, Gateway, Session};

const FLEET_KEY: &[u8] = b"a-fleet-wide-wildcard-key-0123";

async fn sink(s: Session) {
    while s.recv().await.is_ok() {}
}

/// A fleet on one wildcard key (every device id is accepted): what an attacker guesses.
fn gateway(policy: LockoutPolicy) -> Gateway {
    let mut reg = Registry::new();
    reg.set_wildcard(FLEET_KEY).unwrap();
    Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .handshake_timeout(Duration::from_millis(400))
        .lockout(policy)
        .psk(PskSource::registry(reg))
        .serve(sink)
        .unwrap()
}

/// One handshake of `device` from `from` with `key`; true when a session was established.
fn attempt(addr: SocketAddr, from: IpAddr, device: [u8; 6], key: &[u8]) -> bool {
    usmp::block_on(async {
        let cfg = ClientConfig {
            device_id: Some(device),
            connect_timeout: Duration::from_secs(5),
            bind: Some(SocketAddr::new(from, 0)),
            ..ClientConfig::new(addr, key)
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

fn local(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

#[test]
fn fresh_device_ids_buy_no_guesses_and_known_devices_stay_admitted() {
    let gw = gateway(LockoutPolicy { base: Duration::from_secs(5), ..Default::default() });
    let (addr, h) = (gw.local_addr(), gw.handle());
    let attacker = local(1);
    // A healthy device behind the attacker's NAT address authenticated there before.
    assert!(attempt(addr, attacker, [0xd0; 6], FLEET_KEY));
    // Five guesses, each under a fresh device id.
    for i in 0..5u8 {
        assert!(!attempt(addr, attacker, [0xa0, i, 1, 2, 3, 4], b"guess-number-one-234567"));
    }
    // The sixth attempt is refused even with the right key, under yet another fresh id.
    assert!(!attempt(addr, attacker, [0xa0, 9, 9, 9, 9, 9], FLEET_KEY), "the source is locked");
    assert!(h.stats().refused_locked_out >= 1);
    assert_eq!(h.stats().lockouts_started, 1);
    // The device that authenticated from there keeps working (its device cookie)…
    assert!(attempt(addr, attacker, [0xd0; 6], FLEET_KEY), "a known device is admitted");
    // …but guessing under its id is limited the same way: five failures lock it too.
    for _ in 0..5 {
        assert!(!attempt(addr, attacker, [0xd0; 6], b"guess-number-two-234567"));
    }
    assert!(!attempt(addr, attacker, [0xd0; 6], FLEET_KEY), "its id is locked now");
    // Other sources are untouched.
    assert!(attempt(addr, local(2), [0xa0, 9, 9, 9, 9, 9], FLEET_KEY));
    gw.shutdown();
}

#[test]
fn junk_failures_from_many_sources_never_free_a_locked_one() {
    // A small table, so that the junk below is many times its size.
    let policy = LockoutPolicy { base: Duration::from_secs(20), max_entries: 8, ..Default::default() };
    let gw = gateway(policy);
    let (addr, h) = (gw.local_addr(), gw.handle());
    let attacker = local(1);
    for i in 0..5u8 {
        assert!(!attempt(addr, attacker, [0xb0, i, 0, 0, 0, 0], b"wrong-key-0123456789abc"));
    }
    assert!(!attempt(addr, attacker, [0xb1; 6], FLEET_KEY));
    // 64 failures, one from each of 64 other addresses: eight times the table.
    for n in 0..64u8 {
        assert!(!attempt(
            addr,
            IpAddr::from([127, 0, 1, n + 1]),
            [0xc0, n, 0, 0, 0, 0],
            b"junk-key-0123456789abc"
        ));
    }
    assert!(!attempt(addr, attacker, [0xb2; 6], FLEET_KEY), "still locked after the junk");
    let s = h.stats();
    assert_eq!(s.handshakes_bad_key, 5 + 64, "{s:?}");
    gw.shutdown();
}

#[test]
fn garbage_and_idle_sockets_before_a_hello_never_lock_the_source() {
    let gw = gateway(LockoutPolicy::default());
    let (addr, h) = (gw.local_addr(), gw.handle());
    for i in 0..10u8 {
        // Garbage: not a frame.
        let mut s = TcpStream::connect(addr).unwrap();
        let _ =
            s.write_all(&[0x47, 0x45, 0x54, 0x20, i, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        // A socket closed before saying anything.
        drop(TcpStream::connect(addr).unwrap());
    }
    // Idle sockets that let the handshake time out.
    let idle: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(900));
    drop(idle);
    let s = h.stats();
    assert!(s.handshakes_malformed >= 10 && s.handshakes_timeout >= 6, "{s:?}");
    // A device never seen here gets in at once from the same address.
    assert!(attempt(addr, local(1), [0xe0; 6], FLEET_KEY));
    assert_eq!(h.stats().lockouts_started, 0);
    gw.shutdown();
}
