//! Cryptography on `ring` (PROTOCOL.md §3, §4, §6): X25519, the HKDF-SHA256 key schedule,
//! the HMAC-SHA256 handshake proofs (constant-time verification) and AES-256-GCM records
//! sealed and opened in place. Randomness comes in as bytes; nothing here reads the OS.

use ring::rand::SecureRandom;
use ring::{aead, agreement, hkdf, hmac};
use zeroize::Zeroizing;

use super::error::{Error, ErrorKind, Result};
use super::frame::{PacketType, AAD_LEN, MAGIC, VERSION};

/// X25519 public key size.
pub const PUB_KEY_LEN: usize = 32;
/// AES-256 key size.
pub const KEY_LEN: usize = 32;
/// Handshake nonce (HKDF salt) size.
pub const NONCE_LEN: usize = 32;
/// HMAC-SHA256 output size.
pub const HMAC_LEN: usize = 32;
/// Session id size.
pub const SESSION_ID_LEN: usize = 16;
/// Device id size (a MAC address on devices).
pub const DEVICE_ID_LEN: usize = 6;
/// AES-GCM nonce size.
pub const GCM_NONCE_LEN: usize = 12;
/// AES-GCM tag size.
pub const TAG_LEN: usize = 16;
/// Bytes a record adds to its plaintext: nonce prefix + tag.
pub const RECORD_OVERHEAD: usize = GCM_NONCE_LEN + TAG_LEN;
/// Smallest PSK accepted anywhere.
pub const MIN_PSK_LEN: usize = 16;
/// REKEY salt size.
pub const REKEY_SALT_LEN: usize = 32;

/// A fresh X25519 key pair for one handshake. `agree` consumes it, so a key is used once.
pub struct EphemeralKey {
    secret: Secret,
    public: [u8; PUB_KEY_LEN],
}

/// Where the private scalar lives.
enum Secret {
    /// Production: ring's one-use key, drawn from the caller's CSPRNG. Its scalar never leaves
    /// ring and is consumed by the agreement; ring's X25519 is the fastest here (assembly
    /// field arithmetic: about 5–10 % of a handshake's CPU over the portable ladder).
    Drawn(agreement::EphemeralPrivateKey),
    /// A chosen scalar (known-answer tests, fixtures, fuzz targets), which ring cannot take
    /// outside its deprecated test module: `x25519_dalek`, which zeroizes it on drop. The two
    /// implementations are checked against each other (`tests/crypto_hygiene.rs`).
    #[cfg(any(test, fuzzing, feature = "test-support"))]
    Seeded(x25519_dalek::StaticSecret),
}

impl core::fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EphemeralKey").field("public", &self.public).finish_non_exhaustive()
    }
}

impl EphemeralKey {
    /// Make a key pair from `rng`, which must be a CSPRNG (the runtime passes ring's
    /// `SystemRandom`: the core takes randomness as an argument and never reads the OS).
    /// Fails only if the generator does.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self> {
        let failed = |_| Error::misuse(ErrorKind::Crypto, "random generator failed");
        let key = agreement::EphemeralPrivateKey::generate(&agreement::X25519, rng).map_err(failed)?;
        let mut public = [0u8; PUB_KEY_LEN];
        public.copy_from_slice(key.compute_public_key().map_err(failed)?.as_ref());
        Ok(EphemeralKey { secret: Secret::Drawn(key), public })
    }

    /// The key pair whose private scalar is `seed`: known-answer tests (the reference's vectors),
    /// fixtures and fuzz targets, which must replay identically. Not in production builds, where
    /// a key from chosen bytes could only be a mistake.
    #[cfg(any(test, fuzzing, feature = "test-support"))]
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self> {
        // X25519 clamps the scalar (RFC 7748 §5), so any 32 bytes make a valid key.
        let secret = x25519_dalek::StaticSecret::from(*seed);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Ok(EphemeralKey { secret: Secret::Seeded(secret), public })
    }

    /// Our public key, sent in HELLO or CHALLENGE.
    pub fn public(&self) -> &[u8; PUB_KEY_LEN] {
        &self.public
    }

    /// X25519 with the peer's key; an all-zero shared secret (low-order point) is rejected.
    /// The secret comes back in a buffer that zeroizes itself when dropped.
    pub fn agree(self, peer_public: &[u8; PUB_KEY_LEN]) -> Result<Zeroizing<[u8; 32]>> {
        // A low-order peer key forces the all-zero result, which would make the session keys
        // depend on public values only (PROTOCOL.md §3).
        let low_order =
            || Error::misbehaved(ErrorKind::Crypto, "all-zero X25519 shared secret (low-order public key)");
        let mut out = Zeroizing::new([0u8; 32]);
        match self.secret {
            Secret::Drawn(key) => {
                let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer_public);
                // ring refuses the all-zero result itself (tests/crypto_hygiene.rs checks it).
                agreement::agree_ephemeral(key, &peer, |s| out.copy_from_slice(s))
                    .map_err(|_| low_order())?;
            }
            #[cfg(any(test, fuzzing, feature = "test-support"))]
            Secret::Seeded(secret) => {
                let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*peer_public));
                if !shared.was_contributory() {
                    return Err(low_order());
                }
                out.copy_from_slice(shared.as_bytes());
            }
        }
        Ok(out)
    }
}

struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf64(ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> ([u8; 32], [u8; 32]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut okm = Zeroizing::new([0u8; 64]);
    // 64 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
    prk.expand(info, OkmLen(64)).and_then(|o| o.fill(&mut okm[..])).expect("HKDF output length is valid");
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    a.copy_from_slice(&okm[..32]);
    b.copy_from_slice(&okm[32..]);
    (a, b)
}

/// Key schedule, PROTOCOL.md §3: `HKDF-SHA256(shared, salt = nonce, info = "usmp-v2" ‖ pub_C ‖
/// pub_S, 64)`, returned as `(k_c2s, k_s2c)`.
pub fn derive_session_keys(
    shared: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    pub_c: &[u8; PUB_KEY_LEN],
    pub_s: &[u8; PUB_KEY_LEN],
) -> ([u8; KEY_LEN], [u8; KEY_LEN]) {
    hkdf64(shared, nonce, &[b"usmp-v2", pub_c, pub_s])
}

/// REKEY schedule, PROTOCOL.md §6, from the initiator's point of view: `HKDF-SHA256(
/// initiator_old_tx ‖ initiator_old_rx, salt, "usmp-rekey" ‖ session_id, 64)` returned as
/// `(initiator_new_tx, initiator_new_rx)`. The responder takes the mirror.
pub fn derive_rekey_keys(
    initiator_tx: &[u8; KEY_LEN],
    initiator_rx: &[u8; KEY_LEN],
    session_id: &[u8; SESSION_ID_LEN],
    salt: &[u8; REKEY_SALT_LEN],
) -> ([u8; KEY_LEN], [u8; KEY_LEN]) {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(initiator_tx);
    ikm[32..].copy_from_slice(initiator_rx);
    hkdf64(&ikm[..], salt, &[b"usmp-rekey", session_id])
}

/// A device pre-shared key, validated (≥ 16 bytes) and prepared for HMAC once.
#[derive(Clone)]
pub struct Psk {
    key: hmac::Key,
}

impl core::fmt::Debug for Psk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    /// Validate and prepare a PSK; shorter than 16 bytes is a `HandshakeError`.
    pub fn new(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < MIN_PSK_LEN {
            return Err(Error::misuse(ErrorKind::Handshake, "PSK shorter than 16 bytes"));
        }
        Ok(Psk { key: hmac::Key::new(hmac::HMAC_SHA256, bytes) })
    }
}

const PROOF_PREFIX_LEN: usize = 4;
const CLIENT_MSG_LEN: usize = PROOF_PREFIX_LEN + NONCE_LEN + DEVICE_ID_LEN + 2 * PUB_KEY_LEN;
const SERVER_MSG_LEN: usize = PROOF_PREFIX_LEN + NONCE_LEN + SESSION_ID_LEN + 2 * PUB_KEY_LEN;

/// The handshake transcript both proofs cover.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// Server nonce.
    pub nonce: &'a [u8; NONCE_LEN],
    /// Client device id.
    pub device_id: &'a [u8; DEVICE_ID_LEN],
    /// Client public key.
    pub pub_c: &'a [u8; PUB_KEY_LEN],
    /// Server public key.
    pub pub_s: &'a [u8; PUB_KEY_LEN],
}

/// Concatenate `magic(LE) ‖ version ‖ type ‖ parts` into `out` (the proof input, §3).
fn proof_input<const N: usize>(ptype: PacketType, parts: &[&[u8]]) -> [u8; N] {
    let mut out = [0u8; N];
    let m = MAGIC.to_le_bytes();
    out[..PROOF_PREFIX_LEN].copy_from_slice(&[m[0], m[1], VERSION, ptype as u8]);
    let mut at = PROOF_PREFIX_LEN;
    for p in parts {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    debug_assert_eq!(at, N);
    out
}

fn client_input(t: &Transcript<'_>) -> [u8; CLIENT_MSG_LEN] {
    proof_input(PacketType::HelloAck, &[t.nonce, t.device_id, t.pub_c, t.pub_s])
}

fn server_input(t: &Transcript<'_>, session_id: &[u8; SESSION_ID_LEN]) -> [u8; SERVER_MSG_LEN] {
    proof_input(PacketType::SessionOk, &[t.nonce, session_id, t.pub_c, t.pub_s])
}

fn sign(psk: &Psk, msg: &[u8]) -> [u8; HMAC_LEN] {
    let mut out = [0u8; HMAC_LEN];
    out.copy_from_slice(hmac::sign(&psk.key, msg).as_ref());
    out
}

/// Step 3 proof: `HMAC(PSK, CD AB 02 03 ‖ nonce ‖ device_id ‖ pub_C ‖ pub_S)`.
pub fn hmac_client(psk: &Psk, t: &Transcript<'_>) -> [u8; HMAC_LEN] {
    sign(psk, &client_input(t))
}

/// Step 4 proof: `HMAC(PSK, CD AB 02 04 ‖ nonce ‖ session_id ‖ pub_C ‖ pub_S)`.
pub fn hmac_server(psk: &Psk, t: &Transcript<'_>, session_id: &[u8; SESSION_ID_LEN]) -> [u8; HMAC_LEN] {
    sign(psk, &server_input(t, session_id))
}

/// Verify a received step-3 proof in constant time (`ring::hmac::verify`).
pub fn verify_client_proof(psk: &Psk, t: &Transcript<'_>, received: &[u8]) -> Result<()> {
    hmac::verify(&psk.key, &client_input(t), received)
        .map_err(|_| Error::misbehaved(ErrorKind::Auth, "client HMAC did not verify"))
}

/// Verify a received step-4 proof in constant time (`ring::hmac::verify`).
pub fn verify_server_proof(
    psk: &Psk,
    t: &Transcript<'_>,
    session_id: &[u8; SESSION_ID_LEN],
    received: &[u8],
) -> Result<()> {
    hmac::verify(&psk.key, &server_input(t, session_id), received)
        .map_err(|_| Error::misbehaved(ErrorKind::Auth, "server HMAC did not verify"))
}

/// `seq (u32 LE) ‖ session_id[0..8]`, PROTOCOL.md §4.
#[inline]
pub fn gcm_nonce(seq: u32, session_id: &[u8; SESSION_ID_LEN]) -> [u8; GCM_NONCE_LEN] {
    let mut n = [0u8; GCM_NONCE_LEN];
    n[..4].copy_from_slice(&seq.to_le_bytes());
    n[4..].copy_from_slice(&session_id[..8]);
    n
}

/// One direction's AES-256-GCM key, expanded once per session (or per REKEY).
pub struct RecordKey {
    key: aead::LessSafeKey,
}

impl core::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RecordKey(..)")
    }
}

impl RecordKey {
    /// Expand a 32-byte key.
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("32-byte AES-256 key");
        RecordKey { key: aead::LessSafeKey::new(unbound) }
    }

    /// Seal `payload[12..len-16]` in place. `payload` is the whole record slot: the nonce is
    /// written to its first 12 bytes and the tag to its last 16. `aad` is header bytes 0..=9.
    pub fn seal_record(&self, nonce: [u8; GCM_NONCE_LEN], aad: &[u8; AAD_LEN], payload: &mut [u8]) {
        debug_assert!(payload.len() >= RECORD_OVERHEAD);
        payload[..GCM_NONCE_LEN].copy_from_slice(&nonce);
        let tag_at = payload.len() - TAG_LEN;
        let (body, tag_slot) = payload.split_at_mut(tag_at);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut body[GCM_NONCE_LEN..],
            )
            .expect("record within AES-GCM limits");
        tag_slot.copy_from_slice(tag.as_ref());
    }

    /// Open a record in place: checks the transmitted nonce prefix against `nonce` before the
    /// AEAD, then authenticates and decrypts. Returns the plaintext range within `payload`.
    pub fn open_record(
        &self,
        nonce: [u8; GCM_NONCE_LEN],
        aad: &[u8],
        payload: &mut [u8],
    ) -> Result<core::ops::Range<usize>> {
        if payload.len() < RECORD_OVERHEAD {
            return Err(Error::garbage(ErrorKind::Crypto, "record shorter than nonce and tag"));
        }
        if payload[..GCM_NONCE_LEN] != nonce {
            return Err(Error::misbehaved(ErrorKind::Crypto, "nonce prefix mismatch"));
        }
        let plain_len = self
            .key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut payload[GCM_NONCE_LEN..],
            )
            .map_err(|_| Error::misbehaved(ErrorKind::Crypto, "authentication tag did not verify"))?
            .len();
        Ok(GCM_NONCE_LEN..GCM_NONCE_LEN + plain_len)
    }
}

/// Constant-time equality of two byte strings (length is not secret). For MACs we compare
/// ourselves, such as the 8-byte UTACK MAC and cookies, where `hmac::verify` does not fit.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    core::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_record_from_protocol_md() {
        let key = RecordKey::new(b"this_is_a_very_secret_key_32_byt");
        let sid = *b"0123456789abcdef";
        let aad = [0xcd, 0xab, 0x02, 0x05, 0, 0, 0, 0, 0x27, 0x00];
        let mut payload = [0u8; 39];
        payload[12..23].copy_from_slice(b"hello world");
        key.seal_record(gcm_nonce(0, &sid), &aad, &mut payload);
        assert_eq!(
            &payload[..16],
            &[0, 0, 0, 0, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x37, 0xed, 0xdd, 0x9e]
        );
        assert_eq!(&payload[36..], &[0x8a, 0xf9, 0x44]);
        let r = key.open_record(gcm_nonce(0, &sid), &aad, &mut payload).unwrap();
        assert_eq!(&payload[r], b"hello world");
    }

    #[test]
    fn open_rejects_prefix_tag_and_aad_tampering() {
        let key = RecordKey::new(&[7; 32]);
        let sid = [1; 16];
        let aad = [1u8; AAD_LEN];
        let mut rec = [0u8; 40];
        key.seal_record(gcm_nonce(5, &sid), &aad, &mut rec);
        let kind = |n: [u8; 12], a: &[u8], r: &mut [u8]| key.open_record(n, a, r).unwrap_err().kind();
        assert_eq!(kind(gcm_nonce(6, &sid), &aad, &mut rec.clone()), ErrorKind::Crypto);
        let mut t = rec;
        t[39] ^= 1;
        assert_eq!(kind(gcm_nonce(5, &sid), &aad, &mut t), ErrorKind::Crypto);
        assert_eq!(kind(gcm_nonce(5, &sid), &[2u8; AAD_LEN], &mut rec.clone()), ErrorKind::Crypto);
        assert_eq!(kind(gcm_nonce(5, &sid), &aad, &mut rec[..20].to_vec()), ErrorKind::Crypto);
    }

    #[test]
    fn x25519_agreement_is_symmetric_and_rejects_low_order_points() {
        let a = EphemeralKey::from_seed(&[1; 32]).unwrap();
        let b = EphemeralKey::from_seed(&[2; 32]).unwrap();
        let (pa, pb) = (*a.public(), *b.public());
        assert_eq!(a.agree(&pb).unwrap(), b.agree(&pa).unwrap());
        let c = EphemeralKey::from_seed(&[3; 32]).unwrap();
        assert_eq!(c.agree(&[0u8; 32]).unwrap_err().kind(), ErrorKind::Crypto);
    }

    #[test]
    fn short_psk_is_refused() {
        assert_eq!(Psk::new(&[0; 15]).unwrap_err().kind(), ErrorKind::Handshake);
        assert!(Psk::new(&[0; 16]).is_ok());
    }

    #[test]
    fn proofs_verify_in_constant_time_helper() {
        let psk = Psk::new(b"0123456789abcdef").unwrap();
        let t = Transcript { nonce: &[1; 32], device_id: &[2; 6], pub_c: &[3; 32], pub_s: &[4; 32] };
        let c = hmac_client(&psk, &t);
        assert!(verify_client_proof(&psk, &t, &c).is_ok());
        let mut bad = c;
        bad[0] ^= 1;
        assert_eq!(verify_client_proof(&psk, &t, &bad).unwrap_err().kind(), ErrorKind::Auth);
        assert_eq!(verify_client_proof(&psk, &t, &c[..31]).unwrap_err().kind(), ErrorKind::Auth);
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"ab", b"abc"));
        let s = hmac_server(&psk, &t, &[0; 16]);
        assert_ne!(s, c);
        assert!(verify_server_proof(&psk, &t, &[0; 16], &s).is_ok());
        assert!(verify_server_proof(&psk, &t, &[1; 16], &s).is_err());
    }
}
