//! Keeps the layers one-directional (DESIGN.md): proto ← psk ← rt ← gateway/client ← nats ←
//! ops ← bin. A module may name itself and the layers below it, never one above: a file of
//! `src/rt/` that reached for `crate::gateway` would make the runtime depend on the server
//! built on it. Inside a module, the files form a chain too: no two files (or longer loops of
//! them) use each other, so each can be read, tested and split knowing only what it uses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module and what it may use besides itself.
const ALLOWED: &[(&str, &[&str])] = &[
    ("proto", &[]),
    ("psk", &["proto"]),
    ("fuzzing", &["proto", "rt"]),
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

/// Source text without `//` comments (doc comments name other files freely).
fn strip_comments(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The first identifier of each item of a `{a, b::c, d as e}` group starting at `group`.
fn group_heads(group: &str) -> Vec<String> {
    let (mut depth, mut heads, mut at_item) = (0usize, Vec::new(), true);
    for (i, c) in group.char_indices() {
        match c {
            '{' => {
                depth += 1;
                at_item = depth == 1;
                continue;
            }
            '}' if depth == 1 => break,
            '}' => depth -= 1,
            ',' if depth == 1 => at_item = true,
            _ if at_item && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                heads.push(ident_at(&group[i..]));
                at_item = false;
            }
            _ => {}
        }
    }
    heads
}

fn ident_at(s: &str) -> String {
    s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

/// The sibling files a file of module `module` names: `super::x`, `super::{x, y::z}` and
/// `crate::module::x`, where `x` is one of `siblings`.
fn sibling_refs(text: &str, module: &str, siblings: &BTreeSet<String>) -> BTreeSet<String> {
    let code = strip_comments(text);
    let mut refs = BTreeSet::new();
    let own = format!("crate::{module}::");
    for prefix in ["super::", own.as_str()] {
        let mut rest = code.as_str();
        while let Some(i) = rest.find(prefix) {
            // `xsuper::` or `my_crate::m::` is another path.
            let before = rest[..i].chars().next_back();
            let tail = &rest[i + prefix.len()..];
            rest = tail;
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let names = if tail.starts_with('{') { group_heads(tail) } else { vec![ident_at(tail)] };
            refs.extend(names.into_iter().filter(|n| siblings.contains(n)));
        }
    }
    refs
}

/// A cycle in `graph` (node → the nodes it uses), as the path around it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn files_of_a_module_import_each_other_in_one_direction() {
    // Each directory module's files, without its `mod.rs`: the module's root declares its
    // files and holds what they share, so its children naming it is how a module is built.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut cycles = Vec::new();
    let mut edges = 0;
    for dir in std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()) {
        let module = dir.file_name().unwrap().to_str().unwrap().to_string();
        let files: BTreeMap<String, PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("rs"))
            .map(|p| (p.file_stem().unwrap().to_str().unwrap().to_string(), p))
            .filter(|(name, _)| name != "mod")
            .collect();
        let siblings: BTreeSet<String> = files.keys().cloned().collect();
        let graph: BTreeMap<String, BTreeSet<String>> = files
            .iter()
            .map(|(name, path)| {
                let mut refs = sibling_refs(&std::fs::read_to_string(path).unwrap(), &module, &siblings);
                refs.remove(name);
                edges += refs.len();
                (name.clone(), refs)
            })
            .collect();
        if let Some(c) = find_cycle(&graph) {
            cycles.push(format!("src/{module}/: {}", c.join(" → ")));
        }
    }
    assert!(cycles.is_empty(), "files importing each other in a loop:\n{}", cycles.join("\n"));
    assert!(edges >= 20, "expected the modules' files to use each other, found {edges} edges");
}

#[test]
fn the_cycle_finder_sees_a_loop_and_only_a_loop() {
    let siblings: BTreeSet<String> = ["conn", "udp", "tcp", "event"].map(String::from).into();
    // Paths, groups and `crate::rt::` paths count; comments and other crates' paths do not.
    let refs = sibling_refs(
        "use super::{event::LocalEvent, udp};\nuse crate::rt::tcp::drive; // super::conn\n\
         use my_crate::rt::conn;",
        "rt",
        &siblings,
    );
    assert_eq!(refs, BTreeSet::from(["event", "tcp", "udp"].map(String::from)));
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    // A diamond is not a loop; conn → udp → event → conn is.
    assert_eq!(
        find_cycle(&graph(&[("conn", "udp"), ("conn", "tcp"), ("udp", "event"), ("tcp", "event")])),
        None
    );
    let c = find_cycle(&graph(&[("conn", "udp"), ("udp", "event"), ("event", "conn"), ("tcp", "conn")]));
    assert_eq!(c, Some(["conn", "udp", "event", "conn"].map(String::from).to_vec()));
    assert!(find_cycle(&graph(&[("conn", "udp"), ("udp", "conn")])).is_some());
}
