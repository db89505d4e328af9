//! The device side over UDP: the handshake is the sans-IO `proto::device::Device` (cookie
//! round trip, every handshake frame under the stop-and-wait ARQ, every server frame
//! acknowledged) driven by this glue, then the session over the shared UDP plumbing of
//! `rt::udp`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::rc::Rc;
use std::time::Duration;

use monoio::net::udp::UdpSocket;
use ring::rand::SystemRandom;

use super::ClientConfig;
use crate::proto::crypto::{EphemeralKey, Psk, DEVICE_ID_LEN};
use crate::proto::device::{Device, DeviceEvent};
use crate::proto::frame::PacketType;
use crate::proto::session::Session;
use crate::proto::udp::encode_utack;
use crate::proto::{ErrorKind, Transport};
use crate::rt::conn::Conn;
use crate::rt::datagram::{send_loop, UdpOut, RECV_BUF_LEN};
use crate::rt::event::LocalEvent;
use crate::rt::udp::{on_session_datagram, pump, Inbound};
use crate::rt::{now, Error};

/// Datagrams from the server, routed to the handshake until a session exists.
#[derive(Default)]
pub(super) struct Router {
    conn: RefCell<Option<Rc<Conn>>>,
    hs_inbox: RefCell<VecDeque<Vec<u8>>>,
    hs_ev: LocalEvent,
    stop: LocalEvent,
    stopped: std::cell::Cell<bool>,
    /// Run once when the device stops (a shared endpoint forgets its route).
    on_stop: RefCell<Option<Box<dyn FnOnce()>>>,
}

impl Router {
    /// Run `f` when the device stops.
    pub(super) fn set_on_stop(&self, f: Box<dyn FnOnce()>) {
        *self.on_stop.borrow_mut() = Some(f);
    }
}

async fn recv_loop(sock: Rc<UdpSocket>, router: Rc<Router>, out: Rc<UdpOut>, server: SocketAddr) {
    let mut buf = vec![0u8; RECV_BUF_LEN];
    loop {
        if router.stopped.get() {
            return;
        }
        let stop = router.stop.wait();
        let (res, b) = monoio::select! {
            r = sock.recv_from(buf) => r,
            _ = stop => return,
        };
        buf = b;
        if let Ok((n, from)) = res {
            deliver(&router, &out, &mut buf[..n], from, server);
        }
        buf.resize(RECV_BUF_LEN, 0);
    }
}

/// One datagram for the device behind `router`: to its handshake until the session exists,
/// then to the session. Only the gateway may talk to a device.
pub(super) fn deliver(router: &Router, out: &UdpOut, d: &mut [u8], from: SocketAddr, server: SocketAddr) {
    if from != server {
        return;
    }
    let conn = router.conn.borrow().clone();
    match conn {
        None => {
            let mut q = router.hs_inbox.borrow_mut();
            if q.len() < 16 {
                q.push_back(d.to_vec());
                router.hs_ev.notify();
            }
        }
        Some(conn) => {
            if let Inbound::Handshake(PacketType::SessionOk) =
                on_session_datagram(&conn, out, d, server, now())
            {
                // Our UTACK of SESSION_OK was lost and the gateway retransmits it.
                let (a, l) = encode_utack(PacketType::SessionOk as u8, 0, None);
                out.send(&a[..l], server);
            }
        }
    }
}

async fn next_datagram(router: &Router, deadline: Option<Duration>) -> Option<Vec<u8>> {
    loop {
        let wait = router.hs_ev.wait();
        if let Some(d) = router.hs_inbox.borrow_mut().pop_front() {
            return Some(d);
        }
        match deadline {
            Some(t) => {
                let left = t.saturating_sub(now());
                if left.is_zero() || monoio::time::timeout(left, wait).await.is_err() {
                    return None;
                }
            }
            None => wait.await,
        }
    }
}

/// Run the device's side of the handshake (`proto::device`): feed it the gateway's
/// datagrams, send what it queues, and wake it at its one deadline.
async fn handshake(router: &Router, out: &UdpOut, mut dev: Device) -> Result<Session, Error> {
    loop {
        while let Some(t) = dev.poll_transmit() {
            out.send(t.bytes(), t.to);
        }
        let Some(d) = next_datagram(router, dev.poll_timeout()).await else {
            dev.handle_timeout(now())?;
            continue;
        };
        match dev.handle_datagram(now(), dev.server(), &d) {
            DeviceEvent::Handled | DeviceEvent::Session => {}
            DeviceEvent::Failed(e) => return Err(e.into()),
            DeviceEvent::Established(est) => {
                while let Some(t) = dev.poll_transmit() {
                    out.send(t.bytes(), t.to);
                }
                return Ok(Session::new(&est, Transport::Udp));
            }
        }
    }
}

/// Connect over UDP from a socket of the device's own; returns the connection and the task
/// that runs it to the end.
pub(super) async fn connect(
    cfg: &ClientConfig,
    psk: Psk,
    device_id: [u8; DEVICE_ID_LEN],
) -> Result<(Rc<Conn>, monoio::task::JoinHandle<()>), Error> {
    let local: SocketAddr = match cfg.bind {
        Some(b) => b,
        None if cfg.addr.is_ipv4() => "0.0.0.0:0".parse().expect("literal"),
        None => "[::]:0".parse().expect("literal"),
    };
    let std_sock = StdUdpSocket::bind(local)?;
    std_sock.set_nonblocking(true)?;
    let sock = Rc::new(UdpSocket::from_std(std_sock)?);
    let out = UdpOut::new();
    let router = Rc::new(Router::default());
    monoio::spawn(send_loop(sock.clone(), out.clone()));
    monoio::spawn(recv_loop(sock, router.clone(), out.clone(), cfg.addr));
    run(cfg, psk, device_id, router, out).await
}

/// Handshake, then the session, over `out` and the datagrams delivered to `router`.
pub(super) async fn run(
    cfg: &ClientConfig,
    psk: Psk,
    device_id: [u8; DEVICE_ID_LEN],
    router: Rc<Router>,
    out: Rc<UdpOut>,
) -> Result<(Rc<Conn>, monoio::task::JoinHandle<()>), Error> {
    let server = cfg.addr;
    let dev = match EphemeralKey::generate(&SystemRandom::new())
        .and_then(|k| Device::new(now(), server, device_id, psk, k))
        .map_err(Error::from)
    {
        Ok(d) => d,
        Err(e) => {
            stop(&router, &out);
            return Err(e);
        }
    };
    let session = match monoio::time::timeout(cfg.connect_timeout, handshake(&router, &out, dev)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stop(&router, &out);
            return Err(e);
        }
        Err(_) => {
            stop(&router, &out);
            return Err(Error::Protocol(crate::proto::Error::left(
                ErrorKind::Timeout,
                "handshake timed out",
            )));
        }
    };
    let conn = Conn::new(session, server);
    *router.conn.borrow_mut() = Some(conn.clone());
    let c2 = conn.clone();
    let driver = monoio::spawn(async move {
        pump(c2, out.clone()).await;
        // Our BYE was acknowledged (or abandoned): stop both loops. UTACKs still queued leave
        // first: a stopped queue's sender returns only once it is empty (and a shared
        // endpoint's queue holds them already). A pause here would be a pause in every
        // `disconnect`: 20 ms of one held loadgen's UDP handshake benchmark to 2,000/s.
        stop(&router, &out);
    });
    Ok((conn, driver))
}

fn stop(router: &Router, out: &UdpOut) {
    router.stopped.set(true);
    router.stop.notify();
    router.conn.borrow_mut().take();
    if let Some(f) = router.on_stop.borrow_mut().take() {
        f();
    }
    out.stop();
}
