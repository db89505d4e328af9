//! The send schedule of a thread's devices: one timer for all of them. A monoio timer per
//! device puts tens of thousands of entries in the runtime's hierarchical timer wheel, and
//! every 4.096 s the wheel moves all those due after the boundary down a level at once: a
//! 10–20 ms stall of the whole thread, which showed as that much latency for every message
//! due meanwhile. A binary heap has no such moment.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use monoio::time::Instant;
use usmp::LocalEvent;

struct Entry {
    at: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Wake-ups for one thread's tasks at given instants, driven by [`Schedule::run`].
#[derive(Default)]
pub struct Schedule {
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    seq: Cell<u64>,
    /// The earliest deadline moved earlier (or the schedule stopped).
    changed: LocalEvent,
    stopped: Cell<bool>,
}

impl Schedule {
    /// Sleep until `at` (returns at once if it has passed).
    pub fn sleep_until(&self, at: Instant) -> SleepUntil<'_> {
        SleepUntil { sched: self, at, registered: false }
    }

    fn register(&self, at: Instant, waker: Waker) {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let mut heap = self.heap.borrow_mut();
        let earliest = heap.peek().is_none_or(|Reverse(top)| at < top.at);
        heap.push(Reverse(Entry { at, seq, waker }));
        drop(heap);
        if earliest {
            self.changed.notify();
        }
    }

    /// Let [`Schedule::run`] return.
    pub fn stop(&self) {
        self.stopped.set(true);
        self.changed.notify();
    }

    /// Wake every sleeper when its time comes, until [`Schedule::stop`].
    pub async fn run(self: Rc<Self>) {
        loop {
            let changed = self.changed.wait();
            if self.stopped.get() {
                return;
            }
            let now = Instant::now();
            loop {
                let due = {
                    let mut heap = self.heap.borrow_mut();
                    match heap.peek() {
                        Some(Reverse(top)) if top.at <= now => heap.pop(),
                        _ => None,
                    }
                };
                match due {
                    Some(Reverse(e)) => e.waker.wake(),
                    None => break,
                }
            }
            let next = self.heap.borrow().peek().map(|Reverse(top)| top.at);
            match next {
                Some(at) => {
                    let _ =
                        monoio::time::timeout(at.saturating_duration_since(Instant::now()), changed).await;
                }
                None => changed.await,
            }
        }
    }
}

/// See [`Schedule::sleep_until`].
pub struct SleepUntil<'a> {
    sched: &'a Schedule,
    at: Instant,
    registered: bool,
}

impl Future for SleepUntil<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        // Woken early only by its own task's other business: the entry stays, and fires once.
        if !self.registered {
            self.registered = true;
            self.sched.register(self.at, cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sleepers_wake_in_order_and_not_before_their_time() {
        usmp::block_on(async {
            let sched = Rc::new(Schedule::default());
            let runner = monoio::spawn(sched.clone().run());
            let t0 = Instant::now();
            let order = Rc::new(RefCell::new(Vec::new()));
            let tasks: Vec<_> = [30u64, 10, 20, 0]
                .into_iter()
                .map(|ms| {
                    let (sched, order) = (sched.clone(), order.clone());
                    monoio::spawn(async move {
                        let at = t0 + Duration::from_millis(ms);
                        sched.sleep_until(at).await;
                        assert!(Instant::now() >= at);
                        order.borrow_mut().push(ms);
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
            assert_eq!(*order.borrow(), [0, 10, 20, 30]);
            sched.stop();
            runner.await;
        });
    }
}
