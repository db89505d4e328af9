//! The sans-IO USMP protocol core: no sockets, threads, clocks or OS randomness. Time arrives
//! as a `Duration` argument and randomness as bytes, so every behaviour is deterministic and
//! testable with byte vectors (see DESIGN.md, layer 1).

pub mod arq;
pub mod cookie;
pub mod crc16;
pub mod crypto;
pub mod deframer;
pub mod device;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod host;
pub mod id;
pub mod link;
pub mod lockout;
// The two-peer harness and the fixtures build keys from fixed seeds: test builds only.
#[cfg(any(test, fuzzing, feature = "test-support"))]
pub mod pair;
pub mod peer;
pub mod reassembly;
pub mod session;
#[cfg(any(test, fuzzing, feature = "test-support"))]
pub mod testing;
pub mod udp;
pub mod window;

pub use error::{Error, ErrorKind, Fault, Reaction, Result, Transport};
pub use frame::{Frame, PacketType};
pub use id::{DeviceId, ParseIdError, SessionId};
