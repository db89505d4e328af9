//! One worker process: threads pinned to cores, each a monoio runtime running its share of
//! emulated devices. Every device is real: its own socket, handshake, keys and sequence
//! numbers (the library's `Client`). Sends are open-loop: each message has an intended send
//! time and its latency is measured from that time, so a stalled server shows as latency.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use monoio::time::Instant;
use usmp::client::{Client, ClientConfig, UdpEndpoint};
use usmp::proto::Transport;
use usmp::rt::event::LocalEvent;

use crate::report::{new_hist, Counters, Hist};
use crate::sched::Schedule;

/// Everything a device needs to know about the run.
#[derive(Clone)]
pub struct Spec {
    pub target: SocketAddr,
    pub transport: Transport,
    pub keys: Keys,
    pub device_id_base: u64,
    pub echo: bool,
    /// An attack instead of a device.
    pub flood: Option<Flood>,
    pub rate: f64,
    pub payload: usize,
    pub duration: Duration,
    /// Connect rate for this thread (handshakes/s while ramping; 0 = unlimited).
    pub connect_rate: f64,
    pub keepalive: Option<Duration>,
    pub reconnect: bool,
    pub source_ips: Vec<IpAddr>,
    /// UDP devices share a socket per thread and source address in use, told apart by
    /// their addresses (`source_ips`, all IPv4).
    pub shared_udp: bool,
    pub connect_timeout: Duration,
}

/// Attack traffic for measuring the gateway's flood defences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flood {
    /// Well-formed HELLOs with a fresh device id and public key, never followed by HELLO_ACK.
    Hello,
    /// Random bytes.
    Garbage,
}

/// Device keys: one for all, or a registry.
#[derive(Clone)]
pub enum Keys {
    One(Vec<u8>),
    Registry(Arc<usmp::psk::Registry>),
}

/// Live counters a worker's progress printer reads (one set per thread, relaxed).
#[derive(Default)]
pub struct Progress {
    pub connected: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// What one thread measured.
pub struct ThreadResult {
    pub counters: Counters,
    pub handshake: Hist,
    pub rtt: Hist,
}

struct Ctx {
    spec: Spec,
    counters: RefCell<Counters>,
    hs: RefCell<Hist>,
    rtt: RefCell<Hist>,
    progress: Arc<Progress>,
    /// Connect pacing: the next instant a handshake may start.
    next_connect: Cell<Option<Instant>>,
    /// Devices whose first connection attempt has finished.
    ramp_done: Cell<u64>,
    ramp_total: u64,
    ramp_ev: LocalEvent,
    steady: Cell<Option<(Instant, Instant)>>,
    /// When the thread started its ramp, and how long the ramp took.
    ramp_start: Instant,
    ramp_time: Cell<Duration>,
    /// Handshakes in progress on this thread, and its wake-up when one ends.
    inflight: Cell<usize>,
    inflight_ev: LocalEvent,
    /// Shared UDP sockets: the `pos`-th device of the thread uses number `pos / addresses`.
    endpoints: RefCell<Vec<Option<Rc<UdpEndpoint>>>>,
    /// Every device's timed wake-ups.
    sched: Rc<Schedule>,
}

/// Handshakes one loadgen thread runs at once. Real devices each have their own CPU; one
/// thread emulating thousands does not, and without a cap a reconnect storm queues thousands
/// of half-done handshakes behind its own crypto, so the server sees devices that take
/// seconds to answer a CHALLENGE. Waiting for a slot counts in the handshake latency (it is
/// measured from the intended start), so the cap hides nothing.
const MAX_INFLIGHT_HANDSHAKES: usize = 256;
/// Between the end of the ramp and the start of the steady phase.
const STEADY_SETTLE: Duration = Duration::from_millis(500);
/// The window over which devices say BYE once the steady phase ends and their replies are in.
const BYE_SPREAD: Duration = Duration::from_secs(1);

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A fraction in [0, 1) derived from `x`: a device's fixed share of a window (phase,
/// backoff, BYE time), the same in every run.
fn unit(x: u64) -> f64 {
    (splitmix(x) % 10_000) as f64 / 10_000.0
}

/// The message device `idx` sends as its `k`-th: identifies itself, then a pattern.
pub fn payload(idx: u64, k: u64, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|i| (splitmix(idx ^ (k << 20)) as usize + i) as u8).collect();
    let head = [idx.to_le_bytes(), k.to_le_bytes()].concat();
    let n = head.len().min(len);
    v[..n].copy_from_slice(&head[..n]);
    v
}

impl Ctx {
    fn error(&self, kind: String) {
        *self.counters.borrow_mut().errors.entry(kind).or_insert(0) += 1;
    }

    fn error_of(&self, e: &usmp::rt::Error) {
        let kind = match e {
            usmp::rt::Error::Io(io) => format!("io:{:?}", io.kind()),
            other => other.kind().class_name().to_string(),
        };
        self.error(kind);
    }

    async fn connect_token(&self) {
        if self.spec.connect_rate <= 0.0 {
            return;
        }
        let gap = Duration::from_secs_f64(1.0 / self.spec.connect_rate);
        let now = Instant::now();
        let at = self.next_connect.get().map_or(now, |t| t.max(now));
        self.next_connect.set(Some(at + gap));
        self.sched.sleep_until(at).await;
    }

    /// The shared socket of the thread's `pos`-th device (opened on first use), if devices share.
    fn endpoint(&self, pos: usize) -> Option<Result<Rc<UdpEndpoint>, usmp::rt::Error>> {
        if !self.spec.shared_udp {
            return None;
        }
        let e = pos / self.spec.source_ips.len();
        let mut eps = self.endpoints.borrow_mut();
        if eps.len() <= e {
            eps.resize(e + 1, None);
        }
        if let Some(ep) = &eps[e] {
            return Some(Ok(ep.clone()));
        }
        Some(UdpEndpoint::bind("0.0.0.0:0".parse().expect("literal")).map(|ep| {
            let ep = Rc::new(ep);
            eps[e] = Some(ep.clone());
            ep
        }))
    }

    fn config(&self, idx: u64, pos: usize) -> ClientConfig {
        let id = (self.spec.device_id_base.wrapping_add(idx) & 0xffff_ffff_ffff).to_be_bytes();
        let device_id: [u8; 6] = id[2..].try_into().expect("6 bytes");
        let psk = match &self.spec.keys {
            Keys::One(k) => k.clone(),
            Keys::Registry(r) => r.raw_key(&device_id).map(<[u8]>::to_vec).unwrap_or_default(),
        };
        let ips = &self.spec.source_ips;
        // Sharing a socket, the thread's devices need distinct addresses; otherwise spread.
        let which = if self.spec.shared_udp { pos } else { idx as usize };
        let bind = (!ips.is_empty()).then(|| SocketAddr::new(ips[which % ips.len()], 0));
        ClientConfig {
            addr: self.spec.target,
            psk,
            device_id: Some(device_id),
            connect_timeout: self.spec.connect_timeout,
            keepalive: self.spec.keepalive,
            bind,
            transport: self.spec.transport,
        }
    }

    /// One handshake; its latency is measured from `intended` (open loop) and recorded.
    async fn connect(&self, idx: u64, pos: usize, intended: Instant) -> Option<Client> {
        loop {
            let w = self.inflight_ev.wait();
            if self.inflight.get() < MAX_INFLIGHT_HANDSHAKES {
                break;
            }
            w.await;
        }
        self.inflight.set(self.inflight.get() + 1);
        let cfg = self.config(idx, pos);
        let res = match self.endpoint(pos) {
            None => Client::connect(&cfg).await,
            Some(Ok(ep)) => Client::connect_via(&ep, &cfg).await,
            Some(Err(e)) => Err(e),
        };
        self.inflight.set(self.inflight.get() - 1);
        self.inflight_ev.notify_one();
        match res {
            Ok(c) => {
                let _ = self.hs.borrow_mut().record(intended.elapsed().as_micros().max(1) as u64);
                self.counters.borrow_mut().handshakes_ok += 1;
                Some(c)
            }
            Err(e) => {
                self.counters.borrow_mut().handshakes_failed += 1;
                self.error_of(&e);
                None
            }
        }
    }

    fn ramp_finished_one(&self) {
        self.ramp_done.set(self.ramp_done.get() + 1);
        if self.ramp_done.get() == self.ramp_total {
            self.ramp_time.set(self.ramp_start.elapsed());
            // The steady phase starts after a short settling time: every device wakes up at
            // once here to schedule its first message, and with 50 000 of them that took longer
            // than the first messages' intended times (their latency was the emulator's).
            let start = Instant::now() + STEADY_SETTLE;
            self.steady.set(Some((start, start + self.spec.duration)));
            // Only now: waking thousands of waiting devices for every device that finished
            // its ramp cost most of the emulator's CPU during ramps and reconnect storms.
            self.ramp_ev.notify();
        }
    }

    async fn steady_window(&self) -> (Instant, Instant) {
        loop {
            let w = self.ramp_ev.wait();
            if let Some(s) = self.steady.get() {
                return s;
            }
            w.await;
        }
    }
}

/// Run `devices` on this thread; returns its measurements.
pub async fn run_thread(spec: Spec, devices: Vec<u64>, progress: Arc<Progress>) -> ThreadResult {
    let ctx = Rc::new(Ctx {
        ramp_total: devices.len() as u64,
        spec,
        counters: RefCell::new(Counters { devices_requested: devices.len() as u64, ..Default::default() }),
        hs: RefCell::new(new_hist()),
        rtt: RefCell::new(new_hist()),
        progress,
        next_connect: Cell::new(None),
        ramp_done: Cell::new(0),
        ramp_ev: LocalEvent::default(),
        steady: Cell::new(None),
        ramp_start: Instant::now(),
        ramp_time: Cell::new(Duration::ZERO),
        inflight: Cell::new(0),
        inflight_ev: LocalEvent::default(),
        endpoints: RefCell::new(Vec::new()),
        sched: Rc::default(),
    });
    let sched = monoio::spawn(ctx.sched.clone().run());
    if devices.is_empty() {
        ctx.steady.set(Some((Instant::now(), Instant::now())));
    }
    let handles: Vec<_> = devices
        .into_iter()
        .enumerate()
        .map(|(pos, idx)| monoio::spawn(device(ctx.clone(), idx, pos)))
        .collect();
    for h in handles {
        h.await;
    }
    ctx.sched.stop();
    sched.await;
    let ctx = Rc::try_unwrap(ctx).ok().expect("all device tasks ended");
    let mut counters = ctx.counters.into_inner();
    let handshaking = match (ctx.spec.echo, ctx.spec.flood) {
        (false, None) => ctx.ramp_time.get() + ctx.spec.duration,
        _ => ctx.ramp_time.get(),
    };
    counters.handshake_ms = handshaking.as_millis().max(1) as u64;
    ThreadResult { counters, handshake: ctx.hs.into_inner(), rtt: ctx.rtt.into_inner() }
}

/// The thread's `pos`-th device, number `idx` of the run.
async fn device(ctx: Rc<Ctx>, idx: u64, pos: usize) {
    if let Some(kind) = ctx.spec.flood {
        ctx.ramp_finished_one();
        let (start, end) = ctx.steady_window().await;
        return flood(&ctx, idx, kind, start, end).await;
    }
    // Ramp-up: one paced handshake (retried with backoff under --reconnect).
    ctx.connect_token().await;
    let mut client = ctx.connect(idx, pos, Instant::now()).await;
    if let Some(c) = &client {
        ctx.counters.borrow_mut().devices_connected += 1;
        ctx.progress.connected.fetch_add(1, Ordering::Relaxed);
        if ctx.spec.echo {
            warm_up(&ctx, idx, c).await;
        }
    }
    ctx.ramp_finished_one();
    let (start, end) = ctx.steady_window().await;
    if client.is_none() && ctx.spec.reconnect {
        client = reconnect(&ctx, idx, pos, end).await;
        if client.is_some() {
            ctx.counters.borrow_mut().devices_connected += 1;
            ctx.progress.connected.fetch_add(1, Ordering::Relaxed);
        }
    }
    if client.is_none() {
        ctx.counters.borrow_mut().devices_failed += 1;
        return;
    }
    if ctx.spec.echo {
        echo(&ctx, idx, pos, client, start, end).await;
    } else {
        if let Some(c) = client.take() {
            c.disconnect().await;
        }
        handshakes(&ctx, idx, pos, start, end).await;
    }
}

/// One unmeasured echo right after the ramp's handshake. A session's first message makes
/// both sides allocate and touch its buffers; with 50 000 devices that first touch (page
/// faults, on a VM expensive ones) took seconds and made the steady phase's first second its
/// slowest. Its echo is awaited here, so none is left over to confuse the steady phase.
async fn warm_up(ctx: &Ctx, idx: u64, c: &Client) {
    let m = payload(idx, u64::MAX, ctx.spec.payload);
    let ok = match c.send(&m).await {
        Ok(()) => c.recv_timeout(ctx.spec.connect_timeout).await.is_ok_and(|back| back == m),
        Err(_) => false,
    };
    if !ok {
        ctx.error("warm_up_failed".into());
    }
}

/// Reconnect with capped exponential backoff and full jitter, as fleet firmware does: the
/// n-th retry waits a random time in [0, min(0.5 s · 2ⁿ, 5 s)], so a fleet that lost its
/// gateway spreads its retries over the window instead of retrying in synchronized waves,
/// and no device sleeps through a gateway that is already back for long.
async fn reconnect(ctx: &Ctx, idx: u64, pos: usize, until: Instant) -> Option<Client> {
    let mut attempt = 0u32;
    loop {
        let cap = Duration::from_millis(500).saturating_mul(1 << attempt.min(8)).min(Duration::from_secs(5));
        let delay = cap.mul_f64(unit(idx.wrapping_mul(31).wrapping_add(attempt as u64)));
        if Instant::now() + delay >= until {
            return None;
        }
        ctx.sched.sleep_until(Instant::now() + delay).await;
        // No --connect-rate token: that paces the ramp-up; a fleet that lost its gateway
        // comes back on its devices' own (jittered) schedule, which is the storm to survive.
        if let Some(c) = ctx.connect(idx, pos, Instant::now()).await {
            return Some(c);
        }
        attempt += 1;
    }
}

/// Open-loop echo traffic (or closed loop when the rate is 0), then drain and BYE.
async fn echo(ctx: &Rc<Ctx>, idx: u64, pos: usize, mut client: Option<Client>, start: Instant, end: Instant) {
    let rate = ctx.spec.rate;
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let phase = interval.map_or(Duration::ZERO, |i| i.mul_f64(unit(idx)));
    let mut k = 0u64;
    while let Some(c) = client.take() {
        let c = Rc::new(c);
        let outstanding: Rc<RefCell<VecDeque<(u64, Instant)>>> = Rc::default();
        let done = Rc::new(LocalEvent::default());
        let rx = monoio::spawn(receive(ctx.clone(), idx, c.clone(), outstanding.clone(), done.clone()));
        let mut lost_session = false;
        loop {
            let intended = match interval {
                Some(i) => start + phase + i.mul_f64(k as f64),
                None => Instant::now(),
            };
            if intended >= end {
                break;
            }
            ctx.sched.sleep_until(intended).await;
            outstanding.borrow_mut().push_back((k, intended));
            if let Err(e) = c.send(&payload(idx, k, ctx.spec.payload)).await {
                outstanding.borrow_mut().pop_back();
                ctx.error_of(&e);
                lost_session = true;
                break;
            }
            ctx.counters.borrow_mut().messages_sent += 1;
            ctx.progress.sent.fetch_add(1, Ordering::Relaxed);
            k += 1;
            if interval.is_none() {
                // Closed loop: the next message leaves when this one is back.
                while !outstanding.borrow().is_empty() && c.close_reason().is_none() {
                    let w = done.wait();
                    if outstanding.borrow().is_empty() {
                        break;
                    }
                    let _ = monoio::time::timeout(Duration::from_secs(1), w).await;
                }
            }
            if c.close_reason().is_some() {
                lost_session = true;
                break;
            }
        }
        // A device with nothing more to send this phase (low rates) stays connected until the
        // phase ends, as an idle device would: sessions held open are part of the load.
        while !lost_session && Instant::now() < end {
            if c.close_reason().is_some() {
                lost_session = true;
                break;
            }
            let w = done.wait();
            monoio::select! {
                _ = ctx.sched.sleep_until(end) => {},
                _ = w => {},
            }
        }
        // Drain: give replies up to 5 s, then say BYE; whatever is missing is lost.
        let drain_until = Instant::now() + Duration::from_secs(5);
        while !outstanding.borrow().is_empty() && c.close_reason().is_none() && Instant::now() < drain_until {
            let w = done.wait();
            let _ = monoio::time::timeout(Duration::from_millis(100), w).await;
        }
        ctx.counters.borrow_mut().messages_lost += outstanding.borrow().len() as u64;
        outstanding.borrow_mut().clear();
        if c.close_reason().is_some() {
            lost_session = true;
        }
        if !lost_session {
            // Spread the BYEs: all at once, tens of thousands of them overflowed socket
            // buffers (and retransmitted) while other threads' devices were still measuring.
            let at = end + BYE_SPREAD.mul_f64(unit(idx ^ 0xb7e));
            ctx.sched.sleep_until(at).await;
        }
        c.bye().await;
        rx.await;
        if lost_session && ctx.spec.reconnect && Instant::now() < end {
            ctx.error("session_lost".into());
            client = reconnect(ctx, idx, pos, end).await;
        }
    }
}

async fn receive(
    ctx: Rc<Ctx>,
    idx: u64,
    c: Rc<Client>,
    outstanding: Rc<RefCell<VecDeque<(u64, Instant)>>>,
    done: Rc<LocalEvent>,
) {
    // Holding an Rc keeps the client alive; stop once the session ends.
    loop {
        let m = match c.recv().await {
            Ok(m) => m,
            Err(_) => break,
        };
        let Some((k, intended)) = outstanding.borrow_mut().pop_front() else {
            ctx.error("unexpected_message".into());
            continue;
        };
        if m != payload(idx, k, ctx.spec.payload) {
            ctx.error("echo_mismatch".into());
        }
        let _ = ctx.rtt.borrow_mut().record(intended.elapsed().as_micros().max(1) as u64);
        ctx.counters.borrow_mut().messages_received += 1;
        ctx.progress.received.fetch_add(1, Ordering::Relaxed);
        done.notify();
    }
    drop(c);
    done.notify();
}

/// Handshake mode: `rate` handshakes per second per device (0 = back to back), each timed
/// from its intended start, each followed by BYE.
async fn handshakes(ctx: &Ctx, idx: u64, pos: usize, start: Instant, end: Instant) {
    let interval = (ctx.spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / ctx.spec.rate));
    let phase = interval.map_or(Duration::ZERO, |i| i.mul_f64(unit(idx)));
    let mut k = 0u64;
    loop {
        let intended = match interval {
            Some(i) => start + phase + i.mul_f64(k as f64),
            None => Instant::now(),
        };
        if intended >= end {
            return;
        }
        ctx.sched.sleep_until(intended).await;
        if let Some(c) = ctx.connect(idx, pos, intended).await {
            c.disconnect().await;
        }
        k += 1;
    }
}

/// One attacker: `rate` attempts per second (0 = back to back) until `end`. Each attempt is a
/// new connection (TCP) or datagram (UDP) carrying a fresh well-formed HELLO or garbage; an
/// attack HELLO waits at most 1 s for a reply and never answers it. Counted as messages sent.
async fn flood(ctx: &Ctx, idx: u64, kind: Flood, start: Instant, end: Instant) {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    let interval = (ctx.spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / ctx.spec.rate));
    let local = (!ctx.spec.source_ips.is_empty())
        .then(|| SocketAddr::new(ctx.spec.source_ips[idx as usize % ctx.spec.source_ips.len()], 0));
    let udp = if ctx.spec.transport == Transport::Udp {
        let bind = local.unwrap_or_else(|| "0.0.0.0:0".parse().expect("literal"));
        match std::net::UdpSocket::bind(bind).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(s) => monoio::net::udp::UdpSocket::from_std(s).ok(),
            Err(_) => None,
        }
    } else {
        None
    };
    let mut k = 0u64;
    loop {
        let intended = match interval {
            Some(i) => start + i.mul_f64(k as f64),
            None => Instant::now(),
        };
        if intended >= end {
            return;
        }
        ctx.sched.sleep_until(intended).await;
        k += 1;
        let r = splitmix(idx.wrapping_mul(1_000_003) ^ k);
        let bytes = match kind {
            Flood::Garbage => (0..(r % 200 + 1) as usize).map(|i| splitmix(r ^ i as u64) as u8).collect(),
            Flood::Hello => {
                let mut p = [0u8; 38];
                for (i, b) in p.iter_mut().enumerate() {
                    *b = splitmix(r ^ (i as u64) << 8) as u8;
                }
                // A valid X25519 public key: the basepoint times a random scalar.
                let seed: [u8; 32] = p[6..38].try_into().expect("32");
                if let Ok(key) = usmp::proto::crypto::EphemeralKey::from_seed(&seed) {
                    p[6..].copy_from_slice(key.public());
                }
                let mut out = [0u8; 64];
                let n = usmp::proto::frame::encode_frame(usmp::proto::PacketType::Hello, 0, &p, &mut out)
                    .expect("fits");
                out[..n].to_vec()
            }
        };
        ctx.counters.borrow_mut().messages_sent += 1;
        ctx.progress.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = &udp {
            let _ = s.send_to(bytes, ctx.spec.target).await;
            continue;
        }
        let cfg = ctx.config(idx, 0);
        let stream = match cfg.bind {
            Some(l) => {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
                match s.and_then(|s| {
                    s.set_nonblocking(true)?;
                    s.bind(&l.into())?;
                    match s.connect(&ctx.spec.target.into()) {
                        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
                        _ => {}
                    }
                    Ok(s)
                }) {
                    Ok(s) => match monoio::net::TcpStream::from_std(s.into()) {
                        Ok(t) => t.writable(false).await.map(|_| t),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            None => monoio::net::TcpStream::connect_addr(ctx.spec.target).await,
        };
        let Ok(mut stream) = stream else {
            ctx.error("flood_connect_failed".into());
            continue;
        };
        let (res, _) = stream.write_all(bytes).await;
        if res.is_err() {
            continue;
        }
        if kind == Flood::Hello {
            // Read whatever comes (CHALLENGE, or the close), for at most a second; never answer.
            let buf = vec![0u8; 128];
            if let Ok((Ok(n), _)) = monoio::time::timeout(Duration::from_secs(1), stream.read(buf)).await {
                if n > 0 {
                    ctx.counters.borrow_mut().messages_received += 1;
                }
            }
        }
    }
}
