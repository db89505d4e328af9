//! Replays the seed corpora of the fuzz targets (`tests/fuzz/corpus/<target>/`) through the
//! invariant-checking helpers libFuzzer runs (`usmp::fuzzing`), so that a regression shows in
//! `cargo test` without libFuzzer. Files named `ok-…` must also reach their promised outcome
//! (a frame, a session, a message).
//!
//! `USMP_WRITE_SEEDS=1 cargo test --test fuzz_replay` first rewrites this implementation's
//! seeds (`*ours*` files) from `usmp::fuzzing::seeds()`; the reference package's seeds
//! (`*ref*` files) come from `tests/fuzz/seeds.py`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use usmp::fuzzing::{run, seeds, Report, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus").join(target)
}

fn files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn write_seeds() {
    for t in TARGETS {
        std::fs::create_dir_all(corpus_dir(t)).expect("corpus directory");
        for f in files(t) {
            if f.file_name().is_some_and(|n| n.to_string_lossy().contains("ours")) {
                std::fs::remove_file(&f).expect("remove old seed");
            }
        }
    }
    for s in seeds() {
        std::fs::write(corpus_dir(s.target).join(&s.name), &s.data).expect("write seed");
    }
}

/// The outcome an `ok-` seed promises, if it is missing.
fn broken_promise(target: &str, name: &str, r: &Report) -> Option<String> {
    let kept = match target {
        _ if !name.starts_with("ok-") => true,
        "deframe" => r.frames > 0 && r.errors == 0,
        "handshake" => r.established > 0,
        "session" => r.messages > 0,
        _ => r.established > 0 && r.messages > 0,
    };
    (!kept).then(|| format!("{target}/{name}: promised outcome missing ({r:?})"))
}

#[test]
fn corpora_replay_without_invariant_failures() {
    if std::env::var_os("USMP_WRITE_SEEDS").is_some() {
        write_seeds();
    }
    let mut failures = Vec::new();
    for t in TARGETS {
        let files = files(t);
        assert!(!files.is_empty(), "the corpus of {t} is empty");
        for f in files {
            let name = f.file_name().expect("file name").to_string_lossy().into_owned();
            let data = std::fs::read(&f).expect("read seed");
            match catch_unwind(AssertUnwindSafe(|| run(t, &data))) {
                Ok(r) => failures.extend(broken_promise(t, &name, &r)),
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                    failures.push(format!("{t}/{name}: invariant broken: {}", msg.unwrap_or_default()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} corpus file(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn seeds_of_this_implementation_are_committed() {
    if std::env::var_os("USMP_WRITE_SEEDS").is_some() {
        return; // the other test is rewriting them
    }
    for s in seeds() {
        let path = corpus_dir(s.target).join(&s.name);
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == s.data,
            "{} is missing or stale: run `USMP_WRITE_SEEDS=1 cargo test --test fuzz_replay`",
            path.display()
        );
    }
}
