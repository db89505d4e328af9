//! `--mode nats`, downlinks on one gateway: delivered to a connected device (TCP written, UDP
//! acknowledged), queued for an offline one and sent in order when it connects, expired ones
//! never sent, the per-device cap answered `queue_full`; bad requests answered, never
//! dropped; session events and presence.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use usmp::{Client, Transport};

mod common;
use common::gwproc::GatewayProc;
use common::nats_util::*;
use common::natsd::{wait_jetstream, Natsd};

const BIN: &str = env!("CARGO_BIN_EXE_usmp-gateway");

fn down(d: &[u8; 6]) -> String {
    format!("usmp.down.{}", token(d))
}

#[test]
fn downlinks_queue_expiry_cap_events_presence_and_bad_requests() {
    let natsd = Natsd::start();
    let gw = GatewayProc::start(
        BIN,
        &[
            "--mode",
            "nats",
            "--nats",
            &natsd.url(),
            "--gateway-id",
            "gw-down",
            "--psk-hex",
            &psk_hex(),
            "--shards",
            "2",
            "--downlink-ttl",
            "3",
            "--downlink-queue",
            "3",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let nc = rt.block_on(wait_jetstream(&natsd.url()));
    let js = async_nats::jetstream::new(nc.clone());
    let mut events = rt.block_on(nc.subscribe("usmp.evt.>")).unwrap();
    let (d1, d2, d3) = (dev(2, 1), dev(2, 2), dev(2, 3));

    // Offline: queued up to the cap, then queue_full.
    for m in ["q1", "q2", "q3"] {
        assert_eq!(rt.block_on(request_status(&nc, down(&d1), m.as_bytes())), "queued", "{m}");
    }
    assert_eq!(rt.block_on(request_status(&nc, down(&d1), b"q4")), "queue_full");
    // Bad input gets an answer, never silence.
    assert_eq!(rt.block_on(request_status(&nc, down(&d1), &[7u8; 1809])), "too_large");
    for bad in ["usmp.down.00112233445G", "usmp.down.0011", "usmp.down.00:11:22:33:44:55"] {
        assert_eq!(rt.block_on(request_status(&nc, bad.to_string(), b"x")), "rejected", "{bad}");
    }
    // An expiring one for d2.
    assert_eq!(rt.block_on(request_status(&nc, down(&d2), b"stale")), "queued");

    // d1 connects: its queue arrives in order; then a live downlink is delivered.
    let addr = gw.addr;
    let (got_tx, got) = std::sync::mpsc::channel::<Vec<u8>>();
    let (bye_tx, bye) = std::sync::mpsc::channel::<()>();
    let device = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, Transport::Tcp, d1)).await.unwrap();
            while let Ok(m) = c.recv_timeout(Duration::from_secs(10)).await {
                got_tx.send(m).unwrap();
                if bye.try_recv().is_ok() {
                    break;
                }
            }
            c.disconnect().await;
        })
    });
    for want in ["q1", "q2", "q3"] {
        assert_eq!(got.recv_timeout(Duration::from_secs(10)).unwrap(), want.as_bytes());
    }
    let end = Instant::now() + Duration::from_secs(5);
    while rt.block_on(wait_stream_len(&js, "USMP_DOWN", 2, Duration::ZERO)) > 1 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Delivered ones are removed; d2's is still queued.
    assert_eq!(rt.block_on(wait_stream_len(&js, "USMP_DOWN", 2, Duration::ZERO)), 1);
    // Presence while online.
    let presence = rt.block_on(async {
        let kv = js.get_key_value("USMP_PRESENCE").await.unwrap();
        kv.get(token(&d1)).await.unwrap()
    });
    let p: serde_json::Value = serde_json::from_slice(&presence.expect("presence entry")).unwrap();
    assert_eq!(p["gateway"], "gw-down");
    assert_eq!(p["transport"], "tcp");
    assert_eq!(p["session"].as_str().unwrap().len(), 32);
    assert!(p["since"].as_str().unwrap().contains('T'), "RFC 3339: {p}");
    bye_tx.send(()).unwrap();
    assert_eq!(rt.block_on(request_status(&nc, down(&d1), b"live")), "delivered");
    assert_eq!(got.recv_timeout(Duration::from_secs(5)).unwrap(), b"live");
    device.join().unwrap();

    // Events: connected, then disconnected with reason bye, with the documented fields.
    let (mut connected, mut disconnected) = (None, None);
    let end = Instant::now() + Duration::from_secs(5);
    while disconnected.is_none() && Instant::now() < end {
        let Ok(Some(m)) = rt.block_on(tokio::time::timeout(Duration::from_secs(1), events.next())) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if m.subject.as_str() == format!("usmp.evt.{}.connected", token(&d1)) {
            connected = Some(v);
        } else if m.subject.as_str() == format!("usmp.evt.{}.disconnected", token(&d1)) {
            disconnected = Some(v);
        }
    }
    let (c, d) = (connected.expect("connected event"), disconnected.expect("disconnected event"));
    for v in [&c, &d] {
        assert_eq!(v["device"], token(&d1));
        assert_eq!(v["gateway"], "gw-down");
        assert_eq!(v["transport"], "tcp");
        assert!(v["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(v["at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["session"], p["session"]);
    }
    assert_eq!(d["reason"], "bye");
    // Presence is removed once the session is gone.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let kv = rt.block_on(js.get_key_value("USMP_PRESENCE")).unwrap();
        if rt.block_on(kv.get(token(&d1))).unwrap().is_none() {
            break;
        }
        assert!(Instant::now() < end, "presence not removed");
        std::thread::sleep(Duration::from_millis(50));
    }

    // d2's queued downlink expired (ttl 3 s): never sent, and the device gets the fresh one.
    std::thread::sleep(Duration::from_millis(3200));
    let (got2_tx, got2) = std::sync::mpsc::channel::<Vec<u8>>();
    let device2 = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, Transport::Udp, d2)).await.unwrap();
            while let Ok(m) = c.recv_timeout(Duration::from_secs(3)).await {
                got2_tx.send(m).unwrap();
            }
            c.disconnect().await;
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    // UDP: delivered means the device acknowledged it.
    assert_eq!(rt.block_on(request_status(&nc, down(&d2), b"fresh")), "delivered");
    device2.join().unwrap();
    let all: Vec<Vec<u8>> = got2.try_iter().collect();
    assert_eq!(all, vec![b"fresh".to_vec()], "the expired downlink is never sent");

    // A request for a device that never connected, with the queue on: queued; metrics agree.
    assert_eq!(rt.block_on(request_status(&nc, down(&d3), b"later")), "queued");
    drop(gw);
}

#[test]
fn without_a_queue_offline_devices_are_offline() {
    let natsd = Natsd::start();
    let _gw = GatewayProc::start(
        BIN,
        &[
            "--mode",
            "nats",
            "--nats",
            &natsd.url(),
            "--psk-hex",
            &psk_hex(),
            "--shards",
            "1",
            "--downlink-ttl",
            "0",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let nc = rt.block_on(wait_jetstream(&natsd.url()));
    // The gateway subscribes once it is connected: retry until someone answers.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(2)));
        match rt.block_on(nc.send_request(down(&dev(3, 1)), req)) {
            Ok(m) => {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                assert_eq!(v["status"], "offline");
                break;
            }
            Err(e) => assert!(Instant::now() < end, "no answer: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A device connecting with downlinks queued gets them first: downlinks requested while its
/// queue goes out (here, at once on its `connected` event) join the queue behind them
/// instead of overtaking them.
#[test]
fn new_downlinks_never_overtake_a_draining_queue() {
    let natsd = Natsd::start();
    let gw = GatewayProc::start(
        BIN,
        &["--mode", "nats", "--nats", &natsd.url(), "--psk-hex", &psk_hex(), "--shards", "1"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let nc = rt.block_on(wait_jetstream(&natsd.url()));
    let d = dev(4, 1);
    let mut events = rt.block_on(nc.subscribe(format!("usmp.evt.{}.connected", token(&d)))).unwrap();
    rt.block_on(nc.flush()).unwrap();
    // The gateway answers once it is set up: wait for the first `queued`.
    let end = Instant::now() + Duration::from_secs(10);
    while rt.block_on(request_status(&nc, down(&d), b"q0")) != "queued" {
        assert!(Instant::now() < end, "the gateway never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let queued = 40;
    for i in 1..queued {
        assert_eq!(rt.block_on(request_status(&nc, down(&d), format!("q{i}").as_bytes())), "queued");
    }
    let addr = gw.addr;
    let total = queued + 10;
    let device = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, Transport::Tcp, d)).await.unwrap();
            let mut got = Vec::new();
            while got.len() < total {
                match c.recv_timeout(Duration::from_secs(15)).await {
                    Ok(m) => got.push(String::from_utf8(m).unwrap()),
                    Err(_) => break,
                }
            }
            c.disconnect().await;
            got
        })
    });
    rt.block_on(tokio::time::timeout(Duration::from_secs(10), events.next())).expect("connected event");
    let statuses: Vec<String> =
        (0..10).map(|i| rt.block_on(request_status(&nc, down(&d), format!("n{i}").as_bytes()))).collect();
    assert!(statuses.iter().all(|s| s == "queued" || s == "delivered"), "{statuses:?}");
    let got = device.join().unwrap();
    let want: Vec<String> =
        (0..queued).map(|i| format!("q{i}")).chain((0..10).map(|i| format!("n{i}"))).collect();
    assert_eq!(got, want, "statuses of the new ones: {statuses:?}");
    drop(gw);
}
