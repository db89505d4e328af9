//! The library's dependency list holds what the library needs: the binary's flag parser, config
//! file format and log output (clap, toml, tracing-subscriber) come only with the `cli` feature,
//! so an application that embeds `usmp` with `default-features = false` builds none of them.
//! (.ci/run also compiles the library that way: this test reads the resolved graph, which is
//! cheap enough to run with every `cargo test`.)

use std::collections::BTreeSet;
use std::process::Command;

const BINARY_ONLY: [&str; 3] = ["clap", "toml", "tracing-subscriber"];

/// Package names in the normal (non-dev, non-build) dependency graph of this package.
fn normal_deps(extra: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-p", "usmp-gateway", "-e", "normal", "--prefix", "none", "-f", "{p}"])
        .args(["--locked", "--offline"])
        .args(extra)
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
    let with_cli = normal_deps(&[]);
    for dep in BINARY_ONLY {
        // Without this the test below could pass by reading the wrong graph.
        assert!(with_cli.contains(dep), "{dep} is expected with the default `cli` feature");
    }
    let lib_only = normal_deps(&["--no-default-features"]);
    assert!(lib_only.contains("ring") && lib_only.contains("monoio"), "{lib_only:?}");
    for dep in BINARY_ONLY {
        assert!(!lib_only.contains(dep), "{dep} is a dependency of the library without `cli`");
    }
}
