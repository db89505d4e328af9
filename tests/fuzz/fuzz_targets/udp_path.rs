//! cargo-fuzz target: see `usmp::fuzzing::udp_path` for the input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    usmp::fuzzing::udp_path(data);
});
