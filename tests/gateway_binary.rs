//! The `usmp-gateway` binary as README's run command uses it: no key → a generated key that a
//! client can use; bad configuration → exit code 2 naming the flag; SIGTERM → BYE and exit 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use usmp::{Client, ClientConfig};

mod common;
use common::child::ChildGuard;

const BIN: &str = env!("CARGO_BIN_EXE_usmp-gateway");

#[test]
fn bad_configuration_exits_2_naming_the_flag() {
    for (args, needle) in [
        (vec!["--psk", "short"], "--psk"),
        (vec!["--psk-hex", "zz"], "--psk-hex"),
        (vec!["--psk", "0123456789abcdef", "--cpus", "x"], "--cpus"),
        (vec!["--psk", "0123456789abcdef", "--session-timeout", "0"], "--session-timeout"),
        (vec!["--no-such-flag"], "--no-such-flag"),
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn generated_key_works_and_sigterm_says_bye() {
    let mut child = ChildGuard(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--shards", "2"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut key = None;
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(k) = line.split("USMP PSK (text, 32 bytes): ").nth(1) {
            key = Some(k.trim().to_string());
        }
        if line.contains("usmp-gateway listening") {
            let plain: String = line.chars().filter(|c| !c.is_control()).collect();
            let at = plain.find("address").unwrap();
            let rest = &plain[at..];
            let start = rest.find("127.0.0.1").unwrap();
            let end = rest[start..].find([' ', '\u{1b}']).map(|e| start + e).unwrap_or(rest.len());
            let a: String = rest[start..end]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            addr = Some(a);
            break;
        }
    }
    let key = key.expect("the generated key is printed");
    let addr: std::net::SocketAddr = addr.expect("the listening line").parse().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let pid = child.id().to_string();
    usmp::block_on(async move {
        let c = Client::connect(&ClientConfig::new(addr, key.into_bytes())).await.unwrap();
        c.send(b"echo me").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"echo me");
        // Only our own child, by PID.
        let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(st.success());
        assert!(c.recv_timeout(Duration::from_secs(10)).await.is_err());
        assert_eq!(c.close_reason(), Some(usmp::CloseReason::PeerBye));
    });
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `--io-driver epoll` runs the shards on epoll (the startup line says which driver each shard
/// got) and serves devices; a misspelt driver exits 2 naming the flag.
#[test]
fn io_driver_flag_picks_the_shards_driver() {
    for (driver, shown) in [("epoll", "driver=\"epoll\""), ("uring", "driver=\"io_uring\"")] {
        let mut child = ChildGuard(
            Command::new(BIN)
                .args(["--listen", "127.0.0.1:0", "--shards", "1", "--psk", "binary-test-key-0123"])
                .args(["--io-driver", driver])
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .env_remove("USMP_FORCE_EPOLL")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let started = lines.by_ref().map(|l| l.unwrap()).find(|l| l.contains("shard started"));
        std::thread::spawn(move || for _ in lines {});
        // This machine's kernel has io_uring (README, machine facts), so `uring` must get it.
        assert!(started.as_ref().is_some_and(|l| l.contains(shown)), "{driver}: {started:?}");
    }
    let (child, addr) = start(&["--io-driver", "epoll"]);
    usmp::block_on(async move {
        let c = Client::connect(&ClientConfig::new(addr, b"binary-test-key-0123".to_vec())).await.unwrap();
        c.send(b"over epoll").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"over epoll");
    });
    drop(child);
    let out =
        Command::new(BIN).args(["--psk", "0123456789abcdef", "--io-driver", "kqueue"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--io-driver"));
}

/// The binary on a free port (`--listen 127.0.0.1:0`, one shard, the tests' key) with `args`,
/// its stdout piped and its stderr read up to the startup line: its address, and the rest of
/// stderr for the caller to read or leave unread.
fn spawn(
    args: &[&str],
) -> (ChildGuard, std::net::SocketAddr, std::io::Lines<BufReader<std::process::ChildStderr>>) {
    let mut child = ChildGuard(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--shards", "1", "--psk", "binary-test-key-0123"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = listening_addr(&mut lines);
    (child, addr, lines)
}

/// [`spawn`], with the rest of stderr drained.
fn start(args: &[&str]) -> (ChildGuard, std::net::SocketAddr) {
    let (child, addr, lines) = spawn(args);
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// The address in the `usmp-gateway listening address=…` line.
fn listening_addr(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> std::net::SocketAddr {
    for line in lines {
        let plain: String = line.unwrap().chars().filter(|c| !c.is_control()).collect();
        if let Some(at) = plain.find("address") {
            if !plain.contains("listening") {
                continue;
            }
            let rest = &plain[at..];
            let start = rest.find("127.0.0.1").unwrap();
            let a: String =
                rest[start..].chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
            return a.parse().unwrap();
        }
    }
    panic!("no listening line")
}

#[test]
fn ack_and_log_modes() {
    let (mut child, addr) = start(&["--mode", "ack"]);
    usmp::block_on(async move {
        let c = Client::connect(&ClientConfig::new(addr, &b"binary-test-key-0123"[..])).await.unwrap();
        c.send(b"reading 42").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"ACK");
        c.disconnect().await;
    });
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, addr) = start(&["--mode", "log"]);
    let stdout = child.stdout.take().unwrap();
    let (dev, sid) = usmp::block_on(async move {
        let cfg = ClientConfig {
            device_id: Some([0xde, 0xad, 0xbe, 0xef, 0, 1]),
            ..ClientConfig::new(addr, &b"binary-test-key-0123"[..])
        };
        let c = Client::connect(&cfg).await.unwrap();
        c.send(b"\x00\x01binary").await.unwrap();
        let ids = (c.device_id(), c.session_id());
        monoio::time::sleep(Duration::from_millis(200)).await;
        c.disconnect().await;
        ids
    });
    let line = BufReader::new(stdout).lines().next().unwrap().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["device_id"], dev.to_string());
    assert_eq!(dev.to_string(), "de:ad:be:ef:00:01");
    assert_eq!(v["session_id"], sid.to_string());
    assert_eq!(v["payload"], "AAFiaW5hcnk=");
    let ts = v["timestamp"].as_str().unwrap();
    assert!(ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
}

/// `--mode log` with its stdout closed (the reader of the pipe went away): the first lines
/// fail to write, which is logged once, and the gateway goes on serving devices.
#[test]
fn log_mode_survives_a_closed_stdout() {
    let (mut child, addr, lines) = spawn(&["--mode", "log"]);
    drop(child.stdout.take()); // the pipe's only reader is gone
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || lines.for_each(|l| drop(tx.send(l.unwrap_or_default()))));
    let cfg = ClientConfig::new(addr, &b"binary-test-key-0123"[..]);
    let session = |n: usize| {
        let cfg = cfg.clone();
        usmp::block_on(async move {
            let c = Client::connect(&cfg).await.expect("the gateway still serves");
            for i in 0..n {
                c.send(format!("reading {i}").as_bytes()).await.unwrap();
            }
            monoio::time::sleep(Duration::from_millis(100)).await;
            c.disconnect().await;
        })
    };
    session(3);
    let t0 = std::time::Instant::now();
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("message log: cannot write to stdout")) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no log line about stdout: {seen:?}");
        seen.extend(rx.recv_timeout(Duration::from_millis(100)).ok());
    }
    session(100);
    assert!(child.try_wait().unwrap().is_none(), "the gateway is still running");
    let more: Vec<String> = rx.try_iter().collect();
    let again = more.iter().filter(|l| l.contains("cannot write to stdout")).count();
    assert_eq!(again, 0, "logged once: {more:?}");
}

/// `--mode log` whose stdout reader stalls: the gateway stops taking messages while the line
/// queue is full (over UDP the messages it leaves unacknowledged are counted busy and sent
/// again by the device) and loses none of them: once the reader is back, every message is a
/// line, exactly once.
#[test]
fn log_mode_holds_devices_back_while_stdout_is_slow_and_loses_nothing() {
    use common::gwproc::GatewayProc;
    use std::collections::BTreeSet;
    const N: usize = 6_000; // per device; the line queue holds 4,096 (`ops::msglog::HIGH_WATER`)
    let args =
        ["--shards", "1", "--psk", "binary-test-key-0123", "--mode", "log", "--metrics", "127.0.0.1:0"];
    let (gw, stdout) = GatewayProc::start_piped(BIN, &args);
    let addr = gw.addr;
    let devices: Vec<_> = [(usmp::Transport::Tcp, 0xa1u8), (usmp::Transport::Udp, 0xa2)]
        .into_iter()
        .map(|(transport, id)| {
            std::thread::spawn(move || {
                usmp::block_on(async move {
                    let cfg = ClientConfig {
                        transport,
                        device_id: Some([id; 6]),
                        ..ClientConfig::new(addr, &b"binary-test-key-0123"[..])
                    };
                    let c = Client::connect(&cfg).await.unwrap();
                    for i in 0..N {
                        c.send(format!("{transport:?} {i}").as_bytes()).await.unwrap();
                    }
                    c.disconnect().await;
                })
            })
        })
        .collect();
    // Nobody reads stdout yet: the pipe and then the queue fill, and the devices are held back.
    let t0 = std::time::Instant::now();
    let busy = || {
        let m = gw.http_get("/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix("usmp_dropped_total{reason=\"busy\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    while busy() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the UDP device was never held back");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The reader is back (on a thread of its own: a lost line must fail the test, not hang it).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        BufReader::new(stdout).lines().for_each(|l| drop(tx.send(l.unwrap_or_default())))
    });
    let mut seen = BTreeSet::new();
    let mut lines = 0;
    while lines < 2 * N {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) else { break };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        use base64::Engine;
        let p = base64::engine::general_purpose::STANDARD.decode(v["payload"].as_str().unwrap()).unwrap();
        seen.insert(String::from_utf8(p).unwrap());
        lines += 1;
    }
    for d in devices {
        d.join().expect("every send was taken, in the end");
    }
    assert_eq!((lines, seen.len()), (2 * N, 2 * N), "every message once");
}

/// Nobody reads the gateway's stderr any more (a stuck journal, a paused terminal): the log
/// lines of 600 sessions coming and going fill the pipe many times over, and the gateway goes
/// on serving, because its shards never write to stderr themselves.
#[test]
fn a_stderr_nobody_reads_never_holds_up_the_shards() {
    let (mut child, addr, lines) = spawn(&[]);
    // From here on the pipe (64 KiB) is never read; `lines` keeps it open.
    let cfg = ClientConfig::new(addr, &b"binary-test-key-0123"[..]);
    let t0 = std::time::Instant::now();
    usmp::block_on(async move {
        for i in 0..600u32 {
            let c = monoio::time::timeout(Duration::from_secs(5), Client::connect(&cfg))
                .await
                .unwrap_or_else(|_| panic!("session {i} was not served: the gateway is stuck"))
                .unwrap();
            c.disconnect().await;
        }
    });
    eprintln!("600 sessions in {:?} with stderr unread", t0.elapsed());
    assert!(child.try_wait().unwrap().is_none(), "the gateway is still running");
    drop(lines);
}

#[test]
fn handshake_rates_that_would_overflow_are_refused_with_a_clear_error() {
    for rate in ["1e-300", "1e300", "-1", "NaN", "inf"] {
        let flag = format!("--handshake-rate={rate}");
        let out = Command::new(BIN).args(["--psk", "0123456789abcdef", &flag]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{rate}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--handshake-rate") && !err.contains("panicked"), "{rate}: {err}");
    }
}

/// Item 11, with stderr a pipe (as under systemd or a log shipper): no line carries an ANSI
/// colour code, and "handshake failed" lines are rate-limited. A burst of 60 failed
/// handshakes gives at most 10 lines per second per shard; the rest are counted in one
/// "suppressed" line, so lines plus suppressed add up to every failure.
#[test]
fn logs_to_a_pipe_are_plain_and_handshake_failures_are_rate_limited() {
    use std::io::Write;
    let mut child = ChildGuard(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--shards", "1", "--psk", "binary-test-key-0123"])
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines() {
            let _ = tx.send(l.unwrap_or_default());
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let l = rx.recv_timeout(Duration::from_secs(10)).expect("the listening line");
        lines.push(l.clone());
        if l.contains("listening") {
            break listening_addr(&mut std::iter::once(Ok(l)));
        }
    };
    // Garbage where a HELLO should be: each connection is one failed handshake, and counts
    // toward no lockout (it named no device).
    let garbage = |n: usize| {
        let conns: Vec<_> = (0..n)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(&[0xFF; 12]).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        drop(conns);
    };
    let t0 = std::time::Instant::now();
    garbage(60);
    let burst = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1200));
    garbage(1); // the next second's first line, after which the summary comes
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    lines.extend(rx.iter());
    for l in &lines {
        assert!(!l.contains("\u{1b}["), "colour code in a piped log line: {l:?}");
    }
    let failed = lines.iter().filter(|l| l.contains("handshake failed")).count();
    let suppressed: usize = lines
        .iter()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .map(|v| v.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(failed + suppressed, 61, "every failure logged or counted: {lines:#?}");
    let windows = burst.as_secs() as usize + 2;
    assert!(failed <= 10 * windows + 1, "{failed} lines in {burst:?}");
    assert!(suppressed >= 60 - 10 * windows, "{suppressed} suppressed");
}
