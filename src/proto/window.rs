//! The 64-entry sliding replay window for UDP sessions (PROTOCOL.md §4): checked before the
//! AEAD runs, updated only after the frame authenticated (boringtun's order).

use super::error::{Error, ErrorKind, Result};

/// Window width in sequence numbers.
pub const WINDOW_LEN: u64 = 64;

/// Replay window: `highest` seen seq and a bitmap where bit `i` means `highest - i` was seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: u32,
    bitmap: u64,
}

impl ReplayWindow {
    /// A fresh window: accepts seq 0 once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest authenticated seq so far (0 when none).
    pub fn highest(&self) -> u32 {
        self.highest
    }

    /// Would `seq` be accepted? Drops `seq + 64 ≤ highest` and anything already seen.
    pub fn check(&self, seq: u32) -> Result<()> {
        let (seq, hi) = (seq as u64, self.highest as u64);
        if seq + WINDOW_LEN <= hi {
            return Err(Error::misbehaved(ErrorKind::Sequence, "sequence below the replay window"));
        }
        if seq <= hi && self.bitmap & (1u64 << (hi - seq)) != 0 {
            return Err(Error::misbehaved(ErrorKind::Sequence, "replayed sequence number"));
        }
        Ok(())
    }

    /// Record an authenticated `seq` (call only after [`ReplayWindow::check`] and the AEAD).
    pub fn mark(&mut self, seq: u32) {
        if seq > self.highest {
            let shift = (seq - self.highest) as u64;
            self.bitmap = if shift < WINDOW_LEN { (self.bitmap << shift) | 1 } else { 1 };
            self.highest = seq;
        } else {
            let off = (self.highest - seq) as u64;
            if off < WINDOW_LEN {
                self.bitmap |= 1u64 << off;
            }
        }
    }

    /// Forget everything (after REKEY every baseline restarts at 0).
    pub fn reset(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(w: &mut ReplayWindow, seq: u32) -> bool {
        let ok = w.check(seq).is_ok();
        if ok {
            w.mark(seq);
        }
        ok
    }

    #[test]
    fn edge_cases() {
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, 0));
        assert!(!accept(&mut w, 0), "seq 0 only once");
        assert!(accept(&mut w, 1));
        assert!(accept(&mut w, 3));
        assert!(accept(&mut w, 2), "late but inside the window");
        assert!(!accept(&mut w, 2));
        assert!(accept(&mut w, 66));
        assert!(!accept(&mut w, 2), "2 + 64 <= 66: too old");
        assert!(accept(&mut w, 4), "4 + 64 > 66: still inside");
        assert!(!accept(&mut w, 3), "3 + 64 > 66 but already seen");
        assert!(accept(&mut w, 5));
        assert!(accept(&mut w, 1000), "a jump beyond the window resets the bitmap");
        assert!(!accept(&mut w, 936), "936 + 64 == 1000: dropped");
        assert!(accept(&mut w, 937));
        assert!(!accept(&mut w, 1000));
        assert!(accept(&mut w, u32::MAX));
        assert!(!accept(&mut w, u32::MAX));
        w.reset();
        assert!(accept(&mut w, 0));
    }

    #[test]
    fn unmarked_check_does_not_consume() {
        let w = ReplayWindow::new();
        assert!(w.check(5).is_ok());
        assert!(w.check(5).is_ok(), "check alone never updates (a forged frame must not burn a seq)");
    }
}
