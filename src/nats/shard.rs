//! The bridge's half on each shard: hands every message to the bridge thread and holds the
//! device's acknowledgement until JetStream has stored it (UDP: the UTACK waits; TCP: reading
//! pauses past `max_unacked` publishes), delivers downlinks and reports when they got out,
//! and reports sessions up and down. Inline on the shard's thread; never blocks on NATS.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use super::FastMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::link::{Delivery, Down, NatsStats, PublishTag, SessionFacts, Up, LINGER_BATCH, SHARD_IN_FLIGHT};
use crate::gateway::app::{Ack, ShardApp, ShardContext};
use crate::gateway::Session;
use crate::proto::Transport;
use crate::rt::conn::CloseReason;

/// One session's bridge state.
struct Tracked {
    session: Session,
    tag: Arc<PublishTag>,
    /// Messages handed to the bridge so far (numbers the next `Nats-Msg-Id`).
    published: u64,
    /// Of those, not yet stored.
    unacked: u32,
    /// UDP: the UTACK of the message being stored.
    held_utack: Option<Box<[u8]>>,
    /// Downlinks queued on the session: (output position that delivers it, delivery id).
    deliveries: VecDeque<(u64, u64)>,
}

/// The per-shard half of the bridge.
pub(super) struct NatsShard {
    pub(super) idx: usize,
    up: flume::Sender<Vec<Up>>,
    down: flume::Receiver<Vec<Down>>,
    stats: Arc<NatsStats>,
    max_unacked: u32,
    /// `P` of `P.up.<device>`.
    prefix: String,
    /// What this turn of the shard's loop has for the bridge: sent as one batch by the
    /// flusher (see [`super::link`]).
    outbox: RefCell<Vec<Up>>,
    /// Wakes the flusher when the outbox gets its first message; `None` while it is due to
    /// run anyway, or once the shard stopped (then messages go straight out).
    flusher: Cell<Option<Waker>>,
    stopped: Cell<bool>,
    sessions: RefCell<FastMap<[u8; 16], Tracked>>,
    /// Each device's newest session here (downlinks find it without a scan).
    by_device: RefCell<FastMap<[u8; 6], [u8; 16]>>,
    /// Publishes of this shard not yet stored (all sessions, closed ones included).
    in_flight: Cell<usize>,
    /// How long the flusher waits for more of the outbox after its first message.
    linger: Duration,
}

impl NatsShard {
    pub(super) fn new(
        idx: usize,
        up: flume::Sender<Vec<Up>>,
        down: flume::Receiver<Vec<Down>>,
        stats: Arc<NatsStats>,
        max_unacked: u32,
        prefix: String,
        linger: Duration,
    ) -> Self {
        NatsShard {
            idx,
            up,
            down,
            stats,
            max_unacked,
            prefix,
            outbox: RefCell::default(),
            flusher: Cell::new(None),
            stopped: Cell::new(false),
            sessions: RefCell::default(),
            by_device: RefCell::default(),
            linger,
            in_flight: Cell::new(0),
        }
    }

    /// Hand `msg` to the bridge with the rest of this turn's messages. The bridge thread
    /// outlives the shards; a send fails only once it has stopped, and then a message stays
    /// unacknowledged for the device to send again.
    fn send_up(&self, msg: Up) {
        if self.stopped.get() {
            let _ = self.up.send(vec![msg]);
            return;
        }
        let mut out = self.outbox.borrow_mut();
        out.push(msg);
        if out.len() == 1 {
            if let Some(w) = self.flusher.take() {
                w.wake();
            }
        } else if out.len() >= LINGER_BATCH {
            // Enough for one wake-up of the bridge: do not make these wait for the linger.
            drop(out);
            self.flush();
        }
    }

    fn flush(&self) {
        let batch = std::mem::take(&mut *self.outbox.borrow_mut());
        if !batch.is_empty() {
            let _ = self.up.send(batch);
        }
    }

    fn facts(&self, s: &Session) -> SessionFacts {
        SessionFacts {
            device: s.device_id_bytes(),
            session: s.session_id_bytes(),
            transport: s.transport(),
            peer: s.peer_addr(),
            shard: self.idx,
            at: SystemTime::now(),
        }
    }

    /// Publishes a session may have outstanding before it waits: UDP one (its UTACK is held,
    /// and a device sends nothing new before that UTACK), TCP the configured bound.
    fn bound(&self, transport: Transport) -> u32 {
        match transport {
            Transport::Udp => 1,
            Transport::Tcp => self.max_unacked,
        }
    }

    fn handle(&self, cmd: Down) {
        match cmd {
            Down::Stored { session } => self.stored(session),
            Down::Deliver { id, device, payload } => self.deliver(id, device, &payload),
            Down::Close { session, reason } => {
                let s = self.sessions.borrow().get(&session).map(|t| t.session.clone());
                if let Some(s) = s {
                    if reason == CloseReason::Takeover {
                        self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(device = %s.device_id(), session = %s.session_id(), "session closed: device connected elsewhere");
                    }
                    s.close_with(reason);
                }
            }
        }
    }

    fn stored(&self, session: [u8; 16]) {
        let was_full = self.in_flight.get() >= SHARD_IN_FLIGHT;
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut map = self.sessions.borrow_mut();
        if let Some(t) = map.get_mut(&session) {
            t.unacked = t.unacked.saturating_sub(1);
            let s = t.session.clone();
            match t.held_utack.take() {
                Some(utack) => {
                    drop(map);
                    s.release_ack(&utack);
                }
                None => {
                    drop(map);
                    s.resume_input();
                }
            }
        } else {
            drop(map);
        }
        // The shard-wide bound paused every session: wake them all once it has room again.
        if was_full && self.in_flight.get() < SHARD_IN_FLIGHT {
            let all: Vec<Session> = self.sessions.borrow().values().map(|t| t.session.clone()).collect();
            for s in all {
                s.resume_input();
            }
        }
    }

    fn deliver(&self, id: u64, device: [u8; 6], payload: &[u8]) {
        let report = |outcome| {
            self.send_up(Up::Delivery { id, outcome });
        };
        let Some(sid) = self.by_device.borrow().get(&device).copied() else {
            return report(Delivery::Gone);
        };
        let mut map = self.sessions.borrow_mut();
        let Some(t) = map.get_mut(&sid).filter(|t| t.session.close_reason().is_none()) else {
            return report(Delivery::Gone);
        };
        match t.session.try_send(payload) {
            Ok(()) => t.deliveries.push_back((t.session.bytes_queued(), id)),
            Err(e) if e.kind() == crate::proto::ErrorKind::NotConnected => report(Delivery::Gone),
            Err(_) => report(Delivery::Busy),
        }
    }

    /// Pending deliveries of `t` that got out.
    fn progress(&self, t: &mut Tracked) {
        let gone = t.session.bytes_gone();
        while let Some(&(at, id)) = t.deliveries.front() {
            if at > gone {
                break;
            }
            t.deliveries.pop_front();
            self.send_up(Up::Delivery { id, outcome: Delivery::Delivered });
        }
    }
}

impl Drop for NatsShard {
    fn drop(&mut self) {
        self.flush();
    }
}

impl ShardApp for NatsShard {
    fn on_open(&self, s: &Session) {
        let device = s.device_id_bytes();
        let tag = Arc::new(PublishTag {
            session: s.session_id_bytes(),
            subject: super::config::up_subject(&self.prefix, &device).into(),
            device: s.device_id().to_string(),
            session_hex: s.session_id().to_string(),
            transport: super::bridge::transport_label(s.transport()),
            headers: std::sync::OnceLock::new(),
        });
        let t = Tracked {
            session: s.clone(),
            tag,
            published: 0,
            unacked: 0,
            held_utack: None,
            deliveries: VecDeque::new(),
        };
        self.sessions.borrow_mut().insert(s.session_id_bytes(), t);
        self.by_device.borrow_mut().insert(s.device_id_bytes(), s.session_id_bytes());
        self.send_up(Up::Opened(self.facts(s)));
    }

    fn on_message(&self, s: &Session, msg: &[u8]) -> Ack {
        let mut map = self.sessions.borrow_mut();
        let Some(t) = map.get_mut(&s.session_id_bytes()) else {
            return Ack::Now; // not reachable: sessions are tracked from on_open
        };
        t.published += 1;
        t.unacked += 1;
        let up = Up::Publish {
            shard: self.idx,
            tag: t.tag.clone(),
            number: t.published,
            payload: Bytes::copy_from_slice(msg),
        };
        let paused = t.unacked >= self.bound(s.transport());
        drop(map);
        self.in_flight.set(self.in_flight.get() + 1);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        if paused || self.in_flight.get() == SHARD_IN_FLIGHT {
            // UDP pauses at every message by design (the UTACK waits for storage): count
            // only pauses that are a sign of a slow downstream.
            if s.transport() == Transport::Tcp || self.in_flight.get() == SHARD_IN_FLIGHT {
                self.stats.backpressure.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.send_up(up);
        Ack::Held
    }

    fn on_ack_held(&self, s: &Session, utack: &[u8]) {
        let mut map = self.sessions.borrow_mut();
        if let Some(t) = map.get_mut(&s.session_id_bytes()) {
            if t.unacked == 0 {
                // Stored before the UTACK was even handed over (not on this thread's order of
                // events, but cheap to be sure of): send it now.
                drop(map);
                s.release_ack(utack);
                return;
            }
            t.held_utack = Some(utack.into());
        }
    }

    fn input_blocked(&self, s: &Session) -> bool {
        if self.in_flight.get() >= SHARD_IN_FLIGHT {
            return true;
        }
        self.sessions
            .borrow()
            .get(&s.session_id_bytes())
            .is_some_and(|t| t.unacked >= self.bound(s.transport()))
    }

    fn on_output_progress(&self, s: &Session) {
        let mut map = self.sessions.borrow_mut();
        if let Some(t) = map.get_mut(&s.session_id_bytes()) {
            if !t.deliveries.is_empty() {
                self.progress(t);
            }
        }
    }

    fn on_close(&self, s: &Session, reason: CloseReason) {
        let t = self.sessions.borrow_mut().remove(&s.session_id_bytes());
        let mut by = self.by_device.borrow_mut();
        if by.get(&s.device_id_bytes()) == Some(&s.session_id_bytes()) {
            by.remove(&s.device_id_bytes());
        }
        drop(by);
        if let Some(mut t) = t {
            self.progress(&mut t);
            for (_, id) in t.deliveries {
                self.send_up(Up::Delivery { id, outcome: Delivery::Gone });
            }
        }
        self.send_up(Up::Closed(self.facts(s), reason));
    }

    fn run(self: Rc<Self>, shard: ShardContext) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async move {
            let stop = shard.stopped();
            let work = async {
                while let Ok(batch) = self.down.recv_async().await {
                    batch.into_iter().for_each(|cmd| self.handle(cmd));
                    // Drain what else is there without a wake-up per batch.
                    while let Ok(batch) = self.down.try_recv() {
                        batch.into_iter().for_each(|cmd| self.handle(cmd));
                    }
                }
            };
            let flusher = async {
                loop {
                    // Woken by the outbox's first message, it runs after the tasks woken in
                    // the same turn (they add to the outbox first).
                    std::future::poll_fn(|cx| {
                        if self.outbox.borrow().is_empty() {
                            self.flusher.set(Some(cx.waker().clone()));
                            Poll::Pending
                        } else {
                            Poll::Ready(())
                        }
                    })
                    .await;
                    if !self.linger.is_zero() {
                        monoio::time::sleep(self.linger).await;
                    }
                    self.flush();
                }
            };
            monoio::select! {
                _ = stop => {}
                _ = work => {}
                _ = flusher => {}
            }
            self.stopped.set(true);
            self.flusher.take();
            self.flush();
            // Acknowledgements that arrive during shutdown still release held UTACKs.
            while let Ok(batch) = self.down.try_recv() {
                batch.into_iter().for_each(|cmd| self.handle(cmd));
            }
            self.flush();
        })
    }
}
