//! The gateway's side of the UDP binding (PROTOCOL.md §7) as one sans-IO endpoint, in the shape
//! of quinn-proto's `Endpoint`: datagrams in ([`Endpoint::handle_datagram`]), datagrams out
//! ([`Endpoint::poll_transmit`]), one deadline ([`Endpoint::poll_timeout`] /
//! [`Endpoint::handle_timeout`]) and events out ([`Endpoint::poll_event`]).
//!
//! It owns the cookie path ([`super::cookie`]: single-use cookies and the limits on who gets
//! one, all in fixed memory), the handshake under the
//! stop-and-wait ARQ (CHALLENGE and SESSION_OK retransmitted, the device's HELLO and HELLO_ACK
//! acknowledged), and the demultiplexing of datagrams by peer address into handshakes and
//! sessions. What a session does with its datagrams is [`super::link`]'s. Policy stays with the
//! caller: a valid cookie HELLO comes out as [`DatagramEvent::Incoming`] for the caller's
//! admission checks (lockout, limits), and the key lookup and the X25519 budget come back in
//! through [`Endpoint::handle_key`], in that order, so an unregistered device never spends
//! the budget.
//!
//! Rules kept on the secure side:
//! - a HELLO_ACK is acknowledged only once its proof verified, and a repeated HELLO_ACK only
//!   if it is the one that verified;
//! - a HELLO_ACK with a wrong proof is dropped and the handshake goes on waiting (an off-path
//!   attacker who spoofs the device's address cannot kill it); the failure is reported only at
//!   the timeout;
//! - the table of addresses with state is bounded ([`EndpointConfig::max_peers`]).

use core::net::SocketAddr;
use core::time::Duration;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use super::arq::{Arq, ArqAction};
use super::cookie::{Admit, CookieError, CookieGate, CookieJar, GateConfig};
use super::crypto::{EphemeralKey, Psk, DEVICE_ID_LEN, HMAC_LEN, NONCE_LEN, SESSION_ID_LEN};
use super::frame::{encode_frame, Frame, PacketType, HEADER_LEN};
use super::handshake::{
    decode_hello, Established, Hello, ServerExpectHelloAck, COOKIE_LEN, HELLO_COOKIE_LEN,
    MAX_HANDSHAKE_FRAME_LEN, SESSION_OK_LEN,
};
use super::udp::{encode_utack, is_utack, ExpectedAck, UTACK_MAX_LEN};

/// Largest datagram the endpoint itself sends (CHALLENGE).
pub const MAX_TRANSMIT_LEN: usize = MAX_HANDSHAKE_FRAME_LEN;
/// Copies of HELLO_RETRY: it travels without ARQ, and a device that loses it waits for a frame
/// that never comes (the reference client does), so it goes out twice; devices drop the copy.
pub const HELLO_RETRY_COPIES: usize = 2;

/// Sizes and timeouts of an [`Endpoint`].
#[derive(Debug, Clone, Copy)]
pub struct EndpointConfig {
    /// Addresses with state (a handshake or a session): the hard bound on the peer table.
    pub max_peers: usize,
    /// Bound on a handshake from its valid cookie to a verified HELLO_ACK.
    pub handshake_timeout: Duration,
    /// Cookie path: HELLOs answered per source (IPv4 address, IPv6 /64) per second.
    pub cookie_rate: f64,
    /// Burst per source.
    pub cookie_burst: f64,
    /// Cookie path: HELLOs answered per second over all sources not remembered as
    /// authenticated (and, separately, over all that are).
    pub cookie_global_rate: f64,
    /// Per-source buckets of the cookie path (a fixed array; 8 bytes each).
    pub cookie_sources: usize,
    /// (source, device) pairs remembered as authenticated (a fixed table; 16 bytes each).
    pub known_devices: usize,
    /// Bits of each of the two used-cookie bitmaps.
    pub cookie_filter_bits: usize,
}

impl EndpointConfig {
    /// The cookie gate's part of the configuration.
    fn gate(&self) -> GateConfig {
        GateConfig {
            rate: self.cookie_rate,
            burst: self.cookie_burst,
            global_rate: self.cookie_global_rate,
            sources: self.cookie_sources,
            known: self.known_devices,
            ..GateConfig::default()
        }
    }
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            max_peers: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            cookie_rate: 5.0,
            cookie_burst: 10.0,
            cookie_global_rate: 50_000.0,
            cookie_sources: 65_536,
            known_devices: 65_536,
            cookie_filter_bits: super::cookie::DEFAULT_FILTER_BITS,
        }
    }
}

/// A datagram for the socket.
#[derive(Clone, Copy)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    buf: [u8; MAX_TRANSMIT_LEN],
    len: u8,
}

impl Transmit {
    pub(crate) fn new(to: SocketAddr, bytes: &[u8]) -> Self {
        let mut buf = [0u8; MAX_TRANSMIT_LEN];
        let len = bytes.len().min(MAX_TRANSMIT_LEN);
        buf[..len].copy_from_slice(&bytes[..len]);
        Transmit { to, buf, len: len as u8 }
    }

    /// The datagram's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl core::fmt::Debug for Transmit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Transmit").field("to", &self.to).field("len", &self.len).finish()
    }
}

/// What became of a datagram the endpoint handled itself (for the caller's counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handled {
    /// A HELLO without cookie: UTACK and HELLO_RETRY sent, no state kept.
    CookieSent,
    /// The same, answered from the budget reserved for a device that authenticated from this
    /// address before (its source's own budget may be spent: a flood from that address).
    CookieSentKnown,
    /// A handshake step (or a re-acknowledged retransmission of one).
    Step,
    /// The cookie path's rate limiter said no.
    RateLimited,
    /// A cookie that was not ours (or too old).
    CookieInvalid,
    /// A cookie used before (a replayed HELLO).
    CookieReplayed,
    /// The peer table is full: no new address gets state.
    PeerTableFull,
    /// Not a USMP frame or UTACK we can use.
    Malformed,
    /// A UTACK that acknowledges nothing outstanding.
    StrayAck,
    /// A HELLO_ACK whose proof did not verify (or that is not the one that did): dropped, the
    /// handshake goes on.
    Unverified,
}

/// What to do with one datagram after [`Endpoint::handle_datagram`].
#[derive(Debug)]
#[non_exhaustive]
pub enum DatagramEvent<H> {
    /// Fully handled here.
    Done(Handled),
    /// A HELLO with a valid, unused cookie asks for a handshake. Run the admission checks
    /// (lockout, limits), then [`Endpoint::accept`] it or drop it.
    Incoming(Incoming),
    /// It belongs to the established session `H`: hand it to the session's link.
    Session(H),
}

/// A new handshake waiting for the caller's admission decision.
#[derive(Debug, Clone, Copy)]
pub struct Incoming {
    /// The peer's address.
    pub from: SocketAddr,
    /// Its HELLO (cookie included).
    pub hello: Hello,
}

/// The caller's answer to [`Event::KeyNeeded`], after its key lookup and (only for a known
/// device) its X25519 budget check.
// Moved once per handshake: the size difference costs nothing worth an allocation.
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum KeyDecision {
    /// The device's key and fresh randomness (ephemeral key, nonce, session id).
    Key {
        /// The device's PSK.
        psk: Psk,
        /// The ephemeral X25519 key for CHALLENGE (from the OS RNG in production).
        key: EphemeralKey,
        /// The CHALLENGE nonce.
        nonce: [u8; NONCE_LEN],
        /// The session id SESSION_OK will carry.
        session_id: [u8; SESSION_ID_LEN],
    },
    /// No key for this device.
    Unregistered,
    /// The shard's handshake computation budget is spent.
    OverBudget,
}

/// Why a handshake ended without a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// No verified HELLO_ACK within the handshake timeout.
    Timeout,
    /// Timed out after at least one HELLO_ACK with a wrong proof (a wrong key, or a spoofer).
    BadProof,
    /// CHALLENGE went unacknowledged five times.
    PeerGone,
    /// The device has no key.
    Unregistered,
    /// The X25519 budget was spent.
    OverBudget,
    /// The key agreement failed (a low-order public key).
    Crypto,
    /// The caller evicted it ([`Endpoint::evict`]).
    Evicted,
    /// A new handshake from the same address took its place.
    Superseded,
}

/// What the endpoint tells its caller.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<H> {
    /// An accepted handshake needs the device's key: look it up, check the X25519 budget, and
    /// answer with [`Endpoint::handle_key`].
    KeyNeeded {
        /// The peer.
        from: SocketAddr,
        /// The device it claims to be.
        device_id: [u8; DEVICE_ID_LEN],
    },
    /// HELLO_ACK verified and SESSION_OK is queued: create the session and [`Endpoint::attach`]
    /// it before handling the next datagram.
    Established {
        /// The peer.
        from: SocketAddr,
        /// Keys and ids.
        est: Established,
    },
    /// An accepted handshake ended without a session.
    Failed {
        /// The peer.
        from: SocketAddr,
        /// The device it claimed to be.
        device_id: [u8; DEVICE_ID_LEN],
        /// Why.
        reason: HandshakeFailure,
    },
    /// SESSION_OK went unacknowledged five times: unless the session has received an
    /// authenticated frame since (which proves it arrived), the device is gone.
    SessionOkUnacked(H),
}

// Lives inside the boxed `Handshake`: a peer table entry stays small whatever the stage.
#[allow(clippy::large_enum_variant)]
enum Stage {
    /// Accepted; the caller is looking up the key.
    AwaitKey,
    /// CHALLENGE sent (under ARQ), waiting for a HELLO_ACK that verifies.
    Challenge {
        expect: ServerExpectHelloAck,
        session_id: [u8; SESSION_ID_LEN],
        frame: [u8; MAX_HANDSHAKE_FRAME_LEN],
    },
    /// SESSION_OK sent (under ARQ); the verified proof is kept to recognise retransmissions.
    SessionOk { proof: [u8; HMAC_LEN], ack_seq: u32, frame: [u8; HEADER_LEN + SESSION_OK_LEN] },
}

struct Handshake {
    hello: Hello,
    deadline: Duration,
    bad_proofs: u32,
    arq: Arq,
    stage: Stage,
}

impl Handshake {
    fn cookie(&self) -> [u8; COOKIE_LEN] {
        self.hello.cookie.unwrap_or_default()
    }

    /// When this handshake must be looked at next.
    fn next_deadline(&self) -> Duration {
        match (self.arq.poll_timeout(), &self.stage) {
            // SESSION_OK is retransmitted for as long as its ARQ allows.
            (Some(t), Stage::SessionOk { .. }) => t,
            (Some(t), _) => t.min(self.deadline),
            (None, _) => self.deadline,
        }
    }
}

struct Peer<H> {
    hs: Option<Box<Handshake>>,
    session: Option<H>,
}

/// One shard's UDP endpoint (gateway role). `H` is the caller's handle for an established
/// session (the gateway's connection).
pub struct Endpoint<H> {
    cfg: EndpointConfig,
    cookies: CookieJar,
    gate: CookieGate,
    peers: HashMap<SocketAddr, Peer<H>>,
    handshakes: usize,
    timers: BinaryHeap<Reverse<(Duration, SocketAddr)>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event<H>>,
}

impl<H> core::fmt::Debug for Endpoint<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Endpoint")
            .field("peers", &self.peers.len())
            .field("handshakes", &self.handshakes)
            .finish()
    }
}

/// The cookie time bucket of a (monotonic) time: cookies are checked by the endpoint that
/// issued them, and devices treat them as opaque, so any clock both sides of the check share
/// will do.
fn bucket(now: Duration) -> u64 {
    CookieJar::bucket(now.as_secs())
}

impl<H: Clone> Endpoint<H> {
    /// An endpoint whose cookies are keyed with the random `secret`.
    pub fn new(cfg: EndpointConfig, secret: &[u8; 32]) -> Self {
        Endpoint {
            cfg,
            cookies: CookieJar::with_filter_bits(secret, cfg.cookie_filter_bits),
            gate: CookieGate::new(cfg.gate(), secret),
            peers: HashMap::new(),
            handshakes: 0,
            timers: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Addresses with state.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Handshakes between a valid cookie and a verified HELLO_ACK.
    pub fn handshake_count(&self) -> usize {
        self.handshakes
    }

    /// Cookies remembered as used.
    pub fn cookies_used(&self) -> usize {
        self.cookies.used_len()
    }

    /// Bytes the cookie path's tables take (used-cookie bitmaps, per-source buckets,
    /// remembered devices): fixed when the endpoint is made, whatever the traffic.
    pub fn cookie_memory_bytes(&self) -> usize {
        self.cookies.memory_bytes() + self.gate.memory_bytes()
    }

    /// The probability that a fresh cookie is refused as used at this moment (the used-cookie
    /// bitmaps' price for fixed memory).
    pub fn cookie_false_refusal(&self) -> f64 {
        self.cookies.false_refusal()
    }

    /// `device` authenticated from `ip` (over TCP, or on another shard): remember the pair, so
    /// that its HELLOs get cookies from the budget a spoofed flood cannot reach. Handshakes
    /// this endpoint verifies are remembered without this call.
    pub fn remember(&mut self, ip: core::net::IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) {
        self.gate.remember(ip, device, now);
    }

    /// Whether `device` is remembered as authenticated from `ip` at `now`.
    pub fn is_known(&self, ip: core::net::IpAddr, device: &[u8; DEVICE_ID_LEN], now: Duration) -> bool {
        self.gate.is_known(ip, device, now)
    }

    /// Every attached session (shutdown closes them).
    pub fn sessions(&self) -> impl Iterator<Item = &H> {
        self.peers.values().filter_map(|p| p.session.as_ref())
    }

    /// Whether `from` has a handshake in progress (any stage).
    pub fn has_handshake(&self, from: SocketAddr) -> bool {
        self.peers.get(&from).is_some_and(|p| p.hs.is_some())
    }

    /// The session attached for `from`, if any.
    pub fn session(&self, from: SocketAddr) -> Option<&H> {
        self.peers.get(&from)?.session.as_ref()
    }

    fn transmit(&mut self, to: SocketAddr, bytes: &[u8]) {
        self.transmits.push_back(Transmit::new(to, bytes));
    }

    fn utack(&mut self, to: SocketAddr, ptype: PacketType, seq: u32) {
        let (b, n) = encode_utack(ptype as u8, seq, None);
        self.transmit(to, &b[..n.min(UTACK_MAX_LEN)]);
    }

    fn schedule(&mut self, from: SocketAddr) {
        if let Some(hs) = self.peers.get(&from).and_then(|p| p.hs.as_ref()) {
            let at = hs.next_deadline();
            self.timers.push(Reverse((at, from)));
        }
    }

    /// Feed one received datagram. Call [`Endpoint::poll_transmit`] and
    /// [`Endpoint::poll_event`] afterwards (or after a batch).
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, d: &[u8]) -> DatagramEvent<H> {
        let (has_hs, session) = match self.peers.get(&from) {
            Some(p) => (p.hs.is_some(), p.session.clone()),
            None => (false, None),
        };
        if is_utack(d) {
            // UTACKs of handshake frames (types 1–4) go to the handshake, the rest to the
            // session. Devices also acknowledge HELLO_RETRY, which left no state: stray.
            if has_hs && d[2] < PacketType::Data as u8 {
                return DatagramEvent::Done(self.hs_ack(now, from, d));
            }
            return match session {
                Some(h) => DatagramEvent::Session(h),
                None => DatagramEvent::Done(Handled::StrayAck),
            };
        }
        if d.len() < HEADER_LEN {
            return DatagramEvent::Done(Handled::Malformed);
        }
        // Session frames are routed on their type byte alone: the session's link decodes them
        // (one CRC per frame).
        let encrypted = PacketType::from_u8(d[3]).is_some_and(|t| t.is_encrypted());
        if encrypted {
            return match session {
                Some(h) => DatagramEvent::Session(h),
                None => DatagramEvent::Done(Handled::Malformed),
            };
        }
        let Ok(frame) = Frame::decode_exact(d) else { return DatagramEvent::Done(Handled::Malformed) };
        match frame.packet_type() {
            PacketType::Hello => {
                // Until HELLO_ACK verified, the cookie HELLO that opened the handshake is a
                // retransmission; after that, a replay for the cookie path to refuse.
                let own = self.peers.get(&from).and_then(|p| p.hs.as_ref()).is_some_and(|hs| {
                    !matches!(hs.stage, Stage::SessionOk { .. })
                        && d.len() == HEADER_LEN + HELLO_COOKIE_LEN
                        && d[HEADER_LEN + HELLO_COOKIE_LEN - COOKIE_LEN..] == hs.cookie()
                });
                if own {
                    // Our UTACK of its cookie HELLO was lost: acknowledge again, nothing more.
                    self.utack(from, PacketType::Hello, frame.seq());
                    return DatagramEvent::Done(Handled::Step);
                }
                self.cookie_path(now, from, &frame)
            }
            PacketType::HelloAck if has_hs => DatagramEvent::Done(self.hs_hello_ack(now, from, &frame)),
            PacketType::HelloAck => DatagramEvent::Done(Handled::Unverified),
            _ => DatagramEvent::Done(Handled::Malformed),
        }
    }

    /// Stateless until proven (PROTOCOL.md §7): HELLO (38 B) → UTACK + HELLO_RETRY; HELLO with
    /// cookie (54 B) → cookie check, peer table bound, then the caller's admission.
    fn cookie_path(&mut self, now: Duration, from: SocketAddr, frame: &Frame<'_>) -> DatagramEvent<H> {
        let Ok(hello) = decode_hello(frame) else { return DatagramEvent::Done(Handled::Malformed) };
        let Some(cookie) = hello.cookie else {
            let Some(admit) = self.gate.allow(from.ip(), &hello.device_id, now) else {
                return DatagramEvent::Done(Handled::RateLimited);
            };
            let c = self.cookies.issue(from, &hello.device_id, &hello.pub_c, bucket(now));
            self.utack(from, PacketType::Hello, hello.seq);
            let mut b = [0u8; HEADER_LEN + COOKIE_LEN];
            if let Ok(n) = encode_frame(PacketType::HelloRetry, 0, &c, &mut b) {
                for _ in 0..HELLO_RETRY_COPIES {
                    self.transmit(from, &b[..n]);
                }
            }
            return DatagramEvent::Done(match admit {
                Admit::Known => Handled::CookieSentKnown,
                Admit::Shared => Handled::CookieSent,
            });
        };
        match self.cookies.redeem(from, &hello.device_id, &hello.pub_c, &cookie, bucket(now)) {
            Ok(()) => {}
            Err(CookieError::Invalid) => return DatagramEvent::Done(Handled::CookieInvalid),
            Err(CookieError::Replayed) => return DatagramEvent::Done(Handled::CookieReplayed),
        }
        if !self.peers.contains_key(&from) && self.peers.len() >= self.cfg.max_peers {
            return DatagramEvent::Done(Handled::PeerTableFull);
        }
        DatagramEvent::Incoming(Incoming { from, hello })
    }

    /// Admit a handshake (the caller's checks passed): state is created, the cookie HELLO is
    /// acknowledged, and [`Event::KeyNeeded`] asks for the key.
    pub fn accept(&mut self, now: Duration, incoming: Incoming) {
        let Incoming { from, hello } = incoming;
        if !self.peers.contains_key(&from) && self.peers.len() >= self.cfg.max_peers {
            return;
        }
        let hs = Box::new(Handshake {
            hello,
            deadline: now + self.cfg.handshake_timeout,
            bad_proofs: 0,
            arq: Arq::default(),
            stage: Stage::AwaitKey,
        });
        let peer = self.peers.entry(from).or_insert(Peer { hs: None, session: None });
        if let Some(old) = peer.hs.replace(hs) {
            self.handshakes -= usize::from(!matches!(old.stage, Stage::SessionOk { .. }));
            if !matches!(old.stage, Stage::SessionOk { .. }) {
                self.events.push_back(Event::Failed {
                    from,
                    device_id: old.hello.device_id,
                    reason: HandshakeFailure::Superseded,
                });
            }
        }
        self.handshakes += 1;
        self.utack(from, PacketType::Hello, hello.seq);
        self.events.push_back(Event::KeyNeeded { from, device_id: hello.device_id });
        self.schedule(from);
    }

    /// Step 2 (PROTOCOL.md §3): with the caller's key decision, send CHALLENGE under ARQ, or
    /// end the handshake. Ignored if the handshake is gone (timed out, evicted) meanwhile.
    pub fn handle_key(&mut self, now: Duration, from: SocketAddr, decision: KeyDecision) {
        let Some(hs) = self.peers.get_mut(&from).and_then(|p| p.hs.as_mut()) else { return };
        if !matches!(hs.stage, Stage::AwaitKey) {
            return;
        }
        let (psk, key, nonce, session_id) = match decision {
            KeyDecision::Key { psk, key, nonce, session_id } => (psk, key, nonce, session_id),
            KeyDecision::Unregistered => return self.fail(from, HandshakeFailure::Unregistered),
            KeyDecision::OverBudget => return self.fail(from, HandshakeFailure::OverBudget),
        };
        let expect = ServerExpectHelloAck::new(&hs.hello, &psk, key, nonce);
        let Ok(expect) = expect else { return self.fail(from, HandshakeFailure::Crypto) };
        let mut frame = [0u8; MAX_HANDSHAKE_FRAME_LEN];
        if expect.encode_challenge(&mut frame).is_err() {
            return self.fail(from, HandshakeFailure::Crypto);
        }
        hs.arq.on_send(ExpectedAck::new(PacketType::Challenge as u8, 0, None), now);
        hs.stage = Stage::Challenge { expect, session_id, frame };
        self.transmit(from, &frame);
        self.schedule(from);
    }

    fn hs_ack(&mut self, now: Duration, from: SocketAddr, d: &[u8]) -> Handled {
        let Some(hs) = self.peers.get_mut(&from).and_then(|p| p.hs.as_mut()) else {
            return Handled::StrayAck;
        };
        if !hs.arq.handle_ack(d, now) {
            return Handled::StrayAck;
        }
        if now >= hs.deadline {
            // SESSION_OK was retransmitted past the handshake's time: the record goes now.
            self.fail(from, HandshakeFailure::Timeout);
        } else {
            self.schedule(from); // the deadline is what is left to wait for
        }
        Handled::Step
    }

    /// Step 3: a HELLO_ACK. Acknowledged only once its proof verified; then SESSION_OK.
    fn hs_hello_ack(&mut self, now: Duration, from: SocketAddr, frame: &Frame<'_>) -> Handled {
        let timeout = self.cfg.handshake_timeout;
        let Some(hs) = self.peers.get_mut(&from).and_then(|p| p.hs.as_mut()) else {
            return Handled::Unverified;
        };
        let seq = frame.seq();
        let verified = match &hs.stage {
            Stage::AwaitKey => return Handled::Unverified,
            Stage::SessionOk { proof, ack_seq, .. } => {
                // A retransmission of the HELLO_ACK that verified (our UTACK was lost).
                let same = frame.payload() == proof.as_slice() && seq == *ack_seq;
                if same {
                    self.utack(from, PacketType::HelloAck, seq);
                    return Handled::Step;
                }
                return Handled::Unverified;
            }
            Stage::Challenge { expect, .. } => expect.verify_hello_ack(frame).is_ok(),
        };
        if !verified {
            hs.bad_proofs = hs.bad_proofs.saturating_add(1);
            return Handled::Unverified;
        }
        let Stage::Challenge { expect, session_id, .. } = core::mem::replace(&mut hs.stage, Stage::AwaitKey)
        else {
            return Handled::Unverified;
        };
        let mut proof = [0u8; HMAC_LEN];
        proof.copy_from_slice(frame.payload());
        let mut ok = [0u8; HEADER_LEN + SESSION_OK_LEN];
        let Ok((est, _)) = expect.finish(session_id, &mut ok) else {
            self.fail(from, HandshakeFailure::Crypto);
            return Handled::Step;
        };
        // The HELLO_ACK proves CHALLENGE arrived; SESSION_OK now waits for its UTACK. The
        // record stays a while to recognise the HELLO_ACK if the device repeats it.
        hs.arq.assume_acked();
        hs.arq.on_send(ExpectedAck::new(PacketType::SessionOk as u8, 0, None), now);
        hs.stage = Stage::SessionOk { proof, ack_seq: seq, frame: ok };
        hs.deadline = now + timeout;
        // The device proved its key from this address: its next HELLOs draw on the budget
        // kept for devices known here.
        let device = hs.hello.device_id;
        self.gate.remember(from.ip(), &device, now);
        self.handshakes -= 1;
        self.utack(from, PacketType::HelloAck, seq);
        // Step 4: the caller attaches the session before SESSION_OK can be answered, so the
        // device's first frames already find it.
        self.events.push_back(Event::Established { from, est });
        self.transmit(from, &ok);
        self.schedule(from);
        Handled::Step
    }

    /// Attach the session created for [`Event::Established`]; returns the session it
    /// replaces (a new handshake from the same address), which the caller closes.
    pub fn attach(&mut self, from: SocketAddr, handle: H) -> Option<H> {
        let peer = self.peers.entry(from).or_insert(Peer { hs: None, session: None });
        peer.session.replace(handle)
    }

    /// The session of `from` ended: forget it if `is_it` recognises the attached handle.
    pub fn detach(&mut self, from: SocketAddr, is_it: impl FnOnce(&H) -> bool) {
        let Some(p) = self.peers.get_mut(&from) else { return };
        if p.session.as_ref().is_some_and(is_it) {
            p.session = None;
        }
        if p.hs.is_none() && p.session.is_none() {
            self.peers.remove(&from);
        }
    }

    /// End the handshake of `from` at once (the caller's evictor, shutdown).
    pub fn evict(&mut self, from: SocketAddr) {
        let pending = self
            .peers
            .get(&from)
            .and_then(|p| p.hs.as_ref())
            .is_some_and(|hs| !matches!(hs.stage, Stage::SessionOk { .. }));
        if pending {
            self.fail(from, HandshakeFailure::Evicted);
        }
    }

    fn fail(&mut self, from: SocketAddr, reason: HandshakeFailure) {
        let Some(p) = self.peers.get_mut(&from) else { return };
        let Some(hs) = p.hs.take() else { return };
        if !matches!(hs.stage, Stage::SessionOk { .. }) {
            self.handshakes -= 1;
            self.events.push_back(Event::Failed { from, device_id: hs.hello.device_id, reason });
        }
        if p.session.is_none() {
            self.peers.remove(&from);
        }
    }

    /// Panic if an internal invariant does not hold at `now` (after [`Endpoint::handle_timeout`]
    /// ran for it): for fuzzers and tests.
    #[doc(hidden)]
    pub fn check_invariants(&self, now: Duration) {
        let pending = self
            .peers
            .values()
            .filter_map(|p| p.hs.as_ref())
            .filter(|hs| !matches!(hs.stage, Stage::SessionOk { .. }));
        assert_eq!(pending.count(), self.handshakes, "handshake count drifted");
        assert!(self.peers.len() <= self.cfg.max_peers, "peer table over its bound");
        for p in self.peers.values() {
            assert!(p.hs.is_some() || p.session.is_some(), "empty peer entry kept");
            if let Some(hs) = &p.hs {
                let sending_ok = matches!(hs.stage, Stage::SessionOk { .. }) && hs.arq.is_busy();
                assert!(sending_ok || now < hs.deadline, "handshake outlived its timeout");
                assert!(
                    self.poll_timeout().is_some_and(|t| t <= hs.next_deadline()),
                    "handshake without a timer"
                );
            }
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the caller.
    pub fn poll_event(&mut self) -> Option<Event<H>> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Advance time: retransmit handshake frames that are due, end handshakes whose time is up.
    pub fn handle_timeout(&mut self, now: Duration) {
        while let Some(&Reverse((at, from))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.hs_timeout(now, from);
        }
    }

    fn hs_timeout(&mut self, now: Duration, from: SocketAddr) {
        let Some(p) = self.peers.get_mut(&from) else { return };
        let Some(hs) = p.hs.as_mut() else { return };
        if hs.next_deadline() > now {
            // A stale timer (the handshake moved on): make sure its real deadline is queued.
            return self.schedule(from);
        }
        // SESSION_OK is retransmitted for as long as its ARQ allows; the rest ends on time.
        let sending_ok = matches!(hs.stage, Stage::SessionOk { .. }) && hs.arq.is_busy();
        if now >= hs.deadline && !sending_ok {
            let reason =
                if hs.bad_proofs > 0 { HandshakeFailure::BadProof } else { HandshakeFailure::Timeout };
            return self.fail(from, reason);
        }
        match hs.arq.handle_timeout(now) {
            ArqAction::Wait => {}
            ArqAction::Retransmit(_) => {
                let frame = match &hs.stage {
                    Stage::Challenge { frame, .. } => Some(Transmit::new(from, frame)),
                    Stage::SessionOk { frame, .. } => Some(Transmit::new(from, frame)),
                    Stage::AwaitKey => None,
                };
                self.transmits.extend(frame);
            }
            ArqAction::GiveUp => {
                if matches!(hs.stage, Stage::SessionOk { .. }) {
                    if let Some(h) = p.session.clone() {
                        self.events.push_back(Event::SessionOkUnacked(h));
                    }
                } else {
                    return self.fail(from, HandshakeFailure::PeerGone);
                }
            }
        }
        self.schedule(from);
    }
}

#[cfg(test)]
#[path = "endpoint_tests.rs"]
mod tests;
