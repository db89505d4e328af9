//! One shard's state: its slab of live sessions and device index, its lockout cache, its
//! handshakes in progress with their crypto budget, and the accounting of failed handshakes.
//! The tasks that run on it (thread bootstrap, TCP accept, UDP, inbox, sweeper) live in files
//! of their own that depend on this one, never the other way.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use slab::Slab;

use super::app::{ShardAccess, ShardApp};
use super::directory::SessionInfo;
use super::outcome::HandshakeError;
use super::session::Session;
use super::stats::ShardStats;
use super::{Command, Shared};
use crate::proto::lockout::{Admission, LockoutTable};
use crate::proto::DeviceId;
use crate::rt::conn::{Conn, Links};
use crate::rt::event::LocalEvent;
use crate::rt::now;

/// A live session in the shard's slab.
pub(super) struct Live {
    pub(super) conn: Rc<Conn>,
    /// The directory entry's id (the rest of its info is the connection's).
    pub(super) conn_id: u64,
    pub(super) since: SystemTime,
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
    pub(super) stopping: LocalEvent,
    /// Refusal log lines left in the current second (a flood must not flood the logs).
    refusal_log: Cell<(Duration, u32, u64)>,
    /// Handshakes in progress (both transports), oldest evictable under pressure.
    pub(super) pending: RefCell<Slab<Pending>>,
    /// X25519 budget: the time before which no new handshake computation may start.
    crypto_budget: Cell<Duration>,
    /// What every TCP connection of this shard is wired to (the inline hook, if any).
    pub(super) tcp_links: Rc<Links>,
    /// This shard's half of an application ([`super::GatewayBuilder::serve_app`]).
    pub(super) app: Option<Rc<dyn ShardApp>>,
    /// Told of every success: the UDP endpoint's cookie path remembers known devices. A
    /// callback set at boot, so that the shard does not depend on the UDP glue built on it.
    pub(super) on_success: RefCell<Option<SuccessHook>>,
}

impl ShardAccess for Shard {
    fn index(&self) -> usize {
        self.idx
    }

    fn session(&self, device_id: &[u8; 6]) -> Option<Session> {
        let key = *self.by_device.borrow().get(device_id)?;
        let conn = self.sessions.borrow().get(key).map(|l| l.conn().clone())?;
        let transport = conn.transport();
        Some(Session { conn, shard: self.idx, transport })
    }

    fn is_stopping(&self) -> bool {
        Shard::is_stopping(self)
    }

    fn stopping(&self) -> &LocalEvent {
        &self.stopping
    }
}

/// Hears of each successful handshake on any shard: (source address, device id, when).
pub(super) type SuccessHook = Box<dyn Fn(std::net::IpAddr, &[u8; 6], Duration)>;

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
    /// The state of shard `idx`, before any socket or task.
    pub(super) fn new(
        idx: usize,
        shared: Arc<Shared>,
        app: Option<Rc<dyn ShardApp>>,
        tcp_links: Rc<Links>,
    ) -> Self {
        Shard {
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
            tcp_links,
            app,
            on_success: RefCell::new(None),
        }
    }

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
            drop(t);
            // A device that authenticated anywhere (TCP, another shard) gets UDP cookies from
            // the budget a spoofed-source flood cannot empty.
            if let Some(hook) = &*self.on_success.borrow() {
                hook(ip, device, at);
            }
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

/// Why a handshake failed, and which lockout key it counts against.
pub(super) struct Failure {
    pub(super) reason: HandshakeError,
    pub(super) device: Option<[u8; 6]>,
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
