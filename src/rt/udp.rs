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
use crate::proto::frame::MAX_FRAME_LEN;
use crate::proto::link::{self, Link, LinkHost, SendAction};

/// Datagrams queued per socket before new ones are dropped (UDP semantics under overload).
const MAX_QUEUED: usize = 65_536;
/// Spare buffers kept for reuse: enough for a busy loop turn; a burst's worth beyond this is
/// freed rather than held for the life of the socket.
const MAX_POOLED: usize = 512;
pub use crate::proto::link::Inbound;
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

/// Advance one session's stop-and-wait sender at `t` (the rules are `proto::link`'s): send
/// what [`Link::poll`](crate::proto::link::Link::poll) says. The frame in flight stays first in
/// the connection's output until its UTACK arrives, so nothing is copied to keep it.
/// Returns whether the session is finished: closing with nothing left to deliver.
pub(crate) fn step(conn: &Conn, out: &UdpOut, t: Duration) -> bool {
    if conn.abandon.get() {
        conn.link.borrow_mut().abandon();
        return true;
    }
    match link::poll_sender(&ConnLink { conn, out, peer: conn.peer() }, t) {
        SendAction::Send { retransmit: true, .. } => conn.bump(|s| s.retransmits += 1),
        SendAction::GiveUp => {
            conn.close(CloseReason::PeerGone, false);
            return true;
        }
        // A frame without its expected UTACK cannot be in the queue; never spin on one.
        SendAction::Skip => conn.pop_head(),
        SendAction::Send { .. } | SendAction::Idle => {}
    }
    conn.close_reason().is_some() && !conn.link.borrow().is_busy() && conn.is_drained()
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
        let deadline = conn.link.borrow().poll_timeout();
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

/// A connection as the host of its UDP link, sending through `out`.
struct ConnLink<'a> {
    conn: &'a Conn,
    out: &'a UdpOut,
    peer: SocketAddr,
}

impl LinkHost for ConnLink<'_> {
    fn with_link<R>(&self, f: impl FnOnce(&mut Link) -> R) -> R {
        f(&mut self.conn.link.borrow_mut())
    }
    fn input_blocked(&self) -> bool {
        self.conn.input_blocked()
    }
    fn ack_key(&self) -> [u8; 32] {
        *self.conn.session().ack_key_bytes()
    }
    fn open(&self, _now: Duration, frame: &mut [u8]) -> FrameOutcome {
        self.conn.on_frame(frame)
    }
    fn verify_duplicate(&self, frame: &mut [u8]) -> bool {
        self.conn.session().verify_duplicate(frame)
    }
    fn acked(&self) {
        self.conn.pop_head();
        self.conn.kick();
    }
    fn send(&self, datagram: &[u8]) {
        self.out.send(datagram, self.peer);
    }
    fn has_head(&self) -> bool {
        !self.conn.is_drained()
    }
    fn send_head(&self, copies: usize) {
        self.conn.head_frame(|f| {
            for _ in 0..copies {
                self.out.send(f, self.peer);
            }
        });
    }
    fn hold_ack(&self, utack: &[u8]) {
        // The application holds this message's UTACK (until it is stored downstream): hand
        // it the bytes.
        if let (Some(hook), Some(me)) = (self.conn.links_hook(), self.conn.weak().upgrade()) {
            hook.on_ack_held(&me, utack);
        }
    }
}

/// Handle one datagram from the peer of an established UDP session (`proto::link` decides:
/// UTACKs complete the frame in flight, frames are acknowledged only once authentic).
pub fn on_session_datagram(conn: &Conn, out: &UdpOut, d: &mut [u8], peer: SocketAddr) -> Inbound {
    link::handle_datagram(&ConnLink { conn, out, peer }, now(), d)
}
