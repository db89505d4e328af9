//! The four-step handshake (PROTOCOL.md §3) as typestate machines for both sides. Each step
//! consumes a decoded frame and writes its answer into a caller buffer; randomness (ephemeral
//! key seed, nonce, session id) is passed in, so every step is deterministic under test.
//!
//! Server: [`decode_hello`], PSK lookup (caller, may be async), [`ServerExpectHelloAck::new`]
//! and `encode_challenge`, `verify_hello_ack`, limits (caller), `finish` (SESSION_OK).
//!
//! Client: [`ClientHandshake::new`] and `encode_hello`, `handle_reply` (CHALLENGE or
//! HELLO_RETRY), `encode_hello_ack`, `handle_session_ok`.

use super::crypto::{
    derive_session_keys, hmac_client, hmac_server, verify_client_proof, verify_server_proof, EphemeralKey,
    Psk, Transcript, DEVICE_ID_LEN, HMAC_LEN, KEY_LEN, NONCE_LEN, PUB_KEY_LEN, SESSION_ID_LEN,
};
use super::error::{Error, ErrorKind, Result};
use super::frame::{encode_frame, Frame, PacketType, HEADER_LEN};
use zeroize::Zeroize;

/// UDP return-routability cookie size.
pub const COOKIE_LEN: usize = 16;
/// HELLO payload without cookie: device_id ‖ pub_C.
pub const HELLO_LEN: usize = DEVICE_ID_LEN + PUB_KEY_LEN;
/// HELLO payload with cookie (UDP retry).
pub const HELLO_COOKIE_LEN: usize = HELLO_LEN + COOKIE_LEN;
/// CHALLENGE payload: nonce ‖ pub_S.
pub const CHALLENGE_LEN: usize = NONCE_LEN + PUB_KEY_LEN;
/// SESSION_OK payload: session_id ‖ hmac_server.
pub const SESSION_OK_LEN: usize = SESSION_ID_LEN + HMAC_LEN;
/// Largest handshake frame (CHALLENGE).
pub const MAX_HANDSHAKE_FRAME_LEN: usize = HEADER_LEN + CHALLENGE_LEN;
/// HELLO_ACK travels with seq 2 (§2).
pub const HELLO_ACK_SEQ: u32 = 2;

/// Which end of the session we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Device side: seals with k_c2s.
    Client,
    /// Gateway side: seals with k_s2c.
    Server,
}

/// What a completed handshake hands to [`crate::proto::session::Session`].
#[derive(Clone, PartialEq, Eq)]
pub struct Established {
    /// Our role.
    pub role: Role,
    /// The device's 6-byte id.
    pub device_id: [u8; DEVICE_ID_LEN],
    /// The 16-byte session id chosen by the server.
    pub session_id: [u8; SESSION_ID_LEN],
    /// Key we seal with.
    pub tx_key: [u8; KEY_LEN],
    /// Key we open with.
    pub rx_key: [u8; KEY_LEN],
}

// The key bytes leave no copy behind in this value when it is dropped (moves may still leave
// stale copies on the stack, which no Rust code can reach without `unsafe`).
impl Drop for Established {
    fn drop(&mut self) {
        self.tx_key.zeroize();
        self.rx_key.zeroize();
    }
}

impl core::fmt::Debug for Established {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Established")
            .field("role", &self.role)
            .field("device_id", &self.device_id)
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

/// Step 1 as the server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Sequence number the client used (0, or 1 on the UDP cookie retry).
    pub seq: u32,
    /// Device id.
    pub device_id: [u8; DEVICE_ID_LEN],
    /// Client ephemeral public key.
    pub pub_c: [u8; PUB_KEY_LEN],
    /// Cookie echoed by a UDP client on its retry.
    pub cookie: Option<[u8; COOKIE_LEN]>,
}

fn expect(frame: &Frame<'_>, ptype: PacketType, what: &'static str) -> Result<()> {
    if frame.packet_type() != ptype {
        return Err(Error::misbehaved(ErrorKind::Handshake, what));
    }
    Ok(())
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Step 1 (PROTOCOL.md §3): parse HELLO `device_id ‖ pub_C [‖ cookie]` (38 or 54 bytes).
/// Cheap and allocation-free: run it before any PSK lookup or X25519.
pub fn decode_hello(frame: &Frame<'_>) -> Result<Hello> {
    expect(frame, PacketType::Hello, "expected HELLO")?;
    let p = frame.payload();
    let cookie = match p.len() {
        HELLO_LEN => None,
        HELLO_COOKIE_LEN => Some(arr(&p[HELLO_LEN..])),
        _ => return Err(Error::misbehaved(ErrorKind::Handshake, "bad HELLO length")),
    };
    Ok(Hello {
        seq: frame.seq(),
        device_id: arr(&p[..DEVICE_ID_LEN]),
        pub_c: arr(&p[DEVICE_ID_LEN..HELLO_LEN]),
        cookie,
    })
}

/// Server after CHALLENGE: waiting for the client's proof.
pub struct ServerExpectHelloAck {
    psk: Psk,
    device_id: [u8; DEVICE_ID_LEN],
    pub_c: [u8; PUB_KEY_LEN],
    pub_s: [u8; PUB_KEY_LEN],
    nonce: [u8; NONCE_LEN],
    k_c2s: [u8; KEY_LEN],
    k_s2c: [u8; KEY_LEN],
}

impl Drop for ServerExpectHelloAck {
    fn drop(&mut self) {
        self.k_c2s.zeroize();
        self.k_s2c.zeroize();
    }
}

impl core::fmt::Debug for ServerExpectHelloAck {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServerExpectHelloAck").field("device_id", &self.device_id).finish_non_exhaustive()
    }
}

impl ServerExpectHelloAck {
    /// Step 2: with the device's PSK, a fresh key pair and a random 32-byte nonce, run X25519
    /// and HKDF (the all-zero shared secret is refused) and get ready to send CHALLENGE.
    pub fn new(hello: &Hello, psk: &Psk, key: EphemeralKey, nonce: [u8; NONCE_LEN]) -> Result<Self> {
        let pub_s = *key.public();
        let shared = key.agree(&hello.pub_c)?;
        let (k_c2s, k_s2c) = derive_session_keys(&shared, &nonce, &hello.pub_c, &pub_s);
        Ok(ServerExpectHelloAck {
            psk: psk.clone(),
            device_id: hello.device_id,
            pub_c: hello.pub_c,
            pub_s,
            nonce,
            k_c2s,
            k_s2c,
        })
    }

    /// The device this handshake is for.
    pub fn device_id(&self) -> &[u8; DEVICE_ID_LEN] {
        &self.device_id
    }

    /// Step 2 on the wire: CHALLENGE `nonce ‖ pub_S`, seq 0. Returns the frame length.
    pub fn encode_challenge(&self, out: &mut [u8]) -> Result<usize> {
        let mut p = [0u8; CHALLENGE_LEN];
        p[..NONCE_LEN].copy_from_slice(&self.nonce);
        p[NONCE_LEN..].copy_from_slice(&self.pub_s);
        encode_frame(PacketType::Challenge, 0, &p, out)
    }

    fn transcript(&self) -> Transcript<'_> {
        Transcript { nonce: &self.nonce, device_id: &self.device_id, pub_c: &self.pub_c, pub_s: &self.pub_s }
    }

    /// Step 3: verify HELLO_ACK's proof in constant time. A wrong PSK is an `AuthError`.
    pub fn verify_hello_ack(&self, frame: &Frame<'_>) -> Result<()> {
        expect(frame, PacketType::HelloAck, "expected HELLO_ACK")?;
        if frame.payload().len() != HMAC_LEN {
            return Err(Error::misbehaved(ErrorKind::Handshake, "bad HELLO_ACK length"));
        }
        verify_client_proof(&self.psk, &self.transcript(), frame.payload())
    }

    /// Step 4: SESSION_OK `session_id ‖ hmac_server`, seq 0, written into `out`. Call only
    /// after [`ServerExpectHelloAck::verify_hello_ack`] succeeded and the limits allow it.
    pub fn finish(self, session_id: [u8; SESSION_ID_LEN], out: &mut [u8]) -> Result<(Established, usize)> {
        let mut p = [0u8; SESSION_OK_LEN];
        p[..SESSION_ID_LEN].copy_from_slice(&session_id);
        p[SESSION_ID_LEN..].copy_from_slice(&hmac_server(&self.psk, &self.transcript(), &session_id));
        let n = encode_frame(PacketType::SessionOk, 0, &p, out)?;
        let est = Established {
            role: Role::Server,
            device_id: self.device_id,
            session_id,
            tx_key: self.k_s2c,
            rx_key: self.k_c2s,
        };
        Ok((est, n))
    }
}

/// Client before CHALLENGE: has sent (or is about to send) HELLO.
pub struct ClientHandshake {
    psk: Psk,
    device_id: [u8; DEVICE_ID_LEN],
    key: EphemeralKey,
    cookie: Option<[u8; COOKIE_LEN]>,
}

impl core::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientHandshake").field("device_id", &self.device_id).finish_non_exhaustive()
    }
}

/// What the server answered to HELLO.
#[derive(Debug)]
pub enum ClientReply {
    /// HELLO_RETRY: resend HELLO (now with the cookie, seq 1) and wait again.
    Retry(ClientHandshake),
    /// CHALLENGE: send HELLO_ACK and wait for SESSION_OK.
    Challenge(ClientExpectSessionOk),
}

impl ClientHandshake {
    /// Start a handshake for `device_id` with a fresh key pair.
    pub fn new(device_id: [u8; DEVICE_ID_LEN], psk: Psk, key: EphemeralKey) -> Self {
        ClientHandshake { psk, device_id, key, cookie: None }
    }

    /// Step 1 on the wire: HELLO (seq 0), or after a HELLO_RETRY the 54-byte cookie HELLO (seq 1).
    pub fn encode_hello(&self, out: &mut [u8]) -> Result<usize> {
        let mut p = [0u8; HELLO_COOKIE_LEN];
        p[..DEVICE_ID_LEN].copy_from_slice(&self.device_id);
        p[DEVICE_ID_LEN..HELLO_LEN].copy_from_slice(self.key.public());
        match &self.cookie {
            None => encode_frame(PacketType::Hello, 0, &p[..HELLO_LEN], out),
            Some(c) => {
                p[HELLO_LEN..].copy_from_slice(c);
                encode_frame(PacketType::Hello, 1, &p, out)
            }
        }
    }

    /// Whether a cookie was received (the next HELLO carries it).
    pub fn has_cookie(&self) -> bool {
        self.cookie.is_some()
    }

    /// Step 2: CHALLENGE → keys derived; HELLO_RETRY (once) → store the cookie.
    pub fn handle_reply(mut self, frame: &Frame<'_>) -> Result<ClientReply> {
        match frame.packet_type() {
            PacketType::HelloRetry if self.cookie.is_none() => {
                if frame.payload().len() != COOKIE_LEN {
                    return Err(Error::misbehaved(ErrorKind::Handshake, "bad HELLO_RETRY length"));
                }
                self.cookie = Some(arr(frame.payload()));
                Ok(ClientReply::Retry(self))
            }
            PacketType::Challenge => {
                let p = frame.payload();
                if p.len() != CHALLENGE_LEN {
                    return Err(Error::misbehaved(ErrorKind::Handshake, "bad CHALLENGE length"));
                }
                let nonce: [u8; NONCE_LEN] = arr(&p[..NONCE_LEN]);
                let pub_s: [u8; PUB_KEY_LEN] = arr(&p[NONCE_LEN..]);
                let pub_c = *self.key.public();
                let shared = self.key.agree(&pub_s)?;
                let (k_c2s, k_s2c) = derive_session_keys(&shared, &nonce, &pub_c, &pub_s);
                Ok(ClientReply::Challenge(ClientExpectSessionOk {
                    psk: self.psk,
                    device_id: self.device_id,
                    pub_c,
                    pub_s,
                    nonce,
                    k_c2s,
                    k_s2c,
                }))
            }
            _ => Err(Error::misbehaved(ErrorKind::Handshake, "expected CHALLENGE")),
        }
    }
}

/// Client after CHALLENGE: has sent HELLO_ACK, waiting for SESSION_OK.
pub struct ClientExpectSessionOk {
    psk: Psk,
    device_id: [u8; DEVICE_ID_LEN],
    pub_c: [u8; PUB_KEY_LEN],
    pub_s: [u8; PUB_KEY_LEN],
    nonce: [u8; NONCE_LEN],
    k_c2s: [u8; KEY_LEN],
    k_s2c: [u8; KEY_LEN],
}

impl Drop for ClientExpectSessionOk {
    fn drop(&mut self) {
        self.k_c2s.zeroize();
        self.k_s2c.zeroize();
    }
}

impl core::fmt::Debug for ClientExpectSessionOk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientExpectSessionOk").field("device_id", &self.device_id).finish_non_exhaustive()
    }
}

impl ClientExpectSessionOk {
    fn transcript(&self) -> Transcript<'_> {
        Transcript { nonce: &self.nonce, device_id: &self.device_id, pub_c: &self.pub_c, pub_s: &self.pub_s }
    }

    /// Step 3 on the wire: HELLO_ACK with the client proof, seq 2.
    pub fn encode_hello_ack(&self, out: &mut [u8]) -> Result<usize> {
        encode_frame(PacketType::HelloAck, HELLO_ACK_SEQ, &hmac_client(&self.psk, &self.transcript()), out)
    }

    /// Step 4: verify SESSION_OK's proof (a rogue gateway fails here with `AuthError`).
    pub fn handle_session_ok(self, frame: &Frame<'_>) -> Result<Established> {
        expect(frame, PacketType::SessionOk, "expected SESSION_OK")?;
        let p = frame.payload();
        if p.len() != SESSION_OK_LEN {
            return Err(Error::misbehaved(ErrorKind::Handshake, "bad SESSION_OK length"));
        }
        let session_id: [u8; SESSION_ID_LEN] = arr(&p[..SESSION_ID_LEN]);
        verify_server_proof(&self.psk, &self.transcript(), &session_id, &p[SESSION_ID_LEN..])?;
        Ok(Established {
            role: Role::Client,
            device_id: self.device_id,
            session_id,
            tx_key: self.k_c2s,
            rx_key: self.k_s2c,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> EphemeralKey {
        EphemeralKey::from_seed(&[b; 32]).unwrap()
    }

    fn run(server_psk: &[u8], client_psk: &[u8], with_cookie: bool) -> Result<(Established, Established)> {
        let mut buf = [0u8; 128];
        let mut ch = ClientHandshake::new([1, 2, 3, 4, 5, 6], Psk::new(client_psk)?, key(9));
        if with_cookie {
            let n = encode_frame(PacketType::HelloRetry, 0, &[7; 16], &mut buf)?;
            ch = match ch.handle_reply(&Frame::decode(&buf[..n])?)? {
                ClientReply::Retry(c) => c,
                ClientReply::Challenge(_) => unreachable!(),
            };
        }
        let n = ch.encode_hello(&mut buf)?;
        let hello = decode_hello(&Frame::decode(&buf[..n])?)?;
        assert_eq!(hello.cookie.is_some(), with_cookie);
        assert_eq!(hello.seq, with_cookie as u32);
        let srv = ServerExpectHelloAck::new(&hello, &Psk::new(server_psk)?, key(4), [5; 32])?;
        let n = srv.encode_challenge(&mut buf)?;
        let cl = match ch.handle_reply(&Frame::decode(&buf[..n])?)? {
            ClientReply::Challenge(c) => c,
            ClientReply::Retry(_) => unreachable!(),
        };
        let n = cl.encode_hello_ack(&mut buf)?;
        let f = Frame::decode(&buf[..n])?;
        assert_eq!(f.seq(), 2);
        srv.verify_hello_ack(&f)?;
        let (s, n) = srv.finish([8; 16], &mut buf)?;
        let c = cl.handle_session_ok(&Frame::decode(&buf[..n])?)?;
        Ok((c, s))
    }

    #[test]
    fn both_sides_agree_on_keys() {
        for cookie in [false, true] {
            let (c, s) = run(b"0123456789abcdef", b"0123456789abcdef", cookie).unwrap();
            assert_eq!(c.tx_key, s.rx_key);
            assert_eq!(c.rx_key, s.tx_key);
            assert_ne!(c.tx_key, c.rx_key);
            assert_eq!(c.session_id, s.session_id);
        }
    }

    #[test]
    fn wrong_psk_fails_on_the_server_with_auth_error() {
        let e = run(b"0123456789abcdef", b"0123456789abcdeX", false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth);
    }

    #[test]
    fn rogue_server_fails_on_the_client() {
        let mut buf = [0u8; 128];
        let ch = ClientHandshake::new([1; 6], Psk::new(&[1; 16]).unwrap(), key(1));
        let n = ch.encode_hello(&mut buf).unwrap();
        let hello = decode_hello(&Frame::decode(&buf[..n]).unwrap()).unwrap();
        let srv = ServerExpectHelloAck::new(&hello, &Psk::new(&[2; 16]).unwrap(), key(2), [0; 32]).unwrap();
        let n = srv.encode_challenge(&mut buf).unwrap();
        let cl = match ch.handle_reply(&Frame::decode(&buf[..n]).unwrap()).unwrap() {
            ClientReply::Challenge(c) => c,
            _ => unreachable!(),
        };
        let (_, n) = srv.finish([3; 16], &mut buf).unwrap();
        let e = cl.handle_session_ok(&Frame::decode(&buf[..n]).unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth);
    }

    #[test]
    fn malformed_handshake_frames_are_refused() {
        let mut buf = [0u8; 128];
        let n = encode_frame(PacketType::Hello, 0, &[0; 37], &mut buf).unwrap();
        assert_eq!(
            decode_hello(&Frame::decode(&buf[..n]).unwrap()).unwrap_err().kind(),
            ErrorKind::Handshake
        );
        let n = encode_frame(PacketType::Data, 0, &[0; 38], &mut buf).unwrap();
        assert_eq!(
            decode_hello(&Frame::decode(&buf[..n]).unwrap()).unwrap_err().kind(),
            ErrorKind::Handshake
        );
        // A low-order client key yields an all-zero secret: refused before CHALLENGE.
        let hello = Hello { seq: 0, device_id: [0; 6], pub_c: [0; 32], cookie: None };
        let e = ServerExpectHelloAck::new(&hello, &Psk::new(&[1; 16]).unwrap(), key(3), [0; 32]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Crypto);
    }
}
