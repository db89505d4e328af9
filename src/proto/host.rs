//! The rules every holder of an established session follows around [`Session::open`], whatever
//! stores its output and whoever reads its messages: the gateway's and the client's
//! connections (`rt::conn`) and the in-memory peer of the two-peer harness and the fuzzer
//! ([`super::peer`]). They keep their sealed output as frames back to back in one queue;
//! this module says what an opened frame asks of them, how far that queue may grow and which
//! of its frames a peer's REKEY re-seals.
//!
//! [`Session::open`]: super::session::Session::open

use super::crypto::RECORD_OVERHEAD;
use super::error::{ErrorKind, Reaction, Result, Transport};
use super::frame::HEADER_LEN;
use super::link::Link;
use super::session::{Received, Session};

/// Queued output above which new messages wait (or are refused) and PINGs go unanswered: a
/// peer that does not take our frames cannot grow the queue.
pub const OUT_HIGH_WATER: usize = 64 * 1024;
/// Messages waiting for an application that is not reading before input pauses (TCP stops
/// reading; UDP leaves new messages unacknowledged for the peer to retransmit).
pub const INBOX_CAP: usize = 256;
/// Room for one control frame (PING, PONG, BYE): header, nonce and tag.
pub const CONTROL_FRAME_LEN: usize = HEADER_LEN + RECORD_OVERHEAD;

/// What the host of a session must do about one frame it gave to `Session::open`.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response<'a> {
    /// Hand this complete message to the application.
    Deliver(&'a [u8]),
    /// Queue a PONG (`Session::seal_pong`, which applies the control-frame budget).
    Pong,
    /// The peer rekeyed: re-seal the frames [`unsent_from`] points at
    /// (`Session::reseal_unsent`), before anything else is sealed.
    Reseal,
    /// Authenticated; nothing to do (a fragment, a PONG, a PING left unanswered because the
    /// output queue is full).
    Nothing,
    /// The peer said BYE: close without sending anything (no BYE answers a BYE).
    PeerBye,
    /// The session is over (TCP: any violation; UDP: flood guard, spent sequence): close
    /// without BYE, discarding queued output.
    Close(ErrorKind),
    /// UDP: drop the frame and count it; the session goes on.
    Drop(ErrorKind),
}

/// What `opened` (the result of `Session::open` on a session over `transport`) asks of a
/// host with `queued` bytes of output waiting.
pub fn respond(opened: Result<Received<'_>>, transport: Transport, queued: usize) -> Response<'_> {
    match opened {
        Ok(Received::Message(m)) => Response::Deliver(m),
        // PONGs are bounded like every other output: a peer that pings at the flood guard's
        // rate and never takes our frames (UDP: acknowledges slowly) cannot grow the queue.
        // The PING itself was accepted.
        Ok(Received::Ping) if queued < OUT_HIGH_WATER => Response::Pong,
        Ok(Received::Rekeyed) => Response::Reseal,
        Ok(Received::Ping | Received::Pong | Received::Fragment) => Response::Nothing,
        Ok(Received::Bye) => Response::PeerBye,
        Err(e) => match e.reaction(transport) {
            Reaction::Close => Response::Close(e.kind()),
            Reaction::Drop | Reaction::Report => Response::Drop(e.kind()),
        },
    }
}

/// The length of the frame a queue of sealed frames starts with (its header's length field,
/// at most what is queued). At least a header's worth must be queued.
pub fn head_len(queued: &[u8]) -> usize {
    (HEADER_LEN + usize::from(u16::from_le_bytes([queued[8], queued[9]]))).min(queued.len())
}

/// Where, in a queue of sealed frames, the frames that have not begun to leave start: the
/// ones a peer's REKEY re-seals. TCP: after `partly_written` bytes that finish a frame the
/// socket took part of. UDP: after the frame in flight, if one is (`in_flight`): the peer may
/// hold it already, and its retransmissions must stay the same frame.
pub fn unsent_from(transport: Transport, queued: &[u8], partly_written: usize, in_flight: bool) -> usize {
    let from = match transport {
        Transport::Udp if in_flight && queued.len() >= HEADER_LEN => head_len(queued),
        Transport::Udp => 0,
        _ => partly_written,
    };
    from.min(queued.len())
}

/// On the peer's REKEY ([`Response::Reseal`]): re-seal the frames of `queued` that have not
/// begun to leave ([`unsent_from`]) under the new key and, on UDP, have `link` expect their
/// new UTACKs. The runtime's connection and the in-memory peer both call this.
pub fn reseal_unsent(
    session: &mut Session,
    link: &mut Link,
    queued: &mut [u8],
    partly_written: usize,
) -> Result<()> {
    let transport = session.transport();
    let from = unsent_from(transport, queued, partly_written, link.is_busy());
    session.reseal_unsent(&mut queued[from..])?;
    if transport == Transport::Udp {
        link.requeue_after(usize::from(from > 0), &queued[from..], session.tx_key_bytes());
    }
    Ok(())
}

/// After a write took `written` bytes off the front of a queue whose first `partly_written`
/// bytes finished a frame: how many bytes at the front of what is left finish a frame now.
pub fn partly_written_after(queued: &[u8], partly_written: usize, written: usize) -> usize {
    let mut boundary = partly_written;
    while boundary < written {
        boundary += head_len(&queued[boundary..]);
    }
    boundary - written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::error::Error;

    #[test]
    fn pings_go_unanswered_once_output_reaches_the_high_water() {
        assert_eq!(respond(Ok(Received::Ping), Transport::Tcp, OUT_HIGH_WATER - 1), Response::Pong);
        assert_eq!(respond(Ok(Received::Ping), Transport::Udp, OUT_HIGH_WATER), Response::Nothing);
    }

    #[test]
    fn errors_close_tcp_and_drop_udp_datagrams() {
        let bad = || Err(Error::misbehaved(ErrorKind::Crypto, "tag"));
        assert_eq!(respond(bad(), Transport::Tcp, 0), Response::Close(ErrorKind::Crypto));
        assert_eq!(respond(bad(), Transport::Udp, 0), Response::Drop(ErrorKind::Crypto));
        assert_eq!(respond(Ok(Received::Bye), Transport::Udp, 0), Response::PeerBye);
        assert_eq!(respond(Ok(Received::Rekeyed), Transport::Tcp, 0), Response::Reseal);
    }

    fn frames(lens: &[usize]) -> Vec<u8> {
        let mut q = Vec::new();
        for &n in lens {
            let mut f = vec![0u8; HEADER_LEN + n];
            f[8..10].copy_from_slice(&(n as u16).to_le_bytes());
            q.extend_from_slice(&f);
        }
        q
    }

    #[test]
    fn a_partly_written_frame_is_tracked_across_writes() {
        let q = frames(&[40, 100, 28]); // frames of 52, 112 and 40 bytes
        assert_eq!(partly_written_after(&q, 0, 0), 0);
        assert_eq!(partly_written_after(&q, 0, 52), 0);
        assert_eq!(partly_written_after(&q, 0, 60), 104);
        // 104 bytes finish the second frame; writing 110 more leaves 34 of the third.
        assert_eq!(partly_written_after(&q[60..], 104, 110), 34);
        assert_eq!(unsent_from(Transport::Tcp, &q[60..], 104, false), 104);
    }

    #[test]
    fn udp_reseals_after_the_frame_in_flight_only() {
        let q = frames(&[40, 100]);
        assert_eq!(unsent_from(Transport::Udp, &q, 0, true), 52);
        assert_eq!(unsent_from(Transport::Udp, &q, 0, false), 0);
        assert_eq!(unsent_from(Transport::Udp, &[], 0, true), 0);
    }
}
