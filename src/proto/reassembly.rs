//! Message reassembly (PROTOCOL.md §5): DATA_FRAG frames on strictly consecutive seqs, then
//! one DATA; at most 4 frames (1808 bytes). The buffer is allocated on the first fragmented
//! message of a session and reused, so single-frame traffic never allocates.

use super::error::{Error, ErrorKind, Result};

/// Plaintext bytes one frame carries at most.
pub const MAX_PLAINTEXT_LEN: usize = 452;
/// Frames one message may span.
pub const MAX_MESSAGE_FRAMES: usize = 4;
/// Largest message: 4 × 452.
pub const MAX_MESSAGE_LEN: usize = MAX_PLAINTEXT_LEN * MAX_MESSAGE_FRAMES;

/// Partial-message state of one receiving direction.
#[derive(Debug, Default)]
pub struct Reassembly {
    buf: Vec<u8>,
    /// At most 4 (`u8`: one of these lives in every session).
    frames: u8,
    next_seq: u32,
    /// The buffer holds a delivered message the caller may still be reading.
    delivered: bool,
}

impl Reassembly {
    /// Call at the start of each received frame: forgets a message delivered last time.
    pub fn begin_frame(&mut self) {
        if self.delivered {
            self.clear();
        }
    }

    /// A message is partially received.
    pub fn in_progress(&self) -> bool {
        self.frames > 0 && !self.delivered
    }

    /// Drop the partial message (UDP violation, REKEY).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.frames = 0;
        self.delivered = false;
    }

    /// A control frame (PING, PONG, REKEY) arrived: a violation inside a message.
    pub fn check_control(&mut self) -> Result<()> {
        if self.in_progress() {
            self.clear();
            return Err(Error::misbehaved(ErrorKind::Sequence, "control frame inside a fragmented message"));
        }
        Ok(())
    }

    fn check_continuity(&mut self, seq: u32) -> Result<()> {
        if self.in_progress() && seq != self.next_seq {
            self.clear();
            return Err(Error::misbehaved(ErrorKind::Sequence, "out-of-order fragment"));
        }
        Ok(())
    }

    /// Add a DATA_FRAG's plaintext. A fourth DATA_FRAG (a fifth frame) is a `PayloadError`.
    pub fn push_fragment(&mut self, seq: u32, plaintext: &[u8]) -> Result<()> {
        self.check_continuity(seq)?;
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            self.clear();
            return Err(Error::misbehaved(ErrorKind::Payload, "fragment over 452 bytes"));
        }
        if usize::from(self.frames) + 1 >= MAX_MESSAGE_FRAMES {
            self.clear();
            return Err(Error::misbehaved(ErrorKind::Payload, "message exceeds 4 frames"));
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(MAX_MESSAGE_LEN);
        }
        self.buf.extend_from_slice(plaintext);
        self.frames += 1;
        self.next_seq = seq.wrapping_add(1);
        Ok(())
    }

    /// A DATA frame: `Ok(None)` if it is a whole message on its own (deliver its plaintext
    /// directly, zero-copy), `Ok(Some(msg))` if it completes a fragmented one.
    pub fn push_final(&mut self, seq: u32, plaintext: &[u8]) -> Result<Option<&[u8]>> {
        self.check_continuity(seq)?;
        if !self.in_progress() {
            return Ok(None);
        }
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            self.clear();
            return Err(Error::misbehaved(ErrorKind::Payload, "fragment over 452 bytes"));
        }
        self.buf.extend_from_slice(plaintext);
        self.delivered = true;
        Ok(Some(&self.buf))
    }

    /// The message completed by the last [`Reassembly::push_final`] (empty otherwise).
    pub fn delivered_message(&self) -> &[u8] {
        if self.delivered {
            &self.buf
        } else {
            &[]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_fragments_and_a_final_make_one_message() {
        let mut r = Reassembly::default();
        for s in 10..13 {
            r.begin_frame();
            r.push_fragment(s, &[s as u8; 452]).unwrap();
        }
        r.begin_frame();
        let m = r.push_final(13, &[1; 452]).unwrap().unwrap().to_vec();
        assert_eq!(m.len(), 1808);
        r.begin_frame();
        assert!(r.push_final(14, b"x").unwrap().is_none(), "next DATA stands alone");
    }

    #[test]
    fn violations() {
        let mut r = Reassembly::default();
        for s in 0..3 {
            r.push_fragment(s, &[0; 452]).unwrap();
        }
        assert_eq!(r.push_fragment(3, &[0; 452]).unwrap_err().kind(), ErrorKind::Payload);
        assert!(!r.in_progress(), "partial message dropped");
        r.push_fragment(5, &[0; 452]).unwrap();
        assert_eq!(r.push_final(7, &[0]).unwrap_err().kind(), ErrorKind::Sequence);
        r.push_fragment(8, &[0; 452]).unwrap();
        assert_eq!(r.check_control().unwrap_err().kind(), ErrorKind::Sequence);
        assert!(r.check_control().is_ok());
    }
}
