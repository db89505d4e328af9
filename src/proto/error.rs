//! One error type for the protocol core. Kinds mirror the reference SDK's exception classes
//! (PROTOCOL.md §8); each kind belongs to a fault group, and the on-wire reaction (close the
//! TCP connection, drop the UDP datagram, or report to the local caller) is decided in one
//! place, [`Error::reaction`].

use core::fmt;

/// The reference SDK's exception classes, one variant each (`USMPError` is the type itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `FrameError`: malformed frame (too short, unknown type, wrong payload shape).
    Frame,
    /// `CRCError`: CRC-16/MODBUS mismatch.
    Crc,
    /// `MagicError`: the first two bytes are not `CD AB`.
    Magic,
    /// `VersionError`: version byte is not 0x02.
    Version,
    /// `PayloadError`: length over 480, truncated payload, or a message over 1808 bytes.
    Payload,
    /// `HandshakeError`: unexpected frame or malformed field during the handshake.
    Handshake,
    /// `AuthError`: an HMAC proof did not verify (wrong PSK or a rogue peer).
    Auth,
    /// `CryptoError`: AEAD open failed, nonce prefix mismatch, bad or low-order public key.
    Crypto,
    /// `SequenceError`: gap, replay, out-of-order fragment, spent sequence space.
    Sequence,
    /// `TimeoutError`: handshake or receive deadline passed.
    Timeout,
    /// `ConnectionClosedError`: the peer said BYE, flooded control frames, or went away.
    ConnectionClosed,
    /// `NotConnectedError`: operation on a session that is not established.
    NotConnected,
}

impl ErrorKind {
    /// The reference SDK's class name for this kind (used in logs and metrics labels).
    pub fn class_name(self) -> &'static str {
        match self {
            ErrorKind::Frame => "FrameError",
            ErrorKind::Crc => "CRCError",
            ErrorKind::Magic => "MagicError",
            ErrorKind::Version => "VersionError",
            ErrorKind::Payload => "PayloadError",
            ErrorKind::Handshake => "HandshakeError",
            ErrorKind::Auth => "AuthError",
            ErrorKind::Crypto => "CryptoError",
            ErrorKind::Sequence => "SequenceError",
            ErrorKind::Timeout => "TimeoutError",
            ErrorKind::ConnectionClosed => "ConnectionClosedError",
            ErrorKind::NotConnected => "NotConnectedError",
        }
    }

    /// True for the kinds the reference derives from `FrameError`.
    pub fn is_frame_error(self) -> bool {
        matches!(
            self,
            ErrorKind::Frame | ErrorKind::Crc | ErrorKind::Magic | ErrorKind::Version | ErrorKind::Payload
        )
    }

    /// True for the kinds the reference derives from `HandshakeError`.
    pub fn is_handshake_error(self) -> bool {
        matches!(self, ErrorKind::Handshake | ErrorKind::Auth)
    }
}

/// Who is at fault, in the spirit of rustls' error grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The bytes are not a well-formed USMP frame (noise, scanner, corruption).
    PeerSentGarbage,
    /// Well-formed frames that break the protocol's rules (bad proof, replay, sequence gap).
    PeerMisbehaved,
    /// The peer ended the session deliberately (BYE) or went silent.
    PeerLeft,
    /// The local caller asked for something impossible (oversize message, spent session).
    LocalMisuse,
}

/// Which transport a session runs over; decides the reaction to bad input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// Reliable stream: every violation closes the connection.
    Tcp,
    /// Datagrams: bad input is dropped, only a few events end the session.
    Udp,
}

/// What the I/O layer must do about an error. Errors are never reported on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reaction {
    /// Close the connection / end the session (BYE is not sent for peer faults).
    Close,
    /// Drop the offending datagram; the session goes on untouched.
    Drop,
    /// Nothing was sent or received: hand the error to the local caller.
    Report,
}

/// A protocol error: a kind plus a static detail (no allocation on the error path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    fault: Fault,
    detail: &'static str,
}

impl Error {
    /// A malformed-input error (`PeerSentGarbage`).
    pub const fn garbage(kind: ErrorKind, detail: &'static str) -> Self {
        Error { kind, fault: Fault::PeerSentGarbage, detail }
    }

    /// A rule violation by a peer that spoke well-formed USMP (`PeerMisbehaved`).
    pub const fn misbehaved(kind: ErrorKind, detail: &'static str) -> Self {
        Error { kind, fault: Fault::PeerMisbehaved, detail }
    }

    /// The peer ended the session (`PeerLeft`).
    pub const fn left(kind: ErrorKind, detail: &'static str) -> Self {
        Error { kind, fault: Fault::PeerLeft, detail }
    }

    /// A local API misuse (`LocalMisuse`): nothing went on the wire.
    pub const fn misuse(kind: ErrorKind, detail: &'static str) -> Self {
        Error { kind, fault: Fault::LocalMisuse, detail }
    }

    /// The reference-compatible kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The fault group.
    pub fn fault(&self) -> Fault {
        self.fault
    }

    /// A short human explanation (static, safe to log).
    pub fn detail(&self) -> &'static str {
        self.detail
    }

    /// The one place where an error becomes an on-wire reaction (PROTOCOL.md §2, §5, §7).
    ///
    /// TCP closes on every peer error. UDP drops the datagram, except for the events that end
    /// a UDP session: BYE, the control-frame flood guard, a spent sequence space, or a timeout.
    pub fn reaction(&self, transport: Transport) -> Reaction {
        match (self.fault, transport) {
            (Fault::LocalMisuse, _) => Reaction::Report,
            (_, Transport::Tcp) => Reaction::Close,
            (Fault::PeerLeft, Transport::Udp) => Reaction::Close,
            (_, Transport::Udp) => Reaction::Drop,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.class_name(), self.detail)
    }
}

impl std::error::Error for Error {}

/// Result alias for the protocol core.
pub type Result<T> = core::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reactions_follow_transport_and_fault() {
        let crc = Error::garbage(ErrorKind::Crc, "x");
        assert_eq!(crc.reaction(Transport::Tcp), Reaction::Close);
        assert_eq!(crc.reaction(Transport::Udp), Reaction::Drop);
        let bye = Error::left(ErrorKind::ConnectionClosed, "bye");
        assert_eq!(bye.reaction(Transport::Udp), Reaction::Close);
        let big = Error::misuse(ErrorKind::Payload, "too big");
        assert_eq!(big.reaction(Transport::Tcp), Reaction::Report);
        assert_eq!(big.reaction(Transport::Udp), Reaction::Report);
    }

    #[test]
    fn class_names_match_reference() {
        assert_eq!(ErrorKind::Crc.class_name(), "CRCError");
        assert!(ErrorKind::Magic.is_frame_error());
        assert!(ErrorKind::Auth.is_handshake_error());
        assert!(!ErrorKind::Crypto.is_frame_error());
    }
}
