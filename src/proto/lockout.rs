//! Handshake-failure lockout (PROTOCOL.md §8), as a bounded table with time passed in.
//!
//! The rule the gateway applies ([`LockoutTable::admit`], [`LockoutTable::fail`],
//! [`LockoutTable::succeed`]):
//!
//! - **Per source.** Every failed handshake that named a device (bad proof, unknown device,
//!   timeout or malformed frame after the HELLO) counts against its source address (an IPv6
//!   source by its /64), whatever device id it carried. Five consecutive failures lock the
//!   source for 1 s, then 2, 4, … capped at 60 s. Fresh device ids buy no more guesses.
//! - **Device cookies.** A device that authenticated from a source within the trust window
//!   (24 h) stays admitted while its source is locked, so the healthy fleet behind an
//!   attacker's NAT keeps working. Its own failures then count against (source, device) under
//!   the same rule, and against the source: a trusted id is worth five guesses per lock, no
//!   more, and only ids that really authenticated from there are trusted.
//! - **A success** clears the device's failures; the source's count only when the device was
//!   not trusted there yet (one valid device cannot reset its source's count over and over to
//!   keep guessing other devices' keys).
//! - **Before a HELLO** nothing counts: garbage, silence and sockets closed early guess no
//!   key, and the handshake limits, the stalled-handshake evictor and the handshake timeout
//!   bound what they cost. They never lock a NAT address.
//! - **Bounded**: at most `max_entries` entries; when full, the oldest *unlocked* entry is
//!   evicted, never a locked one (a locked source cannot be freed by junk from elsewhere);
//!   if every entry is locked the table grows up to eight times that, then refuses new
//!   entries (counted). Entries idle 10 minutes are pruned. The trusted set keeps at most
//!   `max_trusted` (source, device) pairs per generation, two generations.

use core::hash::BuildHasher;
use core::net::IpAddr;
use core::time::Duration;
use std::collections::hash_map::RandomState;
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
    /// The key of a source address: an IPv4 address, or an IPv6 address's /64 (one host
    /// holds a whole /64, and must not get five guesses per address in it).
    pub fn source(ip: IpAddr) -> Self {
        LockoutKey::Ip(source_of(ip))
    }

    /// The key of `device` from a source address (IPv6 by its /64).
    pub fn device(ip: IpAddr, device: [u8; DEVICE_ID_LEN]) -> Self {
        LockoutKey::Device(source_of(ip), device)
    }

    /// The source address the key belongs to.
    pub fn ip(&self) -> IpAddr {
        match *self {
            LockoutKey::Ip(ip) | LockoutKey::Device(ip, _) => ip,
        }
    }
}

/// An IPv4 address, or an IPv6 address cut to its /64.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
        },
    }
}

/// What [`LockoutTable::admit`] decided for a HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Admission {
    /// Go on with the handshake.
    Admit,
    /// The source is locked and the device did not authenticate from it recently.
    SourceLocked(Duration),
    /// The device is locked from this source (its own failures).
    DeviceLocked(Duration),
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
    /// A device that authenticated from a source stays admitted while the source is locked
    /// for this long after its last success (or the end of its last session).
    pub trust_window: Duration,
    /// (source, device) pairs trusted per generation (two generations are kept).
    pub max_trusted: usize,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            threshold: 5,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            max_entries: 1000,
            idle: Duration::from_secs(600),
            trust_window: Duration::from_secs(24 * 3600),
            max_trusted: 1 << 16,
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

/// Devices that authenticated from a source recently ("device cookies"), as keyed 64-bit
/// hashes of (source, device) with the second of the last success: about 16 bytes a device.
/// Two generations: a pair is trusted while it is in either and younger than the window.
#[derive(Debug, Default)]
struct TrustSet {
    hasher: RandomState,
    current: HashMap<u64, u32>,
    previous: HashMap<u64, u32>,
    /// When `current` was started (seconds).
    started: u32,
}

fn secs(t: Duration) -> u32 {
    u32::try_from(t.as_secs()).unwrap_or(u32::MAX)
}

impl TrustSet {
    fn key(&self, source: IpAddr, device: &[u8; DEVICE_ID_LEN]) -> u64 {
        self.hasher.hash_one((source, device))
    }

    fn trusted(
        &self,
        p: &LockoutPolicy,
        source: IpAddr,
        device: &[u8; DEVICE_ID_LEN],
        now: Duration,
    ) -> bool {
        let k = self.key(source, device);
        let fresh = |at: &u32| secs(now).saturating_sub(*at) as u64 <= p.trust_window.as_secs();
        self.current.get(&k).is_some_and(fresh) || self.previous.get(&k).is_some_and(fresh)
    }

    fn insert(&mut self, p: &LockoutPolicy, source: IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) {
        let k = self.key(source, device);
        let t = secs(now);
        let half = p.trust_window.as_secs() / 2;
        if self.current.len() >= p.max_trusted.max(1) || t.saturating_sub(self.started) as u64 > half {
            self.previous = std::mem::take(&mut self.current);
            self.started = t;
        }
        self.current.insert(k, t);
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// One shard's lockout cache (shards exchange failures so the rule holds gateway-wide).
#[derive(Debug, Default)]
pub struct LockoutTable {
    policy: LockoutPolicy,
    entries: HashMap<LockoutKey, Entry>,
    trust: TrustSet,
    /// Failures not recorded because every entry was locked and the table at its hard cap.
    overflow: u64,
}

/// The table grows past `max_entries` only with locked entries, up to this many times it.
const HARD_CAP_FACTOR: usize = 8;

impl LockoutTable {
    /// An empty table with `policy`.
    pub fn new(policy: LockoutPolicy) -> Self {
        LockoutTable { policy, entries: HashMap::new(), trust: TrustSet::default(), overflow: 0 }
    }

    /// May a HELLO naming `device` from `ip` go on? Cheap: two lookups and a hash.
    pub fn admit(&self, ip: IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) -> Admission {
        if let Some(left) = self.check(&LockoutKey::device(ip, *device), now) {
            return Admission::DeviceLocked(left);
        }
        match self.check(&LockoutKey::source(ip), now) {
            Some(_) if self.trust.trusted(&self.policy, source_of(ip), device, now) => Admission::Admit,
            Some(left) => Admission::SourceLocked(left),
            None => Admission::Admit,
        }
    }

    /// A handshake that named `device` from `ip` failed. Counts against the source, and
    /// against (source, device) when the device is trusted there. Returns the lock this
    /// failure started, if any (the source's first).
    pub fn fail(
        &mut self,
        ip: IpAddr,
        device: &[u8; DEVICE_ID_LEN],
        now: Duration,
    ) -> Option<(LockoutKey, Duration)> {
        let src = LockoutKey::source(ip);
        let started = self.record_failure(src, now).map(|d| (src, d));
        if self.trust.trusted(&self.policy, source_of(ip), device, now) {
            let dev = LockoutKey::device(ip, *device);
            if let Some(d) = self.record_failure(dev, now) {
                return started.or(Some((dev, d)));
            }
        }
        started
    }

    /// A handshake of `device` from `ip` succeeded (or its session ended well): trust it
    /// there, clear its failures, and clear the source's count if it was not trusted yet.
    pub fn succeed(&mut self, ip: IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) {
        let source = source_of(ip);
        let was_trusted = self.trust.trusted(&self.policy, source, device, now);
        self.trust.insert(&self.policy, source, device, now);
        self.entries.remove(&LockoutKey::Device(source, *device));
        let src = LockoutKey::Ip(source);
        if !was_trusted && self.check(&src, now).is_none() {
            self.entries.remove(&src);
        }
    }

    /// (source, device) pairs trusted (both generations).
    pub fn trusted_len(&self) -> usize {
        self.trust.len()
    }

    /// Failures not recorded because the table was full of locked entries.
    pub fn overflowed(&self) -> u64 {
        self.overflow
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

    /// Count a failed handshake against one key; returns the lockout length when this
    /// failure starts one. (The gateway's rule is [`LockoutTable::fail`].)
    pub fn record_failure(&mut self, key: LockoutKey, now: Duration) -> Option<Duration> {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.policy.max_entries {
            self.prune(now);
            if self.entries.len() >= self.policy.max_entries {
                // Never evict a locked entry: junk failures from elsewhere must not free it.
                let oldest = self
                    .entries
                    .iter()
                    .filter(|(_, e)| e.locked_until <= now)
                    .min_by_key(|(_, e)| e.last)
                    .map(|(k, _)| *k);
                match oldest {
                    Some(k) => {
                        self.entries.remove(&k);
                    }
                    None if self.entries.len() >= self.policy.max_entries.saturating_mul(HARD_CAP_FACTOR) => {
                        self.overflow += 1;
                        return None;
                    }
                    None => {}
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

    fn v4(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn fresh_device_ids_buy_no_guesses_five_failures_lock_the_source() {
        let mut t = LockoutTable::default();
        let (a, now) = (v4(1), Duration::from_secs(100));
        for i in 0..4u8 {
            assert_eq!(t.fail(a, &[i; 6], now), None);
            assert_eq!(t.admit(a, &[9; 6], now), Admission::Admit);
        }
        assert_eq!(t.fail(a, &[4; 6], now), Some((LockoutKey::source(a), S)));
        for id in [[5; 6], [0; 6], [0xff; 6]] {
            assert_eq!(t.admit(a, &id, now), Admission::SourceLocked(S), "any device id");
        }
        assert_eq!(t.admit(v4(2), &[5; 6], now), Admission::Admit, "other sources are not touched");
        assert_eq!(t.len(), 1, "one entry for the source, not one per device id");
    }

    #[test]
    fn trusted_devices_stay_admitted_but_get_five_guesses_each() {
        let mut t = LockoutTable::default();
        let (a, now) = (v4(1), Duration::from_secs(100));
        let good = [7; 6];
        t.succeed(a, &good, now);
        for i in 0..5u8 {
            t.fail(a, &[i; 6], now);
        }
        assert!(matches!(t.admit(a, &[1; 6], now), Admission::SourceLocked(_)));
        assert_eq!(t.admit(a, &good, now), Admission::Admit, "the device cookie admits it");
        // Guessing with the trusted id: five failures lock that id too.
        for _ in 0..4 {
            t.fail(a, &good, now);
            assert_eq!(t.admit(a, &good, now), Admission::Admit);
        }
        t.fail(a, &good, now);
        assert!(matches!(t.admit(a, &good, now), Admission::DeviceLocked(_)));
        // Trust is per source: the same id elsewhere is an ordinary id.
        for i in 0..5u8 {
            t.fail(v4(2), &[i; 6], now);
        }
        assert!(matches!(t.admit(v4(2), &good, now), Admission::SourceLocked(_)));
        // And it expires.
        let later = now + t.policy().trust_window + S;
        let mut t2 = LockoutTable::default();
        t2.succeed(a, &good, now);
        for i in 0..5u8 {
            t2.fail(a, &[i; 6], later);
        }
        assert!(matches!(t2.admit(a, &good, later), Admission::SourceLocked(_)));
    }

    #[test]
    fn one_valid_device_cannot_keep_resetting_its_source() {
        let mut t = LockoutTable::default();
        let (a, now) = (v4(1), Duration::from_secs(100));
        let mine = [1; 6];
        // First success: the device was new here, so it clears the source's count.
        for i in 0..4u8 {
            t.fail(a, &[0x10 + i; 6], now);
        }
        t.succeed(a, &mine, now);
        for i in 0..4u8 {
            assert_eq!(t.fail(a, &[0x20 + i; 6], now), None, "count restarted");
        }
        // Interleaving its own successes no longer helps.
        t.succeed(a, &mine, now);
        assert_eq!(t.fail(a, &[0x30; 6], now), Some((LockoutKey::source(a), S)));
        // A device new at this source still clears it once the lock is over.
        t.succeed(a, &[0x40; 6], now + S);
        assert_eq!(t.admit(a, &[0x50; 6], now + S), Admission::Admit);
    }

    #[test]
    fn junk_from_many_sources_never_frees_a_locked_one() {
        let mut t = LockoutTable::default();
        let (a, now) = (v4(1), Duration::from_secs(100));
        for i in 0..5u8 {
            t.fail(a, &[i; 6], now);
        }
        for n in 0..1000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + n));
            t.fail(ip, &[1; 6], now);
        }
        assert!(t.len() <= t.policy().max_entries);
        assert!(matches!(t.admit(a, &[9; 6], now), Admission::SourceLocked(_)), "still locked");
        // Even when every entry is locked, none is evicted: the table grows to its hard cap,
        // then refuses new entries (counted).
        let mut t = LockoutTable::new(LockoutPolicy { max_entries: 4, ..Default::default() });
        for n in 0..40u32 {
            for _ in 0..5 {
                t.fail(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + n)), &[1; 6], now);
            }
        }
        assert_eq!(t.len(), 4 * HARD_CAP_FACTOR);
        assert!(t.overflowed() > 0);
        assert!(matches!(
            t.admit(IpAddr::V4(Ipv4Addr::from(0x0b00_0000)), &[2; 6], now),
            Admission::SourceLocked(_)
        ));
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let mut t = LockoutTable::default();
        let now = Duration::from_secs(100);
        for i in 0..5u16 {
            let ip: IpAddr = core::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, i, i, i).into();
            t.fail(ip, &[1; 6], now);
        }
        let same: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(matches!(t.admit(same, &[3; 6], now), Admission::SourceLocked(_)));
        assert_eq!(t.admit(other, &[3; 6], now), Admission::Admit);
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(LockoutKey::source(mapped), LockoutKey::source(v4(1)));
    }
}
