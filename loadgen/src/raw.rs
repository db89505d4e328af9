//! The raw modes: the same devices, schedules and checks as the protocol modes, over bare
//! sockets without USMP (no framing, no crypto), against a bare echo server
//! (`examples/bare_echo`). What a message or a connection costs there is the floor under the
//! gateway's own figures, measured with the same driver.
//!
//! - TCP: a connection per device; a message is `payload` bytes written as they are, and its
//!   echo the next `payload` bytes read back.
//! - UDP: one socket per thread shared by its devices, each sending from its own source address
//!   (`IP_PKTINFO`) and told apart by the address the echo comes back to, exactly as the
//!   protocol mode's shared endpoint does. A message is one datagram. Nothing retransmits, so
//!   a datagram the kernel drops is a lost message.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedWriteHalf, Splitable};
use monoio::net::udp::UdpSocket;
use monoio::net::TcpStream;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn,
};
use usmp::{ClientConfig, LocalEvent};

/// Sizes of the TCP handshake's flight (PROTOCOL.md §3): HELLO then HELLO_ACK, each answered
/// (the echo stands for CHALLENGE and SESSION_OK), then a BYE-sized message and the close.
pub const TCP_HANDSHAKE_ROUNDS: &[usize] = &[50, 44];
/// The BYE frame: header and an empty sealed payload.
pub const BYE_LEN: usize = 40;
/// The UDP handshake's datagrams per round trip, as the gateway exchanges them (PROTOCOL.md
/// §7; counted with strace): HELLO; UTACKs of both copies of HELLO_RETRY (the gateway sends
/// it twice: it has no ARQ) around HELLO with the cookie; UTACK of CHALLENGE and HELLO_ACK;
/// UTACK of SESSION_OK and BYE. The gateway answers with 3, 2, 2 and 1 datagrams, the echo
/// with one per datagram: 8 each way and 4 round trips in both.
pub const UDP_HANDSHAKE_ROUNDS: &[&[usize]] = &[&[50], &[7, 66, 7], &[7, 44], &[7, 40]];
/// Socket buffers of the shared UDP socket (the kernel caps them at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 8 << 20;
/// Datagrams read per wake-up before the devices they woke get to run.
const RECV_BATCH: usize = 64;
/// Messages a device keeps unread before the oldest are dropped (bounded memory).
const INBOX_CAP: usize = 1024;

/// Messages that arrived for one device, in order.
#[derive(Default)]
pub struct Inbox {
    q: RefCell<VecDeque<Vec<u8>>>,
    ev: LocalEvent,
    closed: Cell<bool>,
}

impl Inbox {
    fn push(&self, m: Vec<u8>) {
        let mut q = self.q.borrow_mut();
        if q.len() >= INBOX_CAP {
            q.pop_front();
        }
        q.push_back(m);
        drop(q);
        self.ev.notify();
    }

    fn close(&self) {
        self.closed.set(true);
        self.ev.notify();
    }

    /// The next message; `None` once closed and empty, or at the deadline.
    async fn next(&self, deadline: Option<Duration>) -> Option<Vec<u8>> {
        loop {
            let w = self.ev.wait();
            if let Some(m) = self.q.borrow_mut().pop_front() {
                return Some(m);
            }
            if self.closed.get() {
                return None;
            }
            match deadline {
                Some(d) => monoio::time::timeout(d, w).await.ok()?,
                None => w.await,
            }
        }
    }
}

/// A device's bare connection (see the module docs).
pub enum RawLink {
    Tcp {
        /// Taken out while a write is in flight (one writer: the device's own task).
        writer: Cell<Option<OwnedWriteHalf<TcpStream>>>,
        inbox: Rc<Inbox>,
        reader: RefCell<Option<monoio::task::JoinHandle<()>>>,
    },
    Udp {
        ep: Rc<RawUdp>,
        src: Ipv4Addr,
        inbox: Rc<Inbox>,
    },
}

impl RawLink {
    /// A TCP connection to `cfg.addr` (from `cfg.bind`) whose echoes come back in messages
    /// of `len` bytes.
    pub async fn tcp(cfg: &ClientConfig, len: usize) -> io::Result<RawLink> {
        let stream = connect_tcp(cfg).await?;
        let (mut rd, wr) = stream.into_split();
        let inbox = Rc::new(Inbox::default());
        let inbox2 = inbox.clone();
        let reader = monoio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            let mut pending: Vec<u8> = Vec::with_capacity(2 * len.max(1));
            loop {
                let (res, b) = rd.read(buf).await;
                buf = b;
                match res {
                    Ok(n) if n > 0 => pending.extend_from_slice(&buf[..n]),
                    _ => break,
                }
                let whole = pending.len() / len * len;
                for m in pending[..whole].chunks_exact(len) {
                    inbox2.push(m.to_vec());
                }
                pending.drain(..whole);
            }
            inbox2.close();
        });
        Ok(RawLink::Tcp { writer: Cell::new(Some(wr)), inbox, reader: RefCell::new(Some(reader)) })
    }

    /// A device sending from `src` through the thread's shared socket.
    pub fn udp(ep: &Rc<RawUdp>, src: IpAddr) -> io::Result<RawLink> {
        let IpAddr::V4(src) = src else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "raw UDP devices need IPv4 addresses"));
        };
        let inbox = Rc::new(Inbox::default());
        ep.routes.borrow_mut().insert(src, inbox.clone());
        Ok(RawLink::Udp { ep: ep.clone(), src, inbox })
    }

    fn inbox(&self) -> &Inbox {
        match self {
            RawLink::Tcp { inbox, .. } | RawLink::Udp { inbox, .. } => inbox,
        }
    }

    /// Send one message (one write, or one datagram).
    pub async fn send(&self, m: &[u8]) -> io::Result<()> {
        match self {
            RawLink::Tcp { writer, .. } => {
                let Some(mut w) = writer.take() else {
                    return Err(io::ErrorKind::NotConnected.into());
                };
                let (res, _) = w.write_all(m.to_vec()).await;
                writer.set(Some(w));
                res.map(|_| ())
            }
            RawLink::Udp { ep, src, .. } => ep.send(m, IpAddr::V4(*src)).await,
        }
    }

    /// The next echoed message (`None`: the connection is gone, or the deadline passed).
    pub async fn recv(&self, deadline: Option<Duration>) -> Option<Vec<u8>> {
        self.inbox().next(deadline).await
    }

    /// The connection is gone (TCP: closed by the server).
    pub fn is_closed(&self) -> bool {
        self.inbox().closed.get()
    }

    /// Close: TCP shuts the connection down; a UDP device forgets its route.
    pub async fn close(&self) {
        match self {
            RawLink::Tcp { writer, reader, .. } => {
                if let Some(mut w) = writer.take() {
                    let _ = monoio::io::AsyncWriteRent::shutdown(&mut w).await;
                }
                let r = reader.borrow_mut().take();
                if let Some(r) = r {
                    r.await;
                }
            }
            RawLink::Udp { ep, src, inbox } => {
                let mut routes = ep.routes.borrow_mut();
                if routes.get(src).is_some_and(|i| Rc::ptr_eq(i, inbox)) {
                    routes.remove(src);
                }
                inbox.close();
            }
        }
    }
}

async fn connect_tcp(cfg: &ClientConfig) -> io::Result<TcpStream> {
    let s = usmp::client::tcp_connect(cfg).await.map_err(|e| match e {
        usmp::Error::Io(io) => io,
        other => io::Error::other(other.to_string()),
    })?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One bare TCP "handshake": connect, the rounds of [`TCP_HANDSHAKE_ROUNDS`] each echoed,
/// a BYE-sized message, close.
pub async fn tcp_handshake(cfg: &ClientConfig) -> io::Result<()> {
    let mut s = connect_tcp(cfg).await?;
    let mut buf = vec![0u8; 256];
    for &n in TCP_HANDSHAKE_ROUNDS {
        let (res, _) = s.write_all(vec![0x5a; n]).await;
        res?;
        let mut got = 0;
        while got < n {
            let (res, b) = s.read(buf).await;
            buf = b;
            match res? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                k => got += k,
            }
        }
    }
    let (res, _) = s.write_all(vec![0x5a; BYE_LEN]).await;
    res.map(|_| ())
}

/// One bare UDP "handshake" from `src`: the rounds of [`UDP_HANDSHAKE_ROUNDS`], each waiting
/// for all its echoes (at most `timeout` per round).
pub async fn udp_handshake(ep: &Rc<RawUdp>, src: IpAddr, timeout: Duration) -> io::Result<()> {
    let link = RawLink::udp(ep, src)?;
    let res = async {
        for round in UDP_HANDSHAKE_ROUNDS {
            for &n in *round {
                link.send(&vec![0x5a; n]).await?;
            }
            for _ in 0..round.len() {
                if link.recv(Some(timeout)).await.is_none() {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
            }
        }
        Ok(())
    }
    .await;
    link.close().await;
    res
}

/// The socket a thread's raw UDP devices share (see the module docs).
pub struct RawUdp {
    sock: UdpSocket,
    target: SocketAddr,
    routes: RefCell<HashMap<Ipv4Addr, Rc<Inbox>>>,
    stopped: Cell<bool>,
    stop_ev: LocalEvent,
    /// Datagrams for no known device.
    pub strays: Cell<u64>,
}

impl RawUdp {
    /// Bind the shared socket and start its receive task.
    pub fn bind(target: SocketAddr) -> io::Result<Rc<RawUdp>> {
        let s = StdUdpSocket::bind("0.0.0.0:0")?;
        s.set_nonblocking(true)?;
        setsockopt(&s, sockopt::Ipv4PacketInfo, &true)?;
        let _ = setsockopt(&s, sockopt::RcvBuf, &SOCKET_BUFFER);
        let _ = setsockopt(&s, sockopt::SndBuf, &SOCKET_BUFFER);
        let ep = Rc::new(RawUdp {
            sock: UdpSocket::from_std(s)?,
            target,
            routes: RefCell::default(),
            stopped: Cell::new(false),
            stop_ev: LocalEvent::default(),
            strays: Cell::new(0),
        });
        monoio::spawn(recv_loop(ep.clone()));
        Ok(ep)
    }

    /// Stop the receive task (it holds the socket until then).
    pub fn stop(&self) {
        self.stopped.set(true);
        self.stop_ev.notify();
    }

    async fn send(&self, m: &[u8], src: IpAddr) -> io::Result<()> {
        loop {
            match send_from(self.sock.as_raw_fd(), m, self.target, src) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.sock.writable(false).await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

async fn recv_loop(ep: Rc<RawUdp>) {
    let fd = ep.sock.as_raw_fd();
    let mut buf = vec![0u8; 2048];
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    while !ep.stopped.get() {
        for _ in 0..RECV_BATCH {
            match recv_to(fd, &mut buf, &mut cmsg) {
                Ok((n, from, to)) => {
                    let inbox = (from == ep.target).then(|| ep.routes.borrow().get(&to).cloned()).flatten();
                    match inbox {
                        Some(i) => i.push(buf[..n].to_vec()),
                        None => ep.strays.set(ep.strays.get() + 1),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // drained
            }
        }
        let stop = ep.stop_ev.wait();
        if ep.stopped.get() {
            return;
        }
        monoio::select! {
            _ = ep.sock.readable(false) => {},
            _ = stop => return,
        }
    }
}

/// One datagram to `to` from the local address `src`, without blocking.
fn send_from(fd: RawFd, m: &[u8], to: SocketAddr, src: IpAddr) -> io::Result<()> {
    let IpAddr::V4(src) = src else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "raw UDP is IPv4 only"));
    };
    let pi = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr { s_addr: u32::from(src).to_be() },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let to = SockaddrIn::from(match to {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "raw UDP is IPv4 only")),
    });
    sendmsg(
        fd,
        &[IoSlice::new(m)],
        &[ControlMessage::Ipv4PacketInfo(&pi)],
        MsgFlags::MSG_DONTWAIT,
        Some(&to),
    )?;
    Ok(())
}

/// One datagram without blocking: its length, sender and the local address it was sent to.
fn recv_to(fd: RawFd, buf: &mut [u8], cmsg: &mut [u8]) -> io::Result<(usize, SocketAddr, Ipv4Addr)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrIn>(fd, &mut iov, Some(cmsg), MsgFlags::MSG_DONTWAIT)?;
    let from = msg.address.map(|a| SocketAddr::V4(a.into())).ok_or(io::ErrorKind::InvalidData)?;
    let mut to = Ipv4Addr::UNSPECIFIED;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::Ipv4PacketInfo(pi) = c {
            to = Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr));
        }
    }
    Ok((msg.bytes, from, to))
}
