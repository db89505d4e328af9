//! One shard: a thread pinned to a core, its own monoio runtime and SO_REUSEPORT listener,
//! its slab of live sessions, its lockout cache, its inbox, and one sweeper task that runs
//! the watchdog for every session (no timer per connection).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use monoio::net::{TcpListener, TcpStream};
use ring::rand::SystemRandom;
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use super::app::ShardApp;
use super::directory::SessionInfo;
use super::outcome::{HandshakeError, Refusal};
use super::session::Session;
use super::stats::ShardStats;
use super::{Command, Handler, Shared};
use crate::proto::crypto::EphemeralKey;
use crate::proto::deframer::Deframer;
use crate::proto::frame::Frame;
use crate::proto::handshake::{decode_hello, ServerExpectHelloAck, MAX_HANDSHAKE_FRAME_LEN};
use crate::proto::lockout::{Admission, LockoutTable};
use crate::proto::session::Session as ProtoSession;
use crate::proto::{DeviceId, SessionId, Transport};
use crate::rt::conn::{self, CloseReason, Conn, Links};
use crate::rt::{now, wire, Error};

const LISTEN_BACKLOG: i32 = 4096;

/// One shard's sockets.
pub(super) struct ShardSockets {
    pub(super) tcp: Option<StdListener>,
    pub(super) udp: Option<std::net::UdpSocket>,
}

impl ShardSockets {
    pub(super) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match (&self.tcp, &self.udp) {
            (Some(t), _) => t.local_addr(),
            (None, Some(u)) => u.local_addr(),
            (None, None) => Err(std::io::Error::other("no transport")),
        }
    }
}

fn reuseport_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    // Must be set before bind so every shard can bind the same port.
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Bind one SO_REUSEPORT TCP listener and/or UDP socket per shard on `addr` (port 0: the
/// first socket picks the port, every other one follows it, UDP on the same number).
pub(super) fn bind_sockets(
    addr: SocketAddr,
    n: usize,
    t: super::Transports,
) -> std::io::Result<Vec<ShardSockets>> {
    // With port 0 the number the first socket gets may be taken for the other transport:
    // try again, keeping the failed attempts' sockets open so the next number differs.
    let mut burned = Vec::new();
    loop {
        match bind_sockets_once(addr, n, t, &mut burned) {
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse && burned.len() < 64 => {}
            other => return other,
        }
    }
}

fn bind_sockets_once(
    addr: SocketAddr,
    n: usize,
    t: super::Transports,
    burned: &mut Vec<Socket>,
) -> std::io::Result<Vec<ShardSockets>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let tcp = if t.contains(Transport::Tcp) {
            let s = reuseport_socket(addr, Type::STREAM, Protocol::TCP)?;
            s.set_nodelay(true)?;
            s.listen(LISTEN_BACKLOG)?;
            let l: StdListener = s.into();
            addr = l.local_addr()?;
            Some(l)
        } else {
            None
        };
        let udp = if t.contains(Transport::Udp) {
            let s = match reuseport_socket(addr, Type::DGRAM, Protocol::UDP) {
                Ok(s) => s,
                Err(e) => {
                    burned.extend(tcp.map(Socket::from));
                    return Err(e);
                }
            };
            // Room for bursts from tens of thousands of devices between two receive rounds.
            let _ = s.set_recv_buffer_size(8 << 20);
            let _ = s.set_send_buffer_size(8 << 20);
            let u: std::net::UdpSocket = s.into();
            addr = u.local_addr()?;
            Some(u)
        } else {
            None
        };
        out.push(ShardSockets { tcp, udp });
    }
    Ok(out)
}

pub(super) struct Live {
    pub(super) conn: Rc<Conn>,
    /// The directory entry's id (the rest of its info is the connection's).
    conn_id: u64,
    since: SystemTime,
    /// Fingerprint of the key the device authenticated with ([`crate::psk::key_fingerprint`]):
    /// a reload that changes the device's key ends the session.
    pub(super) key: u64,
}

impl Live {
    pub(super) fn conn(&self) -> &Rc<Conn> {
        &self.conn
    }

    pub(super) fn info(&self, shard: usize) -> SessionInfo {
        SessionInfo {
            device_id: self.conn.device_id().into(),
            session_id: self.conn.session_id().into(),
            transport: self.conn.transport(),
            peer: self.conn.peer(),
            shard,
            since: self.since,
            conn_id: self.conn_id,
        }
    }
}

pub(super) struct Shard {
    pub(super) idx: usize,
    pub(super) shared: Arc<Shared>,
    pub(super) sessions: RefCell<Slab<Live>>,
    pub(super) by_device: RefCell<HashMap<[u8; 6], usize>>,
    pub(super) lockout: RefCell<LockoutTable>,
    pub(super) handshakes: Cell<usize>,
    pub(super) rng: SystemRandom,
    pub(super) stopping: crate::rt::event::LocalEvent,
    /// Refusal log lines left in the current second (a flood must not flood the logs).
    refusal_log: Cell<(Duration, u32, u64)>,
    /// Handshakes in progress (both transports), oldest evictable under pressure.
    pub(super) pending: RefCell<Slab<Pending>>,
    /// X25519 budget: the time before which no new handshake computation may start.
    crypto_budget: Cell<Duration>,
    /// What every TCP connection of this shard is wired to (the inline hook, if any).
    tcp_links: Rc<Links>,
    /// This shard's half of an application ([`super::GatewayBuilder::serve_app`]).
    pub(super) app: Option<Rc<dyn ShardApp>>,
}

/// Identifies a registered handshake: slab key plus a unique id.
pub(super) type Ticket = (usize, u64);

/// A handshake in progress: when it started and how to stop it.
pub(super) struct Pending {
    pub(super) id: u64,
    pub(super) started: Duration,
    pub(super) evict: Rc<dyn Fn()>,
}

/// Refusals logged per shard per second; the rest are summed into one line.
const REFUSAL_LOG_PER_SEC: u32 = 10;

impl Shard {
    pub(super) fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.idx]
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Acquire)
    }

    /// A handshake of `device` from `ip` failed (or succeeded): apply it here and tell every
    /// other shard, so the rule holds gateway-wide.
    pub(super) fn lockout_event(&self, ip: IpAddr, device: [u8; 6], failed: bool) {
        let at = now();
        self.apply_lockout(ip, &device, failed, at, true);
        for i in 0..self.shared.inboxes.len() {
            if i != self.idx {
                self.shared.post(i, Command::Lockout { ip, device, failed, at });
            }
        }
    }

    /// `local`: the failure happened on this shard (count and log it once, here).
    pub(super) fn apply_lockout(
        &self,
        ip: IpAddr,
        device: &[u8; 6],
        failed: bool,
        at: Duration,
        local: bool,
    ) {
        let mut t = self.lockout.borrow_mut();
        if !failed {
            t.succeed(ip, device, at);
            return;
        }
        let overflowed = t.overflowed();
        let started = t.fail(ip, device, at);
        if t.overflowed() > overflowed {
            tracing::warn!(%ip, "lockout table full of locked sources: failure not recorded");
        }
        match started {
            Some((key, _)) if !local => t.forget_report(&key),
            Some((key, len)) => {
                ShardStats::inc(&self.stats().lockouts_started);
                tracing::warn!(ip = %key.ip(), ?key, seconds = len.as_secs_f64(), "lockout started");
            }
            None => {}
        }
    }

    /// Refuse a HELLO of `device` from `peer` whose source or device is locked out (a
    /// locked source still admits devices that authenticated from it recently); counted.
    pub(super) fn refuse_locked(&self, peer: SocketAddr, device: &[u8; 6]) -> bool {
        let verdict = self.lockout.borrow().admit(peer.ip(), device, now());
        let reason = match verdict {
            Admission::Admit => return false,
            Admission::SourceLocked(_) => "source_locked_out",
            Admission::DeviceLocked(_) => "device_locked_out",
        };
        ShardStats::inc(&self.stats().refused_locked_out);
        self.log_refusal(peer, reason);
        true
    }

    /// Log a refused connection or handshake, within [`Shard::may_log`]'s budget.
    pub(super) fn log_refusal(&self, peer: SocketAddr, reason: &'static str) {
        if self.may_log() {
            tracing::info!(%peer, reason, "handshake refused");
        }
    }

    /// Whether one more refusal or failure line may be logged: at most 10 per second per
    /// shard; the rest are summed into one line the next second (a flood must not flood
    /// the logs).
    pub(super) fn may_log(&self) -> bool {
        let t = now();
        let (start, n, suppressed) = self.refusal_log.get();
        if t.saturating_sub(start) >= Duration::from_secs(1) {
            if suppressed > 0 {
                tracing::info!(
                    shard = self.idx,
                    suppressed,
                    "more handshake refusals and failures in the last second (not logged one by one)"
                );
            }
            self.refusal_log.set((t, 1, 0));
            true
        } else if n < REFUSAL_LOG_PER_SEC {
            self.refusal_log.set((start, n + 1, suppressed));
            true
        } else {
            self.refusal_log.set((start, n, suppressed + 1));
            false
        }
    }

    /// Take one X25519 from the per-shard budget (`handshake_rate` per second, 0 = unlimited).
    pub(super) fn crypto_allowed(&self) -> bool {
        let rate = self.shared.cfg.handshake_rate_per_shard;
        if rate <= 0.0 {
            return true;
        }
        let t = now();
        let gap = Duration::from_secs_f64(1.0 / rate);
        // Allow a burst of one tenth of a second's budget (at least one).
        let burst = (rate / 10.0).max(1.0).floor();
        let floor = t.saturating_sub(gap.mul_f64(burst - 1.0));
        let next = self.crypto_budget.get().max(floor);
        if next > t {
            return false;
        }
        self.crypto_budget.set(next + gap);
        true
    }

    /// Register a handshake in progress; returns its ticket for [`Shard::unregister_pending`].
    pub(super) fn register_pending(&self, evict: Rc<dyn Fn()>) -> Ticket {
        let id = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        (self.pending.borrow_mut().insert(Pending { id, started: now(), evict }), id)
    }

    /// The handshake ended (either way). The id guards against a slot reused after eviction.
    pub(super) fn unregister_pending(&self, (key, id): Ticket) {
        let mut p = self.pending.borrow_mut();
        if p.get(key).is_some_and(|e| e.id == id) {
            p.remove(key);
        }
    }
}

/// Thread body of shard `idx`.
pub(super) fn run(
    idx: usize,
    shared: Arc<Shared>,
    sockets: ShardSockets,
    inbox: flume::Receiver<Command>,
    handler: Arc<Handler>,
) {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let pick = match &shared.cfg.cpus {
        Some(list) if !list.is_empty() => Some(list[idx % list.len()]),
        _ if !cores.is_empty() => Some(cores[idx % cores.len()].id),
        _ => None,
    };
    if let Some(id) = pick {
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            tracing::warn!(
                shard = idx,
                core = id,
                "cannot pin shard to its core (outside the allowed CPU set?); running unpinned"
            );
        }
    }
    let app = match &*handler {
        Handler::App(a) => Some(a.on_shard(idx)),
        _ => None,
    };
    let shard = Rc::new(Shard {
        idx,
        lockout: RefCell::new(LockoutTable::new(shared.cfg.lockout)),
        shared,
        sessions: RefCell::new(Slab::new()),
        by_device: RefCell::new(HashMap::new()),
        handshakes: Cell::new(0),
        rng: SystemRandom::new(),
        stopping: Default::default(),
        refusal_log: Cell::new((Duration::ZERO, 0, 0)),
        pending: RefCell::new(Slab::new()),
        crypto_budget: Cell::new(Duration::ZERO),
        tcp_links: links(idx, &handler, app.as_ref(), None),
        app,
    });
    let preferred = shard.shared.cfg.io_driver;
    let (_, driver) = crate::rt::run_with(preferred, shard_main(shard, sockets, inbox, handler));
    tracing::debug!(shard = idx, ?driver, "shard exited");
}

async fn shard_main(
    shard: Rc<Shard>,
    sockets: ShardSockets,
    inbox: flume::Receiver<Command>,
    handler: Arc<Handler>,
) {
    tracing::info!(
        shard = shard.idx,
        driver = if monoio::utils::is_legacy() { "epoll" } else { "io_uring" },
        "shard started"
    );
    // Background tasks are awaited at shutdown: a runtime dropped with pending tasks leaks them.
    let mut background = vec![
        monoio::spawn(super::inbox::inbox_loop(shard.clone(), inbox)),
        monoio::spawn(super::sweeper::sweeper(shard.clone())),
        monoio::spawn(super::sweeper::evictor(shard.clone())),
    ];
    if let Some(app) = &shard.app {
        background.push(monoio::spawn(app.clone().run(super::app::ShardContext { shard: shard.clone() })));
    }
    let udp = match sockets.udp.map(|u| wire::random::<32>(&shard.rng).map(|secret| (u, secret))) {
        Some(Ok((u, secret))) => match super::udp::UdpShard::new(u, secret, &shard, &handler) {
            Ok(udp) => {
                background.extend(super::udp::start(&shard, &udp, handler.clone()));
                Some(udp)
            }
            Err(e) => {
                tracing::error!(shard = shard.idx, error = %e, "cannot register UDP socket");
                None
            }
        },
        _ => None,
    };
    match sockets.tcp.map(TcpListener::from_std) {
        Some(Ok(l)) => accept_loop(&shard, l, &handler).await,
        Some(Err(e)) => tracing::error!(shard = shard.idx, error = %e, "cannot register listener"),
        None => {
            while !shard.is_stopping() {
                let stop = shard.stopping.wait();
                if shard.is_stopping() {
                    break;
                }
                stop.await;
            }
        }
    }
    // Graceful shutdown: handshakes in progress are abandoned, every session gets BYE, and
    // we wait for them (bounded), then exit.
    let pending: Vec<Rc<dyn Fn()>> = shard.pending.borrow().iter().map(|(_, p)| p.evict.clone()).collect();
    for evict in pending {
        evict();
    }
    let conns: Vec<Rc<Conn>> = shard.sessions.borrow().iter().map(|(_, l)| l.conn.clone()).collect();
    for c in &conns {
        c.close(CloseReason::Shutdown, true);
    }
    let deadline = now() + shard.shared.cfg.shutdown_grace;
    while (!shard.sessions.borrow().is_empty() || shard.handshakes.get() > 0) && now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(udp) = &udp {
        super::udp::stop(&shard, udp);
    }
    // Every background task watches `stopping`; give them a bounded moment to return.
    let _ = monoio::time::timeout(Duration::from_secs(2), async {
        for t in background {
            t.await;
        }
    })
    .await;
}

async fn accept_loop(shard: &Rc<Shard>, listener: TcpListener, handler: &Arc<Handler>) {
    loop {
        let stop = shard.stopping.wait();
        if shard.is_stopping() {
            break;
        }
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = stop => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                ShardStats::inc(&shard.stats().accepted);
                monoio::spawn(serve_conn(shard.clone(), stream, peer, handler.clone()));
            }
            Err(e) => {
                tracing::warn!(shard = shard.idx, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Why a handshake failed, and which lockout key it counts against.
pub(super) struct Failure {
    pub(super) reason: HandshakeError,
    pub(super) device: Option<[u8; 6]>,
}

async fn serve_conn(shard: Rc<Shard>, mut stream: TcpStream, peer: SocketAddr, handler: Arc<Handler>) {
    let ip = peer.ip();
    // Cheapest checks first, before any crypto: handshake slots, session limits, then (once
    // the HELLO names the device) lockout, key lookup, the X25519 budget.
    if shard.handshakes.get() >= shard.shared.cfg.max_handshakes_per_shard || shard.is_stopping() {
        ShardStats::inc(&shard.stats().refused_over_limit);
        shard.log_refusal(peer, "handshake_limit");
        return;
    }
    if !shard.shared.reserve(ip) {
        ShardStats::inc(&shard.stats().refused_over_limit);
        shard.log_refusal(peer, "session_limit");
        return;
    }
    let _ = stream.set_nodelay(true);
    // A backstop in the kernel: it gives up on a peer that acknowledges none of our bytes
    // (zero-window probes included) for twice the watchdog (at least 30 s), whatever the
    // session's state. The sweeper ends stalled sessions first (after the watchdog, or the
    // close grace).
    let user_timeout = shard.shared.cfg.session_timeout.saturating_mul(2).max(Duration::from_secs(30));
    let _ = socket2::SockRef::from(&crate::rt::fd::borrow(&stream)).set_tcp_user_timeout(Some(user_timeout));
    let mut deframer = Deframer::new();
    // The handshake's state lives in its own future, freed before the session starts: this
    // task's future is held for the whole session, so it must only hold what the session needs.
    let Some(session) = accept_handshake(&shard, &mut stream, peer, &mut deframer).await else {
        shard.shared.release(ip);
        return;
    };
    let conn = Conn::with_links(session, peer, Some(shard.tcp_links.clone()));
    // The session's limit slot is released by `close_session`.
    open_session(&shard, &conn, &handler);
    // The session runs as a task of its own, sized for what it holds: this task's handshake
    // state and its arguments end here instead of living as long as the session.
    monoio::spawn(conn::drive_then(conn, stream, deframer, move |c| close_session(&shard, c)));
}

/// Run the handshake under its timeout and the eviction hook; failures are recorded here.
async fn accept_handshake(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    peer: SocketAddr,
    deframer: &mut Deframer,
) -> Option<ProtoSession> {
    shard.handshakes.set(shard.handshakes.get() + 1);
    let started = now();
    let device = Cell::new(None);
    let canceller = Rc::new(RefCell::new(Some(monoio::io::Canceller::new())));
    let cancel = canceller.borrow().as_ref().map(|c| c.handle());
    let pending = {
        let c = canceller.clone();
        shard.register_pending(Rc::new(move || {
            if let Some(c) = c.borrow_mut().take() {
                c.cancel();
            }
        }))
    };
    // Boxed: the handshake's state (keys, buffers, timer) is freed when it ends instead of
    // sizing this task's future for the whole session.
    let hs = Box::pin(monoio::time::timeout(
        shard.shared.cfg.handshake_timeout,
        server_handshake(shard, stream, peer, deframer, &device, cancel),
    ))
    .await;
    shard.handshakes.set(shard.handshakes.get() - 1);
    shard.unregister_pending(pending);
    let evicted = canceller.borrow().is_none();
    let outcome = match hs {
        Ok(Err(_)) if evicted => Err(Failure { reason: HandshakeError::Evicted, device: device.get() }),
        Ok(r) => r,
        Err(_) => Err(Failure { reason: HandshakeError::Timeout, device: device.get() }),
    };
    match outcome {
        Ok(s) => {
            shard.shared.hs_latency[shard.idx].record(now().saturating_sub(started));
            Some(s)
        }
        Err(f) => {
            record_failure(shard, peer, f);
            None
        }
    }
}

pub(super) fn record_failure(shard: &Shard, peer: SocketAddr, f: Failure) {
    // A refused handshake (locked out, over budget) is not a new failure; it was counted.
    let Some(counter) = f.reason.counter(shard.stats()) else { return };
    ShardStats::inc(counter);
    // A peer that connected and left without a byte is not an attack on a key.
    let silent_close = f.reason.is_clean_close() && f.device.is_none();
    if !silent_close && shard.may_log() {
        tracing::info!(%peer, device = ?f.device.map(DeviceId::new), reason = %f.reason, "handshake failed");
    }
    // Only a handshake that named a device counts: garbage, silence or a socket closed
    // before a HELLO tries no key, and must not lock a whole NAT address out.
    match f.device {
        Some(device) if f.reason.counts_toward_lockout() => shard.lockout_event(peer.ip(), device, true),
        _ => {}
    }
}

/// Steps 1–4 of PROTOCOL.md §3, server side.
async fn server_handshake(
    shard: &Shard,
    stream: &mut TcpStream,
    peer: SocketAddr,
    deframer: &mut Deframer,
    device: &Cell<Option<[u8; 6]>>,
    cancel: Option<monoio::io::CancelHandle>,
) -> Result<ProtoSession, Failure> {
    let fail = |e: Error| Failure { reason: e.into(), device: device.get() };
    let end = |reason: HandshakeError| Failure { reason, device: device.get() };
    // Step 1: HELLO.
    let f = wire::read_frame_cancelable(stream, deframer, cancel.clone()).await.map_err(fail)?;
    let hello = Frame::decode(&f).and_then(|f| decode_hello(&f)).map_err(|e| fail(e.into()))?;
    if shard.refuse_locked(peer, &hello.device_id) {
        return Err(end(HandshakeError::Refused(Refusal::LockedOut)));
    }
    device.set(Some(hello.device_id));
    let psk = match shard.shared.cfg.psk.as_ref() {
        Some(src) => src.lookup(hello.device_id).await,
        None => None,
    };
    let psk = psk.ok_or_else(|| end(HandshakeError::Unregistered))?;
    // X25519 only within the shard's budget: a flood cannot take every cycle from live sessions.
    if !shard.crypto_allowed() {
        ShardStats::inc(&shard.stats().refused_over_limit);
        return Err(end(HandshakeError::Refused(Refusal::OverBudget)));
    }
    // Step 2: CHALLENGE with a fresh key pair and nonce.
    let key = EphemeralKey::generate(&shard.rng).map_err(|e| fail(e.into()))?;
    let nonce = wire::random::<32>(&shard.rng).map_err(fail)?;
    let expect = ServerExpectHelloAck::new(&hello, &psk, key, nonce).map_err(|e| fail(e.into()))?;
    let mut buf = vec![0u8; MAX_HANDSHAKE_FRAME_LEN];
    let n = expect.encode_challenge(&mut buf).map_err(|e| fail(e.into()))?;
    wire::write_all(stream, buf[..n].to_vec()).await.map_err(fail)?;
    // Step 3: HELLO_ACK, verified in constant time.
    let f = wire::read_frame_cancelable(stream, deframer, cancel).await.map_err(fail)?;
    Frame::decode(&f).and_then(|f| expect.verify_hello_ack(&f)).map_err(|e| fail(e.into()))?;
    // Step 4: SESSION_OK (limits were reserved at accept, so they hold before this point).
    let session_id = wire::random::<16>(&shard.rng).map_err(fail)?;
    let (est, n) = expect.finish(session_id, &mut buf).map_err(|e| fail(e.into()))?;
    // Counted before SESSION_OK leaves, so a device never sees a session the metrics miss.
    ShardStats::inc(&shard.stats().handshakes_ok);
    wire::write_all(stream, buf[..n].to_vec()).await.map_err(fail)?;
    Ok(ProtoSession::new(&est, Transport::Tcp))
}

/// Register an established session on this shard (slab, device index, directory, gauges) and
/// start its handler task if the handler is not inline. The session's slab key goes in the
/// connection's tag for [`close_session`].
pub(super) fn open_session(shard: &Rc<Shard>, conn: &Rc<Conn>, handler: &Handler) {
    let device_id = conn.device_id();
    let session_id = conn.session_id();
    let transport = conn.transport();
    let peer = conn.peer();
    let conn_id = shard.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    shard.lockout_event(peer.ip(), device_id, false);
    // The key in force now is the one the handshake that just ended used (a reload in the
    // last round trip is the only gap, and its revalidation follows in the inbox).
    let key = match shard.shared.cfg.psk.as_ref().map(|p| p.key_state(&device_id)) {
        Some(crate::psk::KeyState::Key(fp)) => fp,
        _ => 0,
    };
    let live = Live { conn: conn.clone(), conn_id, since: SystemTime::now(), key };
    shard.shared.directory.insert(live.info(shard.idx));
    let key = shard.sessions.borrow_mut().insert(live);
    conn.tag.set(key as u32);
    shard.by_device.borrow_mut().insert(device_id, key);
    ShardStats::inc(open_gauge(shard, transport));
    tracing::info!(device = %DeviceId::new(device_id), session = %SessionId::new(session_id), %peer, ?transport, shard = shard.idx, "session up");
    if let Some(app) = &shard.app {
        app.on_open(&Session { conn: conn.clone(), shard: shard.idx, transport });
    }
    if let Handler::Task(make) = handler {
        let fut = make(Session { conn: conn.clone(), shard: shard.idx, transport });
        let c2 = conn.clone();
        monoio::spawn(async move {
            if crate::rt::CatchUnwind::new(fut).await.is_err() {
                tracing::error!(device = %DeviceId::new(c2.device_id()), "session handler panicked");
            }
            c2.close(CloseReason::HandlerDone, true);
        });
    }
}

fn open_gauge(shard: &Shard, transport: Transport) -> &std::sync::atomic::AtomicU64 {
    match transport {
        Transport::Tcp => &shard.stats().sessions_open_tcp,
        Transport::Udp => &shard.stats().sessions_open_udp,
    }
}

/// Unregister a finished session: fold its counters into the shard's, drop it from the slab,
/// the device index and the directory, and release its limit slot.
pub(super) fn close_session(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    let key = conn.tag.get() as usize;
    let Some((conn_id, since)) =
        shard.sessions.borrow().get(key).filter(|l| Rc::ptr_eq(&l.conn, conn)).map(|l| (l.conn_id, l.since))
    else {
        return;
    };
    let (device_id, peer) = (conn.device_id(), conn.peer());
    let reason = conn.close_reason().unwrap_or(CloseReason::PeerClosed);
    let st = conn.stats();
    let s = shard.stats();
    ShardStats::inc(&s.sessions_closed);
    if matches!(reason, CloseReason::Protocol(_)) {
        ShardStats::inc(&s.closed_protocol_error);
    }
    s.frames_in.fetch_add(st.frames_in, Ordering::Relaxed);
    s.frames_out.fetch_add(st.frames_out, Ordering::Relaxed);
    s.bytes_in.fetch_add(st.bytes_in, Ordering::Relaxed);
    s.bytes_out.fetch_add(st.bytes_out, Ordering::Relaxed);
    s.udp_retransmits.fetch_add(st.retransmits, Ordering::Relaxed);
    ShardStats::dec(open_gauge(shard, conn.transport()));
    tracing::info!(device = %DeviceId::new(device_id), %peer, reason = reason.as_str(), detail = ?reason, "session down");
    shard.sessions.borrow_mut().remove(key);
    let mut by = shard.by_device.borrow_mut();
    if by.get(&device_id) == Some(&key) {
        by.remove(&device_id);
    }
    drop(by);
    shard.shared.directory.remove(&device_id, conn_id);
    // A session that lasted half the trust window renews its device's trust at its source.
    let trust = shard.shared.cfg.lockout.trust_window / 2;
    if !matches!(reason, CloseReason::Protocol(_)) && since.elapsed().is_ok_and(|d| d > trust) {
        shard.lockout_event(peer.ip(), device_id, false);
    }
    shard.shared.release(peer.ip());
    if let Some(app) = &shard.app {
        app.on_close(&Session { conn: conn.clone(), shard: shard.idx, transport: conn.transport() }, reason);
    }
    // Move this session's traffic from the live gauges to the totals at once (the next sweep
    // recounts the live ones: a rescan here made closing every session O(sessions)).
    ShardStats::take_off(&s.live_frames_in, st.frames_in);
    ShardStats::take_off(&s.live_frames_out, st.frames_out);
    ShardStats::take_off(&s.live_bytes_in, st.bytes_in);
    ShardStats::take_off(&s.live_bytes_out, st.bytes_out);
}

/// The inline message hook of a shard: builds the application's [`Session`] view for each
/// message and contains a panic to the session it happened in.
pub(super) struct InlineHook {
    pub(super) on_message: super::MessageFn,
    pub(super) shard: usize,
}

impl crate::rt::conn::MessageHook for InlineHook {
    fn on_message(&self, conn: &Rc<Conn>, msg: &[u8]) -> crate::rt::conn::Ack {
        let s = Session { conn: conn.clone(), shard: self.shard, transport: conn.transport() };
        let f = &self.on_message;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&s, msg))).is_err() {
            tracing::error!(device = %DeviceId::new(conn.device_id()), "message handler panicked");
            conn.close(CloseReason::HandlerDone, true);
        }
        crate::rt::conn::Ack::Now
    }
}

/// The links every connection of a shard and transport shares (inline hook, UDP port).
pub(super) fn links(
    shard: usize,
    handler: &Handler,
    app: Option<&Rc<dyn ShardApp>>,
    port: Option<Rc<crate::rt::udp::UdpPort>>,
) -> Rc<Links> {
    let hook: Option<Box<dyn crate::rt::conn::MessageHook>> = match (handler, app) {
        (_, Some(app)) => Some(Box::new(super::app::AppHook { app: app.clone(), shard })),
        (Handler::Inline(f), _) => Some(Box::new(InlineHook { on_message: f.clone(), shard })),
        _ => None,
    };
    Rc::new(Links { hook, port })
}
