//! The no-allocation promises of the hot path, checked with a counting global allocator:
//! decoding a 64-byte DATA frame and opening it, and sealing into a caller buffer. Also that
//! parking a session's keys frees them and the next frame brings them back.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use usmp::proto::deframer::Deframer;
use usmp::proto::session::{Received, MAX_SEALED_MESSAGE_LEN};
use usmp::Transport;

struct Counting;
thread_local! {
    // Per thread: the test harness's own threads may allocate while we measure.
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

fn allocs() -> usize {
    ALLOCS.with(|c| c.get())
}

// SAFETY: forwards every call unchanged to the system allocator; only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

use usmp::proto::testing::session_pair as pair;

// One test function so no other test thread allocates while we count.
#[test]
fn hot_path_does_not_allocate() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (mut c, mut s) = pair(t);
        let mut out = [0u8; MAX_SEALED_MESSAGE_LEN];
        let mut deframer = Deframer::new();
        let msg = [0x5au8; 36]; // 36 + 28 = a 64-byte DATA payload
        for round in 0..100 {
            // Parked sessions (idle ones drop their expanded keys) allocate once when they
            // wake; a busy session never does. Round 0 is the wake-up.
            let before = allocs();
            let n = c.seal_message(&msg, &mut out).unwrap();
            assert_eq!(n, 12 + 64);
            deframer.push(&out[..n]);
            let frame = deframer.next_frame().unwrap().unwrap();
            let got = match s.open(frame, Duration::from_millis(round)).unwrap() {
                Received::Message(m) => m.len(),
                other => panic!("{other:?}"),
            };
            let n = s.seal_pong(Duration::from_secs(round * 2), &mut out).unwrap();
            assert!(n > 0);
            let after = allocs();
            assert_eq!(got, 36);
            if round == 0 {
                assert!(after - before <= 2, "waking parked keys: one box per side ({t:?})");
            } else {
                assert_eq!(after, before, "allocation on the hot path ({t:?}, round {round})");
            }
        }
    }
}

#[test]
fn parked_keys_wake_on_the_next_frame() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (mut c, mut s) = pair(t);
        let mut out = [0u8; MAX_SEALED_MESSAGE_LEN];
        for round in 0..4u64 {
            if round % 2 == 1 {
                c.park();
                s.park();
                assert!(c.is_parked() && s.is_parked());
            }
            let n = c.seal_message(b"after a nap", &mut out).unwrap();
            assert!(!c.is_parked());
            let mut d = Deframer::new();
            d.push(&out[..n]);
            let f = d.next_frame().unwrap().unwrap();
            assert_eq!(s.open(f, Duration::from_secs(round)).unwrap(), Received::Message(b"after a nap"));
        }
    }
}
