//! The 12-byte USMP header and frame encoding (PROTOCOL.md §1, §2). Decoding returns a view
//! over the caller's bytes; encoding writes into a caller buffer. Nothing here allocates.

use super::crc16::{crc16, crc16_update};
use super::error::{Error, ErrorKind, Result};

/// Frame magic 0xABCD, on the wire `CD AB`.
pub const MAGIC: u16 = 0xABCD;
/// The only protocol version spoken (exact match).
pub const VERSION: u8 = 0x02;
/// Header size: magic 2, version 1, type 1, seq 4, length 2, crc 2.
pub const HEADER_LEN: usize = 12;
/// Bytes of the header covered by the CRC and used as AEAD AAD.
pub const AAD_LEN: usize = 10;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD_LEN: usize = 480;
/// Largest frame on the wire.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD_LEN;

/// Packet types of PROTOCOL.md §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// C→S `device_id ‖ pub_C [‖ cookie]`.
    Hello = 0x01,
    /// S→C `nonce ‖ pub_S`.
    Challenge = 0x02,
    /// C→S `hmac_client`.
    HelloAck = 0x03,
    /// S→C `session_id ‖ hmac_server`.
    SessionOk = 0x04,
    /// A whole message or its last fragment (encrypted).
    Data = 0x05,
    /// Keepalive request (encrypted, empty).
    Ping = 0x06,
    /// Keepalive answer (encrypted, empty).
    Pong = 0x07,
    /// End of session (encrypted, empty).
    Bye = 0x08,
    /// A non-final 452-byte fragment (encrypted).
    DataFrag = 0x09,
    /// S→C cookie for the UDP return-routability check.
    HelloRetry = 0x0A,
    /// In-band key rotation (encrypted 32-byte salt).
    Rekey = 0x0B,
    /// Reserved; never sent by any implementation.
    Error = 0xFF,
}

impl PacketType {
    /// Map a type byte; `None` for bytes no implementation defines.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => PacketType::Hello,
            0x02 => PacketType::Challenge,
            0x03 => PacketType::HelloAck,
            0x04 => PacketType::SessionOk,
            0x05 => PacketType::Data,
            0x06 => PacketType::Ping,
            0x07 => PacketType::Pong,
            0x08 => PacketType::Bye,
            0x09 => PacketType::DataFrag,
            0x0A => PacketType::HelloRetry,
            0x0B => PacketType::Rekey,
            0xFF => PacketType::Error,
            _ => return None,
        })
    }

    /// Types whose payload is an AEAD record (PROTOCOL.md §4).
    pub fn is_encrypted(self) -> bool {
        matches!(
            self,
            PacketType::Data
                | PacketType::Ping
                | PacketType::Pong
                | PacketType::Bye
                | PacketType::DataFrag
                | PacketType::Rekey
        )
    }
}

/// A validated frame viewed in place: header fields are read from the bytes on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    bytes: &'a [u8],
    ptype: PacketType,
}

#[inline]
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline]
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Check magic, version and length of a complete 12-byte header; returns the payload length.
/// This is what the TCP deframer runs as soon as a header is in (fail fast).
pub fn check_header(header: &[u8]) -> Result<usize> {
    if header.len() < HEADER_LEN {
        return Err(Error::garbage(ErrorKind::Frame, "frame shorter than its header"));
    }
    if le16(header, 0) != MAGIC {
        return Err(Error::garbage(ErrorKind::Magic, "bad magic"));
    }
    if header[2] != VERSION {
        return Err(Error::garbage(ErrorKind::Version, "unsupported version"));
    }
    let len = le16(header, 8) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(Error::garbage(ErrorKind::Payload, "payload length over 480"));
    }
    Ok(len)
}

impl<'a> Frame<'a> {
    /// Decode the frame at the start of `bytes` (trailing bytes are ignored; see
    /// [`Frame::decode_exact`] for datagrams). Checks in the reference's order:
    /// length, magic, version, payload length, truncation, CRC, type.
    pub fn decode(bytes: &'a [u8]) -> Result<Frame<'a>> {
        let len = check_header(bytes)?;
        let total = HEADER_LEN + len;
        if bytes.len() < total {
            return Err(Error::garbage(ErrorKind::Payload, "payload truncated"));
        }
        let bytes = &bytes[..total];
        let want = crc16_update(crc16(&bytes[..AAD_LEN]), &bytes[HEADER_LEN..]);
        if le16(bytes, 10) != want {
            return Err(Error::garbage(ErrorKind::Crc, "CRC mismatch"));
        }
        let ptype =
            PacketType::from_u8(bytes[3]).ok_or(Error::garbage(ErrorKind::Frame, "unknown packet type"))?;
        Ok(Frame { bytes, ptype })
    }

    /// Decode a datagram that must hold exactly one frame (`len == 12 + length`, §7).
    pub fn decode_exact(bytes: &'a [u8]) -> Result<Frame<'a>> {
        let len = check_header(bytes)?;
        if bytes.len() != HEADER_LEN + len {
            return Err(Error::garbage(ErrorKind::Frame, "datagram size differs from frame size"));
        }
        Frame::decode(bytes)
    }

    /// The packet type.
    pub fn packet_type(&self) -> PacketType {
        self.ptype
    }
    /// The sequence number.
    pub fn seq(&self) -> u32 {
        le32(self.bytes, 4)
    }
    /// The on-wire payload length.
    pub fn length(&self) -> usize {
        le16(self.bytes, 8) as usize
    }
    /// The transmitted CRC.
    pub fn crc(&self) -> u16 {
        le16(self.bytes, 10)
    }
    /// The payload bytes (for encrypted types: nonce ‖ ciphertext ‖ tag).
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..]
    }
    /// Header bytes 0..=9: the AEAD's additional data.
    pub fn aad(&self) -> &'a [u8] {
        &self.bytes[..AAD_LEN]
    }
    /// The whole frame.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Write a header with a zero CRC into `out[..12]`. Call [`finish_crc`] once the payload is in.
#[inline]
pub fn write_header(out: &mut [u8], ptype: PacketType, seq: u32, payload_len: usize) {
    debug_assert!(payload_len <= MAX_PAYLOAD_LEN);
    out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    out[2] = VERSION;
    out[3] = ptype as u8;
    out[4..8].copy_from_slice(&seq.to_le_bytes());
    out[8..10].copy_from_slice(&(payload_len as u16).to_le_bytes());
    out[10..12].copy_from_slice(&[0, 0]);
}

/// Compute and store the CRC of a frame whose header and payload are already in `frame`.
#[inline]
pub fn finish_crc(frame: &mut [u8]) {
    let crc = crc16_update(crc16(&frame[..AAD_LEN]), &frame[HEADER_LEN..]);
    frame[10..12].copy_from_slice(&crc.to_le_bytes());
}

/// Encode a frame into `out`; returns the frame length. Fails with `PayloadError` when the
/// payload exceeds 480 bytes and with `FrameError` when `out` is too small.
pub fn encode_frame(ptype: PacketType, seq: u32, payload: &[u8], out: &mut [u8]) -> Result<usize> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(Error::misuse(ErrorKind::Payload, "payload over 480 bytes"));
    }
    let total = HEADER_LEN + payload.len();
    if out.len() < total {
        return Err(Error::misuse(ErrorKind::Frame, "output buffer too small"));
    }
    let frame = &mut out[..total];
    write_header(frame, ptype, seq, payload.len());
    frame[HEADER_LEN..].copy_from_slice(payload);
    finish_crc(frame);
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(ptype: PacketType, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(ptype, seq, payload, &mut out).unwrap();
        out[..n].to_vec()
    }

    #[test]
    fn golden_hello_frame() {
        let f = enc(PacketType::Hello, 0, b"device_id_pub_c");
        assert_eq!(&f[..12], &[0xcd, 0xab, 0x02, 0x01, 0, 0, 0, 0, 0x0f, 0x00, 0xbd, 0x4b]);
        assert_eq!(&f[12..], b"device_id_pub_c");
        let d = Frame::decode(&f).unwrap();
        assert_eq!(d.packet_type(), PacketType::Hello);
        assert_eq!(d.payload(), b"device_id_pub_c");
        assert_eq!(d.crc(), 0x4bbd);
    }

    #[test]
    fn every_rejection_has_its_kind() {
        let good = enc(PacketType::Data, 7, &[1, 2, 3]);
        let kind = |b: &[u8]| Frame::decode(b).unwrap_err().kind();
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(kind(&bad), ErrorKind::Magic);
        let mut bad = good.clone();
        bad[2] = 1;
        assert_eq!(kind(&bad), ErrorKind::Version);
        let mut bad = good.clone();
        bad[8..10].copy_from_slice(&481u16.to_le_bytes());
        assert_eq!(kind(&bad), ErrorKind::Payload);
        assert_eq!(kind(&good[..good.len() - 1]), ErrorKind::Payload);
        assert_eq!(kind(&good[..5]), ErrorKind::Frame);
        let mut bad = good.clone();
        bad[13] ^= 1;
        assert_eq!(kind(&bad), ErrorKind::Crc);
        let unknown = {
            let mut f = good.clone();
            f[3] = 0x0C;
            finish_crc(&mut f);
            f
        };
        assert_eq!(kind(&unknown), ErrorKind::Frame);
        let mut long = good.clone();
        long.push(0);
        assert!(Frame::decode(&long).is_ok());
        assert_eq!(Frame::decode_exact(&long).unwrap_err().kind(), ErrorKind::Frame);
        assert!(Frame::decode_exact(&good).is_ok());
    }

    #[test]
    fn oversize_payload_is_refused() {
        let mut out = [0u8; 600];
        let e = encode_frame(PacketType::Data, 0, &[0; 481], &mut out).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Payload);
        assert!(encode_frame(PacketType::Data, 0, &[0; 480], &mut out).is_ok());
    }
}
