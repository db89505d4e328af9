//! The connection's share of the session rules, without a socket: what an opened frame does
//! to the output queue (PONGs bounded, a peer's REKEY re-sealing what has not left).

use super::*;
use crate::proto::frame::PacketType;
use crate::proto::session::Received;
use crate::proto::testing::session_pair;

/// A connection holding the gateway's end of a session, and the device's end.
fn conn(t: Transport) -> (Rc<Conn>, Session) {
    let (device, gateway) = session_pair(t);
    (Conn::new(gateway, "127.0.0.1:9".parse().unwrap()), device)
}

fn sealed(f: impl FnOnce(&mut [u8]) -> usize) -> Vec<u8> {
    let mut out = vec![0u8; 128];
    let n = f(&mut out);
    out.truncate(n);
    out
}

fn frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = head_len(&bytes[at..]);
        v.push(bytes[at..at + n].to_vec());
        at += n;
    }
    v
}

#[test]
fn a_ping_is_answered_only_while_output_is_under_the_high_water() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (c, mut device) = conn(t);
        let mut ping = sealed(|o| device.seal_ping(now(), o).unwrap());
        assert_eq!(c.on_frame(&mut ping, now()), FrameOutcome::Accepted);
        assert_eq!(c.out.borrow().len(), CONTROL_FRAME_LEN, "{t:?}: the PONG is queued");
        while c.out.borrow().len() < OUT_HIGH_WATER {
            c.try_send(&[0; 1808]).unwrap();
        }
        let before = c.out.borrow().len();
        let mut ping = sealed(|o| device.seal_ping(now(), o).unwrap());
        assert_eq!(c.on_frame(&mut ping, now()), FrameOutcome::Accepted);
        assert_eq!(c.out.borrow().len(), before, "{t:?}: no PONG above the high water");
        assert!(c.close_reason().is_none());
    }
}

/// TCP: a peer's REKEY re-seals the whole frames queued behind a partly written one; the
/// partly written frame stays as it is (its first bytes are on the wire).
#[test]
fn a_peers_rekey_reseals_tcp_output_behind_the_partly_written_frame() {
    let (c, mut device) = conn(Transport::Tcp);
    for m in [&b"one"[..], b"two", b"three"] {
        c.try_send(m).unwrap();
    }
    let original = frames(&c.out.borrow());
    // The socket took 10 bytes of the first frame (what `rt::tcp::flush` records).
    let rest = crate::proto::host::partly_written_after(&c.out.borrow(), 0, 10);
    c.head_rest.set(rest as u16);
    c.out.borrow_mut().drain(..10);
    let mut rekey = sealed(|o| device.seal_rekey(&[3; 32], o).unwrap());
    assert_eq!(c.on_frame(&mut rekey, now()), FrameOutcome::Accepted);
    let out = c.out.borrow().clone();
    assert_eq!(&out[..rest], &original[0][10..], "the partly written frame is untouched");
    // The device reads the first frame whole (old key, kept until a new-key frame), then
    // the rest under the new key only.
    let mut first = original[0].clone();
    assert_eq!(device.open(&mut first, now()).unwrap(), Received::Message(b"one"));
    let mut got = Vec::new();
    for mut f in frames(&out[rest..]) {
        if let Received::Message(m) = device.open(&mut f, now()).unwrap() {
            got.push(m.to_vec());
        }
        assert!(device.rekey_settled(), "a queued frame was still under the old key");
    }
    assert_eq!(got, vec![b"two".to_vec(), b"three".to_vec()]);
}

/// Just enough of a UDP host around a connection for its link to take a UTACK.
struct AckOnly<'a>(&'a Conn);

impl crate::proto::link::LinkHost for AckOnly<'_> {
    fn with_link<R>(&self, f: impl FnOnce(&mut crate::proto::link::Link) -> R) -> R {
        f(&mut self.0.link.borrow_mut())
    }
    fn input_blocked(&self) -> bool {
        false
    }
    fn ack_key(&self) -> [u8; 32] {
        [0; 32]
    }
    fn open(&self, _: Duration, _: &mut [u8]) -> FrameOutcome {
        FrameOutcome::Rejected(ErrorKind::Frame)
    }
    fn verify_duplicate(&self, _: &mut [u8]) -> bool {
        false
    }
    fn acked(&self) {
        self.0.pop_head();
    }
    fn send(&self, _: &[u8]) {}
    fn hold_ack(&self, _: &[u8]) {}
    fn has_head(&self) -> bool {
        !self.0.is_drained()
    }
    fn send_head(&self, _: usize) {}
}

/// UDP: the frame in flight stays the same frame (its retransmissions must be copies); the
/// frames behind it are re-sealed and their UTACKs expected under the new key.
#[test]
fn a_peers_rekey_reseals_udp_output_behind_the_frame_in_flight() {
    use crate::proto::link::{handle_datagram, poll_sender, Inbound, SendAction};
    use crate::proto::udp::{encode_utack, ExpectedAck};
    let (c, mut device) = conn(Transport::Udp);
    for m in [&b"one"[..], b"two"] {
        c.try_send(m).unwrap();
    }
    let original = frames(&c.out.borrow());
    assert!(matches!(poll_sender(&AckOnly(&c), now()), SendAction::Send { .. }));
    let old_rx = *device.rx_key_bytes();
    let mut rekey = sealed(|o| device.seal_rekey(&[4; 32], o).unwrap());
    assert_eq!(c.on_frame(&mut rekey, now()), FrameOutcome::Accepted);
    let out = frames(&c.out.borrow());
    assert_eq!(out[0], original[0], "the frame in flight is unchanged");
    assert_ne!(out[1], original[1]);
    // The frame in flight is acknowledged under the key it was sealed with...
    let (mut utack, n) = encode_utack(PacketType::Data as u8, 0, Some(&old_rx));
    assert_eq!(handle_datagram(&AckOnly(&c), now(), &mut utack[..n]), Inbound::Handled);
    // ...and the next one, re-sealed at seq 2, under the new key.
    assert!(matches!(poll_sender(&AckOnly(&c), now()), SendAction::Send { .. }));
    let want = ExpectedAck::new(PacketType::Data as u8, 2, Some(device.rx_key_bytes()));
    assert_eq!(c.link.borrow().in_flight(), Some(want));
    let mut f = frames(&c.out.borrow())[0].clone();
    assert_eq!(device.open(&mut f, now()).unwrap(), Received::Message(b"two"));
    assert!(device.rekey_settled(), "the re-sealed frame opened with the new key");
}

/// UDP: the UTACK of the device's REKEY was lost, so the device sends the same REKEY again.
/// The copy is an authentic duplicate: acknowledged again with the same UTACK, the keys do not
/// move a second time, and the session goes on under the new keys.
#[test]
fn a_rekey_sent_again_after_its_utack_was_lost_is_acknowledged_again() {
    use crate::rt::datagram::UdpOut;
    use crate::rt::udp::{on_session_datagram, Inbound};
    let (c, mut device) = conn(Transport::Udp);
    let out = UdpOut::new();
    let rekey = sealed(|o| device.seal_rekey(&[5; 32], o).unwrap());
    assert_eq!(on_session_datagram(&c, &out, &mut rekey.clone(), c.peer(), now()), Inbound::Handled);
    let utack = out.pop().expect("the REKEY is acknowledged").0;
    assert!(out.pop().is_none());
    let rx = *c.session().rx_key_bytes();
    // That UTACK is lost: the device retransmits.
    assert_eq!(on_session_datagram(&c, &out, &mut rekey.clone(), c.peer(), now()), Inbound::Handled);
    let again: Vec<_> = std::iter::from_fn(|| out.pop()).map(|d| d.0).collect();
    assert!(!again.is_empty(), "the retransmitted REKEY is acknowledged again");
    assert!(again.iter().all(|u| *u == utack), "with the same UTACK");
    assert_eq!(*c.session().rx_key_bytes(), rx, "the keys switched once");
    assert!(c.close_reason().is_none());
    let mut m = sealed(|o| device.seal_message(b"after", o).unwrap());
    assert_eq!(on_session_datagram(&c, &out, &mut m, c.peer(), now()), Inbound::Handled);
    assert_eq!(c.inbox_len(), 1, "a message under the new keys is delivered");
}
