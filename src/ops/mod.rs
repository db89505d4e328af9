//! Operations: the HTTP listener for Prometheus metrics, health and the admin API
//! (downlink, broadcast, kick, key reload). Off the frame path entirely.

pub mod admin;
pub mod http;
pub mod metrics;
pub mod msglog;
pub mod settings;

pub use admin::{serve, OpsOptions};
