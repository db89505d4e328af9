use super::*;
use crate::proto::device::{Device, DeviceEvent};

const NS: Duration = Duration::from_nanos(1);
const T0: Duration = Duration::from_secs(1000);
const PSK: &[u8] = b"a-shared-key-of-32-bytes-for-udp";
const DEV: [u8; 6] = [1, 2, 3, 4, 5, 6];

fn gw_addr() -> SocketAddr {
    "10.0.0.1:9000".parse().unwrap()
}
fn dev_addr(i: u16) -> SocketAddr {
    SocketAddr::new("10.0.1.1".parse().unwrap(), 4000 + i)
}

fn endpoint(cfg: EndpointConfig) -> Endpoint<u32> {
    Endpoint::new(cfg, &[9; 32])
}

fn device(now: Duration) -> Device {
    Device::new(now, gw_addr(), DEV, Psk::new(PSK).unwrap(), EphemeralKey::from_seed(&[0x11; 32]).unwrap())
        .unwrap()
}

fn key(i: u8) -> KeyDecision {
    KeyDecision::Key {
        psk: Psk::new(PSK).unwrap(),
        key: EphemeralKey::from_seed(&[i; 32]).unwrap(),
        nonce: [i + 1; 32],
        session_id: [i + 2; 16],
    }
}

/// Everything the device queued, delivered to the endpoint; returns the endpoint's answers
/// for the device (and the datagram events).
fn to_gw(
    now: Duration,
    ep: &mut Endpoint<u32>,
    dev: &mut Device,
    from: SocketAddr,
) -> Vec<DatagramEvent<u32>> {
    let mut evs = Vec::new();
    while let Some(t) = dev.poll_transmit() {
        evs.push(ep.handle_datagram(now, from, t.bytes()));
    }
    evs
}

fn to_dev(now: Duration, ep: &mut Endpoint<u32>, dev: &mut Device) -> Vec<DeviceEvent> {
    let mut evs = Vec::new();
    while let Some(t) = ep.poll_transmit() {
        evs.push(dev.handle_datagram(now, gw_addr(), t.bytes()));
    }
    evs
}

/// Run the exchange until the endpoint asks for the key; answer with `decision`.
fn until_challenge(now: Duration, ep: &mut Endpoint<u32>, dev: &mut Device, decision: KeyDecision) {
    let from = dev_addr(0);
    to_gw(now, ep, dev, from); // HELLO → UTACK + HELLO_RETRY
    assert_eq!(ep.peer_count(), 0, "a HELLO without cookie leaves no state");
    to_dev(now, ep, dev); // → cookie HELLO
    let evs = to_gw(now, ep, dev, from);
    let inc = evs.into_iter().find_map(|e| match e {
        DatagramEvent::Incoming(i) => Some(i),
        _ => None,
    });
    ep.accept(now, inc.expect("a valid cookie asks for admission"));
    assert!(matches!(ep.poll_event(), Some(Event::KeyNeeded { device_id: DEV, .. })));
    ep.handle_key(now, from, decision);
}

#[test]
fn handshake_over_the_real_device_role() {
    let mut ep = endpoint(EndpointConfig::default());
    let mut dev = device(T0);
    until_challenge(T0, &mut ep, &mut dev, key(1));
    to_dev(T0, &mut ep, &mut dev); // UTACK(HELLO), CHALLENGE → HELLO_ACK
    to_gw(T0, &mut ep, &mut dev, dev_addr(0));
    let Some(Event::Established { est, .. }) = ep.poll_event() else { panic!("established") };
    assert_eq!(ep.attach(dev_addr(0), 7), None);
    let evs = to_dev(T0, &mut ep, &mut dev);
    let dev_est = evs.into_iter().find_map(|e| match e {
        DeviceEvent::Established(e) => Some(e),
        _ => None,
    });
    let dev_est = dev_est.expect("SESSION_OK verified by the device");
    assert_eq!(dev_est.tx_key, est.rx_key);
    assert_eq!(dev_est.session_id, est.session_id);
    // The device's UTACK of SESSION_OK ends its retransmission; session frames route by address.
    to_gw(T0, &mut ep, &mut dev, dev_addr(0));
    assert_eq!(ep.handshake_count(), 0);
    let mut data = [0u8; 40];
    let n = encode_frame(PacketType::Data, 0, &[0; 28], &mut data).unwrap();
    assert!(matches!(ep.handle_datagram(T0, dev_addr(0), &data[..n]), DatagramEvent::Session(7)));
    assert!(matches!(
        ep.handle_datagram(T0, dev_addr(1), &data[..n]),
        DatagramEvent::Done(Handled::Malformed)
    ));
}

#[test]
fn a_spoofed_hello_ack_is_dropped_and_the_handshake_goes_on() {
    let mut ep = endpoint(EndpointConfig::default());
    let mut dev = device(T0);
    until_challenge(T0, &mut ep, &mut dev, key(1));
    while ep.poll_transmit().is_some() {} // the CHALLENGE is lost; an attacker saw it
    let mut forged = [0u8; 64];
    let n = encode_frame(PacketType::HelloAck, 2, &[0x5a; 32], &mut forged).unwrap();
    let got = ep.handle_datagram(T0, dev_addr(0), &forged[..n]);
    assert!(matches!(got, DatagramEvent::Done(Handled::Unverified)));
    assert!(ep.poll_transmit().is_none(), "no UTACK for an unverified HELLO_ACK");
    assert!(ep.poll_event().is_none(), "no failure either");
    // CHALLENGE is retransmitted at its RTO and the real device completes.
    let t = T0 + Duration::from_millis(500);
    ep.handle_timeout(t);
    to_dev(t, &mut ep, &mut dev);
    to_gw(t, &mut ep, &mut dev, dev_addr(0));
    assert!(matches!(ep.poll_event(), Some(Event::Established { .. })));
}

#[test]
fn wrong_proofs_fail_only_at_the_handshake_timeout() {
    let cfg = EndpointConfig { handshake_timeout: Duration::from_secs(3), ..EndpointConfig::default() };
    let mut ep = endpoint(cfg);
    let mut dev = device(T0);
    until_challenge(T0, &mut ep, &mut dev, key(1));
    let mut forged = [0u8; 64];
    let n = encode_frame(PacketType::HelloAck, 2, &[0x5a; 32], &mut forged).unwrap();
    ep.handle_datagram(T0, dev_addr(0), &forged[..n]);
    // The CHALLENGE is acknowledged, so only the deadline is left.
    let (ack, l) = encode_utack(PacketType::Challenge as u8, 0, None);
    ep.handle_datagram(T0, dev_addr(0), &ack[..l]);
    let end = T0 + Duration::from_secs(3);
    ep.handle_timeout(end - NS);
    assert!(ep.poll_event().is_none());
    assert!(ep.has_handshake(dev_addr(0)));
    ep.handle_timeout(end);
    assert!(matches!(ep.poll_event(), Some(Event::Failed { reason: HandshakeFailure::BadProof, .. })));
    assert_eq!(ep.peer_count(), 0);
    assert_eq!(ep.handshake_count(), 0);
}

#[test]
fn only_the_hello_ack_that_verified_is_acknowledged_again() {
    let mut ep = endpoint(EndpointConfig::default());
    let mut dev = device(T0);
    until_challenge(T0, &mut ep, &mut dev, key(1));
    to_dev(T0, &mut ep, &mut dev);
    let hello_ack = core::iter::from_fn(|| dev.poll_transmit()).find(|t| t.bytes().len() == 44).unwrap();
    let n_before = ep.handle_datagram(T0, dev_addr(0), hello_ack.bytes());
    assert!(matches!(n_before, DatagramEvent::Done(Handled::Step)));
    let first = ep.poll_transmit().unwrap();
    assert_eq!(first.bytes(), &[0xAC, 0xAC, 3, 2, 0, 0, 0], "UTACK after verification");
    while ep.poll_transmit().is_some() {}
    // The same HELLO_ACK again (our UTACK was lost): re-ACKed, nothing else.
    assert!(matches!(
        ep.handle_datagram(T0, dev_addr(0), hello_ack.bytes()),
        DatagramEvent::Done(Handled::Step)
    ));
    assert_eq!(ep.poll_transmit().unwrap().bytes(), first.bytes());
    assert!(ep.poll_transmit().is_none());
    // Any other HELLO_ACK is not.
    let mut other = [0u8; 64];
    let n = encode_frame(PacketType::HelloAck, 2, &[0x5a; 32], &mut other).unwrap();
    assert!(matches!(
        ep.handle_datagram(T0, dev_addr(0), &other[..n]),
        DatagramEvent::Done(Handled::Unverified)
    ));
    assert!(ep.poll_transmit().is_none());
}

#[test]
fn cookies_are_single_use_and_the_peer_table_is_bounded() {
    let mut ep = endpoint(EndpointConfig { max_peers: 2, ..EndpointConfig::default() });
    let mut cookie_hellos = Vec::new();
    for i in 0..3 {
        let mut dev = Device::new(
            T0,
            gw_addr(),
            [i as u8; 6],
            Psk::new(PSK).unwrap(),
            EphemeralKey::from_seed(&[i as u8 + 1; 32]).unwrap(),
        )
        .unwrap();
        to_gw(T0, &mut ep, &mut dev, dev_addr(i));
        to_dev(T0, &mut ep, &mut dev);
        let ch = core::iter::from_fn(|| dev.poll_transmit()).find(|t| t.bytes().len() == 66).unwrap();
        cookie_hellos.push(ch);
        match ep.handle_datagram(T0, dev_addr(i), ch.bytes()) {
            DatagramEvent::Incoming(inc) if i < 2 => ep.accept(T0, inc),
            DatagramEvent::Done(Handled::PeerTableFull) if i == 2 => {}
            other => panic!("device {i}: {other:?}"),
        }
    }
    assert_eq!(ep.peer_count(), 2);
    // A retransmitted cookie HELLO of a handshake in progress is re-ACKed; once the handshake
    // is gone, the same HELLO is a replay.
    while ep.poll_transmit().is_some() {}
    assert!(matches!(
        ep.handle_datagram(T0, dev_addr(0), cookie_hellos[0].bytes()),
        DatagramEvent::Done(Handled::Step)
    ));
    ep.handle_key(T0, dev_addr(0), KeyDecision::Unregistered);
    while ep.poll_event().is_some() {}
    assert!(matches!(
        ep.handle_datagram(T0, dev_addr(0), cookie_hellos[0].bytes()),
        DatagramEvent::Done(Handled::CookieReplayed)
    ));
}

#[test]
fn an_unregistered_device_ends_without_crypto() {
    let mut ep = endpoint(EndpointConfig::default());
    let mut dev = device(T0);
    until_challenge(T0, &mut ep, &mut dev, KeyDecision::Unregistered);
    assert!(matches!(ep.poll_event(), Some(Event::Failed { reason: HandshakeFailure::Unregistered, .. })));
    assert_eq!(ep.peer_count(), 0);
    let sent: Vec<_> = core::iter::from_fn(|| ep.poll_transmit()).collect();
    assert!(sent.iter().all(|t| t.bytes().len() < 40), "no CHALLENGE: {sent:?}");
}

#[test]
fn challenge_goes_unanswered_five_times_then_the_peer_is_gone() {
    let mut ep =
        endpoint(EndpointConfig { handshake_timeout: Duration::from_secs(60), ..EndpointConfig::default() });
    let mut dev = device(T0);
    until_challenge(T0, &mut ep, &mut dev, key(1));
    let mut t = T0;
    let mut challenges = 0;
    for _ in 0..200 {
        while let Some(x) = ep.poll_transmit() {
            challenges += usize::from(x.bytes().len() == MAX_TRANSMIT_LEN);
        }
        if let Some(e) = ep.poll_event() {
            assert!(matches!(e, Event::Failed { reason: HandshakeFailure::PeerGone, .. }), "{e:?}");
            assert_eq!(challenges, 5);
            return;
        }
        t = ep.poll_timeout().unwrap().max(t);
        ep.handle_timeout(t);
    }
    panic!("never gave up");
}
