//! Provisions the reference SDK (`usmp==1.2.2`) in a venv under the target directory, once,
//! safely across concurrent test binaries (an exclusive `flock` plus a marker file).

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const PACKAGE: &str = "usmp==1.2.2";

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Path of the venv's python, creating the venv and installing the package on first use.
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = target_dir().join("pyref-venv");
        let py = venv.join("bin/python");
        let marker = venv.join(".installed-usmp-1.2.2");
        fs::create_dir_all(target_dir()).unwrap();
        let lock = File::create(target_dir().join("pyref-venv.lock")).unwrap();
        // SAFETY: flock on a file descriptor we own for the duration of the call.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "cannot lock the venv");
        if !marker.exists() {
            let _ = fs::remove_dir_all(&venv);
            let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(&python3).args(["-m", "venv"]).arg(&venv), "python3 -m venv");
            run(
                Command::new(&py).args([
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "-q",
                    PACKAGE,
                ]),
                "pip install usmp==1.2.2",
            );
            fs::write(&marker, PACKAGE).unwrap();
        }
        // SAFETY: as above.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_UN) };
        py
    })
    .clone()
}

/// Absolute path of `tests/pyref/<name>`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyref").join(name)
}

/// The JSON vectors emitted by `gen_vectors.py` (run once per test binary).
pub fn gen_vectors() -> &'static serde_json::Value {
    static V: OnceLock<serde_json::Value> = OnceLock::new();
    V.get_or_init(|| {
        let out = Command::new(python()).arg(script("gen_vectors.py")).output().expect("run gen_vectors.py");
        assert!(out.status.success(), "gen_vectors.py failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("gen_vectors.py output is JSON")
    })
}
