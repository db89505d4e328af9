//! Two UDP peers in memory, in the style of quinn-proto's test `Pair`: the real gateway
//! [`Endpoint`] and the real device role ([`Device`]) with their sessions' links
//! ([`UdpPeer`]), a simulated clock, and a seeded link that loses, duplicates, reorders and
//! delays datagrams. Everything is deterministic for a seed; nothing sleeps.

use core::net::SocketAddr;
use core::time::Duration;

use super::crypto::{EphemeralKey, Psk};
use super::device::{Device, DeviceEvent};
use super::endpoint::{
    DatagramEvent, Endpoint, EndpointConfig, Event, Handled, HandshakeFailure, KeyDecision,
};
use super::peer::UdpPeer;

/// The PSK both sides use unless a test says otherwise.
pub const PAIR_PSK: &[u8] = b"pair-harness-shared-key-32-bytes";
/// The device id of the pair's device.
pub const PAIR_DEVICE: [u8; 6] = [0xD0, 0, 0, 0, 0, 1];

/// How the simulated network treats each datagram.
#[derive(Debug, Clone, Copy)]
pub struct Network {
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability it is delivered twice.
    pub duplicate: f64,
    /// Probability it is held back behind later ones (by up to `jitter` extra).
    pub reorder: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay of a reordered datagram (at most).
    pub jitter: Duration,
}

impl Network {
    /// A clean link with a 10 ms one-way delay.
    pub fn clean() -> Self {
        Network {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
        }
    }

    /// `loss` each way, 5 % duplication, 5 % reordering by up to 30 ms.
    pub fn lossy(loss: f64) -> Self {
        Network {
            loss,
            duplicate: 0.05,
            reorder: 0.05,
            jitter: Duration::from_millis(30),
            ..Network::clean()
        }
    }
}

/// A small seeded generator (xorshift64*): the link's coin flips and the peers' randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A float in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// `N` random bytes.
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        for c in b.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
        b
    }
}

/// A datagram on the wire: when it arrives, whether it goes to the gateway, its source.
#[derive(Debug)]
struct InFlight {
    at: Duration,
    to_gateway: bool,
    from: SocketAddr,
    bytes: Vec<u8>,
}

/// The gateway, one device, and the network between them.
pub struct Pair {
    /// Simulated time.
    pub now: Duration,
    /// The gateway's endpoint (session handles index `sessions`).
    pub gateway: Endpoint<usize>,
    /// The gateway's sessions, by handle.
    pub sessions: Vec<UdpPeer>,
    /// The device's handshake (and router).
    pub device: Option<Device>,
    /// The device's session, once established.
    pub device_session: Option<UdpPeer>,
    /// The device's address.
    pub device_addr: SocketAddr,
    /// The gateway's address.
    pub gateway_addr: SocketAddr,
    /// The key the gateway's lookup returns (`None`: unregistered).
    pub gateway_psk: Option<Psk>,
    /// Handshake failures the gateway reported.
    pub failures: Vec<HandshakeFailure>,
    /// What the gateway's endpoint said about each datagram it handled itself.
    pub handled: Vec<Handled>,
    /// The device's handshake error, if it failed.
    pub device_error: Option<super::Error>,
    /// Every datagram the device sent, in order (for replays).
    pub device_sent: Vec<Vec<u8>>,
    /// Gateway sessions a new handshake from the same address replaced (their handles: the
    /// glue closes them).
    pub replaced: Vec<usize>,
    /// The network model (may be changed between steps).
    pub network: Network,
    wire: Vec<InFlight>,
    rng: Rng,
}

impl core::fmt::Debug for Pair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Pair")
            .field("now", &self.now)
            .field("in_flight", &self.wire.len())
            .finish_non_exhaustive()
    }
}

impl Pair {
    /// A pair whose device starts its handshake at once, over `network`, seeded with `seed`.
    pub fn new(seed: u64, network: Network) -> Self {
        Self::with_config(seed, network, EndpointConfig::default())
    }

    /// [`Pair::new`] with an endpoint configuration.
    pub fn with_config(seed: u64, network: Network, cfg: EndpointConfig) -> Self {
        let mut rng = Rng::new(seed);
        let now = Duration::from_secs(1_000);
        let gateway_addr: SocketAddr = "10.9.0.1:9000".parse().expect("literal");
        let device_addr: SocketAddr = "10.9.0.2:40000".parse().expect("literal");
        let psk = Psk::new(PAIR_PSK).expect("16+ bytes");
        let key = EphemeralKey::from_seed(&rng.bytes()).ok();
        let device = key.and_then(|k| Device::new(now, gateway_addr, PAIR_DEVICE, psk.clone(), k).ok());
        let mut p = Pair {
            now,
            gateway: Endpoint::new(cfg, &rng.bytes()),
            sessions: Vec::new(),
            device,
            device_session: None,
            device_addr,
            gateway_addr,
            gateway_psk: Some(psk),
            failures: Vec::new(),
            handled: Vec::new(),
            device_error: None,
            device_sent: Vec::new(),
            replaced: Vec::new(),
            network,
            wire: Vec::new(),
            rng,
        };
        p.collect();
        p
    }

    /// The gateway's session with the device, if established.
    pub fn gateway_session(&self) -> Option<&UdpPeer> {
        self.gateway.session(self.device_addr).and_then(|h| self.sessions.get(*h))
    }

    /// Both sides have their session.
    pub fn is_established(&self) -> bool {
        self.device_session.is_some() && self.gateway_session().is_some()
    }

    fn put_on_wire(&mut self, to_gateway: bool, from: SocketAddr, bytes: Vec<u8>) {
        if to_gateway {
            self.device_sent.push(bytes.clone());
        }
        let n = self.network;
        if self.rng.unit() < n.loss {
            return;
        }
        let copies = if self.rng.unit() < n.duplicate { 2 } else { 1 };
        for _ in 0..copies {
            let mut at = self.now + n.delay;
            if self.rng.unit() < n.reorder {
                let j = n.jitter.as_nanos() as f64 * self.rng.unit();
                at += Duration::from_nanos(j as u64);
            }
            self.wire.push(InFlight { at, to_gateway, from, bytes: bytes.clone() });
        }
    }

    /// Inject a datagram for the gateway from `from`, now (an attacker, a replay).
    pub fn inject_to_gateway(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.wire.push(InFlight { at: self.now, to_gateway: true, from, bytes: bytes.to_vec() });
    }

    /// Hand the gateway a datagram from `from` at once (a flood's: cheaper than the wire);
    /// answers to any address but the device's are dropped, as a spoofer never sees them.
    pub fn deliver_now(&mut self, from: SocketAddr, bytes: &[u8]) -> Option<Handled> {
        let h = match self.gateway.handle_datagram(self.now, from, bytes) {
            DatagramEvent::Done(h) => Some(h),
            DatagramEvent::Incoming(inc) => {
                self.gateway.accept(self.now, inc);
                None
            }
            DatagramEvent::Session(_) => None,
        };
        self.collect();
        h
    }

    /// The device starts over as `device_id` from `addr`, with a fresh key (a reboot, a new
    /// NAT mapping, or another device behind the same address); its old session is dropped.
    pub fn restart_device(&mut self, addr: SocketAddr, device_id: [u8; 6]) {
        let psk = Psk::new(PAIR_PSK).expect("16+ bytes");
        let key = EphemeralKey::from_seed(&self.rng.bytes()).ok();
        self.device = key.and_then(|k| Device::new(self.now, self.gateway_addr, device_id, psk, k).ok());
        self.device_session = None;
        self.device_error = None;
        self.device_addr = addr;
        self.collect();
    }

    /// Move everything the peers queued onto the wire, and act on the gateway's events.
    fn collect(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.gateway.poll_transmit() {
                let (to_dev, bytes) = (t.to == self.device_addr, t.bytes().to_vec());
                if to_dev {
                    self.put_on_wire(false, self.gateway_addr, bytes);
                }
                moved = true;
            }
            for i in 0..self.sessions.len() {
                while let Some(d) = self.sessions[i].poll_transmit() {
                    self.put_on_wire(false, self.gateway_addr, d);
                    moved = true;
                }
            }
            let dev_out: Vec<Vec<u8>> = match &mut self.device {
                Some(dev) => {
                    core::iter::from_fn(|| dev.poll_transmit()).map(|t| t.bytes().to_vec()).collect()
                }
                None => Vec::new(),
            };
            let sess_out: Vec<Vec<u8>> = match &self.device_session {
                Some(s) => core::iter::from_fn(|| s.poll_transmit()).collect(),
                None => Vec::new(),
            };
            for d in dev_out.into_iter().chain(sess_out) {
                self.put_on_wire(true, self.device_addr, d);
                moved = true;
            }
            while let Some(ev) = self.gateway.poll_event() {
                moved = true;
                match ev {
                    Event::KeyNeeded { from, .. } => {
                        let d = match self.gateway_psk.clone() {
                            Some(psk) => KeyDecision::Key {
                                psk,
                                key: EphemeralKey::from_seed(&self.rng.bytes()).expect("any 32 bytes"),
                                nonce: self.rng.bytes(),
                                session_id: self.rng.bytes(),
                            },
                            None => KeyDecision::Unregistered,
                        };
                        self.gateway.handle_key(self.now, from, d);
                    }
                    Event::Established { from, est } => {
                        self.sessions.push(UdpPeer::new(&est));
                        if let Some(old) = self.gateway.attach(from, self.sessions.len() - 1) {
                            self.replaced.push(old);
                        }
                    }
                    Event::Failed { reason, .. } => self.failures.push(reason),
                    Event::SessionOkUnacked(h) => {
                        if let Some(s) = self.sessions.get(h) {
                            s.handle_timeout(self.now);
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn deliver(&mut self, d: InFlight) {
        let mut bytes = d.bytes;
        if d.to_gateway {
            match self.gateway.handle_datagram(self.now, d.from, &bytes) {
                DatagramEvent::Done(h) => self.handled.push(h),
                DatagramEvent::Incoming(inc) => self.gateway.accept(self.now, inc),
                DatagramEvent::Session(h) => {
                    if let Some(s) = self.sessions.get(h) {
                        s.handle_datagram(self.now, &mut bytes);
                    }
                }
            }
        } else if let Some(dev) = &mut self.device {
            match dev.handle_datagram(self.now, d.from, &bytes) {
                DeviceEvent::Handled => {}
                DeviceEvent::Established(est) => self.device_session = Some(UdpPeer::new(&est)),
                DeviceEvent::Failed(e) => self.device_error = Some(e),
                DeviceEvent::Session => {
                    if let Some(s) = &self.device_session {
                        s.handle_datagram(self.now, &mut bytes);
                    }
                }
            }
        }
        self.collect();
    }

    /// The next moment something happens: a datagram arrives or a timer fires.
    fn next_event(&self) -> Option<Duration> {
        let wire = self.wire.iter().map(|d| d.at).min();
        let timers = [
            self.gateway.poll_timeout(),
            self.device.as_ref().and_then(|d| d.poll_timeout()),
            self.device_session.as_ref().and_then(|s| s.poll_timeout()),
        ];
        let sessions = self.sessions.iter().filter_map(|s| s.poll_timeout()).min();
        timers.into_iter().flatten().chain(wire).chain(sessions).min()
    }

    /// Advance to the next event and handle it; false if nothing is left to happen.
    pub fn step(&mut self) -> bool {
        let Some(at) = self.next_event() else { return false };
        self.now = self.now.max(at);
        let now = self.now;
        if let Some(i) = self.wire.iter().position(|d| d.at <= now) {
            let d = self.wire.remove(i);
            self.deliver(d);
            return true;
        }
        self.gateway.handle_timeout(now);
        if let Some(dev) = &mut self.device {
            if let Err(e) = dev.handle_timeout(now) {
                self.device_error = Some(e);
            }
        }
        if let Some(s) = &self.device_session {
            s.handle_timeout(now);
        }
        for s in &self.sessions {
            s.handle_timeout(now);
        }
        self.collect();
        true
    }

    /// Step until `done` holds or `limit` of simulated time passed; whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Pair) -> bool) -> bool {
        let end = self.now + limit;
        while !done(self) {
            if self.now > end || !self.step() {
                return done(self);
            }
        }
        true
    }

    /// Let `d` of simulated time pass, handling everything due in it.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.next_event().is_some_and(|t| t <= end) {
            self.step();
        }
        self.now = end;
    }
}
