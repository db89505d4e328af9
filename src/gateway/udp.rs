//! A shard's UDP side: one SO_REUSEPORT socket, datagrams demultiplexed by peer address into
//! handshakes and sessions, the stateless cookie round trip before any per-peer state, and
//! every handshake frame under the stop-and-wait ARQ. Sessions then share the connection core
//! with TCP (`rt::conn`) and the UDP pump (`rt::udp`).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use monoio::net::udp::UdpSocket;
use nix::errno::Errno;

use super::shard::{close_session, links, open_session, record_failure, Failure, Shard, UNREGISTERED};
use super::stats::ShardStats;
use super::Handler;
use crate::proto::arq::{Arq, ArqAction};
use crate::proto::crypto::EphemeralKey;
use crate::proto::frame::{encode_frame, Frame, PacketType};
use crate::proto::handshake::{decode_hello, Hello, ServerExpectHelloAck};
use crate::proto::session::Session as ProtoSession;
use crate::proto::udp::{encode_utack, is_utack, CookieError, CookieJar, ExpectedAck, SourceLimiter};
use crate::proto::{ErrorKind, Transport};
use crate::rt::conn::{CloseReason, Conn, Links};
use crate::rt::event::LocalEvent;
use crate::rt::udp::{
    on_session_datagram, recv_nonblocking, send_loop_direct, Inbound, UdpOut, UdpPort, RECV_BUF_LEN,
};
use crate::rt::{now, wire, Error};

/// Datagrams read per wake-up before the sessions they woke, the senders and timers run.
const RECV_BATCH: usize = 64;
/// Handshake datagrams buffered per peer before more are dropped.
const HS_INBOX: usize = 8;

/// A handshake in progress with one address.
struct Handshake {
    /// Evicted under pressure (stalled): give up at once.
    evicted: std::cell::Cell<bool>,
    /// The cookie that opened it: its retransmitted HELLO is re-ACKed by the task, any other
    /// HELLO from the address starts over on the cookie path.
    cookie: [u8; 16],
    inbox: RefCell<VecDeque<Vec<u8>>>,
    ev: LocalEvent,
}

/// Is `d` the cookie HELLO that opened `hs` (a retransmission)?
fn is_own_hello(hs: &Handshake, d: &[u8]) -> bool {
    d.len() == 12 + 54 && d[3] == PacketType::Hello as u8 && d[12 + 38..] == hs.cookie
}

#[derive(Default, Clone)]
struct Peer {
    hs: Option<Rc<Handshake>>,
    conn: Option<Rc<Conn>>,
}

/// The UDP state of one shard.
pub(super) struct UdpShard {
    sock: Rc<UdpSocket>,
    /// Drives every session's stop-and-wait sender (no task per session).
    port: Rc<UdpPort>,
    /// What every UDP session of the shard is wired to (the port, the inline hook if any).
    links: Rc<Links>,
    peers: RefCell<HashMap<SocketAddr, Peer>>,
    cookies: RefCell<CookieJar>,
    limiter: RefCell<SourceLimiter>,
}

impl UdpShard {
    pub(super) fn new(
        sock: std::net::UdpSocket,
        secret: [u8; 32],
        per_ip: f64,
        shard: usize,
        handler: &Handler,
        app: Option<&Rc<dyn super::app::ShardApp>>,
    ) -> std::io::Result<Rc<Self>> {
        let port = UdpPort::new(UdpOut::new());
        Ok(Rc::new(UdpShard {
            sock: Rc::new(UdpSocket::from_std(sock)?),
            links: links(shard, handler, app, Some(port.clone())),
            port,
            peers: RefCell::new(HashMap::new()),
            cookies: RefCell::new(CookieJar::new(&secret)),
            // Per source: `per_ip`/s with a one-second burst; plus a shard-wide ceiling.
            limiter: RefCell::new(SourceLimiter::new(per_ip.max(10.0), per_ip, 50_000.0, 65_536)),
        }))
    }

    /// Peers with state (handshakes or sessions): what a HELLO flood must not grow.
    pub(super) fn peer_count(&self) -> usize {
        self.peers.borrow().len()
    }
}

fn unix_bucket() -> u64 {
    CookieJar::bucket(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// Start the socket's tasks: the receiver, the sender, the retransmission timers and the
/// reaper (their handles, to await at shutdown). Datagrams are read and sent with
/// non-blocking calls between readiness waits, on io_uring and epoll alike: a busy socket
/// then costs one wake-up per burst instead of an operation (and a task wake-up) per datagram.
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
        monoio::spawn(recv_loop(shard.clone(), udp.clone(), handler)),
        monoio::spawn(udp.port.clone().run_timers()),
        monoio::spawn(reaper(shard.clone(), udp.clone())),
    ]
}

/// Stop the socket's tasks (shutdown): sessions still waiting for their BYE's UTACK are
/// abandoned and unregistered.
pub(super) fn stop(shard: &Rc<Shard>, udp: &UdpShard) {
    let left: Vec<Rc<Conn>> = udp.peers.borrow().values().filter_map(|p| p.conn.clone()).collect();
    for c in left {
        c.close(CloseReason::Shutdown, false);
    }
    unregister_finished(shard, udp);
    udp.port.stop();
    udp.port.out().stop();
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
        let from = conn.peer();
        let mut peers = udp.peers.borrow_mut();
        if let Some(p) = peers.get_mut(&from) {
            if p.conn.as_ref().is_some_and(|c| Rc::ptr_eq(c, &conn)) {
                p.conn = None;
            }
            if p.hs.is_none() && p.conn.is_none() {
                peers.remove(&from);
            }
        }
    }
}

async fn recv_loop(shard: Rc<Shard>, udp: Rc<UdpShard>, handler: Arc<Handler>) {
    let fd = udp.sock.as_raw_fd();
    let mut buf = vec![0u8; RECV_BUF_LEN];
    loop {
        for _ in 0..RECV_BATCH {
            match recv_nonblocking(fd, &mut buf, None) {
                Ok(Some(d)) => {
                    ShardStats::inc(&shard.stats().datagrams_in);
                    on_datagram(&shard, &udp, &mut buf[..d.len], d.from, &handler);
                }
                Ok(None) => {
                    ShardStats::inc(&shard.stats().datagrams_in);
                    dropped(&shard); // larger than any valid datagram
                }
                Err(Errno::EINTR) => {}
                Err(_) => break, // EAGAIN: drained
            }
        }
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

fn send_utack(udp: &UdpShard, ptype: u8, seq: u32, to: SocketAddr) {
    let (b, n) = encode_utack(ptype, seq, None);
    udp.port.out().send(&b[..n], to);
}

fn on_datagram(
    shard: &Rc<Shard>,
    udp: &Rc<UdpShard>,
    d: &mut [u8],
    from: SocketAddr,
    handler: &Arc<Handler>,
) {
    let peer = udp.peers.borrow().get(&from).cloned().unwrap_or_default();
    // Handshake-phase traffic (types 1–4 and their UTACKs) goes to the handshake in progress.
    let handshake_phase =
        if is_utack(d) { d[2] < 5 } else { d.len() >= 4 && d[3] < 5 && d[3] != PacketType::Hello as u8 };
    let to_hs = |hs: &Handshake| handshake_phase || is_own_hello(hs, d);
    if let Some(hs) = peer.hs.as_ref().filter(|hs| to_hs(hs)) {
        let mut q = hs.inbox.borrow_mut();
        if q.len() < HS_INBOX {
            q.push_back(d.to_vec());
            hs.ev.notify();
        } else {
            dropped(shard);
        }
        return;
    }
    if let Some(conn) = &peer.conn {
        match on_session_datagram(conn, udp.port.out(), d, from) {
            Inbound::Handled | Inbound::Closed => return,
            Inbound::Dropped(kind) => return dropped_for(shard, kind),
            Inbound::Busy => return dropped_as(shard, |s| &s.dropped_busy),
            Inbound::StrayAck => return dropped_as(shard, |s| &s.dropped_stray_ack),
            Inbound::Handshake(PacketType::HelloAck) => {
                // Our UTACK of HELLO_ACK was lost: acknowledge again, process nothing.
                if let Ok(f) = Frame::decode_exact(d) {
                    send_utack(udp, PacketType::HelloAck as u8, f.seq(), from);
                }
                return;
            }
            Inbound::Handshake(PacketType::Hello) => {} // a new handshake: the cookie path below
            Inbound::Handshake(_) => return dropped(shard),
        }
    }
    cookie_path(shard, udp, d, from, handler);
}

/// Stateless until a valid cookie comes back: HELLO (38 B) → UTACK + HELLO_RETRY; HELLO with
/// cookie (54 B) → checks, cheapest first, then the handshake task.
fn cookie_path(shard: &Rc<Shard>, udp: &Rc<UdpShard>, d: &[u8], from: SocketAddr, handler: &Arc<Handler>) {
    if is_utack(d) {
        // Devices acknowledge both copies of HELLO_RETRY, which left no state to match them
        // against: expected, and not malformed.
        return dropped_as(shard, |s| &s.dropped_stray_ack);
    }
    let Ok(frame) = Frame::decode_exact(d) else { return dropped(shard) };
    let Ok(hello) = decode_hello(&frame) else { return dropped(shard) };
    let s = shard.stats();
    let Some(cookie) = hello.cookie else {
        if !udp.limiter.borrow_mut().allow(from.ip(), now()) {
            ShardStats::inc(&s.cookie_rate_limited);
            return;
        }
        let c = udp.cookies.borrow().issue(from, &hello.device_id, &hello.pub_c, unix_bucket());
        send_utack(udp, PacketType::Hello as u8, hello.seq, from);
        let mut b = [0u8; 32];
        let n = encode_frame(PacketType::HelloRetry, 0, &c, &mut b).expect("cookie frame fits");
        // HELLO_RETRY travels without ARQ and a device that loses it waits for a frame that
        // never comes (the reference client does): send it twice. Devices discard the copy.
        udp.port.out().send(&b[..n], from);
        udp.port.out().send(&b[..n], from);
        ShardStats::inc(&s.cookies_sent);
        return;
    };
    match udp.cookies.borrow_mut().redeem(from, &hello.device_id, &hello.pub_c, &cookie, unix_bucket()) {
        Ok(()) => {}
        Err(CookieError::Invalid | CookieError::Replayed) => {
            ShardStats::inc(&s.cookies_refused);
            return;
        }
    }
    if shard.refuse_locked(from, &hello.device_id) {
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
    let hs = Rc::new(Handshake {
        evicted: std::cell::Cell::new(false),
        cookie,
        inbox: RefCell::new(VecDeque::new()),
        ev: LocalEvent::default(),
    });
    udp.peers.borrow_mut().entry(from).or_default().hs = Some(hs.clone());
    send_utack(udp, PacketType::Hello as u8, hello.seq, from);
    shard.handshakes.set(shard.handshakes.get() + 1);
    monoio::spawn(handshake_task(shard.clone(), udp.clone(), hs, hello, from, handler.clone()));
}

async fn next(hs: &Handshake, deadline: Option<Duration>) -> Option<Vec<u8>> {
    loop {
        let wait = hs.ev.wait();
        if let Some(d) = hs.inbox.borrow_mut().pop_front() {
            return Some(d);
        }
        let left = deadline?.saturating_sub(now());
        if left.is_zero() || monoio::time::timeout(left, wait).await.is_err() {
            return None;
        }
    }
}

fn forget_handshake(udp: &UdpShard, from: SocketAddr, hs: &Rc<Handshake>) {
    let mut peers = udp.peers.borrow_mut();
    if let Some(p) = peers.get_mut(&from) {
        if p.hs.as_ref().is_some_and(|h| Rc::ptr_eq(h, hs)) {
            p.hs = None;
        }
        if p.hs.is_none() && p.conn.is_none() {
            peers.remove(&from);
        }
    }
}

async fn handshake_task(
    shard: Rc<Shard>,
    udp: Rc<UdpShard>,
    hs: Rc<Handshake>,
    hello: Hello,
    from: SocketAddr,
    handler: Arc<Handler>,
) {
    let timeout = shard.shared.cfg.handshake_timeout;
    let started = now();
    let pending = {
        let h = hs.clone();
        shard.register_pending(Rc::new(move || {
            h.evicted.set(true);
            h.ev.notify();
        }))
    };
    let res = monoio::time::timeout(timeout, until_hello_ack(&shard, &udp, &hs, &hello, from)).await;
    shard.handshakes.set(shard.handshakes.get() - 1);
    shard.unregister_pending(pending);
    let (expect, mut arq) = match res {
        Ok(Ok(x)) => x,
        Ok(Err(f)) => return fail(&shard, &udp, &hs, from, f),
        Err(_) => {
            let f = Failure { error: Error::timeout("handshake timed out"), device: Some(hello.device_id) };
            return fail(&shard, &udp, &hs, from, f);
        }
    };
    // Step 4: SESSION_OK. Keys are installed before it leaves, so the device's first frames
    // (and the UTACKs for them) already find the session.
    let sid = match wire::random::<16>(&shard.rng) {
        Ok(s) => s,
        Err(e) => return fail(&shard, &udp, &hs, from, Failure { error: e, device: Some(hello.device_id) }),
    };
    let mut ok = [0u8; 64];
    let (est, n) = expect.finish(sid, &mut ok).expect("SESSION_OK fits");
    let conn = Conn::with_links(ProtoSession::new(&est, Transport::Udp), from, Some(udp.links.clone()));
    let old = udp.peers.borrow_mut().entry(from).or_default().conn.replace(conn.clone());
    if let Some(old) = old {
        old.close(CloseReason::Replaced, false);
    }
    arq.on_send(ExpectedAck::new(PacketType::SessionOk as u8, 0, None), now());
    ShardStats::inc(&shard.stats().handshakes_ok);
    udp.port.out().send(&ok[..n], from);
    shard.shared.hs_latency[shard.idx].record(now().saturating_sub(started));
    // From here the session runs without a task of its own: datagrams, the application and
    // the port's timers drive it, and the reaper unregisters it (and releases its limit slot).
    open_session(&shard, &conn, &handler);
    // Retransmit SESSION_OK until it is acknowledged (or the device's traffic proves it arrived).
    while arq.is_busy() && conn.close_reason().is_none() && conn.stats().frames_in == 0 {
        match next(&hs, arq.poll_timeout()).await {
            Some(d) if is_utack(&d) => {
                arq.handle_ack(&d, now());
            }
            Some(d) => {
                if let Ok(f) = Frame::decode_exact(&d) {
                    if f.packet_type() == PacketType::HelloAck {
                        send_utack(&udp, PacketType::HelloAck as u8, f.seq(), from);
                    }
                }
            }
            None => match arq.handle_timeout(now()) {
                ArqAction::Wait => {}
                ArqAction::Retransmit(_) => udp.port.out().send(&ok[..n], from),
                ArqAction::GiveUp => conn.close(CloseReason::PeerGone, false),
            },
        }
    }
    forget_handshake(&udp, from, &hs);
}

fn fail(shard: &Shard, udp: &UdpShard, hs: &Rc<Handshake>, from: SocketAddr, f: Failure) {
    record_failure(shard, from, f);
    forget_handshake(udp, from, hs);
    shard.shared.release(from.ip());
}

/// Steps 2–3 under ARQ: CHALLENGE until acknowledged (or answered), then a verified HELLO_ACK.
async fn until_hello_ack(
    shard: &Shard,
    udp: &UdpShard,
    hs: &Handshake,
    hello: &Hello,
    from: SocketAddr,
) -> Result<(ServerExpectHelloAck, Arq), Failure> {
    let fail = |error: Error| Failure { error, device: Some(hello.device_id) };
    if !shard.crypto_allowed() {
        ShardStats::inc(&shard.stats().refused_over_limit);
        return Err(fail(Error::misuse(ErrorKind::NotConnected, "handshake budget exhausted")));
    }
    let psk = match shard.shared.cfg.psk.as_ref() {
        Some(src) => src.lookup(hello.device_id).await,
        None => None,
    }
    .ok_or_else(|| {
        fail(Error::Protocol(crate::proto::Error::misbehaved(ErrorKind::Handshake, UNREGISTERED)))
    })?;
    let seed = wire::random::<32>(&shard.rng).map_err(fail)?;
    let nonce = wire::random::<32>(&shard.rng).map_err(fail)?;
    let key = EphemeralKey::from_seed(&seed).map_err(|e| fail(e.into()))?;
    let expect = ServerExpectHelloAck::new(hello, &psk, key, nonce).map_err(|e| fail(e.into()))?;
    let mut challenge = [0u8; 80];
    let n = expect.encode_challenge(&mut challenge).map_err(|e| fail(e.into()))?;
    let mut arq = Arq::default();
    arq.on_send(ExpectedAck::new(PacketType::Challenge as u8, 0, None), now());
    udp.port.out().send(&challenge[..n], from);
    loop {
        let got = next(hs, arq.poll_timeout().or(Some(now() + Duration::from_secs(3600)))).await;
        if hs.evicted.get() {
            return Err(fail(Error::timeout(super::shard::EVICTED)));
        }
        let Some(d) = got else {
            match arq.handle_timeout(now()) {
                ArqAction::Wait => continue,
                ArqAction::Retransmit(_) => {
                    udp.port.out().send(&challenge[..n], from);
                    continue;
                }
                ArqAction::GiveUp => return Err(fail(Error::timeout("device stopped answering"))),
            }
        };
        if is_utack(&d) {
            arq.handle_ack(&d, now());
            continue;
        }
        let Ok(f) = Frame::decode_exact(&d) else { continue };
        match f.packet_type() {
            // The device did not get our UTACK of its cookie HELLO: acknowledge again.
            PacketType::Hello => send_utack(udp, PacketType::Hello as u8, f.seq(), from),
            PacketType::HelloAck => {
                send_utack(udp, PacketType::HelloAck as u8, f.seq(), from);
                arq.assume_acked();
                expect.verify_hello_ack(&f).map_err(|e| fail(e.into()))?;
                return Ok((expect, Arq::default()));
            }
            _ => {}
        }
    }
}
