#![allow(dead_code)]
pub mod pyref;
pub mod raw;
