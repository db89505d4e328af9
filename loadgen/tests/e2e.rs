//! loadgen end to end, small sizes: against our gateway over TCP and UDP (everything
//! connects, nothing is lost, histograms are written and non-empty), and once against the
//! reference Python server to prove it interoperates.

#[path = "../../tests/common/pyref.rs"]
#[allow(dead_code)]
mod pyref;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use usmp::gateway::{Gateway, Session};
use usmp::psk::PskSource;

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");
const PSK: &str = "loadgen-e2e-key-0123456789";

async fn echo(s: Session) {
    while let Ok(m) = s.recv().await {
        if s.send(&m).await.is_err() {
            return;
        }
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loadgen-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(target: SocketAddr, extra: &[&str], dir: &Path) -> serde_json::Value {
    let json = dir.join("summary.json");
    let out = Command::new(LOADGEN)
        .args(["--target", &target.to_string(), "--psk", PSK, "--json", json.to_str().unwrap()])
        .args(["--hist-dir", dir.join("hist").to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loadgen failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !extra.contains(&"--quiet") {
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("handshakes") && table.contains("echo rtt"),
            "summary table on stdout: {table}"
        );
    }
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn check_complete(v: &serde_json::Value, devices: u64) {
    assert_eq!(v["devices"]["requested"], devices, "{v}");
    assert_eq!(v["devices"]["connected"], devices, "{v}");
    assert_eq!(v["devices"]["failed"], 0, "{v}");
    assert_eq!(v["handshakes"]["failed"], 0, "{v}");
    assert_eq!(v["messages"]["lost"], 0, "{v}");
    let sent = v["messages"]["sent"].as_u64().unwrap();
    assert!(sent > 0);
    assert_eq!(v["messages"]["received"], sent, "{v}");
    assert!(v["messages"]["rtt_us"]["p50"].as_f64().unwrap() > 0.0);
    assert!(
        v["messages"]["rtt_us"]["max"].as_f64().unwrap() >= v["messages"]["rtt_us"]["p99"].as_f64().unwrap()
    );
    assert!(v["handshakes"]["latency_us"]["p999"].as_f64().unwrap() > 0.0);
    assert!(v["errors"].as_object().unwrap().is_empty(), "{v}");
    assert!(v["duration_s"].as_f64().unwrap() > 0.0);
}

fn check_hist_dir(dir: &Path) {
    for f in ["rtt.hgrm", "handshake_latency.hgrm", "rtt.svg", "handshake_latency.svg", "summary.json"] {
        let p = dir.join("hist").join(f);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!text.is_empty(), "{f} is empty");
    }
    let hgrm = std::fs::read_to_string(dir.join("hist/rtt.hgrm")).unwrap();
    assert!(hgrm.contains("Percentile") && hgrm.lines().count() > 5, "{hgrm}");
}

#[test]
fn hundreds_of_devices_over_tcp_and_udp() {
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .psk(PskSource::single(PSK.as_bytes()).unwrap())
        .serve(echo)
        .unwrap();
    for transport in ["tcp", "udp"] {
        let dir = tmpdir(transport);
        let v = run(
            gw.local_addr(),
            &[
                "--transport",
                transport,
                "--devices",
                "300",
                "--rate",
                "5",
                "--duration",
                "3",
                "--payload",
                "100",
            ],
            &dir,
        );
        check_complete(&v, 300);
        // 300 devices × 5/s × 3 s, give or take the phase of each device's first message.
        let sent = v["messages"]["sent"].as_u64().unwrap();
        assert!((4000..=4600).contains(&sent), "{transport}: {sent} messages");
        check_hist_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let s = gw.handle().stats();
    assert_eq!(s.handshakes_ok, 600, "{s:?}");
    gw.shutdown();
}

#[test]
fn against_the_reference_python_server() {
    // Over UDP the devices share a socket and are told apart by their source addresses
    // (127.1.0.x): the reference server must answer each at its own.
    for transport in ["tcp", "udp"] {
        let srv = pyref::RefServer::start(transport, PSK.as_bytes(), "echo");
        let dir = tmpdir(&format!("ref-{transport}"));
        let v = run(
            srv.addr,
            &[
                "--transport",
                transport,
                "--devices",
                "4",
                "--rate",
                "10",
                "--duration",
                "2",
                "--payload",
                "500",
                "--workers",
                "1",
                "--quiet",
            ],
            &dir,
        );
        drop(srv);
        check_complete(&v, 4);
        check_hist_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
