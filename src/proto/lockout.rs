//! Handshake-failure lockout (PROTOCOL.md §8), as a bounded table with time passed in.
//!
//! Five consecutive failures for one key lock it for 1 s, then 2, 4, … capped at 60 s; a
//! success clears it; at most `max_entries` entries (oldest evicted first); entries idle for
//! 10 minutes are pruned. Keys are the source IP for failures before the HELLO named a
//! device, and (IP, device_id) after, so a healthy device behind the same NAT as an attacker
//! is not locked out by the attacker's bad proofs.

use core::net::IpAddr;
use core::time::Duration;
use std::collections::HashMap;

use super::crypto::DEVICE_ID_LEN;

/// What a lockout entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockoutKey {
    /// Failures before any device was named (garbage, silence, malformed HELLO).
    Ip(IpAddr),
    /// Failures of a named device from one address (bad proof, timeout after HELLO).
    Device(IpAddr, [u8; DEVICE_ID_LEN]),
}

impl LockoutKey {
    /// The source address the key belongs to.
    pub fn ip(&self) -> IpAddr {
        match *self {
            LockoutKey::Ip(ip) | LockoutKey::Device(ip, _) => ip,
        }
    }
}

/// Tunables; the defaults are the reference's promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Consecutive failures that start a lockout.
    pub threshold: u32,
    /// First lockout length; doubles with each further failure.
    pub base: Duration,
    /// Longest lockout.
    pub cap: Duration,
    /// Entries kept at most (oldest-first eviction).
    pub max_entries: usize,
    /// Entries untouched this long are dropped.
    pub idle: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            threshold: 5,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            max_entries: 1000,
            idle: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    locked_until: Duration,
    last: Duration,
    /// A lock started here is still to be reported as ended.
    report_end: bool,
}

/// One shard's lockout cache (shards exchange failures so the rule holds gateway-wide).
#[derive(Debug, Default)]
pub struct LockoutTable {
    policy: LockoutPolicy,
    entries: HashMap<LockoutKey, Entry>,
}

impl LockoutTable {
    /// An empty table with `policy`.
    pub fn new(policy: LockoutPolicy) -> Self {
        LockoutTable { policy, entries: HashMap::new() }
    }

    /// The policy in force.
    pub fn policy(&self) -> &LockoutPolicy {
        &self.policy
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keys locked at `now`.
    pub fn active(&self, now: Duration) -> usize {
        self.entries.values().filter(|e| e.locked_until > now).count()
    }

    /// Remaining lockout for `key` at `now`, if it is locked.
    pub fn check(&self, key: &LockoutKey, now: Duration) -> Option<Duration> {
        self.entries.get(key).filter(|e| e.locked_until > now).map(|e| e.locked_until - now)
    }

    /// Count a failed handshake; returns the lockout length when this failure starts one.
    pub fn record_failure(&mut self, key: LockoutKey, now: Duration) -> Option<Duration> {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.policy.max_entries {
            self.prune(now);
            if self.entries.len() >= self.policy.max_entries {
                if let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.last).map(|(k, _)| *k) {
                    self.entries.remove(&oldest);
                }
            }
        }
        let p = self.policy;
        let e = self.entries.entry(key).or_insert(Entry {
            failures: 0,
            locked_until: Duration::ZERO,
            last: now,
            report_end: false,
        });
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        if e.failures < p.threshold {
            return None;
        }
        let doublings = (e.failures - p.threshold).min(16);
        let len = p.base.saturating_mul(1 << doublings).min(p.cap);
        e.locked_until = now + len;
        e.report_end = true;
        Some(len)
    }

    /// Locks that have ended since the last call, each reported once (for "lockout ended" logs).
    pub fn take_ended(&mut self, now: Duration) -> Vec<LockoutKey> {
        let mut ended = Vec::new();
        for (k, e) in self.entries.iter_mut() {
            if e.report_end && e.locked_until <= now {
                e.report_end = false;
                ended.push(*k);
            }
        }
        ended
    }

    /// Stop reporting the end of `key`'s lock here (another shard started it and reports it).
    pub fn forget_report(&mut self, key: &LockoutKey) {
        if let Some(e) = self.entries.get_mut(key) {
            e.report_end = false;
        }
    }

    /// A handshake succeeded: forget the key's failures.
    pub fn record_success(&mut self, key: &LockoutKey) {
        self.entries.remove(key);
    }

    /// Drop entries idle for longer than the policy allows (and no longer locked).
    pub fn prune(&mut self, now: Duration) {
        let idle = self.policy.idle;
        self.entries.retain(|_, e| e.locked_until > now || now.saturating_sub(e.last) <= idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    const S: Duration = Duration::from_secs(1);

    fn ip(n: u8) -> LockoutKey {
        LockoutKey::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)))
    }

    #[test]
    fn fifth_failure_locks_and_backoff_doubles_to_the_cap() {
        let mut t = LockoutTable::default();
        let k = ip(1);
        let mut now = Duration::from_secs(1000);
        for _ in 0..4 {
            assert_eq!(t.record_failure(k, now), None);
            assert_eq!(t.check(&k, now), None);
        }
        assert_eq!(t.record_failure(k, now), Some(S));
        assert_eq!(t.check(&k, now), Some(S));
        assert_eq!(t.check(&k, now + S - Duration::from_nanos(1)), Some(Duration::from_nanos(1)));
        assert_eq!(t.check(&k, now + S), None, "lock ends exactly at t + 1 s");
        assert!(t.take_ended(now + S - Duration::from_nanos(1)).is_empty());
        assert_eq!(t.take_ended(now + S), vec![k]);
        assert!(t.take_ended(now + S).is_empty(), "reported once");
        let mut expect = 2;
        for _ in 0..8 {
            now += Duration::from_secs(61);
            let got = t.record_failure(k, now).unwrap();
            assert_eq!(got, Duration::from_secs(expect.min(60)));
            expect *= 2;
        }
        assert_eq!(t.record_failure(k, now).unwrap(), Duration::from_secs(60));
        t.record_success(&k);
        assert_eq!(t.check(&k, now), None);
        assert_eq!(t.record_failure(k, now), None, "success cleared the count");
    }

    #[test]
    fn device_keys_do_not_lock_neighbours() {
        let mut t = LockoutTable::default();
        let a = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let bad = LockoutKey::Device(a, [1; 6]);
        for _ in 0..5 {
            t.record_failure(bad, S);
        }
        assert!(t.check(&bad, S).is_some());
        assert!(t.check(&LockoutKey::Device(a, [2; 6]), S).is_none());
        assert!(t.check(&LockoutKey::Ip(a), S).is_none());
    }

    #[test]
    fn bounded_with_oldest_eviction_and_idle_pruning() {
        let mut t = LockoutTable::new(LockoutPolicy { max_entries: 3, ..Default::default() });
        for n in 1..=3 {
            t.record_failure(ip(n), Duration::from_secs(n as u64));
        }
        t.record_failure(ip(4), Duration::from_secs(10));
        assert_eq!(t.len(), 3);
        for _ in 0..4 {
            t.record_failure(ip(2), Duration::from_secs(11));
        }
        assert!(t.check(&ip(2), Duration::from_secs(11)).is_some(), "ip 1 was evicted, not ip 2");
        t.prune(Duration::from_secs(11 + 600));
        assert_eq!(t.len(), 1, "ip 3 and ip 4 idle over 600 s; ip 2 exactly 600 s stays");
        t.prune(Duration::from_secs(12 + 600));
        assert!(t.is_empty());
    }
}
