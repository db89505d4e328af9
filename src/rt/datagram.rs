//! One UDP socket's datagram I/O, shared by the gateway and the client: the outgoing queue
//! drained by a sender task (one send in flight per socket works on both io_uring and epoll),
//! and non-blocking sends and receives that carry the local address (pktinfo) for endpoints
//! serving many source addresses. Knows nothing of sessions: the session side (`udp`) and
//! connections both build on it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use monoio::net::udp::UdpSocket;
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage};

use super::event::LocalEvent;
use crate::proto::frame::MAX_FRAME_LEN;

/// Datagrams queued per socket before new ones are dropped (UDP semantics under overload).
const MAX_QUEUED: usize = 65_536;
/// Spare buffers kept for reuse: enough for a busy loop turn; a burst's worth beyond this is
/// freed rather than held for the life of the socket.
const MAX_POOLED: usize = 512;
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
