//! `deframe`: the TCP deframer and the frame codec on arbitrary byte streams.
//!
//! Input: `mode(1) ‖ k(1) ‖ chunk sizes (k mod 16 bytes, each + 1) ‖ stream`. The stream is
//! pushed into a [`Deframer`] in chunks of those sizes (cycled; none = as much as fits), with
//! `push` or (mode bit 0) the owned-buffer path of io_uring runtimes (bit 1: the runtime
//! shortens the vector to the bytes it wrote), into the default or (bit 2) a larger buffer.
//!
//! Invariants: the deframer yields exactly the frames (byte for byte, in order) and then the
//! first error (same kind) of a bit-by-bit model reading the whole stream at once, whatever the
//! split; it never stalls while a frame is incomplete; every frame it yields re-encodes to the
//! same bytes; `decode(encode(x)) == x` for a frame made from the stream's bytes; and
//! `Frame::decode`/`decode_exact` on the raw stream agree with the model.

use core::ops::Range;

use super::{crc16_oracle, Input, Report};
use crate::proto::deframer::{Deframer, DEFAULT_DEFRAMER_CAPACITY};
use crate::proto::frame::{encode_frame, Frame, PacketType, MAX_FRAME_LEN};
use crate::proto::ErrorKind;

/// Header checks of the model: `Ok(Some(total))`, `Ok(None)` when shorter than a header.
fn model_header(s: &[u8]) -> Result<Option<usize>, ErrorKind> {
    if s.len() < 12 {
        return Ok(None);
    }
    if s[..2] != [0xCD, 0xAB] {
        return Err(ErrorKind::Magic);
    }
    if s[2] != 0x02 {
        return Err(ErrorKind::Version);
    }
    let len = usize::from(u16::from_le_bytes([s[8], s[9]]));
    if len > 480 {
        return Err(ErrorKind::Payload);
    }
    Ok(Some(12 + len))
}

/// CRC and type checks of a complete frame `f`.
fn model_body(f: &[u8]) -> Result<(), ErrorKind> {
    if crc16_oracle(&[&f[..10], &f[12..]]) != u16::from_le_bytes([f[10], f[11]]) {
        return Err(ErrorKind::Crc);
    }
    if !matches!(f[3], 0x01..=0x0B | 0xFF) {
        return Err(ErrorKind::Frame);
    }
    Ok(())
}

/// The model of a stream: its complete frames, then the first error (if any).
fn model_stream(s: &[u8]) -> (Vec<Range<usize>>, Option<ErrorKind>) {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let total = match model_header(&s[at..]) {
            Ok(Some(t)) if s.len() - at >= t => t,
            Ok(_) => return (frames, None),
            Err(k) => return (frames, Some(k)),
        };
        if let Err(k) = model_body(&s[at..at + total]) {
            return (frames, Some(k));
        }
        frames.push(at..at + total);
        at += total;
    }
}

/// The model of `Frame::decode` (exact: of `Frame::decode_exact`) on one buffer.
fn model_decode(s: &[u8], exact: bool) -> Result<usize, ErrorKind> {
    let total = model_header(s)?.ok_or(ErrorKind::Frame)?;
    if exact && s.len() != total {
        return Err(ErrorKind::Frame);
    }
    if s.len() < total {
        return Err(ErrorKind::Payload);
    }
    model_body(&s[..total]).map(|()| total)
}

fn check_reencodes(f: &[u8]) {
    let fr = Frame::decode_exact(f).expect("a deframed frame decodes exactly");
    assert_eq!(fr.as_bytes(), f);
    assert_eq!(fr.length() + 12, f.len());
    let mut out = [0u8; MAX_FRAME_LEN];
    let n =
        encode_frame(fr.packet_type(), fr.seq(), fr.payload(), &mut out).expect("a decoded frame re-encodes");
    assert_eq!(&out[..n], f, "encode(decode(frame)) differs from the frame");
}

fn check_roundtrip(stream: &[u8]) {
    let mut r = Input::new(stream);
    let Some(t) = PacketType::from_u8(r.u8()) else { return };
    let seq = r.u32();
    let payload = r.bytes(481);
    let mut out = [0u8; MAX_FRAME_LEN + 1];
    match encode_frame(t, seq, payload, &mut out) {
        Err(e) => assert!(payload.len() > 480 && e.kind() == ErrorKind::Payload, "encode refused {e}"),
        Ok(n) => {
            assert!(payload.len() <= 480, "encoded a payload over 480 bytes");
            let f = Frame::decode_exact(&out[..n]).expect("decode(encode(x))");
            assert_eq!((f.packet_type(), f.seq(), f.payload()), (t, seq, payload), "decode(encode(x)) != x");
            assert_eq!(f.crc(), crc16_oracle(&[&out[..10], payload]));
        }
    }
}

/// Fuzz entry point: see the module documentation for the input format and invariants.
pub fn deframe(data: &[u8]) -> Report {
    let mut r = Input::new(data);
    let mode = r.u8();
    let k = usize::from(r.u8() % 16);
    let chunks: Vec<usize> = (0..k).map(|_| usize::from(r.u8()) + 1).collect();
    let stream = r.rest();
    let (frames, model_err) = model_stream(stream);
    let cap = if mode & 4 != 0 { 1500 } else { DEFAULT_DEFRAMER_CAPACITY };
    let mut d = Deframer::with_capacity(cap);
    let (mut fed, mut next_chunk, mut got, mut err) = (0, 0, 0, None);
    'run: loop {
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    let want = frames.get(got).expect("the deframer yielded a frame the model does not see");
                    assert_eq!(&*f, &stream[want.clone()], "deframed bytes differ from the stream");
                    check_reencodes(f);
                    got += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    err = Some(e.kind());
                    break 'run;
                }
            }
        }
        assert!(d.buffered() < MAX_FRAME_LEN, "a complete frame was left in the buffer");
        if fed == stream.len() {
            break;
        }
        let want = if chunks.is_empty() { stream.len() } else { chunks[next_chunk % chunks.len()] };
        next_chunk += 1;
        let chunk = &stream[fed..(fed + want).min(stream.len())];
        let n = if mode & 1 == 0 {
            d.push(chunk)
        } else {
            let (mut buf, range) = d.take_buffer();
            assert!(range.end <= buf.len(), "take_buffer range outside the buffer");
            let n = range.len().min(chunk.len());
            buf[range.start..range.start + n].copy_from_slice(&chunk[..n]);
            if mode & 2 != 0 {
                buf.truncate(range.start + n);
            }
            d.restore_buffer(buf, n);
            n
        };
        assert!(n <= chunk.len());
        assert!(n > 0, "deframer stalled: no room while no frame is complete");
        fed += n;
    }
    assert_eq!(err, model_err, "deframer and model disagree on the stream's error");
    assert_eq!(got, frames.len(), "deframer and model disagree on the number of frames");
    if err.is_none() {
        let consumed = frames.last().map_or(0, |f| f.end);
        assert_eq!(d.buffered(), stream.len() - consumed, "bytes lost or invented");
    }
    for exact in [false, true] {
        let res = if exact { Frame::decode_exact(stream) } else { Frame::decode(stream) };
        let res = res.map(|f| f.as_bytes().len()).map_err(|e| e.kind());
        assert_eq!(res, model_decode(stream, exact), "decode (exact: {exact}) disagrees with the model");
    }
    check_roundtrip(stream);
    Report { frames: got, errors: usize::from(err.is_some()), ..Report::default() }
}
