//! The runtime's error: a protocol error (with the reference-compatible kind) or an I/O error.

use std::fmt;

use crate::proto::{Error as ProtoError, ErrorKind};

/// Errors of the gateway and client APIs.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A USMP protocol error (see [`ErrorKind`] for the reference's class).
    Protocol(ProtoError),
    /// A socket error.
    Io(std::io::Error),
}

impl Error {
    /// The reference-compatible kind: I/O failures map to `ConnectionClosed` (or `Timeout`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Protocol(e) => e.kind(),
            Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
            Error::Io(_) => ErrorKind::ConnectionClosed,
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
        }
    }
}

impl std::error::Error for Error {
    /// The wrapped protocol or socket error, for error-chain reporters and `downcast_ref`.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Protocol(e) => Some(e),
            Error::Io(e) => Some(e),
        }
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
