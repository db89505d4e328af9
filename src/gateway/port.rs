//! The gateway's UDP port: the session side of one UDP socket shared by all its sessions,
//! so that a session needs no task of its own. Gateway-only (the client runs one task per
//! session, `rt::udp::pump`); it plugs into connections through [`Port`].

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::rt::conn::{Conn, Port};
use crate::rt::datagram::UdpOut;
use crate::rt::event::LocalEvent;
use crate::rt::{now, udp};

/// The session side of one UDP socket shared by all its sessions (the gateway's): the outgoing
/// queue, one timer queue for every session's frame in flight, and the sessions that finished.
/// A session then needs no task of its own: datagrams, UTACKs and application sends drive it
/// inline, and [`UdpPort::run_timers`] drives retransmissions.
pub(super) struct UdpPort {
    out: Rc<UdpOut>,
    timers: RefCell<BinaryHeap<Reverse<Timer>>>,
    timer_ev: LocalEvent,
    finished: RefCell<Vec<Rc<Conn>>>,
    finished_ev: LocalEvent,
    stopped: Cell<bool>,
}

struct Timer {
    at: Duration,
    conn: Weak<Conn>,
}

impl PartialEq for Timer {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timer {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.at.cmp(&o.at)
    }
}

impl UdpPort {
    /// A port sending through `out`.
    pub(super) fn new(out: Rc<UdpOut>) -> Rc<Self> {
        Rc::new(UdpPort {
            out,
            timers: RefCell::new(BinaryHeap::new()),
            timer_ev: LocalEvent::default(),
            finished: RefCell::new(Vec::new()),
            finished_ev: LocalEvent::default(),
            stopped: Cell::new(false),
        })
    }

    /// Sessions finished since the last call (their owner unregisters them).
    pub(super) fn take_finished(&self) -> Vec<Rc<Conn>> {
        std::mem::take(&mut *self.finished.borrow_mut())
    }

    /// Wait until a session finished (or [`UdpPort::stop`]).
    pub(super) async fn wait_finished(&self) {
        loop {
            let wait = self.finished_ev.wait();
            if !self.finished.borrow().is_empty() || self.stopped.get() {
                return;
            }
            wait.await;
        }
    }

    /// Let [`UdpPort::run_timers`] return.
    pub(super) fn stop(&self) {
        self.stopped.set(true);
        self.timer_ev.notify();
        self.finished_ev.notify();
    }

    /// Whether [`UdpPort::stop`] was called.
    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.get()
    }

    /// Drive every session's retransmissions until [`UdpPort::stop`].
    pub(super) async fn run_timers(self: Rc<Self>) {
        loop {
            let wait = self.timer_ev.wait();
            if self.stopped.get() {
                return;
            }
            let t = now();
            loop {
                let due = {
                    let mut timers = self.timers.borrow_mut();
                    match timers.peek() {
                        Some(Reverse(top)) if top.at <= t => timers.pop().map(|Reverse(x)| x),
                        _ => None,
                    }
                };
                let Some(timer) = due else { break };
                let Some(conn) = timer.conn.upgrade() else { continue };
                if conn.timer_at().is_some_and(|a| a <= timer.at) {
                    conn.set_timer_at(None);
                }
                if !conn.is_done() {
                    conn.kick();
                }
            }
            let next = self.timers.borrow().peek().map(|Reverse(top)| top.at);
            match next {
                Some(at) => {
                    let _ = monoio::time::timeout(at.saturating_sub(now()), wait).await;
                }
                None => wait.await,
            }
        }
    }
}

impl Port for UdpPort {
    /// The outgoing queue.
    fn out(&self) -> &UdpOut {
        &self.out
    }

    fn step(&self, conn: &Conn, t: Duration) -> bool {
        udp::step(conn, &self.out, t)
    }

    /// Make sure `conn` is looked at no later than `at`. A connection keeps at most one timer
    /// unless its deadline moves earlier (RTO shrinking): stale timers find nothing due.
    fn arm(&self, conn: &Conn, at: Duration) {
        if conn.timer_at().is_some_and(|a| a <= at) {
            return;
        }
        conn.set_timer_at(Some(at));
        let mut timers = self.timers.borrow_mut();
        let earliest = timers.peek().is_none_or(|Reverse(top)| at < top.at);
        timers.push(Reverse(Timer { at, conn: conn.weak() }));
        drop(timers);
        if earliest {
            self.timer_ev.notify();
        }
    }

    /// `conn` has nothing left to deliver and is closed: hand it to [`UdpPort::take_finished`].
    fn finished(&self, conn: Rc<Conn>) {
        self.finished.borrow_mut().push(conn);
        self.finished_ev.notify();
    }
}
