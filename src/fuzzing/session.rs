//! `session`: an established [`Session`] fed arbitrary frames, correctly sealed frames of any
//! type, seq and fragment pattern, and its own sends, checked step by step against an
//! independent model of PROTOCOL.md §4–§6 (sequence rules, replay window, reassembly, flood
//! guard, REKEY, BYE, spent sequence space).
//!
//! Input: `mode(1) ‖ [session_id(16) ‖ k_c2s(32) ‖ k_s2c(32) if mode bit 2] ‖ tx_seq(4) ‖
//! rx_seq(4) ‖ ops…`. Mode bit 0: UDP (else TCP); bit 1: the session under test is the client
//! (else the gateway); bit 2: keys from the input (how the reference package's frames replay;
//! else fixed keys); bit 3: frames reach `Session::open` without the `decode_exact` gate.
//! Ops, by first byte mod 10: 0 raw bytes (`len u16 mod 512 ‖ bytes`); 1 a frame sealed by the
//! peer (`type ‖ seq mode ‖ len u16 ‖ flags ‖ bytes`, see [`Harness::sealed`]); 2 a message
//! of the peer (`len u16 ‖ pattern`: drop, duplicate, swap fragments, PING inside); 3 replay
//! one of the last 8 frames; 4 time passes (`ms u16`); 5 the session sends a message
//! (`len u16`); 6 … a PING; 7 … a REKEY (`salt(32)`); 8 … a BYE; 9 the peer's REKEY (`salt`).
//!
//! Invariants: every received frame's outcome (message with its exact bytes, fragment,
//! PING, PONG, BYE, REKEY, or the error kind) is the model's; errors are fail-fast (TCP:
//! close; UDP: drop, or close for the events that end a session) and never local misuse while
//! open; a UDP retransmission is recognised exactly when it is authentic and already seen;
//! sent frames open with the model's keys at consecutive seqs and no (key, seq) is used twice.

use core::time::Duration;
use std::collections::HashSet;

use super::{open_oracle, seal_oracle, Input, Report};
use crate::proto::crypto::derive_rekey_keys;
use crate::proto::error::{ErrorKind, Fault, Reaction, Transport};
use crate::proto::frame::Frame;
use crate::proto::handshake::{Established, Role};
use crate::proto::session::{frames_for, Received, Session, MAX_SEALED_MESSAGE_LEN};

const MAX_OPS: usize = 48;

/// What the model expects of one received frame.
#[derive(Debug, PartialEq, Eq)]
enum Exp {
    Err(ErrorKind),
    Msg(Vec<u8>),
    Frag,
    Ping,
    Pong,
    Bye,
    Rekeyed,
}

#[derive(Default, Clone, Copy)]
struct Flood(Option<Duration>, u32);

impl Flood {
    fn hit(&mut self, now: Duration) -> bool {
        if self.0.is_none_or(|s| now.saturating_sub(s) > Duration::from_secs(1)) {
            *self = Flood(Some(now), 0);
        }
        self.1 += 1;
        self.1 <= 8
    }
}

/// The model: the victim's keys, counters and receive state.
#[derive(Clone)]
struct Model {
    udp: bool,
    closed: bool,
    sid: [u8; 16],
    tx: [u8; 32],
    rx: [u8; 32],
    stale_rx: [u8; 32],
    /// The receive key from before the last REKEY with its sequence state (UDP: highest seq
    /// and seen seqs; TCP: the next seq, seen unused), kept until a frame under the new key
    /// opens.
    prev: Option<([u8; 32], u32, Vec<u32>)>,
    tx_seq: u32,
    rx_next: u32,
    hi: u32,
    seen: Vec<u32>,
    partial: Option<(Vec<u8>, u32, usize)>,
    rx_flood: Flood,
    tx_flood: Flood,
}

impl Model {
    fn window_ok(&self, seq: u32) -> bool {
        u64::from(seq) + 64 > u64::from(self.hi) && !self.seen.contains(&seq)
    }

    fn mark(&mut self, seq: u32) {
        self.hi = self.hi.max(seq);
        self.seen.push(seq);
        let hi = u64::from(self.hi);
        self.seen.retain(|s| u64::from(*s) + 64 > hi);
    }

    fn expected_seq(&self) -> u32 {
        match (self.udp, self.seen.is_empty()) {
            (false, _) => self.rx_next,
            (true, true) => self.hi,
            (true, false) => self.hi.wrapping_add(1),
        }
    }

    fn install(&mut self, tx: [u8; 32], rx: [u8; 32]) {
        self.stale_rx = self.rx;
        // A message being reassembled may end under the previous key.
        let next = if self.udp { self.hi } else { self.rx_next };
        self.prev = Some((self.rx, next, core::mem::take(&mut self.seen)));
        // UDP senders go on with their sequence numbers (PROTOCOL.md §4 windows accept it).
        let tx_seq = if self.udp { self.tx_seq } else { 0 };
        (self.tx, self.rx, self.tx_seq, self.rx_next, self.hi) = (tx, rx, tx_seq, 0, 0);
        self.seen.clear();
    }

    fn prev_window_ok(&self, seq: u32) -> bool {
        self.prev.as_ref().is_some_and(|(_, hi, seen)| match self.udp {
            true => u64::from(seq) + 64 > u64::from(*hi) && !seen.contains(&seq),
            false => seq == *hi,
        })
    }

    /// After a REKEY: the current key first, then the previous one (its own window or, on
    /// TCP, its own next seq).
    fn open_either(&mut self, f: &[u8], seq: u32) -> Result<(Vec<u8>, bool), Exp> {
        let in_order = if self.udp { self.window_ok(seq) } else { seq == self.rx_next };
        let cur = if in_order {
            open_oracle(&self.rx, &self.sid, f).ok_or(Exp::Err(ErrorKind::Crypto))
        } else {
            Err(Exp::Err(ErrorKind::Sequence))
        };
        match cur {
            Ok(pt) => {
                self.prev = None;
                Ok((pt, false))
            }
            Err(e) => {
                if !self.prev_window_ok(seq) {
                    return Err(Exp::Err(ErrorKind::Sequence));
                }
                let udp = self.udp;
                let Some((key, hi, seen)) = self.prev.as_mut() else { return Err(e) };
                let pt = open_oracle(key, &self.sid, f).ok_or(e)?;
                if f[3] == 0x0B {
                    // Crossed our own REKEY: the session is over, nothing recorded.
                    self.closed = true;
                    return Err(Exp::Err(ErrorKind::Sequence));
                }
                if !udp {
                    *hi = seq.wrapping_add(1);
                    return Ok((pt, true));
                }
                *hi = (*hi).max(seq);
                seen.push(seq);
                let h = u64::from(*hi);
                seen.retain(|s| u64::from(*s) + 64 > h);
                Ok((pt, true))
            }
        }
    }

    /// Whether `f` is an authentic copy of a frame already accepted (PROTOCOL.md §7 re-ACK).
    fn is_duplicate(&self, f: &[u8], seq: u32) -> bool {
        if !self.window_ok(seq) && open_oracle(&self.rx, &self.sid, f).is_some() {
            return true;
        }
        match &self.prev {
            Some((key, _, _)) => !self.prev_window_ok(seq) && open_oracle(key, &self.sid, f).is_some(),
            None => false,
        }
    }

    fn continuity(&mut self, seq: u32) -> Result<(), Exp> {
        if self.partial.as_ref().is_some_and(|p| p.1 != seq) {
            self.partial = None;
            return Err(Exp::Err(ErrorKind::Sequence));
        }
        Ok(())
    }

    fn control(&mut self) -> Result<(), Exp> {
        if self.partial.take().is_some() {
            return Err(Exp::Err(ErrorKind::Sequence));
        }
        Ok(())
    }

    /// PROTOCOL.md §4–§6 for one received frame, in `Session::open`'s documented order.
    fn receive(&mut self, f: &[u8], now: Duration) -> Exp {
        self.receive_inner(f, now).unwrap_or_else(|e| e)
    }

    fn receive_inner(&mut self, f: &[u8], now: Duration) -> Result<Exp, Exp> {
        use ErrorKind::*;
        let err = |k| Err(Exp::Err(k));
        if self.closed {
            return err(NotConnected);
        }
        if f.len() < 12 {
            return err(Frame);
        }
        let len = usize::from(u16::from_le_bytes([f[8], f[9]]));
        match () {
            _ if f[..2] != [0xCD, 0xAB] => return err(Magic),
            _ if f[2] != 2 => return err(Version),
            _ if len > 480 => return err(Payload),
            _ if f.len() != 12 + len => return err(Frame),
            _ if !matches!(f[3], 5..=9 | 0x0B) => return err(Frame),
            _ => {}
        }
        let seq = u32::from_le_bytes([f[4], f[5], f[6], f[7]]);
        let (pt, under_prev) = if self.prev.is_some() {
            self.open_either(f, seq)?
        } else {
            if (!self.udp && seq != self.rx_next) || (self.udp && !self.window_ok(seq)) {
                return err(Sequence);
            }
            (open_oracle(&self.rx, &self.sid, f).ok_or(Exp::Err(Crypto))?, false)
        };
        if seq == u32::MAX {
            self.closed = true;
            return err(Sequence);
        }
        if under_prev {
            // the previous key's state moved instead
        } else if !self.udp {
            self.rx_next = seq + 1;
        } else {
            self.mark(seq);
        }
        Ok(match f[3] {
            8 => {
                self.closed = true;
                Exp::Bye
            }
            6 | 7 => {
                self.control()?;
                if !self.rx_flood.hit(now) {
                    self.closed = true;
                    return err(ConnectionClosed);
                }
                if f[3] == 6 {
                    Exp::Ping
                } else {
                    Exp::Pong
                }
            }
            0x0B => {
                self.control()?;
                if !self.rx_flood.hit(now) {
                    self.closed = true;
                    return err(ConnectionClosed);
                }
                let salt: [u8; 32] = pt.try_into().map_err(|_| Exp::Err(Payload))?;
                let (init_tx, init_rx) = derive_rekey_keys(&self.rx, &self.tx, &self.sid, &salt);
                self.install(init_rx, init_tx);
                Exp::Rekeyed
            }
            9 => {
                self.continuity(seq)?;
                let (mut buf, frames) = self.partial.take().map_or((Vec::new(), 0), |p| (p.0, p.2));
                if frames + 1 >= 4 {
                    return err(Payload);
                }
                buf.extend_from_slice(&pt);
                self.partial = Some((buf, seq.wrapping_add(1), frames + 1));
                Exp::Frag
            }
            _ => {
                self.continuity(seq)?;
                let mut msg = self.partial.take().map_or(Vec::new(), |p| p.0);
                msg.extend_from_slice(&pt);
                Exp::Msg(msg)
            }
        })
    }
}

struct Harness {
    init: (Established, Transport, u32, u32),
    victim: Session,
    model: Model,
    initial: Model,
    gate: bool,
    now: Duration,
    history: Vec<Vec<u8>>,
    nonces: HashSet<([u8; 32], u32)>,
    report: Report,
}

fn check_error(e: &crate::proto::Error, t: Transport, closed: bool) {
    if closed {
        assert_eq!(e.fault(), Fault::LocalMisuse);
        return;
    }
    assert_ne!(e.fault(), Fault::LocalMisuse, "a received frame caused a local-misuse error: {e}");
    let want = match (t, e.fault()) {
        (Transport::Udp, f) if f != Fault::PeerLeft => Reaction::Drop,
        _ => Reaction::Close,
    };
    assert_eq!(e.reaction(t), want);
}

impl Harness {
    fn reset(&mut self) {
        let (est, t, tx, rx) = &self.init;
        self.victim = Session::with_sequences(est, *t, *tx, *rx);
        self.model = self.initial.clone();
        self.nonces.clear();
    }

    /// A frame the session sent: it opens with the model's tx key at the model's seq.
    fn check_sent(&mut self, f: &[u8], ptype: u8) -> Vec<u8> {
        let fr = Frame::decode_exact(f).expect("a sent frame decodes");
        assert_eq!((fr.packet_type() as u8, fr.seq()), (ptype, self.model.tx_seq), "sent type or seq");
        assert!(self.nonces.insert((self.model.tx, fr.seq())), "GCM nonce reused");
        self.model.tx_seq = self.model.tx_seq.saturating_add(1);
        open_oracle(&self.model.tx, &self.model.sid, f).expect("a sent frame opens with the tx key")
    }

    fn feed(&mut self, f: &[u8]) {
        if self.history.len() == 8 {
            self.history.remove(0);
        }
        self.history.push(f.to_vec());
        let transport = self.victim.transport();
        if self.gate && Frame::decode_exact(f).is_err() {
            self.report.errors += 1;
            if transport == Transport::Tcp {
                self.reset();
            }
            return;
        }
        let (closed, now) = (self.model.closed, self.now);
        let want = self.model.receive(f, now);
        let mut buf = f.to_vec();
        let (ok, ping) = match (self.victim.open(&mut buf, now), &want) {
            (Ok(Received::Message(m)), Exp::Msg(w)) => {
                assert_eq!(m, &w[..], "delivered message differs from the model's");
                self.report.messages += 1;
                (true, false)
            }
            (Ok(Received::Fragment), Exp::Frag)
            | (Ok(Received::Pong), Exp::Pong)
            | (Ok(Received::Bye), Exp::Bye)
            | (Ok(Received::Rekeyed), Exp::Rekeyed) => (true, false),
            (Ok(Received::Ping), Exp::Ping) => (true, true),
            (Err(e), Exp::Err(k)) if e.kind() == *k => {
                check_error(&e, transport, closed);
                (false, false)
            }
            (got, _) => panic!("session says {got:?}, the model {want:?}"),
        };
        assert_eq!(self.victim.is_closed(), self.model.closed, "closed flag differs from the model's");
        if ok {
            self.report.frames += 1;
        } else {
            self.report.errors += 1;
        }
        if transport == Transport::Udp && want == Exp::Err(ErrorKind::Sequence) && !closed {
            // `want` is a sequence error, so the header is sound; the window is as it is now.
            let seq = u32::from_le_bytes([f[4], f[5], f[6], f[7]]);
            let dup = self.model.is_duplicate(f, seq);
            assert_eq!(self.victim.verify_duplicate(&mut f.to_vec()), dup, "retransmission check wrong");
        }
        if ping {
            let mut out = [0u8; 64];
            let m = &mut self.model;
            let want = !m.closed && m.tx_seq != u32::MAX && m.tx_flood.hit(now);
            match self.victim.seal_pong(now, &mut out) {
                Some(n) => {
                    assert!(want, "PONG beyond the budget");
                    assert!(self.check_sent(&out[..n], 7).is_empty());
                }
                None => assert!(!want, "PING left unanswered within the budget"),
            }
        }
        let ends = match &want {
            Exp::Bye => true,
            Exp::Err(_) if !ok => transport == Transport::Tcp || self.model.closed,
            _ => false,
        };
        if ends {
            self.reset();
        }
        self.check_state();
    }

    fn check_state(&self) {
        let m = &self.model;
        assert_eq!((self.victim.tx_seq(), self.victim.is_closed()), (m.tx_seq, m.closed), "tx state");
        assert_eq!((self.victim.tx_key_bytes(), self.victim.rx_key_bytes()), (&m.tx, &m.rx), "keys");
    }

    /// Op 1: `type sel ‖ seq mode ‖ len u16 ‖ flags ‖ plaintext`. Type: mod 8 picks DATA, PING,
    /// PONG, BYE, DATA_FRAG, REKEY, a byte from the input, or DATA. Seq mode mod 4: the next
    /// expected, any u32, next + i8, u32::MAX. Flags: bit 0 wrong nonce prefix, 1 corrupt tag,
    /// 2 the key before the last REKEY, 3 a wrong session id, 4 32-byte plaintext.
    fn sealed(&mut self, r: &mut Input<'_>) {
        let t = match r.u8() % 8 {
            x @ 0..=5 => [5, 6, 7, 8, 9, 0x0B][usize::from(x)],
            6 => r.u8(),
            _ => 5,
        };
        let exp = self.model.expected_seq();
        let seq = match r.u8() % 4 {
            0 => exp,
            1 => r.u32(),
            2 => exp.wrapping_add(r.u8() as i8 as u32),
            _ => u32::MAX,
        };
        let (len, flags) = (usize::from(r.u16()) % 453, r.u8());
        let pt = r.vec(if flags & 16 != 0 { 32 } else { len });
        let key = if flags & 4 != 0 { self.model.stale_rx } else { self.model.rx };
        let mut sid = self.model.sid;
        sid[0] ^= (flags >> 3) & 1;
        self.feed(&seal_oracle(&key, &sid, t, seq, &pt, flags & 1 != 0, flags & 2 != 0));
    }

    /// Op 2: a message of the peer, fragmented on consecutive seqs, with the pattern's bits
    /// 0 drop, 1 duplicate, 2 swap (at fragment `pattern >> 4`), 3 a PING after the first.
    fn message(&mut self, len: usize, pattern: u8) {
        let m = &self.model;
        let msg: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ pattern).collect();
        let n = frames_for(len);
        let mut seq = m.expected_seq();
        let mut frames = Vec::new();
        for i in 0..n {
            let t = if i + 1 < n { 9 } else { 5 };
            let chunk = &msg[(i * 452).min(len)..((i + 1) * 452).min(len)];
            frames.push(seal_oracle(&m.rx, &m.sid, t, seq, chunk, false, false));
            seq = seq.wrapping_add(1);
            if i == 0 && pattern & 8 != 0 {
                frames.push(seal_oracle(&m.rx, &m.sid, 6, seq, &[], false, false));
                seq = seq.wrapping_add(1);
            }
        }
        let k = usize::from(pattern >> 4) % frames.len();
        if pattern & 1 != 0 {
            frames.remove(k);
        } else if pattern & 2 != 0 {
            frames.insert(k, frames[k].clone());
        } else if pattern & 4 != 0 && k + 1 < frames.len() {
            frames.swap(k, k + 1);
        }
        for f in frames {
            self.feed(&f);
        }
    }

    /// Ops 5–8: the session under test sends; the model says whether it may.
    fn send(&mut self, op: u8, r: &mut Input<'_>) {
        let mut out = vec![0u8; MAX_SEALED_MESSAGE_LEN];
        let (m, now) = (&mut self.model, self.now);
        match op {
            5 => {
                let len = usize::from(r.u16()) % 1900;
                let msg: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5A).collect();
                let want = match () {
                    _ if len > 1808 => Err(ErrorKind::Payload),
                    _ if m.closed => Err(ErrorKind::NotConnected),
                    _ if u64::from(m.tx_seq) + frames_for(len) as u64 > u64::from(u32::MAX) => {
                        Err(ErrorKind::Sequence)
                    }
                    _ => Ok(()),
                };
                match self.victim.seal_message(&msg, &mut out) {
                    Err(e) => assert_eq!(Err(e.kind()), want, "seal_message refused wrongly"),
                    Ok(n) => {
                        assert_eq!(want, Ok(()), "seal_message accepted a message it must refuse");
                        let (mut at, mut got) = (0, Vec::new());
                        for i in 0..frames_for(len) {
                            let flen = 12 + usize::from(u16::from_le_bytes([out[at + 8], out[at + 9]]));
                            let t = if i + 1 < frames_for(len) { 9 } else { 5 };
                            got.extend(self.check_sent(&out[at..at + flen], t));
                            at += flen;
                        }
                        assert_eq!((at, got), (n, msg), "sealed message differs");
                    }
                }
            }
            6 => {
                let mut probe = m.tx_flood;
                let want = match () {
                    _ if m.closed => Err(ErrorKind::NotConnected),
                    _ if m.tx_seq == u32::MAX || !probe.hit(now) => Err(ErrorKind::Sequence),
                    _ => {
                        m.tx_flood = probe;
                        Ok(())
                    }
                };
                match self.victim.seal_ping(now, &mut out) {
                    Ok(n) => assert!(want.is_ok() && self.check_sent(&out[..n], 6).is_empty()),
                    Err(e) => assert_eq!(Err(e.kind()), want, "seal_ping"),
                }
            }
            7 => {
                let salt = r.array::<32>();
                let want = match () {
                    _ if m.closed => Err(ErrorKind::NotConnected),
                    _ if m.tx_seq == u32::MAX => Err(ErrorKind::Sequence),
                    _ => Ok(()),
                };
                match self.victim.seal_rekey(&salt, &mut out) {
                    Ok(n) => {
                        assert_eq!(want, Ok(()));
                        assert_eq!(self.check_sent(&out[..n], 0x0B), salt, "REKEY salt");
                        let m = &mut self.model;
                        let (tx, rx) = derive_rekey_keys(&m.tx, &m.rx, &m.sid, &salt);
                        m.install(tx, rx);
                    }
                    Err(e) => assert_eq!(Err(e.kind()), want, "seal_rekey"),
                }
            }
            _ => match self.victim.seal_bye(&mut out) {
                Ok(n) => {
                    assert!(!self.model.closed && self.check_sent(&out[..n], 8).is_empty());
                    self.model.closed = true;
                }
                Err(e) => assert!(self.model.closed && e.kind() == ErrorKind::NotConnected),
            },
        }
        self.check_state();
    }
}

/// Fuzz entry point: see the module documentation for the input format and invariants.
pub fn session(data: &[u8]) -> Report {
    let mut r = Input::new(data);
    let mode = r.u8();
    let transport = if mode & 1 != 0 { Transport::Udp } else { Transport::Tcp };
    let (sid, c2s, s2c) =
        if mode & 4 != 0 { (r.array(), r.array(), r.array()) } else { ([4; 16], [5; 32], [6; 32]) };
    let (tx_seq, rx_seq) = (r.u32(), r.u32());
    let (role, tx, rx) = if mode & 2 != 0 { (Role::Client, c2s, s2c) } else { (Role::Server, s2c, c2s) };
    let est = Established { role, device_id: [1; 6], session_id: sid, tx_key: tx, rx_key: rx };
    let mut model = Model {
        udp: transport == Transport::Udp,
        closed: false,
        sid,
        tx,
        rx,
        stale_rx: rx,
        prev: None,
        tx_seq,
        rx_next: rx_seq,
        hi: 0,
        seen: Vec::new(),
        partial: None,
        rx_flood: Flood::default(),
        tx_flood: Flood::default(),
    };
    if rx_seq > 0 {
        model.mark(rx_seq - 1);
    }
    let mut h = Harness {
        victim: Session::with_sequences(&est, transport, tx_seq, rx_seq),
        init: (est, transport, tx_seq, rx_seq),
        initial: model.clone(),
        model,
        gate: mode & 8 == 0,
        now: Duration::from_secs(100),
        history: Vec::new(),
        nonces: HashSet::new(),
        report: Report::default(),
    };
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 10 {
            1 => h.sealed(&mut r),
            2 => {
                let (len, pattern) = (usize::from(r.u16()) % 1900, r.u8());
                h.message(len, pattern);
            }
            3 => {
                if !h.history.is_empty() {
                    let f = h.history[usize::from(r.u8()) % h.history.len()].clone();
                    h.feed(&f);
                }
            }
            4 => h.now += Duration::from_millis(u64::from(r.u16())),
            op @ 5..=8 => h.send(op, &mut r),
            9 => {
                let (m, salt) = (&h.model, r.array::<32>());
                let f = seal_oracle(&m.rx, &m.sid, 0x0B, m.expected_seq(), &salt, false, false);
                h.feed(&f);
            }
            _ => {
                let len = usize::from(r.u16() % 512);
                let f = r.bytes(len);
                h.feed(f);
            }
        }
    }
    h.report
}
