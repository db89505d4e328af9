//! Socket binding: one SO_REUSEPORT TCP listener and/or UDP socket per shard, all on one
//! port number, so the kernel spreads connections and peers over the shards.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::proto::Transport;

const LISTEN_BACKLOG: i32 = 4096;

/// One shard's sockets.
pub(super) struct ShardSockets {
    pub(super) tcp: Option<StdListener>,
    pub(super) udp: Option<std::net::UdpSocket>,
}

impl ShardSockets {
    pub(super) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match (&self.tcp, &self.udp) {
            (Some(t), _) => t.local_addr(),
            (None, Some(u)) => u.local_addr(),
            (None, None) => Err(std::io::Error::other("no transport")),
        }
    }
}

fn reuseport_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    // Must be set before bind so every shard can bind the same port.
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Bind one SO_REUSEPORT TCP listener and/or UDP socket per shard on `addr` (port 0: the
/// first socket picks the port, every other one follows it, UDP on the same number).
///
/// Accepted TCP connections inherit the listener's `TCP_NODELAY` and `TCP_USER_TIMEOUT`
/// (`user_timeout`): set here once rather than with two system calls per connection.
pub(super) fn bind_sockets(
    addr: SocketAddr,
    n: usize,
    t: super::Transports,
    user_timeout: Duration,
) -> std::io::Result<Vec<ShardSockets>> {
    // With port 0 the number the first socket gets may be taken for the other transport:
    // try again, keeping the failed attempts' sockets open so the next number differs.
    let mut burned = Vec::new();
    loop {
        match bind_sockets_once(addr, n, t, user_timeout, &mut burned) {
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse && burned.len() < 64 => {}
            other => return other,
        }
    }
}

fn bind_sockets_once(
    addr: SocketAddr,
    n: usize,
    t: super::Transports,
    user_timeout: Duration,
    burned: &mut Vec<Socket>,
) -> std::io::Result<Vec<ShardSockets>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let tcp = if t.contains(Transport::Tcp) {
            let s = reuseport_socket(addr, Type::STREAM, Protocol::TCP)?;
            s.set_nodelay(true)?;
            s.set_tcp_user_timeout(Some(user_timeout))?;
            s.listen(LISTEN_BACKLOG)?;
            let l: StdListener = s.into();
            addr = l.local_addr()?;
            Some(l)
        } else {
            None
        };
        let udp = if t.contains(Transport::Udp) {
            let s = match reuseport_socket(addr, Type::DGRAM, Protocol::UDP) {
                Ok(s) => s,
                Err(e) => {
                    burned.extend(tcp.map(Socket::from));
                    return Err(e);
                }
            };
            // Room for bursts from tens of thousands of devices between two receive rounds.
            let _ = s.set_recv_buffer_size(8 << 20);
            let _ = s.set_send_buffer_size(8 << 20);
            let u: std::net::UdpSocket = s.into();
            addr = u.local_addr()?;
            Some(u)
        } else {
            None
        };
        out.push(ShardSockets { tcp, udp });
    }
    Ok(out)
}
