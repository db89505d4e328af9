//! The session side of UDP, shared by the gateway and the client: the per-session
//! stop-and-wait sender (`step`, and `pump` as a task) and the receive-side handling of a
//! session's datagrams (UTACKs sent only after a frame authenticated; authentic duplicates
//! re-ACKed). The socket I/O underneath is `datagram`'s.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use super::conn::{CloseReason, Conn, FrameOutcome};
use super::datagram::UdpOut;
use super::now;
use crate::proto::link::{self, Link, LinkHost, SendAction};

pub use crate::proto::link::Inbound;

/// Advance one session's stop-and-wait sender at `t` (the rules are `proto::link`'s): send
/// what [`Link::poll`](crate::proto::link::Link::poll) says. The frame in flight stays first in
/// the connection's output until its UTACK arrives, so nothing is copied to keep it.
/// Returns whether the session is finished: closing with nothing left to deliver.
pub(crate) fn step(conn: &Conn, out: &UdpOut, t: Duration) -> bool {
    if conn.abandoned() {
        conn.link.borrow_mut().abandon();
        return true;
    }
    match link::poll_sender(&ConnLink { conn, out, peer: conn.peer() }, t) {
        SendAction::Send { retransmit: true, .. } => conn.bump(|s| s.retransmits += 1),
        SendAction::GiveUp => {
            conn.close(CloseReason::PeerGone, false);
            return true;
        }
        // A frame without its expected UTACK cannot be in the queue; never spin on one.
        SendAction::Skip => conn.pop_head(),
        SendAction::Send { .. } | SendAction::Idle => {}
    }
    conn.close_reason().is_some() && !conn.link.borrow().is_busy() && conn.is_drained()
}

/// Stop-and-wait sender of one session as a task (the client's): wakes when output is
/// queued, a UTACK arrives or the frame in flight is due; five silent attempts end the
/// session (`PeerGone`). Returns when the session is closed and its last frame (BYE) was
/// delivered or abandoned.
pub async fn pump(conn: Rc<Conn>, out: Rc<UdpOut>) {
    loop {
        let wait = conn.ev_wait();
        if step(&conn, &out, now()) {
            break;
        }
        let deadline = conn.link.borrow().poll_timeout();
        match deadline {
            // Dropping an event wait is free: no I/O is lost (unlike a socket read).
            Some(at) => {
                let _ = monoio::time::timeout(at.saturating_sub(now()), wait).await;
            }
            None => wait.await,
        }
    }
    conn.set_done();
}

/// A connection as the host of its UDP link, sending through `out`.
struct ConnLink<'a> {
    conn: &'a Conn,
    out: &'a UdpOut,
    peer: SocketAddr,
}

impl LinkHost for ConnLink<'_> {
    fn with_link<R>(&self, f: impl FnOnce(&mut Link) -> R) -> R {
        f(&mut self.conn.link.borrow_mut())
    }
    fn input_blocked(&self) -> bool {
        self.conn.input_blocked()
    }
    fn ack_key(&self) -> [u8; 32] {
        *self.conn.session().ack_key_bytes()
    }
    fn open(&self, now: Duration, frame: &mut [u8]) -> FrameOutcome {
        self.conn.on_frame(frame, now)
    }
    fn verify_duplicate(&self, frame: &mut [u8]) -> bool {
        self.conn.session().verify_duplicate(frame)
    }
    fn acked(&self) {
        self.conn.pop_head();
        self.conn.kick();
    }
    fn send(&self, datagram: &[u8]) {
        self.out.send(datagram, self.peer);
    }
    fn has_head(&self) -> bool {
        !self.conn.is_drained()
    }
    fn send_head(&self, copies: usize) {
        self.conn.head_frame(|f| {
            for _ in 0..copies {
                self.out.send(f, self.peer);
            }
        });
    }
    fn hold_ack(&self, utack: &[u8]) {
        // The application holds this message's UTACK (until it is stored downstream): hand
        // it the bytes.
        if let (Some(hook), Some(me)) = (self.conn.links_hook(), self.conn.weak().upgrade()) {
            hook.on_ack_held(&me, utack);
        }
    }
}

/// Handle one datagram that arrived at `t` from the peer of an established UDP session
/// (`proto::link` decides: UTACKs complete the frame in flight, frames are acknowledged only
/// once authentic).
pub fn on_session_datagram(
    conn: &Conn,
    out: &UdpOut,
    d: &mut [u8],
    peer: SocketAddr,
    t: Duration,
) -> Inbound {
    link::handle_datagram(&ConnLink { conn, out, peer }, t, d)
}
