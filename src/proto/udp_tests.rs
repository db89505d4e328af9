use super::*;
use core::net::Ipv4Addr;

const MS: Duration = Duration::from_millis(1);

#[test]
fn utack_shapes_and_macs() {
    let key = [7u8; 32];
    let (b, n) = encode_utack(1, 0, None);
    assert_eq!(&b[..n], &[0xAC, 0xAC, 1, 0, 0, 0, 0]);
    let (b, n) = encode_utack(4, 0, Some(&key));
    assert_eq!(n, 7, "handshake-phase UTACKs never carry a MAC");
    assert_eq!(&b[..n], &[0xAC, 0xAC, 4, 0, 0, 0, 0]);
    let (b, n) = encode_utack(5, 9, Some(&key));
    assert_eq!(n, 15);
    let want = ExpectedAck::new(5, 9, Some(&key));
    assert!(want.matches(&b[..n]));
    assert!(!want.matches(&b[..7]), "MAC missing");
    let mut forged = b;
    forged[10] ^= 1;
    assert!(!want.matches(&forged[..n]), "wrong MAC");
    let (other, m) = encode_utack(5, 10, Some(&key));
    assert!(!want.matches(&other[..m]), "wrong seq");
    let (other, m) = encode_utack(6, 9, Some(&key));
    assert!(!want.matches(&other[..m]), "wrong type");
    let (other, m) = encode_utack(5, 9, Some(&[8; 32]));
    assert!(!want.matches(&other[..m]), "other key");
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
fn source_limiter_is_bounded_and_refills() {
    let mut l = SourceLimiter::new(10.0, 5.0, 1e9, 100);
    let ip = IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4));
    let t0 = Duration::from_secs(10);
    for _ in 0..10 {
        assert!(l.allow(ip, t0));
    }
    assert!(!l.allow(ip, t0));
    assert!(!l.allow(ip, t0 + 199 * MS));
    assert!(l.allow(ip, t0 + 200 * MS), "5 tokens/s: one token after 200 ms");
    for i in 0..10_000u32 {
        l.allow(IpAddr::V4(Ipv4Addr::from(i)), t0);
        assert!(l.len() <= 100);
    }
    let mut g = SourceLimiter::new(10.0, 5.0, 3.0, 100);
    assert!(g.allow(IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)), t0));
    assert!(g.allow(IpAddr::V4(Ipv4Addr::new(1, 1, 1, 2)), t0));
    assert!(g.allow(IpAddr::V4(Ipv4Addr::new(1, 1, 1, 3)), t0));
    assert!(!g.allow(IpAddr::V4(Ipv4Addr::new(1, 1, 1, 4)), t0), "global budget");
}

#[test]
fn rto_starts_at_half_a_second_and_backs_off() {
    let r = Rto::default();
    assert_eq!(r.rto(), 500 * MS);
    assert_eq!(r.timeout(0), 500 * MS);
    assert_eq!(r.timeout(1), 1000 * MS);
    assert_eq!(r.timeout(3), 4000 * MS);
    assert_eq!(r.timeout(4), 5000 * MS, "capped at 5 s");
}

#[test]
fn rto_follows_jacobson_and_is_clamped() {
    let mut r = Rto::default();
    // A 1 ms loopback RTT repeatedly: srtt → 1 ms, rttvar → 0, RTO clamps at 100 ms.
    for _ in 0..100 {
        r.on_sample(MS);
    }
    assert_eq!(r.rto(), 100 * MS);
    assert_eq!(r.timeout(0), 100 * MS);
    // The 50 ms floor of an attempt's timeout is below the RTO clamp, so it never binds here.
    assert_eq!(r.timeout(1), 200 * MS);
    let mut slow = Rto::default();
    for _ in 0..100 {
        slow.on_sample(Duration::from_secs(9));
    }
    assert_eq!(slow.rto(), Duration::from_secs(5));
    // One sample from the initial state: err = 0.3 - 0.2; rttvar = 0.1 + 0.25*(0.1-0.1); srtt = 0.2125.
    let mut one = Rto::default();
    one.on_sample(300 * MS);
    let want = 0.2125 + 4.0 * 0.1;
    assert!((one.rto().as_secs_f64() - want).abs() < 1e-6, "kept in f32 seconds, read to the µs");
}
