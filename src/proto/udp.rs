//! The UDP binding's sans-IO pieces (PROTOCOL.md §7): UTACK transport acknowledgements with
//! their 8-byte MAC and the Jacobson/Karn retransmission timer of the stop-and-wait ARQ. The
//! cookie path's state (cookies, used-cookie memory, its rate limits) is in [`super::cookie`].

use core::time::Duration;

use ring::hmac;

pub use super::cookie::{CookieError, CookieJar, COOKIE_BUCKET_SECS};
use super::crypto::{ct_eq, KEY_LEN};

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
