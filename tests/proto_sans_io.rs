//! Keeps layer 1 honest (DESIGN.md): `src/proto/` must not reach for the runtime, sockets,
//! threads, the clock or OS randomness. Time and randomness are arguments.

use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "monoio",
    "socket2",
    "core_affinity",
    "std::net",
    "std::thread",
    "std::time::Instant",
    "SystemTime",
    "Instant::now",
    "SystemRandom",
    "OsRng",
    "getrandom",
    "std::fs",
    "std::process",
    "tracing",
    "parking_lot",
];

#[test]
fn proto_has_no_io_imports() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proto");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (no, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for f in FORBIDDEN {
                assert!(
                    !code.contains(f),
                    "{}:{}: `{}` is forbidden in the sans-IO core: {}",
                    path.display(),
                    no + 1,
                    f,
                    line.trim()
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 8, "expected the proto modules, found {checked}");
}
