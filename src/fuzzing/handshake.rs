//! `handshake`: the gateway's side of the handshake (TCP flavour, as `gateway::shard` drives
//! it) fed arbitrary frames in arbitrary order, over as many connections as the input wants.
//!
//! Input: `server_seed(32) ‖ nonce(32) ‖ session_id(16) ‖ ops…` — the gateway's randomness
//! (connection `i` uses it with byte 1 xored with `i`, so connection 0 uses it verbatim and a
//! transcript of the reference package replays). Ops, by first byte mod 8:
//! 0/7 raw bytes (`len u16 mod 512 ‖ bytes`); 1 a well-formed frame of any type
//! (`type ‖ seq u32 ‖ len u16 mod 482 ‖ bytes`); 2 HELLO (`device ‖ key ‖ flags`, see
//! [`hello`]); 3 HELLO_ACK computed over the last CHALLENGE (`psk ‖ flags`); 4 replay one of
//! the last 8 frames; 5 new connection; 6 a message each way once established (`len u16`).
//!
//! Invariants: a frame is refused exactly when an oracle says it is not a well-formed HELLO
//! (then HELLO_ACK with the right proof), so SESSION_OK is reached if and only if the
//! transcript is correct; CHALLENGE and SESSION_OK are byte-exact per PROTOCOL.md §3; an
//! honest client verifies SESSION_OK and derives mirrored keys that carry messages both ways;
//! every refusal closes the connection (never a local-misuse error).

use core::time::Duration;

use super::{client_public, hmac_oracle, psk_of, raw_frame, Input, Report, CLIENT_SEEDS, DEVICES};
use crate::proto::crypto::{EphemeralKey, Psk};
use crate::proto::error::{Fault, Reaction, Transport};
use crate::proto::frame::{Frame, PacketType};
use crate::proto::handshake::{decode_hello, ClientHandshake, ClientReply, Hello, ServerExpectHelloAck};
use crate::proto::session::{Received, Session, MAX_SEALED_MESSAGE_LEN};

const MAX_OPS: usize = 32;
/// HELLOs that get as far as X25519 per input (the slow part); the input ends there.
const MAX_KEY_AGREEMENTS: usize = 6;

struct Pending {
    expect: ServerExpectHelloAck,
    hello: Hello,
    psk: &'static [u8],
    challenge: Vec<u8>,
}

enum Conn {
    Hello,
    Ack(Box<Pending>),
    Up(Box<(Session, Option<Session>)>),
}

/// What the harness, playing the client, last sent and received on this connection.
#[derive(Default)]
struct Client {
    hello: Option<(Hello, Option<usize>)>,
    challenge: Option<Vec<u8>>,
}

struct Harness {
    seed: [u8; 32],
    nonce: [u8; 32],
    sid: [u8; 16],
    conn_no: u8,
    agreements: usize,
    conn: Conn,
    client: Client,
    history: Vec<Vec<u8>>,
    report: Report,
}

/// A HELLO op: `device(1)` (mod 4: a known device, or 3 = 6 bytes from the input), `key(1)`
/// (mod 4: an honest client key, or 3 = 32 bytes from the input), `flags(1)` (bit 0: cookie
/// of 16 input bytes; bit 1: seq from the input).
fn hello(r: &mut Input<'_>) -> (Vec<u8>, Hello, Option<usize>) {
    let (dsel, ksel, flags) = (usize::from(r.u8() % 4), usize::from(r.u8() % 4), r.u8());
    let device_id = if dsel < 3 { DEVICES[dsel].0 } else { r.array() };
    let (pub_c, key) = if ksel < 3 { (client_public(ksel), Some(ksel)) } else { (r.array(), None) };
    let cookie = (flags & 1 != 0).then(|| r.array::<16>());
    let seq = if flags & 2 != 0 { r.u32() } else { u32::from(cookie.is_some()) };
    let mut p = [&device_id[..], &pub_c[..]].concat();
    if let Some(c) = &cookie {
        p.extend_from_slice(c);
    }
    (raw_frame(1, seq, &p), Hello { seq, device_id, pub_c, cookie }, key)
}

fn check_error(e: &crate::proto::Error) {
    assert_ne!(e.fault(), Fault::LocalMisuse, "a peer's frame caused a local-misuse error: {e}");
    assert_eq!(e.reaction(Transport::Tcp), Reaction::Close);
}

impl Harness {
    fn fail(&mut self) {
        self.report.errors += 1;
        self.conn = Conn::Hello;
        self.client = Client::default();
        self.conn_no = self.conn_no.wrapping_add(1);
    }

    fn feed(&mut self, f: &[u8]) {
        if self.history.len() == 8 {
            self.history.remove(0);
        }
        self.history.push(f.to_vec());
        match core::mem::replace(&mut self.conn, Conn::Hello) {
            Conn::Hello => self.on_hello(f),
            Conn::Ack(p) => self.on_hello_ack(f, *p),
            Conn::Up(s) => self.on_session(f, *s),
        }
    }

    fn on_hello(&mut self, f: &[u8]) {
        // Oracle: a decodable frame of type 1 with a 38- or 54-byte payload.
        let oracle =
            Frame::decode(f).ok().filter(|fr| fr.packet_type() == PacketType::Hello).and_then(|fr| {
                let p = fr.payload();
                (p.len() == 38 || p.len() == 54).then(|| (fr.seq(), p.to_vec()))
            });
        let hello = match Frame::decode(f).and_then(|fr| decode_hello(&fr)) {
            Ok(h) => h,
            Err(e) => {
                assert!(oracle.is_none(), "a well-formed HELLO was refused: {e}");
                check_error(&e);
                return self.fail();
            }
        };
        let (seq, p) = oracle.expect("a malformed HELLO was accepted");
        assert_eq!((hello.seq, &hello.device_id[..], &hello.pub_c[..]), (seq, &p[..6], &p[6..38]));
        assert_eq!(hello.cookie.map(|c| c.to_vec()), (p.len() == 54).then(|| p[38..].to_vec()));
        let Some(psk) = psk_of(&hello.device_id) else { return self.fail() };
        self.agreements += 1;
        if self.agreements > MAX_KEY_AGREEMENTS {
            return; // budget spent: the input ends here
        }
        let mut seed = self.seed;
        seed[1] ^= self.conn_no;
        let mut nonce = self.nonce;
        nonce[1] ^= self.conn_no;
        let key = EphemeralKey::from_seed(&seed).expect("any 32 bytes make an X25519 key");
        let pub_s = *key.public();
        let expect = match ServerExpectHelloAck::new(&hello, &Psk::new(psk).expect("long PSK"), key, nonce) {
            Ok(x) => x,
            Err(e) => {
                assert_eq!(e.kind(), crate::proto::ErrorKind::Crypto, "only a low-order pub_C may fail here");
                check_error(&e);
                return self.fail();
            }
        };
        let mut buf = [0u8; 128];
        let n = expect.encode_challenge(&mut buf).expect("CHALLENGE fits");
        assert_eq!(&buf[..n], &raw_frame(2, 0, &[&nonce[..], &pub_s[..]].concat())[..], "bad CHALLENGE");
        self.client.challenge = Some(buf[..n].to_vec());
        let challenge = buf[..n].to_vec();
        self.conn = Conn::Ack(Box::new(Pending { expect, hello, psk, challenge }));
    }

    fn on_hello_ack(&mut self, f: &[u8], p: Pending) {
        let (nonce, pub_s) = (&p.challenge[12..44], &p.challenge[44..76]);
        let h = &p.hello;
        let proof = hmac_oracle(p.psk, &[&[0xCD, 0xAB, 0x02, 0x03], nonce, &h.device_id, &h.pub_c, pub_s]);
        let correct = Frame::decode(f)
            .is_ok_and(|fr| fr.packet_type() == PacketType::HelloAck && fr.payload() == proof);
        if let Err(e) = Frame::decode(f).and_then(|fr| p.expect.verify_hello_ack(&fr)) {
            assert!(!correct, "a correct HELLO_ACK was refused: {e}");
            check_error(&e);
            return self.fail();
        }
        assert!(correct, "SESSION_OK for a HELLO_ACK without the right proof");
        let mut sid = self.sid;
        sid[1] ^= self.conn_no;
        let mut buf = [0u8; 128];
        let (est, n) = p.expect.finish(sid, &mut buf).expect("SESSION_OK fits");
        let mac = hmac_oracle(p.psk, &[&[0xCD, 0xAB, 0x02, 0x04], nonce, &sid, &h.pub_c, pub_s]);
        let ok = buf[..n].to_vec();
        assert_eq!(ok, raw_frame(4, 0, &[&sid[..], &mac[..]].concat()), "bad SESSION_OK");
        assert_eq!((est.device_id, est.session_id), (h.device_id, sid));
        self.report.established += 1;
        // An honest client (its private key is known) must verify SESSION_OK and agree on keys.
        let client =
            self.client.hello.as_ref().filter(|(x, _)| *x == p.hello).and_then(|(_, k)| *k).map(|k| {
                let key = EphemeralKey::from_seed(&CLIENT_SEEDS[k]).expect("fixed seed");
                let mut ch = ClientHandshake::new(h.device_id, Psk::new(p.psk).expect("long PSK"), key);
                if let Some(c) = h.cookie {
                    let retry = raw_frame(0x0A, 0, &c);
                    let Ok(ClientReply::Retry(c)) = ch.handle_reply(&Frame::decode(&retry).expect("frame"))
                    else {
                        panic!("the client refused HELLO_RETRY")
                    };
                    ch = c;
                }
                let reply = ch.handle_reply(&Frame::decode(&p.challenge).expect("frame"));
                let Ok(ClientReply::Challenge(c)) = reply else { panic!("the client refused CHALLENGE") };
                let n = c.encode_hello_ack(&mut buf).expect("HELLO_ACK fits");
                assert_eq!(&buf[12..n], &proof[..], "the client's proof differs from the oracle's");
                let c = c
                    .handle_session_ok(&Frame::decode(&ok).expect("frame"))
                    .expect("client verifies SESSION_OK");
                assert_eq!((c.tx_key, c.rx_key, c.session_id), (est.rx_key, est.tx_key, sid), "keys differ");
                Session::new(&c, Transport::Tcp)
            });
        self.conn = Conn::Up(Box::new((Session::new(&est, Transport::Tcp), client)));
    }

    fn on_session(&mut self, f: &[u8], mut s: (Session, Option<Session>)) {
        let mut b = f.to_vec();
        let ok = Frame::decode_exact(f).map_err(|e| check_error(&e)).is_ok()
            && s.0.open(&mut b, Duration::ZERO).map_err(|e| check_error(&e)).is_ok();
        if ok && !s.0.is_closed() {
            self.report.frames += 1;
            self.conn = Conn::Up(Box::new(s));
        } else {
            self.fail();
        }
    }

    /// Op 6: a message from the client to the gateway and back.
    fn exchange(&mut self, len: usize) {
        let Conn::Up(s) = &mut self.conn else { return };
        let (server, Some(client)) = &mut **s else { return };
        let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
        self.report.messages += transfer(client, server, &msg) + transfer(server, client, &msg);
    }
}

/// Seal `msg` with `tx`, open it with `rx`: it must arrive unchanged. Returns 1 if it did.
fn transfer(tx: &mut Session, rx: &mut Session, msg: &[u8]) -> usize {
    let mut out = vec![0u8; MAX_SEALED_MESSAGE_LEN];
    let Ok(n) = tx.seal_message(msg, &mut out) else { return 0 };
    let mut at = 0;
    let mut delivered = 0;
    while at < n {
        let len = 12 + usize::from(u16::from_le_bytes([out[at + 8], out[at + 9]]));
        if let Received::Message(m) =
            rx.open(&mut out[at..at + len], Duration::ZERO).expect("own frame opens")
        {
            assert_eq!(m, msg, "message changed in transit");
            delivered += 1;
        }
        at += len;
    }
    assert_eq!(delivered, 1, "one message sent, {delivered} delivered");
    delivered
}

/// Fuzz entry point: see the module documentation for the input format and invariants.
pub fn handshake(data: &[u8]) -> Report {
    let mut r = Input::new(data);
    let (seed, nonce, sid) = (r.array(), r.array(), r.array());
    let mut h = Harness {
        seed,
        nonce,
        sid,
        conn_no: 0,
        agreements: 0,
        conn: Conn::Hello,
        client: Client::default(),
        history: Vec::new(),
        report: Report::default(),
    };
    for _ in 0..MAX_OPS {
        if r.is_empty() || h.agreements > MAX_KEY_AGREEMENTS {
            break;
        }
        match r.u8() % 8 {
            1 => {
                let (t, seq, len) = (r.u8(), r.u32(), usize::from(r.u16() % 482));
                h.feed(&raw_frame(t, seq, &r.vec(len)));
            }
            2 => {
                let (f, hello, key) = hello(&mut r);
                h.client = Client { hello: Some((hello, key)), ..Client::default() };
                h.feed(&f);
            }
            3 => {
                let (psel, flags) = (usize::from(r.u8() % 4), r.u8());
                let (dev, pub_c) =
                    h.client.hello.as_ref().map_or(([0; 6], [0; 32]), |(x, _)| (x.device_id, x.pub_c));
                let psk = if psel == 0 { psk_of(&dev).unwrap_or(DEVICES[0].1) } else { DEVICES[psel - 1].1 };
                let ch = h.client.challenge.clone().unwrap_or_else(|| vec![0; 76]);
                let mut proof =
                    hmac_oracle(psk, &[&[0xCD, 0xAB, 0x02, 0x03], &ch[12..44], &dev, &pub_c, &ch[44..76]]);
                if flags & 1 != 0 {
                    proof[usize::from(flags >> 3) % 32] ^= 1 << ((flags >> 1) & 3);
                }
                let seq = if flags & 0x80 != 0 { r.u32() } else { 2 };
                h.feed(&raw_frame(3, seq, &proof));
            }
            4 => {
                if !h.history.is_empty() {
                    let f = h.history[usize::from(r.u8()) % h.history.len()].clone();
                    h.feed(&f);
                }
            }
            5 => h.fail(),
            6 => {
                let len = usize::from(r.u16()) % 1900;
                h.exchange(len)
            }
            _ => {
                let len = usize::from(r.u16() % 512);
                h.feed(r.bytes(len));
            }
        }
    }
    h.report
}
