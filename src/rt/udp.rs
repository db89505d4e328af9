//! UDP plumbing shared by the gateway and the client: one outgoing datagram queue per socket
//! drained by a sender task (one send in flight per socket works on both io_uring and epoll),
//! the per-session stop-and-wait pump, and the receive-side handling of a session's datagrams
//! (UTACKs sent only after a frame authenticated; authentic duplicates re-ACKed).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;

use monoio::net::udp::UdpSocket;

use super::conn::{CloseReason, Conn, FrameOutcome};
use super::event::LocalEvent;
use super::now;
use crate::proto::arq::ArqAction;
use crate::proto::frame::{Frame, PacketType, MAX_FRAME_LEN};
use crate::proto::udp::{encode_utack, is_utack, MAX_ATTEMPTS};
use crate::proto::ErrorKind;

/// Datagrams queued per socket before new ones are dropped (UDP semantics under overload).
const MAX_QUEUED: usize = 65_536;
/// Spare buffers kept for reuse.
const MAX_POOLED: usize = 4096;
/// Copies of each session-phase UTACK once the peer has shown it loses them: on a link losing
/// a fraction `p` of datagrams an attempt then fails with about `p + p²` instead of `2p`, and
/// `(p + p²)^5` is what loses a session (at 10 % loss: 1.5e-5 per frame instead of 2.5e-4).
/// On a clean link one copy is sent: the second costs a syscall per frame on both sides.
pub const UTACK_COPIES: usize = 2;
/// How long after the last sign of UTACK loss the copies keep going out.
pub const ACK_LOSS_MEMORY: std::time::Duration = std::time::Duration::from_secs(30);
/// How many of the final transmissions are sent as two copies. With loss `p` per datagram a
/// frame is then lost for good with about `(p+p²)^3 · (p²)^2` instead of `(p+p²)^5`:
/// at 10 % loss 1.3e-7 per frame instead of 1.5e-5.
pub const LAST_ATTEMPTS_DOUBLED: u32 = 2;
/// Receive buffer: larger than any valid datagram, so oversize ones are seen (and dropped).
pub const RECV_BUF_LEN: usize = 2048;

/// The outgoing side of one UDP socket.
#[derive(Default)]
pub struct UdpOut {
    queue: RefCell<VecDeque<(Vec<u8>, SocketAddr)>>,
    ev: LocalEvent,
    pool: RefCell<Vec<Vec<u8>>>,
    stopped: Cell<bool>,
    /// Datagrams dropped because the queue was full.
    pub overflow: Cell<u64>,
}

impl UdpOut {
    /// A new queue.
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// Queue a copy of `bytes` for `to` (buffers are pooled: no allocation in steady state).
    pub fn send(&self, bytes: &[u8], to: SocketAddr) {
        let mut q = self.queue.borrow_mut();
        if q.len() >= MAX_QUEUED {
            self.overflow.set(self.overflow.get() + 1);
            return;
        }
        let mut b = self.pool.borrow_mut().pop().unwrap_or_else(|| Vec::with_capacity(MAX_FRAME_LEN));
        b.clear();
        b.extend_from_slice(bytes);
        q.push_back((b, to));
        drop(q);
        self.ev.notify_one();
    }

    /// Let the sender task finish once the queue is empty.
    pub fn stop(&self) {
        self.stopped.set(true);
        self.ev.notify();
    }

    /// Datagrams waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
    }
}

/// Drain `out` into `sock` until [`UdpOut::stop`]. Several of these may drain one queue
/// (io_uring); each datagram is sent once, by whichever loop takes it.
pub async fn send_loop(sock: Rc<UdpSocket>, out: Rc<UdpOut>) {
    loop {
        let wait = out.ev.wait();
        let next = out.queue.borrow_mut().pop_front();
        match next {
            Some((buf, to)) => {
                let (_, buf) = sock.send_to(buf, to).await;
                let mut pool = out.pool.borrow_mut();
                if pool.len() < MAX_POOLED {
                    pool.push(buf);
                }
            }
            None if out.stopped.get() => return,
            None => wait.await,
        }
    }
}

/// Stop-and-wait sender of one session: one frame in flight, retransmitted on the ARQ's
/// schedule; five silent attempts end the session (`PeerGone`). Returns when the session is
/// closed and its last frame (BYE) was delivered or abandoned.
pub async fn pump(conn: Rc<Conn>, out: Rc<UdpOut>, peer: SocketAddr) {
    // This future and `cur` live as long as the session: an idle session holds neither a
    // frame buffer nor a timer (the timer is boxed, and only exists while a frame is in flight).
    let mut cur = Vec::new();
    'frames: loop {
        let wait = conn.out_ev_wait();
        let Some(expect) = conn.take_frame(&mut cur) else {
            if conn.close_reason().is_some() {
                break;
            }
            cur = Vec::new();
            wait.await;
            continue;
        };
        conn.arq.borrow_mut().on_send(expect, now());
        out.send(&cur, peer);
        loop {
            let acked = conn.ack_ev.wait();
            if conn.abandon.get() {
                conn.arq.borrow_mut().assume_acked();
                break 'frames;
            }
            let Some(deadline) = conn.arq.borrow().poll_timeout() else { continue 'frames };
            let left = deadline.saturating_sub(now());
            if !left.is_zero() {
                // Dropping an event wait is free: no I/O is lost (unlike a socket read).
                let _ = Box::pin(monoio::time::timeout(left, acked)).await;
                continue;
            }
            let action = conn.arq.borrow_mut().handle_timeout(now());
            match action {
                ArqAction::Wait => {}
                ArqAction::Retransmit(attempt) => {
                    conn.bump(|s| s.retransmits += 1);
                    // The last attempts go out twice, back to back: the same frame (never a
                    // second one), so a device's one spare datagram slot only ever holds a copy.
                    let copies = if attempt + LAST_ATTEMPTS_DOUBLED >= MAX_ATTEMPTS { 2 } else { 1 };
                    for _ in 0..copies {
                        out.send(&cur, peer);
                    }
                }
                ArqAction::GiveUp => {
                    conn.close(CloseReason::PeerGone, false);
                    break 'frames;
                }
            }
        }
    }
    conn.set_done();
}

/// What a session's datagram turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Handled here (UTACK, accepted or re-ACKed frame).
    Handled,
    /// Dropped: malformed, unauthenticated, replayed, out of order (reason inside).
    Dropped(ErrorKind),
    /// A UTACK that acknowledges nothing outstanding (late, duplicate, forged).
    StrayAck,
    /// A handshake-phase frame (type inside): the caller decides (re-ACK, new handshake).
    Handshake(PacketType),
    /// The session ended with this datagram.
    Closed,
}

/// Handle one datagram from the peer of an established UDP session: a UTACK completes the
/// frame in flight (if it matches, MAC included); a frame is opened and, only once it
/// authenticated, acknowledged with the key of its direction.
pub fn on_session_datagram(conn: &Conn, out: &UdpOut, d: &mut [u8], peer: SocketAddr) -> Inbound {
    if is_utack(d) {
        if conn.arq.borrow_mut().handle_ack(d, now()) {
            conn.ack_ev.notify();
            return Inbound::Handled;
        }
        return Inbound::StrayAck;
    }
    let frame = match Frame::decode_exact(d) {
        Ok(f) => f,
        Err(e) => return Inbound::Dropped(e.kind()),
    };
    let (ptype, seq) = (frame.packet_type(), frame.seq());
    if !ptype.is_encrypted() {
        return Inbound::Handshake(ptype);
    }
    // The UTACK's MAC key is the key this frame was sealed with: our rx key *before* opening
    // it (a REKEY switches keys while being opened).
    let key = *conn.session().rx_key_bytes();
    let ack = |out: &UdpOut| {
        let (b, n) = encode_utack(ptype as u8, seq, Some(&key));
        // A lost UTACK costs the sender a retransmission, and five lost attempts end the
        // session: once this peer has shown ACK loss, send copies (senders ignore UTACKs
        // that match nothing, so a copy is harmless).
        let lossy = conn.ack_loss_seen.get().is_some_and(|t| now().saturating_sub(t) < ACK_LOSS_MEMORY);
        for _ in 0..if lossy { UTACK_COPIES } else { 1 } {
            out.send(&b[..n], peer);
        }
    };
    match conn.on_frame(d) {
        FrameOutcome::Accepted => {
            ack(out);
            Inbound::Handled
        }
        FrameOutcome::AcceptedAndClosed => {
            ack(out);
            Inbound::Closed
        }
        FrameOutcome::Rejected(ErrorKind::Sequence) if conn.session().verify_duplicate(d) => {
            // A retransmission whose UTACK was lost: acknowledge again, deliver nothing.
            conn.ack_loss_seen.set(Some(now()));
            ack(out);
            Inbound::Handled
        }
        FrameOutcome::Rejected(kind) => Inbound::Dropped(kind),
        FrameOutcome::Closed => Inbound::Closed,
    }
}
