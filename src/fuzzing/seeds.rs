//! Seed inputs made with this implementation, in the input formats of the entry points (the
//! reference package's seeds come from `tests/fuzz/seeds.py`). `USMP_WRITE_SEEDS=1 cargo test
//! --test fuzz_replay` writes them to `tests/fuzz/corpus/<target>/`. A name starting with `ok-`
//! promises an outcome the replay test checks (a frame, a session, a message).

use super::{raw_frame, TARGETS};
use crate::proto::error::Transport;
use crate::proto::frame::PacketType;
use crate::proto::session::MAX_SEALED_MESSAGE_LEN;
use crate::proto::testing::session_pair;

/// One seed input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The fuzz target (one of [`TARGETS`]).
    pub target: &'static str,
    /// File name in the target's corpus directory.
    pub name: String,
    /// The input.
    pub data: Vec<u8>,
}

struct Out(Vec<Seed>);

impl Out {
    fn add(&mut self, target: usize, name: &str, parts: &[&[u8]]) {
        let (target, name) = (TARGETS[target], format!("{name}.bin"));
        self.0.push(Seed { target, name, data: parts.concat() });
    }
}

fn le16(n: usize) -> [u8; 2] {
    (n as u16).to_le_bytes()
}

fn deframe(o: &mut Out) {
    let all: Vec<u8> = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0xFF]
        .iter()
        .flat_map(|t| raw_frame(*t, u32::from(*t) * 1000, &vec![*t; usize::from(*t % 64) * 7]))
        .collect();
    for (name, mode, chunks) in [
        ("ok-ours-types", 0, &[][..]),
        ("ok-ours-bytewise", 0, &[0][..]),
        ("ok-ours-uring", 1, &[99, 6][..]),
        ("ok-ours-uring-short", 3, &[12][..]),
        ("ok-ours-large-buffer", 4, &[255, 11][..]),
    ] {
        o.add(0, name, &[&[mode, chunks.len() as u8], chunks, &all]);
    }
    let big: Vec<u8> = (0..4).flat_map(|i| raw_frame(5, i, &[i as u8; 480])).collect();
    o.add(0, "ok-ours-max-frames", &[&[5, 2, 254, 200], &big]);
    let (mut c, _) = session_pair(Transport::Tcp);
    let mut buf = vec![0u8; MAX_SEALED_MESSAGE_LEN];
    let n = c.seal_message(&[0x42; 1808], &mut buf).expect("seal");
    o.add(0, "ok-ours-sealed", &[&[0, 1, 11], &buf[..n]]);
    let good = raw_frame(5, 7, b"abcdef");
    let mut bad = Vec::new();
    for (i, at, val) in [(0, 0, 0xCE), (1, 2, 0x01), (2, 9, 0x02), (3, 10, 0x00), (4, 3, 0x0C)] {
        let mut f = good.clone();
        f[at] = val;
        if i == 4 {
            f = raw_frame(0x0C, 7, b"abcdef");
        }
        bad.push(f);
    }
    for (name, f) in ["magic", "version", "length", "crc", "type"].iter().zip(&bad) {
        o.add(0, &format!("ours-bad-{name}"), &[&[0, 1, 4], &good, f]);
    }
    o.add(0, "ours-http", &[&[0, 0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]);
    o.add(0, "ours-partial", &[&[2, 0], &good, &good[..15]]);
}

fn handshake(o: &mut Out) {
    let head = [&[0x42; 32][..], &[0x43; 32], &[0x44; 16]].concat();
    let ok = |d: u8| [2, d, d, 0, 3, 0, 0, 6, 100, 0, 6, 0x10, 0x07];
    for d in 0..3u8 {
        o.add(1, &format!("ok-ours-device{d}"), &[&head, &ok(d)]);
    }
    o.add(1, "ok-ours-cookie", &[&head, &[2, 0, 1, 1], &[0x77; 16], &[3, 0, 0, 6, 5, 0]]);
    o.add(1, "ok-ours-two-connections", &[&head, &ok(0), &[5], &ok(1), &[6, 1, 0]]);
    o.add(1, "ok-ours-seqs", &[&head, &[2, 2, 0, 2, 9, 0, 0, 0, 3, 0, 0x80, 7, 0, 0, 0, 6, 1, 0]]);
    o.add(1, "ours-wrong-psk", &[&head, &[2, 0, 0, 0, 3, 2, 0]]);
    o.add(1, "ours-flipped-proof", &[&head, &[2, 0, 0, 0, 3, 0, 1 | (5 << 3)]]);
    o.add(1, "ours-unknown-device", &[&head, &[2, 3, 0, 0, 9, 9, 9, 9, 9, 9, 3, 0, 0]]);
    o.add(1, "ours-low-order-key", &[&head, &[2, 0, 3, 0], &[0; 32], &[3, 0, 0]]);
    o.add(1, "ours-hello-twice", &[&head, &[2, 0, 0, 0, 4, 0, 3, 0, 0]]);
    o.add(1, "ours-ack-first", &[&head, &[3, 0, 0, 2, 1, 1, 0, 3, 0, 0, 6, 9, 0]]);
    let frames: Vec<u8> =
        (1..=11u8).flat_map(|t| [1, t, 0, 0, 0, 0, 38, 0].into_iter().chain([t; 38])).collect();
    o.add(1, "ours-every-type-first", &[&head, &frames]);
    o.add(1, "ours-garbage-in-session", &[&head, &ok(0), &[2, 0, 0, 0, 0, 5, 0, 1, 2, 3, 4, 5]]);
}

fn session(o: &mut Out) {
    let salt = [0x5A; 32];
    let msgs =
        |lens: &[usize]| -> Vec<u8> { lens.iter().flat_map(|l| [2, le16(*l)[0], le16(*l)[1], 0]).collect() };
    for mode in [0u8, 1, 2, 3, 9] {
        let head = [&[mode][..], &[0; 8]].concat();
        let m = |name: &str| format!("{name}-mode{mode}");
        let basic = msgs(&[0, 100, 452, 453, 1808]);
        o.add(2, &m("ok-ours-messages"), &[&head, &basic, &[5, 0x10, 0x07, 6, 4, 0xE8, 0x03, 6, 8]]);
        let rk =
            [&msgs(&[10])[..], &[9], &salt, &msgs(&[20]), &[7], &salt, &msgs(&[30]), &[5, 5, 0]].concat();
        o.add(2, &m("ok-ours-rekey"), &[&head, &rk]);
        let pat: Vec<u8> = [0x11u8, 0x12, 0x14, 0x08, 0x00]
            .iter()
            .flat_map(|p| [2, 0xE8, 0x03, *p])
            .chain([2, 0x6C, 0x07, 0, 2, 5, 0, 0])
            .collect();
        o.add(2, &m("ok-ours-fragment-patterns"), &[&head, &pat]);
        let ping = [1u8, 1, 0, 0, 0, 0];
        let flood: Vec<u8> = (0..10).flat_map(|_| ping).collect();
        o.add(2, &m("ours-ping-flood"), &[&head, &flood, &msgs(&[1])]);
        // Sealed by the peer: wrong prefix, bad tag, stale key, wrong session id, a handshake
        // type, seq u32::MAX, a short REKEY, an old seq, a BYE.
        let bad: Vec<u8> = [
            &[1u8, 0, 0, 0, 0, 1][..],
            &[1, 0, 0, 0, 0, 2],
            &[1, 0, 0, 0, 0, 4],
            &[1, 0, 0, 0, 0, 8],
            &[1, 6, 4, 0, 0, 0, 0],
            &[1, 0, 3, 0, 0, 0],
            &[1, 5, 0, 5, 0, 0, 1, 2, 3, 4, 5],
            &[1, 0, 2, 0xFE, 0, 0, 0],
            &[1, 3, 0, 0, 0, 0],
        ]
        .concat();
        o.add(2, &m("ours-bad-frames"), &[&head, &msgs(&[1]), &bad, &[3, 0, 3, 1, 0, 12, 0]]);
        o.add(2, &m("ours-replay"), &[&head, &msgs(&[10]), &[3, 0, 3, 0], &msgs(&[11])]);
        o.add(2, &m("ours-bye"), &[&head, &msgs(&[3]), &[8], &msgs(&[4]), &[5, 1, 0]]);
        let spent = [&[mode][..], &0xFFFF_FFFDu32.to_le_bytes(), &0xFFFF_FFFEu32.to_le_bytes()].concat();
        let sp = [5u8, 1, 0, 6, 5, 1, 0, 7]
            .into_iter()
            .chain(salt)
            .chain([1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 3, 0, 8]);
        o.add(2, &m("ours-spent"), &[&spent, &sp.collect::<Vec<u8>>()]);
    }
}

fn udp(o: &mut Out) {
    let flight = |s: u8, d: u8| vec![1, s, d, d % 3, 0, 2, s, 2, s, 2, s, 3, s, 100, 0, 2, s, 7, 0, 100, 0];
    for s in 0..4u8 {
        o.add(3, &format!("ok-ours-flight-slot{s}"), &[&[0, 0], &flight(s, s % 3)]);
    }
    o.add(3, "ok-ours-two-ports", &[&[0, 0], &flight(0, 0), &flight(1, 1), &[3, 0, 0x10, 0x07, 2, 0, 2, 0]]);
    let app = [8, 0, 50, 0, 7, 0, 0x58, 0x02, 2, 0, 4, 0, 0, 2, 0, 7, 0, 0x20, 0x4E];
    o.add(3, "ok-ours-retransmit", &[&[0, 0], &flight(0, 0), &app]);
    o.add(3, "ok-ours-duplicates", &[&[0, 0], &flight(2, 2), &[4, 2, 3, 4, 2, 2, 2, 2, 4, 2, 1, 2, 2]]);
    let ping = [5u8, 0, 6, 1, 0, 0, 0, 0, 0, 0, 2, 0, 6, 0, 2, 0, 0, 0, 0, 0, 6, 0, 1, 5, 0, 0, 0, 0, 2, 0];
    o.add(3, "ok-ours-ping-and-utacks", &[&[0, 0], &flight(0, 0), &ping]);
    // A cookie binds (address, device, pub_C, bucket) and works once: each attempt uses the
    // next key, and the wall clock moves to the next bucket.
    let lock: Vec<u8> = (0..6).flat_map(|i| [1, 3, 1, i % 3, 1, 2, 3, 2, 3, 2, 3, 9, 30]).collect();
    o.add(3, "ours-wrong-psk-lockout", &[&[0, 0], &lock]);
    o.add(3, "ours-unknown-device", &[&[0, 0], &[1, 1, 3, 0, 0, 2, 1, 2, 1]]);
    o.add(
        3,
        "ours-handshake-timeout",
        &[&[0, 0], &[1, 0, 0, 0, 0, 2, 0, 7, 0, 0x10, 0x27, 7, 0, 0x10, 0x27, 2, 0]],
    );
    let gone: Vec<u8> = (0..7).flat_map(|_| [7u8, 0, 0x88, 0x13]).collect();
    o.add(3, "ours-peer-gone", &[&[0, 0], &flight(0, 0), &[8, 0, 9, 0], &gone]);
    o.add(3, "ours-watchdog", &[&[0, 0], &flight(3, 0), &[7, 0, 0xB0, 0x83, 2, 3]]);
    o.add(
        3,
        "ours-wall-jump",
        &[&[29, 0], &[1, 0, 0, 0, 0, 2, 0, 9, 30, 2, 0, 2, 0, 9, 45, 1, 0, 0, 0, 0, 2, 0]],
    );
    let hello = raw_frame(PacketType::Hello as u8, 0, &[[1u8; 6].as_slice(), &[9; 32]].concat());
    let flood: Vec<u8> = (0..24u8)
        .flat_map(|i| {
            [0, 0xC0, 10, 9, 0, i, 0x10, 0x27].into_iter().chain(le16(hello.len())).chain(hello.clone())
        })
        .collect();
    o.add(3, "ours-hello-flood", &[&[0, 0], &flood]);
    let cookie_hello = |s: usize, via: u8| {
        let (dev, key) = (super::DEVICES[0].0, super::client_public(0));
        let c = super::udp::cookie_oracle(super::udp::slot_addr(s), &dev, &key, 1_700_000_000 / 30);
        let f = raw_frame(1, 1, &[&dev[..], &key, &c].concat());
        [vec![0, via], le16(f.len()).to_vec(), f].concat()
    };
    o.add(
        3,
        "ours-literal-cookie",
        &[&[0, 0], &cookie_hello(2, 2), &cookie_hello(2, 2), &cookie_hello(0, 1)],
    );
    let junk = [0u8, 0, 5, 0, 0xAC, 0xAC, 5, 0, 0, 6, 0, 0, 5, 0, 0, 0, 0, 6, 0, 3, 5, 0, 0, 0, 0];
    o.add(3, "ours-junk", &[&[0, 0], &junk, &[5, 0, 5, 0, 0, 0, 0, 4, 0, 0, 1, 2, 3, 4]]);
}

/// Every seed of this implementation, for all four targets.
pub fn seeds() -> Vec<Seed> {
    let mut o = Out(Vec::new());
    deframe(&mut o);
    handshake(&mut o);
    session(&mut o);
    udp(&mut o);
    o.0
}
