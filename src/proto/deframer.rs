//! Streaming TCP deframer: bytes in, complete frames out, in place over one buffer with a
//! cursor and `copy_within` (no per-frame allocation). A bad magic, version or oversize length
//! is reported as soon as the 12-byte header is in, before the payload arrives (fail fast).

use super::error::Result;
use super::frame::{check_header, Frame, HEADER_LEN, MAX_FRAME_LEN};

/// Default buffer: one maximal frame always fits after compaction; small so that tens of
/// thousands of idle connections stay cheap.
pub const DEFAULT_DEFRAMER_CAPACITY: usize = 512;

/// In-place frame splitter for one TCP connection.
#[derive(Debug)]
pub struct Deframer {
    /// Fully initialised storage; `start..end` holds unconsumed bytes.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deframer {
    /// A deframer with [`DEFAULT_DEFRAMER_CAPACITY`].
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_DEFRAMER_CAPACITY)
    }

    /// A deframer with a larger buffer (fewer reads under bulk traffic). At least 492 bytes.
    pub fn with_capacity(cap: usize) -> Self {
        Deframer { buf: vec![0; cap.max(MAX_FRAME_LEN)], start: 0, end: 0 }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// The free tail to read into (compacts first). Call [`Deframer::commit`] with the count
    /// read. Never empty while a frame is incomplete.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        self.compact();
        &mut self.buf[self.end..]
    }

    /// Record `n` bytes written into [`Deframer::spare_mut`].
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Hand the buffer to an owned-buffer runtime (io_uring): returns it with the range to fill.
    /// Give it back with [`Deframer::restore_buffer`].
    pub fn take_buffer(&mut self) -> (Vec<u8>, core::ops::Range<usize>) {
        self.compact();
        let buf = core::mem::take(&mut self.buf);
        let range = self.end..buf.len();
        (buf, range)
    }

    /// Return the buffer taken by [`Deframer::take_buffer`] after `n` bytes were read into its range.
    /// Owned-buffer runtimes may set the vector's length to the end of the data they wrote
    /// (io_uring runtimes do); the full storage is restored here.
    pub fn restore_buffer(&mut self, mut buf: Vec<u8>, n: usize) {
        let cap = buf.capacity();
        if buf.len() < cap {
            buf.resize(cap, 0);
        }
        self.buf = buf;
        self.commit(n);
    }

    /// Whether the deframer holds storage to read into (see [`Deframer::release_storage`]).
    pub fn has_storage(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Give the storage up while no byte is buffered, so an idle connection holds no buffer;
    /// `None` (and the storage kept) while a frame is incomplete.
    pub fn release_storage(&mut self) -> Option<Vec<u8>> {
        if self.start != self.end || self.buf.is_empty() {
            return None;
        }
        self.start = 0;
        self.end = 0;
        Some(core::mem::take(&mut self.buf))
    }

    /// Install storage (at least [`MAX_FRAME_LEN`] bytes, else it is grown) into a deframer
    /// that released its own; a deframer that still has storage keeps it and drops `buf`.
    pub fn install_storage(&mut self, mut buf: Vec<u8>) {
        if self.has_storage() {
            return;
        }
        let len = buf.capacity().max(MAX_FRAME_LEN);
        buf.resize(len, 0);
        self.buf = buf;
        self.start = 0;
        self.end = 0;
    }

    /// Copy bytes in (for tests, fuzzing and non-io_uring callers); returns how many fit.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let spare = self.spare_mut();
        let n = spare.len().min(data.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.commit(n);
        n
    }

    /// The next complete, CRC-checked frame, mutable so it can be opened in place.
    /// `Ok(None)` means more bytes are needed. After an error the connection must be closed.
    pub fn next_frame(&mut self) -> Result<Option<&mut [u8]>> {
        let avail = self.end - self.start;
        if avail < HEADER_LEN {
            return Ok(None);
        }
        let len = check_header(&self.buf[self.start..self.start + HEADER_LEN])?;
        let total = HEADER_LEN + len;
        if avail < total {
            return Ok(None);
        }
        let at = self.start;
        Frame::decode(&self.buf[at..at + total])?;
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // Positions reset but the bytes stay put: the slice below is still valid.
            return Ok(Some(&mut self.buf[at..at + total]));
        }
        Ok(Some(&mut self.buf[at..at + total]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::error::ErrorKind;
    use crate::proto::frame::{encode_frame, PacketType};

    fn frame(seq: u32, len: usize) -> Vec<u8> {
        let mut out = [0u8; MAX_FRAME_LEN];
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let n = encode_frame(PacketType::Data, seq, &payload, &mut out).unwrap();
        out[..n].to_vec()
    }

    #[test]
    fn splits_stream_fed_byte_by_byte_and_in_bulk() {
        let stream: Vec<u8> = (0..20).flat_map(|i| frame(i, (i as usize * 37) % 481)).collect();
        for chunk in [1usize, 7, 100, 492, 4096] {
            let mut d = Deframer::new();
            let mut seqs = vec![];
            let mut fed = 0;
            while fed < stream.len() || d.buffered() > 0 {
                if fed < stream.len() {
                    let end = (fed + chunk).min(stream.len());
                    fed += d.push(&stream[fed..end]);
                }
                while let Some(f) = d.next_frame().unwrap() {
                    seqs.push(Frame::decode(f).unwrap().seq());
                }
                if fed == stream.len() && d.buffered() == 0 {
                    break;
                }
            }
            assert_eq!(seqs, (0..20).collect::<Vec<_>>(), "chunk {chunk}");
        }
    }

    #[test]
    fn storage_is_released_only_between_frames() {
        let f = frame(7, 100);
        let mut d = Deframer::new();
        d.push(&f[..50]);
        assert!(d.release_storage().is_none(), "half a frame keeps its buffer");
        d.push(&f[50..]);
        assert_eq!(Frame::decode(d.next_frame().unwrap().unwrap()).unwrap().seq(), 7);
        let buf = d.release_storage().expect("nothing buffered");
        assert!(!d.has_storage() && d.release_storage().is_none());
        assert_eq!(d.next_frame().unwrap(), None);
        d.install_storage(Vec::with_capacity(10)); // grown to one maximal frame
        assert!(d.spare_mut().len() >= MAX_FRAME_LEN);
        d.install_storage(buf); // already has storage: ignored
        assert_eq!(d.push(&f), f.len());
        assert_eq!(Frame::decode(d.next_frame().unwrap().unwrap()).unwrap().seq(), 7);
    }

    #[test]
    fn bad_header_fails_before_payload_arrives() {
        let mut f = frame(1, 300);
        f[2] = 9;
        let mut d = Deframer::new();
        d.push(&f[..12]);
        assert_eq!(d.next_frame().unwrap_err().kind(), ErrorKind::Version);
        let mut f = frame(1, 10);
        f[8..10].copy_from_slice(&1000u16.to_le_bytes());
        let mut d = Deframer::new();
        d.push(&f[..12]);
        assert_eq!(d.next_frame().unwrap_err().kind(), ErrorKind::Payload);
        let mut d = Deframer::new();
        d.push(b"GET / HTTP/1.1\r\n");
        assert_eq!(d.next_frame().unwrap_err().kind(), ErrorKind::Magic);
    }

    #[test]
    fn corrupted_crc_is_reported() {
        let mut f = frame(1, 10);
        f[15] ^= 0x40;
        let mut d = Deframer::new();
        d.push(&f);
        assert_eq!(d.next_frame().unwrap_err().kind(), ErrorKind::Crc);
    }

    #[test]
    fn owned_buffer_round_trip() {
        let f = frame(3, 50);
        let mut d = Deframer::new();
        for _ in 0..3 {
            let (mut buf, range) = d.take_buffer();
            assert!(range.len() >= MAX_FRAME_LEN);
            buf[range.start..range.start + f.len()].copy_from_slice(&f);
            // Like an io_uring runtime: the length is set to the end of what it wrote.
            buf.truncate(range.start + f.len());
            d.restore_buffer(buf, f.len());
            let got = d.next_frame().unwrap().unwrap();
            assert_eq!(got, &f[..]);
        }
    }
}
