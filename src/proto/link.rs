//! One UDP session's transport (PROTOCOL.md §7), sans IO: the UTACK policy of the receiving
//! side (acknowledge only what authenticated, with the key of its direction; re-acknowledge an
//! authentic retransmission without delivering it again; copies once the peer showed ACK loss)
//! and the stop-and-wait sender (one frame in flight, its UTACK awaited with the MAC of the
//! key it was sealed with, retransmissions on the RTO, the last two doubled, five attempts).
//!
//! The session's storage (keys, output queue, delivery to the application) is the host's:
//! the gateway's and the client's connections implement [`LinkHost`], and so does the
//! in-memory peer of the two-peer harness. [`handle_datagram`] and [`Link::poll`] are the
//! only places these rules are written.

use core::time::Duration;
use std::collections::VecDeque;

use super::arq::{Arq, ArqAction};
use super::crypto::KEY_LEN;
use super::error::ErrorKind;
use super::frame::{Frame, PacketType, HEADER_LEN};
use super::udp::{encode_utack, is_utack, ExpectedAck, MAX_ATTEMPTS};

/// Copies of each session-phase UTACK once the peer has shown it loses them: on a link losing
/// a fraction `p` of datagrams an attempt then fails with about `p + p²` instead of `2p`, and
/// `(p + p²)^5` is what loses a session (at 10 % loss: 1.5e-5 per frame instead of 2.5e-4).
/// On a clean link one copy is sent: the second costs a syscall per frame on both sides.
pub const UTACK_COPIES: usize = 2;
/// How long after the last sign of UTACK loss the copies keep going out.
pub const ACK_LOSS_MEMORY: Duration = Duration::from_secs(30);
/// How many of the final transmissions are sent as two copies. With loss `p` per datagram a
/// frame is then lost for good with about `(p+p²)^3 · (p²)^2` instead of `(p+p²)^5`:
/// at 10 % loss 1.3e-7 per frame instead of 1.5e-5.
pub const LAST_ATTEMPTS_DOUBLED: u32 = 2;

/// What one received frame did to the session (the host's [`LinkHost::open`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameOutcome {
    /// Authenticated and processed (acknowledge it on UDP).
    Accepted,
    /// Authenticated and delivered to an application that holds its acknowledgement.
    AcceptedHeld,
    /// Authenticated, and it ended the session (BYE): acknowledge, then stop.
    AcceptedAndClosed,
    /// Dropped without harm to the session (UDP), with the reason.
    Rejected(ErrorKind),
    /// The session is over (TCP violation, flood guard, spent sequence).
    Closed,
}

/// What a session's datagram turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Inbound {
    /// Handled here (UTACK, accepted or re-ACKed frame).
    Handled,
    /// Dropped: malformed, unauthenticated, replayed, out of order (reason inside).
    Dropped(ErrorKind),
    /// A UTACK that acknowledges nothing outstanding (late, duplicate, forged).
    StrayAck,
    /// Left unacknowledged because the application is not keeping up (the device retransmits
    /// it later: UDP's backpressure).
    Busy,
    /// A handshake-phase frame (type inside): the caller decides (re-ACK, new handshake).
    Handshake(PacketType),
    /// The session ended with this datagram.
    Closed,
}

/// What the sender must do after [`Link::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendAction {
    /// Nothing to send now.
    Idle,
    /// Send the first queued frame, `copies` times back to back (the same frame, never a
    /// second one: a device's one spare datagram slot only ever holds a copy).
    Send {
        /// How many copies.
        copies: usize,
        /// It is a retransmission.
        retransmit: bool,
    },
    /// The first queued frame has no expected UTACK (cannot happen): drop it unsent.
    Skip,
    /// Five transmissions went unacknowledged: the peer is gone.
    GiveUp,
}

/// The per-session state of the UDP transport: the frame in flight and the UTACK every queued
/// frame expects (in queue order), and when the peer last showed it loses our UTACKs.
#[derive(Debug, Default)]
pub struct Link {
    arq: Arq,
    acks: VecDeque<ExpectedAck>,
    /// Nanoseconds (0 = never): every byte here is per session.
    ack_loss_seen: u64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How many frames a run of sealed frames holds (their headers' length fields).
pub fn frame_count(sealed: &[u8]) -> u64 {
    let (mut frames, mut i) = (0, 0);
    while i + HEADER_LEN <= sealed.len() {
        frames += 1;
        i += HEADER_LEN + usize::from(u16::from_le_bytes([sealed[i + 8], sealed[i + 9]]));
    }
    frames
}

impl Link {
    /// Frames were sealed with `key` and appended to the host's output queue: note the UTACK
    /// each expects. Returns how many frames `sealed` holds.
    pub fn on_queued(&mut self, sealed: &[u8], key: &[u8; KEY_LEN]) -> u64 {
        let mut frames = 0;
        let mut i = 0;
        while i + HEADER_LEN <= sealed.len() {
            let seq = u32::from_le_bytes([sealed[i + 4], sealed[i + 5], sealed[i + 6], sealed[i + 7]]);
            self.acks.push_back(ExpectedAck::new(sealed[i + 3], seq, Some(key)));
            frames += 1;
            i += HEADER_LEN + usize::from(u16::from_le_bytes([sealed[i + 8], sealed[i + 9]]));
        }
        frames
    }

    /// The queued frames after the first `keep` were sealed again (`sealed`, with `key`: the
    /// peer's REKEY): expect their new UTACKs instead of the old ones.
    pub fn requeue_after(&mut self, keep: usize, sealed: &[u8], key: &[u8; KEY_LEN]) {
        self.acks.truncate(keep);
        self.on_queued(sealed, key);
    }

    /// The UTACK the frame in flight waits for.
    pub fn in_flight(&self) -> Option<ExpectedAck> {
        self.arq.is_busy().then(|| self.acks.front().copied()).flatten()
    }

    /// A frame is in flight.
    pub fn is_busy(&self) -> bool {
        self.arq.is_busy()
    }

    /// When [`Link::poll`] must run next (the frame in flight's deadline).
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.arq.poll_timeout()
    }

    /// The session closed without BYE: stop retransmitting at once, forget the queue.
    pub fn abandon(&mut self) {
        self.arq.assume_acked();
        self.acks = VecDeque::new();
    }

    /// Free the ack queue's memory if it is empty (an idle session).
    pub fn shrink(&mut self) {
        if self.acks.is_empty() {
            self.acks = VecDeque::new();
        }
    }

    /// Advance the sender at `now`: retransmit or give up when the frame in flight is due,
    /// send the first queued frame when none is in flight (`has_head`: one is queued).
    pub fn poll(&mut self, now: Duration, has_head: bool) -> SendAction {
        match self.arq.handle_timeout(now) {
            ArqAction::Wait => {}
            ArqAction::Retransmit(attempt) => {
                let copies = if attempt + LAST_ATTEMPTS_DOUBLED >= MAX_ATTEMPTS { 2 } else { 1 };
                return SendAction::Send { copies, retransmit: true };
            }
            ArqAction::GiveUp => return SendAction::GiveUp,
        }
        if self.arq.is_busy() || !has_head {
            return SendAction::Idle;
        }
        match self.acks.front() {
            Some(expect) => {
                self.arq.on_send(*expect, now);
                SendAction::Send { copies: 1, retransmit: false }
            }
            None => SendAction::Skip,
        }
    }

    /// A UTACK: true if it acknowledges the frame in flight (the host then drops that frame).
    fn handle_ack(&mut self, d: &[u8], now: Duration) -> bool {
        if self.arq.handle_ack(d, now) {
            self.acks.pop_front();
            return true;
        }
        false
    }

    fn copies(&self, now: Duration) -> usize {
        let lossy =
            self.ack_loss_seen != 0 && ns(now).saturating_sub(self.ack_loss_seen) < ns(ACK_LOSS_MEMORY);
        if lossy {
            UTACK_COPIES
        } else {
            1
        }
    }
}

/// What a [`Link`] needs from the session that owns it. Methods take `&self`: hosts live in
/// shared cells, and [`LinkHost::open`] may reach the application, which may send.
pub trait LinkHost {
    /// Run `f` on the session's link (never while calling another host method).
    fn with_link<R>(&self, f: impl FnOnce(&mut Link) -> R) -> R;
    /// New messages must wait (the application is not keeping up).
    fn input_blocked(&self) -> bool;
    /// The key the frame just opened (or verified as a duplicate) was sealed with: its UTACK
    /// is MAC'd with it (after a REKEY, the previous key for frames sealed before it).
    fn ack_key(&self) -> [u8; KEY_LEN];
    /// Authenticate and process one frame (deliver messages, answer PINGs, end on BYE).
    fn open(&self, now: Duration, frame: &mut [u8]) -> FrameOutcome;
    /// A frame the replay window refused: is it an authentic retransmission?
    fn verify_duplicate(&self, frame: &mut [u8]) -> bool;
    /// The frame in flight was acknowledged: drop it from the output queue.
    fn acked(&self);
    /// Send a datagram to the peer.
    fn send(&self, datagram: &[u8]);
    /// The application holds this message's UTACK: keep it for when it is released.
    fn hold_ack(&self, utack: &[u8]);
    /// A frame is queued for sending.
    fn has_head(&self) -> bool;
    /// Send the first queued frame `copies` times.
    fn send_head(&self, copies: usize);
}

/// Advance the stop-and-wait sender of `host` at `now`: (re)transmit the first queued frame
/// as [`Link::poll`] decides. The caller acts on [`SendAction::GiveUp`] (the session is over)
/// and [`SendAction::Skip`] (drop the first queued frame), and counts retransmissions.
pub fn poll_sender<H: LinkHost>(host: &H, now: Duration) -> SendAction {
    let has_head = host.has_head();
    let action = host.with_link(|l| l.poll(now, has_head));
    match action {
        SendAction::Send { copies, .. } => host.send_head(copies),
        SendAction::Skip | SendAction::Idle | SendAction::GiveUp => {}
    }
    action
}

/// Handle one datagram from the peer of an established UDP session: a UTACK completes the
/// frame in flight (if it matches, MAC included); a frame is opened and, only once it
/// authenticated, acknowledged with the key of its direction.
pub fn handle_datagram<H: LinkHost>(host: &H, now: Duration, d: &mut [u8]) -> Inbound {
    if is_utack(d) {
        if host.with_link(|l| l.handle_ack(d, now)) {
            host.acked();
            return Inbound::Handled;
        }
        return Inbound::StrayAck;
    }
    let (ptype, seq) = match Frame::decode_exact(d) {
        Ok(f) => (f.packet_type(), f.seq()),
        Err(e) => return Inbound::Dropped(e.kind()),
    };
    if !ptype.is_encrypted() {
        return Inbound::Handshake(ptype);
    }
    // Only messages wait; control frames (PING, BYE, REKEY) always get through. An
    // application holding a message's UTACK blocks input too, so a retransmission of the held
    // frame is neither delivered again nor acknowledged before the release.
    if matches!(ptype, PacketType::Data | PacketType::DataFrag) && host.input_blocked() {
        return Inbound::Busy;
    }
    // The UTACK's MAC key is the key this frame was sealed with, which the host knows once
    // it opened it (a REKEY switches keys while being opened).
    let utack = || encode_utack(ptype as u8, seq, Some(&host.ack_key()));
    let ack = |copies: usize| {
        let (b, n) = utack();
        for _ in 0..copies {
            host.send(&b[..n]);
        }
    };
    match host.open(now, d) {
        FrameOutcome::Accepted => {
            ack(host.with_link(|l| l.copies(now)));
            Inbound::Handled
        }
        FrameOutcome::AcceptedHeld => {
            let (b, n) = utack();
            host.hold_ack(&b[..n]);
            Inbound::Handled
        }
        FrameOutcome::AcceptedAndClosed => {
            ack(host.with_link(|l| l.copies(now)));
            Inbound::Closed
        }
        FrameOutcome::Rejected(ErrorKind::Sequence) if host.verify_duplicate(d) => {
            // A retransmission whose UTACK was lost: acknowledge again, deliver nothing, and
            // send copies for a while.
            ack(host.with_link(|l| {
                l.ack_loss_seen = ns(now).max(1);
                l.copies(now)
            }));
            Inbound::Handled
        }
        FrameOutcome::Rejected(kind) => Inbound::Dropped(kind),
        FrameOutcome::Closed => Inbound::Closed,
    }
}
