#![allow(dead_code)]
pub mod child;
pub mod gateway_bin;
pub mod gwproc;
pub mod nats_util;
pub mod natsd;
pub mod proxy;
pub mod pyref;
pub mod raw;
pub mod raw_udp;
