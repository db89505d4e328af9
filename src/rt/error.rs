//! The runtime's error: a protocol error (with the reference-compatible kind), an I/O error, or
//! a configuration the gateway or client refused before it touched the network.

use std::fmt;

use crate::proto::{Error as ProtoError, ErrorKind};
use crate::psk::ConfigError;

/// Errors of the gateway and client APIs.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A USMP protocol error (see [`ErrorKind`] for the reference's class).
    Protocol(ProtoError),
    /// A socket error.
    Io(std::io::Error),
    /// A setting is missing or out of range (the error names it); nothing was started.
    Config(ConfigError),
}

impl Error {
    /// The reference-compatible kind: I/O failures map to `ConnectionClosed` (or `Timeout`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Protocol(e) => e.kind(),
            Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
            Error::Io(_) => ErrorKind::ConnectionClosed,
            // The reference raises no USMP error class for bad arguments; the nearest is that
            // no session was ever set up. Callers that care match `Error::Config` itself.
            Error::Config(_) => ErrorKind::NotConnected,
        }
    }

    pub(crate) fn closed(detail: &'static str) -> Self {
        Error::Protocol(ProtoError::left(ErrorKind::ConnectionClosed, detail))
    }

    pub(crate) fn timeout(detail: &'static str) -> Self {
        Error::Protocol(ProtoError::left(ErrorKind::Timeout, detail))
    }

    pub(crate) fn misuse(kind: ErrorKind, detail: &'static str) -> Self {
        Error::Protocol(ProtoError::misuse(kind, detail))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Protocol(e) => e.fmt(f),
            Error::Io(e) => write!(f, "ConnectionClosedError: {e}"),
            Error::Config(e) => write!(f, "invalid configuration: {e}"),
        }
    }
}

impl std::error::Error for Error {
    /// The wrapped protocol, socket or configuration error, for error-chain reporters and
    /// `downcast_ref`.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Protocol(e) => Some(e),
            Error::Io(e) => Some(e),
            Error::Config(e) => Some(e),
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl From<ProtoError> for Error {
    fn from(e: ProtoError) -> Self {
        Error::Protocol(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}
