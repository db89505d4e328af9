//! One established connection on one thread. TCP: one future (`drive`, in `rt::tcp`) waits for
//! readiness, reads into a buffer lent only while frames are open, opens frames in place,
//! answers PINGs and refreshes the watchdog clock whether or not the application reads, and
//! sends the one outgoing buffer without waiting. The application side (`send`, `recv`,
//! `ping`, `rekey`, `bye`) only touches buffers and events, so its frames can never
//! interleave with a PONG inside a fragmented message. Used by both the gateway and the client.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use super::datagram::UdpOut;
use super::event::LocalEvent;
use super::outcome::Counters;
pub use super::outcome::{CloseReason, ConnStats};
use super::{now, Error};
use crate::proto::crypto::REKEY_SALT_LEN;
use crate::proto::frame::HEADER_LEN;
pub(crate) use crate::proto::host::{head_len, INBOX_CAP, OUT_HIGH_WATER};
use crate::proto::host::{respond, Response, CONTROL_FRAME_LEN};
use crate::proto::link::{frame_count, Link};
use crate::proto::session::{sealed_len, Session};
use crate::proto::{ErrorKind, Transport};

/// Outgoing bytes above which `try_send` refuses: a message hook sending far more than it
/// receives cannot grow the queue without bound.
pub(crate) const OUT_HARD_LIMIT: usize = 4 * OUT_HIGH_WATER;
/// [`Conn`] flag: the socket is gone and every loop has ended.
const DONE: u8 = 1;
/// [`Conn`] flag: closed without BYE, so nothing queued is sent or retransmitted.
const ABANDONED: u8 = 2;
/// [`Conn`] flag: the session runs over UDP (else TCP).
const UDP: u8 = 4;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Receives each message of a connection inline, on the thread that read it, instead of the
/// connection queueing it for a task calling [`Conn::recv`]: no task, no queue, no copy.
pub trait MessageHook {
    /// One complete message (replies go out with [`Conn::try_send`]). [`Ack::Held`] keeps the
    /// device's acknowledgement of it (UDP: the UTACK of the frame that completed it) until
    /// the application releases it, e.g. once the message is stored downstream.
    fn on_message(&self, conn: &Rc<Conn>, msg: &[u8]) -> Ack;
    /// UDP: the acknowledgement [`Ack::Held`] kept back, to send with
    /// [`Conn::send_held_ack`] once released.
    fn on_ack_held(&self, _conn: &Rc<Conn>, _utack: &[u8]) {}
    /// Input should wait for the application (held acknowledgements piling up): TCP stops
    /// reading, UDP leaves new messages unacknowledged for the device to retransmit.
    fn input_blocked(&self, _conn: &Conn) -> bool {
        false
    }
    /// Queued output left the queue: TCP wrote it to the socket, UDP's device acknowledged
    /// it. [`Conn::bytes_gone`] says how far.
    fn on_output_progress(&self, _conn: &Rc<Conn>) {}
}

/// What the application's message hook (`gateway::app::ShardApp::on_message`) does with the
/// device's acknowledgement of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ack {
    /// Acknowledge as usual.
    Now,
    /// Keep it back until the application releases it.
    Held,
}

/// What one connection is wired to beyond its socket, shared by every connection of a shard
/// and transport (one pointer per connection).
#[derive(Default)]
pub struct Links {
    /// Deliver messages inline instead of queueing them for `recv`.
    pub hook: Option<Box<dyn MessageHook>>,
    /// UDP: drive the stop-and-wait sender inline and from the port's timers instead of
    /// from a task per connection.
    pub port: Option<Rc<dyn Port>>,
}

/// The owner of port-driven UDP connections (the gateway's shared socket): it sends their
/// datagrams, moves their stop-and-wait senders and keeps their timers. A trait, so that the
/// connection calls its owner without this file depending on the owner, which depends on it.
pub trait Port {
    /// The queue the connection's datagrams leave through.
    fn out(&self) -> &UdpOut;
    /// Advance `conn`'s sender at `t` (`rt::udp::step`); true once it is finished.
    fn step(&self, conn: &Conn, t: Duration) -> bool;
    /// Look at `conn` again no later than `at`.
    fn arm(&self, conn: &Conn, at: Duration);
    /// `conn` is closed with nothing left to deliver: its owner unregisters it.
    fn finished(&self, conn: Rc<Conn>);
    /// The time its connections' senders run on: the process's monotonic clock, or a
    /// simulated one (the fuzzer drives the shipping connection on its own clock).
    fn now(&self) -> Duration {
        now()
    }
}

/// Shared state of one connection; lives in an `Rc` on its shard's thread.
pub struct Conn {
    me: Weak<Conn>,
    session: RefCell<Session>,
    peer: SocketAddr,
    pub(super) out: RefCell<Vec<u8>>,
    /// Every waiter of this connection waits here (the TCP writer or UDP pump for output,
    /// UTACKs and closing; the application for messages, room to send and the end; a paused
    /// reader for room). One event, not one per condition: each is 32 bytes of every session,
    /// and every wait re-checks its own condition, so a wake meant for another costs a poll.
    pub(super) ev: LocalEvent,
    /// Messages for `recv`. Boxed on purpose: 8 bytes instead of 40 in every connection, and
    /// inline-delivering connections never allocate it. Taken out while touched.
    #[allow(clippy::box_collection)]
    inbox: Cell<Option<Box<VecDeque<Vec<u8>>>>>,
    pub(super) closing: Cell<Option<CloseReason>>,
    /// [`DONE`], [`ABANDONED`] and [`UDP`] (one byte: every byte here is per session).
    flags: Cell<u8>,
    /// Nanoseconds of [`now`] (times are stored as `u64`: every byte here is per session).
    last_rx: Cell<u64>,
    stats: Cell<Counters>,
    links: Option<Rc<Links>>,
    /// A number the owner keeps with the connection to find its own record of it (the
    /// gateway: its slab key). rt never reads it; four bytes here save the owner a map from
    /// connection to record.
    pub(crate) tag: Cell<u32>,
    /// UDP: the transport state (`proto::link`): the frame in flight (the first frame of
    /// `out`), the UTACK each queued frame expects, signs of UTACK loss.
    pub(crate) link: RefCell<Link>,
    /// One time stamp, read by transport (nanoseconds, 0 = none; every byte here is per
    /// session). UDP (port-driven): the earliest deadline this connection has in the port's
    /// timers. TCP: since when queued output has not moved (the socket's buffer is full and
    /// the peer takes nothing).
    stamp: Cell<u64>,
    /// TCP: bytes at the head of `out` that finish a frame partly written to the socket
    /// (the first whole frame starts after them).
    pub(super) head_rest: Cell<u16>,
}

pub use crate::proto::link::FrameOutcome;

impl Conn {
    /// Wrap an established session talking to `peer`.
    pub fn new(session: Session, peer: SocketAddr) -> Rc<Self> {
        Self::with_links(session, peer, None)
    }

    /// Wrap an established session wired to `links` (inline delivery, a UDP port).
    pub fn with_links(session: Session, peer: SocketAddr, links: Option<Rc<Links>>) -> Rc<Self> {
        let transport = session.transport();
        Rc::new_cyclic(|me| Conn {
            me: me.clone(),
            flags: Cell::new(if transport == Transport::Udp { UDP } else { 0 }),
            links,
            tag: Cell::new(0),
            link: RefCell::new(Link::default()),
            head_rest: Cell::new(0),
            stamp: Cell::new(0),
            session: RefCell::new(session),
            peer,
            out: RefCell::new(Vec::new()),
            ev: LocalEvent::default(),
            inbox: Cell::new(None),
            closing: Cell::new(None),
            last_rx: Cell::new(nanos(now())),
            stats: Cell::new(Counters::default()),
        })
    }

    fn port(&self) -> Option<&Rc<dyn Port>> {
        self.links.as_ref()?.port.as_ref()
    }

    pub(crate) fn links_hook(&self) -> Option<&dyn MessageHook> {
        self.links.as_ref()?.hook.as_deref()
    }

    /// Messages are delivered inline to a hook (not queued for `recv`).
    pub fn delivers_inline(&self) -> bool {
        self.links_hook().is_some()
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
        Duration::from_nanos(self.last_rx.get())
    }

    /// UDP (port-driven): the earliest deadline this connection has in the port's timers.
    pub(crate) fn timer_at(&self) -> Option<Duration> {
        Some(self.stamp.get())
            .filter(|&n| n != 0 && self.transport() == Transport::Udp)
            .map(Duration::from_nanos)
    }

    pub(crate) fn set_timer_at(&self, at: Option<Duration>) {
        self.stamp.set(at.map_or(0, |t| nanos(t).max(1)));
    }

    fn stamp_at(&self) -> Option<Duration> {
        Some(self.stamp.get()).filter(|&n| n != 0).map(Duration::from_nanos)
    }

    /// TCP: since when queued output has not moved (`None` while it moves or is empty).
    /// The gateway's sweeper abandons a session stalled for longer than its watchdog, or a
    /// closing one stalled for longer than the close grace.
    pub fn out_stalled_since(&self) -> Option<Duration> {
        (self.transport() == Transport::Tcp).then(|| self.stamp_at()).flatten()
    }

    /// TCP driver: a send attempt left `left` bytes queued, having moved some bytes or not.
    pub(crate) fn note_out_progress(&self, t: Duration, moved: bool, left: bool) {
        if !left {
            self.stamp.set(0);
        } else if moved || self.stamp.get() == 0 {
            self.stamp.set(nanos(t).max(1));
        }
    }

    /// Traffic counters.
    pub fn stats(&self) -> ConnStats {
        self.stats.get().into()
    }

    fn inbox_len(&self) -> usize {
        let q = self.inbox.take();
        let n = q.as_ref().map_or(0, |q| q.len());
        self.inbox.set(q);
        n
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
        if t.saturating_sub(self.last_rx()) < idle || !out.is_empty() {
            return false;
        }
        s.park();
        *out = Vec::new();
        let q = self.inbox.take().filter(|q| !q.is_empty());
        self.inbox.set(q);
        if let Ok(mut l) = self.link.try_borrow_mut() {
            l.shrink();
        }
        self.ev.shrink();
        true
    }

    /// The socket is gone and both loops have ended.
    pub fn is_done(&self) -> bool {
        self.flag(DONE)
    }

    pub(crate) fn bump(&self, f: impl FnOnce(&mut ConnStats)) {
        let mut s = self.stats.get().into();
        f(&mut s);
        self.stats.set(Counters::from(s));
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
        // Count the frames just sealed; on UDP the link notes the UTACK each expects.
        let frames = if self.transport() == Transport::Udp {
            self.link.borrow_mut().on_queued(&out[at..], &key)
        } else {
            frame_count(&out[at..])
        };
        drop(out);
        if n > 0 {
            self.bump(|s| {
                s.frames_out += frames;
                s.bytes_out += n as u64;
            });
            self.kick();
        }
        res
    }

    /// Output was queued, a UTACK arrived, or the connection is closing: wake the task moving
    /// bytes, or (port-driven UDP) move them here and now.
    pub(crate) fn kick(&self) {
        let Some(port) = self.port() else {
            self.ev.notify();
            return;
        };
        let t = port.now();
        if port.step(self, t) {
            // `step` may close the connection, which kicks again: hand it over once.
            if self.finish() {
                if let Some(me) = self.me.upgrade() {
                    port.finished(me);
                }
            }
        } else if let Some(at) = self.link.borrow().poll_timeout() {
            port.arm(self, at);
        }
    }

    /// The weak handle the port's timers hold.
    pub(crate) fn weak(&self) -> Weak<Conn> {
        self.me.clone()
    }

    /// Send one message (0..=1808 bytes), fragmented as needed. Waits only when the socket
    /// is not keeping up (more than 64 KiB queued).
    pub async fn send(&self, msg: &[u8]) -> Result<(), Error> {
        if msg.len() > crate::proto::reassembly::MAX_MESSAGE_LEN {
            return Err(Error::misuse(ErrorKind::Payload, "message over 1808 bytes"));
        }
        loop {
            self.check_open()?;
            let wait = self.ev.wait();
            if self.out.borrow().len() < OUT_HIGH_WATER {
                break;
            }
            wait.await;
        }
        self.queue(sealed_len(msg.len()), |s, out| s.seal_message(msg, out))?;
        Ok(())
    }

    /// Queue one message without waiting (for message hooks, which cannot wait). Refused
    /// with `TimeoutError` while far more output is queued than the socket takes.
    pub fn try_send(&self, msg: &[u8]) -> Result<(), Error> {
        if msg.len() > crate::proto::reassembly::MAX_MESSAGE_LEN {
            return Err(Error::misuse(ErrorKind::Payload, "message over 1808 bytes"));
        }
        self.check_open()?;
        if self.out.borrow().len() >= OUT_HARD_LIMIT {
            return Err(Error::misuse(ErrorKind::Timeout, "send queue full: the peer is not keeping up"));
        }
        self.queue(sealed_len(msg.len()), |s, out| s.seal_message(msg, out))?;
        Ok(())
    }

    /// Input should wait: the application is not reading, or (inline delivery) its replies
    /// are not leaving.
    pub(crate) fn input_blocked(&self) -> bool {
        if let Some(hook) = self.links_hook() {
            self.out.borrow().len() >= OUT_HIGH_WATER || hook.input_blocked(self)
        } else {
            self.inbox_len() >= INBOX_CAP
        }
    }

    /// Receive the next message; `ConnectionClosed` once the session ended and the queue is empty.
    pub async fn recv(&self) -> Result<Vec<u8>, Error> {
        loop {
            let wait = self.ev.wait();
            if let Some(m) = self.try_recv() {
                return Ok(m);
            }
            if self.closing.get().is_some() {
                return Err(Error::closed("session closed"));
            }
            wait.await;
        }
    }

    /// The next message received, if one is waiting (without waiting).
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        let mut q = self.inbox.take();
        let next = q.as_mut().and_then(|q| q.pop_front());
        self.inbox.set(q);
        if next.is_some() {
            self.ev.notify(); // room for a paused reader
        }
        next
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
            self.discard_output();
        }
        self.closing.set(Some(reason));
        self.ev.notify();
        self.kick();
    }

    /// Forget every queued byte and stop retransmitting: the session closes without BYE.
    fn discard_output(&self) {
        self.out.borrow_mut().clear();
        self.head_rest.set(0);
        self.link.borrow_mut().abandon();
        self.set_flag(ABANDONED);
    }

    /// The peer's REKEY switched the keys: frames queued under the old key that have not
    /// left are re-sealed under the new one, so that a device that forgot the old key (as
    /// PROTOCOL.md §6 lets it) can still open them. Left as they are: TCP, the rest of a
    /// frame partly written to the socket; UDP, the frame in flight (the device may hold
    /// it already, and its retransmissions must stay the same frame).
    fn reseal_unsent(&self) {
        let mut out = self.out.borrow_mut();
        let mut link = self.link.borrow_mut();
        let mut session = self.session.borrow_mut();
        let partly_written = usize::from(self.head_rest.get());
        if let Err(e) = crate::proto::host::reseal_unsent(&mut session, &mut link, &mut out, partly_written) {
            // Only our own frames are here, so this is a bug, not the peer's doing; with some
            // frames re-sealed and the old key gone the queue cannot be trusted: end cleanly.
            tracing::error!(error = %e, "re-sealing queued frames after a REKEY failed; closing");
            drop((session, link, out));
            self.close(CloseReason::Protocol(e.kind()), false);
        }
    }

    /// End the session now whatever is queued: the output is discarded (no BYE can reach a
    /// peer that takes nothing) and a TCP socket is reset rather than closed gracefully.
    /// The way out for a session whose peer stopped reading; any state, closing included.
    pub fn abort(&self, reason: CloseReason) {
        if self.flag(DONE) {
            return;
        }
        self.discard_output();
        if self.closing.get().is_none() {
            self.closing.set(Some(reason));
        }
        if self.transport() == Transport::Tcp {
            self.stamp.set(0);
        }
        self.ev.notify();
        self.kick();
    }

    /// Close for an operator or a timer (kick, revocation, watchdog): with BYE while the
    /// peer takes our output, by [`Conn::abort`] once it has stopped taking it (a BYE queued
    /// behind output that never leaves would keep the session forever).
    pub fn end(&self, reason: CloseReason) {
        if self.out_stalled_since().is_some() {
            self.abort(reason);
        } else {
            self.close(reason, true);
        }
    }

    /// Wait until the socket is closed and both loops ended.
    pub async fn closed(&self) {
        loop {
            let wait = self.ev.wait();
            if self.flag(DONE) {
                return;
            }
            wait.await;
        }
    }

    /// Handle one authenticated-or-not frame (TCP reader or UDP datagram) that arrived at
    /// `t`: what it asks of the connection is [`respond`]'s to say.
    pub(crate) fn on_frame(&self, frame: &mut [u8], t: Duration) -> FrameOutcome {
        let len = frame.len() as u64;
        let frame_at = frame.as_ptr() as usize;
        let queued = self.out.borrow().len();
        let mut session = self.session.borrow_mut();
        let opened = session.open(frame, t);
        if opened.is_ok() {
            self.last_rx.set(nanos(t));
            self.bump(|s| {
                s.frames_in += 1;
                s.bytes_in += len;
            });
        }
        match respond(opened, self.transport(), queued) {
            Response::Deliver(m) if self.delivers_inline() => {
                // The hook may send, which needs the session: find the message again after
                // releasing it. A single-frame message was opened in place in `frame`; a
                // reassembled one lives in the session and is copied out.
                let (at, n) = (m.as_ptr() as usize, m.len());
                let inside = at >= frame_at && at + n <= frame_at + len as usize;
                // Only a reassembled message pays for the 1808-byte stack copy.
                let copy = (!inside).then(|| {
                    let mut c = [0u8; crate::proto::reassembly::MAX_MESSAGE_LEN];
                    c[..n].copy_from_slice(m);
                    c
                });
                drop(session);
                let msg = match &copy {
                    Some(c) => &c[..n],
                    None => &frame[at - frame_at..at - frame_at + n],
                };
                if let (Some(hook), Some(me)) = (self.links_hook(), self.me.upgrade()) {
                    if hook.on_message(&me, msg) == Ack::Held {
                        return FrameOutcome::AcceptedHeld;
                    }
                }
                FrameOutcome::Accepted
            }
            Response::Deliver(m) => {
                let mut q = self.inbox.take().unwrap_or_default();
                q.push_back(m.to_vec());
                self.inbox.set(Some(q));
                self.ev.notify();
                FrameOutcome::Accepted
            }
            Response::Pong => {
                drop(session);
                let _ = self.queue(CONTROL_FRAME_LEN, |s, out| s.seal_pong(t, out).ok_or(()));
                FrameOutcome::Accepted
            }
            Response::Reseal => {
                drop(session);
                self.reseal_unsent();
                match self.close_reason() {
                    Some(_) => FrameOutcome::Closed,
                    None => FrameOutcome::Accepted,
                }
            }
            Response::PeerBye => {
                drop(session);
                self.close(CloseReason::PeerBye, false);
                FrameOutcome::AcceptedAndClosed
            }
            Response::Close(kind) => {
                drop(session);
                self.close(CloseReason::Protocol(kind), false);
                FrameOutcome::Closed
            }
            Response::Drop(kind) => {
                self.bump(|s| s.dropped += 1);
                FrameOutcome::Rejected(kind)
            }
            _ => FrameOutcome::Accepted,
        }
    }

    /// The transport this connection runs over.
    pub fn transport(&self) -> Transport {
        if self.flag(UDP) {
            Transport::Udp
        } else {
            Transport::Tcp
        }
    }

    fn flag(&self, bit: u8) -> bool {
        self.flags.get() & bit != 0
    }

    fn set_flag(&self, bit: u8) {
        self.flags.set(self.flags.get() | bit);
    }

    /// Closed without BYE: the output is discarded and nothing is retransmitted.
    pub(crate) fn abandoned(&self) -> bool {
        self.flag(ABANDONED)
    }

    pub(crate) fn session(&self) -> std::cell::RefMut<'_, Session> {
        self.session.borrow_mut()
    }

    /// UDP: the first queued frame (the one in flight once sent).
    pub(crate) fn head_frame<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let out = self.out.borrow();
        if out.len() < HEADER_LEN {
            return None;
        }
        let n = head_len(&out);
        Some(f(&out[..n]))
    }

    /// UDP: the frame in flight was acknowledged: drop it from the queue.
    pub(crate) fn pop_head(&self) {
        let mut out = self.out.borrow_mut();
        if out.len() >= HEADER_LEN {
            let n = head_len(&out);
            out.drain(..n);
        }
        drop(out);
        self.ev.notify();
        self.output_progressed();
    }

    /// Tell the hook that output left the queue.
    pub(super) fn output_progressed(&self) {
        if let (Some(hook), Some(me)) = (self.links_hook(), self.me.upgrade()) {
            hook.on_output_progress(&me);
        }
    }

    /// Bytes of output that have left the queue since the session began (TCP: written to the
    /// socket; UDP: acknowledged by the device). A message queued when [`Conn::bytes_queued`]
    /// became `n` is delivered once this reaches `n`.
    pub fn bytes_gone(&self) -> u64 {
        self.stats.get().bytes_out - self.out.borrow().len() as u64
    }

    /// Bytes of output queued since the session began.
    pub fn bytes_queued(&self) -> u64 {
        self.stats.get().bytes_out
    }

    /// UDP: send an acknowledgement a hook held back ([`Ack::Held`]) now.
    pub fn send_held_ack(&self, utack: &[u8]) {
        if let Some(port) = self.port() {
            port.out().send(utack, self.peer);
        }
    }

    /// The application's reason to block input went away: resume reading (TCP) or taking
    /// messages (UDP, at the device's next retransmission).
    pub fn resume_input(&self) {
        self.ev.notify();
    }

    /// Nothing is queued or in flight.
    pub(crate) fn is_drained(&self) -> bool {
        self.out.borrow().is_empty()
    }

    /// A future completing at the next change of the connection's state.
    pub(crate) fn ev_wait(&self) -> super::event::Wait<'_> {
        self.ev.wait()
    }

    /// Mark the connection finished (all I/O loops ended).
    pub(crate) fn set_done(&self) {
        self.set_flag(DONE);
        self.ev.notify();
    }

    /// [`Conn::set_done`] once; whether this call did it.
    fn finish(&self) -> bool {
        if self.flag(DONE) {
            return false;
        }
        self.set_done();
        true
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Every idle session holds one of these: 512 bytes with the `Rc` counts is one allocator
    /// size class (the next is 640). A field added here must pay for itself elsewhere.
    #[test]
    fn connection_state_fits_512_bytes_with_its_rc() {
        assert!(std::mem::size_of::<Conn>() + 16 <= 512, "Conn is {} bytes", std::mem::size_of::<Conn>());
        assert_eq!(std::mem::size_of::<LocalEvent>(), 32);
    }
}
