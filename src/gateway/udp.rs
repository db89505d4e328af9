//! A shard's UDP side as a thin loop around the sans-IO [`Endpoint`] (`proto::endpoint`):
//! receive a batch of datagrams, feed the endpoint, send what it returns, re-arm one timer,
//! and act on its events (admission, key lookup and X25519 budget, sessions up and down).
//! Sessions then share the connection core with TCP (`rt::conn`) and the UDP pump (`rt::udp`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::udp::UdpSocket;

use super::port::UdpPort;
use super::registry::{close_session, links, open_session};
use super::shard::{record_failure, Failure, Shard, Ticket};
use super::stats::ShardStats;
use super::Handler;
use crate::proto::crypto::{EphemeralKey, Psk};
use crate::proto::endpoint::{
    DatagramEvent, Endpoint, EndpointConfig, Event, Handled, Incoming, KeyDecision,
};
use crate::proto::session::Session as ProtoSession;
use crate::proto::{ErrorKind, Transport};
use crate::psk::PskSource;
use crate::rt::conn::{CloseReason, Conn, Links, Port};
use crate::rt::datagram::{send_loop_direct, RecvBatch, UdpOut};
use crate::rt::event::LocalEvent;
use crate::rt::udp::{on_session_datagram, Inbound};
use crate::rt::{now, wire};

/// The UDP state of one shard.
pub(super) struct UdpShard {
    sock: Rc<UdpSocket>,
    /// Drives every session's stop-and-wait sender (no task per session).
    port: Rc<UdpPort>,
    /// What every UDP session of the shard is wired to (the port, the inline hook if any).
    links: Rc<Links>,
    /// The protocol: cookie path, handshakes under ARQ, demultiplexing.
    ep: RefCell<Endpoint<Rc<Conn>>>,
    /// Handshakes in progress: their eviction tickets and start times.
    pending: RefCell<HashMap<SocketAddr, (Ticket, Duration)>>,
    /// Handshakes the shard's evictor (or shutdown) asked to end.
    evicted: RefCell<Vec<SocketAddr>>,
    /// Wakes the timer task: the endpoint's deadline may have moved, or evictions wait.
    wake: LocalEvent,
}

impl UdpShard {
    pub(super) fn new(
        sock: std::net::UdpSocket,
        secret: [u8; 32],
        shard: &Shard,
        handler: &Handler,
    ) -> std::io::Result<Rc<Self>> {
        let cfg = &shard.shared.cfg;
        let per_ip = cfg.cookie_rate_per_ip;
        let ep_cfg = EndpointConfig {
            // Every session the gateway may hold plus this shard's handshakes: the peer table
            // never outgrows what the limits allow (0 = unlimited sessions: a large bound).
            max_peers: if cfg.max_sessions == 0 { 1 << 22 } else { cfg.max_sessions }
                .saturating_add(cfg.max_handshakes_per_shard),
            handshake_timeout: cfg.handshake_timeout,
            // Per source: `per_ip`/s with a one-second burst; plus a shard-wide ceiling (a
            // second one, as large, for devices known to have authenticated here).
            cookie_rate: per_ip,
            cookie_burst: per_ip.max(10.0),
            cookie_global_rate: 50_000.0,
            ..EndpointConfig::default()
        };
        let port = UdpPort::new(UdpOut::new());
        Ok(Rc::new(UdpShard {
            sock: Rc::new(UdpSocket::from_std(sock)?),
            links: links(shard.idx, handler, shard.app.as_ref(), Some(port.clone())),
            port,
            ep: RefCell::new(Endpoint::new(ep_cfg, &secret)),
            pending: RefCell::new(HashMap::new()),
            evicted: RefCell::new(Vec::new()),
            wake: LocalEvent::default(),
        }))
    }

    /// Peers with state (handshakes or sessions): what a HELLO flood must not grow.
    pub(super) fn peer_count(&self) -> usize {
        self.ep.borrow().peer_count()
    }

    /// `device` authenticated from `ip` (anywhere in the gateway): see [`Endpoint::remember`].
    pub(super) fn remember(&self, ip: std::net::IpAddr, device: &[u8; 6], at: Duration) {
        // Busy only while this endpoint reports its own verified handshake, which it
        // remembered itself.
        if let Ok(mut ep) = self.ep.try_borrow_mut() {
            ep.remember(ip, device, at);
        }
    }
}

/// Start the socket's tasks: the receiver, the sender, the retransmission timers, the
/// endpoint's timer and the reaper (their handles, to await at shutdown). Datagrams are read
/// and sent with non-blocking calls between readiness waits, on io_uring and epoll alike: a
/// busy socket then costs one wake-up per burst instead of an operation per datagram.
pub(super) fn start(
    shard: &Rc<Shard>,
    udp: &Rc<UdpShard>,
    handler: Arc<Handler>,
) -> Vec<monoio::task::JoinHandle<()>> {
    let (s2, u2) = (shard.clone(), udp.clone());
    vec![
        monoio::spawn(async move {
            send_loop_direct(&u2.sock, u2.port.out(), || ShardStats::inc(&s2.stats().datagrams_dropped)).await
        }),
        monoio::spawn(recv_loop(shard.clone(), udp.clone(), handler.clone())),
        monoio::spawn(udp.port.clone().run_timers()),
        monoio::spawn(endpoint_timer(shard.clone(), udp.clone(), handler)),
        monoio::spawn(reaper(shard.clone(), udp.clone())),
    ]
}

/// Stop the socket's tasks (shutdown): sessions still waiting for their BYE's UTACK are
/// abandoned and unregistered.
pub(super) fn stop(shard: &Rc<Shard>, udp: &UdpShard) {
    let left: Vec<Rc<Conn>> = udp.ep.borrow().sessions().cloned().collect();
    for c in left {
        c.close(CloseReason::Shutdown, false);
    }
    unregister_finished(shard, udp);
    udp.port.stop();
    udp.port.out().stop();
    udp.wake.notify();
}

/// Unregister the sessions whose last frame was delivered or abandoned.
async fn reaper(shard: Rc<Shard>, udp: Rc<UdpShard>) {
    loop {
        udp.port.wait_finished().await;
        unregister_finished(&shard, &udp);
        if udp.port.is_stopped() {
            return;
        }
    }
}

fn unregister_finished(shard: &Rc<Shard>, udp: &UdpShard) {
    for conn in udp.port.take_finished() {
        close_session(shard, &conn);
        udp.ep.borrow_mut().detach(conn.peer(), |c| Rc::ptr_eq(c, &conn));
    }
}

async fn recv_loop(shard: Rc<Shard>, udp: Rc<UdpShard>, handler: Arc<Handler>) {
    let fd = udp.sock.as_raw_fd();
    let mut rx = RecvBatch::new();
    loop {
        // EAGAIN: drained; EINTR: the next wake-up reads again.
        let n = rx.recv(fd).unwrap_or(0);
        for i in 0..n {
            ShardStats::inc(&shard.stats().datagrams_in);
            match rx.get(i) {
                Some((d, from)) => on_datagram(&shard, &udp, d, from),
                None => dropped(&shard), // larger than any valid datagram
            }
        }
        drive(&shard, &udp, &handler);
        let stop = shard.stopping.wait();
        if shard.is_stopping() && udp.peer_count() == 0 {
            return;
        }
        // Back through the driver even when more may be waiting: the sessions this batch
        // woke and the sender run before the next batch is read.
        if shard.is_stopping() {
            // Shutting down: sessions still need their last UTACKs, so keep receiving, but wake
            // up regularly to notice the last one leave.
            monoio::select! {
                _ = udp.sock.readable(false) => {},
                _ = monoio::time::sleep(Duration::from_millis(100)) => {},
            }
        } else {
            monoio::select! {
                _ = udp.sock.readable(false) => {},
                _ = stop => {},
            }
        }
    }
}

/// Retransmit handshake frames and end handshakes on the endpoint's one deadline; end the
/// handshakes the evictor picked.
async fn endpoint_timer(shard: Rc<Shard>, udp: Rc<UdpShard>, handler: Arc<Handler>) {
    loop {
        if udp.port.is_stopped() {
            return;
        }
        let evicted = std::mem::take(&mut *udp.evicted.borrow_mut());
        for from in evicted {
            udp.ep.borrow_mut().evict(from);
        }
        udp.ep.borrow_mut().handle_timeout(now());
        drive(&shard, &udp, &handler);
        // Created after `drive`, which notifies: a wake-up from elsewhere (a new handshake,
        // an eviction) is still seen.
        let wait = udp.wake.wait();
        if !udp.evicted.borrow().is_empty() {
            continue;
        }
        let next = udp.ep.borrow().poll_timeout();
        match next {
            Some(at) => {
                let _ = monoio::time::timeout(at.saturating_sub(now()), wait).await;
            }
            None => wait.await,
        }
    }
}

fn dropped(shard: &Shard) {
    dropped_for(shard, ErrorKind::Frame);
}

/// Count a dropped datagram under its reason.
fn dropped_for(shard: &Shard, kind: ErrorKind) {
    dropped_as(shard, |s| match kind {
        ErrorKind::Crypto => &s.dropped_unauthenticated,
        ErrorKind::Sequence => &s.dropped_replayed,
        ErrorKind::Payload | ErrorKind::Handshake | ErrorKind::Auth => &s.dropped_violation,
        _ => &s.dropped_malformed,
    });
}

/// Count a dropped datagram in the total and under the reason `reason` picks.
fn dropped_as(shard: &Shard, reason: impl FnOnce(&ShardStats) -> &std::sync::atomic::AtomicU64) {
    let s = shard.stats();
    ShardStats::inc(&s.datagrams_dropped);
    ShardStats::inc(reason(s));
}

fn on_datagram(shard: &Rc<Shard>, udp: &Rc<UdpShard>, d: &mut [u8], from: SocketAddr) {
    let t = now();
    let ev = udp.ep.borrow_mut().handle_datagram(t, from, d);
    let s = shard.stats();
    match ev {
        DatagramEvent::Session(conn) => match on_session_datagram(&conn, udp.port.out(), d, from, t) {
            Inbound::Handled | Inbound::Closed => {}
            Inbound::Dropped(kind) => dropped_for(shard, kind),
            Inbound::Busy => dropped_as(shard, |s| &s.dropped_busy),
            Inbound::StrayAck => dropped_as(shard, |s| &s.dropped_stray_ack),
            Inbound::Handshake(_) => dropped(shard),
        },
        DatagramEvent::Incoming(inc) => admit(shard, udp, inc),
        DatagramEvent::Done(h) => match h {
            Handled::Step => {}
            Handled::CookieSent => ShardStats::inc(&s.cookies_sent),
            Handled::CookieSentKnown => {
                ShardStats::inc(&s.cookies_sent);
                ShardStats::inc(&s.cookies_sent_known);
            }
            Handled::RateLimited => ShardStats::inc(&s.cookie_rate_limited),
            Handled::CookieInvalid | Handled::CookieReplayed => ShardStats::inc(&s.cookies_refused),
            Handled::PeerTableFull => ShardStats::inc(&s.refused_over_limit),
            // Devices acknowledge both copies of HELLO_RETRY, which left no state to match
            // them against: expected, and not malformed.
            Handled::StrayAck => dropped_as(shard, |s| &s.dropped_stray_ack),
            Handled::Unverified => dropped_as(shard, |s| &s.dropped_unauthenticated),
            Handled::Malformed => dropped(shard),
        },
    }
}

/// A valid cookie HELLO: the admission checks, cheapest first (lockout, handshake slots,
/// session limits), before any state or crypto.
fn admit(shard: &Rc<Shard>, udp: &Rc<UdpShard>, inc: Incoming) {
    let s = shard.stats();
    let (from, device) = (inc.from, inc.hello.device_id);
    if shard.refuse_locked(from, &device) {
        return;
    }
    if shard.handshakes.get() >= shard.shared.cfg.max_handshakes_per_shard || shard.is_stopping() {
        ShardStats::inc(&s.refused_over_limit);
        return;
    }
    // A session from the same address being replaced keeps its slot until it ends.
    if !shard.shared.reserve(from.ip()) {
        ShardStats::inc(&s.refused_over_limit);
        return;
    }
    shard.handshakes.set(shard.handshakes.get() + 1);
    let ticket = {
        let u = Rc::downgrade(udp);
        shard.register_pending(Rc::new(move || {
            if let Some(u) = u.upgrade() {
                u.evicted.borrow_mut().push(from);
                u.wake.notify();
            }
        }))
    };
    if let Some((old, _)) = udp.pending.borrow_mut().insert(from, (ticket, now())) {
        shard.unregister_pending(old);
    }
    udp.ep.borrow_mut().accept(now(), inc);
    udp.wake.notify();
}

/// Send what the endpoint queued and act on its events, until it has nothing more to say.
fn drive(shard: &Rc<Shard>, udp: &Rc<UdpShard>, handler: &Arc<Handler>) {
    loop {
        while let Some(t) = udp.ep.borrow_mut().poll_transmit() {
            udp.port.out().send(t.bytes(), t.to);
        }
        let Some(ev) = udp.ep.borrow_mut().poll_event() else { break };
        match ev {
            Event::KeyNeeded { from, device_id } => key_needed(shard, udp, from, device_id),
            Event::Established { from, est } => {
                let conn =
                    Conn::with_links(ProtoSession::new(&est, Transport::Udp), from, Some(udp.links.clone()));
                let old = udp.ep.borrow_mut().attach(from, conn.clone());
                if let Some(old) = old {
                    old.close(CloseReason::Replaced, false);
                }
                ended(shard, udp, from);
                ShardStats::inc(&shard.stats().handshakes_ok);
                if let Some((_, started)) = udp.pending.borrow_mut().remove(&from) {
                    shard.shared.hs_latency[shard.idx].record(now().saturating_sub(started));
                }
                // From here the session runs without a task of its own: datagrams, the
                // application and the port's timers drive it, and the reaper unregisters it
                // (and releases its limit slot).
                open_session(shard, &conn, handler);
            }
            Event::Failed { from, device_id, reason } => {
                ended(shard, udp, from);
                udp.pending.borrow_mut().remove(&from);
                shard.shared.release(from.ip());
                // Refusals (over budget, superseded) were counted when made: `record_failure`
                // counts them no further (`outcome::HandshakeError::counter`).
                record_failure(shard, from, Failure { reason: reason.into(), device: Some(device_id) });
            }
            Event::SessionOkUnacked(conn) => {
                // Retransmitted SESSION_OK until acknowledged, unless the device's traffic
                // proved it arrived.
                if conn.stats().frames_in == 0 {
                    conn.close(CloseReason::PeerGone, false);
                }
            }
        }
    }
    udp.wake.notify();
}

/// A handshake left the shard's handshake table (either way).
fn ended(shard: &Shard, udp: &UdpShard, from: SocketAddr) {
    shard.handshakes.set(shard.handshakes.get().saturating_sub(1));
    if let Some((ticket, _)) = udp.pending.borrow().get(&from) {
        shard.unregister_pending(*ticket);
    }
}

/// Key lookup first, then the X25519 budget (an unregistered device never spends it), then
/// the endpoint's step 2. Resolvers that need I/O answer from a task of their own.
fn key_needed(shard: &Rc<Shard>, udp: &Rc<UdpShard>, from: SocketAddr, device: [u8; 6]) {
    let src = shard.shared.cfg.psk.as_ref();
    let now_key = match src {
        None => Some(None),
        Some(PskSource::Single(p)) => Some(Some(p.clone())),
        Some(PskSource::Registry { current, .. }) => Some(current.read().lookup(&device).cloned()),
        Some(PskSource::Resolver(_)) => None,
    };
    match now_key {
        Some(psk) => {
            let d = decide(shard, psk);
            udp.ep.borrow_mut().handle_key(now(), from, d);
        }
        None => {
            let (shard, udp) = (shard.clone(), udp.clone());
            monoio::spawn(async move {
                let psk = match shard.shared.cfg.psk.as_ref() {
                    Some(src) => src.lookup(device).await,
                    None => None,
                };
                let d = decide(&shard, psk);
                udp.ep.borrow_mut().handle_key(now(), from, d);
                udp.wake.notify(); // the timer task sends what it queued
            });
        }
    }
}

fn decide(shard: &Shard, psk: Option<Psk>) -> KeyDecision {
    let Some(psk) = psk else { return KeyDecision::Unregistered };
    // X25519 only within the shard's budget: a flood cannot take every cycle from live sessions.
    if !shard.crypto_allowed() {
        ShardStats::inc(&shard.stats().refused_over_limit);
        return KeyDecision::OverBudget;
    }
    let r =
        (EphemeralKey::generate(&shard.rng), wire::random::<32>(&shard.rng), wire::random::<16>(&shard.rng));
    match r {
        (Ok(key), Ok(nonce), Ok(session_id)) => KeyDecision::Key { psk, key, nonce, session_id },
        _ => KeyDecision::OverBudget,
    }
}
