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
use usmp::client::UdpEndpoint;
use usmp::{Client, ClientConfig, LocalEvent, Transport};

use crate::raw::{self, RawLink, RawUdp};
use crate::report::{new_hist, Counters, Hist};
use crate::sched::Schedule;

mod flood;
mod link;

use flood::flood;
use link::{error_kind, Link};

/// Everything a device needs to know about the run.
#[derive(Clone)]
pub struct Spec {
    pub target: SocketAddr,
    pub transport: Transport,
    pub keys: Keys,
    pub device_id_base: u64,
    pub echo: bool,
    /// Bare sockets without USMP, against a bare echo server (the `raw-*` modes).
    pub raw: bool,
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
    /// The same for the raw modes' bare sockets.
    raw_endpoints: RefCell<Vec<Option<Rc<RawUdp>>>>,
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

/// Entry `e` of `eps`, opened with `open` on first use.
fn shared_socket<T, E>(
    eps: &RefCell<Vec<Option<Rc<T>>>>,
    e: usize,
    open: impl FnOnce() -> Result<Rc<T>, E>,
) -> Result<Rc<T>, E> {
    let mut eps = eps.borrow_mut();
    if eps.len() <= e {
        eps.resize(e + 1, None);
    }
    if let Some(ep) = &eps[e] {
        return Ok(ep.clone());
    }
    let ep = open()?;
    eps[e] = Some(ep.clone());
    Ok(ep)
}

impl Ctx {
    fn error(&self, kind: String) {
        *self.counters.borrow_mut().errors.entry(kind).or_insert(0) += 1;
    }

    fn error_of(&self, e: &usmp::Error) {
        self.error(error_kind(e));
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
    fn endpoint(&self, pos: usize) -> Option<Result<Rc<UdpEndpoint>, usmp::Error>> {
        self.spec.shared_udp.then(|| {
            shared_socket(&self.endpoints, pos / self.spec.source_ips.len(), || {
                UdpEndpoint::bind("0.0.0.0:0".parse().expect("literal")).map(Rc::new)
            })
        })
    }

    /// [`Ctx::endpoint`] for the raw modes (which need the shared socket).
    fn raw_endpoint(&self, pos: usize) -> std::io::Result<Rc<RawUdp>> {
        if !self.spec.shared_udp {
            let msg = "raw UDP devices need their own source addresses (a loopback target or --source-ips)";
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
        }
        shared_socket(&self.raw_endpoints, pos / self.spec.source_ips.len(), || {
            RawUdp::bind(self.spec.target)
        })
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
            psk: psk.into(),
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
                self.hs.borrow_mut().saturating_record(intended.elapsed().as_micros().max(1) as u64);
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

    /// A raw mode's bare connection, timed like a handshake from `intended`.
    async fn connect_raw(&self, idx: u64, pos: usize, intended: Instant) -> Option<RawLink> {
        let cfg = self.config(idx, pos);
        let res = match self.spec.transport {
            Transport::Tcp => RawLink::tcp(&cfg, self.spec.payload).await,
            Transport::Udp => self.raw_endpoint(pos).and_then(|ep| {
                let src = cfg.bind.map(|b| b.ip()).ok_or(std::io::ErrorKind::InvalidInput)?;
                RawLink::udp(&ep, src)
            }),
            // `Transport` may grow; a raw mode exists only for these two.
            _ => Err(std::io::ErrorKind::Unsupported.into()),
        };
        self.record_attempt(intended, res.as_ref().err())?;
        res.ok()
    }

    /// One raw handshake (the protocol's round trips and sizes, echoed), timed from `intended`.
    async fn raw_handshake(&self, idx: u64, pos: usize, intended: Instant) -> bool {
        let cfg = self.config(idx, pos);
        let res = match self.spec.transport {
            Transport::Tcp => raw::tcp_handshake(&cfg).await,
            Transport::Udp => match (self.raw_endpoint(pos), cfg.bind) {
                (Ok(ep), Some(b)) => raw::udp_handshake(&ep, b.ip(), self.spec.connect_timeout).await,
                (Err(e), _) => Err(e),
                (_, None) => Err(std::io::ErrorKind::InvalidInput.into()),
            },
            _ => Err(std::io::ErrorKind::Unsupported.into()),
        };
        self.record_attempt(intended, res.err().as_ref()).is_some()
    }

    /// Count a raw connection attempt and time it from `intended`; `None` if it failed.
    fn record_attempt(&self, intended: Instant, err: Option<&std::io::Error>) -> Option<()> {
        if let Some(e) = err {
            self.counters.borrow_mut().handshakes_failed += 1;
            self.error(format!("io:{:?}", e.kind()));
            return None;
        }
        self.hs.borrow_mut().saturating_record(intended.elapsed().as_micros().max(1) as u64);
        self.counters.borrow_mut().handshakes_ok += 1;
        Some(())
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
        raw_endpoints: RefCell::new(Vec::new()),
        sched: Rc::default(),
    });
    let sched = monoio::spawn(ctx.sched.clone().run());
    let meter = monoio::spawn(meter_steady(ctx.clone()));
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
    meter.await;
    for ep in ctx.raw_endpoints.borrow().iter().flatten() {
        ep.stop();
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

/// This thread's CPU time, ns (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// Wall-clock milliseconds since the Unix epoch at monoio instant `at`.
fn unix_ms(at: Instant) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let ahead = at.saturating_duration_since(Instant::now());
    let behind = Instant::now().saturating_duration_since(at);
    (now + ahead).saturating_sub(behind).as_millis() as u64
}

/// The steady phase as this thread saw it: its wall-clock window, the messages and handshakes
/// completed in it and this thread's own CPU time over it (so a run says whether loadgen or
/// the server was the bottleneck, and a script can take the server's CPU over the same window).
async fn meter_steady(ctx: Rc<Ctx>) {
    let (start, end) = ctx.steady_window().await;
    ctx.sched.sleep_until(start).await;
    let snap = |c: &Counters| (c.messages_received, c.handshakes_ok);
    let (m0, h0) = snap(&ctx.counters.borrow());
    let cpu0 = thread_cpu_ns();
    let start_ms = unix_ms(Instant::now());
    ctx.sched.sleep_until(end).await;
    let cpu = thread_cpu_ns().saturating_sub(cpu0);
    let mut c = ctx.counters.borrow_mut();
    let (m1, h1) = snap(&c);
    c.steady_messages = m1 - m0;
    c.steady_handshakes = h1 - h0;
    c.steady_cpu_ns = cpu;
    c.steady_threads = 1;
    c.steady_start_unix_ms = start_ms;
    c.steady_end_unix_ms = unix_ms(Instant::now());
}

/// The thread's `pos`-th device, number `idx` of the run.
async fn device(ctx: Rc<Ctx>, idx: u64, pos: usize) {
    if let Some(kind) = ctx.spec.flood {
        ctx.ramp_finished_one();
        let (start, end) = ctx.steady_window().await;
        return flood(&ctx, idx, kind, start, end).await;
    }
    if ctx.spec.raw {
        return raw_device(&ctx, idx, pos).await;
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

/// A raw mode's device: the same phases as [`device`] over a bare connection.
async fn raw_device(ctx: &Rc<Ctx>, idx: u64, pos: usize) {
    ctx.connect_token().await;
    let (link, ok) = if ctx.spec.echo {
        let link = ctx.connect_raw(idx, pos, Instant::now()).await;
        let ok = link.is_some();
        (link, ok)
    } else {
        (None, ctx.raw_handshake(idx, pos, Instant::now()).await)
    };
    if ok {
        ctx.counters.borrow_mut().devices_connected += 1;
        ctx.progress.connected.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(l) = &link {
        warm_up(ctx, idx, l).await;
    }
    ctx.ramp_finished_one();
    let (start, end) = ctx.steady_window().await;
    if !ok {
        ctx.counters.borrow_mut().devices_failed += 1;
    } else if ctx.spec.echo {
        echo(ctx, idx, pos, link, start, end).await;
    } else {
        handshakes(ctx, idx, pos, start, end).await;
    }
}

/// One unmeasured echo right after the ramp's handshake. A session's first message makes
/// both sides allocate and touch its buffers; with 50 000 devices that first touch (page
/// faults, on a VM expensive ones) took seconds and made the steady phase's first second its
/// slowest. Its echo is awaited here, so none is left over to confuse the steady phase.
async fn warm_up(ctx: &Ctx, idx: u64, c: &impl Link) {
    let m = payload(idx, u64::MAX, ctx.spec.payload);
    let ok = match c.send_msg(&m).await {
        Ok(()) => c.recv_msg(Some(ctx.spec.connect_timeout)).await.is_some_and(|back| back == m),
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
async fn echo<L: Link>(
    ctx: &Rc<Ctx>,
    idx: u64,
    pos: usize,
    mut client: Option<L>,
    start: Instant,
    end: Instant,
) {
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
            if let Err(e) = c.send_msg(&payload(idx, k, ctx.spec.payload)).await {
                outstanding.borrow_mut().pop_back();
                ctx.error(e);
                lost_session = true;
                break;
            }
            ctx.counters.borrow_mut().messages_sent += 1;
            ctx.progress.sent.fetch_add(1, Ordering::Relaxed);
            k += 1;
            if interval.is_none() {
                // Closed loop: the next message leaves when this one is back (or, where
                // nothing retransmits, after a second without it: then it is lost).
                while !outstanding.borrow().is_empty() && !c.gone() {
                    let w = done.wait();
                    if outstanding.borrow().is_empty() {
                        break;
                    }
                    if monoio::time::timeout(Duration::from_secs(1), w).await.is_err() && c.lossy() {
                        outstanding.borrow_mut().pop_front();
                        ctx.counters.borrow_mut().messages_lost += 1;
                    }
                }
            }
            if c.gone() {
                lost_session = true;
                break;
            }
        }
        // A device with nothing more to send this phase (low rates) stays connected until the
        // phase ends, as an idle device would: sessions held open are part of the load.
        while !lost_session && Instant::now() < end {
            if c.gone() {
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
        while !outstanding.borrow().is_empty() && !c.gone() && Instant::now() < drain_until {
            let w = done.wait();
            let _ = monoio::time::timeout(Duration::from_millis(100), w).await;
        }
        ctx.counters.borrow_mut().messages_lost += outstanding.borrow().len() as u64;
        outstanding.borrow_mut().clear();
        if c.gone() {
            lost_session = true;
        }
        if !lost_session {
            // Spread the BYEs: all at once, tens of thousands of them overflowed socket
            // buffers (and retransmitted) while other threads' devices were still measuring.
            let at = end + BYE_SPREAD.mul_f64(unit(idx ^ 0xb7e));
            ctx.sched.sleep_until(at).await;
        }
        c.end().await;
        rx.await;
        if lost_session && ctx.spec.reconnect && Instant::now() < end {
            ctx.error("session_lost".into());
            client = L::reconnect(ctx, idx, pos, end).await;
        }
    }
}

async fn receive<L: Link>(
    ctx: Rc<Ctx>,
    idx: u64,
    c: Rc<L>,
    outstanding: Rc<RefCell<VecDeque<(u64, Instant)>>>,
    done: Rc<LocalEvent>,
) {
    // Holding an Rc keeps the client alive; stop once the session ends.
    while let Some(m) = c.recv_msg(None).await {
        if c.lossy() {
            // Echoes of lost datagrams never come: what was sent before this one is lost.
            let sent_as = |(k, _): &(u64, Instant)| payload(idx, *k, ctx.spec.payload) == m;
            let skipped = outstanding.borrow().iter().position(sent_as);
            if let Some(n) = skipped.filter(|&n| n > 0) {
                outstanding.borrow_mut().drain(..n);
                ctx.counters.borrow_mut().messages_lost += n as u64;
            }
        }
        let Some((k, intended)) = outstanding.borrow_mut().pop_front() else {
            ctx.error("unexpected_message".into());
            continue;
        };
        if m != payload(idx, k, ctx.spec.payload) {
            ctx.error("echo_mismatch".into());
        }
        ctx.rtt.borrow_mut().saturating_record(intended.elapsed().as_micros().max(1) as u64);
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
        if ctx.spec.raw {
            ctx.raw_handshake(idx, pos, intended).await;
        } else if let Some(c) = ctx.connect(idx, pos, intended).await {
            c.disconnect().await;
        }
        k += 1;
    }
}
