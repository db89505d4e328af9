#[test]
fn dbg2() {
    let f = std::env::var("F").unwrap();
    let d = std::fs::read(&f).unwrap();
    println!("{:?}", usmp::fuzzing::run("udp_path", &d));
}
