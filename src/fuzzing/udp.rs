//! `udp_path`: a shard's UDP side ([`UdpSim`]) fed arbitrary datagrams from arbitrary
//! addresses, honest devices' flights, forged UTACKs and sealed frames, on a simulated clock.
//!
//! Input: `wall(2) ‖ ops…` (the wall clock starts `wall` seconds into a cookie bucket
//! sequence). Four device slots have fixed addresses (two ports of one IPv4 address, another
//! IPv4 address, an IPv6 address). Ops, by first byte mod 10: 0 a raw datagram (`from ‖
//! len u16 mod 600 ‖ bytes`; `from` ≥ 0xC0 reads an arbitrary IPv4 address and port); 1 device
//! `slot` starts a handshake (`slot ‖ device ‖ key ‖ flags`: bit 0 wrong PSK); 2 the device
//! handles what it received (answers HELLO_RETRY, CHALLENGE, SESSION_OK, frames, as a device
//! does); 3 it sends a message (`slot ‖ len u16`); 4 it repeats one of its last 4 datagrams
//! (`slot ‖ k`); 5 it sends a frame sealed with its keys (`slot ‖ type ‖ seq u32 ‖ len u16 ‖
//! flags`); 6 a UTACK from it (`slot ‖ mode ‖ type ‖ seq u32`); 7 time passes (`ms u16`, × 64
//! if bit 15); 8 the application sends to the slot (`slot ‖ len u16`); 9 the wall clock jumps
//! ahead (`secs u8`).
//!
//! Invariants, per datagram: answers go only to its sender; without a session, at most twice
//! its size goes back (no amplification); a CHALLENGE (new handshake state) only for a cookie
//! HELLO whose cookie an oracle finds valid for the sender, device, pub_C and the current or
//! previous bucket, and fresh; a HELLO_RETRY only for a HELLO without cookie, carrying the
//! oracle's cookie; a UTACK only for that very frame: HELLO, a HELLO_ACK with the right proof
//! for a CHALLENGE sent, or a session frame that authenticates under the session's key, MAC'd
//! with it; a session's outstanding frame completes only with its exact UTACK; a session
//! appears only with SESSION_OK. After every op: tables within [`SimLimits`], cookies
//! remembered ≤ valid cookies redeemed in its last two buckets, timers fired.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::time::Duration;
use std::collections::BTreeMap;

use super::sim::parse_hello;
use super::{client_public, hmac_oracle, open_oracle, psk_of, raw_frame, seal_oracle, utack_oracle};
use super::{Input, Report, SimLimits, UdpSim, CLIENT_SEEDS, DEVICES};
use crate::proto::crypto::{EphemeralKey, Psk};
use crate::proto::frame::{Frame, PacketType};
use crate::proto::handshake::{ClientExpectSessionOk, ClientHandshake, ClientReply};
use crate::proto::session::{Received, Session, MAX_SEALED_MESSAGE_LEN};
use crate::proto::udp::is_utack;
use crate::proto::Transport;

const MAX_OPS: usize = 64;
/// Handshakes started per input (each costs four X25519 operations); the input ends there.
const MAX_HANDSHAKES: usize = 6;
const SECRET: [u8; 32] = [0x5E; 32];

pub(crate) fn slot_addr(i: usize) -> SocketAddr {
    match i % 4 {
        0 => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 4000),
        1 => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 4001),
        2 => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 4000),
        _ => SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)), 4000),
    }
}

enum State {
    Idle,
    Hello,
    AwaitOk(Box<ClientExpectSessionOk>),
    Up(Box<Session>),
}

/// A device as `Client` and the reference client behave on UDP.
struct Dev {
    device: [u8; 6],
    psk: &'static [u8],
    key: usize,
    cookie: Option<[u8; 16]>,
    state: State,
    sent: Vec<Vec<u8>>,
    inbox: Vec<Vec<u8>>,
}

/// A PSK and the proof input `nonce ‖ device_id ‖ pub_C ‖ pub_S` of a CHALLENGE sent.
type Transcript = (&'static [u8], Vec<u8>);

struct Harness {
    sim: UdpSim,
    devs: Vec<Dev>,
    /// Per address: (psk, proof input after the prefix) of CHALLENGEs sent.
    transcripts: BTreeMap<SocketAddr, Vec<Transcript>>,
    redeemed: Vec<[u8; 16]>,
    valid_cookies: BTreeMap<u64, usize>,
    report: Report,
}

pub(crate) fn cookie_oracle(from: SocketAddr, dev: &[u8; 6], pub_c: &[u8; 32], bucket: u64) -> [u8; 16] {
    let ip = match from.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mac = hmac_oracle(&SECRET, &[&ip, &from.port().to_le_bytes(), &bucket.to_le_bytes(), dev, pub_c]);
    mac[..16].try_into().expect("16 bytes")
}

impl Harness {
    /// Deliver `d` from `from` to the shard and check what it did about it.
    fn deliver(&mut self, from: SocketAddr, d: &[u8]) {
        let (keys, outstanding, bucket) =
            (self.sim.session_keys(from), self.sim.outstanding(from), self.sim.bucket());
        let hello = parse_hello(d);
        let cookie_ok = hello.as_ref().and_then(|h| Some((h.cookie?, h))).is_some_and(|(c, h)| {
            [bucket, bucket.saturating_sub(1)]
                .iter()
                .any(|b| c == cookie_oracle(from, &h.device_id, &h.pub_c, *b))
        });
        let redeems = self.sim.redeem_calls;
        self.sim.datagram(from, d);
        if cookie_ok && self.sim.redeem_calls > redeems {
            *self.valid_cookies.entry(bucket).or_default() += 1;
        }
        let out = self.sim.take_output();
        let sent: usize = out.iter().map(|(_, o)| o.len()).sum();
        assert!(
            keys.is_some() || sent <= 2 * d.len(),
            "{sent} bytes answer {} unauthenticated bytes",
            d.len()
        );
        let mut session_ok = false;
        for (to, o) in &out {
            assert_eq!(*to, from, "answer sent to another address");
            if is_utack(o) {
                self.check_utack(from, d, o, keys);
                continue;
            }
            let f = Frame::decode_exact(o).expect("the shard sends well-formed frames");
            match f.packet_type() {
                PacketType::HelloRetry => {
                    let h = hello
                        .as_ref()
                        .filter(|h| h.cookie.is_none())
                        .expect("HELLO_RETRY for no plain HELLO");
                    assert_eq!(f.payload(), cookie_oracle(from, &h.device_id, &h.pub_c, bucket), "cookie");
                }
                PacketType::Challenge => {
                    let h = hello.as_ref().expect("CHALLENGE without HELLO");
                    let c = h.cookie.expect("CHALLENGE for a HELLO without cookie");
                    assert!(
                        cookie_ok && !self.redeemed.contains(&c),
                        "handshake state without a fresh valid cookie"
                    );
                    self.redeemed.push(c);
                    let psk = psk_of(&h.device_id).expect("CHALLENGE for an unknown device");
                    let p = f.payload();
                    let t = [&p[..32], &h.device_id[..], &h.pub_c[..], &p[32..]].concat();
                    self.transcripts.entry(from).or_default().push((psk, t));
                }
                PacketType::SessionOk => session_ok = true,
                _ => {}
            }
        }
        let keys_now = self.sim.session_keys(from);
        if keys_now.is_some() && keys_now != keys {
            let rekey = out.iter().any(|(_, o)| is_utack(o) && o[2] == 0x0B);
            assert!(session_ok || rekey, "session keys changed without SESSION_OK or REKEY");
        }
        if let Some((t, s, k)) = outstanding.filter(|o| Some(*o) != self.sim.outstanding(from)) {
            if is_utack(d) {
                assert_eq!(
                    d.get(..15),
                    Some(&utack_oracle(t, s, Some(&k))[..]),
                    "ARQ completed by a wrong UTACK"
                );
            }
        }
        self.route(out);
    }

    fn check_utack(&self, from: SocketAddr, d: &[u8], o: &[u8], keys: Option<([u8; 32], [u8; 16])>) {
        let (t, seq) = (o[2], u32::from_le_bytes([o[3], o[4], o[5], o[6]]));
        let f = Frame::decode_exact(d).expect("a UTACK answers a well-formed frame");
        assert_eq!((f.packet_type() as u8, f.seq()), (t, seq), "UTACK names another frame");
        match t {
            1 => assert!(o.len() == 7 && parse_hello(d).is_some(), "UTACK of a malformed HELLO"),
            3 => {
                let ok = self.transcripts.get(&from).is_some_and(|l| {
                    l.iter().any(|(psk, t)| f.payload() == hmac_oracle(psk, &[&[0xCD, 0xAB, 0x02, 0x03], t]))
                });
                assert!(o.len() == 7 && ok, "UTACK of a HELLO_ACK without the right proof");
            }
            5.. => {
                let (k, sid) = keys.expect("session UTACK without a session");
                assert_eq!(o, &utack_oracle(t, seq, Some(&k))[..], "UTACK MAC");
                assert!(open_oracle(&k, &sid, d).is_some(), "UTACK of a frame that does not authenticate");
            }
            _ => panic!("UTACK of type {t}"),
        }
    }

    fn route(&mut self, out: Vec<(SocketAddr, Vec<u8>)>) {
        for (to, o) in out {
            if let Some(dev) = (0..4).find(|i| slot_addr(*i) == to).map(|i| &mut self.devs[i]) {
                if dev.inbox.len() == 16 {
                    dev.inbox.remove(0);
                }
                dev.inbox.push(o);
            }
        }
    }

    fn check(&mut self) {
        self.sim.check_bounds();
        // The jar rotates on valid redemptions: it holds those of the last bucket that had one
        // and of the bucket before.
        let b = self.valid_cookies.keys().next_back().copied().unwrap_or(0);
        let valid: usize = self.valid_cookies.range(b.saturating_sub(1)..=b).map(|(_, n)| n).sum();
        assert!(self.sim.cookies_used() <= valid, "cookie jar remembers more than was redeemed");
        self.valid_cookies.retain(|k, _| *k + 1 >= b);
    }

    fn send(&mut self, slot: usize, d: &[u8]) {
        let dev = &mut self.devs[slot];
        if dev.sent.len() == 4 {
            dev.sent.remove(0);
        }
        dev.sent.push(d.to_vec());
        self.deliver(slot_addr(slot), d);
    }

    /// Op 2: the device answers what it received, as a device does.
    fn step(&mut self, slot: usize) {
        for d in core::mem::take(&mut self.devs[slot].inbox) {
            let Ok(f) = Frame::decode_exact(&d) else { continue };
            let dev = &mut self.devs[slot];
            let (t, seq) = (f.packet_type(), f.seq());
            let mut reply = Vec::new();
            match (t, core::mem::replace(&mut dev.state, State::Idle)) {
                (PacketType::HelloRetry, State::Hello) if dev.cookie.is_none() => {
                    dev.cookie = f.payload().try_into().ok();
                    dev.state = State::Hello;
                    let p = [&dev.device[..], &client_public(dev.key), f.payload()].concat();
                    reply.push(raw_frame(1, 1, &p));
                }
                (PacketType::Challenge, State::Hello) => {
                    let key = EphemeralKey::from_seed(&CLIENT_SEEDS[dev.key]).expect("fixed seed");
                    let mut ch = ClientHandshake::new(dev.device, Psk::new(dev.psk).expect("long PSK"), key);
                    if let Some(c) = dev.cookie {
                        if let Ok(ClientReply::Retry(c)) =
                            ch.handle_reply(&Frame::decode(&raw_frame(10, 0, &c)).expect("frame"))
                        {
                            ch = c;
                        } else {
                            panic!("the client refused its HELLO_RETRY");
                        }
                    }
                    if let Ok(ClientReply::Challenge(c)) = ch.handle_reply(&f) {
                        let mut b = [0u8; 64];
                        let n = c.encode_hello_ack(&mut b).expect("HELLO_ACK fits");
                        reply.extend([utack_oracle(2, seq, None), b[..n].to_vec()]);
                        dev.state = State::AwaitOk(Box::new(c));
                    }
                }
                (PacketType::SessionOk, s) => {
                    reply.push(utack_oracle(4, seq, None));
                    dev.state = match s {
                        State::AwaitOk(c) => c.handle_session_ok(&f).map_or(State::Idle, |est| {
                            State::Up(Box::new(Session::new(&est, Transport::Udp)))
                        }),
                        other => other,
                    };
                }
                (_, State::Up(mut s)) if t.is_encrypted() => {
                    let key = *s.rx_key_bytes();
                    let mut b = d.clone();
                    let ack = match s.open(&mut b, self.sim.now()) {
                        Ok(Received::Ping) => {
                            let mut out = [0u8; 64];
                            if let Some(n) = s.seal_pong(self.sim.now(), &mut out) {
                                reply.push(out[..n].to_vec());
                            }
                            true
                        }
                        Ok(Received::Bye) => false,
                        Ok(_) => true,
                        Err(_) => s.verify_duplicate(&mut d.clone()),
                    };
                    if ack {
                        reply.insert(0, utack_oracle(t as u8, seq, Some(&key)));
                    }
                    if !s.is_closed() {
                        dev.state = State::Up(s);
                    }
                }
                (_, s) => dev.state = s,
            }
            for r in reply {
                self.send(slot, &r);
            }
        }
    }
}

/// Fuzz entry point: see the module documentation for the input format and invariants.
pub fn udp_path(data: &[u8]) -> Report {
    let mut r = Input::new(data);
    let wall = 1_700_000_000 + u64::from(r.u16());
    let dev = |i: usize| Dev {
        device: DEVICES[i % 3].0,
        psk: DEVICES[i % 3].1,
        key: i % 3,
        cookie: None,
        state: State::Idle,
        sent: Vec::new(),
        inbox: Vec::new(),
    };
    let mut h = Harness {
        sim: UdpSim::new(SECRET, wall, SimLimits::default()),
        devs: (0..4).map(dev).collect(),
        transcripts: BTreeMap::new(),
        redeemed: Vec::new(),
        valid_cookies: BTreeMap::new(),
        report: Report::default(),
    };
    for _ in 0..MAX_OPS {
        if r.is_empty() || h.redeemed.len() > MAX_HANDSHAKES {
            break;
        }
        let op = r.u8() % 10;
        let sel = r.u8();
        let slot = usize::from(sel % 4);
        match op {
            0 => {
                let from = if sel >= 0xC0 {
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(r.u32())), r.u16())
                } else {
                    slot_addr(slot)
                };
                let len = usize::from(r.u16()) % 600;
                let d = r.bytes(len);
                h.deliver(from, d);
            }
            1 => {
                let (dsel, ksel, flags) = (usize::from(r.u8() % 4), usize::from(r.u8() % 3), r.u8());
                let d = &mut h.devs[slot];
                d.device = if dsel < 3 { DEVICES[dsel].0 } else { [0xEE; 6] };
                d.psk = DEVICES[(dsel + usize::from(flags & 1)) % 3].1;
                (d.key, d.cookie, d.state) = (ksel, None, State::Hello);
                let hello = raw_frame(1, 0, &[&d.device[..], &client_public(ksel)].concat());
                h.send(slot, &hello);
            }
            2 => h.step(slot),
            3 => {
                let len = usize::from(r.u16()) % 1900;
                if let State::Up(s) = &mut h.devs[slot].state {
                    let mut out = vec![0u8; MAX_SEALED_MESSAGE_LEN];
                    if let Ok(n) = s.seal_message(&vec![0xA5; len], &mut out) {
                        let mut at = 0;
                        while at < n {
                            let l = 12 + usize::from(u16::from_le_bytes([out[at + 8], out[at + 9]]));
                            h.send(slot, &out[at..at + l]);
                            at += l;
                        }
                    }
                }
            }
            4 => {
                let k = usize::from(r.u8());
                let sent = &h.devs[slot].sent;
                if !sent.is_empty() {
                    let d = sent[k % sent.len()].clone();
                    h.send(slot, &d);
                }
            }
            5 => {
                let (t, seq, len, flags) = (r.u8(), r.u32(), usize::from(r.u16()) % 453, r.u8());
                let (key, sid) = match &h.devs[slot].state {
                    State::Up(s) => (*s.tx_key_bytes(), *s.session_id()),
                    _ => ([0; 32], [0; 16]),
                };
                let f = seal_oracle(&key, &sid, t, seq, &r.vec(len), flags & 1 != 0, flags & 2 != 0);
                h.send(slot, &f);
            }
            6 => {
                let (mode, t, seq) = (r.u8() % 4, r.u8(), r.u32());
                let key = match &h.devs[slot].state {
                    State::Up(s) => *s.rx_key_bytes(),
                    _ => [0; 32],
                };
                let u = match (mode, h.sim.outstanding(slot_addr(slot))) {
                    (0, _) => utack_oracle(t, seq, Some(&key)),
                    (1, _) => utack_oracle(t, seq, None),
                    (2, Some((t, s, k))) => utack_oracle(t, s, Some(&k)),
                    _ => [&utack_oracle(t, seq, None)[..], &r.vec(8)].concat(),
                };
                h.send(slot, &u);
            }
            7 => {
                let ms = u64::from(r.u16());
                let ms = if ms & 0x8000 != 0 { (ms & 0x7FFF) * 64 } else { ms };
                h.sim.advance(Duration::from_millis(ms));
                let out = h.sim.take_output();
                h.route(out);
            }
            8 => {
                let len = usize::from(r.u16()) % 1900;
                h.sim.app_send(slot_addr(slot), &vec![0x3C; len]);
                let out = h.sim.take_output();
                h.route(out);
            }
            _ => h.sim.step_wall(u64::from(sel)),
        }
        h.check();
    }
    h.report.established = h.sim.established;
    h.report.messages = h.sim.delivered;
    h.report
}
