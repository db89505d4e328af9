//! Keeps the layers one-directional (DESIGN.md): proto ← psk ← rt ← gateway/client ← nats ←
//! ops ← bin. A module may name itself and the layers below it, never one above: a file of
//! `src/rt/` that reached for `crate::gateway` would make the runtime depend on the server
//! built on it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module and what it may use besides itself.
const ALLOWED: &[(&str, &[&str])] = &[
    ("proto", &[]),
    ("psk", &["proto"]),
    ("fuzzing", &["proto"]),
    ("rt", &["proto", "psk"]),
    ("gateway", &["proto", "psk", "rt"]),
    ("client", &["proto", "psk", "rt"]),
    ("nats", &["proto", "psk", "rt", "gateway"]),
    ("ops", &["proto", "psk", "rt", "gateway", "client", "nats"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a source text names through `crate::…` (comments excluded).
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let name: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                refs.insert(name);
            }
            rest = tail;
        }
    }
    refs
}

/// The top-level module a file belongs to (`src/rt/conn.rs` → `rt`, `src/psk.rs` → `psk`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

#[test]
fn layers_only_use_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let known: BTreeSet<&str> = ALLOWED.iter().map(|(m, _)| *m).collect();
    let mut checked = 0;
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else { continue };
        if module == "lib" || module == "bin" {
            continue; // the crate root and the binary sit on top of everything
        }
        let allowed = ALLOWED
            .iter()
            .find(|(m, _)| *m == module)
            .unwrap_or_else(|| panic!("{}: module `{module}` has no place in ALLOWED", file.display()))
            .1;
        for r in crate_refs(&std::fs::read_to_string(file).unwrap()) {
            if r != module && known.contains(r.as_str()) && !allowed.contains(&r.as_str()) {
                violations
                    .push(format!("{}: `{module}` uses `crate::{r}`, a layer above it", file.display()));
            }
        }
        checked += 1;
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    assert!(checked >= 40, "expected the library's files, found {checked}");
}

#[test]
fn the_check_sees_an_upward_import() {
    // The scanner itself: a `crate::gateway` path in runtime code is found, comments are not.
    let refs =
        crate_refs("use crate::gateway::Shard; // crate::ops in a comment\nlet x = crate::proto::frame::X;");
    assert_eq!(refs, BTreeSet::from(["gateway".to_string(), "proto".to_string()]));
}
