use super::*;
use core::net::{Ipv4Addr, Ipv6Addr};

const MS: Duration = Duration::from_millis(1);
const T0: Duration = Duration::from_secs(10);
const DEV: [u8; 6] = [1, 2, 3, 4, 5, 6];

fn v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(i))
}

#[test]
fn cookies_bind_address_device_and_key_and_are_single_use() {
    let mut jar = CookieJar::new(&[1; 32]);
    let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let (dev, pk) = ([1u8; 6], [2u8; 32]);
    let b = CookieJar::bucket(1_700_000_000);
    let c = jar.issue(peer, &dev, &pk, b);
    let other_port: SocketAddr = "10.0.0.1:5001".parse().unwrap();
    assert_eq!(jar.redeem(other_port, &dev, &pk, &c, b), Err(CookieError::Invalid));
    assert_eq!(jar.redeem(peer, &[9; 6], &pk, &c, b), Err(CookieError::Invalid));
    assert_eq!(jar.redeem(peer, &dev, &[9; 32], &c, b), Err(CookieError::Invalid));
    assert_eq!(jar.redeem(peer, &dev, &pk, &c, b + 1), Ok(()), "previous bucket accepted");
    assert_eq!(jar.redeem(peer, &dev, &pk, &c, b + 1), Err(CookieError::Replayed));
    let c2 = jar.issue(peer, &dev, &pk, b + 1);
    assert_eq!(jar.redeem(peer, &dev, &pk, &c2, b + 3), Err(CookieError::Invalid), "expired");
}

#[test]
fn used_cookies_live_in_fixed_bitmaps_and_replays_never_pass() {
    // Small bitmaps, so that they fill: memory stays what it was, every replay is still
    // refused, and fresh cookies start to be refused by mistake (the price, measured).
    let mut jar = CookieJar::with_filter_bits(&[3; 32], 1 << 12);
    let bytes = jar.memory_bytes();
    assert_eq!(bytes, 2 * 512);
    let b = CookieJar::bucket(1_700_000_000);
    let pk = [2u8; 32];
    let peer = |i: u32| SocketAddr::new(v4(i), 4000);
    let mut ok = Vec::new();
    for i in 0..2000u32 {
        let c = jar.issue(peer(i), &DEV, &pk, b);
        if jar.redeem(peer(i), &DEV, &pk, &c, b).is_ok() {
            ok.push((i, c));
        }
    }
    assert_eq!(jar.memory_bytes(), bytes);
    assert!(ok.len() > 300 && ok.len() < 2000, "{} fresh cookies passed", ok.len());
    assert!(jar.false_refusal() > 0.25, "{}", jar.false_refusal());
    for (i, c) in &ok {
        assert_eq!(jar.redeem(peer(*i), &DEV, &pk, c, b), Err(CookieError::Replayed));
        assert_eq!(jar.redeem(peer(*i), &DEV, &pk, c, b + 1), Err(CookieError::Replayed), "next bucket");
    }
    // Two buckets on, those cookies are invalid anyway, and both bitmaps are empty again.
    let c = jar.issue(peer(1), &DEV, &pk, b + 3);
    assert_eq!(jar.redeem(peer(1), &DEV, &pk, &c, b + 3), Ok(()));
    assert_eq!(jar.used_len(), 1);
    assert!(jar.false_refusal() < 1e-6);
}

#[test]
fn the_default_bitmaps_refuse_few_fresh_cookies_at_fleet_scale() {
    let mut jar = CookieJar::new(&[4; 32]);
    assert_eq!(jar.memory_bytes(), 2 << 20, "two 1 MiB bitmaps");
    let (b, pk) = (CookieJar::bucket(1_700_000_000), [2u8; 32]);
    let mut refused = 0;
    for i in 0..100_000u32 {
        let p = SocketAddr::new(v4(i), 4000);
        let c = jar.issue(p, &DEV, &pk, b);
        refused += usize::from(jar.redeem(p, &DEV, &pk, &c, b).is_err());
    }
    assert!(refused <= 5, "{refused} of 100,000 fresh cookies refused");
    assert!(jar.false_refusal() < 1e-5, "{}", jar.false_refusal());
}

fn gate(cfg: GateConfig) -> CookieGate {
    CookieGate::new(cfg, &[7; 32])
}

#[test]
fn per_source_buckets_refill_and_keep_to_their_source() {
    let mut g = gate(GateConfig { global_rate: 1e9, ..GateConfig::default() });
    let ip = v4(0x0102_0304);
    for _ in 0..10 {
        assert_eq!(g.allow(ip, &DEV, T0), Some(Admit::Shared));
    }
    assert_eq!(g.allow(ip, &DEV, T0), None);
    assert_eq!(g.allow(ip, &DEV, T0 + 199 * MS), None);
    assert_eq!(g.allow(ip, &DEV, T0 + 200 * MS), Some(Admit::Shared), "5 tokens/s: one after 200 ms");
    // Another source is untouched by the first one's flood; so is another device id behind
    // it (a source is an address, whatever device ids it names).
    assert_eq!(g.allow(v4(0x0102_0305), &DEV, T0), Some(Admit::Shared));
    assert_eq!(g.allow(ip, &[9; 6], T0 + 200 * MS), None);
    // An IPv6 host's whole /64 is one source.
    let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1));
    for i in 0..10u16 {
        assert!(g.allow(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 9, i)), &DEV, T0).is_some());
    }
    assert_eq!(g.allow(a, &DEV, T0), None);
}

#[test]
fn the_shared_budget_caps_all_unknown_sources_together() {
    let mut g = gate(GateConfig { global_rate: 3.0, ..GateConfig::default() });
    assert!(g.allow(v4(1), &DEV, T0).is_some());
    assert!(g.allow(v4(2), &DEV, T0).is_some());
    assert!(g.allow(v4(3), &DEV, T0).is_some());
    assert_eq!(g.allow(v4(4), &DEV, T0), None, "shared budget");
    // Refused by the shared budget, source 4 kept its own tokens.
    for _ in 0..3 {
        assert!(g.allow(v4(4), &DEV, T0 + 1000 * MS).is_some());
    }
}

#[test]
fn known_pairs_get_cookies_while_spoofed_sources_empty_the_shared_budget() {
    let cfg = GateConfig { global_rate: 1000.0, ..GateConfig::default() };
    let mut g = gate(cfg);
    let (home, other) = (v4(0x0a00_0001), [0xEE; 6]);
    g.remember(home, &DEV, T0);
    assert!(g.is_known(home, &DEV, T0) && !g.is_known(home, &other, T0));
    let memory = g.memory_bytes();
    // One second of a spoofed flood at 100× the shared budget, from random sources and ids,
    // some of them from the known device's own address.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut shared = 0;
    for i in 0..100_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let now = T0 + Duration::from_micros(u64::from(i) * 10);
        let src = if i % 10 == 0 { home } else { v4(x as u32) };
        let id: [u8; 6] = x.to_le_bytes()[2..].try_into().unwrap();
        shared += usize::from(g.allow(src, &id, now).is_some());
        if i % 25_000 == 500 {
            assert_eq!(g.allow(home, &DEV, now), Some(Admit::Known), "the known device at {now:?}");
            assert_eq!(g.allow(home, &other, now), None, "an unknown id from the same address");
        }
    }
    assert!(shared <= 1000 + 1000 + 1, "{shared} answered beyond the shared budget");
    assert_eq!(g.memory_bytes(), memory, "fixed tables");
    // A pair's own bucket bounds what a spoofer who guessed it gets: 10 at once, 5/s.
    let t = T0 + 2 * Duration::from_secs(1);
    let n = (0..100).filter(|_| g.allow(home, &DEV, t) == Some(Admit::Known)).count();
    assert_eq!(n, 10);
    // Forgotten after the window.
    assert!(!g.is_known(home, &DEV, T0 + cfg.known_window + Duration::from_secs(1)));
}

#[test]
fn the_known_table_is_fixed_and_keeps_the_most_recent() {
    let mut g = gate(GateConfig { known: 64, ..GateConfig::default() });
    assert_eq!(g.memory_bytes(), 65_536 * 8 + 64 * 16);
    for i in 0..10_000u32 {
        g.remember(v4(i), &DEV, T0 + Duration::from_secs(u64::from(i)));
    }
    assert_eq!(g.memory_bytes(), 65_536 * 8 + 64 * 16);
    let now = T0 + Duration::from_secs(10_000);
    let recent = (9_990..10_000u32).filter(|i| g.is_known(v4(*i), &DEV, now)).count();
    assert!(recent >= 8, "{recent} of the last 10 remembered");
    let old = (0..1000u32).filter(|i| g.is_known(v4(*i), &DEV, now)).count();
    assert_eq!(old, 0);
}
