//! The library's dependency list holds what the library needs: the binary's flag parser, config
//! file format and log output (clap, toml, tracing-subscriber) belong to the `usmp-gateway`
//! package at the root, so an application that depends on the `usmp` library (in `src/`)
//! builds none of them. The test reads the resolved graph, which is cheap enough to run with
//! every `cargo test`.

use std::collections::BTreeSet;
use std::process::Command;

const BINARY_ONLY: [&str; 3] = ["clap", "toml", "tracing-subscriber"];

/// Package names in the normal (non-dev, non-build) dependency graph of `package`.
fn normal_deps(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-p", package, "-e", "normal", "--prefix", "none", "-f", "{p}"])
        .args(["--locked", "--offline"])
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_binarys_dependencies_stay_out_of_the_library() {
    let binary = normal_deps("usmp-gateway");
    for dep in BINARY_ONLY {
        // Without this the test below could pass by reading the wrong graph.
        assert!(binary.contains(dep), "{dep} is expected in the binary's graph");
    }
    assert!(binary.contains("usmp"), "the binary runs the library");
    let library = normal_deps("usmp");
    assert!(library.contains("ring") && library.contains("monoio"), "{library:?}");
    for dep in BINARY_ONLY {
        assert!(!library.contains(dep), "{dep} is a dependency of the library");
    }
}
