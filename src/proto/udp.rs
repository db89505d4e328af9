//! The UDP binding's sans-IO pieces (PROTOCOL.md §7): UTACK transport acknowledgements with
//! their 8-byte MAC, the stateless return-routability cookie, a bounded per-source token bucket
//! for the cookie path, and the Jacobson/Karn retransmission timer of the stop-and-wait ARQ.

use core::net::{IpAddr, SocketAddr};
use core::time::Duration;
use std::collections::{HashMap, HashSet};

use ring::hmac;

use super::crypto::{ct_eq, DEVICE_ID_LEN, KEY_LEN, PUB_KEY_LEN};
use super::handshake::COOKIE_LEN;

/// First two bytes of every UTACK.
pub const UTACK_MAGIC: [u8; 2] = [0xAC, 0xAC];
/// `AC AC ‖ type ‖ seq(LE)`.
pub const UTACK_HEADER_LEN: usize = 7;
/// Truncated HMAC-SHA256 appended for session-phase types (≥ 5).
pub const UTACK_MAC_LEN: usize = 8;
/// Largest UTACK.
pub const UTACK_MAX_LEN: usize = UTACK_HEADER_LEN + UTACK_MAC_LEN;
/// Transmissions of one frame before the peer is declared gone.
pub const MAX_ATTEMPTS: u32 = 5;
/// Length of a cookie time bucket, seconds.
pub const COOKIE_BUCKET_SECS: u64 = 30;

/// Is this datagram a UTACK (rather than a USMP frame)?
pub fn is_utack(datagram: &[u8]) -> bool {
    datagram.len() >= UTACK_HEADER_LEN && datagram[..2] == UTACK_MAGIC
}

/// The 8-byte MAC of a UTACK header: `HMAC-SHA256(key, header)[0..8]`.
pub fn utack_mac(key: &[u8; KEY_LEN], header: &[u8; UTACK_HEADER_LEN]) -> [u8; UTACK_MAC_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), header);
    let mut m = [0u8; UTACK_MAC_LEN];
    m.copy_from_slice(&tag.as_ref()[..UTACK_MAC_LEN]);
    m
}

fn utack_header(ptype: u8, seq: u32) -> [u8; UTACK_HEADER_LEN] {
    let mut h = [0u8; UTACK_HEADER_LEN];
    h[..2].copy_from_slice(&UTACK_MAGIC);
    h[2] = ptype;
    h[3..].copy_from_slice(&seq.to_le_bytes());
    h
}

/// Encode the UTACK for a frame of `ptype`/`seq`. `key` is the key of the acknowledged frame's
/// direction; it is required (and used) for session-phase types (≥ 5) only.
/// Returns the buffer and its length (7 or 15).
pub fn encode_utack(ptype: u8, seq: u32, key: Option<&[u8; KEY_LEN]>) -> ([u8; UTACK_MAX_LEN], usize) {
    let h = utack_header(ptype, seq);
    let mut out = [0u8; UTACK_MAX_LEN];
    out[..UTACK_HEADER_LEN].copy_from_slice(&h);
    match (ptype >= 5, key) {
        (true, Some(k)) => {
            out[UTACK_HEADER_LEN..].copy_from_slice(&utack_mac(k, &h));
            (out, UTACK_MAX_LEN)
        }
        _ => (out, UTACK_HEADER_LEN),
    }
}

/// What a sender waits for: the UTACK of its one outstanding frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedAck {
    /// Type of the outstanding frame.
    pub ptype: u8,
    /// Its sequence number.
    pub seq: u32,
    /// The MAC a genuine UTACK carries (types ≥ 5), computed with the sealing key.
    pub mac: Option<[u8; UTACK_MAC_LEN]>,
}

impl ExpectedAck {
    /// Expect the UTACK of a frame sealed (for types ≥ 5) with `key`.
    pub fn new(ptype: u8, seq: u32, key: Option<&[u8; KEY_LEN]>) -> Self {
        let mac = match (ptype >= 5, key) {
            (true, Some(k)) => Some(utack_mac(k, &utack_header(ptype, seq))),
            _ => None,
        };
        ExpectedAck { ptype, seq, mac }
    }

    /// Does `datagram` acknowledge it? Wrong type or seq, a missing or wrong MAC: no.
    pub fn matches(&self, datagram: &[u8]) -> bool {
        if !is_utack(datagram) || datagram[2] != self.ptype {
            return false;
        }
        if u32::from_le_bytes([datagram[3], datagram[4], datagram[5], datagram[6]]) != self.seq {
            return false;
        }
        match &self.mac {
            None => true,
            Some(mac) => {
                datagram.len() >= UTACK_MAX_LEN && ct_eq(mac, &datagram[UTACK_HEADER_LEN..UTACK_MAX_LEN])
            }
        }
    }
}

/// Issues and checks the stateless cookies of the UDP handshake. A cookie binds the peer's
/// address, device id and public key to a 30-second time bucket; it is accepted in the
/// current and the previous bucket, and only once.
pub struct CookieJar {
    key: hmac::Key,
    used: HashSet<[u8; COOKIE_LEN]>,
    used_prev: HashSet<[u8; COOKIE_LEN]>,
    used_bucket: u64,
}

impl core::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CookieJar").field("used", &(self.used.len() + self.used_prev.len())).finish()
    }
}

/// Why a cookie HELLO was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CookieError {
    /// Not issued by us for this address, device and key in the last two buckets.
    Invalid,
    /// Valid, but already used once (a replayed HELLO).
    Replayed,
}

impl CookieJar {
    /// A jar with a 32-byte random secret.
    pub fn new(secret: &[u8; 32]) -> Self {
        CookieJar {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            used: HashSet::new(),
            used_prev: HashSet::new(),
            used_bucket: 0,
        }
    }

    /// The time bucket of a wall-clock time in seconds since the Unix epoch.
    pub fn bucket(unix_secs: u64) -> u64 {
        unix_secs / COOKIE_BUCKET_SECS
    }

    fn mac(
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

    /// The cookie for a HELLO without one.
    pub fn issue(
        &self,
        peer: SocketAddr,
        device_id: &[u8; DEVICE_ID_LEN],
        pub_c: &[u8; PUB_KEY_LEN],
        bucket: u64,
    ) -> [u8; COOKIE_LEN] {
        self.mac(peer, device_id, pub_c, bucket)
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
            .any(|b| ct_eq(&self.mac(peer, device_id, pub_c, *b), cookie));
        if !ok {
            return Err(CookieError::Invalid);
        }
        // Used cookies only need remembering while they could still verify: two buckets.
        if bucket != self.used_bucket {
            self.used_prev =
                if bucket == self.used_bucket + 1 { core::mem::take(&mut self.used) } else { HashSet::new() };
            self.used.clear();
            self.used_bucket = bucket;
        }
        if self.used.contains(cookie) || self.used_prev.contains(cookie) {
            return Err(CookieError::Replayed);
        }
        self.used.insert(*cookie);
        Ok(())
    }

    /// Cookies remembered as used (bounded by what two buckets of real clients redeem).
    pub fn used_len(&self) -> usize {
        self.used.len() + self.used_prev.len()
    }
}

/// Per-source token buckets with a hard bound on memory: when the table is full, entries
/// that have refilled are dropped; if it is still full, the table is reset (a spoofed-source
/// flood then meets the global bucket alone).
#[derive(Debug)]
pub struct SourceLimiter {
    per_source: HashMap<IpAddr, (f64, Duration)>,
    global: (f64, Duration),
    burst: f64,
    rate: f64,
    global_burst: f64,
    global_rate: f64,
    max_sources: usize,
}

impl SourceLimiter {
    /// `burst`/`rate` per source, `global_rate` over all sources, at most `max_sources` entries.
    pub fn new(burst: f64, rate: f64, global_rate: f64, max_sources: usize) -> Self {
        SourceLimiter {
            per_source: HashMap::new(),
            global: (global_rate, Duration::ZERO),
            burst,
            rate,
            global_burst: global_rate,
            global_rate,
            max_sources,
        }
    }

    fn refill(tokens: f64, last: Duration, now: Duration, rate: f64, burst: f64) -> f64 {
        (tokens + now.saturating_sub(last).as_secs_f64() * rate).min(burst)
    }

    /// Take one token for `ip` at `now`; false means drop the request.
    pub fn allow(&mut self, ip: IpAddr, now: Duration) -> bool {
        let g = Self::refill(self.global.0, self.global.1, now, self.global_rate, self.global_burst);
        if g < 1.0 {
            self.global = (g, now);
            return false;
        }
        if !self.per_source.contains_key(&ip) && self.per_source.len() >= self.max_sources {
            let (rate, burst) = (self.rate, self.burst);
            self.per_source.retain(|_, (t, last)| Self::refill(*t, *last, now, rate, burst) < burst);
            if self.per_source.len() >= self.max_sources {
                self.per_source.clear();
            }
        }
        let (t, last) = self.per_source.get(&ip).copied().unwrap_or((self.burst, now));
        let t = Self::refill(t, last, now, self.rate, self.burst);
        if t < 1.0 {
            self.per_source.insert(ip, (t, now));
            return false;
        }
        self.per_source.insert(ip, (t - 1.0, now));
        self.global = (g - 1.0, now);
        true
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.per_source.len()
    }

    /// No sources tracked.
    pub fn is_empty(&self) -> bool {
        self.per_source.is_empty()
    }
}

/// Jacobson/Karn retransmission timer (PROTOCOL.md §7): srtt 0.2 s, rttvar 0.1 s, RTO 0.5 s
/// at first; samples only from first-attempt ACKs; RTO clamped to [0.1 s, 5 s]. Kept in `f32`
/// seconds (microsecond precision is plenty): one lives in every UDP session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rto {
    srtt: f32,
    rttvar: f32,
    rto: f32,
}

impl Default for Rto {
    fn default() -> Self {
        Rto { srtt: 0.2, rttvar: 0.1, rto: 0.5 }
    }
}

impl Rto {
    /// Current RTO, to the microsecond.
    pub fn rto(&self) -> Duration {
        Duration::from_micros((f64::from(self.rto) * 1e6).round() as u64)
    }

    /// Deadline of attempt `k` (0-based): `min(5 s, max(50 ms, RTO·2^k))`.
    pub fn timeout(&self, attempt: u32) -> Duration {
        (self.rto() * (1u32 << attempt.min(20))).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// Feed the RTT of a frame ACKed on its first transmission (Karn: never a retransmitted one).
    pub fn on_sample(&mut self, rtt: Duration) {
        let r = rtt.as_secs_f32().min(60.0);
        let err = r - self.srtt;
        self.rttvar += 0.25 * (err.abs() - self.rttvar);
        self.srtt += 0.125 * err;
        self.rto = (self.srtt + 4.0 * self.rttvar).clamp(0.1, 5.0);
    }
}

#[cfg(test)]
#[path = "udp_tests.rs"]
mod tests;
