//! `--mode nats`, uplinks: every message of reference (Python, TCP and UDP) and Rust devices
//! is stored in `USMP_UP` exactly once, in per-device order, with the documented headers, and
//! an MQTT client reads the same uplinks through nats-server's MQTT listener.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use usmp::Transport;

mod common;
use common::gwproc::GatewayProc;
use common::nats_util::*;
use common::natsd::{wait_jetstream, Natsd, Opts};
use common::pyref;

const BIN: &str = env!("CARGO_BIN_EXE_usmp-gateway");
const PER_DEVICE: usize = 1000;

#[test]
fn uplinks_are_stored_once_in_order_with_headers_and_readable_over_mqtt() {
    let natsd = Natsd::start_with(Opts { mqtt: true, ..Opts::default() });
    let gw = GatewayProc::start(
        BIN,
        &[
            "--mode",
            "nats",
            "--nats",
            &natsd.url(),
            "--gateway-id",
            "gw-up",
            "--psk-hex",
            &psk_hex(),
            "--shards",
            "2",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let client = rt.block_on(wait_jetstream(&natsd.url()));
    let js = async_nats::jetstream::new(client);

    // The MQTT reader subscribes first (nats-server maps usmp/up/<dev> onto usmp.up.<dev>).
    let mut mqtt = Command::new(pyref::python())
        .arg(pyref::script("nats_peer.py"))
        .args(["mqtt-sub", "--port", &natsd.mqtt_port.unwrap().to_string()])
        .args(["--count", &(4 * PER_DEVICE).to_string(), "--timeout", "120"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut mqtt_lines = BufReader::new(mqtt.stdout.take().unwrap()).lines();
    let ready = mqtt_lines.next().unwrap().unwrap();
    assert!(ready.contains("ready"), "{ready}");

    let devices = [
        (dev(1, 1), Transport::Tcp, true),
        (dev(1, 2), Transport::Udp, true),
        (dev(1, 3), Transport::Tcp, false),
        (dev(1, 4), Transport::Udp, false),
    ];
    let mut py = Vec::new();
    let mut rust = Vec::new();
    for (d, t, reference) in devices {
        if reference {
            py.push(reference_sender(gw.addr, t, d, PER_DEVICE, "m"));
        } else {
            rust.push(rust_sender(gw.addr, t, d, PER_DEVICE, "m"));
        }
    }
    for mut p in py {
        let lines = lines_of(&mut p);
        assert!(p.wait().unwrap().success(), "{:?}", lines.last());
        assert_eq!(lines.last().unwrap()["sent"], PER_DEVICE);
    }
    for r in rust {
        r.join().unwrap();
    }

    let total = (4 * PER_DEVICE) as u64;
    let have = rt.block_on(wait_stream_len(&js, "USMP_UP", total, Duration::from_secs(30)));
    assert_eq!(have, total, "stored uplinks");
    let stored = rt.block_on(read_stream(&js, "USMP_UP"));
    assert_eq!(stored.len(), 4 * PER_DEVICE, "exactly once: no duplicates");
    let mut per_device: HashMap<String, Vec<String>> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for m in &stored {
        let tok = m.subject.strip_prefix("usmp.up.").expect("subject usmp.up.<device>").to_string();
        let h = &m.headers;
        let colon: Vec<String> =
            tok.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        assert_eq!(h["Usmp-Device"], colon.join(":"), "{h:?}");
        assert_eq!(h["Usmp-Session"].len(), 32, "{h:?}");
        assert!(h["Usmp-Session"].bytes().all(|b| b.is_ascii_hexdigit()), "{h:?}");
        assert_eq!(h["Usmp-Gateway"], "gw-up");
        let t = if tok.ends_with("02") || tok.ends_with("04") { "udp" } else { "tcp" };
        assert_eq!(h["Usmp-Transport"], t, "{tok}");
        assert!(ids.insert(h["Nats-Msg-Id"].clone()), "Nats-Msg-Id unique");
        per_device.entry(tok).or_default().push(String::from_utf8(m.payload.clone()).unwrap());
    }
    assert_eq!(per_device.len(), 4);
    for (d, msgs) in &per_device {
        let want: Vec<String> = (0..PER_DEVICE).map(|i| format!("m-{i}")).collect();
        assert_eq!(msgs, &want, "device {d}: every message once, in order");
    }

    // Metrics: every publish acknowledged once, none left in flight.
    let m = gw.http_get("/metrics");
    assert!(m.contains(&format!("usmp_nats_publishes_total{{result=\"ok\"}} {}", 4 * PER_DEVICE)), "{m}");
    assert!(m.contains("usmp_nats_publishes_in_flight 0"), "{m}");
    assert!(m.contains("usmp_nats_publish_ack_seconds_count 4000"), "{m}");

    // MQTT saw the same uplinks, on usmp/up/<device>.
    let mut mqtt_count = HashMap::<String, usize>::new();
    for line in mqtt_lines.map_while(Result::ok) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(topic) = v["topic"].as_str() {
            *mqtt_count.entry(topic.to_string()).or_default() += 1;
        }
    }
    assert!(mqtt.wait().unwrap().success(), "MQTT reader got every uplink: {mqtt_count:?}");
    for (d, _, _) in devices {
        assert_eq!(mqtt_count[&format!("usmp/up/{}", token(&d))], PER_DEVICE);
    }
}
