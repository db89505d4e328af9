//! Invariant-checking entry points for coverage-guided fuzzing (the cargo-fuzz targets in
//! `tests/fuzz/`) and for the corpus replay test (`tests/fuzz_replay.rs`).
//!
//! Each entry point takes arbitrary bytes, drives one part of the protocol core with them and
//! panics **only** when an invariant breaks — that is what the fuzzer looks for:
//!
//! - [`deframe`]: the TCP deframer and the frame codec;
//! - [`handshake`]: the gateway side of the handshake fed arbitrary frames in arbitrary order;
//! - [`session`]: an established session fed arbitrary and correctly sealed frames, checked
//!   against an independent model of PROTOCOL.md §4–§6;
//! - [`udp_path`]: the real UDP endpoint of a shard (`proto::endpoint`, with the sessions'
//!   links and the real device role) fed arbitrary datagrams from arbitrary addresses on a
//!   simulated clock.
//!
//! Nothing here uses sockets, threads, clocks or OS randomness: keys, nonces and time come from
//! the input or from fixed seeds, so every input replays identically. The oracles (CRC, HMAC,
//! AEAD, cookie) are written against `ring` directly rather than through the code under test.
//! Each module documents its input format; [`seeds`] builds seed inputs in those formats.

use ring::{aead, hmac};

use crate::proto::crypto::gcm_nonce;

mod deframe;
mod handshake;
mod seeds;
mod session;
mod udp;

pub use deframe::deframe;
pub use handshake::handshake;
pub use seeds::{seeds, Seed};
pub use session::session;
pub use udp::udp_path;

/// The fuzz targets, in the order of the corpus directories under `tests/fuzz/corpus/`.
pub const TARGETS: [&str; 4] = ["deframe", "handshake", "session", "udp_path"];

/// Run the entry point of target `name` (one of [`TARGETS`]) on `data`.
pub fn run(name: &str, data: &[u8]) -> Report {
    match name {
        "deframe" => deframe(data),
        "handshake" => handshake(data),
        "session" => session(data),
        "udp_path" => udp_path(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// What an input did (for the replay test's expectations; fuzz targets ignore it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Frames accepted (deframed, or opened by a session).
    pub frames: usize,
    /// Handshakes that reached SESSION_OK.
    pub established: usize,
    /// Messages delivered to an application.
    pub messages: usize,
    /// Inputs refused with an error (each a fail-fast close or a drop).
    pub errors: usize,
}

/// Devices the fuzzed gateways know: the device ids and PSKs of the reference vectors
/// (`tests/pyref/gen_vectors.py`, `gen_handshake`), so the reference's transcripts replay.
pub(crate) const DEVICES: [([u8; 6], &[u8]); 3] = [
    ([0x00, 0x11, 0x22, 0x33, 0x44, 0x55], b"0123456789abcdef"),
    ([0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6], &PSK40),
    ([0xde, 0xad, 0xbe, 0xef, 0x00, 0x01], b"this_is_a_very_secret_key_32_byt"),
];

/// `det("hs/psk40", 40)` of the reference vectors.
const PSK40: [u8; 40] = [
    0xd6, 0x99, 0x06, 0x33, 0x9a, 0x6a, 0x1f, 0xc3, 0x30, 0x8b, 0x52, 0x8c, 0xc7, 0x40, 0x06, 0xed, 0x02,
    0x3f, 0x34, 0x42, 0xa8, 0x0f, 0x6a, 0x95, 0xac, 0x36, 0x00, 0x45, 0xcb, 0x30, 0xaf, 0x03, 0x32, 0x19,
    0xaf, 0x2a, 0xf7, 0x61, 0x3d, 0x3d,
];

/// The PSK of a device, if the fuzzed gateway knows it.
pub(crate) fn psk_of(device: &[u8; 6]) -> Option<&'static [u8]> {
    DEVICES.iter().find(|(d, _)| d == device).map(|(_, k)| *k)
}

/// Private keys of the honest clients the harnesses play.
pub(crate) const CLIENT_SEEDS: [[u8; 32]; 3] = [[0x11; 32], [0x22; 32], [0x33; 32]];

/// Public keys of [`CLIENT_SEEDS`] (computed once: X25519 is the slowest thing here).
pub(crate) fn client_public(i: usize) -> [u8; 32] {
    static KEYS: std::sync::OnceLock<[[u8; 32]; 3]> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        CLIENT_SEEDS.map(|s| *crate::proto::crypto::EphemeralKey::from_seed(&s).expect("fixed seed").public())
    })[i]
}

/// A cursor over the fuzz input: reads past the end yield zeros, so every input is valid.
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
    pub(crate) fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
    pub(crate) fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    /// `n` bytes, zero-padded when the input runs out.
    pub(crate) fn vec(&mut self, n: usize) -> Vec<u8> {
        let mut v = self.bytes(n).to_vec();
        v.resize(n, 0);
        v
    }
}

/// CRC-16/MODBUS byte table, built bit by bit at compile time (independent of `proto::crc16`).
const CRC_TABLE: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u16;
        let mut k = 0;
        while k < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
            k += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

/// Byte-wise CRC-16/MODBUS over several parts (the oracle for the slicing-by-8 one).
pub(crate) fn crc16_oracle(parts: &[&[u8]]) -> u16 {
    let mut crc = 0xFFFFu16;
    for b in parts.iter().flat_map(|p| p.iter()) {
        crc = (crc >> 8) ^ CRC_TABLE[usize::from((crc ^ u16::from(*b)) as u8)];
    }
    crc
}

/// A frame with any type byte, built without the codec under test; the length field is the
/// payload length (so a payload over 480 bytes makes an invalid frame).
pub(crate) fn raw_frame(ptype: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xCD, 0xAB, 0x02, ptype];
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    let crc = crc16_oracle(&[&f[..10], payload]);
    f.extend_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub(crate) fn hmac_oracle(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// The UTACK a receiver owes for a frame (PROTOCOL.md §7), built from the spec.
pub(crate) fn utack_oracle(ptype: u8, seq: u32, key: Option<&[u8; 32]>) -> Vec<u8> {
    let mut u = vec![0xAC, 0xAC, ptype];
    u.extend_from_slice(&seq.to_le_bytes());
    if let (true, Some(k)) = (ptype >= 5, key) {
        let mac = hmac_oracle(k, &[&u]);
        u.extend_from_slice(&mac[..8]);
    }
    u
}

fn gcm_key(key: &[u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("32-byte key"))
}

/// Open a complete encrypted frame with `key` the way PROTOCOL.md §4 says, independently of
/// `Session`: `None` unless the header length matches, the nonce prefix is `seq ‖ sid[..8]`
/// and the tag verifies over AAD = header bytes 0..=9.
pub(crate) fn open_oracle(key: &[u8; 32], sid: &[u8; 16], frame: &[u8]) -> Option<Vec<u8>> {
    if frame.len() < 12 + 28 || frame.len() != 12 + usize::from(u16::from_le_bytes([frame[8], frame[9]])) {
        return None;
    }
    let seq = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let nonce = gcm_nonce(seq, sid);
    if frame[12..24] != nonce {
        return None;
    }
    let mut body = frame[24..].to_vec();
    let aad = aead::Aad::from(&frame[..10]);
    let n = gcm_key(key).open_in_place(aead::Nonce::assume_unique_for_key(nonce), aad, &mut body).ok()?.len();
    body.truncate(n);
    Some(body)
}

/// Seal `plaintext` as a frame of any type byte and seq, as a peer holding `key` would;
/// `bad_prefix` sends a wrong nonce prefix, `flip` corrupts the tag after sealing.
pub(crate) fn seal_oracle(
    key: &[u8; 32],
    sid: &[u8; 16],
    ptype: u8,
    seq: u32,
    plaintext: &[u8],
    bad_prefix: bool,
    flip: bool,
) -> Vec<u8> {
    let mut hdr = vec![0xCD, 0xAB, 0x02, ptype];
    hdr.extend_from_slice(&seq.to_le_bytes());
    hdr.extend_from_slice(&((plaintext.len() + 28) as u16).to_le_bytes());
    let nonce = gcm_nonce(seq, sid);
    let mut body = plaintext.to_vec();
    let tag = gcm_key(key)
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(&hdr[..10]),
            &mut body,
        )
        .expect("small record");
    let mut payload = nonce.to_vec();
    if bad_prefix {
        payload[11] ^= 0x01;
    }
    payload.extend_from_slice(&body);
    payload.extend_from_slice(tag.as_ref());
    if flip {
        let at = payload.len() - 1;
        payload[at] ^= 0x80;
    }
    let crc = crc16_oracle(&[&hdr, &payload]);
    hdr.extend_from_slice(&crc.to_le_bytes());
    hdr.extend_from_slice(&payload);
    hdr
}
