//! TCP: the accept loop, and each connection's handshake under its timeout, the lockout and
//! the crypto budget, before it becomes a session.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::{TcpListener, TcpStream};

use super::outcome::{HandshakeError, Refusal};
use super::registry::{close_session, open_session};
use super::shard::{record_failure, Failure, Shard};
use super::stats::ShardStats;
use super::Handler;
use crate::proto::crypto::EphemeralKey;
use crate::proto::deframer::Deframer;
use crate::proto::frame::Frame;
use crate::proto::handshake::{decode_hello, ServerExpectHelloAck, MAX_HANDSHAKE_FRAME_LEN};
use crate::proto::session::Session as ProtoSession;
use crate::proto::Transport;
use crate::rt::conn::Conn;
use crate::rt::{now, wire, Error};

/// Accept TCP connections until the shard stops; each gets a task of its own.
pub(super) async fn accept_loop(shard: &Rc<Shard>, listener: TcpListener, handler: &Arc<Handler>) {
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

async fn serve_conn(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, handler: Arc<Handler>) {
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
    // TCP_NODELAY and TCP_USER_TIMEOUT come from the listener (`bind::bind_sockets`).
    // Registered once with the shard's epoll for the connection's whole life (handshake and
    // session): no io_uring poll armed per read.
    let mut stream = match wire::into_poll(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(shard = shard.idx, %peer, error = %e, "cannot register the connection for readiness");
            shard.shared.release(ip);
            return;
        }
    };
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
    monoio::spawn(crate::rt::tcp::drive_then(conn, stream, deframer, move |c| close_session(&shard, c)));
}

/// Run the handshake under its timeout and the eviction hook; failures are recorded here.
async fn accept_handshake(
    shard: &Rc<Shard>,
    stream: &mut TcpStreamPoll,
    peer: SocketAddr,
    deframer: &mut Deframer,
) -> Option<ProtoSession> {
    shard.handshakes.set(shard.handshakes.get() + 1);
    let started = now();
    let device = Cell::new(None);
    let abort = Rc::new(wire::Abort::default());
    let pending = {
        let a = abort.clone();
        shard.register_pending(Rc::new(move || a.fire()))
    };
    // Boxed: the handshake's state (keys, buffers, timer) is freed when it ends instead of
    // sizing this task's future for the whole session.
    let hs = Box::pin(monoio::time::timeout(
        shard.shared.cfg.handshake_timeout,
        server_handshake(shard, stream, peer, deframer, &device, &abort),
    ))
    .await;
    shard.handshakes.set(shard.handshakes.get() - 1);
    shard.unregister_pending(pending);
    let evicted = abort.fired();
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

/// Steps 1–4 of PROTOCOL.md §3, server side.
async fn server_handshake(
    shard: &Shard,
    stream: &mut TcpStreamPoll,
    peer: SocketAddr,
    deframer: &mut Deframer,
    device: &Cell<Option<[u8; 6]>>,
    abort: &wire::Abort,
) -> Result<ProtoSession, Failure> {
    let fail = |e: Error| Failure { reason: e.into(), device: device.get() };
    let end = |reason: HandshakeError| Failure { reason, device: device.get() };
    // Step 1: HELLO.
    let f = wire::read_frame(stream, deframer, Some(abort)).await.map_err(fail)?;
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
    wire::write_all(stream, &buf[..n]).await.map_err(fail)?;
    // Step 3: HELLO_ACK, verified in constant time.
    let f = wire::read_frame(stream, deframer, Some(abort)).await.map_err(fail)?;
    Frame::decode(&f).and_then(|f| expect.verify_hello_ack(&f)).map_err(|e| fail(e.into()))?;
    // Step 4: SESSION_OK (limits were reserved at accept, so they hold before this point).
    let session_id = wire::random::<16>(&shard.rng).map_err(fail)?;
    let (est, n) = expect.finish(session_id, &mut buf).map_err(|e| fail(e.into()))?;
    // Counted before SESSION_OK leaves, so a device never sees a session the metrics miss.
    ShardStats::inc(&shard.stats().handshakes_ok);
    wire::write_all(stream, &buf[..n]).await.map_err(fail)?;
    Ok(ProtoSession::new(&est, Transport::Tcp))
}
