//! What travels between the shards and the bridge thread, and the bridge's counters. The
//! channels are unbounded types, bounded by accounting: a shard hands over at most
//! [`SHARD_IN_FLIGHT`] publishes before its sessions stop taking input, and the bridge sends a
//! shard at most one answer per publish plus its own bounded downlink work.
//!
//! Both directions travel in batches: whatever one side produced from its first message until
//! the linger (`--nats-linger`) ran out, or until [`LINGER_BATCH`], goes over as one message,
//! so the gateway pays a cross-thread wake-up per batch rather than one per device message
//! (at 20,000 messages/s the wake-ups, not the work, were most of the bridge's cost).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::gateway::LatencyHist;
use crate::proto::Transport;
use crate::rt::conn::CloseReason;

/// Publishes one shard may have handed to the bridge and not yet seen acknowledged. Past it,
/// every session of the shard waits (TCP stops reading, UDP holds UTACKs): memory stays
/// bounded however long NATS is away.
pub const SHARD_IN_FLIGHT: usize = 8192;

/// A batch this long crosses to the other thread at once, without waiting out the linger
/// (`--nats-linger`): under load the linger adds no latency, it only spares wake-ups when each
/// turn of a loop has little to hand over.
pub const LINGER_BATCH: usize = 256;

/// A session as events and presence describe it.
#[derive(Debug, Clone)]
pub struct SessionFacts {
    /// Device id.
    pub device: [u8; 6],
    /// Session id.
    pub session: [u8; 16],
    /// Transport.
    pub transport: Transport,
    /// The device's address.
    pub peer: SocketAddr,
    /// The shard holding it.
    pub shard: usize,
    /// When it was established (connected) or ended (disconnected).
    pub at: SystemTime,
}

/// What every uplink of one session carries, spelled once when the session opens (not per
/// message, on the bridge thread).
#[derive(Debug)]
pub struct PublishTag {
    /// The session id.
    pub session: [u8; 16],
    /// `P.up.<device>`.
    pub subject: async_nats::Subject,
    /// `Usmp-Device`: colon hex.
    pub device: String,
    /// `Usmp-Session`: 32 hex digits.
    pub session_hex: String,
    /// `Usmp-Transport`.
    pub transport: &'static str,
    /// `Usmp-Device`, `Usmp-Session` and `Usmp-Transport` as spelled above, and
    /// `Usmp-Gateway`: made by the bridge at the session's first publish, cloned for each.
    pub headers: std::sync::OnceLock<async_nats::HeaderMap>,
}

/// Shard → bridge.
pub enum Up {
    /// Store this message in `USMP_UP`, then answer [`Down::Stored`].
    Publish {
        /// Shard to answer.
        shard: usize,
        /// The session it came from, spelled for headers.
        tag: Arc<PublishTag>,
        /// Position of the message in its session (from 1): with the session id, the
        /// `Nats-Msg-Id` that lets JetStream drop a re-published duplicate.
        number: u64,
        /// The message, unchanged.
        payload: Bytes,
    },
    /// A session came up.
    Opened(SessionFacts),
    /// A session ended.
    Closed(SessionFacts, CloseReason),
    /// How a [`Down::Deliver`] ended.
    Delivery {
        /// The bridge's id of the delivery.
        id: u64,
        /// What happened.
        outcome: Delivery,
    },
}

/// How a downlink handed to a shard ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// TCP: written to the socket; UDP: acknowledged by the device.
    Delivered,
    /// The session's output queue is full.
    Busy,
    /// No session of the device here, or it ended before the message got out.
    Gone,
}

/// Bridge → shard.
pub enum Down {
    /// The publish of a message of this session is acknowledged.
    Stored {
        /// The session.
        session: [u8; 16],
    },
    /// Send this message to the device's session on this shard, report [`Up::Delivery`].
    Deliver {
        /// Delivery id.
        id: u64,
        /// Device id.
        device: [u8; 6],
        /// The message.
        payload: Bytes,
    },
    /// Close this session (with BYE).
    Close {
        /// The session.
        session: [u8; 16],
        /// Why.
        reason: CloseReason,
    },
}

/// The bridge's way to one shard: commands made by any bridge task within the linger are
/// gathered and sent as one batch by the shard's flusher task.
pub struct ToShard {
    pending: parking_lot::Mutex<Vec<Down>>,
    ready: tokio::sync::Notify,
    tx: flume::Sender<Vec<Down>>,
    linger: std::time::Duration,
}

impl ToShard {
    /// An outbox sending its batches on `tx`, each gathered for `linger` after its first
    /// command.
    pub fn new(tx: flume::Sender<Vec<Down>>, linger: std::time::Duration) -> Self {
        ToShard { pending: parking_lot::Mutex::default(), ready: tokio::sync::Notify::new(), tx, linger }
    }

    /// Queue `cmd` for the shard; `Err` if the shard is gone.
    pub fn send(&self, cmd: Down) -> Result<(), Down> {
        if self.tx.is_disconnected() {
            return Err(cmd);
        }
        let mut p = self.pending.lock();
        p.push(cmd);
        if p.len() == 1 {
            // The flusher runs after the tasks already woken in this turn, which add to it.
            self.ready.notify_one();
        } else if p.len() >= LINGER_BATCH {
            if let Err(e) = self.tx.send(std::mem::take(&mut *p)) {
                // The shard is gone (the gateway is stopping): hand back the caller's command,
                // the last one; the others' waiters time out as they would have.
                if let Some(cmd) = e.into_inner().pop() {
                    return Err(cmd);
                }
            }
        }
        Ok(())
    }

    /// The flusher (a bridge task per shard, for the bridge's lifetime).
    pub async fn flush_forever(&self) {
        loop {
            self.ready.notified().await;
            if !self.linger.is_zero() {
                tokio::time::sleep(self.linger).await;
            }
            // Sent under the lock, as `send` does a full batch: batches cannot overtake each
            // other on a multi-threaded bridge (a device's downlinks keep their order).
            let mut p = self.pending.lock();
            if !p.is_empty() && self.tx.send(std::mem::take(&mut *p)).is_err() {
                return;
            }
        }
    }
}

/// Downlink outcomes, as replies spell them.
pub const DOWNLINK_STATUSES: [&str; 6] =
    ["delivered", "queued", "offline", "too_large", "queue_full", "rejected"];

/// The bridge's counters (relaxed atomics; the metrics thread reads them).
#[derive(Default)]
pub struct NatsStats {
    /// Publishes acknowledged by JetStream.
    pub published: AtomicU64,
    /// Of those, acknowledged as duplicates (a retried publish that had been stored).
    pub duplicates: AtomicU64,
    /// Publish attempts that failed (each is retried).
    pub publish_errors: AtomicU64,
    /// Publishes handed over and not yet acknowledged.
    pub in_flight: AtomicU64,
    /// Publish → acknowledgement latency.
    pub ack_latency: LatencyHist,
    /// Times a session stopped taking input because its or its shard's publishes were not
    /// acknowledged yet (backpressure).
    pub backpressure: AtomicU64,
    /// Downlink replies by status ([`DOWNLINK_STATUSES`] order).
    pub downlinks: [AtomicU64; 6],
    /// Downlink requests with a malformed device id in their subject.
    pub bad_subjects: AtomicU64,
    /// Queued downlinks dropped on delivery because they had expired.
    pub expired: AtomicU64,
    /// Messages in `USMP_DOWN` (sampled).
    pub queue_depth: AtomicU64,
    /// 1 while connected to NATS.
    pub connected: AtomicU64,
    /// Reconnections to NATS.
    pub reconnects: AtomicU64,
    /// Event, presence or key-watch operations that failed (logged).
    pub side_errors: AtomicU64,
    /// KV entries that are not a valid key (ignored, logged).
    pub kv_invalid: AtomicU64,
    /// Key changes applied from the KV bucket.
    pub kv_applied: AtomicU64,
    /// Milliseconds between the last key change's KV timestamp and its application.
    pub kv_lag_ms: AtomicU64,
    /// Sessions closed because the device connected elsewhere.
    pub takeovers: AtomicU64,
}

impl NatsStats {
    /// Count a downlink reply.
    pub fn downlink(&self, status: &str) {
        if let Some(i) = DOWNLINK_STATUSES.iter().position(|s| *s == status) {
            self.downlinks[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prometheus text of every counter.
    pub fn render(&self, o: &mut String) {
        use std::fmt::Write;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut fam = |name: &str, kind: &str, help: &str, lines: &[(String, u64)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        fam(
            "usmp_nats_publishes_total",
            "counter",
            "Uplink publishes to JetStream by result (errors are retried).",
            &[
                ("{result=\"ok\"}".into(), g(&self.published) - g(&self.duplicates)),
                ("{result=\"duplicate\"}".into(), g(&self.duplicates)),
                ("{result=\"error\"}".into(), g(&self.publish_errors)),
            ],
        );
        fam(
            "usmp_nats_publishes_in_flight",
            "gauge",
            "Uplinks handed to the bridge, not yet stored.",
            &[(String::new(), g(&self.in_flight))],
        );
        fam(
            "usmp_nats_backpressure_total",
            "counter",
            "Times a session paused because its uplinks were not stored yet.",
            &[(String::new(), g(&self.backpressure))],
        );
        let downs: Vec<(String, u64)> = DOWNLINK_STATUSES
            .iter()
            .zip(&self.downlinks)
            .map(|(s, c)| (format!("{{status=\"{s}\"}}"), g(c)))
            .collect();
        fam("usmp_nats_downlinks_total", "counter", "Downlink requests by reply status.", &downs);
        fam(
            "usmp_nats_bad_subjects_total",
            "counter",
            "Downlink requests naming no valid device id.",
            &[(String::new(), g(&self.bad_subjects))],
        );
        fam(
            "usmp_nats_downlinks_expired_total",
            "counter",
            "Queued downlinks discarded as expired.",
            &[(String::new(), g(&self.expired))],
        );
        fam(
            "usmp_nats_downlink_queue_depth",
            "gauge",
            "Messages in the offline downlink stream.",
            &[(String::new(), g(&self.queue_depth))],
        );
        fam(
            "usmp_nats_connected",
            "gauge",
            "1 while the bridge is connected to NATS.",
            &[(String::new(), g(&self.connected))],
        );
        fam(
            "usmp_nats_reconnects_total",
            "counter",
            "Reconnections to NATS.",
            &[(String::new(), g(&self.reconnects))],
        );
        fam(
            "usmp_nats_side_errors_total",
            "counter",
            "Failed event, presence or queue operations.",
            &[(String::new(), g(&self.side_errors))],
        );
        fam(
            "usmp_nats_kv_invalid_total",
            "counter",
            "Key bucket entries that are not a valid key.",
            &[(String::new(), g(&self.kv_invalid))],
        );
        fam(
            "usmp_nats_kv_applied_total",
            "counter",
            "Key changes applied from the key bucket.",
            &[(String::new(), g(&self.kv_applied))],
        );
        fam(
            "usmp_nats_takeovers_total",
            "counter",
            "Sessions closed because the device connected elsewhere.",
            &[(String::new(), g(&self.takeovers))],
        );
        let _ = writeln!(
            o,
            "# HELP usmp_nats_kv_watch_lag_seconds Delay of the last key change applied.\n# TYPE usmp_nats_kv_watch_lag_seconds gauge\nusmp_nats_kv_watch_lag_seconds {}",
            g(&self.kv_lag_ms) as f64 / 1e3
        );
        let lat = LatencyHist::sum([&self.ack_latency]);
        let _ = writeln!(o, "# HELP usmp_nats_publish_ack_seconds Uplink publish to JetStream acknowledgement.\n# TYPE usmp_nats_publish_ack_seconds histogram");
        for (b, c) in crate::gateway::HANDSHAKE_BUCKETS_US.iter().zip(lat.cumulative.iter()) {
            let _ = writeln!(o, "usmp_nats_publish_ack_seconds_bucket{{le=\"{}\"}} {c}", *b as f64 / 1e6);
        }
        let _ = writeln!(o, "usmp_nats_publish_ack_seconds_bucket{{le=\"+Inf\"}} {}", lat.count);
        let _ = writeln!(o, "usmp_nats_publish_ack_seconds_sum {}", lat.sum_us as f64 / 1e6);
        let _ = writeln!(o, "usmp_nats_publish_ack_seconds_count {}", lat.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stored() -> Down {
        Down::Stored { session: [7; 16] }
    }

    /// A shard's outbox with its flusher running (inside a runtime).
    fn outbox(linger: Duration) -> (std::sync::Arc<ToShard>, flume::Receiver<Vec<Down>>) {
        let (tx, rx) = flume::unbounded();
        let out = std::sync::Arc::new(ToShard::new(tx, linger));
        let flusher = out.clone();
        tokio::spawn(async move { flusher.flush_forever().await });
        (out, rx)
    }

    fn run(f: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn commands_within_the_linger_cross_as_one_batch() {
        run(async {
            let (out, rx) = outbox(Duration::from_millis(500));
            out.send(stored()).map_err(|_| ()).unwrap();
            // Later turns of the bridge, well within the linger.
            tokio::time::sleep(Duration::from_millis(10)).await;
            out.send(stored()).map_err(|_| ()).unwrap();
            out.send(stored()).map_err(|_| ()).unwrap();
            let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv_async()).await.unwrap().unwrap();
            assert_eq!(batch.len(), 3, "one wake-up of the shard for the three");
        });
    }

    #[test]
    fn a_full_batch_does_not_wait_for_the_linger() {
        run(async {
            let (out, rx) = outbox(Duration::from_secs(60));
            for _ in 0..LINGER_BATCH {
                out.send(stored()).map_err(|_| ()).unwrap();
            }
            let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv_async()).await.unwrap().unwrap();
            assert_eq!(batch.len(), LINGER_BATCH);
        });
    }
}
