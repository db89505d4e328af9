//! Operations: Prometheus metrics moved by exactly what a scripted reference session did,
//! the admin API (downlink, other shard, broadcast, kick, 404/413, token), key rotation with
//! SIGHUP on the real binary, and the config file.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::gateway_bin::{start_binary, start_binary_with_env, wait_log, BIN};
use usmp::ops::{self, OpsOptions};
use usmp::{Client, ClientConfig, Gateway, PskSource, Session};

const PSK: &[u8] = b"ops-test-key-0123456789";

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One HTTP request with a real HTTP client; returns (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut req = ureq::request(method, &format!("http://{addr}{path}")).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match req.send_bytes(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    (resp.status(), resp.into_string().unwrap())
}

/// A strict reader of the Prometheus text format: every sample belongs to a declared family
/// and has a numeric value; returns `name{labels}` → value.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            types.insert(name.into(), kind.into());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (key, value) = line.rsplit_once(' ').expect("sample");
        let name = key.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample without a TYPE: {line}");
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for kv in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = kv.split_once('=').expect("label=value");
                    assert!(!k.is_empty() && v.starts_with('"') && v.ends_with('"'), "{line}");
                }
            }
        }
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        samples.insert(key.to_string(), v);
    }
    samples
}

async fn echo(s: Session) {
    while let Ok(m) = s.recv().await {
        if s.send(&m).await.is_err() {
            return;
        }
    }
}

#[test]
fn metrics_move_by_exactly_what_a_reference_session_did() {
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .psk(PskSource::single(PSK).unwrap())
        .serve(echo)
        .unwrap();
    let srv = ops::serve("127.0.0.1:0".parse().unwrap(), gw.handle(), OpsOptions::default()).unwrap();
    let m0 = parse_prometheus(&http(srv.local_addr(), "GET", "/metrics", None, b"").1);
    assert_eq!(m0["usmp_handshakes_total{outcome=\"ok\"}"], 0.0);
    assert_eq!(http(srv.local_addr(), "GET", "/healthz", None, b""), (200, "ok\n".into()));

    let out = Command::new(common::pyref::python())
        .arg(common::pyref::script("ref_client.py"))
        .args(["--host", "127.0.0.1", "--port", &gw.local_addr().port().to_string(), "--protocol", "tcp"])
        .args(["--psk-hex", &hexs(PSK), "--script", "echo-sizes", "--timeout", "30"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // The session is over once the gateway has counted it closed.
    let t = Instant::now();
    while gw.handle().stats().sessions_closed == 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = parse_prometheus(&http(srv.local_addr(), "GET", "/metrics", None, b"").1);
    // Up: echoes of 0/1/452/453/1808 bytes (1+1+1+2+4 frames), PING, one more echo, BYE.
    // Down: the 9 echo frames, PONG, the last echo.
    assert_eq!(m["usmp_frames_total{direction=\"in\"}"], 12.0);
    assert_eq!(m["usmp_frames_total{direction=\"out\"}"], 11.0);
    let (frame_up, frame_down) = (40 + 41 + 492 + 533 + 1968, 40 + 41 + 492 + 533 + 1968);
    assert_eq!(m["usmp_bytes_total{direction=\"in\"}"], (frame_up + 40 + 50 + 40) as f64);
    assert_eq!(m["usmp_bytes_total{direction=\"out\"}"], (frame_down + 40 + 50) as f64);
    assert_eq!(m["usmp_handshakes_total{outcome=\"ok\"}"], 1.0);
    assert_eq!(m["usmp_handshakes_total{outcome=\"bad_key\"}"], 0.0);
    assert_eq!(m["usmp_connections_accepted_total"], 1.0);
    assert_eq!(m["usmp_sessions_closed_total{reason=\"all\"}"], 1.0);
    assert_eq!(m["usmp_handshake_duration_seconds_count"], 1.0);
    assert_eq!(m["usmp_handshake_duration_seconds_bucket{le=\"+Inf\"}"], 1.0);
    let open: f64 = m.iter().filter(|(k, _)| k.starts_with("usmp_sessions_open{")).map(|(_, v)| v).sum();
    assert_eq!(open, 0.0);
    assert_eq!(m["usmp_build_info{version=\"0.1.0\",protocol=\"2\"}"], 1.0);
    drop(srv);
    gw.shutdown();
}

#[test]
fn admin_api_downlink_broadcast_kick_and_token() {
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .psk(PskSource::single(PSK).unwrap())
        .serve(echo)
        .unwrap();
    let h = gw.handle();
    let open = ops::serve("127.0.0.1:0".parse().unwrap(), h.clone(), OpsOptions::default()).unwrap();
    let token = "admin-token-0123456789";
    let locked = ops::serve(
        "127.0.0.1:0".parse().unwrap(),
        h.clone(),
        OpsOptions { admin_token: Some(token.into()), ..Default::default() },
    )
    .unwrap();
    // One reference device (holding, printing what it receives) and Rust devices on both shards.
    let mut py = Command::new(common::pyref::python())
        .arg(common::pyref::script("ref_client.py"))
        .args(["--host", "127.0.0.1", "--port", &gw.local_addr().port().to_string(), "--protocol", "tcp"])
        .args([
            "--psk-hex",
            &hexs(PSK),
            "--script",
            "hold",
            "--device-id-hex",
            "0000000000aa",
            "--timeout",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut py_out = BufReader::new(py.stdout.take().unwrap()).lines();
    assert!(py_out.next().unwrap().unwrap().contains("connected"));
    let addr = gw.local_addr();
    let (a, o) = (open.local_addr(), locked.local_addr());
    usmp::block_on(async move {
        let mut devs = vec![];
        // SO_REUSEPORT spreads connections by a hash of their addresses: 20 devices all land
        // on one of the two shards once in half a million runs (6 did once in 32).
        for i in 0..20u8 {
            let cfg = ClientConfig { device_id: Some([0, 0, 0, 0, 0xbb, i]), ..ClientConfig::new(addr, PSK) };
            devs.push(Client::connect(&cfg).await.unwrap());
        }
        let run = |m: &'static str, p: String, t: Option<&'static str>, b: Vec<u8>| {
            std::thread::spawn(move || http(if t.is_some() { o } else { a }, m, &p, t, &b)).join().unwrap()
        };
        let (st, body) = run("GET", "/sessions".into(), None, vec![]);
        assert_eq!(st, 200);
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list.as_array().unwrap().len(), 21);
        let shards: std::collections::HashSet<u64> =
            list.as_array().unwrap().iter().map(|s| s["shard"].as_u64().unwrap()).collect();
        assert_eq!(shards.len(), 2, "devices on both shards");
        let row = list.as_array().unwrap().iter().find(|s| s["device_id"] == "00:00:00:00:00:aa").unwrap();
        assert_eq!(row["transport"], "tcp");
        assert!(
            row["session_id"].as_str().unwrap().len() == 32
                && row["connected_since"].as_f64().unwrap() > 1.6e9
        );
        // Downlink to each Rust device, whichever shard holds it (the admin thread is on neither).
        for i in 0..6u8 {
            let (st, _) = run(
                "POST",
                format!("/devices/00000000bb{i:02x}/send"),
                None,
                format!("cmd {i}").into_bytes(),
            );
            assert_eq!(st, 202);
            assert_eq!(
                devs[i as usize].recv_timeout(Duration::from_secs(5)).await.unwrap(),
                format!("cmd {i}").as_bytes()
            );
        }
        assert_eq!(run("POST", "/devices/00:00:00:00:00:aa/send".into(), None, b"to python".to_vec()).0, 202);
        assert_eq!(run("POST", "/devices/0000000000cc/send".into(), None, b"x".to_vec()).0, 404);
        assert_eq!(run("POST", "/devices/00000000bb00/send".into(), None, vec![0; 1809]).0, 413);
        assert_eq!(run("POST", "/devices/zz/send".into(), None, vec![]).0, 400);
        let (st, body) = run("POST", "/broadcast".into(), None, b"to all".to_vec());
        assert_eq!(st, 202, "{body}");
        for d in &devs {
            assert_eq!(d.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"to all");
        }
        assert_eq!(run("POST", "/broadcast".into(), None, vec![0; 1809]).0, 413);
        // Token: required on the locked listener, the right one works, metrics stay open.
        assert_eq!(run("GET", "/sessions".into(), Some("wrong-token-000000000"), vec![]).0, 401);
        assert_eq!(run("POST", "/devices/00000000bb05/kick".into(), Some(token), vec![]).0, 202);
        assert!(devs[5].recv_timeout(Duration::from_secs(5)).await.is_err());
        assert_eq!(devs[5].close_reason(), Some(usmp::CloseReason::PeerBye));
        // The device hears BYE before the gateway has unregistered the session: allow it a moment.
        let mut again = 0;
        for _ in 0..100 {
            again = run("POST", "/devices/00000000bb05/kick".into(), Some(token), vec![]).0;
            if again == 404 {
                break;
            }
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(again, 404);
        assert_eq!(run("POST", "/devices/00:00:00:00:00:aa/kick".into(), None, vec![]).0, 202);
    });
    // The reference device received the downlink and the broadcast, then BYE.
    let rest: Vec<String> = py_out.map(|l| l.unwrap()).collect();
    assert!(rest.iter().any(|l| l.contains(&hexs(b"to python"))), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains(&hexs(b"to all"))), "{rest:?}");
    assert!(rest.last().unwrap().contains("ConnectionClosedError"), "{rest:?}");
    let _ = py.wait();
    gw.shutdown();
}

#[test]
fn key_rotation_with_sighup_keeps_the_fleet_and_revokes_removed_devices() {
    let dir = std::env::temp_dir().join(format!("usmp-rot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let reg = dir.join("devices.txt");
    std::fs::write(&reg, "000000000001 device-one-key-0123\n").unwrap();
    let (mut child, addr, logs) =
        start_binary(&["--listen", "127.0.0.1:0", "--shards", "2", "--psk-file", reg.to_str().unwrap()]);
    let pid = child.id().to_string();
    let hup = |logs: &std::sync::mpsc::Receiver<String>, needle: &str| {
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
        wait_log(logs, needle);
    };
    let cfg = |id: u8, key: &str| ClientConfig {
        device_id: Some([0, 0, 0, 0, 0, id]),
        connect_timeout: Duration::from_secs(5),
        ..ClientConfig::new(addr, key.as_bytes().to_vec())
    };
    // Whoever reads the "listening" line may signal at once: the handler must already be in.
    hup(&logs, "key registry reloaded");
    usmp::block_on(async {
        let one = Client::connect(&cfg(1, "device-one-key-0123")).await.unwrap();
        assert!(Client::connect(&cfg(2, "device-two-key-0123")).await.is_err(), "not registered yet");
        // Add device 2 and rotate nothing else: device 1's live session does not notice.
        std::fs::write(&reg, "000000000001 device-one-key-0123\n000000000002 device-two-key-0123\n").unwrap();
        hup(&logs, "key registry reloaded");
        let two = Client::connect(&cfg(2, "device-two-key-0123")).await.unwrap();
        one.send(b"still here").await.unwrap();
        assert_eq!(one.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"still here");
        // Remove device 2: its live session gets BYE, it can no longer connect; device 1 lives on.
        std::fs::write(&reg, "000000000001 device-one-key-0123\n").unwrap();
        hup(&logs, "key registry reloaded");
        assert!(two.recv_timeout(Duration::from_secs(5)).await.is_err());
        assert_eq!(two.close_reason(), Some(usmp::CloseReason::PeerBye));
        assert!(Client::connect(&cfg(2, "device-two-key-0123")).await.is_err());
        // A corrupt file is refused and the old keys stay in force.
        std::fs::write(&reg, "000000000001 short\nnot a line at all\n").unwrap();
        hup(&logs, "reload failed");
        Client::connect(&cfg(1, "device-one-key-0123")).await.unwrap().disconnect().await;
        one.send(b"unaffected").await.unwrap();
        assert_eq!(one.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"unaffected");
        one.disconnect().await;
    });
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_builder_refuses_a_bad_configuration_as_a_config_error_naming_the_setting() {
    let no_key = Gateway::builder().listen("127.0.0.1:0".parse().unwrap()).serve_messages(|_, _| {});
    match no_key {
        Err(usmp::Error::Config(e)) => assert_eq!(e.field, "psk", "{e}"),
        Err(e) => panic!("not a configuration error: {e:?}"),
        Ok(_) => panic!("a gateway without keys started"),
    }
    let no_shards = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .psk(PskSource::single(PSK).unwrap())
        .shards(0)
        .serve_messages(|_, _| {});
    let e = no_shards.err().expect("zero shards refused");
    assert!(matches!(&e, usmp::Error::Config(c) if c.field == "shards"), "{e:?}");
    assert!(e.to_string().contains("shards"), "{e}");
}

#[test]
fn config_file_errors_name_the_key_and_flags_override_it() {
    let dir = std::env::temp_dir().join(format!("usmp-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "psk = \"config-key-0123456789\"\nshrads = 2\n").unwrap();
    let out = Command::new(BIN).args(["--config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shrads") && err.contains("bad.toml"), "{err}");
    std::fs::write(&bad, "psk = \"config-key-0123456789\"\nsession-timeout = -1\n").unwrap();
    let out = Command::new(BIN).args(["--config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("session-timeout"));

    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:1\"\npsk = \"config-key-0123456789\"\nmode = \"ack\"\nshards = 1\n",
    )
    .unwrap();
    // The flag's --listen wins over the file's (port 1 would need privileges anyway).
    let (mut child, addr, _logs) =
        start_binary(&["--config", good.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_ne!(addr.port(), 1);
    usmp::block_on(async {
        let c = Client::connect(&ClientConfig::new(addr, &b"config-key-0123456789"[..])).await.unwrap();
        c.send(b"hello").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"ACK", "mode from the file");
        c.disconnect().await;
    });
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_logs_one_event_per_decision_with_fields() {
    let mut child = common::child::ChildGuard(
        Command::new(BIN)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--shards",
                "1",
                "--psk",
                "json-log-key-0123456789",
                "--log-format",
                "json",
            ])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let _ = tx.send(v);
        }
    });
    let next = |what: &str| loop {
        let v = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("no {what} event"));
        if v["message"] == what {
            return v;
        }
    };
    let start = next("usmp-gateway listening");
    let addr: SocketAddr = start["address"].as_str().unwrap().parse().unwrap();
    usmp::block_on(async {
        let cfg = ClientConfig {
            device_id: Some([0xab; 6]),
            ..ClientConfig::new(addr, &b"json-log-key-0123456789"[..])
        };
        Client::connect(&cfg).await.unwrap().disconnect().await;
        let bad = ClientConfig {
            device_id: Some([0xcd; 6]),
            ..ClientConfig::new(addr, &b"not-the-key-0123456789"[..])
        };
        assert!(Client::connect(&bad).await.is_err());
    });
    let up = next("session up");
    assert_eq!(up["device"], "ab:ab:ab:ab:ab:ab");
    assert!(up["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let down = next("session down");
    assert_eq!(down["reason"], "peer_bye");
    let failed = next("handshake failed");
    assert!(failed["reason"].as_str().unwrap().contains("AuthError"), "{failed}");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

/// The admin token from a file or the environment (a flag shows in `ps`): the binary lets
/// in the right token and nothing else, wherever the token came from.
#[test]
fn the_admin_token_comes_from_a_file_or_the_environment() {
    use std::os::unix::fs::PermissionsExt;
    let token = "token-from-elsewhere-0123456789";
    let file = std::env::temp_dir().join(format!("usmp-admin-token-{}", std::process::id()));
    std::fs::write(&file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = file.to_str().unwrap().to_string();
    for (flag_args, env) in
        [(vec!["--admin-token-file", path.as_str()], vec![]), (vec![], vec![("USMP_ADMIN_TOKEN", token)])]
    {
        let metrics = format!("127.0.0.1:{}", common::natsd::free_port());
        let mut args =
            vec!["--listen", "127.0.0.1:0", "--psk", "ops-test-key-0123456789", "--metrics", &metrics];
        args.extend(flag_args.iter().copied());
        let (_child, _addr, _log) = start_binary_with_env(&args, &env);
        let m: SocketAddr = metrics.parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ok = loop {
            match ureq::get(&format!("http://{m}/sessions"))
                .set("Authorization", &format!("Bearer {token}"))
                .timeout(Duration::from_secs(5))
                .call()
            {
                Ok(r) => break r.status(),
                Err(ureq::Error::Status(s, _)) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("{env:?} {flag_args:?}: {e}"),
            }
        };
        assert_eq!(ok, 200, "the token from {env:?}{flag_args:?} is let in");
        assert_eq!(http(m, "GET", "/sessions", Some("not-the-token-0123456789"), b"").0, 401);
        assert_eq!(http(m, "GET", "/sessions", None, b"").0, 401);
    }
    let _ = std::fs::remove_file(&file);
}
