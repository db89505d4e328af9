//! `--mode log`: one JSON line per message on stdout, written by a thread of its own.
//!
//! Shard threads hand lines over through a queue and never take the process-wide stdout lock.
//! A message is acknowledged to its device once its line is queued, so a line is never dropped
//! for want of room: past [`HIGH_WATER`] queued lines the gateway stops taking messages (TCP
//! stops reading, UDP leaves them unacknowledged for the device to send again) until the
//! writer is back under [`LOW_WATER`]. A slow reader of stdout slows the devices down; it does
//! not lose their messages. A closed pipe stops the writing (logged once, the lines it takes
//! with it counted) instead of panicking in a message handler.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;

use crate::gateway::app::{Ack, App, ShardApp, ShardContext};
use crate::gateway::Session;
use crate::proto::SessionId;
use crate::rt::event::LocalEvent;

/// Queued lines at which the shards stop taking messages (a line is at most about 2.5 KiB, a
/// 1808-byte message in base64 with its JSON: about 10 MiB queued at most, plus one message per
/// session already being read when the mark was crossed).
pub const HIGH_WATER: usize = 4096;
/// Queued lines under which paused sessions take messages again.
pub const LOW_WATER: usize = HIGH_WATER / 2;
/// How often a shard with paused sessions looks at the queue again.
const RECHECK: Duration = Duration::from_millis(5);

/// The queue of lines for stdout (Send + Sync, cheap to share).
pub struct MessageLog {
    tx: flume::Sender<String>,
    /// Lines queued and not yet taken by the writer: read on every message decision, so an
    /// atomic rather than the channel's own count, which takes its lock.
    queued: Arc<AtomicUsize>,
    lost: Arc<AtomicU64>,
}

impl MessageLog {
    /// Write to the process's stdout.
    pub fn to_stdout() -> std::io::Result<Self> {
        Self::start(std::io::stdout())
    }

    /// Write to `out` from a thread named `usmp-msglog`.
    pub fn start<W: Write + Send + 'static>(out: W) -> std::io::Result<Self> {
        // Unbounded on purpose: its bound is the shards' backpressure at HIGH_WATER.
        let (tx, rx) = flume::unbounded::<String>();
        let lost = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let (lost_by_writer, taken) = (lost.clone(), queued.clone());
        std::thread::Builder::new().name("usmp-msglog".into()).spawn(move || {
            let mut out = std::io::BufWriter::new(out);
            for line in rx.iter() {
                taken.fetch_sub(1, Ordering::Relaxed);
                let r = out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n"));
                // Flush once the queue is drained: lines go out in batches under load.
                let r = r.and_then(|()| if rx.is_empty() { out.flush() } else { Ok(()) });
                if let Err(e) = r {
                    tracing::error!(error = %e, "message log: cannot write to stdout; no more lines will be written");
                    // The line in hand and any the buffer held are gone with the pipe; keep
                    // draining (and counting) so the shards are never held up by a dead pipe.
                    lost_by_writer.fetch_add(1, Ordering::Relaxed);
                    for _ in rx.iter() {
                        taken.fetch_sub(1, Ordering::Relaxed);
                        lost_by_writer.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        })?;
        Ok(MessageLog { tx, queued, lost })
    }

    /// Queue one line (without its newline).
    pub fn log(&self, line: String) {
        // Counted before it is sent, so the writer's decrement never comes first.
        self.queued.fetch_add(1, Ordering::Relaxed);
        // Fails only once the writer is gone, which it never is while `self` lives.
        if self.tx.send(line).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines queued and not yet taken by the writer.
    pub fn pending(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Lines that could not be written because stdout was closed.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// The line for one message: device, session, RFC 3339 time and the payload in base64.
pub fn line(session: &Session, msg: &[u8], at: SystemTime) -> String {
    serde_json::json!({
        "device_id": session.device_id().to_string(),
        "session_id": session.session_id().to_string(),
        "timestamp": rfc3339(at),
        "payload": base64::engine::general_purpose::STANDARD.encode(msg),
    })
    .to_string()
}

/// RFC 3339 UTC timestamp with exactly six fractional digits: fixed-width lines sort and align
/// in a log, which the well-known format (trailing zeros trimmed) would not give.
pub fn rfc3339(t: SystemTime) -> String {
    const MICROS_UTC: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    // Only a year beyond 9999 fails to format; no clock on a running gateway gets there.
    time::OffsetDateTime::from(t).format(MICROS_UTC).unwrap_or_default()
}

/// `--mode log` as a gateway application: every message becomes a line, and the shards stop
/// taking messages while the writer is behind.
pub struct LogApp {
    log: Arc<MessageLog>,
}

impl LogApp {
    /// Log to `log`.
    pub fn new(log: Arc<MessageLog>) -> Self {
        LogApp { log }
    }
}

impl App for LogApp {
    fn on_shard(&self, _shard: usize) -> Rc<dyn ShardApp> {
        Rc::new(LogShard {
            log: self.log.clone(),
            paused: RefCell::default(),
            paused_ev: LocalEvent::default(),
        })
    }
}

/// One shard's half: the sessions it paused, to resume once the writer catches up.
struct LogShard {
    log: Arc<MessageLog>,
    paused: RefCell<HashMap<SessionId, Session>>,
    paused_ev: LocalEvent,
}

impl ShardApp for LogShard {
    fn on_message(&self, session: &Session, msg: &[u8]) -> Ack {
        self.log.log(line(session, msg, SystemTime::now()));
        Ack::Now
    }

    fn input_blocked(&self, session: &Session) -> bool {
        if self.log.pending() < HIGH_WATER {
            return false;
        }
        let mut paused = self.paused.borrow_mut();
        if paused.is_empty() {
            self.paused_ev.notify();
        }
        paused.entry(session.session_id()).or_insert_with(|| session.clone());
        true
    }

    fn run(self: Rc<Self>, shard: ShardContext) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async move {
            let stopped = shard.stopped();
            futures_util::pin_mut!(stopped);
            loop {
                // Idle until a session is paused; then look again every RECHECK.
                let next = async {
                    if self.paused.borrow().is_empty() {
                        self.paused_ev.wait().await;
                    }
                    monoio::time::sleep(RECHECK).await;
                };
                monoio::select! {
                    _ = &mut stopped => return,
                    _ = next => {}
                }
                if self.log.pending() <= LOW_WATER {
                    let paused = std::mem::take(&mut *self.paused.borrow_mut());
                    for s in paused.into_values() {
                        s.resume_input();
                    }
                }
            }
        })
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
    fn a_closed_pipe_stops_the_writer_counts_what_it_lost_and_never_backs_up_the_queue() {
        let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = MessageLog::start(Pipe { ok: 1, got: got.clone() }).unwrap();
        for i in 0..(HIGH_WATER * 2) {
            log.log(format!("line {i}"));
        }
        let t0 = std::time::Instant::now();
        while log.pending() > 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(log.pending(), 0, "the writer keeps draining after the pipe closed");
        assert!(got.lock().starts_with(b"line 0"));
        assert!(
            log.lost() >= HIGH_WATER as u64,
            "the lines after the pipe closed are counted: {}",
            log.lost()
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        use std::time::UNIX_EPOCH;
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(5);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000005Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }
}
