use super::*;

pub(crate) use crate::proto::testing::session_pair as pair;

const T0: Duration = Duration::from_secs(100);

fn split(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    let mut at = 0;
    while at < bytes.len() {
        let len = check_header(&bytes[at..]).unwrap();
        out.push(bytes[at..at + HEADER_LEN + len].to_vec());
        at += HEADER_LEN + len;
    }
    out
}

fn send(s: &mut Session, msg: &[u8]) -> Vec<Vec<u8>> {
    let mut out = [0u8; MAX_SEALED_MESSAGE_LEN];
    let n = s.seal_message(msg, &mut out).unwrap();
    split(&out[..n])
}

/// Feed frames, collect delivered messages; returns the first error.
fn deliver(r: &mut Session, frames: &mut [Vec<u8>]) -> Result<Vec<Vec<u8>>> {
    let mut msgs = vec![];
    for f in frames {
        if let Received::Message(m) = r.open(f, T0)? {
            msgs.push(m.to_vec());
        }
    }
    Ok(msgs)
}

#[test]
fn every_size_class_round_trips_both_ways() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (mut c, mut s) = pair(t);
        for len in [0usize, 1, 64, 451, 452, 453, 904, 905, 1807, 1808] {
            let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut frames = send(&mut c, &msg);
            assert_eq!(frames.len(), frames_for(len));
            assert_eq!(frames.iter().map(Vec::len).sum::<usize>(), sealed_len(len));
            assert_eq!(deliver(&mut s, &mut frames).unwrap(), vec![msg.clone()]);
            let mut back = send(&mut s, &msg);
            assert_eq!(deliver(&mut c, &mut back).unwrap(), vec![msg]);
        }
    }
}

#[test]
fn oversize_message_is_refused_before_any_seq_is_used() {
    let (mut c, _) = pair(Transport::Tcp);
    let mut out = vec![0u8; 4096];
    let e = c.seal_message(&[0; 1809], &mut out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Payload);
    assert_eq!(e.reaction(Transport::Tcp), crate::proto::Reaction::Report);
    assert_eq!(c.tx_seq(), 0);
}

#[test]
fn tcp_sequence_gap_and_replay_close() {
    let (mut c, mut s) = pair(Transport::Tcp);
    let mut a = send(&mut c, b"a");
    let mut b = send(&mut c, b"b");
    let mut cc = send(&mut c, b"c");
    let replay = a.clone();
    deliver(&mut s, &mut a).unwrap();
    let e = deliver(&mut s, &mut cc).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Sequence);
    deliver(&mut s, &mut b).unwrap();
    let e = deliver(&mut s, &mut replay.clone()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Sequence);
    assert_eq!(e.reaction(Transport::Tcp), crate::proto::Reaction::Close);
}

#[test]
fn udp_accepts_reordering_and_drops_duplicates() {
    let (mut c, mut s) = pair(Transport::Udp);
    let mut frames: Vec<Vec<u8>> = (0..5u8).flat_map(|i| send(&mut c, &[i])).collect();
    let mut dup = frames[1].clone();
    frames.swap(1, 3);
    let got = deliver(&mut s, &mut frames).unwrap();
    assert_eq!(got, vec![vec![0], vec![3], vec![2], vec![1], vec![4]]);
    let e = s.open(&mut dup, T0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Sequence);
    assert_eq!(e.reaction(Transport::Udp), crate::proto::Reaction::Drop);
}

#[test]
fn tampering_is_a_crypto_error() {
    let (mut c, mut s) = pair(Transport::Udp);
    let good = send(&mut c, b"hello").remove(0);
    for (at, what) in [(good.len() - 1, "tag"), (12, "nonce prefix"), (20, "ciphertext")] {
        let mut f = good.clone();
        f[at] ^= 0x80;
        assert_eq!(s.open(&mut f, T0).unwrap_err().kind(), ErrorKind::Crypto, "{what}");
    }
    // AAD: flip the type byte DATA -> PING: authentication covers the header.
    let mut f = good.clone();
    f[3] = PacketType::Ping as u8;
    finish_crc(&mut f);
    assert_eq!(s.open(&mut f, T0).unwrap_err().kind(), ErrorKind::Crypto);
    // The untouched frame still opens: failures never burned its seq.
    let mut f = good.clone();
    assert_eq!(s.open(&mut f, T0).unwrap(), Received::Message(b"hello"));
}

#[test]
fn control_frame_inside_a_message_is_a_violation() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (mut c, mut s) = pair(t);
        let mut frames = send(&mut c, &[7; 900]);
        let mut out = [0u8; 128];
        let n = c.seal_ping(T0, &mut out).unwrap();
        s.open(&mut frames[0], T0).unwrap();
        let e = s.open(&mut out[..n], T0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Sequence);
        if t == Transport::Udp {
            // UDP drops the partial message and goes on: the final fragment alone is out of order
            // for nothing, it is a lone DATA delivered as its own message.
            let got = s.open(&mut frames[1], T0).unwrap();
            assert_eq!(got, Received::Message(&[7u8; 448][..]));
        }
    }
}

#[test]
fn fifth_frame_is_refused() {
    let (mut c, mut s) = pair(Transport::Tcp);
    let mut out = [0u8; MAX_FRAME_LEN];
    for i in 0..4 {
        let n = c.seal_one(PacketType::DataFrag, &[1; 452], &mut out);
        let r = s.open(&mut out[..n], T0);
        if i < 3 {
            assert_eq!(r.unwrap(), Received::Fragment);
        } else {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Payload);
        }
    }
}

#[test]
fn ping_pong_bye() {
    let (mut c, mut s) = pair(Transport::Tcp);
    let mut out = [0u8; 128];
    let n = c.seal_ping(T0, &mut out).unwrap();
    assert_eq!(s.open(&mut out[..n], T0).unwrap(), Received::Ping);
    let n = s.seal_pong(T0, &mut out).unwrap();
    assert_eq!(c.open(&mut out[..n], T0).unwrap(), Received::Pong);
    let n = c.seal_bye(&mut out).unwrap();
    assert_eq!(s.open(&mut out[..n], T0).unwrap(), Received::Bye);
    assert!(s.is_closed() && c.is_closed());
    assert_eq!(c.seal_message(b"x", &mut [0; 128]).unwrap_err().kind(), ErrorKind::NotConnected);
}

#[test]
fn flood_guard_edges() {
    let (mut c, mut s) = pair(Transport::Tcp);
    let mut out = [0u8; 128];
    // Bypass our own tx budget to play a flooding peer.
    let mut ping = |c: &mut Session| c.seal_one(PacketType::Ping, &[], &mut out).to_owned();
    let _ = &mut ping;
    for i in 0..8 {
        let mut f = [0u8; 128];
        let n = c.seal_one(PacketType::Ping, &[], &mut f);
        let now = T0 + Duration::from_millis(i * 100);
        assert_eq!(s.open(&mut f[..n], now).unwrap(), Received::Ping);
    }
    // Ninth inside the same second (t0 + 1 s exactly is still inside): the session ends.
    let mut f = [0u8; 128];
    let n = c.seal_one(PacketType::Ping, &[], &mut f);
    let e = s.open(&mut f[..n], T0 + Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionClosed);
    assert_eq!(e.reaction(Transport::Udp), crate::proto::Reaction::Close);
}

#[test]
fn flood_guard_window_restarts_after_a_second() {
    let mut g = FloodGuard::default();
    for _ in 0..8 {
        assert!(g.hit(T0));
    }
    assert!(!g.has_room(T0 + Duration::from_secs(1)));
    assert!(g.has_room(T0 + Duration::from_secs(1) + Duration::from_nanos(1)));
    assert!(g.hit(T0 + Duration::from_secs(1) + Duration::from_nanos(1)));
}

#[test]
fn our_own_pings_respect_the_peer_budget() {
    let (mut c, _) = pair(Transport::Tcp);
    let mut out = [0u8; 128];
    for _ in 0..8 {
        c.seal_ping(T0, &mut out).unwrap();
    }
    assert_eq!(c.seal_ping(T0, &mut out).unwrap_err().kind(), ErrorKind::Sequence);
    assert!(c.seal_pong(T0, &mut out).is_none());
    assert!(c.seal_ping(T0 + Duration::from_millis(1001), &mut out).is_ok());
}

#[test]
fn rekey_both_directions_and_traffic_continues() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (mut c, mut s) = pair(t);
        for i in 0..70u8 {
            deliver(&mut s, &mut send(&mut c, &[i])).unwrap();
            deliver(&mut c, &mut send(&mut s, &[i])).unwrap();
        }
        let mut out = [0u8; 128];
        let n = c.seal_rekey(&[9; 32], &mut out).unwrap();
        // TCP restarts at 0; UDP goes on (windows accept the jump; see `install_keys`).
        assert_eq!(c.tx_seq(), if t == Transport::Tcp { 0 } else { 71 });
        assert_eq!(s.open(&mut out[..n], T0).unwrap(), Received::Rekeyed);
        assert_eq!(c.tx_key_bytes(), s.rx_key_bytes());
        assert_eq!(c.rx_key_bytes(), s.tx_key_bytes());
        for i in 0..5u8 {
            assert_eq!(deliver(&mut s, &mut send(&mut c, &[i])).unwrap(), vec![vec![i]]);
            assert_eq!(deliver(&mut c, &mut send(&mut s, &[i])).unwrap(), vec![vec![i]]);
        }
        // And the server may start one too.
        let n = s.seal_rekey(&[8; 32], &mut out).unwrap();
        assert_eq!(c.open(&mut out[..n], T0).unwrap(), Received::Rekeyed);
        assert_eq!(deliver(&mut c, &mut send(&mut s, b"after")).unwrap(), vec![b"after".to_vec()]);
        assert_eq!(deliver(&mut s, &mut send(&mut c, b"after")).unwrap(), vec![b"after".to_vec()]);
    }
}

#[test]
fn rekey_payload_of_wrong_length_is_a_payload_error() {
    let (mut c, mut s) = pair(Transport::Tcp);
    let mut out = [0u8; 128];
    let n = c.seal_one(PacketType::Rekey, &[1; 31], &mut out);
    assert_eq!(s.open(&mut out[..n], T0).unwrap_err().kind(), ErrorKind::Payload);
}

#[test]
fn spent_sequence_rules() {
    let (mut c, mut s) = pair(Transport::Udp);
    let mut out = [0u8; MAX_SEALED_MESSAGE_LEN];
    c.tx_seq = SPENT_SEQ - 2;
    assert_eq!(c.seal_message(&[0; 905], &mut out).unwrap_err().kind(), ErrorKind::Sequence);
    assert_eq!(c.tx_seq(), SPENT_SEQ - 2, "refused before burning anything");
    let n = c.seal_message(&[0; 10], &mut out).unwrap();
    assert_eq!(s.open(&mut out[..n], T0).unwrap(), Received::Message(&[0u8; 10][..]));
    let n = c.seal_message(&[0; 10], &mut out).unwrap();
    s.open(&mut out[..n], T0).unwrap();
    assert_eq!(c.tx_seq(), SPENT_SEQ);
    assert_eq!(c.seal_message(b"", &mut out).unwrap_err().kind(), ErrorKind::Sequence);
    assert_eq!(c.seal_ping(T0, &mut out).unwrap_err().kind(), ErrorKind::Sequence);
    // BYE still goes out on the last seq, and the receiver treats seq 0xFFFFFFFF as the end.
    let n = c.seal_bye(&mut out).unwrap();
    let e = s.open(&mut out[..n], T0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Sequence);
    assert_eq!(e.reaction(Transport::Udp), crate::proto::Reaction::Close);
}

/// The last nonce is used once, whatever path seals with it: afterwards every sealing call
/// is refused, so the saturating counter can never hand out 0xFFFFFFFF twice.
#[test]
fn the_last_sequence_number_is_sealed_under_once() {
    let mut out = [0u8; MAX_SEALED_MESSAGE_LEN];
    let mut nonces = std::collections::HashSet::new();
    for last in [PacketType::Bye, PacketType::Ping, PacketType::Data] {
        let (mut c, _) = pair(Transport::Tcp);
        c.tx_seq = SPENT_SEQ - 1;
        let n = c.seal_message(b"second to last", &mut out).unwrap();
        assert!(nonces.insert((last as u8, u32::from_le_bytes(out[4..8].try_into().unwrap()))));
        let n_last = c.seal_one(last, &[], &mut out[n..]);
        assert_eq!(u32::from_le_bytes(out[n + 4..n + 8].try_into().unwrap()), SPENT_SEQ);
        assert!(n_last > 0 && c.is_closed(), "{last:?} on the last seq ends the session");
        assert!(c.seal_message(b"", &mut out).is_err());
        assert!(c.seal_ping(T0, &mut out).is_err());
        assert!(c.seal_pong(T0, &mut out).is_none());
        assert!(c.seal_bye(&mut out).is_err());
        assert!(c.seal_rekey(&[0; 32], &mut out).is_err());
    }
}

#[test]
fn handshake_frames_inside_a_session_are_refused() {
    let (_, mut s) = pair(Transport::Tcp);
    let mut out = [0u8; 128];
    let n = crate::proto::frame::encode_frame(PacketType::Hello, 0, &[0; 38], &mut out).unwrap();
    assert_eq!(s.open(&mut out[..n], T0).unwrap_err().kind(), ErrorKind::Frame);
}

/// A tiny seeded generator (xorshift) so the lossy-channel test is deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[test]
fn udp_window_over_a_simulated_lossy_reordering_channel() {
    for seed in [1u64, 7, 42, 1234, 99991] {
        let mut rng = Rng(seed);
        let (mut c, mut s) = pair(Transport::Udp);
        let mut in_flight: Vec<Vec<u8>> = vec![];
        let mut delivered = vec![];
        let mut sent = 0u32;
        for i in 0..2000u32 {
            let f = send(&mut c, &i.to_le_bytes()).remove(0);
            sent += 1;
            if !rng.chance(10) {
                in_flight.push(f.clone()); // 10 % loss
            }
            if rng.chance(5) {
                in_flight.push(f); // 5 % duplication
            }
            // Reorder: deliver a random queued datagram, sometimes holding a few back.
            while in_flight.len() > (rng.next() % 4) as usize {
                let at = (rng.next() as usize) % in_flight.len();
                let mut d = in_flight.swap_remove(at);
                match s.open(&mut d, T0) {
                    Ok(Received::Message(m)) => delivered.push(u32::from_le_bytes(m.try_into().unwrap())),
                    Ok(other) => panic!("{other:?}"),
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Sequence, "only replays/too-old are refused");
                        assert_eq!(e.reaction(Transport::Udp), crate::proto::Reaction::Drop);
                    }
                }
            }
        }
        let mut uniq = delivered.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), delivered.len(), "seed {seed}: a datagram was accepted twice");
        assert!(delivered.len() as u32 > sent * 8 / 10, "seed {seed}: too few delivered");
        assert!(!s.is_closed());
    }
}

#[test]
fn duplicates_are_recognised_only_when_authentic() {
    let (mut c, mut s) = pair(Transport::Udp);
    let f = send(&mut c, b"once").remove(0);
    assert!(!s.verify_duplicate(&mut f.clone()), "not seen yet");
    s.open(&mut f.clone(), T0).unwrap();
    assert!(s.verify_duplicate(&mut f.clone()), "a retransmission");
    let mut forged = f.clone();
    forged[30] ^= 1;
    assert!(!s.verify_duplicate(&mut forged), "a forgery with a seen seq");
    assert_eq!(s.open(&mut f.clone(), T0).unwrap_err().kind(), ErrorKind::Sequence);
}

/// PROTOCOL.md §6 lets frames the peer sealed before it saw our REKEY fail. We keep them: on
/// TCP they come in order under the old key (its own next seq) until the first frame under
/// the new key, which retires the old key for good.
#[test]
fn tcp_frames_the_peer_sealed_before_our_rekey_still_open_in_order() {
    let (mut c, mut s) = pair(Transport::Tcp);
    deliver(&mut s, &mut send(&mut c, b"before")).unwrap();
    let mut rekey = [0u8; 128];
    let n = s.seal_rekey(&[5; 32], &mut rekey).unwrap();
    // Sealed by the device before our REKEY reached it: seqs 1, 2, 3 under the old key.
    let mut old = [send(&mut c, b"one"), send(&mut c, b"two"), send(&mut c, b"three")];
    assert_eq!(deliver(&mut s, &mut old[0]).unwrap(), vec![b"one".to_vec()]);
    assert_eq!(deliver(&mut s, &mut old[1]).unwrap(), vec![b"two".to_vec()]);
    assert_eq!(deliver(&mut s, &mut old[2]).unwrap(), vec![b"three".to_vec()]);
    assert!(!s.rekey_settled());
    assert_eq!(c.open(&mut rekey[..n], T0).unwrap(), Received::Rekeyed);
    assert_eq!(deliver(&mut s, &mut send(&mut c, b"new key")).unwrap(), vec![b"new key".to_vec()]);
    assert!(s.rekey_settled(), "the first frame under the new key retires the old one");
    // The old key is gone: a replay of an old frame fails.
    assert!(deliver(&mut s, &mut old[2].clone()).is_err());
}

#[test]
fn tcp_frames_under_the_old_key_keep_their_order() {
    let (mut c, mut s) = pair(Transport::Tcp);
    let mut rekey = [0u8; 128];
    s.seal_rekey(&[5; 32], &mut rekey).unwrap();
    let _first = send(&mut c, b"one");
    let e = deliver(&mut s, &mut send(&mut c, b"two")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Sequence);
    assert_eq!(e.reaction(Transport::Tcp), crate::proto::Reaction::Close);
}

/// On the peer's REKEY, frames we sealed under the old key but never sent are sealed again
/// under the new key, so a peer that forgot the old key at once (as §6 allows) opens them.
#[test]
fn queued_frames_are_resealed_under_the_peers_new_key() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (mut c, mut s) = pair(t);
        let mut queued = Vec::new();
        for m in [&b"a"[..], &[7u8; 1000][..], b"c"] {
            let mut out = [0u8; MAX_SEALED_MESSAGE_LEN];
            let n = s.seal_message(m, &mut out).unwrap();
            queued.extend_from_slice(&out[..n]);
        }
        let mut rekey = [0u8; 128];
        let n = c.seal_rekey(&[6; 32], &mut rekey).unwrap();
        assert_eq!(s.open(&mut rekey[..n], T0).unwrap(), Received::Rekeyed);
        assert_eq!(s.reseal_unsent(&mut queued).unwrap(), 5);
        // The old key is forgotten: nothing is re-sealed twice.
        assert_eq!(s.reseal_unsent(&mut queued).unwrap(), 0);
        let mut frames = split(&queued);
        let mut got = Vec::new();
        for f in &mut frames {
            if let Received::Message(m) = c.open(f, T0).unwrap() {
                got.push(m.to_vec());
            }
            assert!(c.rekey_settled(), "{t:?}: a frame opened with the old key");
        }
        assert_eq!(got, vec![b"a".to_vec(), vec![7u8; 1000], b"c".to_vec()]);
        // Traffic goes on at the following seqs.
        assert_eq!(deliver(&mut c, &mut send(&mut s, b"d")).unwrap(), vec![b"d".to_vec()]);
    }
}

#[test]
fn nothing_is_resealed_without_a_rekey_from_the_peer() {
    let (mut c, mut s) = pair(Transport::Tcp);
    let mut out = [0u8; MAX_SEALED_MESSAGE_LEN];
    let n = s.seal_message(b"x", &mut out).unwrap();
    let before = out[..n].to_vec();
    assert_eq!(s.reseal_unsent(&mut out[..n]).unwrap(), 0);
    // Our own REKEY does not re-seal either: the peer opens its queued frames with prev.
    let mut rekey = [0u8; 128];
    s.seal_rekey(&[1; 32], &mut rekey).unwrap();
    assert_eq!(s.reseal_unsent(&mut out[..n]).unwrap(), 0);
    assert_eq!(&out[..n], &before[..]);
    assert_eq!(deliver(&mut c, &mut [before]).unwrap(), vec![b"x".to_vec()]);
}

/// Two REKEYs in flight at once cannot both win: the session ends at the crossing, and no
/// copy of the peer's REKEY is taken for an authentic duplicate (a UTACK for it would tell the
/// peer its keys were adopted).
#[test]
fn crossed_rekeys_end_the_session_without_acknowledging_either() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (mut c, mut s) = pair(t);
        let (mut ours, mut theirs) = ([0u8; 128], [0u8; 128]);
        s.seal_rekey(&[1; 32], &mut ours).unwrap();
        let n = c.seal_rekey(&[2; 32], &mut theirs).unwrap();
        let mut copy = theirs;
        let e = s.open(&mut theirs[..n], T0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Sequence, "{t:?}");
        assert_eq!(e.reaction(t), crate::proto::Reaction::Close, "{t:?}");
        assert!(s.is_closed());
        assert!(!s.verify_duplicate(&mut copy[..n]), "{t:?}: a retransmission is not a duplicate");
    }
}

/// REKEYs count against the control-frame budget: each one costs a key derivation and a
/// re-seal of whatever is queued.
#[test]
fn a_rekey_flood_ends_the_session() {
    let (mut c, mut s) = pair(Transport::Udp);
    let mut out = [0u8; 128];
    for i in 0..8u8 {
        let n = c.seal_rekey(&[i; 32], &mut out).unwrap();
        assert_eq!(s.open(&mut out[..n], T0).unwrap(), Received::Rekeyed, "REKEY {i}");
    }
    let n = c.seal_rekey(&[9; 32], &mut out).unwrap();
    let e = s.open(&mut out[..n], T0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionClosed);
    assert_eq!(e.reaction(Transport::Udp), crate::proto::Reaction::Close);
}
