//! USMP gateway library: the sans-IO protocol core ([`proto`]) and, on top of it, the
//! thread-per-core io_uring runtime (gateway server and client).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
// Drives the core with fixed keys: only for cargo-fuzz (`--cfg fuzzing`) and the test suite.
#[cfg(any(fuzzing, feature = "test-support"))]
pub mod fuzzing;
pub mod gateway;
pub mod nats;
pub mod ops;
pub mod proto;
pub mod psk;
pub mod rt;
