//! A bare echo server: one thread, no framing, no crypto. `bench/floor` runs it, driven by
//! `loadgen --mode raw-echo|raw-handshake`, to measure what any server pays on this machine
//! per echoed message and per short connection: the floor under the gateway's own figures.
//!
//!     cargo run --release --example bare_echo -- 127.0.0.1:9100         # TCP: epoll, non-blocking
//!     cargo run --release --example bare_echo -- --udp 127.0.0.1:9100   # UDP: each datagram back to its sender

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, addr] if flag == "--udp" => udp(addr),
        [addr] => tcp(addr),
        [] => tcp("127.0.0.1:9100"),
        _ => {
            eprintln!("usage: bare_echo [--udp] [ADDR:PORT]");
            std::process::exit(2);
        }
    }
}

/// A socket bound to `addr` with `SO_REUSEPORT`, so that several of these servers (one per
/// core, as `bench/floor --shards N` runs them) share a port as the gateway's shards do.
fn bind(addr: &str, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let addr: std::net::SocketAddr =
        addr.parse().map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Blocking receive, send it back to whoever sent it: the least a UDP server can do per datagram.
fn udp(addr: &str) -> std::io::Result<()> {
    let s = bind(addr, socket2::Type::DGRAM)?;
    // As big as the gateway asks for (the kernel caps it at net.core.rmem_max).
    let _ = s.set_recv_buffer_size(8 << 20);
    let sock: UdpSocket = s.into();
    println!("READY {}", sock.local_addr()?);
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = sock.send_to(&buf[..n], from);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn tcp(addr: &str) -> std::io::Result<()> {
    let s = bind(addr, socket2::Type::STREAM)?;
    s.listen(1024)?;
    let listener: TcpListener = s.into();
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new(EpollCreateFlags::empty())?;
    let lfd = listener.as_raw_fd();
    epoll.add(listener.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, lfd as u64))?;
    println!("READY {}", listener.local_addr()?);
    let mut conns: HashMap<RawFd, TcpStream> = HashMap::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 4096];
    loop {
        let n = epoll.wait(&mut events, EpollTimeout::NONE)?;
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            if fd == lfd {
                while let Ok((s, _)) = listener.accept() {
                    s.set_nonblocking(true)?;
                    s.set_nodelay(true)?;
                    let cfd = s.as_raw_fd();
                    epoll.add(s.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, cfd as u64))?;
                    conns.insert(cfd, s);
                }
                continue;
            }
            let Some(s) = conns.get_mut(&fd) else { continue };
            let close = loop {
                match s.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(k) => {
                        if s.write_all(&buf[..k]).is_err() {
                            break true;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break true,
                }
            };
            if close {
                if let Some(s) = conns.remove(&fd) {
                    let _ = epoll.delete(s.as_fd());
                }
            }
        }
    }
}
