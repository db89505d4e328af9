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
use nix::sys::socket::{
    recvmmsg, recvmsg, sendmmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders,
    SockaddrStorage,
};

use super::event::LocalEvent;
use crate::proto::frame::MAX_FRAME_LEN;

/// Datagrams queued per socket before new ones are dropped (UDP semantics under overload).
const MAX_QUEUED: usize = 65_536;
/// Spare buffers kept for reuse: enough for a busy loop turn; a burst's worth beyond this is
/// freed rather than held for the life of the socket.
const MAX_POOLED: usize = 512;
/// Receive buffer: larger than any valid datagram, so oversize ones are seen (and dropped).
pub const RECV_BUF_LEN: usize = 2048;
/// Datagrams moved per system call (`recvmmsg`/`sendmmsg`): a busy socket's wake-up then
/// costs one kernel crossing per batch instead of one per datagram.
pub(crate) const BATCH: usize = 64;

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
    pub(crate) fn pop(&self) -> Option<Outgoing> {
        self.queue.borrow_mut().pop_front()
    }

    /// Move the queued datagrams that leave from the same local address as the last one in
    /// `batch` onto it, up to [`BATCH`] in all (one `sendmmsg` carries one source address).
    fn pop_run(&self, batch: &mut Vec<Outgoing>) {
        let Some(src) = batch.last().map(|d| d.2) else { return };
        let mut q = self.queue.borrow_mut();
        while batch.len() < BATCH && q.front().is_some_and(|d| d.2 == src) {
            batch.extend(q.pop_front());
        }
    }

    /// Put back datagrams the socket could not take yet, in their order (they go out first).
    pub(crate) fn unpop_all(&self, batch: &mut Vec<Outgoing>) {
        let mut q = self.queue.borrow_mut();
        for d in batch.drain(..).rev() {
            q.push_front(d);
        }
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

/// The sender's address of a received datagram (IPv4 or IPv6).
fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
        (Some(v4), _) => Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port()))),
        (_, Some(v6)) => {
            Some(SocketAddr::V6(SocketAddrV6::new(v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id())))
        }
        _ => None,
    }
}

/// Up to [`BATCH`] datagrams read with one `recvmmsg`, into buffers allocated once per socket.
pub(crate) struct RecvBatch {
    bufs: Box<[u8]>,
    hdrs: MultiHeaders<SockaddrStorage>,
    /// Per datagram of the last read: its length and sender, `None` when unusable (truncated:
    /// larger than any valid datagram; no sender address).
    got: [Option<(usize, SocketAddr)>; BATCH],
}

impl RecvBatch {
    pub(crate) fn new() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * RECV_BUF_LEN].into_boxed_slice(),
            hdrs: MultiHeaders::preallocate(BATCH, None),
            got: [None; BATCH],
        }
    }

    /// Read the datagrams waiting, up to [`BATCH`], without blocking: how many were consumed
    /// (`Err(EAGAIN)`: none waiting).
    pub(crate) fn recv(&mut self, fd: RawFd) -> Result<usize, Errno> {
        let mut chunks = self.bufs.chunks_exact_mut(RECV_BUF_LEN);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let msgs = recvmmsg(fd, &mut self.hdrs, &mut iovs, MsgFlags::MSG_DONTWAIT, None)?;
        let mut n = 0;
        for (slot, m) in self.got.iter_mut().zip(msgs) {
            *slot = match m.address.as_ref().and_then(socket_addr) {
                Some(from) if !m.flags.contains(MsgFlags::MSG_TRUNC) => Some((m.bytes, from)),
                _ => None,
            };
            n += 1;
        }
        Ok(n)
    }

    /// Datagram `i` of the last [`RecvBatch::recv`] and its sender (`None`: unusable).
    pub(crate) fn get(&mut self, i: usize) -> Option<(&mut [u8], SocketAddr)> {
        let (len, from) = (*self.got.get(i)?)?;
        let start = i * RECV_BUF_LEN;
        Some((&mut self.bufs[start..start + len], from))
    }
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
    let Some(from) = msg.address.as_ref().and_then(socket_addr) else { return Ok(None) };
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

/// The `IP_PKTINFO` that sends from `src` (IPv4; otherwise the socket's own address).
fn pktinfo_from(src: Option<IpAddr>) -> libc::in_pktinfo {
    libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr {
            s_addr: match src {
                Some(IpAddr::V4(a)) => u32::from(a).to_be(),
                _ => 0,
            },
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    }
}

/// Reusable `sendmmsg` state: headers without control messages, headers with room for a
/// source address (`IP_PKTINFO`), and the destinations of the batch being sent.
struct SendHeaders {
    plain: MultiHeaders<SockaddrStorage>,
    with_src: MultiHeaders<SockaddrStorage>,
    addrs: Vec<Option<SockaddrStorage>>,
}

impl SendHeaders {
    fn new() -> Self {
        SendHeaders {
            plain: MultiHeaders::preallocate(BATCH, None),
            with_src: MultiHeaders::preallocate(BATCH, Some(pktinfo_space())),
            addrs: Vec::with_capacity(BATCH),
        }
    }

    /// Send `batch` (all from the same source address) without blocking: how many the kernel
    /// took, in order (`Err` when it took none: `EAGAIN` if the socket buffer is full).
    fn send(&mut self, fd: RawFd, batch: &[Outgoing]) -> Result<usize, Errno> {
        let Some(&(_, _, src)) = batch.first() else { return Ok(0) };
        let pi = pktinfo_from(src);
        let with_src = [ControlMessage::Ipv4PacketInfo(&pi)];
        let cmsgs: &[ControlMessage] = if src.is_some() { &with_src } else { &[] };
        if let [(buf, to, _)] = batch {
            // One datagram (a shared endpoint's devices, each with its own source address,
            // mostly): `sendmsg`, without the batch's set-up.
            let to = SockaddrStorage::from(*to);
            return sendmsg(fd, &[IoSlice::new(buf)], cmsgs, MsgFlags::MSG_DONTWAIT, Some(&to)).map(|_| 1);
        }
        self.addrs.clear();
        self.addrs.extend(batch.iter().map(|d| Some(SockaddrStorage::from(d.1))));
        let iovs: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(batch.get(i).map_or(&[][..], |d| &d.0[..]))]);
        // Headers with a control buffer only when there is a control message to put in it (an
        // empty, zeroed one would be refused by the kernel).
        let hdrs = if src.is_some() { &mut self.with_src } else { &mut self.plain };
        let sent = sendmmsg(fd, hdrs, &iovs, &self.addrs[..], cmsgs, MsgFlags::MSG_DONTWAIT)?;
        Ok(sent.count())
    }
}

/// Drain `out` into `sock` with non-blocking `sendmmsg` batches until [`UdpOut::stop`],
/// waiting for writability only when the socket buffer is full: a busy socket sends a whole
/// queue per wake-up in a few system calls. `refused` counts each datagram the kernel would
/// not take (no route, not permitted, …), which is dropped.
pub(crate) async fn send_loop_direct(sock: &UdpSocket, out: &UdpOut, refused: impl Fn()) {
    let fd = sock.as_raw_fd();
    let mut hdrs = SendHeaders::new();
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
    while let Some(first) = out.next().await {
        batch.push(first);
        out.pop_run(&mut batch);
        while !batch.is_empty() {
            match hdrs.send(fd, &batch) {
                Ok(n) => {
                    for (buf, _, _) in batch.drain(..n) {
                        out.recycle(buf);
                    }
                }
                Err(Errno::EAGAIN) => {
                    out.unpop_all(&mut batch);
                    if sock.writable(false).await.is_err() {
                        return;
                    }
                }
                Err(Errno::EINTR) => {}
                Err(_) => {
                    // The first one was refused (a later one would have ended the batch with
                    // a short count instead).
                    refused();
                    out.recycle(batch.remove(0).0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Rc<UdpSocket>, std::net::UdpSocket) {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.set_nonblocking(true).unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        (Rc::new(UdpSocket::from_std(tx).unwrap()), rx)
    }

    #[test]
    fn a_batch_goes_out_in_order_and_a_refused_datagram_costs_only_itself() {
        crate::rt::block_on(async {
            let (tx, rx) = pair();
            let to = rx.local_addr().unwrap();
            rx.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            let out = UdpOut::new();
            // Broadcast without SO_BROADCAST: the kernel refuses it (EACCES) in mid-batch.
            let refused_to: SocketAddr = "255.255.255.255:9".parse().unwrap();
            for i in 0..200u8 {
                out.send(&[i; 3], if i == 70 || i == 71 { refused_to } else { to });
            }
            out.stop();
            let refused = Cell::new(0);
            send_loop_direct(&tx, &out, || refused.set(refused.get() + 1)).await;
            assert_eq!(refused.get(), 2);
            let mut buf = [0u8; 16];
            for i in (0..200u8).filter(|i| *i != 70 && *i != 71) {
                let n = rx.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], &[i; 3], "datagrams keep their order across batches");
            }
        });
    }

    #[test]
    fn a_batch_read_sees_every_datagram_and_marks_oversize_ones() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut want = Vec::new();
        for i in 0..BATCH + 6 {
            let len = if i == 5 { RECV_BUF_LEN + 1 } else { 1 + i };
            tx.send_to(&vec![i as u8; len], to).unwrap();
            want.push((i, len));
        }
        let mut batch = RecvBatch::new();
        let fd = rx.as_raw_fd();
        let mut seen = Vec::new();
        while let Ok(n) = batch.recv(fd) {
            for j in 0..n {
                seen.push(batch.get(j).map(|(d, from)| (d.to_vec(), from)));
            }
        }
        assert_eq!(seen.len(), BATCH + 6, "two reads: a full batch and the rest");
        for ((i, len), got) in want.into_iter().zip(seen) {
            match got {
                None => assert_eq!(len, RECV_BUF_LEN + 1, "only the oversize one is unusable"),
                Some((d, from)) => {
                    assert_eq!(d, vec![i as u8; len]);
                    assert_eq!(from, tx.local_addr().unwrap());
                }
            }
        }
        assert!(matches!(batch.recv(fd), Err(Errno::EAGAIN)));
    }
}
