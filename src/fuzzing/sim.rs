//! A sans-IO model of one shard's UDP side, composed from the `proto` pieces the way
//! `gateway::udp` and `rt::udp` compose them: stateless cookie path (source limiter, cookie jar
//! keyed by address, device, pub_C and 30 s bucket), per-address handshake state created only
//! for a valid cookie, handshake frames and session frames under the stop-and-wait ARQ,
//! sessions with the replay window and UTACKs MAC'd with the key of the frame's direction, an
//! echoing application, the lockout table and the watchdog; time is simulated.
//!
//! It is stricter than the runtime in three places: HELLO_ACK is acknowledged after it
//! verified and a repeated HELLO_ACK only if it is the one that verified (README: "UTACKs go
//! out only after a frame authenticated"), and a PONG is not queued past the send queue's
//! bound (the runtime queues PONGs outside its send back-pressure, so a peer that pings at
//! the flood guard's rate and acknowledges slowly grows the queue).

use core::net::SocketAddr;
use core::time::Duration;
use std::collections::{BTreeMap, VecDeque};

use super::psk_of;
use crate::proto::arq::{Arq, ArqAction};
use crate::proto::crypto::{EphemeralKey, Psk};
use crate::proto::frame::{encode_frame, Frame, PacketType};
use crate::proto::handshake::{decode_hello, Hello, ServerExpectHelloAck};
use crate::proto::lockout::{LockoutKey, LockoutPolicy, LockoutTable};
use crate::proto::session::{Received, Session, MAX_SEALED_MESSAGE_LEN};
use crate::proto::udp::{encode_utack, is_utack, CookieJar, ExpectedAck, SourceLimiter, MAX_ATTEMPTS};
use crate::proto::Transport;

/// Table sizes and timeouts of a [`UdpSim`]; small by default so that a fuzzer reaches them.
#[derive(Debug, Clone, Copy)]
pub struct SimLimits {
    /// Addresses with state (handshake or session).
    pub max_peers: usize,
    /// Handshakes between cookie and HELLO_ACK.
    pub max_handshakes: usize,
    /// Entries of the cookie path's per-source limiter.
    pub max_sources: usize,
    /// Lockout table entries.
    pub lockout_entries: usize,
    /// Frames a session may have queued for sending.
    pub max_queued: usize,
    /// Bound on steps 2–3 of a handshake.
    pub handshake_timeout: Duration,
    /// Inactivity watchdog of a session.
    pub session_timeout: Duration,
}

impl Default for SimLimits {
    fn default() -> Self {
        SimLimits {
            max_peers: 6,
            max_handshakes: 3,
            max_sources: 8,
            lockout_entries: 8,
            max_queued: 8,
            handshake_timeout: Duration::from_secs(10),
            session_timeout: Duration::from_secs(60),
        }
    }
}

enum Stage {
    Challenge(Box<ServerExpectHelloAck>),
    SessionOk { hello_ack: Vec<u8> },
}

struct Hs {
    cookie: [u8; 16],
    device: [u8; 6],
    started: Duration,
    frame: Vec<u8>,
    arq: Arq,
    stage: Stage,
}

struct Sess {
    session: Session,
    arq: Arq,
    /// Queued frames with the UTACK each expects (MAC key = the key it was sealed with).
    queue: VecDeque<(Vec<u8>, ExpectedAck, [u8; 32])>,
    cur: Option<(Vec<u8>, ExpectedAck, [u8; 32])>,
    hello_ack: Vec<u8>,
    last_rx: Duration,
    ack_loss: Option<Duration>,
}

#[derive(Default)]
struct Peer {
    hs: Option<Hs>,
    sess: Option<Sess>,
}

/// One shard's UDP side, sans IO: datagrams in ([`UdpSim::datagram`]), time in
/// ([`UdpSim::advance`]), datagrams out ([`UdpSim::take_output`]).
pub struct UdpSim {
    limits: SimLimits,
    now: Duration,
    wall: u64,
    cookies: CookieJar,
    limiter: SourceLimiter,
    lockout: LockoutTable,
    peers: BTreeMap<SocketAddr, Peer>,
    handshakes: usize,
    rng: ([u8; 32], u64),
    out: Vec<(SocketAddr, Vec<u8>)>,
    /// Messages delivered to the (echoing) application.
    pub delivered: usize,
    /// Handshakes that reached SESSION_OK.
    pub established: usize,
    /// Cookie HELLOs that reached the cookie jar.
    pub redeem_calls: usize,
}

impl core::fmt::Debug for UdpSim {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UdpSim").field("now", &self.now).field("peers", &self.peers.len()).finish()
    }
}

impl UdpSim {
    /// A shard with cookie secret `secret` whose wall clock reads `wall` Unix seconds at time 0;
    /// its own randomness (keys, nonces, session ids) is derived from `secret`.
    pub fn new(secret: [u8; 32], wall: u64, limits: SimLimits) -> Self {
        UdpSim {
            limits,
            now: Duration::ZERO,
            wall,
            cookies: CookieJar::new(&secret),
            limiter: SourceLimiter::new(10.0, 5.0, 50.0, limits.max_sources),
            lockout: LockoutTable::new(LockoutPolicy {
                max_entries: limits.lockout_entries,
                ..Default::default()
            }),
            peers: BTreeMap::new(),
            handshakes: 0,
            rng: (secret, 0),
            out: Vec::new(),
            delivered: 0,
            established: 0,
            redeem_calls: 0,
        }
    }

    fn random<const N: usize>(&mut self) -> [u8; N] {
        self.rng.1 += 1;
        let d = ring::digest::digest(
            &ring::digest::SHA256,
            &[&self.rng.0[..], &self.rng.1.to_le_bytes()].concat(),
        );
        let mut a = [0u8; N];
        a.copy_from_slice(&d.as_ref()[..N]);
        a
    }

    /// Simulated monotonic time.
    pub fn now(&self) -> Duration {
        self.now
    }
    /// The cookie bucket of the simulated wall clock.
    pub fn bucket(&self) -> u64 {
        CookieJar::bucket(self.wall + self.now.as_secs())
    }
    /// Datagrams sent since the last call.
    pub fn take_output(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        core::mem::take(&mut self.out)
    }
    /// Does `addr` have a handshake in progress (or its SESSION_OK unacknowledged)?
    pub fn has_handshake(&self, addr: SocketAddr) -> bool {
        self.peers.get(&addr).is_some_and(|p| p.hs.is_some())
    }
    /// The receive key of `addr`'s session (the key a UTACK of its frames is MAC'd with) and
    /// its session id.
    pub fn session_keys(&self, addr: SocketAddr) -> Option<([u8; 32], [u8; 16])> {
        self.peers.get(&addr)?.sess.as_ref().map(|s| (*s.session.rx_key_bytes(), *s.session.session_id()))
    }
    /// The wall clock jumps ahead (the cookie buckets follow it; the monotonic time does not).
    pub fn step_wall(&mut self, secs: u64) {
        self.wall += secs;
    }
    /// Type, seq and sealing key of the frame `addr`'s session waits to see acknowledged.
    pub fn outstanding(&self, addr: SocketAddr) -> Option<(u8, u32, [u8; 32])> {
        let (_, e, k) = self.peers.get(&addr)?.sess.as_ref()?.cur.as_ref()?;
        Some((e.ptype, e.seq, *k))
    }
    /// Cookies remembered as used.
    pub fn cookies_used(&self) -> usize {
        self.cookies.used_len()
    }

    /// Memory is bounded and the timers did their work: panics otherwise.
    pub fn check_bounds(&self) {
        let l = &self.limits;
        let in_hs =
            self.peers.values().filter(|p| matches!(p.hs, Some(Hs { stage: Stage::Challenge(_), .. })));
        assert_eq!(in_hs.count(), self.handshakes, "handshake count drifted");
        assert!(self.handshakes <= l.max_handshakes, "too many handshakes");
        assert!(self.peers.len() <= l.max_peers, "peer table over its bound");
        assert!(self.limiter.len() <= l.max_sources, "limiter table over its bound");
        assert!(self.lockout.len() <= l.lockout_entries, "lockout table over its bound");
        for p in self.peers.values() {
            assert!(p.hs.is_some() || p.sess.is_some(), "empty peer entry kept");
            if let Some(Hs { started, stage: Stage::Challenge(_), .. }) = &p.hs {
                assert!(self.now - *started < l.handshake_timeout, "handshake outlived its timeout");
            }
            if let Some(s) = &p.sess {
                assert!(s.queue.len() <= l.max_queued, "send queue over its bound");
                assert!(self.now - s.last_rx < l.session_timeout, "session outlived its watchdog");
            }
        }
    }

    fn emit(&mut self, to: SocketAddr, bytes: &[u8]) {
        self.out.push((to, bytes.to_vec()));
    }

    fn utack(&mut self, to: SocketAddr, ptype: u8, seq: u32, key: Option<&[u8; 32]>, copies: usize) {
        let (b, n) = encode_utack(ptype, seq, key);
        for _ in 0..copies {
            self.emit(to, &b[..n]);
        }
    }

    /// One datagram from `from` (the shard's receive loop, `gateway::udp::on_datagram`).
    pub fn datagram(&mut self, from: SocketAddr, d: &[u8]) {
        let hs_phase = if is_utack(d) { d[2] < 5 } else { d.len() >= 4 && d[3] < 5 && d[3] != 1 };
        let peer = self.peers.get(&from);
        let own_hello = |hs: &Hs| d.len() == 66 && d[3] == 1 && d[50..] == hs.cookie;
        if peer.and_then(|p| p.hs.as_ref()).is_some_and(|hs| hs_phase || own_hello(hs)) {
            return self.hs_datagram(from, d);
        }
        if peer.is_some_and(|p| p.sess.is_some()) && !self.session_datagram(from, d) {
            return;
        }
        self.cookie_path(from, d);
        self.forget_empty(from);
    }

    fn forget_empty(&mut self, addr: SocketAddr) {
        if self.peers.get(&addr).is_some_and(|p| p.hs.is_none() && p.sess.is_none()) {
            self.peers.remove(&addr);
        }
    }

    fn fail(&mut self, from: SocketAddr, device: [u8; 6]) {
        self.lockout.record_failure(LockoutKey::Device(from.ip(), device), self.now);
    }

    fn drop_hs(&mut self, from: SocketAddr) {
        let hs = self.peers.get_mut(&from).and_then(|p| p.hs.take());
        if let Some(Hs { stage: Stage::Challenge(_), device, .. }) = hs {
            self.handshakes -= 1;
            self.fail(from, device);
        }
        self.forget_empty(from);
    }

    fn cookie_path(&mut self, from: SocketAddr, d: &[u8]) {
        let Ok(f) = Frame::decode_exact(d) else { return };
        let Ok(hello) = decode_hello(&f) else { return };
        let (bucket, ip, dev) = (self.bucket(), from.ip(), hello.device_id);
        let Some(cookie) = hello.cookie else {
            if self.limiter.allow(ip, self.now) {
                let c = self.cookies.issue(from, &dev, &hello.pub_c, bucket);
                self.utack(from, 1, hello.seq, None, 1);
                let mut b = [0u8; 28];
                let n = encode_frame(PacketType::HelloRetry, 0, &c, &mut b).expect("cookie frame fits");
                self.emit(from, &b[..n]);
                self.emit(from, &b[..n]);
            }
            return;
        };
        let l = self.limits;
        self.redeem_calls += 1;
        if self.cookies.redeem(from, &dev, &hello.pub_c, &cookie, bucket).is_err()
            || self.lockout.check(&LockoutKey::Ip(ip), self.now).is_some()
            || self.lockout.check(&LockoutKey::Device(ip, dev), self.now).is_some()
            || self.handshakes >= l.max_handshakes
            || (!self.peers.contains_key(&from) && self.peers.len() >= l.max_peers)
        {
            return;
        }
        let Some(psk) = psk_of(&dev) else { return self.fail(from, dev) };
        let key = EphemeralKey::from_seed(&self.random()).expect("any 32 bytes make a key");
        let nonce = self.random();
        let Ok(expect) = ServerExpectHelloAck::new(&hello, &Psk::new(psk).expect("long PSK"), key, nonce)
        else {
            return self.fail(from, dev);
        };
        let mut b = [0u8; 80];
        let n = expect.encode_challenge(&mut b).expect("CHALLENGE fits");
        let mut arq = Arq::default();
        arq.on_send(ExpectedAck::new(2, 0, None), self.now);
        let hs = Hs {
            cookie,
            device: dev,
            started: self.now,
            frame: b[..n].to_vec(),
            arq,
            stage: Stage::Challenge(Box::new(expect)),
        };
        // A handshake replacing one in progress from the same address ends that one.
        if let Some(Hs { stage: Stage::Challenge(_), .. }) =
            self.peers.entry(from).or_default().hs.replace(hs)
        {
            self.handshakes -= 1;
        }
        self.handshakes += 1;
        self.utack(from, 1, hello.seq, None, 1);
        self.emit(from, &b[..n]);
    }

    fn hs_datagram(&mut self, from: SocketAddr, d: &[u8]) {
        let now = self.now;
        let hs = self.peers.get_mut(&from).and_then(|p| p.hs.as_mut()).expect("routed to a handshake");
        if is_utack(d) {
            hs.arq.handle_ack(d, now);
            if matches!(hs.stage, Stage::SessionOk { .. }) && !hs.arq.is_busy() {
                self.peers.get_mut(&from).expect("peer").hs = None;
            }
            return;
        }
        let Ok(f) = Frame::decode_exact(d) else { return };
        let (t, seq) = (f.packet_type(), f.seq());
        match (t, &hs.stage) {
            (PacketType::Hello, _) => self.utack(from, 1, seq, None, 1),
            (PacketType::HelloAck, Stage::SessionOk { hello_ack }) if hello_ack[..] == *d => {
                self.utack(from, 3, seq, None, 1)
            }
            (PacketType::HelloAck, Stage::Challenge(x)) => {
                if x.verify_hello_ack(&f).is_err() {
                    return self.drop_hs(from);
                }
                let sid = self.random();
                let p = self.peers.get_mut(&from).expect("peer");
                let hs = p.hs.as_mut().expect("handshake");
                let stage = core::mem::replace(&mut hs.stage, Stage::SessionOk { hello_ack: d.to_vec() });
                let Stage::Challenge(x) = stage else { unreachable!("matched above") };
                let mut b = [0u8; 64];
                let (est, n) = x.finish(sid, &mut b).expect("SESSION_OK fits");
                (hs.frame, hs.arq) = (b[..n].to_vec(), Arq::default());
                hs.arq.on_send(ExpectedAck::new(4, 0, None), now);
                let device = hs.device;
                p.sess = Some(Sess {
                    session: Session::new(&est, Transport::Udp),
                    arq: Arq::default(),
                    queue: VecDeque::new(),
                    cur: None,
                    hello_ack: d.to_vec(),
                    last_rx: now,
                    ack_loss: None,
                });
                self.handshakes -= 1;
                self.established += 1;
                self.lockout.record_success(&LockoutKey::Device(from.ip(), device));
                self.utack(from, 3, seq, None, 1);
                self.emit(from, &b[..n]);
            }
            _ => {}
        }
    }

    /// A datagram for `from`'s session; true if it is a HELLO (a new handshake: cookie path).
    fn session_datagram(&mut self, from: SocketAddr, d: &[u8]) -> bool {
        let (now, max_queued) = (self.now, self.limits.max_queued);
        let p = self.peers.get_mut(&from).expect("peer");
        let s = p.sess.as_mut().expect("session");
        if is_utack(d) {
            if s.arq.handle_ack(d, now) {
                s.cur = None;
                self.pump(from);
            }
            return false;
        }
        let Ok(f) = Frame::decode_exact(d) else { return false };
        let (t, seq) = (f.packet_type(), f.seq());
        if !t.is_encrypted() {
            if t == PacketType::HelloAck && s.hello_ack[..] == *d {
                self.utack(from, 3, seq, None, 1);
            }
            return t == PacketType::Hello;
        }
        let key = *s.session.rx_key_bytes();
        let copies =
            if s.ack_loss.is_some_and(|t| now.saturating_sub(t) < Duration::from_secs(30)) { 2 } else { 1 };
        let mut buf = d.to_vec();
        let mut echo = None;
        let (mut ack, mut close) = (true, false);
        // (message, PING, BYE) with the borrow of the session over.
        let res = s.session.open(&mut buf, now).map(|r| match r {
            Received::Message(m) => (Some(m.to_vec()), false, false),
            r => (None, r == Received::Ping, r == Received::Bye),
        });
        match res {
            Ok((msg, ping, bye)) => {
                s.last_rx = now;
                if matches!(p.hs, Some(Hs { stage: Stage::SessionOk { .. }, .. })) {
                    p.hs = None; // the device's traffic proves SESSION_OK arrived
                }
                self.delivered += usize::from(msg.is_some());
                echo = msg;
                close = bye;
                // A PING finding the send queue full goes unanswered (see the module docs).
                if ping && s.queue.len() < max_queued {
                    let mut out = [0u8; 64];
                    let (k, seq) = (*s.session.tx_key_bytes(), s.session.tx_seq());
                    if let Some(n) = s.session.seal_pong(now, &mut out) {
                        let e = ExpectedAck::new(7, seq, Some(&k));
                        s.queue.push_back((out[..n].to_vec(), e, k));
                    }
                }
            }
            Err(e)
                if e.kind() == crate::proto::ErrorKind::Sequence
                    && s.session.verify_duplicate(&mut d.to_vec()) =>
            {
                s.ack_loss = Some(now);
            }
            Err(e) => {
                ack = false;
                close = e.reaction(Transport::Udp) == crate::proto::Reaction::Close;
            }
        }
        if ack {
            self.utack(from, t as u8, seq, Some(&key), copies);
        }
        if close {
            self.close_session(from, false);
        } else if let Some(m) = echo {
            self.app_send(from, &m);
        } else {
            self.pump(from);
        }
        false
    }

    fn close_session(&mut self, addr: SocketAddr, bye: bool) {
        let Some(mut s) = self.peers.get_mut(&addr).and_then(|p| p.sess.take()) else { return };
        let mut out = [0u8; 64];
        if let (true, Ok(n)) = (bye, s.session.seal_bye(&mut out)) {
            self.emit(addr, &out[..n]);
        }
        if let Some(p) = self.peers.get_mut(&addr) {
            if matches!(p.hs, Some(Hs { stage: Stage::SessionOk { .. }, .. })) {
                p.hs = None;
            }
        }
        self.forget_empty(addr);
    }

    /// The application sends `msg` to `to`'s session; false if there is none, or its queue
    /// is full (the runtime would make the application wait), or the session refuses.
    pub fn app_send(&mut self, to: SocketAddr, msg: &[u8]) -> bool {
        let max = self.limits.max_queued;
        let Some(s) = self.peers.get_mut(&to).and_then(|p| p.sess.as_mut()) else { return false };
        let mut out = vec![0u8; MAX_SEALED_MESSAGE_LEN];
        if s.queue.len() + msg.len().div_ceil(452).max(1) > max {
            return false;
        }
        let key = *s.session.tx_key_bytes();
        let Ok(n) = s.session.seal_message(msg, &mut out) else { return false };
        let mut at = 0;
        while at < n {
            let f = Frame::decode(&out[at..n]).expect("own frame");
            let e = ExpectedAck::new(f.packet_type() as u8, f.seq(), Some(&key));
            s.queue.push_back((f.as_bytes().to_vec(), e, key));
            at += f.as_bytes().len();
        }
        self.pump(to);
        true
    }

    /// Stop-and-wait: send the next queued frame once nothing is outstanding (`rt::udp::pump`).
    fn pump(&mut self, addr: SocketAddr) {
        let now = self.now;
        let Some(s) = self.peers.get_mut(&addr).and_then(|p| p.sess.as_mut()) else { return };
        if s.arq.is_busy() {
            return;
        }
        if let Some((f, e, k)) = s.queue.pop_front() {
            s.arq.on_send(e, now);
            s.cur = Some((f.clone(), e, k));
            self.emit(addr, &f);
        }
    }

    /// Let `dt` pass, then run every timer that came due (ARQ, handshake timeout, watchdog).
    pub fn advance(&mut self, dt: Duration) {
        self.now += dt;
        let now = self.now;
        let addrs: Vec<SocketAddr> = self.peers.keys().copied().collect();
        for a in addrs {
            let l = self.limits;
            if let Some(hs) = self.peers.get_mut(&a).and_then(|p| p.hs.as_mut()) {
                let challenge = matches!(hs.stage, Stage::Challenge(_));
                match hs.arq.handle_timeout(now) {
                    _ if challenge && now - hs.started >= l.handshake_timeout => self.drop_hs(a),
                    ArqAction::Retransmit(_) => {
                        let f = hs.frame.clone();
                        self.emit(a, &f);
                    }
                    ArqAction::GiveUp if challenge => self.drop_hs(a),
                    ArqAction::GiveUp => self.close_session(a, false),
                    ArqAction::Wait => {}
                }
            }
            let Some(s) = self.peers.get_mut(&a).and_then(|p| p.sess.as_mut()) else { continue };
            if now - s.last_rx >= l.session_timeout {
                self.close_session(a, true);
                continue;
            }
            match s.arq.handle_timeout(now) {
                ArqAction::Retransmit(k) => {
                    let f = s.cur.as_ref().map(|c| c.0.clone()).unwrap_or_default();
                    for _ in 0..if k + 2 >= MAX_ATTEMPTS { 2 } else { 1 } {
                        self.emit(a, &f);
                    }
                }
                ArqAction::GiveUp => self.close_session(a, false),
                ArqAction::Wait => {}
            }
            self.pump(a);
        }
    }
}

/// For the harness: the HELLO a gateway must have seen to create state (parsed back).
pub(crate) fn parse_hello(d: &[u8]) -> Option<Hello> {
    decode_hello(&Frame::decode_exact(d).ok()?).ok()
}
