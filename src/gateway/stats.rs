//! Counters each shard writes with relaxed atomics it alone updates (no contention on the
//! frame path); readers sum them across shards.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// One shard's counters.
        #[derive(Debug, Default)]
        pub struct ShardStats { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A point-in-time sum over shards.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot { $($(#[$doc])* pub $name: u64,)* }

        impl StatsSnapshot {
            /// Sum the counters of every shard.
            pub fn sum<'a>(shards: impl IntoIterator<Item = &'a ShardStats>) -> Self {
                let mut s = StatsSnapshot::default();
                for sh in shards {
                    $(s.$name += sh.$name.load(Ordering::Relaxed);)*
                }
                s
            }
        }
    };
}

counters! {
    /// Connections accepted.
    accepted,
    /// Handshakes completed.
    handshakes_ok,
    /// Handshakes failed on a wrong PSK (bad proof).
    handshakes_bad_key,
    /// Handshakes that did not finish in time.
    handshakes_timeout,
    /// Handshakes failed on malformed or unexpected frames.
    handshakes_malformed,
    /// Handshakes from unknown devices (no key).
    handshakes_unknown_device,
    /// Handshakes evicted because they stalled while the handshake table was under pressure.
    handshakes_evicted,
    /// Connections refused because the source was locked out.
    refused_locked_out,
    /// Connections refused by a session or handshake limit.
    refused_over_limit,
    /// Lockouts started on this shard.
    lockouts_started,
    /// Sessions closed by the peer's protocol violation.
    closed_protocol_error,
    /// Sessions ended by the watchdog.
    closed_watchdog,
    /// Sessions ended by any reason.
    sessions_closed,
    /// Authenticated frames received.
    frames_in,
    /// Frames sent.
    frames_out,
    /// Bytes received in authenticated frames.
    bytes_in,
    /// Bytes sent.
    bytes_out,
    /// UDP datagrams received.
    datagrams_in,
    /// UDP datagrams dropped (malformed, unauthenticated, replayed, stray UTACKs, overflow).
    datagrams_dropped,
    /// UDP cookies (HELLO_RETRY) sent.
    cookies_sent,
    /// Of those, cookies answered from the budget reserved for devices that authenticated from
    /// the same address before (the rest came from the source's own and the shared budget).
    cookies_sent_known,
    /// UDP cookie HELLOs refused (invalid, expired or replayed cookie).
    cookies_refused,
    /// UDP HELLOs dropped by the per-source rate limit of the cookie path.
    cookie_rate_limited,
    /// UDP frames retransmitted by the ARQ.
    udp_retransmits,
    /// Dropped datagrams that were not well-formed USMP (length, magic, CRC, type...).
    dropped_malformed,
    /// Dropped frames that failed authentication (AEAD, nonce prefix).
    dropped_unauthenticated,
    /// Dropped frames replayed or out of the window (authentic duplicates are re-ACKed instead).
    dropped_replayed,
    /// Dropped UTACKs that acknowledge nothing outstanding (late, duplicate or forged).
    dropped_stray_ack,
    /// UDP messages left unacknowledged because the application is not keeping up (the
    /// device retransmits them later).
    dropped_busy,
    /// Dropped frames that broke a session rule on UDP (fragment order, control mid-message).
    dropped_violation,
    /// Sessions abandoned and reset because their output stopped moving (the peer stopped
    /// reading) for longer than the watchdog, or their BYE for longer than the close grace.
    closed_stalled,
    /// Downlinks and broadcast copies refused because the session's send queue was full.
    downlinks_busy,
    /// Commands refused because this shard's inbox was full.
    inbox_full,
    /// Gauge: TCP sessions open.
    sessions_open_tcp,
    /// Gauge: UDP sessions open.
    sessions_open_udp,
    /// Gauge: open sessions whose expanded keys are parked (idle).
    sessions_parked,
    /// Gauge: lockout entries currently locking (this shard's view, shared rule).
    lockouts_active,
    /// Gauge: frames received by sessions still open (closed sessions are in `frames_in`).
    live_frames_in,
    /// Gauge: frames sent by sessions still open.
    live_frames_out,
    /// Gauge: bytes received by sessions still open.
    live_bytes_in,
    /// Gauge: bytes sent by sessions still open.
    live_bytes_out,
}

impl StatsSnapshot {
    /// Frames received, open and closed sessions together.
    pub fn frames_in_total(&self) -> u64 {
        self.frames_in + self.live_frames_in
    }
    /// Frames sent, open and closed sessions together.
    pub fn frames_out_total(&self) -> u64 {
        self.frames_out + self.live_frames_out
    }
    /// Bytes received, open and closed sessions together.
    pub fn bytes_in_total(&self) -> u64 {
        self.bytes_in + self.live_bytes_in
    }
    /// Bytes sent, open and closed sessions together.
    pub fn bytes_out_total(&self) -> u64 {
        self.bytes_out + self.live_bytes_out
    }
}

/// Upper bounds (µs) of the handshake-latency histogram buckets.
pub const HANDSHAKE_BUCKETS_US: [u64; 12] =
    [250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000];

/// A fixed-bucket latency histogram written by one shard (one relaxed add per handshake).
#[derive(Debug, Default)]
pub struct LatencyHist {
    buckets: [AtomicU64; HANDSHAKE_BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Cumulative bucket counts, total count and sum (µs) of one or more histograms.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Cumulative count per bucket of [`HANDSHAKE_BUCKETS_US`] (Prometheus `le` semantics).
    pub cumulative: [u64; HANDSHAKE_BUCKETS_US.len()],
    /// Observations.
    pub count: u64,
    /// Sum of observations, µs.
    pub sum_us: u64,
}

impl LatencyHist {
    /// Record one handshake.
    pub fn record(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        if let Some(i) = HANDSHAKE_BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Sum several shards' histograms.
    pub fn sum<'a>(hists: impl IntoIterator<Item = &'a LatencyHist>) -> LatencySnapshot {
        let mut s = LatencySnapshot::default();
        for h in hists {
            let mut acc = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                acc += b.load(Ordering::Relaxed);
                s.cumulative[i] += acc;
            }
            s.count += h.count.load(Ordering::Relaxed);
            s.sum_us += h.sum_us.load(Ordering::Relaxed);
        }
        s
    }
}

impl ShardStats {
    /// Add one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtract one from a gauge.
    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }
    /// Set a gauge.
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }
    /// Take `v` off a gauge only its shard writes, stopping at zero.
    pub fn take_off(c: &AtomicU64, v: u64) {
        c.store(c.load(Ordering::Relaxed).saturating_sub(v), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_is_cumulative() {
        let a = LatencyHist::default();
        let b = LatencyHist::default();
        a.record(Duration::from_micros(100));
        a.record(Duration::from_millis(3));
        b.record(Duration::from_secs(60));
        let s = LatencyHist::sum([&a, &b]);
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[4], 2, "3 ms <= 5 ms");
        assert_eq!(*s.cumulative.last().unwrap(), 2, "60 s is above every bucket (+Inf only)");
        assert_eq!(s.sum_us, 100 + 3000 + 60_000_000);
    }
}
