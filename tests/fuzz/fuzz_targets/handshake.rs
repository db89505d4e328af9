//! cargo-fuzz target: see `usmp::fuzzing::handshake` for the input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    usmp::fuzzing::handshake(data);
});
