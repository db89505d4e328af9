//! The thread-per-core gateway: N shards, each a thread pinned to a core running its own
//! monoio runtime (io_uring, epoll fallback) with its own SO_REUSEPORT listener, its own slab
//! of sessions and its own lockout cache. Cross-shard work (send to a device on another
//! shard, broadcast, kick, lockout events, shutdown) travels through per-shard inboxes.
//!
//! ```no_run
//! use usmp::{Gateway, PskSource};
//!
//! let gw = Gateway::builder()
//!     .listen("0.0.0.0:9000".parse().unwrap())
//!     .psk(PskSource::single(b"a-key-of-16-bytes-or-more").unwrap())
//!     .serve(|session| async move {
//!         while let Ok(msg) = session.recv().await {
//!             if session.send(&msg).await.is_err() {
//!                 break;
//!             }
//!         }
//!     })
//!     .unwrap();
//! gw.wait();
//! ```

pub mod app;
mod bind;
mod boot;
mod directory;
mod inbox;
mod outcome;
mod port;
mod registry;
mod session;
mod shard;
mod stats;
mod sweeper;
mod tcp;
mod udp;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

pub use directory::SessionInfo;
pub use session::Session;
pub use stats::{LatencyHist, LatencySnapshot, ShardStats, StatsSnapshot, HANDSHAKE_BUCKETS_US};

use crate::proto::lockout::LockoutPolicy;
use crate::proto::{DeviceId, SessionId, Transport};
use crate::psk::{ConfigError, PskSource};
use crate::rt::Error;
use directory::Directory;

/// Renders extra Prometheus text for `/metrics` ([`GatewayHandle::add_metrics`]).
pub type MetricsSource = Arc<dyn Fn(&mut String) + Send + Sync>;

/// Called when the watchdog ends a session, with the device and the session it ended.
pub type TimeoutHook = Arc<dyn Fn(DeviceId, SessionId) + Send + Sync>;

/// Which transports the gateway serves, on the same port number: a set of [`Transport`]s,
/// not a transport of its own (`"tcp"`, `"udp"` or `"both"` when parsed, as `--transport`
/// spells it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transports {
    tcp: bool,
    udp: bool,
}

impl Transports {
    /// TCP and UDP (the default).
    pub const BOTH: Transports = Transports { tcp: true, udp: true };

    /// One transport only.
    pub const fn only(t: Transport) -> Self {
        Transports { tcp: matches!(t, Transport::Tcp), udp: matches!(t, Transport::Udp) }
    }

    /// Whether `t` is served.
    pub const fn contains(self, t: Transport) -> bool {
        match t {
            Transport::Tcp => self.tcp,
            Transport::Udp => self.udp,
        }
    }
}

impl Default for Transports {
    fn default() -> Self {
        Transports::BOTH
    }
}

impl std::fmt::Display for Transports {
    /// As parsed: `tcp`, `udp` or `both`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.tcp, self.udp) {
            (true, false) => "tcp",
            (false, true) => "udp",
            _ => "both",
        })
    }
}

impl std::str::FromStr for Transports {
    type Err = ConfigError;

    /// `tcp`, `udp` or `both`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "tcp" => Ok(Transports::only(Transport::Tcp)),
            "udp" => Ok(Transports::only(Transport::Udp)),
            "both" => Ok(Transports::BOTH),
            _ => Err(ConfigError::new("transport", format!("`{s}` is not one of tcp, udp, both"))),
        }
    }
}

/// Everything a gateway is configured with.
#[derive(Clone)]
pub struct Config {
    /// Address every shard listens on (TCP and/or UDP, same port).
    pub listen: SocketAddr,
    /// Transports served.
    pub transports: Transports,
    /// Shard threads (default: one per core).
    pub shards: usize,
    /// Cores to pin shard i to (`cpus[i % len]`); default: core i.
    pub cpus: Option<Vec<usize>>,
    /// Device keys.
    pub psk: Option<PskSource>,
    /// Bound on the whole handshake.
    pub handshake_timeout: Duration,
    /// Inactivity watchdog on received traffic.
    pub session_timeout: Duration,
    /// A session that received nothing for this long drops its expanded AES-GCM keys (about
    /// 1.1 KiB); its next frame expands them again in well under a microsecond.
    pub park_keys_after: Duration,
    /// Sessions plus handshakes in progress, gateway-wide (0 = unlimited).
    pub max_sessions: usize,
    /// Sessions plus handshakes from one IP (0 = unlimited; fleets share NAT addresses).
    pub max_per_ip: usize,
    /// Handshakes in progress per shard; more are refused at once (never queued).
    pub max_handshakes_per_shard: usize,
    /// Lockout rule.
    pub lockout: LockoutPolicy,
    /// Watchdog hook.
    pub on_timeout: Option<TimeoutHook>,
    /// How long shutdown waits for BYEs to flush.
    pub shutdown_grace: Duration,
    /// A closing TCP session whose last frames (BYE) have not moved for this long is reset:
    /// a peer that stopped reading cannot hold its descriptor, output and slot for good.
    pub close_grace: Duration,
    /// I/O driver: io_uring (falling back to epoll where unavailable), or epoll only.
    pub io_driver: crate::rt::Driver,
    /// X25519 computations started per second per shard (0 = unlimited): under a flood of
    /// valid-looking HELLOs the rest of the shard's cycles stay with live sessions.
    pub handshake_rate_per_shard: f64,
    /// UDP cookie path: HELLOs answered per second per source IP (burst: one second's worth,
    /// at least 10). The reference allows 5/s, which stalls a fleet behind one NAT address.
    pub cookie_rate_per_ip: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:9000".parse().expect("valid default address"),
            transports: Transports::BOTH,
            shards: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpus: None,
            psk: None,
            handshake_timeout: Duration::from_secs(10),
            session_timeout: Duration::from_secs(60),
            park_keys_after: Duration::from_secs(2),
            max_sessions: 0,
            max_per_ip: 0,
            max_handshakes_per_shard: 4096,
            lockout: LockoutPolicy::default(),
            on_timeout: None,
            shutdown_grace: Duration::from_secs(5),
            close_grace: Duration::from_secs(5),
            cookie_rate_per_ip: 1000.0,
            handshake_rate_per_shard: 20_000.0,
            io_driver: if std::env::var_os("USMP_FORCE_EPOLL").is_some_and(|v| v == "1") {
                crate::rt::Driver::Legacy
            } else {
                crate::rt::Driver::IoUring
            },
        }
    }
}

/// Handshakes per second per shard the budget can express: slower than one in 1000 s or
/// faster than 10^9 a second would overflow its arithmetic.
pub const HANDSHAKE_RATE_RANGE: (f64, f64) = (0.001, 1e9);

/// Check a handshake rate (0 = unlimited); the message says what is allowed.
pub fn check_handshake_rate(r: f64) -> Result<(), String> {
    let (lo, hi) = HANDSHAKE_RATE_RANGE;
    if r == 0.0 || (r.is_finite() && (lo..=hi).contains(&r)) {
        Ok(())
    } else {
        Err(format!("must be 0 (unlimited) or between {lo} and {hi:e} per second, not {r:e}"))
    }
}

/// Builder for a [`Gateway`]; call [`GatewayBuilder::serve`] last.
#[derive(Clone, Default)]
pub struct GatewayBuilder {
    cfg: Config,
}

impl Gateway {
    /// Start configuring a gateway.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }
}

impl GatewayBuilder {
    /// Replace the whole configuration.
    pub fn config(mut self, cfg: Config) -> Self {
        self.cfg = cfg;
        self
    }
    /// Listen address (port 0 picks a free port, see [`Gateway::local_addr`]).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.cfg.listen = addr;
        self
    }
    /// Transports to serve (default both).
    pub fn transports(mut self, t: Transports) -> Self {
        self.cfg.transports = t;
        self
    }
    /// Number of shards.
    pub fn shards(mut self, n: usize) -> Self {
        self.cfg.shards = n;
        self
    }
    /// Cores to pin shards to.
    pub fn cpus(mut self, cpus: Vec<usize>) -> Self {
        self.cfg.cpus = Some(cpus);
        self
    }
    /// Where device keys come from.
    pub fn psk(mut self, psk: PskSource) -> Self {
        self.cfg.psk = Some(psk);
        self
    }
    /// Handshake timeout.
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.cfg.handshake_timeout = d;
        self
    }
    /// Session inactivity timeout.
    pub fn session_timeout(mut self, d: Duration) -> Self {
        self.cfg.session_timeout = d;
        self
    }
    /// Idle time after which a session's expanded keys are dropped (default 2 s).
    pub fn park_keys_after(mut self, d: Duration) -> Self {
        self.cfg.park_keys_after = d;
        self
    }
    /// Gateway-wide session limit (0 = unlimited).
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.cfg.max_sessions = n;
        self
    }
    /// Per-IP session limit (0 = unlimited).
    pub fn max_per_ip(mut self, n: usize) -> Self {
        self.cfg.max_per_ip = n;
        self
    }
    /// Concurrent handshakes per shard.
    pub fn max_handshakes_per_shard(mut self, n: usize) -> Self {
        self.cfg.max_handshakes_per_shard = n;
        self
    }
    /// How long a closing session's last frames may stall before its socket is reset
    /// (default 5 s).
    pub fn close_grace(mut self, d: Duration) -> Self {
        self.cfg.close_grace = d;
        self
    }
    /// Lockout policy.
    pub fn lockout(mut self, p: LockoutPolicy) -> Self {
        self.cfg.lockout = p;
        self
    }
    /// Handshakes (X25519) started per second per shard, 0 = unlimited (default 20 000).
    pub fn handshake_rate_per_shard(mut self, r: f64) -> Self {
        self.cfg.handshake_rate_per_shard = r;
        self
    }
    /// UDP HELLOs answered per second per source IP (default 1000).
    pub fn cookie_rate_per_ip(mut self, r: f64) -> Self {
        self.cfg.cookie_rate_per_ip = r;
        self
    }
    /// Prefer io_uring (default) or force epoll.
    pub fn io_driver(mut self, d: crate::rt::Driver) -> Self {
        self.cfg.io_driver = d;
        self
    }
    /// Hook run when the watchdog ends a session.
    pub fn on_timeout(mut self, f: impl Fn(DeviceId, SessionId) + Send + Sync + 'static) -> Self {
        self.cfg.on_timeout = Some(Arc::new(f));
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.cfg;
        if c.psk.is_none() {
            return Err(ConfigError::new("psk", "no PSK source configured"));
        }
        if c.shards == 0 {
            return Err(ConfigError::new("shards", "must be at least 1"));
        }
        if c.handshake_timeout.is_zero() {
            return Err(ConfigError::new("handshake_timeout", "must be positive"));
        }
        if c.session_timeout.is_zero() {
            return Err(ConfigError::new("session_timeout", "must be positive"));
        }
        if c.max_handshakes_per_shard == 0 {
            return Err(ConfigError::new("max_handshakes_per_shard", "must be at least 1"));
        }
        if !(c.cookie_rate_per_ip.is_finite() && c.cookie_rate_per_ip > 0.0) {
            return Err(ConfigError::new("cookie_rate_per_ip", "must be a positive rate"));
        }
        check_handshake_rate(c.handshake_rate_per_shard)
            .map_err(|m| ConfigError::new("handshake_rate_per_shard", m))?;
        Ok(())
    }

    /// Bind every shard's socket, start the shard threads and run `handler` for each session
    /// on the shard that owns it (the reference's `@server.on_session`): one task per session.
    pub fn serve<H, F>(self, handler: H) -> Result<Gateway, Error>
    where
        H: Fn(Session) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + 'static,
    {
        self.start(Handler::Task(Box::new(move |s| Box::pin(handler(s)))))
    }

    /// Like [`GatewayBuilder::serve`], but `on_message` is called inline for each message, on
    /// the shard that received it, and replies with [`Session::try_send`]. No task, queue or
    /// copy per session or message: the densest way to run a gateway (the binary's modes use
    /// it). Input from a device pauses while its replies are not leaving (TCP stops reading,
    /// UDP leaves frames unacknowledged for the device to retransmit). A panic in `on_message`
    /// ends that session only.
    ///
    /// ```no_run
    /// use usmp::{Gateway, PskSource};
    ///
    /// let gw = Gateway::builder()
    ///     .psk(PskSource::single(b"a-key-of-16-bytes-or-more").unwrap())
    ///     .serve_messages(|session, msg| {
    ///         let _ = session.try_send(msg);
    ///     })
    ///     .unwrap();
    /// gw.wait();
    /// ```
    pub fn serve_messages<M>(self, on_message: M) -> Result<Gateway, Error>
    where
        M: Fn(&Session, &[u8]) + Send + Sync + 'static,
    {
        self.start(Handler::Inline(Arc::new(on_message)))
    }

    /// Like [`GatewayBuilder::serve_messages`], for an application that also needs session
    /// up/down, acknowledgements held until a message is stored, delivery progress and a task
    /// on every shard (see [`app`]).
    pub fn serve_app(self, app: impl app::App) -> Result<Gateway, Error> {
        self.start(Handler::App(Arc::new(app)))
    }

    fn start(self, handler: Handler) -> Result<Gateway, Error> {
        self.validate()?;
        let cfg = self.cfg;
        // A backstop in the kernel: it gives up on a peer that acknowledges none of our bytes
        // (zero-window probes included) for twice the watchdog (at least 30 s), whatever the
        // session's state. The sweeper ends stalled sessions first (after the watchdog, or the
        // close grace).
        let user_timeout = cfg.session_timeout.saturating_mul(2).max(Duration::from_secs(30));
        let listeners = bind::bind_sockets(cfg.listen, cfg.shards, cfg.transports, user_timeout)?;
        let local_addr = listeners[0].local_addr()?;
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..cfg.shards).map(|_| flume::bounded(INBOX_CAP)).unzip();
        let shared = Arc::new(Shared {
            stats: (0..cfg.shards).map(|_| ShardStats::default()).collect(),
            hs_latency: (0..cfg.shards).map(|_| LatencyHist::default()).collect(),
            cfg,
            inboxes: txs,
            directory: Directory::default(),
            reserved_total: AtomicUsize::new(0),
            reserved_per_ip: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            next_conn_id: std::sync::atomic::AtomicU64::new(1),
            extra_metrics: Mutex::new(Vec::new()),
        });
        let handler = Arc::new(handler);
        let mut threads = Vec::new();
        for (i, (listener, rx)) in listeners.into_iter().zip(rxs).enumerate() {
            let shared = shared.clone();
            let handler = handler.clone();
            let t = std::thread::Builder::new()
                .name(format!("usmp-shard-{i}"))
                .spawn(move || boot::run(i, shared, listener, rx, handler))?;
            threads.push(t);
        }
        Ok(Gateway { handle: GatewayHandle { shared }, threads, local_addr })
    }
}

/// A session handler's future, boxed so shards need not be generic over it.
type BoxedSessionFuture = std::pin::Pin<Box<dyn Future<Output = ()>>>;
/// An inline message hook as [`GatewayBuilder::serve_messages`] takes it.
pub(crate) type MessageFn = Arc<dyn Fn(&Session, &[u8]) + Send + Sync>;

/// How sessions reach the application.
pub(crate) enum Handler {
    /// One task per session running the application's future.
    Task(Box<dyn Fn(Session) -> BoxedSessionFuture + Send + Sync>),
    /// Each message inline, on the shard that received it.
    Inline(MessageFn),
    /// An application with a half on every shard.
    App(Arc<dyn app::App>),
}

/// Commands a shard's inbox holds at most; more are refused and counted (`inbox_full`).
pub const INBOX_CAP: usize = 8192;
/// Inbox entries downlinks and broadcasts leave free, so that a flood of them never keeps out
/// a lockout event, a kick, a key revocation or shutdown.
const DATA_HEADROOM: usize = 1024;
/// Inbox entries lockout events (driven by failed handshakes, so by an attacker's pace) leave
/// free for an operator's kick, a key revocation, a listing and shutdown.
const LOCKOUT_HEADROOM: usize = 64;

/// Commands a shard receives in its inbox.
pub(crate) enum Command {
    SendTo {
        device_id: [u8; 6],
        msg: Arc<[u8]>,
        /// Where the shard answers (queued, not connected, busy), if anyone waits.
        reply: Option<flume::Sender<Result<(), Error>>>,
    },
    Broadcast(Arc<[u8]>),
    Kick([u8; 6]),
    /// A handshake of `device` from `ip` failed or succeeded on another shard.
    Lockout {
        ip: IpAddr,
        device: [u8; 6],
        failed: bool,
        at: Duration,
    },
    ListSessions(flume::Sender<Vec<SessionRow>>),
    /// Close (with BYE) every session whose device the PSK source no longer accepts, or
    /// whose key changed since the registry given (a rotated key ends the session).
    Revalidate(Option<Arc<crate::psk::Registry>>),
    Shutdown,
}

impl Command {
    /// Inbox entries that must stay free when this command is posted: data yields to
    /// lockout events, and both to the operator's commands and shutdown.
    fn headroom(&self) -> usize {
        match self {
            Command::SendTo { .. } | Command::Broadcast(_) => DATA_HEADROOM,
            Command::Lockout { .. } => LOCKOUT_HEADROOM,
            Command::Kick(_) | Command::ListSessions(_) | Command::Revalidate(_) | Command::Shutdown => 0,
        }
    }
}

/// A live session with its traffic counters (admin listing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// Identity, transport, peer, shard and start time.
    pub info: SessionInfo,
    /// Authenticated frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
}

/// What a key reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Devices listed in the new registry.
    pub devices: usize,
    /// The new registry has a wildcard key.
    pub wildcard: bool,
}

pub(crate) struct Shared {
    pub cfg: Config,
    pub inboxes: Vec<flume::Sender<Command>>,
    pub directory: Directory,
    pub stats: Vec<ShardStats>,
    pub hs_latency: Vec<LatencyHist>,
    pub reserved_total: AtomicUsize,
    pub reserved_per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub shutting_down: AtomicBool,
    pub next_conn_id: std::sync::atomic::AtomicU64,
    pub extra_metrics: Mutex<Vec<MetricsSource>>,
}

impl Shared {
    /// Reserve a session slot for `ip` (released by [`Shared::release`]); false when a limit
    /// is reached. Checked at accept time, before any crypto and long before SESSION_OK.
    pub fn reserve(&self, ip: IpAddr) -> bool {
        let max = self.cfg.max_sessions;
        let total = self.reserved_total.fetch_add(1, Ordering::AcqRel) + 1;
        if max != 0 && total > max {
            self.reserved_total.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if self.cfg.max_per_ip != 0 {
            let mut m = self.reserved_per_ip.lock();
            let n = m.entry(ip).or_insert(0);
            if *n >= self.cfg.max_per_ip {
                drop(m);
                self.reserved_total.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
            *n += 1;
        }
        true
    }

    /// Give back a slot taken by [`Shared::reserve`].
    pub fn release(&self, ip: IpAddr) {
        self.reserved_total.fetch_sub(1, Ordering::AcqRel);
        if self.cfg.max_per_ip != 0 {
            let mut m = self.reserved_per_ip.lock();
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }

    /// Hand `cmd` to a shard without waiting; false (and counted) when its inbox is full,
    /// or too full for this kind of command (see [`Command::headroom`]).
    fn post(&self, shard: usize, cmd: Command) -> bool {
        let inbox = &self.inboxes[shard];
        if inbox.len() + cmd.headroom() >= INBOX_CAP {
            ShardStats::inc(&self.stats[shard].inbox_full);
            return false;
        }
        match inbox.try_send(cmd) {
            Ok(()) => true,
            Err(flume::TrySendError::Full(_)) => {
                ShardStats::inc(&self.stats[shard].inbox_full);
                false
            }
            Err(flume::TrySendError::Disconnected(_)) => false,
        }
    }
}

/// A thread-safe handle to a running gateway (Send + Sync + Clone).
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
}

impl GatewayHandle {
    /// Queue one message for `device_id` on whatever shard holds it (an id from text:
    /// `"00:11:22:33:44:55".parse()?`). `NotConnectedError` when the device has no session;
    /// `PayloadError` above 1808 bytes.
    pub fn send_to(&self, device_id: DeviceId, msg: &[u8]) -> Result<(), Error> {
        if msg.len() > crate::proto::reassembly::MAX_MESSAGE_LEN {
            return Err(Error::misuse(crate::proto::ErrorKind::Payload, "message over 1808 bytes"));
        }
        let id: [u8; 6] = device_id.into();
        let info =
            self.shared.directory.get(&id).ok_or_else(|| {
                Error::misuse(crate::proto::ErrorKind::NotConnected, "device not connected")
            })?;
        if !self.shared.post(info.shard, Command::SendTo { device_id: id, msg: msg.into(), reply: None }) {
            return Err(Error::misuse(crate::proto::ErrorKind::Timeout, "shard busy: its inbox is full"));
        }
        Ok(())
    }

    /// [`GatewayHandle::send_to`], waiting for the owning shard's answer: `Ok` once the
    /// message is queued on the session, `NotConnectedError` when the device has no session,
    /// `TimeoutError` ("busy") when its send queue or its shard's inbox is full. The shard
    /// answers at once (it never waits for a session), so this is for async callers off the
    /// shards' threads: the admin API, a message bridge.
    pub async fn deliver(&self, device_id: DeviceId, msg: &[u8]) -> Result<(), Error> {
        if msg.len() > crate::proto::reassembly::MAX_MESSAGE_LEN {
            return Err(Error::misuse(crate::proto::ErrorKind::Payload, "message over 1808 bytes"));
        }
        let id: [u8; 6] = device_id.into();
        let not_connected = || Error::misuse(crate::proto::ErrorKind::NotConnected, "device not connected");
        let info = self.shared.directory.get(&id).ok_or_else(not_connected)?;
        let (tx, rx) = flume::bounded(1);
        let cmd = Command::SendTo { device_id: id, msg: msg.into(), reply: Some(tx) };
        if !self.shared.post(info.shard, cmd) {
            return Err(Error::misuse(crate::proto::ErrorKind::Timeout, "shard busy: its inbox is full"));
        }
        rx.recv_async().await.unwrap_or_else(|_| Err(not_connected()))
    }

    /// Queue one message for every session on every shard; returns the sessions addressed.
    /// `TimeoutError` ("busy") when a shard's inbox is full: that shard's sessions do not get
    /// it (the others do), and it is counted (`inbox_full`).
    pub fn broadcast(&self, msg: &[u8]) -> Result<usize, Error> {
        if msg.len() > crate::proto::reassembly::MAX_MESSAGE_LEN {
            return Err(Error::misuse(crate::proto::ErrorKind::Payload, "message over 1808 bytes"));
        }
        let msg: Arc<[u8]> = msg.into();
        let mut refused = 0;
        for i in 0..self.shared.inboxes.len() {
            if !self.shared.post(i, Command::Broadcast(msg.clone())) {
                refused += 1;
            }
        }
        if refused > 0 {
            return Err(Error::misuse(
                crate::proto::ErrorKind::Timeout,
                "shard busy: its inbox is full (the broadcast reached the other shards)",
            ));
        }
        Ok(self.shared.directory.len())
    }

    /// Close a device's session with BYE (or, if its output has stopped moving, at once).
    /// False when it has no session, or when its shard's inbox is full even for operator
    /// commands (counted, `inbox_full`; [`GatewayHandle::device_shard`] tells them apart).
    pub fn kick(&self, device_id: DeviceId) -> bool {
        let id: [u8; 6] = device_id.into();
        match self.shared.directory.get(&id) {
            Some(info) => self.shared.post(info.shard, Command::Kick(id)),
            None => false,
        }
    }

    /// Live sessions (newest per device).
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.shared.directory.snapshot()
    }

    /// Number of devices with a live session.
    pub fn session_count(&self) -> usize {
        self.shared.directory.len()
    }

    /// Counters summed over shards.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::sum(&self.shared.stats)
    }

    /// Counters of each shard.
    pub fn shard_stats(&self) -> Vec<StatsSnapshot> {
        self.shared.stats.iter().map(|s| StatsSnapshot::sum([s])).collect()
    }

    /// Handshake latency (accept or cookie HELLO to SESSION_OK), all shards.
    pub fn handshake_latency(&self) -> LatencySnapshot {
        LatencyHist::sum(&self.shared.hs_latency)
    }

    /// Every live session with its counters, asked of each shard (waits at most `timeout`;
    /// call from outside the shards' threads).
    pub fn sessions_detailed(&self, timeout: Duration) -> Vec<SessionRow> {
        let (tx, rx) = flume::unbounded();
        for i in 0..self.shared.inboxes.len() {
            self.shared.post(i, Command::ListSessions(tx.clone()));
        }
        drop(tx);
        let deadline = std::time::Instant::now() + timeout;
        let mut rows = Vec::new();
        while let Ok(mut part) = rx.recv_deadline(deadline) {
            rows.append(&mut part);
        }
        rows
    }

    /// Re-read the registry file (PSK rotation): on success the new keys apply to the next
    /// handshake at once and sessions of devices no longer accepted are closed with BYE; on
    /// error the old registry stays in force. Only for registry files.
    pub fn reload_keys(&self) -> Result<ReloadReport, crate::psk::ConfigError> {
        let Some(PskSource::Registry { current, path: Some(path) }) = &self.shared.cfg.psk else {
            return Err(crate::psk::ConfigError::new("psk_file", "keys are not from a registry file"));
        };
        let reg = crate::psk::Registry::load(path)?;
        let report = ReloadReport { devices: reg.len(), wildcard: reg.has_wildcard() };
        let before = std::mem::replace(&mut *current.write(), Arc::new(reg));
        self.revalidate_all(&before);
        Ok(report)
    }

    /// Ask every shard to close the sessions the new keys no longer accept. Only a completely
    /// full inbox refuses this (downlinks and lockout events leave it room): said loudly.
    fn revalidate_all(&self, before: &Arc<crate::psk::Registry>) {
        for i in 0..self.shared.inboxes.len() {
            if !self.shared.post(i, Command::Revalidate(Some(before.clone()))) {
                tracing::error!(
                    shard = i,
                    "key revalidation not delivered (inbox full): sessions of changed keys on this shard stay until the next reload"
                );
            }
        }
    }

    /// The shard holding `device_id`'s session, if any (control plane; not per frame).
    pub fn device_shard(&self, device_id: DeviceId) -> Option<usize> {
        self.shared.directory.get(device_id.as_bytes()).map(|i| i.shard)
    }

    /// Swap in a new key registry (keys from another source than a file, e.g. a NATS KV
    /// bucket) and revalidate every session, as [`GatewayHandle::reload_keys`] does.
    pub fn replace_keys(&self, reg: crate::psk::Registry) {
        let Some(PskSource::Registry { current, .. }) = &self.shared.cfg.psk else {
            tracing::warn!("keys replaced on a gateway whose keys are not a registry: ignored");
            return;
        };
        let before = std::mem::replace(&mut *current.write(), Arc::new(reg));
        self.revalidate_all(&before);
    }

    /// Add a source of Prometheus text to `/metrics` (an application's own counters).
    pub fn add_metrics(&self, render: MetricsSource) {
        self.shared.extra_metrics.lock().push(render);
    }

    /// Append every added metrics source's text to `out`.
    pub fn render_extra_metrics(&self, out: &mut String) {
        for r in self.shared.extra_metrics.lock().iter() {
            r(out);
        }
    }

    /// Stop accepting, say BYE to every session, and let the shard threads exit.
    pub fn shutdown(&self) {
        if !self.shared.shutting_down.swap(true, Ordering::AcqRel) {
            for i in 0..self.shared.inboxes.len() {
                self.shared.post(i, Command::Shutdown);
            }
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }
}

/// A running gateway.
pub struct Gateway {
    handle: GatewayHandle,
    threads: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl Gateway {
    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle for other threads.
    pub fn handle(&self) -> GatewayHandle {
        self.handle.clone()
    }

    /// Block until every shard has exited (after [`GatewayHandle::shutdown`]).
    pub fn wait(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Shut down and wait.
    pub fn shutdown(self) {
        self.handle.shutdown();
        self.wait();
    }
}
