#[test]
fn dbg() {
    for t in usmp::fuzzing::TARGETS {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus").join(t);
        let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        for f in v {
            let d = std::fs::read(&f).unwrap();
            let t0 = std::time::Instant::now();
            let r = usmp::fuzzing::run(t, &d);
            println!("{t}/{} {:?} {:?}", f.file_name().unwrap().to_string_lossy(), r, t0.elapsed());
        }
    }
}
