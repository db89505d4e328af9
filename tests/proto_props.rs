//! Property tests: encode→decode round trips, and arbitrary bytes never panic the deframer,
//! the handshake parsers or an established session.

use std::time::Duration;

use proptest::prelude::*;
use usmp::proto::deframer::Deframer;
use usmp::proto::frame::{encode_frame, Frame, PacketType, MAX_FRAME_LEN};
use usmp::proto::handshake::decode_hello;
use usmp::proto::session::{Received, MAX_SEALED_MESSAGE_LEN};
use usmp::Transport;

fn ptype() -> impl Strategy<Value = PacketType> {
    prop::sample::select(vec![
        PacketType::Hello,
        PacketType::Challenge,
        PacketType::HelloAck,
        PacketType::SessionOk,
        PacketType::Data,
        PacketType::Ping,
        PacketType::Pong,
        PacketType::Bye,
        PacketType::DataFrag,
        PacketType::HelloRetry,
        PacketType::Rekey,
        PacketType::Error,
    ])
}

use usmp::proto::testing::session_pair as pair;

proptest! {
    #[test]
    fn frame_round_trip(t in ptype(), seq in any::<u32>(), payload in prop::collection::vec(any::<u8>(), 0..=480)) {
        let mut out = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(t, seq, &payload, &mut out).unwrap();
        let f = Frame::decode_exact(&out[..n]).unwrap();
        prop_assert_eq!(f.packet_type(), t);
        prop_assert_eq!(f.seq(), seq);
        prop_assert_eq!(f.payload(), &payload[..]);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parsers(bytes in prop::collection::vec(any::<u8>(), 0..1200), cuts in prop::collection::vec(1usize..300, 1..10)) {
        let _ = Frame::decode(&bytes);
        let _ = Frame::decode_exact(&bytes);
        if let Ok(f) = Frame::decode(&bytes) { let _ = decode_hello(&f); }
        let mut d = Deframer::new();
        let mut at = 0;
        for c in cuts.iter().cycle().take(64) {
            if at >= bytes.len() { break; }
            let end = (at + c).min(bytes.len());
            at += d.push(&bytes[at..end]);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => { prop_assert!(f.len() <= MAX_FRAME_LEN); }
                    Ok(None) => break,
                    Err(_) => { return Ok(()); }
                }
            }
        }
    }

    #[test]
    fn sessions_survive_arbitrary_frames(frames in prop::collection::vec((ptype(), any::<u32>(), prop::collection::vec(any::<u8>(), 0..480)), 1..20), udp in any::<bool>()) {
        let transport = if udp { Transport::Udp } else { Transport::Tcp };
        let (_, mut s) = pair(transport);
        for (t, seq, payload) in frames {
            let mut out = [0u8; MAX_FRAME_LEN];
            let n = encode_frame(t, seq, &payload, &mut out).unwrap();
            let _ = s.open(&mut out[..n], Duration::from_secs(1));
        }
    }

    #[test]
    fn messages_round_trip(msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..=1808), 1..6), udp in any::<bool>()) {
        let transport = if udp { Transport::Udp } else { Transport::Tcp };
        let (mut c, mut s) = pair(transport);
        let mut out = vec![0u8; MAX_SEALED_MESSAGE_LEN];
        for m in msgs {
            let n = c.seal_message(&m, &mut out).unwrap();
            let mut d = Deframer::with_capacity(4096);
            d.push(&out[..n]);
            let mut got = None;
            while let Some(f) = d.next_frame().unwrap() {
                let mut f = f.to_vec();
                if let Received::Message(x) = s.open(&mut f, Duration::ZERO).unwrap() { got = Some(x.to_vec()); }
            }
            prop_assert_eq!(got, Some(m));
        }
    }
}
