//! The library's one `unsafe` block. monoio's TCP streams expose their descriptor only as a
//! raw integer (no `AsFd`), and the gateway sets socket options on it (user timeout, linger,
//! half-close) with socket2's safe calls; this borrows it for them.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;

/// A stream type that owns its descriptor and closes it only when dropped.
pub(crate) trait OwnsFd: AsRawFd {}
impl OwnsFd for TcpStream {}
impl OwnsFd for TcpStreamPoll {}

/// The stream's descriptor, borrowed for as long as the stream is.
pub(crate) fn borrow<S: OwnsFd>(stream: &S) -> BorrowedFd<'_> {
    // SAFETY: `stream` owns an open descriptor and closes it only when dropped (`OwnsFd`),
    // which the returned lifetime (that of `&stream`) rules out while the borrow lives.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}
