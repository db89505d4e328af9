//! Why a handshake ended without a session, as types. The failure counters and the lockout
//! decide by matching these exhaustively, never on error text: a new reason has to be placed
//! in both decisions before the gateway compiles, instead of falling into "malformed" because
//! a message was reworded.

use std::fmt;
use std::sync::atomic::AtomicU64;

use super::stats::ShardStats;
use crate::proto::endpoint::HandshakeFailure;
use crate::proto::{Error as ProtoError, ErrorKind};
use crate::rt::Error;

/// A handshake the gateway declined to go on with. Counted where it is made
/// (`refused_locked_out`, `refused_over_limit`), so never again as a failure, and never
/// toward lockout: no key was tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The source address or the device is locked out.
    LockedOut,
    /// The shard's X25519 budget was spent.
    OverBudget,
    /// UDP: a newer handshake from the same address took its place.
    Superseded,
}

/// Why a handshake ended without a session.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// Declined before any key was tried.
    Refused(Refusal),
    /// The device has no key.
    Unregistered,
    /// HELLO_ACK's proof did not verify: a wrong key, or a spoofer.
    BadProof,
    /// No verified HELLO_ACK within the handshake timeout.
    Timeout,
    /// UDP: CHALLENGE went unacknowledged five times.
    PeerGone,
    /// Ended by the shard's evictor: it stalled while the shard was short of handshake slots.
    Evicted,
    /// The peer's frames broke the handshake (wrong type or length, a low-order key).
    Malformed(ProtoError),
    /// The peer closed the connection, or the socket failed, before the handshake ended.
    Closed(Error),
}

impl HandshakeError {
    /// The failure counter this outcome adds one to; `None` for refusals (already counted).
    pub(crate) fn counter<'a>(&self, s: &'a ShardStats) -> Option<&'a AtomicU64> {
        match self {
            HandshakeError::Refused(_) => None,
            HandshakeError::Unregistered => Some(&s.handshakes_unknown_device),
            HandshakeError::BadProof => Some(&s.handshakes_bad_key),
            // Evictions are also counted on their own (`handshakes_evicted`) by the evictor.
            HandshakeError::Timeout | HandshakeError::PeerGone | HandshakeError::Evicted => {
                Some(&s.handshakes_timeout)
            }
            HandshakeError::Malformed(_) | HandshakeError::Closed(_) => Some(&s.handshakes_malformed),
        }
    }

    /// Whether the failure counts toward the lockout of the device it named (and its source).
    pub(crate) fn counts_toward_lockout(&self) -> bool {
        match self {
            HandshakeError::Refused(_) => false,
            // An eviction follows from our load, not from the peer's key: during a reconnect
            // storm it must not lock a NAT address full of healthy devices out.
            HandshakeError::Evicted => false,
            HandshakeError::Unregistered
            | HandshakeError::BadProof
            | HandshakeError::Timeout
            | HandshakeError::PeerGone
            | HandshakeError::Malformed(_)
            | HandshakeError::Closed(_) => true,
        }
    }

    /// The peer closed the connection cleanly (not a socket error): with no HELLO before, it
    /// is a port probe, not worth a log line.
    pub(crate) fn is_clean_close(&self) -> bool {
        matches!(self, HandshakeError::Closed(Error::Protocol(e)) if e.kind() == ErrorKind::ConnectionClosed)
    }
}

/// The errors of the handshake's steps (socket reads and writes, frame decoding, the proof
/// check), sorted by what they mean for the peer.
impl From<Error> for HandshakeError {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => HandshakeError::Timeout,
            // Settings are refused before anything is served; a step cannot produce one, and
            // if it did the connection is over all the same.
            Error::Io(_) | Error::Config(_) => HandshakeError::Closed(e),
            Error::Protocol(p) => match p.kind() {
                ErrorKind::Auth => HandshakeError::BadProof,
                ErrorKind::Timeout => HandshakeError::Timeout,
                ErrorKind::ConnectionClosed => HandshakeError::Closed(e),
                _ => HandshakeError::Malformed(p),
            },
        }
    }
}

impl From<ProtoError> for HandshakeError {
    fn from(e: ProtoError) -> Self {
        Error::Protocol(e).into()
    }
}

/// The UDP endpoint's reasons, one for one.
impl From<HandshakeFailure> for HandshakeError {
    fn from(f: HandshakeFailure) -> Self {
        match f {
            HandshakeFailure::Timeout => HandshakeError::Timeout,
            HandshakeFailure::BadProof => HandshakeError::BadProof,
            HandshakeFailure::PeerGone => HandshakeError::PeerGone,
            HandshakeFailure::Unregistered => HandshakeError::Unregistered,
            HandshakeFailure::OverBudget => HandshakeError::Refused(Refusal::OverBudget),
            HandshakeFailure::Crypto => {
                HandshakeError::Malformed(ProtoError::misbehaved(ErrorKind::Crypto, "key agreement failed"))
            }
            HandshakeFailure::Evicted => HandshakeError::Evicted,
            HandshakeFailure::Superseded => HandshakeError::Refused(Refusal::Superseded),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::LockedOut => "locked out",
            Refusal::OverBudget => "handshake budget exhausted",
            Refusal::Superseded => "superseded by a newer handshake",
        })
    }
}

/// The reference's class name first, as protocol errors print: operators search the
/// "handshake failed" log lines by class (`AuthError`, `TimeoutError`…).
impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Refused(r) => write!(f, "refused: {r}"),
            HandshakeError::Unregistered => f.write_str("HandshakeError: device not registered"),
            HandshakeError::BadProof => f.write_str("AuthError: HELLO_ACK proof did not verify"),
            HandshakeError::Timeout => f.write_str("TimeoutError: handshake timed out"),
            HandshakeError::PeerGone => f.write_str("TimeoutError: device stopped answering"),
            HandshakeError::Evicted => f.write_str("TimeoutError: handshake evicted: stalled under pressure"),
            HandshakeError::Malformed(e) => e.fmt(f),
            HandshakeError::Closed(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HandshakeError::Malformed(e) => Some(e),
            HandshakeError::Closed(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::sync::atomic::Ordering;

    use super::*;

    /// Which counter an outcome lands in, by the metric's name.
    fn counted(e: &HandshakeError) -> Option<&'static str> {
        let s = ShardStats::default();
        let c = e.counter(&s)? as *const AtomicU64;
        let names: [(&AtomicU64, &str); 4] = [
            (&s.handshakes_unknown_device, "unknown_device"),
            (&s.handshakes_bad_key, "bad_key"),
            (&s.handshakes_timeout, "timeout"),
            (&s.handshakes_malformed, "malformed"),
        ];
        let name = names.iter().find(|(a, _)| std::ptr::eq(*a, c)).map(|(_, n)| *n);
        assert!(name.is_some(), "{e}: an unexpected counter");
        assert_eq!(s.handshakes_ok.load(Ordering::Relaxed), 0);
        name
    }

    #[test]
    fn every_udp_reason_lands_where_it_did() {
        use HandshakeFailure as F;
        let table = [
            (F::Timeout, Some("timeout"), true),
            (F::BadProof, Some("bad_key"), true),
            (F::PeerGone, Some("timeout"), true),
            (F::Unregistered, Some("unknown_device"), true),
            (F::OverBudget, None, false),
            (F::Crypto, Some("malformed"), true),
            (F::Evicted, Some("timeout"), false),
            (F::Superseded, None, false),
        ];
        for (f, counter, lockout) in table {
            let e = HandshakeError::from(f);
            assert_eq!(counted(&e), counter, "{f:?}");
            assert_eq!(e.counts_toward_lockout(), lockout, "{f:?}");
        }
    }

    #[test]
    fn step_errors_are_sorted_by_meaning_not_text() {
        let auth = ProtoError::misbehaved(ErrorKind::Auth, "any wording");
        assert!(matches!(HandshakeError::from(auth), HandshakeError::BadProof));
        let timed_out = Error::Io(std::io::ErrorKind::TimedOut.into());
        assert!(matches!(HandshakeError::from(timed_out), HandshakeError::Timeout));
        let reset = HandshakeError::from(Error::Io(std::io::ErrorKind::ConnectionReset.into()));
        assert_eq!(counted(&reset), Some("malformed"));
        assert!(!reset.is_clean_close() && reset.source().is_some());
        let eof = HandshakeError::from(ProtoError::left(ErrorKind::ConnectionClosed, "eof"));
        assert!(eof.is_clean_close() && eof.counts_toward_lockout());
        let crc = HandshakeError::from(ProtoError::garbage(ErrorKind::Crc, "bad crc"));
        assert!(matches!(&crc, HandshakeError::Malformed(e) if e.kind() == ErrorKind::Crc));
        assert_eq!(crc.source().map(|s| s.to_string()), Some("CRCError: bad crc".into()));
        // Log lines keep the reference's class names.
        assert!(HandshakeError::BadProof.to_string().starts_with("AuthError"));
        assert!(HandshakeError::Evicted.to_string().starts_with("TimeoutError"));
        assert_eq!(crc.to_string(), "CRCError: bad crc");
    }

    #[test]
    fn refusals_are_neither_failures_nor_lockout() {
        for r in [Refusal::LockedOut, Refusal::OverBudget, Refusal::Superseded] {
            let e = HandshakeError::Refused(r);
            assert_eq!(counted(&e), None);
            assert!(!e.counts_toward_lockout());
        }
        assert!(HandshakeError::Unregistered.counts_toward_lockout());
    }
}
