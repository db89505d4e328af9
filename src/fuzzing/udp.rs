//! `udp_path`: the real UDP endpoint of a shard (`proto::endpoint::Endpoint`) and its shipping
//! sessions (`rt::conn::Conn` driven through `rt::udp`, as the gateway's port drives them) fed
//! arbitrary datagrams from arbitrary addresses, real devices' flights (`proto::device::Device`,
//! then the client's `rt::conn::Conn`), forged UTACKs and sealed frames, on a simulated clock. The glue around the endpoint is as thin as the gateway's: admission
//! from a lockout table and a handshake cap, key lookup, an echoing application.
//!
//! Input: `skew(2) ‖ ops…` (the clock starts `skew` seconds in, so cookie buckets fall
//! anywhere). Four device slots have fixed addresses (two ports of one IPv4 address, another
//! IPv4 address, an IPv6 address). Ops, by first byte mod 10: 0 a raw datagram (`from ‖
//! len u16 mod 600 ‖ bytes`; `from` ≥ 0xC0 reads an arbitrary IPv4 address and port); 1 device
//! `slot` starts a handshake (`slot ‖ device ‖ key ‖ flags`: bit 0 wrong PSK); 2 the device
//! handles what it received; 3 it sends a message (`slot ‖ len u16`); 4 it repeats one of its
//! last 4 datagrams (`slot ‖ k`); 5 it sends a frame sealed with its keys (`slot ‖ type ‖
//! seq u32 ‖ len u16 ‖ flags`); 6 a UTACK from it (`slot ‖ mode ‖ type ‖ seq u32`); 7 time
//! passes (`ms u16`, × 64 if bit 15); 8 the application sends to the slot (`slot ‖ len u16`);
//! 9 the clock jumps `sel` seconds.
//!
//! Invariants, per datagram: answers go only to its sender; without a session, at most twice
//! its size goes back (no amplification); a CHALLENGE (new handshake state) only for a cookie
//! HELLO whose cookie an oracle finds valid for the sender, device, pub_C and the current or
//! previous bucket, and fresh; a HELLO_RETRY only for a HELLO without cookie, carrying the
//! oracle's cookie; a UTACK only for that very frame: HELLO, a HELLO_ACK with the right proof
//! for a CHALLENGE sent, or a session frame that authenticates under a key the session has
//! had, MAC'd with that key; a session's frame in flight completes only with its exact UTACK;
//! a session appears only with SESSION_OK. After every op: the endpoint's own invariants
//! (tables within bounds, handshake timers armed, none outlived its timeout), the lockout
//! table and the sessions' queues within bounds, cookies remembered ≤ valid cookies redeemed
//! in the last two buckets.

use core::cell::{Cell, RefCell};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::time::Duration;
use std::collections::BTreeMap;
use std::rc::Rc;

use super::{hmac_oracle, open_oracle, psk_of, seal_oracle, utack_oracle};
use super::{Input, Report, CLIENT_SEEDS, DEVICES};
use crate::proto::crypto::{EphemeralKey, Psk};
use crate::proto::device::{Device, DeviceEvent};
use crate::proto::endpoint::{DatagramEvent, Endpoint, EndpointConfig, Event, HandshakeFailure, KeyDecision};
use crate::proto::frame::{Frame, PacketType};
use crate::proto::handshake::{decode_hello, Hello};
use crate::proto::lockout::{LockoutKey, LockoutPolicy, LockoutTable};
use crate::proto::session::Session;
use crate::proto::udp::{is_utack, CookieJar};
use crate::proto::Transport;
use crate::rt::conn::{Ack, CloseReason, Conn, Links, MessageHook, Port, OUT_HARD_LIMIT};
use crate::rt::datagram::UdpOut;
use crate::rt::udp::{on_session_datagram, step};

const MAX_OPS: usize = 64;
/// Handshakes started per input (each costs four X25519 operations); the input ends there.
const MAX_HANDSHAKES: usize = 6;
const SECRET: [u8; 32] = [0x5E; 32];
/// Small tables, so that a fuzzer reaches their bounds.
const MAX_PEERS: usize = 6;
const MAX_PENDING: usize = 3;
const LOCKOUT_ENTRIES: usize = 8;
const COOKIE_SOURCES: usize = 8;

pub(crate) fn slot_addr(i: usize) -> SocketAddr {
    match i % 4 {
        0 => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 4000),
        1 => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 4001),
        2 => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 4000),
        _ => SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)), 4000),
    }
}

const GATEWAY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), 9000);

/// A device slot: the real device role, then its session as the client runs it (the shipping
/// `rt::conn::Conn` with its own socket queue, its sender moved as `rt::udp::pump` moves it).
#[derive(Default)]
struct Dev {
    device: Option<Device>,
    session: Option<Rc<Conn>>,
    out: UdpOut,
    sent: Vec<Vec<u8>>,
    inbox: Vec<Vec<u8>>,
}

/// A session's keys (tx, rx) and id.
fn keys(c: &Conn) -> ([u8; 32], [u8; 32], [u8; 16]) {
    let s = c.session();
    (*s.tx_key_bytes(), *s.rx_key_bytes(), *s.session_id())
}

/// A session's receive key and id.
type RxKey = ([u8; 32], [u8; 16]);

/// A PSK and the proof input `nonce ‖ device_id ‖ pub_C ‖ pub_S` of a CHALLENGE sent.
type Transcript = (&'static [u8], Vec<u8>);

/// The gateway's UDP port (`gateway::port::UdpPort`) without its timer task, on the simulated
/// clock: the shipping connections send through it, and the harness moves their senders when
/// time passes (early is harmless: the link sends only what is due).
struct SimPort {
    out: UdpOut,
    now: Cell<Duration>,
    finished: RefCell<Vec<Rc<Conn>>>,
}

impl Port for SimPort {
    fn out(&self) -> &UdpOut {
        &self.out
    }
    fn step(&self, conn: &Conn, t: Duration) -> bool {
        step(conn, &self.out, t)
    }
    fn arm(&self, _: &Conn, _: Duration) {}
    fn finished(&self, conn: Rc<Conn>) {
        self.finished.borrow_mut().push(conn);
    }
    fn now(&self) -> Duration {
        self.now.get()
    }
}

/// The echoing application, delivered inline as the gateway's `--mode echo` is: each message
/// goes back with `try_send`, which refuses past the connection's hard limit.
struct Echo(Rc<Cell<usize>>);

impl MessageHook for Echo {
    fn on_message(&self, conn: &Rc<Conn>, msg: &[u8]) -> Ack {
        self.0.set(self.0.get() + 1);
        let _ = conn.try_send(msg);
        Ack::Now
    }
}

/// One shard's UDP side: the endpoint, the shipping connections (`rt::Conn` and its UDP
/// link host, `rt::udp`) and a glue as thin as `gateway::udp`'s.
struct Shard {
    now: Duration,
    ep: Endpoint<Rc<Conn>>,
    port: Rc<SimPort>,
    links: Rc<Links>,
    lockout: LockoutTable,
    pending: usize,
    out: Vec<(SocketAddr, Vec<u8>)>,
    rng: u64,
    delivered: Rc<Cell<usize>>,
    established: usize,
}

impl Shard {
    fn new(now: Duration, ep: Endpoint<Rc<Conn>>, lockout: LockoutTable) -> Self {
        let port =
            Rc::new(SimPort { out: UdpOut::default(), now: Cell::new(now), finished: RefCell::default() });
        let delivered = Rc::new(Cell::new(0));
        let links = Rc::new(Links {
            hook: Some(Box::new(Echo(delivered.clone()))),
            port: Some(port.clone() as Rc<dyn Port>),
        });
        Shard {
            now,
            ep,
            port,
            links,
            lockout,
            pending: 0,
            out: Vec::new(),
            rng: 0,
            delivered,
            established: 0,
        }
    }

    fn random<const N: usize>(&mut self) -> [u8; N] {
        self.rng += 1;
        let mac = hmac_oracle(&SECRET, &[&self.rng.to_le_bytes()]);
        let mut b = [0u8; N];
        b.copy_from_slice(&mac[..N]);
        b
    }

    fn session(&self, from: SocketAddr) -> Option<&Rc<Conn>> {
        self.ep.session(from)
    }

    /// One datagram (the shard's receive loop); returns whether a valid cookie was redeemed.
    fn datagram(&mut self, from: SocketAddr, d: &[u8]) -> bool {
        let mut redeemed = false;
        match self.ep.handle_datagram(self.now, from, d) {
            DatagramEvent::Done(_) => {}
            DatagramEvent::Session(conn) => {
                on_session_datagram(&conn, &self.port.out, &mut d.to_vec(), from, self.now);
            }
            DatagramEvent::Incoming(inc) => {
                redeemed = true;
                let (ip, dev) = (from.ip(), inc.hello.device_id);
                let locked = self.lockout.check(&LockoutKey::Ip(ip), self.now).is_some()
                    || self.lockout.check(&LockoutKey::Device(ip, dev), self.now).is_some();
                if !locked && self.pending < MAX_PENDING {
                    self.pending += 1;
                    self.ep.accept(self.now, inc);
                }
            }
        }
        self.drive();
        redeemed
    }

    /// Send what the endpoint and the sessions queued, act on events, unregister the sessions
    /// that finished (as `gateway::udp::drive` and `unregister_finished` do).
    fn drive(&mut self) {
        loop {
            while let Some(t) = self.ep.poll_transmit() {
                self.out.push((t.to, t.bytes().to_vec()));
            }
            let Some(ev) = self.ep.poll_event() else { break };
            match ev {
                Event::KeyNeeded { from, device_id } => {
                    let d = match psk_of(&device_id).and_then(|k| Psk::new(k).ok()) {
                        Some(psk) => KeyDecision::Key {
                            psk,
                            key: EphemeralKey::from_seed(&self.random()).expect("any 32 bytes"),
                            nonce: self.random(),
                            session_id: self.random(),
                        },
                        None => KeyDecision::Unregistered,
                    };
                    self.ep.handle_key(self.now, from, d);
                }
                Event::Established { from, est } => {
                    self.pending -= 1;
                    self.established += 1;
                    self.lockout.record_success(&LockoutKey::Device(from.ip(), est.device_id));
                    let conn =
                        Conn::with_links(Session::new(&est, Transport::Udp), from, Some(self.links.clone()));
                    if let Some(old) = self.ep.attach(from, conn) {
                        old.close(CloseReason::Replaced, false);
                    }
                }
                Event::Failed { from, device_id, reason } => {
                    self.pending -= 1;
                    if !matches!(reason, HandshakeFailure::Superseded | HandshakeFailure::Evicted) {
                        self.lockout.record_failure(LockoutKey::Device(from.ip(), device_id), self.now);
                    }
                }
                Event::SessionOkUnacked(conn) => {
                    if conn.stats().frames_in == 0 {
                        conn.close(CloseReason::PeerGone, false);
                    }
                }
            }
        }
        while let Some((d, to, _)) = self.port.out.pop() {
            self.out.push((to, d));
        }
        let finished = core::mem::take(&mut *self.port.finished.borrow_mut());
        for conn in finished {
            self.ep.detach(conn.peer(), |c| Rc::ptr_eq(c, &conn));
        }
    }

    fn sessions(&self) -> Vec<Rc<Conn>> {
        (0..4).filter_map(|i| self.ep.session(slot_addr(i)).cloned()).collect()
    }

    fn advance(&mut self, dt: Duration) {
        self.now += dt;
        self.port.now.set(self.now);
        self.ep.handle_timeout(self.now);
        // The port's timers: every session whose sender has something due.
        for conn in self.sessions() {
            if conn.link.borrow().poll_timeout().is_some_and(|at| at <= self.now) {
                conn.kick();
            }
        }
        self.drive();
    }

    fn check_bounds(&self) {
        self.ep.check_invariants(self.now);
        assert!(self.pending <= MAX_PENDING, "too many handshakes");
        assert_eq!(self.pending, self.ep.handshake_count(), "handshake count drifted");
        assert!(self.lockout.len() <= LOCKOUT_ENTRIES, "lockout table over its bound");
        for conn in self.sessions() {
            let queued = conn.bytes_queued() - conn.bytes_gone();
            assert!(queued <= (OUT_HARD_LIMIT + 2048) as u64, "send queue over its bound");
        }
    }
}

struct Harness {
    shard: Shard,
    devs: Vec<Dev>,
    /// Per address: (psk, proof input after the prefix) of CHALLENGEs sent.
    transcripts: BTreeMap<SocketAddr, Vec<Transcript>>,
    /// Per address: every receive key its gateway session has had (REKEY keeps the old one).
    rx_keys: BTreeMap<SocketAddr, Vec<RxKey>>,
    redeemed: Vec<[u8; 16]>,
    valid_cookies: BTreeMap<u64, usize>,
    started: usize,
}

pub(crate) fn cookie_oracle(from: SocketAddr, dev: &[u8; 6], pub_c: &[u8; 32], bucket: u64) -> [u8; 16] {
    let ip = match from.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mac = hmac_oracle(&SECRET, &[&ip, &from.port().to_le_bytes(), &bucket.to_le_bytes(), dev, pub_c]);
    mac[..16].try_into().expect("16 bytes")
}

pub(crate) fn parse_hello(d: &[u8]) -> Option<Hello> {
    decode_hello(&Frame::decode_exact(d).ok()?).ok()
}

impl Harness {
    fn keys_of(&self, from: SocketAddr) -> Option<RxKey> {
        self.shard.session(from).map(|c| {
            let s = c.session();
            (*s.rx_key_bytes(), *s.session_id())
        })
    }

    fn note_keys(&mut self, from: SocketAddr) {
        if let Some(k) = self.keys_of(from) {
            let l = self.rx_keys.entry(from).or_default();
            if l.last() != Some(&k) {
                l.push(k);
            }
        }
    }

    /// Deliver `d` from `from` to the shard and check what it did about it.
    fn deliver(&mut self, from: SocketAddr, d: &[u8]) {
        let keys = self.keys_of(from);
        let in_flight = self.shard.session(from).and_then(|c| c.link.borrow().in_flight());
        let bucket = CookieJar::bucket(self.shard.now.as_secs());
        let hello = parse_hello(d);
        let cookie_ok = hello.as_ref().and_then(|h| Some((h.cookie?, h))).is_some_and(|(c, h)| {
            [bucket, bucket.saturating_sub(1)]
                .iter()
                .any(|b| c == cookie_oracle(from, &h.device_id, &h.pub_c, *b))
        });
        if self.shard.datagram(from, d) {
            assert!(cookie_ok, "a cookie the oracle does not know was redeemed");
            *self.valid_cookies.entry(bucket).or_default() += 1;
        }
        let out = core::mem::take(&mut self.shard.out);
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
                self.check_utack(from, d, o);
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
        let keys_now = self.keys_of(from);
        if keys_now.is_some() && keys_now != keys {
            let rekey = out.iter().any(|(_, o)| is_utack(o) && o[2] == 0x0B);
            assert!(session_ok || rekey, "session keys changed without SESSION_OK or REKEY");
        }
        self.note_keys(from);
        if let Some(e) = in_flight {
            if is_utack(d) && self.shard.session(from).and_then(|c| c.link.borrow().in_flight()) != Some(e) {
                assert!(e.matches(d), "ARQ completed by a wrong UTACK");
            }
        }
        self.route(out);
    }

    fn check_utack(&self, from: SocketAddr, d: &[u8], o: &[u8]) {
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
                let ok = self.rx_keys.get(&from).is_some_and(|l| {
                    l.iter().any(|(k, sid)| {
                        o == &utack_oracle(t, seq, Some(k))[..] && open_oracle(k, sid, d).is_some()
                    })
                });
                assert!(ok, "UTACK of a frame that does not authenticate under the key it is MAC'd with");
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
        self.shard.check_bounds();
        // The jar rotates on valid redemptions: it holds those of the last bucket that had one
        // and of the bucket before.
        let b = self.valid_cookies.keys().next_back().copied().unwrap_or(0);
        let valid: usize = self.valid_cookies.range(b.saturating_sub(1)..=b).map(|(_, n)| n).sum();
        assert!(self.shard.ep.cookies_used() <= valid, "cookie jar remembers more than was redeemed");
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

    /// Everything the slot's device and session queued, sent (the session's sender moved first,
    /// as the client's pump task does when woken: retransmissions that are due go out too).
    fn flush(&mut self, slot: usize) {
        let mut out = Vec::new();
        let now = self.shard.now;
        let dev = &mut self.devs[slot];
        if let Some(d) = &mut dev.device {
            out.extend(core::iter::from_fn(|| d.poll_transmit()).map(|t| t.bytes().to_vec()));
        }
        if let Some(s) = &dev.session {
            if step(s, &dev.out, now) {
                dev.session = None; // five unacknowledged attempts, or closed and delivered
            }
        }
        out.extend(core::iter::from_fn(|| dev.out.pop()).map(|d| d.0));
        for d in out {
            self.send(slot, &d);
        }
    }

    /// Op 2: the device handles what it received (the real device role, then its session).
    fn step(&mut self, slot: usize) {
        let now = self.shard.now;
        for d in core::mem::take(&mut self.devs[slot].inbox) {
            let dev = &mut self.devs[slot];
            let Some(device) = &mut dev.device else { continue };
            match device.handle_datagram(now, GATEWAY, &d) {
                DeviceEvent::Handled | DeviceEvent::Failed(_) => {}
                DeviceEvent::Established(est) => {
                    dev.session = Some(Conn::new(Session::new(&est, Transport::Udp), GATEWAY));
                }
                DeviceEvent::Session => {
                    if let Some(s) = &dev.session {
                        on_session_datagram(s, &dev.out, &mut d.clone(), GATEWAY, now);
                        while s.try_recv().is_some() {}
                    }
                }
            }
        }
        self.flush(slot);
    }
}

/// Fuzz entry point: see the module documentation for the input format and invariants.
pub fn udp_path(data: &[u8]) -> Report {
    let mut r = Input::new(data);
    let now = Duration::from_secs(1_700_000_000 + u64::from(r.u16()));
    let cfg = EndpointConfig {
        max_peers: MAX_PEERS,
        cookie_sources: COOKIE_SOURCES,
        cookie_global_rate: 50.0,
        known_devices: 8,
        // Small bitmaps fill up, so fresh cookies are sometimes refused as used: inputs reach
        // that path too.
        cookie_filter_bits: 1 << 10,
        ..EndpointConfig::default()
    };
    let mut h = Harness {
        shard: Shard::new(
            now,
            Endpoint::new(cfg, &SECRET),
            LockoutTable::new(LockoutPolicy { max_entries: LOCKOUT_ENTRIES, ..Default::default() }),
        ),
        devs: (0..4).map(|_| Dev::default()).collect(),
        transcripts: BTreeMap::new(),
        rx_keys: BTreeMap::new(),
        redeemed: Vec::new(),
        valid_cookies: BTreeMap::new(),
        started: 0,
    };
    for _ in 0..MAX_OPS {
        if r.is_empty() || h.started > MAX_HANDSHAKES {
            break;
        }
        let op = r.u8() % 10;
        let sel = r.u8();
        let slot = usize::from(sel % 4);
        let now = h.shard.now;
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
                let device = if dsel < 3 { DEVICES[dsel].0 } else { [0xEE; 6] };
                let psk = Psk::new(DEVICES[(dsel + usize::from(flags & 1)) % 3].1).expect("long PSK");
                h.started += 1;
                let dev = &mut h.devs[slot];
                dev.session = None;
                dev.device = EphemeralKey::from_seed(&CLIENT_SEEDS[ksel])
                    .ok()
                    .and_then(|k| Device::new(now, GATEWAY, device, psk, k).ok());
                h.flush(slot);
            }
            2 => h.step(slot),
            3 => {
                let len = usize::from(r.u16()) % 1900;
                if let Some(s) = &h.devs[slot].session {
                    let _ = s.try_send(&vec![0xA5; len]);
                }
                h.flush(slot);
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
                let (key, _, sid) =
                    h.devs[slot].session.as_ref().map_or(([0; 32], [0; 32], [0; 16]), |c| keys(c));
                let f = seal_oracle(&key, &sid, t, seq, &r.vec(len), flags & 1 != 0, flags & 2 != 0);
                h.send(slot, &f);
            }
            6 => {
                let (mode, t, seq) = (r.u8() % 4, r.u8(), r.u32());
                let (_, key, _) =
                    h.devs[slot].session.as_ref().map_or(([0; 32], [0; 32], [0; 16]), |c| keys(c));
                let exact = h.shard.session(slot_addr(slot)).and_then(|c| c.link.borrow().in_flight());
                let u = match (mode, exact) {
                    (0, _) => utack_oracle(t, seq, Some(&key)),
                    (1, _) => utack_oracle(t, seq, None),
                    (2, Some(e)) => {
                        let mut u = utack_oracle(e.ptype, e.seq, None);
                        u.extend(e.mac.unwrap_or_default());
                        u
                    }
                    _ => [&utack_oracle(t, seq, None)[..], &r.vec(8)].concat(),
                };
                h.send(slot, &u);
            }
            7 => {
                let ms = u64::from(r.u16());
                let ms = if ms & 0x8000 != 0 { (ms & 0x7FFF) * 64 } else { ms };
                h.shard.advance(Duration::from_millis(ms));
                let out = core::mem::take(&mut h.shard.out);
                h.route(out);
            }
            8 => {
                let len = usize::from(r.u16()) % 1900;
                if let Some(c) = h.shard.session(slot_addr(slot)) {
                    let _ = c.try_send(&vec![0x3C; len]);
                }
                h.shard.drive();
                let out = core::mem::take(&mut h.shard.out);
                h.route(out);
            }
            _ => {
                h.shard.advance(Duration::from_secs(u64::from(sel)));
                let out = core::mem::take(&mut h.shard.out);
                h.route(out);
            }
        }
        h.check();
    }
    Report { established: h.shard.established, messages: h.shard.delivered.get(), ..Report::default() }
}
