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
    for f in ["rtt.hgrm", "handshake_latency.hgrm", "summary.json"] {
        let p = dir.join("hist").join(f);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!text.is_empty(), "{f} is empty");
    }
    let hgrm = std::fs::read_to_string(dir.join("hist/rtt.hgrm")).unwrap();
    assert!(hgrm.contains("Percentile") && hgrm.lines().count() > 5, "{hgrm}");
    // The parent's histogram is what the workers shipped (V2-encoded): every sample arrived.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hist/summary.json")).unwrap()).unwrap();
    let count = summary["messages"]["rtt_us"]["count"].as_u64().unwrap();
    assert!(count > 0, "{summary}");
    assert!(hgrm.contains(&format!("Total count    = {count:12}]")), "{count} samples in\n{hgrm}");
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

/// `examples/bare_echo` (built by `cargo test --workspace` with the other examples; built here
/// when only this package's tests run), started on a free port: the server and its address.
fn bare_echo(udp: bool) -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    let bin = Path::new(LOADGEN).parent().unwrap().join("examples").join("bare_echo");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "usmp-gateway", "--example", "bare_echo"])
            .status()
            .unwrap();
        assert!(st.success(), "cannot build examples/bare_echo");
    }
    let mut cmd = Command::new(&bin);
    if udp {
        cmd.arg("--udp");
    }
    let mut child = cmd.arg("127.0.0.1:0").stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.strip_prefix("READY ").unwrap_or_else(|| panic!("bare_echo said {line:?}"));
    (child, addr.trim().parse().unwrap())
}

fn check_loadgen_cpu(v: &serde_json::Value) {
    assert!(v["steady"]["messages"].as_u64().unwrap() > 0, "{v}");
    assert!(v["steady"]["end_unix_s"].as_f64().unwrap() > v["steady"]["start_unix_s"].as_f64().unwrap());
    assert!(v["loadgen"]["cpu_us_per_message"].as_f64().unwrap() > 0.0, "{v}");
}

/// A raw-echo run of `devices` against a fresh `bare_echo` (over UDP with `udp`): complete,
/// checked, with loadgen's own CPU reported. Returns the summary.
fn raw_run(udp: bool, devices: u64, extra: &[&str]) -> serde_json::Value {
    let (mut srv, addr) = bare_echo(udp);
    let dir = tmpdir(if udp { "raw-udp" } else { "raw-tcp" });
    let transport = if udp { "udp" } else { "tcp" };
    let n = devices.to_string();
    let args = [&["--transport", transport, "--mode", "raw-echo", "--devices", &n, "--workers", "1"], extra]
        .concat();
    let v = run(addr, &args, &dir);
    let _ = srv.kill();
    check_complete(&v, devices);
    assert_eq!(v["mode"], "raw-echo");
    check_loadgen_cpu(&v);
    check_hist_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    v
}

#[test]
fn raw_echo_against_the_bare_server_over_tcp_and_udp() {
    // Open loop over TCP: 10 devices × 50/s × 2 s is exactly 1000 messages (each device's
    // phase is under one interval), every one echoed and checked.
    let v = raw_run(false, 10, &["--rate", "50", "--duration", "2"]);
    assert_eq!(v["messages"]["sent"], 1000, "{v}");
    // Closed loop over UDP: devices share a socket, each from its own source address.
    let v = raw_run(true, 8, &["--rate", "0", "--duration", "1"]);
    assert!(v["messages"]["sent"].as_u64().unwrap() > 100, "{v}");
}

#[test]
fn raw_udp_counts_lost_and_corrupted_echoes_exactly() {
    // A faulty echo: drops message k of every device when k % 5 == 3 and flips a byte of the
    // others when k % 7 == 2 (the payload carries the device's index and k).
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let k = u64::from_le_bytes(buf[8..16].try_into().unwrap());
            if k % 5 == 3 {
                continue;
            }
            if k % 7 == 2 {
                buf[n - 1] ^= 1;
            }
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    let dir = tmpdir("raw-udp-faulty");
    let v = run(
        addr,
        &[
            "--transport",
            "udp",
            "--mode",
            "raw-echo",
            "--devices",
            "4",
            "--rate",
            "50",
            "--duration",
            "2",
            "--payload",
            "64",
            "--quiet",
        ],
        &dir,
    );
    // Per device: k = 0..100; 20 dropped; 14 with k % 7 == 2, 3 of them dropped anyway.
    assert_eq!(v["messages"]["sent"], 400, "{v}");
    assert_eq!(v["messages"]["lost"], 80, "{v}");
    assert_eq!(v["messages"]["received"], 320, "{v}");
    assert_eq!(v["errors"]["echo_mismatch"], 44, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
