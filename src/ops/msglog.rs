//! `--mode log`: one JSON line per message on stdout, written by a thread of its own. Shard
//! threads hand lines over through a bounded queue and never take the process-wide stdout
//! lock; a full queue drops the line (counted), and a closed pipe stops the writing (logged
//! once) instead of panicking in a message handler.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Lines queued for the writer at most.
pub const QUEUE: usize = 64 * 1024;

/// The handle shard threads log through (Send + Sync, cheap to share).
pub struct MessageLog {
    tx: flume::Sender<String>,
    dropped: Arc<AtomicU64>,
}

impl MessageLog {
    /// Write to the process's stdout.
    pub fn to_stdout() -> std::io::Result<Self> {
        Self::start(std::io::stdout())
    }

    /// Write to `out` from a thread named `usmp-msglog`.
    pub fn start<W: Write + Send + 'static>(out: W) -> std::io::Result<Self> {
        let (tx, rx) = flume::bounded::<String>(QUEUE);
        std::thread::Builder::new().name("usmp-msglog".into()).spawn(move || {
            let mut out = std::io::BufWriter::new(out);
            for line in rx.iter() {
                let r = out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n"));
                // Flush once the queue is drained: lines go out in batches under load.
                let r = r.and_then(|()| if rx.is_empty() { out.flush() } else { Ok(()) });
                if let Err(e) = r {
                    tracing::error!(error = %e, "message log: cannot write to stdout; no more lines will be written");
                    // Keep draining so senders never block; the lines are gone with the pipe.
                    for _ in rx.iter() {}
                    return;
                }
            }
        })?;
        Ok(MessageLog { tx, dropped: Arc::new(AtomicU64::new(0)) })
    }

    /// Queue one line (without its newline); dropped and counted when the queue is full.
    pub fn log(&self, line: String) {
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails like a closed pipe after `ok` writes.
    struct Pipe {
        ok: usize,
        got: Arc<parking_lot::Mutex<Vec<u8>>>,
    }

    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.ok == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            self.ok -= 1;
            self.got.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_stops_the_writer_and_never_blocks_or_panics_a_logger() {
        let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = MessageLog::start(Pipe { ok: 1, got: got.clone() }).unwrap();
        for i in 0..(QUEUE * 2) {
            log.log(format!("line {i}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let before = log.dropped();
        for i in 0..1000 {
            log.log(format!("after {i}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(got.lock().starts_with(b"line 0"));
        assert_eq!(log.dropped(), before, "the writer keeps draining after the pipe closed");
    }
}
