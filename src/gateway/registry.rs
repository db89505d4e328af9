//! The session registry of a shard: registering an established session (slab, device index,
//! directory, gauges, handler task) and unregistering a finished one, and the links every
//! connection of a shard shares (inline message hook, UDP port).

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::app::ShardApp;
use super::session::Session;
use super::shard::{Live, Shard};
use super::stats::ShardStats;
use super::Handler;
use crate::proto::{DeviceId, SessionId, Transport};
use crate::rt::conn::{CloseReason, Conn, Links};

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
    port: Option<Rc<dyn crate::rt::conn::Port>>,
) -> Rc<Links> {
    let hook: Option<Box<dyn crate::rt::conn::MessageHook>> = match (handler, app) {
        (_, Some(app)) => Some(Box::new(super::app::AppHook { app: app.clone(), shard })),
        (Handler::Inline(f), _) => Some(Box::new(InlineHook { on_message: f.clone(), shard })),
        _ => None,
    };
    Rc::new(Links { hook, port })
}
