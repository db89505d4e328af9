//! The `usmp-gateway` binary as a child process: started on a free port with JSON logs,
//! its address read from the "listening" line, its log lines kept for assertions.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::child::ChildGuard;

/// A running gateway process.
pub struct GatewayProc {
    /// The process (killed on drop).
    pub child: ChildGuard,
    /// Where it listens (TCP and UDP).
    pub addr: SocketAddr,
    /// Its stderr lines so far.
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl GatewayProc {
    /// Start `usmp-gateway` with `args` plus `--listen 127.0.0.1:0 --log-format json`.
    pub fn start(bin: &str, args: &[&str]) -> GatewayProc {
        Self::start_with(bin, args, Stdio::null())
    }

    /// [`GatewayProc::start`] with its stdout a pipe, returned for the caller to read (or not).
    #[allow(dead_code)] // not every test binary that includes `common` reads stdout
    pub fn start_piped(bin: &str, args: &[&str]) -> (GatewayProc, std::process::ChildStdout) {
        let mut g = Self::start_with(bin, args, Stdio::piped());
        let out = g.child.stdout.take().expect("piped stdout");
        (g, out)
    }

    fn start_with(bin: &str, args: &[&str], stdout: Stdio) -> GatewayProc {
        let mut child = ChildGuard(
            Command::new(bin)
                .args(args)
                .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let keep = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("usmp-gateway listening") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if let Some(a) = v["address"].as_str() {
                        let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                    }
                }
                keep.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => panic!("gateway did not start: {:?}", logs.lock().unwrap()),
        };
        GatewayProc { child, addr, logs }
    }

    /// Wait up to `d` for a log line containing every one of `needles`.
    pub fn wait_log(&self, needles: &[&str], d: Duration) -> Option<String> {
        let end = Instant::now() + d;
        loop {
            if let Some(l) =
                self.logs.lock().unwrap().iter().find(|l| needles.iter().all(|n| l.contains(n))).cloned()
            {
                return Some(l);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on the metrics/admin listener (started with `--metrics 127.0.0.1:0`).
    pub fn http_get(&self, path: &str) -> String {
        self.http("GET", path, b"")
    }

    /// `method path` with `body` on the metrics/admin listener; the whole response.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> String {
        use std::io::{Read, Write};
        let line = self
            .wait_log(&["metrics and admin API listening"], Duration::from_secs(5))
            .expect("metrics listener");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr: SocketAddr = v["address"].as_str().unwrap().parse().unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let n = body.len();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Kill it with SIGKILL (a crash: nothing is flushed).
    pub fn kill9(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    /// SIGTERM, then wait for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: signalling a child process we spawned and have not reaped.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGTERM) };
        self.child.0.wait().ok().and_then(|s| s.code())
    }
}
