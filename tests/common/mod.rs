#![allow(dead_code)]
pub mod child;
pub mod proxy;
pub mod pyref;
pub mod raw;
pub mod raw_udp;
