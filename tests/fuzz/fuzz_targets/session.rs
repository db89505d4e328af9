//! cargo-fuzz target: see `usmp::fuzzing::session` for the input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    usmp::fuzzing::session(data);
});
