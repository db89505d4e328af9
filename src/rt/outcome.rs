//! What a connection reports about itself: why it ended ([`CloseReason`]) and what it carried
//! ([`ConnStats`], stored per connection as the smaller [`Counters`]).

use crate::proto::ErrorKind;

/// Why a connection ended (for logs, metrics and the application).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer sent BYE.
    PeerBye,
    /// The peer closed the socket without BYE.
    PeerClosed,
    /// The peer broke a protocol rule (kind of the error).
    Protocol(ErrorKind),
    /// A socket error.
    Io,
    /// The application called `bye`/`disconnect`.
    LocalBye,
    /// The session handler returned.
    HandlerDone,
    /// No authenticated frame within the session timeout.
    Watchdog,
    /// Closed by an operator (`kick`).
    Kicked,
    /// The gateway is shutting down.
    Shutdown,
    /// The device's key was removed from the registry.
    Revoked,
    /// UDP: five transmissions of a frame went unacknowledged.
    PeerGone,
    /// UDP: a new handshake from the same address replaced this session.
    Replaced,
    /// The device connected elsewhere (another gateway of the fleet).
    Takeover,
    /// Its output did not move for longer than the watchdog, or its closing frames (BYE)
    /// did not leave within the close grace: the output was abandoned and the socket reset.
    Stalled,
}

impl CloseReason {
    /// A short label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::PeerBye => "peer_bye",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Protocol(_) => "protocol_error",
            CloseReason::Io => "io_error",
            CloseReason::LocalBye => "local_bye",
            CloseReason::HandlerDone => "handler_done",
            CloseReason::Watchdog => "watchdog",
            CloseReason::Kicked => "kicked",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Revoked => "revoked",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::Replaced => "replaced",
            CloseReason::Takeover => "takeover",
            CloseReason::Stalled => "stalled",
        }
    }
}

/// Per-connection traffic counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnStats {
    /// Authenticated frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Bytes received (whole frames).
    pub bytes_in: u64,
    /// Bytes queued for sending.
    pub bytes_out: u64,
    /// Frames dropped (UDP) without ending the session.
    pub dropped: u64,
    /// UDP retransmissions.
    pub retransmits: u64,
}

/// [`ConnStats`] as a connection stores them: the rare counters in 32 bits (they saturate).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) frames_in: u64,
    pub(crate) frames_out: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) dropped: u32,
    pub(crate) retransmits: u32,
}

impl From<Counters> for ConnStats {
    fn from(c: Counters) -> Self {
        ConnStats {
            frames_in: c.frames_in,
            frames_out: c.frames_out,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            dropped: c.dropped.into(),
            retransmits: c.retransmits.into(),
        }
    }
}

impl From<ConnStats> for Counters {
    fn from(s: ConnStats) -> Self {
        Counters {
            frames_in: s.frames_in,
            frames_out: s.frames_out,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            dropped: u32::try_from(s.dropped).unwrap_or(u32::MAX),
            retransmits: u32::try_from(s.retransmits).unwrap_or(u32::MAX),
        }
    }
}
