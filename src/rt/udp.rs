//! UDP plumbing shared by the gateway and the client: one outgoing datagram queue per socket
//! drained by a sender task (one send in flight per socket works on both io_uring and epoll),
//! the per-session stop-and-wait pump, and the receive-side handling of a session's datagrams
//! (UTACKs sent only after a frame authenticated; authentic duplicates re-ACKed).

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::time::Duration;

use monoio::net::udp::UdpSocket;
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage};

use super::conn::{CloseReason, Conn, FrameOutcome};
use super::event::LocalEvent;
use super::now;
use crate::proto::arq::ArqAction;
use crate::proto::frame::{Frame, PacketType, MAX_FRAME_LEN};
use crate::proto::udp::{encode_utack, is_utack, MAX_ATTEMPTS};
use crate::proto::ErrorKind;

/// Datagrams queued per socket before new ones are dropped (UDP semantics under overload).
const MAX_QUEUED: usize = 65_536;
/// Spare buffers kept for reuse: enough for a busy loop turn; a burst's worth beyond this is
/// freed rather than held for the life of the socket.
const MAX_POOLED: usize = 512;
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

/// A queued datagram: bytes, destination, and the local address to send it from (a device
/// behind a shared endpoint; `None`: the socket's own).
pub(crate) type Outgoing = (Vec<u8>, SocketAddr, Option<IpAddr>);

/// The outgoing side of one UDP socket.
#[derive(Default)]
pub struct UdpOut {
    queue: RefCell<VecDeque<Outgoing>>,
    ev: LocalEvent,
    pool: RefCell<Vec<Vec<u8>>>,
    stopped: Cell<bool>,
    /// A device's view of a shared socket: its datagrams join that socket's queue, marked
    /// with the device's source address.
    via: Option<(Rc<UdpOut>, IpAddr)>,
    /// Datagrams dropped because the queue was full.
    pub overflow: Cell<u64>,
}

impl UdpOut {
    /// A new queue.
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// A view of `shared` whose datagrams leave from `src`.
    pub(crate) fn via(shared: Rc<UdpOut>, src: IpAddr) -> Rc<Self> {
        Rc::new(UdpOut { via: Some((shared, src)), ..Self::default() })
    }

    /// Queue a copy of `bytes` for `to` (buffers are pooled: no allocation in steady state).
    pub fn send(&self, bytes: &[u8], to: SocketAddr) {
        match &self.via {
            Some((shared, src)) => shared.push(bytes, to, Some(*src)),
            None => self.push(bytes, to, None),
        }
    }

    fn push(&self, bytes: &[u8], to: SocketAddr, from: Option<IpAddr>) {
        let mut q = self.queue.borrow_mut();
        if q.len() >= MAX_QUEUED {
            self.overflow.set(self.overflow.get() + 1);
            return;
        }
        let mut b = self.pool.borrow_mut().pop().unwrap_or_else(|| Vec::with_capacity(MAX_FRAME_LEN));
        b.clear();
        b.extend_from_slice(bytes);
        q.push_back((b, to, from));
        drop(q);
        self.ev.notify_one();
    }

    /// The next datagram to send, if any.
    fn pop(&self) -> Option<Outgoing> {
        self.queue.borrow_mut().pop_front()
    }

    /// Put back a datagram the socket could not take yet (it goes out first).
    pub(crate) fn unpop(&self, d: Outgoing) {
        self.queue.borrow_mut().push_front(d);
    }

    /// Hand a sent datagram's buffer back for reuse.
    pub(crate) fn recycle(&self, buf: Vec<u8>) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < MAX_POOLED {
            pool.push(buf);
        }
    }

    /// Wait until a datagram is queued or the queue is stopped; `None` once stopped and empty.
    pub(crate) async fn next(&self) -> Option<Outgoing> {
        loop {
            let wait = self.ev.wait();
            if let Some(d) = self.pop() {
                return Some(d);
            }
            if self.stopped.get() {
                return None;
            }
            wait.await;
        }
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

/// Drain `out` into `sock` with one io_uring send at a time until [`UdpOut::stop`] (a
/// client's own socket, one device's traffic; shared sockets use [`send_loop_direct`]).
pub async fn send_loop(sock: Rc<UdpSocket>, out: Rc<UdpOut>) {
    while let Some((buf, to, _)) = out.next().await {
        let (_, buf) = sock.send_to(buf, to).await;
        out.recycle(buf);
    }
}

/// A datagram read by [`recv_nonblocking`].
pub(crate) struct Received {
    pub len: usize,
    pub from: SocketAddr,
    /// The local address it was sent to (sockets with `IP_PKTINFO` on).
    pub to: Option<IpAddr>,
}

/// Space for the control message [`recv_nonblocking`] reads on `IP_PKTINFO` sockets
/// (allocated once per socket, not per datagram).
pub(crate) fn pktinfo_space() -> Vec<u8> {
    nix::cmsg_space!(libc::in_pktinfo)
}

/// Read one datagram without blocking (`Err(EAGAIN)`: none waiting), with its destination
/// address when `cmsg` (see [`pktinfo_space`]) is given. `Ok(None)`: one was consumed but is
/// unusable (truncated: larger than any valid datagram; no sender address).
pub(crate) fn recv_nonblocking(
    fd: RawFd,
    buf: &mut [u8],
    cmsg: Option<&mut [u8]>,
) -> Result<Option<Received>, Errno> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, cmsg, MsgFlags::MSG_DONTWAIT)?;
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Ok(None);
    }
    let from = match msg.address {
        Some(a) => match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())),
            (_, Some(v6)) => {
                SocketAddr::V6(SocketAddrV6::new(v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()))
            }
            _ => return Ok(None),
        },
        None => return Ok(None),
    };
    let mut to = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::Ipv4PacketInfo(pi) = c {
                to = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr))));
            }
        }
    }
    Ok(Some(Received { len: msg.bytes, from, to }))
}

/// Send one datagram without blocking (`Err(EAGAIN)`: the socket buffer is full), from the
/// IPv4 address `src` when given (`IP_PKTINFO`), else from the socket's own address.
pub(crate) fn send_nonblocking(
    fd: RawFd,
    buf: &[u8],
    to: SocketAddr,
    src: Option<IpAddr>,
) -> Result<(), Errno> {
    let to = SockaddrStorage::from(to);
    let pi = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr {
            s_addr: match src {
                Some(IpAddr::V4(a)) => u32::from(a).to_be(),
                _ => 0,
            },
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let with_src = [ControlMessage::Ipv4PacketInfo(&pi)];
    let cmsgs: &[ControlMessage] = if src.is_some() { &with_src } else { &[] };
    sendmsg(fd, &[IoSlice::new(buf)], cmsgs, MsgFlags::MSG_DONTWAIT, Some(&to)).map(|_| ())
}

/// Drain `out` into `sock` with non-blocking sends until [`UdpOut::stop`], waiting for
/// writability only when the socket buffer is full: a busy socket sends a whole queue per
/// wake-up without an operation per datagram. `refused` counts each datagram the kernel
/// would not take (no route, not permitted, …), which is dropped.
pub(crate) async fn send_loop_direct(sock: &UdpSocket, out: &UdpOut, refused: impl Fn()) {
    let fd = sock.as_raw_fd();
    while let Some((buf, to, src)) = out.next().await {
        match send_nonblocking(fd, &buf, to, src) {
            Ok(()) => out.recycle(buf),
            Err(Errno::EAGAIN) => {
                out.unpop((buf, to, src));
                if sock.writable(false).await.is_err() {
                    break;
                }
            }
            Err(Errno::EINTR) => out.unpop((buf, to, src)),
            Err(_) => {
                refused();
                out.recycle(buf);
            }
        }
    }
}

/// Advance one session's stop-and-wait sender at `t`: retransmit or give up when the frame in
/// flight is due, send the next queued frame when none is in flight. The frame in flight stays
/// first in the connection's output until its UTACK arrives, so nothing is copied to keep it.
/// Returns whether the session is finished: closing with nothing left to deliver.
pub(crate) fn step(conn: &Conn, out: &UdpOut, t: Duration) -> bool {
    if conn.abandon.get() {
        conn.arq.borrow_mut().assume_acked();
        return true;
    }
    let action = conn.arq.borrow_mut().handle_timeout(t);
    match action {
        ArqAction::Wait => {}
        ArqAction::Retransmit(attempt) => {
            conn.bump(|s| s.retransmits += 1);
            // The last attempts go out twice, back to back: the same frame (never a second
            // one), so a device's one spare datagram slot only ever holds a copy.
            let copies = if attempt + LAST_ATTEMPTS_DOUBLED >= MAX_ATTEMPTS { 2 } else { 1 };
            conn.head_frame(|f, _| {
                for _ in 0..copies {
                    out.send(f, conn.peer());
                }
            });
        }
        ArqAction::GiveUp => {
            conn.close(CloseReason::PeerGone, false);
            return true;
        }
    }
    if !conn.arq.borrow().is_busy() {
        let sent = conn.head_frame(|f, expect| {
            out.send(f, conn.peer());
            expect
        });
        match sent {
            Some(Some(expect)) => conn.arq.borrow_mut().on_send(expect, t),
            // A frame without its expected UTACK cannot be in the queue; never spin on one.
            Some(None) => conn.pop_head(),
            None => {}
        }
    }
    conn.close_reason().is_some() && !conn.arq.borrow().is_busy() && conn.is_drained()
}

/// Stop-and-wait sender of one session as a task (the client's): wakes when output is
/// queued, a UTACK arrives or the frame in flight is due; five silent attempts end the
/// session (`PeerGone`). Returns when the session is closed and its last frame (BYE) was
/// delivered or abandoned.
pub async fn pump(conn: Rc<Conn>, out: Rc<UdpOut>) {
    loop {
        let wait = conn.ev_wait();
        if step(&conn, &out, now()) {
            break;
        }
        let deadline = conn.arq.borrow().poll_timeout();
        match deadline {
            // Dropping an event wait is free: no I/O is lost (unlike a socket read).
            Some(at) => {
                let _ = monoio::time::timeout(at.saturating_sub(now()), wait).await;
            }
            None => wait.await,
        }
    }
    conn.set_done();
}

/// The session side of one UDP socket shared by all its sessions (the gateway's): the outgoing
/// queue, one timer queue for every session's frame in flight, and the sessions that finished.
/// A session then needs no task of its own: datagrams, UTACKs and application sends drive it
/// inline, and [`UdpPort::run_timers`] drives retransmissions.
pub struct UdpPort {
    out: Rc<UdpOut>,
    timers: RefCell<BinaryHeap<Reverse<Timer>>>,
    timer_ev: LocalEvent,
    finished: RefCell<Vec<Rc<Conn>>>,
    finished_ev: LocalEvent,
    stopped: Cell<bool>,
}

struct Timer {
    at: Duration,
    conn: Weak<Conn>,
}

impl PartialEq for Timer {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timer {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.at.cmp(&o.at)
    }
}

impl UdpPort {
    /// A port sending through `out`.
    pub fn new(out: Rc<UdpOut>) -> Rc<Self> {
        Rc::new(UdpPort {
            out,
            timers: RefCell::new(BinaryHeap::new()),
            timer_ev: LocalEvent::default(),
            finished: RefCell::new(Vec::new()),
            finished_ev: LocalEvent::default(),
            stopped: Cell::new(false),
        })
    }

    /// The outgoing queue.
    pub fn out(&self) -> &UdpOut {
        &self.out
    }

    /// Make sure `conn` is looked at no later than `at`. A connection keeps at most one timer
    /// unless its deadline moves earlier (RTO shrinking): stale timers find nothing due.
    pub(crate) fn arm(&self, conn: &Conn, at: Duration) {
        if conn.timer_at().is_some_and(|a| a <= at) {
            return;
        }
        conn.set_timer_at(Some(at));
        let mut timers = self.timers.borrow_mut();
        let earliest = timers.peek().is_none_or(|Reverse(top)| at < top.at);
        timers.push(Reverse(Timer { at, conn: conn.weak() }));
        drop(timers);
        if earliest {
            self.timer_ev.notify();
        }
    }

    /// `conn` has nothing left to deliver and is closed: hand it to [`UdpPort::take_finished`].
    pub(crate) fn finished(&self, conn: Rc<Conn>) {
        self.finished.borrow_mut().push(conn);
        self.finished_ev.notify();
    }

    /// Sessions finished since the last call (their owner unregisters them).
    pub fn take_finished(&self) -> Vec<Rc<Conn>> {
        std::mem::take(&mut *self.finished.borrow_mut())
    }

    /// Wait until a session finished (or [`UdpPort::stop`]).
    pub async fn wait_finished(&self) {
        loop {
            let wait = self.finished_ev.wait();
            if !self.finished.borrow().is_empty() || self.stopped.get() {
                return;
            }
            wait.await;
        }
    }

    /// Let [`UdpPort::run_timers`] return.
    pub fn stop(&self) {
        self.stopped.set(true);
        self.timer_ev.notify();
        self.finished_ev.notify();
    }

    /// Whether [`UdpPort::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.get()
    }

    /// Drive every session's retransmissions until [`UdpPort::stop`].
    pub async fn run_timers(self: Rc<Self>) {
        loop {
            let wait = self.timer_ev.wait();
            if self.stopped.get() {
                return;
            }
            let t = now();
            loop {
                let due = {
                    let mut timers = self.timers.borrow_mut();
                    match timers.peek() {
                        Some(Reverse(top)) if top.at <= t => timers.pop().map(|Reverse(x)| x),
                        _ => None,
                    }
                };
                let Some(timer) = due else { break };
                let Some(conn) = timer.conn.upgrade() else { continue };
                if conn.timer_at().is_some_and(|a| a <= timer.at) {
                    conn.set_timer_at(None);
                }
                if !conn.is_done() {
                    conn.kick();
                }
            }
            let next = self.timers.borrow().peek().map(|Reverse(top)| top.at);
            match next {
                Some(at) => {
                    let _ = monoio::time::timeout(at.saturating_sub(now()), wait).await;
                }
                None => wait.await,
            }
        }
    }
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
    /// Left unacknowledged because the application is not keeping up (the device retransmits
    /// it later: UDP's backpressure).
    Busy,
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
            conn.pop_head();
            conn.kick();
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
    // Only messages wait; control frames (PING, BYE, REKEY) always get through.
    if matches!(ptype, PacketType::Data | PacketType::DataFrag) && conn.input_blocked() {
        return Inbound::Busy;
    }
    // The UTACK's MAC key is the key this frame was sealed with: our rx key *before* opening
    // it (a REKEY switches keys while being opened).
    let key = *conn.session().rx_key_bytes();
    let ack = |out: &UdpOut| {
        let (b, n) = encode_utack(ptype as u8, seq, Some(&key));
        // A lost UTACK costs the sender a retransmission, and five lost attempts end the
        // session: once this peer has shown ACK loss, send copies (senders ignore UTACKs
        // that match nothing, so a copy is harmless).
        let lossy = conn.ack_loss_seen().is_some_and(|t| now().saturating_sub(t) < ACK_LOSS_MEMORY);
        for _ in 0..if lossy { UTACK_COPIES } else { 1 } {
            out.send(&b[..n], peer);
        }
    };
    match conn.on_frame(d) {
        FrameOutcome::Accepted => {
            ack(out);
            Inbound::Handled
        }
        FrameOutcome::AcceptedHeld => {
            // The application holds this message's UTACK (until it is stored downstream):
            // hand it the bytes. Retransmissions meanwhile meet a blocked input and go
            // unanswered, so the device hears of the message only once it is safe.
            let (b, n) = encode_utack(ptype as u8, seq, Some(&key));
            if let (Some(hook), Some(me)) = (conn.links_hook(), conn.weak().upgrade()) {
                hook.on_ack_held(&me, &b[..n]);
            }
            Inbound::Handled
        }
        FrameOutcome::AcceptedAndClosed => {
            ack(out);
            Inbound::Closed
        }
        FrameOutcome::Rejected(ErrorKind::Sequence) if conn.session().verify_duplicate(d) => {
            // A retransmission whose UTACK was lost: acknowledge again, deliver nothing.
            conn.note_ack_loss(now());
            ack(out);
            Inbound::Handled
        }
        FrameOutcome::Rejected(kind) => Inbound::Dropped(kind),
        FrameOutcome::Closed => Inbound::Closed,
    }
}
