#![allow(dead_code)]
pub mod pyref;
