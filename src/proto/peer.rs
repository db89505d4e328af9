//! One UDP session held in memory, for the two-peer harness and the fuzzer: a
//! [`Session`], its queue of sealed frames, its [`Link`] and a message inbox, as a
//! [`LinkHost`]. The UDP rules it runs are `proto::link`'s, the same the gateway's and the
//! client's connections run; only the storage and the delivery to an application are its own.

use core::cell::{Cell, RefCell};
use core::time::Duration;
use std::collections::VecDeque;

use super::crypto::{KEY_LEN, REKEY_SALT_LEN};
use super::error::{ErrorKind, Result};
use super::frame::HEADER_LEN;
use super::handshake::Established;
use super::host::{head_len, respond, Response, CONTROL_FRAME_LEN, INBOX_CAP, OUT_HIGH_WATER};
use super::link::{self, FrameOutcome, Inbound, Link, LinkHost, SendAction};
use super::session::{sealed_len, Session};
use super::Transport;

/// One end of a UDP session, sans IO.
#[derive(Debug)]
pub struct UdpPeer {
    session: RefCell<Session>,
    out: RefCell<Vec<u8>>,
    link: RefCell<Link>,
    transmits: RefCell<VecDeque<Vec<u8>>>,
    inbox: RefCell<VecDeque<Vec<u8>>>,
    /// BYE seen or sent, or a fatal error.
    closed: Cell<bool>,
    /// Five transmissions of a frame went unacknowledged.
    gone: Cell<bool>,
    retransmits: Cell<u64>,
}

impl UdpPeer {
    /// The session of a completed handshake.
    pub fn new(est: &Established) -> Self {
        UdpPeer {
            session: RefCell::new(Session::new(est, Transport::Udp)),
            out: RefCell::new(Vec::new()),
            link: RefCell::new(Link::default()),
            transmits: RefCell::new(VecDeque::new()),
            inbox: RefCell::new(VecDeque::new()),
            closed: Cell::new(false),
            gone: Cell::new(false),
            retransmits: Cell::new(0),
        }
    }

    fn queue(
        &self,
        now: Duration,
        max: usize,
        f: impl FnOnce(&mut Session, &mut [u8]) -> Result<usize>,
    ) -> Result<()> {
        let mut out = self.out.borrow_mut();
        let at = out.len();
        out.resize(at + max, 0);
        let mut s = self.session.borrow_mut();
        let key: [u8; KEY_LEN] = *s.tx_key_bytes();
        let res = f(&mut s, &mut out[at..]);
        drop(s);
        let n = *res.as_ref().unwrap_or(&0);
        out.truncate(at + n);
        self.link.borrow_mut().on_queued(&out[at..], &key);
        drop(out);
        self.drive(now);
        res.map(|_| ())
    }

    /// The peer rekeyed: frames queued under the old key and not yet sent are sealed again
    /// under the new one (the rule is `host::unsent_from`'s, the same the runtime follows).
    fn reseal_unsent(&self) {
        let (mut out, mut link) = (self.out.borrow_mut(), self.link.borrow_mut());
        let _ = super::host::reseal_unsent(&mut self.session.borrow_mut(), &mut link, &mut out, 0);
    }

    /// Queue one message (fragmented as needed).
    pub fn send_message(&self, now: Duration, msg: &[u8]) -> Result<()> {
        self.queue(now, sealed_len(msg.len()), |s, out| s.seal_message(msg, out))
    }

    /// Queue a PING.
    pub fn ping(&self, now: Duration) -> Result<()> {
        self.queue(now, CONTROL_FRAME_LEN, |s, out| s.seal_ping(now, out))
    }

    /// Queue a REKEY with `salt` (keys switch at once, PROTOCOL.md §6).
    pub fn rekey(&self, now: Duration, salt: &[u8; REKEY_SALT_LEN]) -> Result<()> {
        self.queue(now, CONTROL_FRAME_LEN + REKEY_SALT_LEN, |s, out| s.seal_rekey(salt, out))
    }

    /// Queue BYE.
    pub fn bye(&self, now: Duration) -> Result<()> {
        self.queue(now, CONTROL_FRAME_LEN, |s, out| s.seal_bye(out))
    }

    /// A datagram from the peer.
    pub fn handle_datagram(&self, now: Duration, d: &mut [u8]) -> Inbound {
        let r = link::handle_datagram(self, now, d);
        self.drive(now);
        r
    }

    /// When [`UdpPeer::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.link.borrow().poll_timeout()
    }

    /// Advance time: retransmit, give up, send the next frame.
    pub fn handle_timeout(&self, now: Duration) {
        self.drive(now);
    }

    fn drive(&self, now: Duration) {
        if self.gone.get() {
            return;
        }
        loop {
            match link::poll_sender(self, now) {
                SendAction::Send { retransmit, .. } => {
                    self.retransmits.set(self.retransmits.get() + u64::from(retransmit));
                    return;
                }
                SendAction::Skip => self.acked(),
                SendAction::GiveUp => {
                    self.gone.set(true);
                    self.out.borrow_mut().clear();
                    self.link.borrow_mut().abandon();
                    return;
                }
                SendAction::Idle => return,
            }
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&self) -> Option<Vec<u8>> {
        self.transmits.borrow_mut().pop_front()
    }

    /// The next message received.
    pub fn recv(&self) -> Option<Vec<u8>> {
        self.inbox.borrow_mut().pop_front()
    }

    /// BYE seen or sent, or the session failed.
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// The peer stopped acknowledging (five attempts).
    pub fn is_gone(&self) -> bool {
        self.gone.get()
    }

    /// Nothing queued or in flight.
    pub fn is_drained(&self) -> bool {
        self.out.borrow().is_empty()
    }

    /// Bytes of sealed frames queued (the frame in flight included).
    pub fn queued_len(&self) -> usize {
        self.out.borrow().len()
    }

    /// No REKEY is in progress: the last one (if any) was followed by a frame under the new
    /// keys, so the previous receive key is gone.
    pub fn rekey_settled(&self) -> bool {
        self.session.borrow().rekey_settled()
    }

    /// The UTACK the frame in flight waits for.
    pub fn in_flight(&self) -> Option<super::udp::ExpectedAck> {
        self.link.borrow().in_flight()
    }

    /// Retransmissions so far.
    pub fn retransmits(&self) -> u64 {
        self.retransmits.get()
    }

    /// The session's keys (tx, rx) and id, for oracles.
    pub fn keys(&self) -> ([u8; KEY_LEN], [u8; KEY_LEN], [u8; 16]) {
        let s = self.session.borrow();
        (*s.tx_key_bytes(), *s.rx_key_bytes(), *s.session_id())
    }
}

impl LinkHost for UdpPeer {
    fn with_link<R>(&self, f: impl FnOnce(&mut Link) -> R) -> R {
        f(&mut self.link.borrow_mut())
    }
    fn input_blocked(&self) -> bool {
        self.inbox.borrow().len() >= INBOX_CAP || self.out.borrow().len() >= OUT_HIGH_WATER
    }
    fn ack_key(&self) -> [u8; KEY_LEN] {
        *self.session.borrow().ack_key_bytes()
    }
    fn open(&self, now: Duration, frame: &mut [u8]) -> FrameOutcome {
        let queued = self.out.borrow().len();
        let mut s = self.session.borrow_mut();
        match respond(s.open(frame, now), Transport::Udp, queued) {
            Response::Deliver(m) => {
                self.inbox.borrow_mut().push_back(m.to_vec());
                FrameOutcome::Accepted
            }
            Response::Pong => {
                drop(s);
                let _ = self.queue(now, CONTROL_FRAME_LEN, |s, out| {
                    s.seal_pong(now, out).ok_or(super::Error::misuse(ErrorKind::Timeout, "flood guard"))
                });
                FrameOutcome::Accepted
            }
            Response::Reseal => {
                drop(s);
                self.reseal_unsent();
                FrameOutcome::Accepted
            }
            Response::PeerBye => {
                self.closed.set(true);
                FrameOutcome::AcceptedAndClosed
            }
            Response::Close(_) => {
                self.closed.set(true);
                FrameOutcome::Closed
            }
            Response::Drop(kind) => FrameOutcome::Rejected(kind),
            _ => FrameOutcome::Accepted,
        }
    }
    fn verify_duplicate(&self, frame: &mut [u8]) -> bool {
        self.session.borrow_mut().verify_duplicate(frame)
    }
    fn acked(&self) {
        let mut out = self.out.borrow_mut();
        if out.len() >= HEADER_LEN {
            let n = head_len(&out);
            out.drain(..n);
        }
    }
    fn send(&self, datagram: &[u8]) {
        self.transmits.borrow_mut().push_back(datagram.to_vec());
    }
    fn hold_ack(&self, utack: &[u8]) {
        LinkHost::send(self, utack);
    }
    fn has_head(&self) -> bool {
        self.out.borrow().len() >= HEADER_LEN
    }
    fn send_head(&self, copies: usize) {
        let out = self.out.borrow();
        if out.len() < HEADER_LEN {
            return;
        }
        let n = head_len(&out);
        for _ in 0..copies {
            self.transmits.borrow_mut().push_back(out[..n].to_vec());
        }
    }
}
