//! Known-answer vectors produced by the reference package itself (`usmp==1.2.2`, installed
//! by the suite into its own venv): every value must be reproduced byte for byte, and every
//! Python-made frame must decode and open.

mod common;

use std::time::Duration;

use serde_json::Value;
use usmp::proto::crc16::crc16;
use usmp::proto::crypto::{derive_rekey_keys, derive_session_keys, gcm_nonce, EphemeralKey, Psk, RecordKey};
use usmp::proto::frame::{encode_frame, finish_crc, write_header, Frame, PacketType};
use usmp::proto::handshake::{
    decode_hello, ClientHandshake, ClientReply, Established, Role, ServerExpectHelloAck,
};
use usmp::proto::session::{Received, Session};
use usmp::Transport;

fn hex(v: &Value) -> Vec<u8> {
    let s = v.as_str().expect("hex string");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    hex(v).try_into().expect("length")
}

fn vectors() -> &'static Value {
    common::pyref::gen_vectors()
}

#[test]
fn crc16_matches_reference() {
    let list = vectors()["crc16"].as_array().unwrap();
    assert!(list.len() >= 4);
    for v in list {
        assert_eq!(crc16(&hex(&v["input"])) as u64, v["crc"].as_u64().unwrap());
    }
}

#[test]
fn frames_encode_and_decode_identically() {
    let list = vectors()["frames"].as_array().unwrap();
    assert!(list.len() > 20);
    for v in list {
        let t = PacketType::from_u8(v["type"].as_u64().unwrap() as u8).unwrap();
        let seq = v["seq"].as_u64().unwrap() as u32;
        let payload = hex(&v["payload"]);
        let mut out = [0u8; 492];
        let n = encode_frame(t, seq, &payload, &mut out).unwrap();
        assert_eq!(&out[..n], &hex(&v["encoded"])[..], "{v}");
        let f = Frame::decode_exact(&out[..n]).unwrap();
        assert_eq!((f.packet_type(), f.seq(), f.payload()), (t, seq, &payload[..]));
    }
}

#[test]
fn decode_errors_have_the_reference_class() {
    for v in vectors()["decode_errors"].as_array().unwrap() {
        let input = hex(&v["input"]);
        match v["error"].as_str() {
            None => {
                let f = Frame::decode(&input).unwrap_or_else(|e| panic!("{}: {e}", v["name"]));
                assert_eq!(f.payload(), &hex(&v["decoded_payload"])[..]);
            }
            Some(class) => {
                let e = Frame::decode(&input).unwrap_err();
                assert_eq!(e.kind().class_name(), class, "{}", v["name"]);
            }
        }
    }
}

#[test]
fn records_seal_and_open_identically() {
    let list = vectors()["records"].as_array().unwrap();
    assert!(list.len() > 10);
    for v in list {
        let key = RecordKey::new(&arr(&v["key"]));
        let sid: [u8; 16] = arr(&v["session_id"]);
        let seq = v["seq"].as_u64().unwrap() as u32;
        let t = PacketType::from_u8(v["type"].as_u64().unwrap() as u8).unwrap();
        let plain = hex(&v["plaintext"]);
        assert_eq!(gcm_nonce(seq, &sid).to_vec(), hex(&v["gcm_nonce"]));
        let mut frame = vec![0u8; 12 + plain.len() + 28];
        write_header(&mut frame, t, seq, plain.len() + 28);
        assert_eq!(&frame[..10], &hex(&v["aad"])[..]);
        frame[24..24 + plain.len()].copy_from_slice(&plain);
        let aad: [u8; 10] = frame[..10].try_into().unwrap();
        key.seal_record(gcm_nonce(seq, &sid), &aad, &mut frame[12..]);
        finish_crc(&mut frame);
        assert_eq!(&frame[12..], &hex(&v["payload"])[..]);
        assert_eq!(frame, hex(&v["frame"]));
        // And the Python-made frame opens.
        let mut theirs = hex(&v["frame"]);
        let (h, p) = theirs.split_at_mut(12);
        let r = key.open_record(gcm_nonce(seq, &sid), &h[..10], p).unwrap();
        assert_eq!(&p[r], &plain[..]);
    }
}

#[test]
fn key_schedule_from_fixed_private_keys() {
    for v in vectors()["key_schedule"].as_array().unwrap() {
        let c = EphemeralKey::from_seed(&arr(&v["client_priv"])).unwrap();
        let s = EphemeralKey::from_seed(&arr(&v["server_priv"])).unwrap();
        let (pub_c, pub_s) = (*c.public(), *s.public());
        assert_eq!(pub_c.to_vec(), hex(&v["pub_c"]));
        assert_eq!(pub_s.to_vec(), hex(&v["pub_s"]));
        let nonce = arr(&v["nonce"]);
        for shared in [c.agree(&pub_s).unwrap(), s.agree(&pub_c).unwrap()] {
            let (k_c2s, k_s2c) = derive_session_keys(&shared, &nonce, &pub_c, &pub_s);
            assert_eq!(k_c2s.to_vec(), hex(&v["k_c2s"]));
            assert_eq!(k_s2c.to_vec(), hex(&v["k_s2c"]));
        }
    }
}

#[test]
fn full_handshakes_match_byte_for_byte() {
    let list = vectors()["handshake"].as_array().unwrap();
    assert!(list.len() >= 2);
    for v in list {
        let psk = Psk::new(&hex(&v["psk"])).unwrap();
        let device_id: [u8; 6] = arr(&v["device_id"]);
        let client = ClientHandshake::new(
            device_id,
            psk.clone(),
            EphemeralKey::from_seed(&arr(&v["client_priv"])).unwrap(),
        );
        let mut buf = [0u8; 128];
        let n = client.encode_hello(&mut buf).unwrap();
        assert_eq!(&buf[..n], &hex(&v["hello"])[..], "HELLO");
        // The UDP cookie variant: after HELLO_RETRY the client sends the 54-byte HELLO, seq 1.
        let retry = hex(&v["hello_retry"]);
        let ClientReply::Retry(with_cookie) = ClientHandshake::new(
            device_id,
            psk.clone(),
            EphemeralKey::from_seed(&arr(&v["client_priv"])).unwrap(),
        )
        .handle_reply(&Frame::decode(&retry).unwrap())
        .unwrap() else {
            panic!("HELLO_RETRY not understood")
        };
        let n2 = with_cookie.encode_hello(&mut buf).unwrap();
        assert_eq!(&buf[..n2], &hex(&v["hello_cookie"]["frame"])[..], "cookie HELLO");
        // Server side from the Python HELLO.
        let hello = decode_hello(&Frame::decode(&hex(&v["hello"])).unwrap()).unwrap();
        let server = ServerExpectHelloAck::new(
            &hello,
            &psk,
            EphemeralKey::from_seed(&arr(&v["server_priv"])).unwrap(),
            arr(&v["nonce"]),
        )
        .unwrap();
        let n = server.encode_challenge(&mut buf).unwrap();
        assert_eq!(&buf[..n], &hex(&v["challenge"])[..], "CHALLENGE");
        let ClientReply::Challenge(expect) =
            client.handle_reply(&Frame::decode(&hex(&v["challenge"])).unwrap()).unwrap()
        else {
            panic!("expected CHALLENGE")
        };
        let n = expect.encode_hello_ack(&mut buf).unwrap();
        assert_eq!(&buf[..n], &hex(&v["hello_ack"])[..], "HELLO_ACK");
        assert_eq!(&buf[12..n], &hex(&v["hmac_client"])[..]);
        server.verify_hello_ack(&Frame::decode(&hex(&v["hello_ack"])).unwrap()).unwrap();
        let (s_est, n) = server.finish(arr(&v["session_id"]), &mut buf).unwrap();
        assert_eq!(&buf[..n], &hex(&v["session_ok"])[..], "SESSION_OK");
        let c_est = expect.handle_session_ok(&Frame::decode(&hex(&v["session_ok"])).unwrap()).unwrap();
        assert_eq!(c_est.tx_key.to_vec(), hex(&v["k_c2s"]));
        assert_eq!(c_est.rx_key.to_vec(), hex(&v["k_s2c"]));
        assert_eq!(s_est.tx_key, c_est.rx_key);
    }
}

#[test]
fn rekey_derivation_matches() {
    for v in vectors()["rekey"].as_array().unwrap() {
        let (tx, rx) = derive_rekey_keys(
            &arr(&v["tx_key"]),
            &arr(&v["rx_key"]),
            &arr(&v["session_id"]),
            &arr(&v["salt"]),
        );
        assert_eq!(tx.to_vec(), hex(&v["initiator_tx"]));
        assert_eq!(rx.to_vec(), hex(&v["initiator_rx"]));
        assert_eq!(hex(&v["responder_tx"]), hex(&v["initiator_rx"]));
        assert_eq!(hex(&v["responder_rx"]), hex(&v["initiator_tx"]));
    }
}

fn receiver(key: [u8; 32], sid: [u8; 16], rx_seq: u32) -> Session {
    let est = Established {
        role: Role::Server,
        device_id: [0; 6],
        session_id: sid,
        tx_key: [0x55; 32],
        rx_key: key,
    };
    Session::with_sequences(&est, Transport::Tcp, 0, rx_seq)
}

#[test]
fn python_rekey_flow_opens_and_switches_keys() {
    let v = &vectors()["rekey_flow"];
    let sid = arr(&v["session_id"]);
    // We receive what the Python initiator sends with its tx key.
    let est = Established {
        role: Role::Server,
        device_id: [0; 6],
        session_id: sid,
        tx_key: arr(&v["rx_key"]),
        rx_key: arr(&v["tx_key"]),
    };
    let start = v["start_seq"].as_u64().unwrap() as u32;
    let mut s = Session::with_sequences(&est, Transport::Tcp, start, start);
    let mut got = vec![];
    for f in v["frames"].as_array().unwrap() {
        let mut f = hex(f);
        match s.open(&mut f, Duration::ZERO).unwrap() {
            Received::Message(m) => got.push(m.to_vec()),
            Received::Rekeyed => got.push(b"<rekey>".to_vec()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got.first().map(|x| x.as_slice()), Some(&b"<rekey>"[..]));
    assert_eq!(got.last().unwrap(), &hex(&v["message_after"]));
    assert_eq!(s.rx_key_bytes().to_vec(), hex(&v["new_tx"]));
    assert_eq!(s.tx_key_bytes().to_vec(), hex(&v["new_rx"]));
}

#[test]
fn fragment_sequences_match_and_reassemble() {
    let list = vectors()["fragments"].as_array().unwrap();
    let mut sizes = vec![];
    for v in list {
        if v.get("oversize").is_some() {
            assert_eq!(v["error"], "PayloadError");
            let est = Established {
                role: Role::Client,
                device_id: [0; 6],
                session_id: [0; 16],
                tx_key: [1; 32],
                rx_key: [2; 32],
            };
            let mut s = Session::new(&est, Transport::Tcp);
            let e = s
                .seal_message(&vec![0; v["oversize"].as_u64().unwrap() as usize], &mut [0u8; 4096])
                .unwrap_err();
            assert_eq!(e.kind().class_name(), "PayloadError");
            continue;
        }
        let key: [u8; 32] = arr(&v["key"]);
        let sid: [u8; 16] = arr(&v["session_id"]);
        let start = v["start_seq"].as_u64().unwrap() as u32;
        let msg = hex(&v["message"]);
        sizes.push(msg.len());
        let expected: Vec<u8> = v["frames"].as_array().unwrap().iter().flat_map(hex).collect();
        let est = Established {
            role: Role::Client,
            device_id: [0; 6],
            session_id: sid,
            tx_key: key,
            rx_key: [2; 32],
        };
        let mut tx = Session::with_sequences(&est, Transport::Tcp, start, 0);
        let mut out = vec![0u8; 4096];
        let n = tx.seal_message(&msg, &mut out).unwrap();
        assert_eq!(&out[..n], &expected[..], "message of {} bytes", msg.len());
        let mut rx = receiver(key, sid, start);
        let mut delivered = None;
        for f in v["frames"].as_array().unwrap() {
            let mut f = hex(f);
            if let Received::Message(m) = rx.open(&mut f, Duration::ZERO).unwrap() {
                delivered = Some(m.to_vec());
            }
        }
        assert_eq!(delivered, Some(msg));
    }
    for want in [0, 1, 452, 453, 1808] {
        assert!(sizes.contains(&want), "missing size class {want}: {sizes:?}");
    }
}
