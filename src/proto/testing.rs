//! Deterministic fixtures for tests, benches and fuzz targets (fixed seeds, no OS randomness).

use super::crypto::{EphemeralKey, Psk};
use super::error::Transport;
use super::frame::Frame;
use super::handshake::{decode_hello, ClientHandshake, ClientReply, ServerExpectHelloAck};
use super::session::Session;

/// Run a full in-memory handshake with fixed keys and return `(client, server)` sessions.
pub fn session_pair(transport: Transport) -> (Session, Session) {
    let mut buf = [0u8; 128];
    let psk = Psk::new(b"0123456789abcdef").expect("16-byte key");
    let seed = |b| EphemeralKey::from_seed(&[b; 32]).expect("fixed seed");
    let client = ClientHandshake::new([1; 6], psk.clone(), seed(1));
    let n = client.encode_hello(&mut buf).expect("HELLO");
    let hello = decode_hello(&Frame::decode(&buf[..n]).expect("frame")).expect("HELLO parses");
    let server = ServerExpectHelloAck::new(&hello, &psk, seed(2), [3; 32]).expect("CHALLENGE");
    let n = server.encode_challenge(&mut buf).expect("CHALLENGE");
    let reply = client.handle_reply(&Frame::decode(&buf[..n]).expect("frame")).expect("reply");
    let ClientReply::Challenge(expect) = reply else { unreachable!("the server sent CHALLENGE") };
    let (s, n) = server.finish([4; 16], &mut buf).expect("SESSION_OK");
    let c = expect.handle_session_ok(&Frame::decode(&buf[..n]).expect("frame")).expect("proof");
    (Session::new(&c, transport), Session::new(&s, transport))
}

/// Seal one frame of any encrypted type, bypassing the message rules (fragmentation, spent
/// sequence, control budget): lets tests and fuzzers play a peer that breaks them.
/// `out` needs `12 + 12 + plaintext.len() + 16` bytes; returns the frame length.
pub fn seal_any(
    session: &mut Session,
    ptype: super::frame::PacketType,
    plaintext: &[u8],
    out: &mut [u8],
) -> usize {
    session.seal_one(ptype, plaintext, out)
}
