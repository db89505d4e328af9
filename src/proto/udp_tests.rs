use super::*;

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
