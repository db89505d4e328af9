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
    /// UDP cookie HELLOs refused (invalid, expired or replayed cookie).
    cookies_refused,
    /// UDP HELLOs dropped by the per-source rate limit of the cookie path.
    cookie_rate_limited,
    /// UDP frames retransmitted by the ARQ.
    udp_retransmits,
}

impl ShardStats {
    /// Add one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
