//! Event counters, mergeable across threads and worker processes, and the rates derived from them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Event counters. Mergeable with [`Counters::add`]; serialisable for worker -> parent shipping.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub devices_requested: u64,
    pub devices_connected: u64,
    pub devices_failed: u64,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub messages_lost: u64,
    /// How long the handshakes took place over, in ms: the ramp, plus the steady phase in
    /// handshake mode (threads run side by side: merged by maximum). 0: unknown, use the
    /// steady phase's duration.
    pub handshake_ms: u64,
    /// Messages received within the steady phase (each thread's own window).
    pub steady_messages: u64,
    /// Handshakes completed within the steady phase.
    pub steady_handshakes: u64,
    /// loadgen's own CPU time over the steady phase, summed over its threads (ns).
    pub steady_cpu_ns: u64,
    /// Threads whose steady phase was measured.
    pub steady_threads: u64,
    /// The steady phase in wall-clock time (ms since the Unix epoch): the earliest start and
    /// the latest end over the threads (0: not measured).
    pub steady_start_unix_ms: u64,
    pub steady_end_unix_ms: u64,
    /// error kind -> count
    pub errors: BTreeMap<String, u64>,
}

impl Counters {
    /// Field-wise saturating sum; error maps are merged by kind.
    pub fn add(&mut self, other: &Counters) {
        self.devices_requested = self.devices_requested.saturating_add(other.devices_requested);
        self.devices_connected = self.devices_connected.saturating_add(other.devices_connected);
        self.devices_failed = self.devices_failed.saturating_add(other.devices_failed);
        self.handshakes_ok = self.handshakes_ok.saturating_add(other.handshakes_ok);
        self.handshakes_failed = self.handshakes_failed.saturating_add(other.handshakes_failed);
        self.messages_sent = self.messages_sent.saturating_add(other.messages_sent);
        self.messages_received = self.messages_received.saturating_add(other.messages_received);
        self.messages_lost = self.messages_lost.saturating_add(other.messages_lost);
        self.handshake_ms = self.handshake_ms.max(other.handshake_ms);
        self.steady_messages = self.steady_messages.saturating_add(other.steady_messages);
        self.steady_handshakes = self.steady_handshakes.saturating_add(other.steady_handshakes);
        self.steady_cpu_ns = self.steady_cpu_ns.saturating_add(other.steady_cpu_ns);
        self.steady_threads = self.steady_threads.saturating_add(other.steady_threads);
        self.steady_start_unix_ms = match (self.steady_start_unix_ms, other.steady_start_unix_ms) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.steady_end_unix_ms = self.steady_end_unix_ms.max(other.steady_end_unix_ms);
        for (k, v) in &other.errors {
            let e = self.errors.entry(k.clone()).or_insert(0);
            *e = e.saturating_add(*v);
        }
    }

    /// Count one error of `kind`.
    pub fn error(&mut self, kind: &str) {
        self.error_n(kind, 1);
    }

    /// Count `n` errors of `kind`.
    pub fn error_n(&mut self, kind: &str, n: u64) {
        if let Some(e) = self.errors.get_mut(kind) {
            *e = e.saturating_add(n);
        } else {
            self.errors.insert(kind.to_owned(), n);
        }
    }

    /// Sum over all error kinds.
    pub fn total_errors(&self) -> u64 {
        self.errors.values().fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// Handshakes per second over the time they took place in (see [`Counters::handshake_ms`]).
pub fn handshakes_per_sec(c: &Counters, duration_s: f64) -> f64 {
    match c.handshake_ms {
        0 => per_sec(c.handshakes_ok, duration_s),
        ms => per_sec(c.handshakes_ok, ms as f64 / 1000.0),
    }
}

/// `count / duration_s`, or 0 when the duration is not a positive finite number.
pub fn per_sec(count: u64, duration_s: f64) -> f64 {
    if duration_s.is_finite() && duration_s > 0.0 {
        count as f64 / duration_s
    } else {
        0.0
    }
}

/// loadgen's own CPU over the steady phase: µs per message and per handshake completed in it
/// (0 when none were), and the share of its threads' time it kept them busy.
pub fn loadgen_cpu(c: &Counters, duration_s: f64) -> (f64, f64, f64) {
    let us = c.steady_cpu_ns as f64 / 1e3;
    let per = |n: u64| if n > 0 { us / n as f64 } else { 0.0 };
    let busy = per_sec(c.steady_cpu_ns, duration_s * 1e9 * c.steady_threads.max(1) as f64);
    (per(c.steady_messages), per(c.steady_handshakes), busy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add() {
        let mut a = Counters { devices_requested: 1, messages_sent: 5, ..Default::default() };
        a.error("timeout");
        let mut b = Counters {
            devices_requested: 2,
            devices_connected: 2,
            devices_failed: 3,
            handshakes_ok: 4,
            handshakes_failed: 5,
            messages_sent: u64::MAX,
            messages_received: 7,
            messages_lost: 8,
            handshake_ms: 4000,
            steady_messages: 6,
            steady_handshakes: 1,
            steady_cpu_ns: 3_000,
            steady_threads: 2,
            steady_start_unix_ms: 1_000,
            steady_end_unix_ms: 9_000,
            errors: BTreeMap::new(),
        };
        b.error_n("timeout", 2);
        b.error("reset");
        a.add(&b);
        assert_eq!(a.devices_requested, 3);
        assert_eq!(a.devices_connected, 2);
        assert_eq!(a.devices_failed, 3);
        assert_eq!(a.handshakes_ok, 4);
        assert_eq!(a.handshakes_failed, 5);
        assert_eq!(a.messages_sent, u64::MAX, "saturating");
        assert_eq!(a.messages_received, 7);
        assert_eq!(a.messages_lost, 8);
        assert_eq!(a.handshake_ms, 4000, "threads ramp side by side: the longest counts");
        assert_eq!((a.steady_messages, a.steady_cpu_ns, a.steady_threads), (6, 3_000, 2));
        assert_eq!(
            (a.steady_start_unix_ms, a.steady_end_unix_ms),
            (1_000, 9_000),
            "unset start is not a minimum"
        );
        let mut c = Counters { steady_start_unix_ms: 500, steady_end_unix_ms: 8_000, ..Default::default() };
        c.add(&b);
        assert_eq!(
            (c.steady_start_unix_ms, c.steady_end_unix_ms),
            (500, 9_000),
            "earliest start, latest end"
        );
        assert_eq!(handshakes_per_sec(&a, 60.0), 1.0, "over the time they took, not the steady phase");
        a.handshake_ms = 0;
        assert!((handshakes_per_sec(&a, 60.0) - 4.0 / 60.0).abs() < 1e-12, "unknown: the steady phase");
        assert_eq!(a.errors["timeout"], 3);
        assert_eq!(a.errors["reset"], 1);
        assert_eq!(a.total_errors(), 4);
        // serde round trip; missing fields default
        let back: Counters = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
        let partial: Counters = serde_json::from_str(r#"{"messages_sent":3}"#).unwrap();
        assert_eq!(partial.messages_sent, 3);
    }
}
