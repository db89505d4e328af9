//! A single-thread notification primitive for tasks on one shard: versioned, so a notify that
//! lands between "check the condition" and "wait" is never lost.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes every task waiting on it. 32 bytes: every connection holds several.
#[derive(Default)]
pub struct LocalEvent {
    /// Bumped by every notify; a waiter compares it with the value it saw (wrapping is
    /// harmless: a waiter would have to sleep through exactly 2^32 notifies).
    version: Cell<u32>,
    /// Taken out while touched (a `Cell` instead of a `RefCell`: no borrow flag to store).
    waiters: Cell<Vec<Waker>>,
}

impl LocalEvent {
    /// Wake all current waiters.
    pub fn notify(&self) {
        self.version.set(self.version.get().wrapping_add(1));
        let mut ws = self.waiters.take();
        for w in ws.drain(..) {
            w.wake();
        }
        // Keep the capacity for the next waiters, unless some registered meanwhile.
        let meanwhile = self.waiters.take();
        if meanwhile.is_empty() {
            self.waiters.set(ws);
        } else {
            self.waiters.set(meanwhile);
        }
    }

    /// Wake one waiter (work queues with several consumers: no thundering herd).
    pub fn notify_one(&self) {
        self.version.set(self.version.get().wrapping_add(1));
        let mut ws = self.waiters.take();
        let w = ws.pop();
        self.waiters.set(ws);
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Drop the waiter list's capacity if nobody waits (idle connections keep no buffer).
    pub fn shrink(&self) {
        let ws = self.waiters.take();
        if !ws.is_empty() {
            self.waiters.set(ws);
        }
    }

    /// A future that completes at the next [`LocalEvent::notify`] after this call.
    pub fn wait(&self) -> Wait<'_> {
        Wait { ev: self, seen: self.version.get() }
    }
}

/// Future returned by [`LocalEvent::wait`].
pub struct Wait<'a> {
    ev: &'a LocalEvent,
    seen: u32,
}

impl Future for Wait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.ev.version.get() != self.seen {
            return Poll::Ready(());
        }
        let mut w = self.ev.waiters.take();
        // A task polled again before a notify is usually the last to register: checking only
        // the last entry keeps this O(1) with thousands of waiters (a duplicate further back
        // costs one spurious wake-up; the list is emptied by every notify).
        if !w.last().is_some_and(|x| x.will_wake(cx.waker())) {
            // Most events have one waiter (an idle connection's task): 16 bytes, not the
            // four slots a first push would allocate.
            if w.capacity() == 0 {
                w.reserve_exact(1);
            }
            w.push(cx.waker().clone());
        }
        self.ev.waiters.set(w);
        Poll::Pending
    }
}
