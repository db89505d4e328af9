//! One established TCP connection on one thread: a reader loop that opens frames in place,
//! answers PINGs and refreshes the watchdog clock whether or not the application reads, and a
//! writer task that drains one outgoing buffer. The application side (`send`, `recv`, `ping`,
//! `rekey`, `bye`) only touches buffers and events, so its frames can never interleave with a
//! PONG inside a fragmented message. Used by both the gateway and the client.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use monoio::buf::SliceMut;
use monoio::io::{
    AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, OwnedReadHalf, OwnedWriteHalf,
};
use monoio::net::TcpStream;

use super::event::LocalEvent;
use super::{now, Error};
use crate::proto::arq::Arq;
use crate::proto::crypto::REKEY_SALT_LEN;
use crate::proto::deframer::Deframer;
use crate::proto::frame::HEADER_LEN;
use crate::proto::session::{sealed_len, Received, Session, MAX_SEALED_MESSAGE_LEN};
use crate::proto::udp::ExpectedAck;
use crate::proto::{ErrorKind, Reaction, Transport};

/// Outgoing bytes above which `send` waits for the socket to drain.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// Messages queued for an application that is not reading before the reader pauses.
const INBOX_CAP: usize = 256;
/// Room for one control frame (header + nonce + tag).
const CONTROL_FRAME_LEN: usize = 12 + 28;

/// Why a connection ended (for logs, metrics and the application).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent BYE.
    PeerBye,
    /// The peer closed the socket without BYE.
    PeerClosed,
    /// The peer broke a protocol rule (kind of the error).
    Protocol(ErrorKind),
    /// A socket error.
    Io,
    /// The application called `bye`/`disconnect`.
    LocalBye,
    /// The session handler returned.
    HandlerDone,
    /// No authenticated frame within the session timeout.
    Watchdog,
    /// Closed by an operator (`kick`).
    Kicked,
    /// The gateway is shutting down.
    Shutdown,
    /// The device's key was removed from the registry.
    Revoked,
    /// UDP: five transmissions of a frame went unacknowledged.
    PeerGone,
    /// UDP: a new handshake from the same address replaced this session.
    Replaced,
}

impl CloseReason {
    /// A short label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::PeerBye => "peer_bye",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Protocol(_) => "protocol_error",
            CloseReason::Io => "io_error",
            CloseReason::LocalBye => "local_bye",
            CloseReason::HandlerDone => "handler_done",
            CloseReason::Watchdog => "watchdog",
            CloseReason::Kicked => "kicked",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Revoked => "revoked",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::Replaced => "replaced",
        }
    }
}

/// Per-connection traffic counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnStats {
    /// Authenticated frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Bytes received (whole frames).
    pub bytes_in: u64,
    /// Bytes queued for sending.
    pub bytes_out: u64,
    /// Frames dropped (UDP) without ending the session.
    pub dropped: u64,
    /// UDP retransmissions.
    pub retransmits: u64,
}

/// Shared state of one connection; lives in an `Rc` on its shard's thread.
pub struct Conn {
    session: RefCell<Session>,
    peer: SocketAddr,
    out: RefCell<Vec<u8>>,
    out_ev: LocalEvent,
    drained_ev: LocalEvent,
    inbox: RefCell<VecDeque<Vec<u8>>>,
    inbox_ev: LocalEvent,
    closing: Cell<Option<CloseReason>>,
    done: Cell<bool>,
    done_ev: LocalEvent,
    last_rx: Cell<Duration>,
    stats: Cell<ConnStats>,
    canceller: RefCell<Option<Canceller>>,
    transport: Transport,
    /// UDP: the UTACK each queued frame expects, in `out` order.
    pub(crate) acks: RefCell<VecDeque<ExpectedAck>>,
    /// UDP: the stop-and-wait state of the frame in flight.
    pub(crate) arq: RefCell<Arq>,
    /// UDP: a UTACK for the frame in flight arrived.
    pub(crate) ack_ev: LocalEvent,
    /// Closed without BYE: stop retransmitting at once.
    pub(crate) abandon: Cell<bool>,
    /// UDP: when the peer last retransmitted a frame we had already accepted (our UTACK was
    /// lost): UTACKs then go out twice for a while.
    pub(crate) ack_loss_seen: Cell<Option<Duration>>,
}

/// What one received frame did to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Authenticated and processed (acknowledge it on UDP).
    Accepted,
    /// Authenticated, and it ended the session (BYE): acknowledge, then stop.
    AcceptedAndClosed,
    /// Dropped without harm to the session (UDP), with the reason.
    Rejected(ErrorKind),
    /// The session is over (TCP violation, flood guard, spent sequence).
    Closed,
}

impl Conn {
    /// Wrap an established session talking to `peer`.
    pub fn new(session: Session, peer: SocketAddr) -> Rc<Self> {
        let transport = session.transport();
        Rc::new(Conn {
            transport,
            acks: RefCell::new(VecDeque::new()),
            arq: RefCell::new(Arq::default()),
            ack_ev: LocalEvent::default(),
            abandon: Cell::new(false),
            ack_loss_seen: Cell::new(None),
            session: RefCell::new(session),
            peer,
            out: RefCell::new(Vec::new()),
            out_ev: LocalEvent::default(),
            drained_ev: LocalEvent::default(),
            inbox: RefCell::new(VecDeque::new()),
            inbox_ev: LocalEvent::default(),
            closing: Cell::new(None),
            done: Cell::new(false),
            done_ev: LocalEvent::default(),
            last_rx: Cell::new(now()),
            stats: Cell::new(ConnStats::default()),
            canceller: RefCell::new(Some(Canceller::new())),
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
    /// Device id bytes.
    pub fn device_id(&self) -> [u8; 6] {
        *self.session.borrow().device_id()
    }
    /// Session id bytes.
    pub fn session_id(&self) -> [u8; 16] {
        *self.session.borrow().session_id()
    }
    /// Time of the last authenticated frame (see [`crate::rt::now`]).
    pub fn last_rx(&self) -> Duration {
        self.last_rx.get()
    }
    /// Traffic counters.
    pub fn stats(&self) -> ConnStats {
        self.stats.get()
    }
    /// Why the connection is closing or closed, if it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closing.get()
    }
    /// Drop the session's expanded AES-GCM keys and its empty buffers' capacity if nothing
    /// arrived for `idle` and nothing is waiting to be sent (see
    /// [`crate::proto::session::Session::park`]). Returns whether the keys are parked now.
    /// Sweepers call this so an idle session costs a few hundred bytes.
    pub fn park_if_idle(&self, t: Duration, idle: Duration) -> bool {
        let Ok(mut s) = self.session.try_borrow_mut() else { return false };
        if s.is_parked() {
            return true;
        }
        let Ok(mut out) = self.out.try_borrow_mut() else { return false };
        if t.saturating_sub(self.last_rx.get()) < idle || !out.is_empty() {
            return false;
        }
        s.park();
        *out = Vec::new();
        if let Ok(mut inbox) = self.inbox.try_borrow_mut() {
            if inbox.is_empty() {
                *inbox = VecDeque::new();
            }
        }
        true
    }

    /// The socket is gone and both loops have ended.
    pub fn is_done(&self) -> bool {
        self.done.get()
    }

    pub(crate) fn bump(&self, f: impl FnOnce(&mut ConnStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    fn check_open(&self) -> Result<(), Error> {
        match self.closing.get() {
            None => Ok(()),
            Some(_) => Err(Error::misuse(ErrorKind::NotConnected, "session is closed")),
        }
    }

    /// Seal with `f` into the tail of the outgoing buffer (room for `max` bytes).
    fn queue<R>(
        &self,
        max: usize,
        f: impl FnOnce(&mut Session, &mut [u8]) -> Result<usize, R>,
    ) -> Result<usize, R> {
        let mut out = self.out.borrow_mut();
        let at = out.len();
        out.resize(at + max, 0);
        let mut session = self.session.borrow_mut();
        // The key every frame of this call is sealed with (REKEY switches only afterwards).
        let key = *session.tx_key_bytes();
        let res = f(&mut session, &mut out[at..]);
        drop(session);
        let n = *res.as_ref().unwrap_or(&0);
        out.truncate(at + n);
        // Walk the frames just sealed: count them, and on UDP note the UTACK each expects.
        let mut frames = 0u64;
        let mut acks = self.acks.borrow_mut();
        let mut i = at;
        while i + HEADER_LEN <= out.len() {
            if self.transport == Transport::Udp {
                let seq = u32::from_le_bytes([out[i + 4], out[i + 5], out[i + 6], out[i + 7]]);
                acks.push_back(ExpectedAck::new(out[i + 3], seq, Some(&key)));
            }
            frames += 1;
            i += HEADER_LEN + u16::from_le_bytes([out[i + 8], out[i + 9]]) as usize;
        }
        drop(acks);
        drop(out);
        if n > 0 {
            self.bump(|s| {
                s.frames_out += frames;
                s.bytes_out += n as u64;
            });
            self.out_ev.notify();
        }
        res
    }

    /// Send one message (0..=1808 bytes), fragmented as needed. Waits only when the socket
    /// is not keeping up (more than 64 KiB queued).
    pub async fn send(&self, msg: &[u8]) -> Result<(), Error> {
        if msg.len() > crate::proto::reassembly::MAX_MESSAGE_LEN {
            return Err(Error::misuse(ErrorKind::Payload, "message over 1808 bytes"));
        }
        loop {
            self.check_open()?;
            let wait = self.drained_ev.wait();
            if self.out.borrow().len() < OUT_HIGH_WATER {
                break;
            }
            wait.await;
        }
        self.queue(sealed_len(msg.len()), |s, out| s.seal_message(msg, out))?;
        Ok(())
    }

    /// Receive the next message; `ConnectionClosed` once the session ended and the queue is empty.
    pub async fn recv(&self) -> Result<Vec<u8>, Error> {
        loop {
            let wait = self.inbox_ev.wait();
            if let Some(m) = self.inbox.borrow_mut().pop_front() {
                self.inbox_ev.notify(); // room for a paused reader
                return Ok(m);
            }
            if self.closing.get().is_some() {
                return Err(Error::closed("session closed"));
            }
            wait.await;
        }
    }

    /// [`Conn::recv`] with a deadline (`TimeoutError` when it passes; the session goes on).
    pub async fn recv_timeout(&self, d: Duration) -> Result<Vec<u8>, Error> {
        match monoio::time::timeout(d, self.recv()).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout("receive timed out")),
        }
    }

    /// Send a PING (at most 8 control frames per second; more is refused).
    pub fn ping(&self) -> Result<(), Error> {
        self.check_open()?;
        self.queue(CONTROL_FRAME_LEN, |s, out| s.seal_ping(now(), out))?;
        Ok(())
    }

    /// Rotate the session keys (REKEY as initiator) with 32 fresh random bytes.
    pub fn rekey(&self) -> Result<(), Error> {
        self.check_open()?;
        let mut salt = [0u8; REKEY_SALT_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| Error::misuse(ErrorKind::Crypto, "no randomness for REKEY"))?;
        self.queue(CONTROL_FRAME_LEN + REKEY_SALT_LEN, |s, out| s.seal_rekey(&salt, out))?;
        Ok(())
    }

    /// Begin closing: with `bye`, BYE is queued behind any pending data and flushed; without,
    /// pending output is discarded and the socket closes at once (peer faults: nothing is sent).
    pub fn close(&self, reason: CloseReason, bye: bool) {
        if self.closing.get().is_some() {
            return;
        }
        if bye {
            let _ = self.queue(CONTROL_FRAME_LEN, |s, out| s.seal_bye(out));
        } else {
            self.out.borrow_mut().clear();
            self.acks.borrow_mut().clear();
            self.abandon.set(true);
        }
        self.closing.set(Some(reason));
        self.out_ev.notify();
        self.ack_ev.notify();
        self.inbox_ev.notify();
        self.drained_ev.notify();
    }

    /// Wait until the socket is closed and both loops ended.
    pub async fn closed(&self) {
        loop {
            let wait = self.done_ev.wait();
            if self.done.get() {
                return;
            }
            wait.await;
        }
    }

    /// Handle one authenticated-or-not frame (TCP reader or UDP datagram).
    pub(crate) fn on_frame(&self, frame: &mut [u8]) -> FrameOutcome {
        let t = now();
        let len = frame.len() as u64;
        let mut session = self.session.borrow_mut();
        let outcome = match session.open(frame, t) {
            Ok(r) => {
                self.last_rx.set(t);
                self.bump(|s| {
                    s.frames_in += 1;
                    s.bytes_in += len;
                });
                match r {
                    Received::Message(m) => {
                        self.inbox.borrow_mut().push_back(m.to_vec());
                        self.inbox_ev.notify();
                        FrameOutcome::Accepted
                    }
                    Received::Ping => {
                        drop(session);
                        let _ = self.queue(CONTROL_FRAME_LEN, |s, out| s.seal_pong(t, out).ok_or(()));
                        return FrameOutcome::Accepted;
                    }
                    Received::Bye => {
                        drop(session);
                        self.close(CloseReason::PeerBye, false);
                        return FrameOutcome::AcceptedAndClosed;
                    }
                    Received::Pong | Received::Fragment | Received::Rekeyed => FrameOutcome::Accepted,
                }
            }
            Err(e) => match e.reaction(self.transport) {
                Reaction::Close => {
                    drop(session);
                    self.close(CloseReason::Protocol(e.kind()), false);
                    return FrameOutcome::Closed;
                }
                Reaction::Drop | Reaction::Report => {
                    self.bump(|s| s.dropped += 1);
                    FrameOutcome::Rejected(e.kind())
                }
            },
        };
        outcome
    }

    /// The transport this connection runs over.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub(crate) fn session(&self) -> std::cell::RefMut<'_, Session> {
        self.session.borrow_mut()
    }

    /// UDP: move the next queued frame into `into`; returns the UTACK it expects.
    pub(crate) fn take_frame(&self, into: &mut Vec<u8>) -> Option<ExpectedAck> {
        let mut out = self.out.borrow_mut();
        if out.len() < HEADER_LEN {
            return None;
        }
        let n = HEADER_LEN + u16::from_le_bytes([out[8], out[9]]) as usize;
        into.clear();
        into.extend_from_slice(&out[..n]);
        out.drain(..n);
        drop(out);
        self.drained_ev.notify();
        self.acks.borrow_mut().pop_front()
    }

    /// A future completing when more output is queued (or the connection starts closing).
    pub(crate) fn out_ev_wait(&self) -> super::event::Wait<'_> {
        self.out_ev.wait()
    }

    /// Mark the connection finished (all I/O loops ended).
    pub(crate) fn set_done(&self) {
        self.done.set(true);
        self.done_ev.notify();
        self.inbox_ev.notify();
    }
}

/// Run a connection until it closes: the reader inline, the writer as a task. Returns once
/// the socket is closed; [`Conn::close_reason`] says why.
pub async fn drive(conn: Rc<Conn>, stream: TcpStream, mut deframer: Deframer) {
    let (rd, wr) = monoio::io::Splitable::into_split(stream);
    let writer = monoio::spawn(write_loop(conn.clone(), wr));
    // Frames that arrived together with the last handshake frame.
    if drain_frames(&conn, &mut deframer) {
        read_loop(&conn, rd, &mut deframer).await;
    }
    if conn.closing.get().is_none() {
        conn.close(CloseReason::PeerClosed, false);
    }
    writer.await;
    conn.set_done();
}

fn drain_frames(conn: &Conn, deframer: &mut Deframer) -> bool {
    loop {
        match deframer.next_frame() {
            Ok(Some(frame)) => match conn.on_frame(frame) {
                FrameOutcome::Accepted | FrameOutcome::Rejected(_) => {}
                FrameOutcome::AcceptedAndClosed | FrameOutcome::Closed => return false,
            },
            Ok(None) => return true,
            Err(e) => {
                conn.close(CloseReason::Protocol(e.kind()), false);
                return false;
            }
        }
    }
}

async fn read_loop(conn: &Rc<Conn>, mut rd: OwnedReadHalf<TcpStream>, deframer: &mut Deframer) {
    loop {
        // Backpressure: an application that does not read pauses us (PINGs wait too, which
        // is what TCP would do anyway), but closing always wakes us.
        loop {
            let wait = conn.inbox_ev.wait();
            if conn.closing.get().is_some() {
                return;
            }
            if conn.inbox.borrow().len() < INBOX_CAP {
                break;
            }
            wait.await;
        }
        let handle = match conn.canceller.borrow().as_ref() {
            Some(c) => c.handle(),
            None => return,
        };
        let (buf, range) = deframer.take_buffer();
        let slice = SliceMut::new(buf, range.start, range.end);
        let (res, slice) = rd.cancelable_read(slice, handle).await;
        let buf = slice.into_inner();
        match res {
            Ok(0) => {
                deframer.restore_buffer(buf, 0);
                return;
            }
            Ok(n) => deframer.restore_buffer(buf, n),
            Err(_) => {
                deframer.restore_buffer(buf, 0);
                if conn.closing.get().is_none() {
                    conn.close(CloseReason::Io, false);
                }
                return;
            }
        }
        if !drain_frames(conn, deframer) {
            return;
        }
    }
}

async fn write_loop(conn: Rc<Conn>, mut wr: OwnedWriteHalf<TcpStream>) {
    loop {
        let wait = conn.out_ev.wait();
        if conn.out.borrow().is_empty() {
            if conn.closing.get().is_some() {
                break;
            }
            wait.await;
            continue;
        }
        let buf = std::mem::take(&mut *conn.out.borrow_mut());
        let (res, mut buf) = wr.write_all(buf).await;
        buf.clear();
        if buf.capacity() > 4 * MAX_SEALED_MESSAGE_LEN {
            buf.shrink_to(MAX_SEALED_MESSAGE_LEN);
        }
        // Hand the capacity back for the next frames unless some were queued meanwhile; the
        // writer keeps no buffer of its own, so an idle session's one buffer can be released.
        let mut out = conn.out.borrow_mut();
        if out.capacity() == 0 {
            *out = buf;
        }
        drop(out);
        conn.drained_ev.notify();
        if res.is_err() {
            conn.close(CloseReason::Io, false);
            break;
        }
    }
    let _ = wr.shutdown().await;
    if let Some(c) = conn.canceller.borrow_mut().take() {
        c.cancel();
    }
}
