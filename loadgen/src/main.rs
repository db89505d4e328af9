fn main() {
    eprintln!("loadgen: coming with its own issue");
    std::process::exit(2);
}
