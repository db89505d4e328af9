//! Criterion micro-benchmarks of the protocol core, each next to the bare `ring` primitive it
//! rests on, so the overhead above the crypto floor reads as a ratio from one run:
//! `cargo bench --bench proto`.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ring::{aead, agreement, hkdf, hmac, rand};
use usmp::proto::crc16::crc16;
use usmp::proto::crypto::{EphemeralKey, Psk};
use usmp::proto::frame::{encode_frame, Frame, PacketType, MAX_FRAME_LEN};
use usmp::proto::handshake::{decode_hello, ClientHandshake, ClientReply, ServerExpectHelloAck};
use usmp::proto::session::{Session, MAX_SEALED_MESSAGE_LEN};
use usmp::Transport;

use usmp::proto::testing::session_pair as pair;

fn frame_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_decode");
    for len in [64usize, 480] {
        let mut buf = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(PacketType::Data, 1, &vec![0xa5; len], &mut buf).unwrap();
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("usmp_decode", len), &buf[..n], |b, f| {
            b.iter(|| Frame::decode(black_box(f)).unwrap().seq())
        });
        g.bench_with_input(BenchmarkId::new("bare_crc16", len), &buf[..n], |b, f| {
            b.iter(|| crc16(black_box(f)))
        });
    }
    g.finish();
}

fn seal_open(c: &mut Criterion) {
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &[9; 32]).unwrap());
    let mut g = c.benchmark_group("record");
    for len in [0usize, 64, 452] {
        g.throughput(Throughput::Bytes(len as u64));
        let (mut tx, _) = pair(Transport::Tcp);
        let msg = vec![0x42u8; len];
        let mut out = vec![0u8; MAX_SEALED_MESSAGE_LEN];
        g.bench_function(BenchmarkId::new("usmp_seal", len), |b| {
            b.iter(|| tx.seal_message(black_box(&msg), &mut out).unwrap())
        });
        let mut buf = vec![0u8; len + 16];
        g.bench_function(BenchmarkId::new("ring_seal", len), |b| {
            b.iter(|| {
                let nonce = aead::Nonce::assume_unique_for_key([1; 12]);
                key.seal_in_place_separate_tag(nonce, aead::Aad::from(&[0u8; 10]), &mut buf[..len]).unwrap()
            })
        });
        // Open needs a fresh seq each time (TCP strict order): seal batches outside the timing.
        g.bench_function(BenchmarkId::new("usmp_open", len), |b| {
            b.iter_custom(|iters| {
                let (mut t, mut r) = pair(Transport::Tcp);
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(4096);
                    let mut frames: Vec<Vec<u8>> = (0..batch)
                        .map(|_| {
                            let n = t.seal_message(&msg, &mut out).unwrap();
                            out[..n].to_vec()
                        })
                        .collect();
                    let start = Instant::now();
                    for f in &mut frames {
                        black_box(r.open(f, Duration::ZERO).unwrap());
                    }
                    total += start.elapsed();
                    left -= batch;
                }
                total
            })
        });
        let mut ct = vec![0x42u8; len];
        let tag = key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key([1; 12]),
                aead::Aad::from(&[0u8; 10]),
                &mut ct,
            )
            .unwrap();
        ct.extend_from_slice(tag.as_ref());
        g.bench_function(BenchmarkId::new("ring_open", len), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(4096);
                    let mut cts: Vec<Vec<u8>> = (0..batch).map(|_| ct.clone()).collect();
                    let start = Instant::now();
                    for c in &mut cts {
                        let nonce = aead::Nonce::assume_unique_for_key([1; 12]);
                        black_box(key.open_in_place(nonce, aead::Aad::from(&[0u8; 10]), c).unwrap().len());
                    }
                    total += start.elapsed();
                    left -= batch;
                }
                total
            })
        });
    }
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake_server");
    let psk = Psk::new(&[7; 16]).unwrap();
    let rng = rand::SystemRandom::new();
    // A realistic HELLO and HELLO_ACK pair, prepared once.
    let mut buf = [0u8; 128];
    let ch = ClientHandshake::new([1; 6], psk.clone(), EphemeralKey::from_seed(&[1; 32]).unwrap());
    let n = ch.encode_hello(&mut buf).unwrap();
    let hello_frame = buf[..n].to_vec();
    g.bench_function("usmp_server_compute", |b| {
        b.iter_batched(
            || {
                // The client side's work is not the server's cost: prepare its HELLO_ACK here.
                let hello = decode_hello(&Frame::decode(&hello_frame).unwrap()).unwrap();
                let srv = ServerExpectHelloAck::new(
                    &hello,
                    &psk,
                    EphemeralKey::from_seed(&[2; 32]).unwrap(),
                    [3; 32],
                )
                .unwrap();
                let mut cb = [0u8; 128];
                let n = srv.encode_challenge(&mut cb).unwrap();
                let ch =
                    ClientHandshake::new([1; 6], psk.clone(), EphemeralKey::from_seed(&[1; 32]).unwrap());
                let ClientReply::Challenge(cl) = ch.handle_reply(&Frame::decode(&cb[..n]).unwrap()).unwrap()
                else {
                    panic!()
                };
                let n = cl.encode_hello_ack(&mut cb).unwrap();
                cb[..n].to_vec()
            },
            |ack| {
                // Everything the gateway does per handshake: parse HELLO, keygen, X25519, HKDF,
                // CHALLENGE, verify HELLO_ACK, SESSION_OK, expand both AES keys.
                let hello = decode_hello(&Frame::decode(&hello_frame).unwrap()).unwrap();
                // The production key: drawn from the OS generator (ring), as the gateway does.
                let key = EphemeralKey::generate(&rng).unwrap();
                let srv = ServerExpectHelloAck::new(&hello, &psk, key, [3; 32]).unwrap();
                let mut out = [0u8; 128];
                srv.encode_challenge(&mut out).unwrap();
                let _ = srv.verify_hello_ack(&Frame::decode(&ack).unwrap());
                let (est, _) = srv.finish([4; 16], &mut out).unwrap();
                Session::new(&est, Transport::Tcp)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let peer = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
    let peer_pub = peer.compute_public_key().unwrap();
    let hkey = hmac::Key::new(hmac::HMAC_SHA256, &[7; 16]);
    g.bench_function("bare_ring_floor", |b| {
        b.iter(|| {
            // The crypto floor: keygen + X25519 + HKDF(64) + 2 HMAC + 2 AES key expansions.
            let k = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
            let _ = k.compute_public_key().unwrap();
            let shared = agreement::agree_ephemeral(
                k,
                &agreement::UnparsedPublicKey::new(&agreement::X25519, peer_pub.as_ref()),
                |s| {
                    let mut o = [0u8; 32];
                    o.copy_from_slice(s);
                    o
                },
            )
            .unwrap();
            struct L;
            impl hkdf::KeyType for L {
                fn len(&self) -> usize {
                    64
                }
            }
            let mut okm = [0u8; 64];
            hkdf::Salt::new(hkdf::HKDF_SHA256, &[3; 32])
                .extract(&shared)
                .expand(&[b"usmp-v2", &[0u8; 64]], L)
                .unwrap()
                .fill(&mut okm)
                .unwrap();
            let a = hmac::sign(&hkey, &[0u8; 106]);
            let b2 = hmac::sign(&hkey, &[0u8; 116]);
            let k1 = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &okm[..32]).unwrap());
            let k2 = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &okm[32..]).unwrap());
            black_box((a, b2, k1, k2))
        })
    });
    g.finish();
}

/// One handshake's X25519 (keygen and agreement) in each implementation the crate carries:
/// ring's (production keys) and x25519-dalek's (seeded keys for tests and fuzzing).
fn x25519(c: &mut Criterion) {
    let mut g = c.benchmark_group("x25519");
    let rng = rand::SystemRandom::new();
    let peer = *EphemeralKey::from_seed(&[9; 32]).unwrap().public();
    g.bench_function("ring_generate_agree", |b| {
        b.iter(|| black_box(EphemeralKey::generate(&rng).unwrap().agree(&peer).unwrap()))
    });
    g.bench_function("dalek_seeded_agree", |b| {
        let mut seed = [0u8; 32];
        b.iter(|| {
            rand::SecureRandom::fill(&rng, &mut seed).unwrap();
            black_box(EphemeralKey::from_seed(&seed).unwrap().agree(&peer).unwrap())
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = frame_decode, seal_open, handshake, x25519
}
criterion_main!(benches);
