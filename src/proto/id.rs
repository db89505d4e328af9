//! Device and session identifiers as the API and the logs show them: a device id is 6 bytes
//! in colon hex (`00:11:22:33:44:55`, as the reference prints it), a session id 16 bytes in
//! 32 lowercase hex digits. Newtypes rather than `&str`, so a malformed id is refused where it
//! is parsed, with a parse error, instead of travelling on as "device not connected".

use std::fmt;
use std::str::FromStr;

use crate::proto::crypto::DEVICE_ID_LEN;

/// Bytes of a session id (the HELLO_ACK's session id).
pub const SESSION_ID_LEN: usize = 16;

/// A device's identity: 6 bytes, shown as colon hex (`00:11:22:33:44:55`).
///
/// Parses from colon hex, dash-separated hex or 12 bare hex digits, in either case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceId([u8; DEVICE_ID_LEN]);

impl DeviceId {
    /// The id with these bytes.
    pub const fn new(bytes: [u8; DEVICE_ID_LEN]) -> Self {
        DeviceId(bytes)
    }

    /// The 6 bytes on the wire.
    pub const fn as_bytes(&self) -> &[u8; DEVICE_ID_LEN] {
        &self.0
    }
}

impl From<[u8; DEVICE_ID_LEN]> for DeviceId {
    fn from(b: [u8; DEVICE_ID_LEN]) -> Self {
        DeviceId(b)
    }
}

impl From<DeviceId> for [u8; DEVICE_ID_LEN] {
    fn from(d: DeviceId) -> Self {
        d.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl FromStr for DeviceId {
    type Err = ParseIdError;

    /// `001122334455`, `00:11:22:33:44:55` or `00-11-22-33-44-55`.
    fn from_str(s: &str) -> Result<Self, ParseIdError> {
        let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
        parse_hex(&hex)
            .and_then(|v| v.try_into().ok())
            .map(DeviceId)
            .ok_or(ParseIdError { what: IdKind::Device })
    }
}

/// One session's identity: 16 bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SessionId([u8; SESSION_ID_LEN]);

impl SessionId {
    /// The id with these bytes.
    pub const fn new(bytes: [u8; SESSION_ID_LEN]) -> Self {
        SessionId(bytes)
    }

    /// The 16 bytes on the wire.
    pub const fn as_bytes(&self) -> &[u8; SESSION_ID_LEN] {
        &self.0
    }
}

impl From<[u8; SESSION_ID_LEN]> for SessionId {
    fn from(b: [u8; SESSION_ID_LEN]) -> Self {
        SessionId(b)
    }
}

impl From<SessionId> for [u8; SESSION_ID_LEN] {
    fn from(s: SessionId) -> Self {
        s.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl FromStr for SessionId {
    type Err = ParseIdError;

    /// Exactly 32 hex digits, in either case.
    fn from_str(s: &str) -> Result<Self, ParseIdError> {
        parse_hex(s)
            .and_then(|v| v.try_into().ok())
            .map(SessionId)
            .ok_or(ParseIdError { what: IdKind::Session })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdKind {
    Device,
    Session,
}

/// A string that is not a [`DeviceId`] or a [`SessionId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseIdError {
    what: IdKind,
}

impl fmt::Display for ParseIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.what {
            IdKind::Device => "not a device id (6 bytes in hex, e.g. 00:11:22:33:44:55)",
            IdKind::Session => "not a session id (32 hex digits)",
        })
    }
}

impl std::error::Error for ParseIdError {}

/// Parse an even-length hex string.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// Lowercase hex of any bytes. One allocation: the NATS bridge spells ids in every message's
/// headers.
pub fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_print_as_colon_hex_and_parse_back() {
        let d = DeviceId::new([0xfe, 0xdc, 0xba, 0x98, 0x76, 0x05]);
        assert_eq!(d.to_string(), "fe:dc:ba:98:76:05");
        assert_eq!("fe:dc:ba:98:76:05".parse(), Ok(d));
        assert_eq!("FEDCBA987605".parse(), Ok(d));
        assert_eq!("fe-dc-ba-98-76-05".parse(), Ok(d));
        for bad in ["", "fe:dc:ba:98:76", "fe:dc:ba:98:76:05:00", "zz:dc:ba:98:76:05", "fé:dc:ba:98:76:0"] {
            let e = bad.parse::<DeviceId>().unwrap_err();
            assert!(e.to_string().contains("not a device id"), "{bad}: {e}");
        }
    }

    #[test]
    fn session_ids_print_as_32_hex_and_parse_back() {
        let s = SessionId::new([0xab; 16]);
        assert_eq!(s.to_string(), "ab".repeat(16));
        assert_eq!(s.to_string().parse(), Ok(s));
        assert!("ab".repeat(15).parse::<SessionId>().is_err());
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
