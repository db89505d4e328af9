//! The no-allocation promises of the hot path, checked with a counting global allocator:
//! decoding a 64-byte DATA frame and opening it, and sealing into a caller buffer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use usmp::proto::crypto::{EphemeralKey, Psk};
use usmp::proto::deframer::Deframer;
use usmp::proto::frame::Frame;
use usmp::proto::handshake::{decode_hello, ClientHandshake, ClientReply, ServerExpectHelloAck};
use usmp::proto::session::{Received, Session, MAX_SEALED_MESSAGE_LEN};
use usmp::proto::Transport;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn pair(t: Transport) -> (Session, Session) {
    let mut buf = [0u8; 128];
    let psk = Psk::new(&[7; 16]).unwrap();
    let ch = ClientHandshake::new([1; 6], psk.clone(), EphemeralKey::from_seed(&[1; 32]).unwrap());
    let n = ch.encode_hello(&mut buf).unwrap();
    let hello = decode_hello(&Frame::decode(&buf[..n]).unwrap()).unwrap();
    let srv =
        ServerExpectHelloAck::new(&hello, &psk, EphemeralKey::from_seed(&[2; 32]).unwrap(), [3; 32]).unwrap();
    let n = srv.encode_challenge(&mut buf).unwrap();
    let ClientReply::Challenge(cl) = ch.handle_reply(&Frame::decode(&buf[..n]).unwrap()).unwrap() else {
        panic!()
    };
    let (s, n) = srv.finish([4; 16], &mut buf).unwrap();
    let c = cl.handle_session_ok(&Frame::decode(&buf[..n]).unwrap()).unwrap();
    (Session::new(&c, t), Session::new(&s, t))
}

// One test function so no other test thread allocates while we count.
#[test]
fn hot_path_does_not_allocate() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (mut c, mut s) = pair(t);
        let mut out = [0u8; MAX_SEALED_MESSAGE_LEN];
        let mut deframer = Deframer::new();
        let msg = [0x5au8; 36]; // 36 + 28 = a 64-byte DATA payload
        for round in 0..100 {
            let before = ALLOCS.load(Ordering::SeqCst);
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
            let after = ALLOCS.load(Ordering::SeqCst);
            assert_eq!(got, 36);
            assert_eq!(after, before, "allocation on the hot path ({t:?}, round {round})");
        }
    }
}
