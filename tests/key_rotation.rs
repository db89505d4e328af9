//! Key rotation does what it says (issue 15, item 7): a rotated key ends the sessions made
//! with it; removing a device ends its session even when a wildcard would still admit it;
//! an empty or cut-off registry is refused and the old keys stay in force; a key file others
//! can read is warned about; no key ever shows in an error, a log line or `Debug` output.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::gateway_bin::{start_binary, start_binary_with_env, wait_log_keeping};
use usmp::{Client, ClientConfig, CloseReason, Gateway, GatewayHandle, PskSource, Session};

async fn echo(s: Session) {
    while let Ok(m) = s.recv().await {
        let _ = s.send(&m).await;
    }
}

fn registry(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("usmp-keys-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("devices.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn gateway(path: &PathBuf) -> (Gateway, GatewayHandle) {
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .psk(PskSource::registry_file(path).unwrap())
        .serve(echo)
        .unwrap();
    let h = gw.handle();
    (gw, h)
}

fn cfg(gw: &Gateway, id: u8, key: &str) -> ClientConfig {
    ClientConfig {
        device_id: Some([0, 0, 0, 0, 0, id]),
        connect_timeout: Duration::from_secs(5),
        ..ClientConfig::new(gw.local_addr(), key.as_bytes().to_vec())
    }
}

async fn alive(c: &Client) -> bool {
    c.send(b"ping?").await.is_ok()
        && c.recv_timeout(Duration::from_secs(3)).await.is_ok_and(|m| m == b"ping?")
}

#[test]
fn a_rotated_key_ends_its_sessions_with_bye_and_spares_the_rest() {
    let path = registry("rotate", "000000000001 device-one-key-0123\n000000000002 device-two-key-0123\n");
    let (gw, h) = gateway(&path);
    usmp::block_on(async {
        let one = Client::connect(&cfg(&gw, 1, "device-one-key-0123")).await.unwrap();
        let two = Client::connect(&cfg(&gw, 2, "device-two-key-0123")).await.unwrap();
        // Device 1's key is rotated; device 2's is unchanged.
        std::fs::write(&path, "000000000001 device-one-NEW-key-01\n000000000002 device-two-key-0123\n")
            .unwrap();
        h.reload_keys().unwrap();
        assert!(one.recv_timeout(Duration::from_secs(5)).await.is_err());
        assert_eq!(one.close_reason(), Some(CloseReason::PeerBye), "ended with BYE");
        assert!(alive(&two).await, "an unchanged key keeps its session");
        assert!(Client::connect(&cfg(&gw, 1, "device-one-key-0123")).await.is_err(), "old key refused");
        Client::connect(&cfg(&gw, 1, "device-one-NEW-key-01")).await.unwrap().disconnect().await;
        two.disconnect().await;
    });
    gw.shutdown();
}

#[test]
fn removing_a_device_ends_its_own_key_session_even_with_a_wildcard() {
    let path = registry("wild", "000000000001 device-one-key-0123\n* the-fleet-wildcard-key\n");
    let (gw, h) = gateway(&path);
    usmp::block_on(async {
        let one = Client::connect(&cfg(&gw, 1, "device-one-key-0123")).await.unwrap();
        let fleet = Client::connect(&cfg(&gw, 3, "the-fleet-wildcard-key")).await.unwrap();
        // Device 1 is removed; the wildcard would admit it, but with another key.
        std::fs::write(&path, "* the-fleet-wildcard-key\n").unwrap();
        h.reload_keys().unwrap();
        assert!(one.recv_timeout(Duration::from_secs(5)).await.is_err());
        assert_eq!(one.close_reason(), Some(CloseReason::PeerBye));
        assert!(alive(&fleet).await, "a session under the unchanged wildcard lives on");
        fleet.disconnect().await;
    });
    gw.shutdown();
}

#[test]
fn an_empty_or_cut_off_registry_is_refused_and_the_old_keys_stay() {
    let good = "000000000001 device-one-key-0123\n000000000002 device-two-key-0123\n";
    let path = registry("trunc", good);
    let (gw, h) = gateway(&path);
    usmp::block_on(async {
        let one = Client::connect(&cfg(&gw, 1, "device-one-key-0123")).await.unwrap();
        for (bad, why) in [
            ("", "empty"),
            ("# nothing here yet\n\n", "empty"),
            ("000000000001 device-one-key-0123\n0000000000", "truncated"),
            ("000000000001 device-one-key-0123", "truncated"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = h.reload_keys().expect_err(why);
            assert!(e.to_string().contains(why), "{why}: {e}");
            assert!(alive(&one).await, "{why}: the session lives on");
            Client::connect(&cfg(&gw, 2, "device-two-key-0123")).await.unwrap().disconnect().await;
        }
        one.disconnect().await;
    });
    gw.shutdown();
}

#[test]
fn a_key_file_others_can_read_is_warned_about_and_no_key_reaches_the_logs() {
    use std::os::unix::fs::PermissionsExt;
    let secret = "a-very-secret-device-key-7781";
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let path = registry("perm", &format!("000000000001 {secret}\n"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Every log level of every crate: a key must not reach even a trace line.
    let (mut child, addr, logs) = start_binary_with_env(
        &["--listen", "127.0.0.1:0", "--shards", "1", "--psk-file", path.to_str().unwrap()],
        &[("RUST_LOG", "trace")],
    );
    let mut seen = Vec::new();
    wait_log_keeping(&logs, "readable by group or others", &mut seen);
    // A session, a failed handshake, a swapped line in a reload: the logs say what happened,
    // never with the key.
    usmp::block_on(async {
        let c = Client::connect(&ClientConfig {
            device_id: Some([0, 0, 0, 0, 0, 1]),
            ..ClientConfig::new(addr, secret.as_bytes())
        })
        .await
        .unwrap();
        c.send(b"hello").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"hello");
        c.disconnect().await;
        let c = ClientConfig {
            device_id: Some([0, 0, 0, 0, 0, 1]),
            ..ClientConfig::new(addr, &b"wrong-key-0123456789"[..])
        };
        assert!(Client::connect(&c).await.is_err());
    });
    std::fs::write(&path, format!("{secret} 000000000001\n")).unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    wait_log_keeping(&logs, "reload failed", &mut seen);
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    seen.extend(logs.try_iter());
    assert!(seen.iter().any(|l| l.contains("TRACE")), "trace logging is on: {seen:?}");
    assert!(seen.iter().any(|l| l.contains("session up")), "the session is logged: {seen:?}");
    let all = seen.join("\n");
    assert!(
        !all.contains(secret) && !all.contains("secret-device") && !all.contains(&hex[..16]),
        "a key in the logs:\n{all}"
    );
    // Private permissions: no warning.
    std::fs::write(&path, format!("000000000001 {secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (mut child, _, logs) =
        start_binary(&["--listen", "127.0.0.1:0", "--shards", "1", "--psk-file", path.to_str().unwrap()]);
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let all: Vec<String> = logs.try_iter().collect();
    assert!(!all.iter().any(|l| l.contains("readable by group")), "{all:?}");
}

#[test]
fn no_config_type_prints_a_key_in_its_debug_output() {
    let key = "the-secret-key-in-question-0042";
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    let settings = usmp::ops::settings::Settings {
        psk: Some(key.into()),
        psk_hex: Some(hex.clone()),
        admin_token: Some(key.into()),
        nats_password: Some(key.into()),
        ..Default::default()
    };
    let mut reg = usmp::psk::Registry::new();
    reg.insert([1; 6], key.as_bytes()).unwrap();
    reg.set_wildcard(key.as_bytes()).unwrap();
    let bad_line = usmp::psk::Registry::parse(&format!("{key} 000000000001\n"), "f").unwrap_err();
    let outputs = [
        format!("{settings:?} {settings:#?}"),
        format!("{:?}", ClientConfig::new("127.0.0.1:1".parse().unwrap(), key.as_bytes())),
        format!("{:?}", usmp::psk::PskSource::single(key.as_bytes()).unwrap()),
        format!("{:?}", usmp::psk::PskSource::registry(reg.clone())),
        format!("{reg:?}"),
        format!("{:?}", usmp::proto::crypto::Psk::new(key.as_bytes()).unwrap()),
        format!("{bad_line:?} {bad_line}"),
        format!("{:?}", usmp::ops::OpsOptions { admin_token: Some(key.into()), ..Default::default() }),
    ];
    for o in outputs {
        assert!(!o.contains(key) && !o.contains(&hex) && !o.contains("secret-key"), "a key in: {o}");
    }
}
