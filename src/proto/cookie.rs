//! The UDP cookie path's state (PROTOCOL.md §7), bounded by memory whatever the rate:
//!
//! - [`CookieJar`] issues and checks the stateless cookies, and remembers the used ones in two
//!   fixed bitmaps (one per 30 s bucket, Bloom-style: four bits per cookie), so that a cookie
//!   works once. A replay is always refused; a fresh cookie is refused by mistake only with a
//!   probability that grows with the redemptions of one bucket (see [`CookieJar::false_refusal`]).
//! - [`CookieGate`] decides which HELLOs without cookie get one: a fixed array of per-source
//!   token buckets (a source is an IPv4 address or an IPv6 /64, hashed with a secret key), and
//!   a shard-wide budget on top. Devices that authenticated from a source recently (a fixed,
//!   set-associative table of (source, device) pairs) draw from their own small bucket and a
//!   reserved shard-wide budget instead: a spoofed-source flood that empties the shared budget
//!   cannot keep them out, and an attacker who drains a pair's bucket must have guessed both
//!   the source and the device id.
//!
//! Token buckets are kept as GCRA "theoretical arrival times" (one `u64` of nanoseconds each).

use core::hash::Hasher;
use core::net::{IpAddr, SocketAddr};
use core::time::Duration;

use ring::hmac;

use super::crypto::{ct_eq, DEVICE_ID_LEN, PUB_KEY_LEN};
use super::handshake::COOKIE_LEN;
use super::lockout::source_of;

/// Bits per used-cookie bitmap unless configured otherwise (1 MiB each, two of them).
pub const DEFAULT_FILTER_BITS: usize = 1 << 23;
/// Bits set (and tested) per cookie: its four 32-bit words, each cut to the bitmap's size.
const FILTER_HASHES: usize = 4;

/// Length of a cookie time bucket, seconds.
pub const COOKIE_BUCKET_SECS: u64 = 30;

/// Why a cookie HELLO was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CookieError {
    /// Not issued by us for this address, device and key in the last two buckets.
    Invalid,
    /// Valid, but already used once (a replayed HELLO), or taken for one (see
    /// [`CookieJar::false_refusal`]).
    Replayed,
}

/// Issues and checks the stateless cookies of the UDP handshake. A cookie binds the peer's
/// address, device id and public key to a 30-second time bucket; it is accepted in the
/// current and the previous bucket, and only once.
pub struct CookieJar {
    key: hmac::Key,
    /// Used cookies: `[redeemed in the current bucket, redeemed in the previous one]`. A
    /// cookie is valid for two buckets at most, so older ones need no remembering.
    used: [Box<[u64]>; 2],
    /// Cookies recorded in each bitmap.
    counts: [usize; 2],
    mask: u32,
    used_bucket: u64,
}

impl core::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CookieJar").field("used", &self.used_len()).finish()
    }
}

impl CookieJar {
    /// A jar with a 32-byte random secret and [`DEFAULT_FILTER_BITS`].
    pub fn new(secret: &[u8; 32]) -> Self {
        Self::with_filter_bits(secret, DEFAULT_FILTER_BITS)
    }

    /// A jar whose used-cookie bitmaps have `bits` bits each (rounded up to a power of two,
    /// 64 to 2^32).
    pub fn with_filter_bits(secret: &[u8; 32], bits: usize) -> Self {
        let bits = bits.clamp(64, 1 << 32).next_power_of_two();
        // Zeroed allocations are mapped lazily: pages are touched only as cookies land there.
        let words = bits / 64;
        CookieJar {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            used: [vec![0u64; words].into_boxed_slice(), vec![0u64; words].into_boxed_slice()],
            counts: [0, 0],
            mask: (bits - 1) as u32,
            used_bucket: 0,
        }
    }

    /// The time bucket of a time in seconds.
    pub fn bucket(secs: u64) -> u64 {
        secs / COOKIE_BUCKET_SECS
    }

    /// The cookie for a HELLO without one (and what a returned one must equal).
    pub fn issue(
        &self,
        peer: SocketAddr,
        device_id: &[u8; DEVICE_ID_LEN],
        pub_c: &[u8; PUB_KEY_LEN],
        bucket: u64,
    ) -> [u8; COOKIE_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        match peer.ip() {
            IpAddr::V4(v4) => ctx.update(&v4.octets()),
            IpAddr::V6(v6) => ctx.update(&v6.octets()),
        }
        ctx.update(&peer.port().to_le_bytes());
        ctx.update(&bucket.to_le_bytes());
        ctx.update(device_id);
        ctx.update(pub_c);
        let mut c = [0u8; COOKIE_LEN];
        c.copy_from_slice(&ctx.sign().as_ref()[..COOKIE_LEN]);
        c
    }

    /// The bitmap positions of a valid cookie. A valid cookie is our HMAC's output, uniform
    /// and unknown to anyone it was not sent to, so its own words serve as the hashes.
    fn positions(&self, cookie: &[u8; COOKIE_LEN]) -> [u32; FILTER_HASHES] {
        let mut p = [0u32; FILTER_HASHES];
        for (i, w) in p.iter_mut().enumerate() {
            let b = [cookie[4 * i], cookie[4 * i + 1], cookie[4 * i + 2], cookie[4 * i + 3]];
            *w = u32::from_le_bytes(b) & self.mask;
        }
        p
    }

    fn seen(map: &[u64], pos: &[u32; FILTER_HASHES]) -> bool {
        pos.iter().all(|&b| map[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }

    fn rotate(&mut self, bucket: u64) {
        // Time never runs back here (the caller's clock is monotonic); if it did, forgetting
        // would let replays through, so nothing is forgotten.
        if bucket <= self.used_bucket {
            return;
        }
        if bucket == self.used_bucket + 1 {
            self.used.swap(0, 1);
            self.counts.swap(0, 1);
        } else if self.counts[1] > 0 {
            self.used[1].fill(0);
            self.counts[1] = 0;
        }
        // Only a bitmap that holds something is cleared: an idle jar's pages stay untouched.
        if self.counts[0] > 0 {
            self.used[0].fill(0);
            self.counts[0] = 0;
        }
        self.used_bucket = bucket;
    }

    /// Check a returned cookie (constant time) and consume it.
    pub fn redeem(
        &mut self,
        peer: SocketAddr,
        device_id: &[u8; DEVICE_ID_LEN],
        pub_c: &[u8; PUB_KEY_LEN],
        cookie: &[u8; COOKIE_LEN],
        bucket: u64,
    ) -> Result<(), CookieError> {
        let ok = [bucket, bucket.saturating_sub(1)]
            .iter()
            .any(|b| ct_eq(&self.issue(peer, device_id, pub_c, *b), cookie));
        if !ok {
            return Err(CookieError::Invalid);
        }
        self.rotate(bucket);
        let pos = self.positions(cookie);
        if Self::seen(&self.used[0], &pos) || Self::seen(&self.used[1], &pos) {
            return Err(CookieError::Replayed);
        }
        for b in pos {
            self.used[0][(b / 64) as usize] |= 1 << (b % 64);
        }
        self.counts[0] += 1;
        Ok(())
    }

    /// Cookies recorded as used in the two buckets kept (bounded by what was redeemed).
    pub fn used_len(&self) -> usize {
        self.counts[0] + self.counts[1]
    }

    /// Bytes the used-cookie bitmaps take: fixed at construction, whatever the traffic.
    pub fn memory_bytes(&self) -> usize {
        self.used.iter().map(|m| m.len() * 8).sum()
    }

    /// The probability that a fresh valid cookie is refused as used right now (bits of other
    /// cookies cover all four of its positions in either bitmap): the price of fixed memory.
    pub fn false_refusal(&self) -> f64 {
        let bits = f64::from(self.mask) + 1.0;
        let one =
            |n: usize| (1.0 - (-(FILTER_HASHES as f64) * n as f64 / bits).exp()).powi(FILTER_HASHES as i32);
        let (a, b) = (one(self.counts[0]), one(self.counts[1]));
        1.0 - (1.0 - a) * (1.0 - b)
    }
}

/// Sizes and rates of a [`CookieGate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateConfig {
    /// HELLOs answered per second per source (IPv4 address or IPv6 /64).
    pub rate: f64,
    /// Burst per source.
    pub burst: f64,
    /// HELLOs answered per second over all sources not recognised (burst: one second's worth).
    pub global_rate: f64,
    /// Per-source buckets (a fixed array, rounded up to a power of two; sources share a
    /// bucket only when their keyed hashes collide).
    pub sources: usize,
    /// (source, device) pairs remembered as authenticated (rounded up to a multiple of four
    /// and a power of two; the oldest of four candidates makes way).
    pub known: usize,
    /// HELLOs answered per second for one remembered (source, device) pair.
    pub known_rate: f64,
    /// Burst of one remembered pair.
    pub known_burst: f64,
    /// How long a pair is remembered after it last authenticated.
    pub known_window: Duration,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            rate: 5.0,
            burst: 10.0,
            global_rate: 50_000.0,
            sources: 65_536,
            known: 65_536,
            known_rate: 5.0,
            known_burst: 10.0,
            known_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// Which budget answered a HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A remembered (source, device) pair's own bucket and the reserved budget.
    Known,
    /// The source's bucket and the shared budget.
    Shared,
}

/// A token bucket as GCRA: `interval` per token, `tolerance` how far ahead of now the
/// theoretical arrival time may run (burst − 1 intervals).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rate {
    interval: u64,
    tolerance: u64,
}

impl Rate {
    fn new(rate: f64, burst: f64) -> Self {
        // Float-to-int casts saturate: a zero rate means an interval that never ends.
        let interval = (1e9 / rate) as u64;
        let tolerance = (interval as f64 * (burst.max(1.0) - 1.0)) as u64;
        Rate { interval, tolerance }
    }

    /// The bucket's next state if a token may be taken at `now` (ns).
    fn take(&self, tat: u64, now: u64) -> Option<u64> {
        let tat = tat.max(now);
        (tat - now <= self.tolerance).then(|| tat.saturating_add(self.interval))
    }
}

/// A remembered pair: tag 0 is an empty way.
#[derive(Debug, Clone, Copy, Default)]
struct Known {
    tag: u32,
    /// Second (of the caller's clock) it last authenticated.
    auth: u32,
    tat: u64,
}

const WAYS: usize = 4;

/// Which HELLOs without cookie are answered, in fixed memory (see the module documentation).
pub struct CookieGate {
    cfg: GateConfig,
    hash_keys: (u64, u64),
    slots: Box<[u64]>,
    shared: u64,
    known: Box<[Known]>,
    reserved: u64,
    per_source: Rate,
    global: Rate,
    per_known: Rate,
}

impl core::fmt::Debug for CookieGate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CookieGate").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl CookieGate {
    /// A gate whose hashes are keyed from `secret`.
    pub fn new(cfg: GateConfig, secret: &[u8; 32]) -> Self {
        let k = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), b"usmp cookie gate hash key");
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&k.as_ref()[8 * i..8 * i + 8]);
            u64::from_le_bytes(b)
        };
        let sources = cfg.sources.clamp(1, 1 << 30).next_power_of_two();
        let known = cfg.known.clamp(WAYS, 1 << 30).next_power_of_two();
        CookieGate {
            cfg,
            hash_keys: (word(0), word(1)),
            slots: vec![0u64; sources].into_boxed_slice(),
            shared: 0,
            known: vec![Known::default(); known].into_boxed_slice(),
            reserved: 0,
            per_source: Rate::new(cfg.rate, cfg.burst),
            global: Rate::new(cfg.global_rate, cfg.global_rate),
            per_known: Rate::new(cfg.known_rate, cfg.known_burst),
        }
    }

    fn hash(&self, src: IpAddr, device: Option<&[u8; DEVICE_ID_LEN]>) -> u64 {
        // SipHash-2-4 keyed with a secret: an attacker cannot aim its flood at a chosen
        // device's bucket or way. (Deprecated only for HashMap use; it is the same function.)
        #[allow(deprecated)]
        let mut h = core::hash::SipHasher::new_with_keys(self.hash_keys.0, self.hash_keys.1);
        match src {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => h.write(&v6.octets()),
        }
        if let Some(d) = device {
            h.write(d);
        }
        h.finish()
    }

    /// The four ways a pair may live in, and its tag.
    fn ways(&self, src: IpAddr, device: &[u8; DEVICE_ID_LEN]) -> (usize, u32) {
        let h = self.hash(src, Some(device));
        let sets = self.known.len() / WAYS;
        (((h as usize) & (sets - 1)) * WAYS, ((h >> 32) as u32) | 1)
    }

    fn secs(now: Duration) -> u32 {
        u32::try_from(now.as_secs()).unwrap_or(u32::MAX)
    }

    fn nanos(now: Duration) -> u64 {
        u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The way holding `device` from source `src`, if it authenticated within the window.
    fn known_way(&self, src: IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) -> Option<usize> {
        let (base, tag) = self.ways(src, device);
        let window = u32::try_from(self.cfg.known_window.as_secs()).unwrap_or(u32::MAX);
        let secs = Self::secs(now);
        (base..base + WAYS)
            .find(|&i| self.known[i].tag == tag && secs.saturating_sub(self.known[i].auth) <= window)
    }

    /// Whether a HELLO without cookie from `ip` naming `device` gets a cookie at `now`, and
    /// from which budget. Remembered pairs try their own budget first, then the shared one.
    pub fn allow(&mut self, ip: IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) -> Option<Admit> {
        let src = source_of(ip);
        let t = Self::nanos(now);
        if let Some(i) = self.known_way(src, device, now) {
            if let (Some(own), Some(all)) =
                (self.per_known.take(self.known[i].tat, t), self.global.take(self.reserved, t))
            {
                self.known[i].tat = own;
                self.reserved = all;
                return Some(Admit::Known);
            }
        }
        let slot = (self.hash(src, None) as usize) & (self.slots.len() - 1);
        // Both or neither: a source refused for the shared budget keeps its own tokens.
        let own = self.per_source.take(self.slots[slot], t)?;
        let all = self.global.take(self.shared, t)?;
        self.slots[slot] = own;
        self.shared = all;
        Some(Admit::Shared)
    }

    /// `device` authenticated from `ip` at `now` (a verified HELLO_ACK here, or a success the
    /// caller heard of elsewhere): remember the pair for the known window.
    pub fn remember(&mut self, ip: IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) {
        let (base, tag) = self.ways(source_of(ip), device);
        let secs = Self::secs(now);
        let set = &mut self.known[base..base + WAYS];
        if let Some(k) = set.iter_mut().find(|k| k.tag == tag) {
            k.auth = secs;
            return;
        }
        // An empty way, else the one that authenticated longest ago.
        let pick = set
            .iter()
            .position(|k| k.tag == 0)
            .or_else(|| (0..WAYS).min_by_key(|&i| set[i].auth))
            .unwrap_or(0);
        set[pick] = Known { tag, auth: secs, tat: 0 };
    }

    /// Whether the pair is remembered as authenticated at `now`.
    pub fn is_known(&self, ip: IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) -> bool {
        self.known_way(source_of(ip), device, now).is_some()
    }

    /// Bytes the gate's tables take: fixed at construction, whatever the traffic.
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * 8 + self.known.len() * core::mem::size_of::<Known>()
    }
}

#[cfg(test)]
#[path = "cookie_tests.rs"]
mod tests;
