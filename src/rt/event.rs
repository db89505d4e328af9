//! A single-thread notification primitive for tasks on one shard: versioned, so a notify that
//! lands between "check the condition" and "wait" is never lost.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes every task waiting on it.
#[derive(Default)]
pub struct LocalEvent {
    version: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl LocalEvent {
    /// Wake all current waiters.
    pub fn notify(&self) {
        self.version.set(self.version.get().wrapping_add(1));
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Wake one waiter (work queues with several consumers: no thundering herd).
    pub fn notify_one(&self) {
        self.version.set(self.version.get().wrapping_add(1));
        let w = self.waiters.borrow_mut().pop();
        if let Some(w) = w {
            w.wake();
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
    seen: u64,
}

impl Future for Wait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.ev.version.get() != self.seen {
            return Poll::Ready(());
        }
        let mut w = self.ev.waiters.borrow_mut();
        if !w.iter().any(|x| x.will_wake(cx.waker())) {
            w.push(cx.waker().clone());
        }
        Poll::Pending
    }
}
