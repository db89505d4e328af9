//! USMP gateway library: the sans-IO protocol core ([`proto`]) and, on top of it, the
//! thread-per-core io_uring runtime (gateway server and client).
//!
//! Everything an application needs is at the crate root:
//!
//! ```no_run
//! use usmp::{DeviceId, Gateway, PskSource};
//!
//! let gw = Gateway::builder()
//!     .psk(PskSource::single(b"a-key-of-16-bytes-or-more")?)
//!     .serve_messages(|session, msg| {
//!         let _ = session.try_send(msg);
//!     })?;
//! let device: DeviceId = "00:11:22:33:44:55".parse()?;
//! let _ = gw.handle().send_to(device, b"hello");
//! gw.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
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
// The runtime glue is an implementation detail of the gateway and the client; what of it an
// application touches (the error, the close reason, running a client) is re-exported below.
pub(crate) mod rt;

pub use client::{Client, ClientConfig};
pub use gateway::{Gateway, GatewayBuilder, GatewayHandle, Session, Transports};
pub use proto::{DeviceId, ErrorKind, ParseIdError, SessionId, Transport};
pub use psk::{ConfigError, PskSource};
pub use rt::conn::CloseReason;
pub use rt::event::LocalEvent;
pub use rt::{block_on, Driver, Error};
