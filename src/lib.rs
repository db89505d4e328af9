//! USMP gateway library: the sans-IO protocol core ([`proto`]) and, on top of it, the
//! thread-per-core io_uring runtime (gateway server and client).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod fuzzing;
pub mod gateway;
pub mod nats;
pub mod ops;
pub mod proto;
pub mod psk;
pub mod rt;
