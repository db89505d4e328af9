//! The `usmp-gateway` binary as a child process: started with arguments, its address taken
//! from the "listening" log line, every stderr line (from the first) forwarded to a channel.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_usmp-gateway");

pub fn start_binary(
    args: &[&str],
) -> (super::child::ChildGuard, SocketAddr, std::sync::mpsc::Receiver<String>) {
    start_binary_with_env(args, &[])
}

/// [`start_binary`] with these environment variables set for the child.
pub fn start_binary_with_env(
    args: &[&str],
    env: &[(&str, &str)],
) -> (super::child::ChildGuard, SocketAddr, std::sync::mpsc::Receiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "info").stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = super::child::ChildGuard(cmd.spawn().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let plain: String = line.chars().filter(|c| !c.is_control()).collect();
        let _ = tx.send(line);
        if plain.contains("usmp-gateway listening") {
            let rest = &plain[plain.find("address").unwrap()..];
            let start = rest.find("127.0.0.1").unwrap();
            let a: String =
                rest[start..].chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
            addr = Some(a.parse().unwrap());
            break;
        }
    }
    std::thread::spawn(move || {
        for l in lines {
            let _ = tx.send(l.unwrap_or_default());
        }
    });
    (child, addr.expect("listening line"), rx)
}

pub fn wait_log(rx: &std::sync::mpsc::Receiver<String>, needle: &str) {
    wait_log_keeping(rx, needle, &mut Vec::new());
}

/// [`wait_log`], keeping every line read on the way (the needle's included) in `seen`.
pub fn wait_log_keeping(rx: &std::sync::mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            let found = l.contains(needle);
            seen.push(l);
            if found {
                return;
            }
        }
    }
    panic!("no log line with {needle:?}");
}
