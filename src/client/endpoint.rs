//! Many devices behind one UDP socket, each told apart by its own source address, as a fleet
//! of hosts would be: the socket is bound to a wildcard address and every datagram leaves
//! from, and arrives at, the address of the device it belongs to (`IP_PKTINFO`). A load
//! generator needs this: a socket per device costs a descriptor (50 000 do not fit one
//! process) and a kernel wake-up per datagram, where a shared socket reads a whole burst in
//! one wake-up. IPv4 only; on loopback every address of 127.0.0.0/8 is local.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};

use monoio::net::udp::UdpSocket;
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};

use super::udp::{deliver, Router};
use crate::rt::datagram::{
    pktinfo_space, recv_nonblocking, send_loop_direct, Received, UdpOut, RECV_BUF_LEN,
};
use crate::rt::event::LocalEvent;
use crate::rt::Error;

/// Requested socket buffer sizes (both directions).
const SOCKET_BUFFER: usize = 8 << 20;
/// Datagrams read per wake-up before the devices they woke get to run.
const RECV_BATCH: usize = 64;

/// A UDP socket shared by many devices of one runtime thread (see [`super::Client::connect_via`]).
/// Dropping it stops its tasks; sessions still using it then go quiet and time out.
pub struct UdpEndpoint {
    shared: Rc<Shared>,
}

/// A device: its datagrams' destination, its sending view of the socket, its gateway.
type Route = (Rc<Router>, Rc<UdpOut>, SocketAddr);

struct Shared {
    sock: UdpSocket,
    out: Rc<UdpOut>,
    /// The device behind each source address, and its view of `out`.
    routes: RefCell<HashMap<Ipv4Addr, Route>>,
    stopped: Cell<bool>,
    stop_ev: LocalEvent,
    /// Datagrams dropped: unknown destination address, from a stranger, or refused by the kernel.
    dropped: Cell<u64>,
}

impl UdpEndpoint {
    /// Bind a shared socket to `addr` (an IPv4 wildcard such as `0.0.0.0:0`, or one local
    /// address) and start its receive and send tasks on the current runtime.
    pub fn bind(addr: SocketAddr) -> Result<Self, Error> {
        if !addr.is_ipv4() {
            return Err(
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "UdpEndpoint is IPv4 only").into()
            );
        }
        let std_sock = StdUdpSocket::bind(addr)?;
        std_sock.set_nonblocking(true)?;
        setsockopt(&std_sock, sockopt::Ipv4PacketInfo, &true).map_err(std::io::Error::from)?;
        // Thousands of devices' traffic meets in this one queue: a few milliseconds' worth at
        // 100 000 datagrams/s outgrows the default buffer, and a datagram lost there costs its
        // device a retransmission timeout. (The kernel caps these at net.core.[rw]mem_max.)
        let _ = setsockopt(&std_sock, sockopt::RcvBuf, &SOCKET_BUFFER);
        let _ = setsockopt(&std_sock, sockopt::SndBuf, &SOCKET_BUFFER);
        let shared = Rc::new(Shared {
            sock: UdpSocket::from_std(std_sock)?,
            out: UdpOut::new(),
            routes: RefCell::new(HashMap::new()),
            stopped: Cell::new(false),
            stop_ev: LocalEvent::default(),
            dropped: Cell::new(0),
        });
        monoio::spawn(recv_loop(shared.clone()));
        let s2 = shared.clone();
        monoio::spawn(async move {
            send_loop_direct(&s2.sock, &s2.out, || s2.dropped.set(s2.dropped.get() + 1)).await
        });
        Ok(UdpEndpoint { shared })
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.shared.sock.local_addr()?)
    }

    /// Datagrams dropped so far (unknown destination, stranger, kernel refusal).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.get()
    }

    /// Route datagrams from `server` to `src` to `router`; a device already there is displaced
    /// (a reconnect from the same address replaces the session it lost). Returns the device's
    /// sending view of the socket.
    pub(super) fn attach(
        &self,
        src: IpAddr,
        router: &Rc<Router>,
        server: SocketAddr,
    ) -> Result<Rc<UdpOut>, Error> {
        let IpAddr::V4(v4) = src else {
            return Err(
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "UdpEndpoint is IPv4 only").into()
            );
        };
        let out = UdpOut::via(self.shared.out.clone(), src);
        self.shared.routes.borrow_mut().insert(v4, (router.clone(), out.clone(), server));
        let weak: Weak<Shared> = Rc::downgrade(&self.shared);
        let me = Rc::downgrade(router);
        router.set_on_stop(Box::new(move || {
            let Some(shared) = weak.upgrade() else { return };
            let mut routes = shared.routes.borrow_mut();
            if routes.get(&v4).is_some_and(|(r, _, _)| Weak::ptr_eq(&Rc::downgrade(r), &me)) {
                routes.remove(&v4);
            }
        }));
        Ok(out)
    }
}

impl Drop for UdpEndpoint {
    fn drop(&mut self) {
        self.shared.stopped.set(true);
        self.shared.stop_ev.notify();
        self.shared.out.stop();
    }
}

async fn recv_loop(shared: Rc<Shared>) {
    let fd = shared.sock.as_raw_fd();
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut cmsg = pktinfo_space();
    while !shared.stopped.get() {
        for _ in 0..RECV_BATCH {
            match recv_nonblocking(fd, &mut buf, Some(&mut cmsg)) {
                Ok(Some(Received { len: n, from, to: Some(IpAddr::V4(dst)) })) => {
                    let route = shared.routes.borrow().get(&dst).cloned();
                    match route {
                        Some((router, out, server)) => deliver(&router, &out, &mut buf[..n], from, server),
                        None => shared.dropped.set(shared.dropped.get() + 1),
                    }
                }
                Ok(_) => shared.dropped.set(shared.dropped.get() + 1),
                Err(Errno::EINTR) => {}
                Err(_) => break, // EAGAIN: drained
            }
        }
        // Back through the driver even when more may be waiting: the devices this batch
        // woke and the sender run before the next batch is read.
        let stop = shared.stop_ev.wait();
        if shared.stopped.get() {
            return;
        }
        monoio::select! {
            _ = shared.sock.readable(false) => {},
            _ = stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Client, ClientConfig};
    use std::time::Duration;

    #[test]
    fn datagrams_the_kernel_refuses_are_dropped_and_counted() {
        crate::rt::block_on(async {
            let ep = UdpEndpoint::bind("0.0.0.0:0".parse().unwrap()).unwrap();
            // Broadcast without SO_BROADCAST: sendmsg fails with EACCES.
            let cfg = ClientConfig {
                bind: Some("127.0.9.1:0".parse().unwrap()),
                transport: crate::proto::Transport::Udp,
                connect_timeout: Duration::from_millis(300),
                ..ClientConfig::new("255.255.255.255:9".parse().unwrap(), b"endpoint-test-key-0123".to_vec())
            };
            assert!(Client::connect_via(&ep, &cfg).await.is_err());
            assert!(ep.dropped() >= 1, "refused HELLOs are counted");
            // An IPv6 source address has no place on an IPv4 endpoint.
            let v6 = ClientConfig { bind: Some("[::1]:0".parse().unwrap()), ..cfg };
            assert!(Client::connect_via(&ep, &v6).await.is_err());
        });
        assert!(UdpEndpoint::bind("[::1]:0".parse().unwrap()).is_err(), "IPv4 only");
    }
}
