//! `tuning/check` against fake hosts: a `/proc` tree built under the temp dir from
//! `tuning/sysctl.d/60-usmp-gateway.conf` itself (so the script and the conf cannot drift
//! apart), limits passed through the script's environment overrides. Run with `bash` so the
//! test does not depend on the executable bit.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const NOFILE: &str = "1048576";

fn tuning_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning")
}

/// `(name, value)` of every sysctl the conf file sets, in file order; a leading `-` (ignore
/// errors) is dropped, the value keeps its inner spaces.
fn conf_sysctls() -> Vec<(String, String)> {
    let path = tuning_dir().join("sysctl.d/60-usmp-gateway.conf");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = vec![];
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not `key = value`: {line}"));
        let k = k.trim().trim_start_matches('-').to_string();
        let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(!v.is_empty(), "empty value for {k}");
        out.push((k, v));
    }
    assert!(out.len() >= 10, "the conf sets only {} sysctls", out.len());
    out
}

/// A fake `/proc` with unique name, removed on drop.
struct FakeProc {
    root: PathBuf,
}

impl FakeProc {
    /// Every sysctl of the conf at exactly its recommended value, a 6.1 kernel with io_uring
    /// enabled, no processes (so no irqbalance).
    fn recommended() -> FakeProc {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let root = std::env::temp_dir().join(format!(
            "usmp-tuning-check-{}-{}-{}",
            std::process::id(),
            nanos,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&root).unwrap();
        let p = FakeProc { root };
        for (k, v) in conf_sysctls() {
            p.set(&k, &v);
        }
        p.set("kernel.osrelease", "6.1.0-test");
        p.set("kernel.io_uring_disabled", "0");
        p
    }

    fn sysctl_path(&self, name: &str) -> PathBuf {
        self.root.join("sys").join(name.replace('.', "/"))
    }

    fn set(&self, name: &str, value: &str) {
        let path = self.sysctl_path(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        // The kernel separates fields with tabs and ends with a newline.
        fs::write(path, format!("{}\n", value.split(' ').collect::<Vec<_>>().join("\t"))).unwrap();
    }

    fn write(&self, rel: &str, content: &str) {
        let path = self.root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    /// Every file under the root with its content, to prove the script changed nothing.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.insert(p.clone(), fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.root, &mut out);
        out
    }

    /// Run `bash tuning/check ARGS` against this tree with the given limits.
    fn run(&self, args: &[&str], soft: &str, hard: &str, memlock: &str) -> Run {
        let before = self.snapshot();
        let out = Command::new("bash")
            .arg(tuning_dir().join("check"))
            .args(args)
            .env("USMP_PROC_ROOT", &self.root)
            .env("USMP_NOFILE_SOFT", soft)
            .env("USMP_NOFILE_HARD", hard)
            .env("USMP_MEMLOCK", memlock)
            .env_remove("USMP_FORCE_EPOLL")
            .output()
            .expect("cannot run bash");
        assert_eq!(before, self.snapshot(), "tuning/check modified the proc tree");
        Run::from(out)
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8(o.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(o.stderr).expect("stderr is UTF-8"),
        }
    }
}

impl Run {
    fn lines(&self, kind: &str) -> Vec<&str> {
        let prefix = format!("{kind} ");
        self.stdout.lines().filter(|l| l.starts_with(&prefix)).collect()
    }

    /// The setting named by each line of `kind` (the word after `LOW`/`OK`).
    fn names(&self, kind: &str) -> Vec<String> {
        self.lines(kind).iter().map(|l| l.split(' ').nth(1).unwrap_or("").to_string()).collect()
    }

    fn line_for(&self, kind: &str, name: &str) -> &str {
        let prefix = format!("{kind} {name} ");
        self.stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{kind} {name}` line in:\n{}", self.dump()))
    }

    fn dump(&self) -> String {
        format!("exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// How the script shows a conf value: ranges as `lo-hi`.
fn shown(name: &str, value: &str) -> String {
    if name == "net.ipv4.ip_local_port_range" {
        value.replace(' ', "-")
    } else {
        value.to_string()
    }
}

#[test]
fn a_host_at_the_recommendations_passes() {
    let host = FakeProc::recommended();
    let r = host.run(&[], NOFILE, NOFILE, "unlimited");
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.lines("LOW").is_empty(), "{}", r.dump());
    assert!(r.lines("OK").is_empty(), "OK lines only with --verbose\n{}", r.dump());

    // --verbose: one OK line per sysctl of the conf, recommending exactly the conf's value.
    let r = host.run(&["--verbose"], NOFILE, NOFILE, "unlimited");
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.lines("LOW").is_empty(), "{}", r.dump());
    for (name, value) in conf_sysctls() {
        let line = r.line_for("OK", &name);
        let want = format!(" recommended={}", shown(&name, &value));
        assert!(line.contains(&want), "`{line}` should contain `{want}`");
        let cur = format!(" current={}", shown(&name, &value));
        assert!(line.contains(&cur), "`{line}` should contain `{cur}`");
    }
    for name in ["nofile.soft", "nofile.hard", "memlock", "kernel", "kernel.io_uring_disabled"] {
        r.line_for("OK", name);
    }

    // Above the recommendations (a maximum below it) is fine too, including 64-bit values.
    host.set("fs.file-max", "9223372036854775807");
    host.set("fs.nr_open", "1073741816");
    host.set("net.core.somaxconn", "65535");
    host.set("net.ipv4.tcp_fin_timeout", "10");
    host.set("net.ipv4.ip_local_port_range", "1024 65535");
    let r = host.run(&[], "unlimited", "unlimited", "unlimited");
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.lines("LOW").is_empty(), "{}", r.dump());
}

#[test]
fn a_short_host_names_exactly_its_short_settings() {
    let host = FakeProc::recommended();
    host.set("net.core.somaxconn", "128");
    // 1000 ports: the recommended range is much wider (its size counts, not its bounds).
    host.set("net.ipv4.ip_local_port_range", "40000 40999");
    let r = host.run(&[], "1024", NOFILE, "unlimited");
    assert_eq!(r.code, Some(1), "{}", r.dump());
    let mut names = r.names("LOW");
    names.sort();
    assert_eq!(names, ["net.core.somaxconn", "net.ipv4.ip_local_port_range", "nofile.soft"], "{}", r.dump());
    let conf: BTreeMap<_, _> = conf_sysctls().into_iter().collect();
    for (name, current, fix) in [
        (
            "net.core.somaxconn",
            "128".to_string(),
            format!("sysctl -w net.core.somaxconn={}", conf["net.core.somaxconn"]),
        ),
        (
            "net.ipv4.ip_local_port_range",
            "40000-40999".to_string(),
            format!("sysctl -w net.ipv4.ip_local_port_range=\"{}\"", conf["net.ipv4.ip_local_port_range"]),
        ),
        ("nofile.soft", "1024".to_string(), format!("ulimit -Sn {NOFILE}")),
    ] {
        let line = r.line_for("LOW", name);
        assert!(line.contains(&format!(" current={current} ")), "{line}");
        let (_, cmd) = line.split_once(" fix: ").unwrap_or_else(|| panic!("no fix: {line}"));
        assert!(cmd.contains(&fix), "`{line}` should fix with `{fix}`");
    }

    // A range as wide as the recommended one passes wherever it sits.
    host.set("net.core.somaxconn", "4096");
    host.set("net.ipv4.ip_local_port_range", "1 55536");
    let r = host.run(&[], "1024", NOFILE, "unlimited");
    assert_eq!(r.names("LOW"), ["nofile.soft"], "{}", r.dump());
    // Each direction of comparison can fail: a maximum, an exact value, a hard limit.
    host.set("net.ipv4.tcp_fin_timeout", "60");
    host.set("net.ipv4.tcp_tw_reuse", "2");
    let r = host.run(&[], "1024", "4096", "unlimited");
    let mut names = r.names("LOW");
    names.sort();
    assert_eq!(
        names,
        ["net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_tw_reuse", "nofile.hard", "nofile.soft"],
        "{}",
        r.dump()
    );
    assert_eq!(r.code, Some(1));
    // `ulimit -Sn` cannot go above the hard limit: the fix must raise both.
    assert!(
        r.line_for("LOW", "nofile.soft").contains(&format!("--nofile={NOFILE}:{NOFILE}")),
        "{}",
        r.dump()
    );
}

#[test]
fn an_old_kernel_needs_memlock_and_a_disabled_io_uring_is_reported() {
    let host = FakeProc::recommended();
    host.set("kernel.osrelease", "5.10.0-28-amd64");
    host.set("kernel.io_uring_disabled", "2");
    let r = host.run(&[], NOFILE, NOFILE, "64");
    assert_eq!(r.code, Some(1), "{}", r.dump());
    let mut names = r.names("LOW");
    names.sort();
    assert_eq!(names, ["kernel", "kernel.io_uring_disabled", "memlock"], "{}", r.dump());
    assert!(r
        .line_for("LOW", "kernel.io_uring_disabled")
        .contains("fix: sudo sysctl -w kernel.io_uring_disabled=0"));

    // A new kernel does not charge rings to memlock: 64 KiB is then fine.
    host.set("kernel.osrelease", "6.8.0");
    host.set("kernel.io_uring_disabled", "0");
    let r = host.run(&[], NOFILE, NOFILE, "64");
    assert_eq!(r.code, Some(0), "{}", r.dump());
}

#[test]
fn irqbalance_with_planned_cores_is_informational() {
    let host = FakeProc::recommended();
    host.write("4242/comm", "irqbalance\n");
    host.write("irq/30/smp_affinity_list", "2-3\n");
    host.write("irq/31/smp_affinity_list", "0\n");
    let r = host.run(&["--cpus", "2-5"], NOFILE, NOFILE, "unlimited");
    assert_eq!(r.code, Some(0), "informational only\n{}", r.dump());
    let info: Vec<_> = r.lines("INFO");
    assert!(info.iter().any(|l| l.contains("irqbalance") && l.contains("4242")), "{}", r.dump());
    assert!(info.iter().any(|l| l.contains("1 IRQs") && l.contains("irq 30")), "{}", r.dump());
    // Without planned cores a running irqbalance is not worth a line.
    let r = host.run(&[], NOFILE, NOFILE, "unlimited");
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(!r.stdout.contains("irqbalance"), "{}", r.dump());
}

#[test]
fn help_exits_0() {
    let host = FakeProc::recommended();
    for flag in ["--help", "-h"] {
        let r = host.run(&[flag], "1024", "1024", "64");
        assert_eq!(r.code, Some(0), "{}", r.dump());
        assert!(r.stdout.contains("Usage: tuning/check"), "{}", r.dump());
        assert!(r.lines("LOW").is_empty(), "--help checks nothing\n{}", r.dump());
    }
    let script = fs::read_to_string(tuning_dir().join("check")).unwrap();
    assert!(script.starts_with("#!/usr/bin/env bash\n"), "shebang");
    assert!(script.lines().any(|l| l.trim() == "set -u"), "set -u");
}

#[test]
fn bad_usage_exits_2() {
    let host = FakeProc::recommended();
    for args in [&["--frobnicate"][..], &["extra"], &["--cpus"], &["--cpus", "5-2"], &["--cpus", "x"]] {
        let r = host.run(args, NOFILE, NOFILE, "unlimited");
        assert_eq!(r.code, Some(2), "{args:?}\n{}", r.dump());
        assert!(r.lines("LOW").is_empty() && r.lines("OK").is_empty(), "{args:?}\n{}", r.dump());
        // The script's own message (bash's exit 2 for a syntax error does not count).
        assert!(r.stderr.starts_with("check: "), "{args:?}: say why on stderr\n{}", r.dump());
    }
    // A proc root without `sys/` is a mistake, not a healthy host.
    let missing = host.root.join("does-not-exist");
    let r = Run::from(
        Command::new("bash")
            .arg(tuning_dir().join("check"))
            .env("USMP_PROC_ROOT", &missing)
            .env("USMP_NOFILE_SOFT", NOFILE)
            .env("USMP_NOFILE_HARD", NOFILE)
            .env("USMP_MEMLOCK", "unlimited")
            .output()
            .expect("cannot run bash"),
    );
    assert_eq!(r.code, Some(2), "{}", r.dump());
    assert!(r.stderr.starts_with("check: "), "{}", r.dump());
}
