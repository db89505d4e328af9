//! The device side: [`Client`] mirrors the reference `USMPClient` (connect, send, recv, ping,
//! disconnect, session id) on a monoio runtime, plus opt-in keepalive PINGs and a
//! reconnecting wrapper ([`ReconnectingClient`]) with exponential backoff.

mod endpoint;
mod reconnect;
mod udp;

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

pub use endpoint::UdpEndpoint;
pub use reconnect::{Backoff, ReconnectingClient};

use crate::proto::crypto::{EphemeralKey, Psk, DEVICE_ID_LEN};
use crate::proto::deframer::Deframer;
use crate::proto::frame::Frame;
use crate::proto::handshake::{ClientHandshake, ClientReply, MAX_HANDSHAKE_FRAME_LEN};
use crate::proto::session::Session;
use crate::proto::Transport;
use crate::proto::{DeviceId, SessionId};
use crate::rt::conn::{CloseReason, Conn};
use crate::rt::{wire, Error};

/// How to reach and authenticate to a gateway. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct ClientConfig {
    /// Gateway address.
    pub addr: SocketAddr,
    /// Pre-shared key (≥ 16 bytes), zeroized when the configuration is dropped.
    pub psk: Zeroizing<Vec<u8>>,
    /// Device id; random when `None` (as the reference client does).
    pub device_id: Option<[u8; DEVICE_ID_LEN]>,
    /// Deadline for TCP connect plus the whole handshake.
    pub connect_timeout: Duration,
    /// Send a PING after this much idle time (off by default).
    pub keepalive: Option<Duration>,
    /// Local address to bind before connecting (many source IPs in load tests).
    pub bind: Option<SocketAddr>,
    /// Transport: TCP or UDP (cookie round trip, UTACKs, stop-and-wait ARQ).
    pub transport: Transport,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("addr", &self.addr)
            .field("psk", &crate::psk::REDACTED)
            .field("device_id", &self.device_id.map(DeviceId::new))
            .field("connect_timeout", &self.connect_timeout)
            .field("keepalive", &self.keepalive)
            .field("bind", &self.bind)
            .field("transport", &self.transport)
            .finish()
    }
}

impl ClientConfig {
    /// Defaults: random device id, 10 s connect timeout, no keepalive, TCP.
    pub fn new(addr: SocketAddr, psk: impl Into<Vec<u8>>) -> Self {
        ClientConfig {
            addr,
            psk: Zeroizing::new(psk.into()),
            device_id: None,
            connect_timeout: Duration::from_secs(10),
            keepalive: None,
            bind: None,
            transport: Transport::Tcp,
        }
    }
}

/// A connected device session. Must be used inside a monoio runtime (see [`crate::rt::block_on`]).
pub struct Client {
    conn: Rc<Conn>,
    driver: Option<monoio::task::JoinHandle<()>>,
}

/// Open the TCP connection `cfg` describes (bound to `cfg.bind` first when set), without any
/// handshake: the client's first step, and a bare connection for load generators measuring
/// what a connection costs without the protocol.
pub async fn tcp_connect(cfg: &ClientConfig) -> Result<TcpStream, Error> {
    match cfg.bind {
        None => Ok(TcpStream::connect_addr(cfg.addr).await?),
        Some(local) => {
            // Bind first (many source addresses in load tests), then a non-blocking connect:
            // the runtime thread never waits in connect(2).
            let domain = socket2::Domain::for_address(cfg.addr);
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
            s.set_nonblocking(true)?;
            s.set_reuse_address(true)?;
            if local.port() == 0 {
                // Choose the port at connect time, by the whole 4-tuple: bind(2) would pick one
                // by searching the address's ports in use, which takes most of a load
                // generator's CPU once ~10 000 connections (and their TIME_WAITs) share it.
                let _ =
                    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true);
            }
            s.bind(&local.into())?;
            match s.connect(&cfg.addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e.into()),
            }
            let stream = TcpStream::from_std(s.into())?;
            stream.writable(false).await?;
            // A refused connect shows as "not connected" here.
            stream.peer_addr()?;
            Ok(stream)
        }
    }
}

async fn handshake(
    cfg: &ClientConfig,
    psk: Psk,
    device_id: [u8; DEVICE_ID_LEN],
) -> Result<(TcpStreamPoll, Deframer, Session), Error> {
    let rng = SystemRandom::new();
    let stream = tcp_connect(cfg).await?;
    let _ = stream.set_nodelay(true);
    let mut stream = wire::into_poll(stream)?;
    let mut deframer = Deframer::new();
    let key = EphemeralKey::generate(&rng)?;
    let mut hs = ClientHandshake::new(device_id, psk, key);
    let mut buf = vec![0u8; MAX_HANDSHAKE_FRAME_LEN];
    // Step 1: HELLO.
    let n = hs.encode_hello(&mut buf)?;
    wire::write_all(&mut stream, &buf[..n]).await?;
    // Step 2: CHALLENGE (or a HELLO_RETRY, then HELLO with the cookie).
    let expect = loop {
        let f = wire::read_frame(&mut stream, &mut deframer, None).await?;
        match hs.handle_reply(&Frame::decode(&f)?)? {
            ClientReply::Retry(next) => {
                hs = next;
                let n = hs.encode_hello(&mut buf)?;
                wire::write_all(&mut stream, &buf[..n]).await?;
            }
            ClientReply::Challenge(c) => break c,
        }
    };
    // Step 3: HELLO_ACK.
    let n = expect.encode_hello_ack(&mut buf)?;
    wire::write_all(&mut stream, &buf[..n]).await?;
    // Step 4: SESSION_OK (a rogue gateway fails here).
    let f = wire::read_frame(&mut stream, &mut deframer, None).await?;
    let est = expect.handle_session_ok(&Frame::decode(&f)?)?;
    Ok((stream, deframer, Session::new(&est, Transport::Tcp)))
}

impl Client {
    /// Connect and complete the handshake within `cfg.connect_timeout`.
    pub async fn connect(cfg: &ClientConfig) -> Result<Client, Error> {
        let (psk, device_id) = identity(cfg)?;
        if cfg.transport == Transport::Udp {
            let (conn, driver) = udp::connect(cfg, psk, device_id).await?;
            return Ok(Client::started(cfg, conn, driver));
        }
        let (stream, deframer, session) =
            match monoio::time::timeout(cfg.connect_timeout, handshake(cfg, psk, device_id)).await {
                Ok(r) => r?,
                Err(_) => return Err(Error::timeout("handshake timed out")),
            };
        let conn = Conn::new(session, cfg.addr);
        let driver = monoio::spawn(crate::rt::tcp::drive(conn.clone(), stream, deframer));
        Ok(Client::started(cfg, conn, driver))
    }

    /// Connect over UDP through `endpoint`, shared with other devices of this thread: the
    /// device's address is `cfg.bind`'s IP (required, IPv4, one device per address and
    /// endpoint) at the endpoint's port. `cfg.transport` is ignored (always UDP).
    pub async fn connect_via(endpoint: &UdpEndpoint, cfg: &ClientConfig) -> Result<Client, Error> {
        let (psk, device_id) = identity(cfg)?;
        let Some(src) = cfg.bind.map(|b| b.ip()) else {
            let why = "connect_via needs the device's source address";
            return Err(crate::psk::ConfigError::new("ClientConfig::bind", why).into());
        };
        let router = Rc::new(udp::Router::default());
        let out = endpoint.attach(src, &router, cfg.addr)?;
        let (conn, driver) = udp::run(cfg, psk, device_id, router, out).await?;
        Ok(Client::started(cfg, conn, driver))
    }

    fn started(cfg: &ClientConfig, conn: Rc<Conn>, driver: monoio::task::JoinHandle<()>) -> Client {
        if let Some(every) = cfg.keepalive {
            monoio::spawn(keepalive(Rc::downgrade(&conn), every));
        }
        Client { conn, driver: Some(driver) }
    }

    /// The device this client speaks for (`Display`: colon hex).
    pub fn device_id(&self) -> DeviceId {
        DeviceId::new(self.conn.device_id())
    }

    /// The session (`Display`: 32 lowercase hex characters).
    pub fn session_id(&self) -> SessionId {
        SessionId::new(self.conn.session_id())
    }

    /// Send one message (0..=1808 bytes; larger is a `PayloadError` and nothing is sent).
    pub async fn send(&self, msg: &[u8]) -> Result<(), Error> {
        self.conn.send(msg).await
    }

    /// Next message from the gateway (PINGs are answered in the background).
    pub async fn recv(&self) -> Result<Vec<u8>, Error> {
        self.conn.recv().await
    }

    /// [`Client::recv`] with a deadline.
    pub async fn recv_timeout(&self, d: Duration) -> Result<Vec<u8>, Error> {
        self.conn.recv_timeout(d).await
    }

    /// Send a PING (the gateway answers with a PONG).
    pub fn ping(&self) -> Result<(), Error> {
        self.conn.ping()
    }

    /// Rotate the session keys in band.
    pub fn rekey(&self) -> Result<(), Error> {
        self.conn.rekey()
    }

    /// The session ended (BYE received, connection lost, …)?
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.conn.close_reason()
    }

    /// Say BYE and close without giving up the client (other tasks may hold it); returns
    /// once the socket is closed. Pending `recv` calls then fail with `ConnectionClosedError`.
    pub async fn bye(&self) {
        self.conn.close(CloseReason::LocalBye, true);
        self.conn.closed().await;
    }

    /// Say BYE and close; returns once the socket is closed.
    pub async fn disconnect(mut self) {
        self.conn.close(CloseReason::LocalBye, true);
        if let Some(d) = self.driver.take() {
            d.await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Dropping without disconnect still ends the session politely.
        self.conn.close(CloseReason::LocalBye, true);
    }
}

/// The device's key and id (a random id when the config has none, as the reference client does).
fn identity(cfg: &ClientConfig) -> Result<(Psk, [u8; DEVICE_ID_LEN]), Error> {
    let psk = Psk::new(&cfg.psk)?;
    let device_id = match cfg.device_id {
        Some(d) => d,
        None => wire::random::<DEVICE_ID_LEN>(&SystemRandom::new())?,
    };
    Ok((psk, device_id))
}

async fn keepalive(conn: std::rc::Weak<Conn>, every: Duration) {
    loop {
        let Some(c) = conn.upgrade() else { return };
        if c.close_reason().is_some() {
            return;
        }
        let idle = crate::rt::now().saturating_sub(c.last_rx());
        let wait = if idle >= every {
            let _ = c.ping();
            every
        } else {
            every - idle
        };
        drop(c);
        monoio::time::sleep(wait.max(Duration::from_millis(200))).await;
    }
}
