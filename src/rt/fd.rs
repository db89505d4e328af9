//! The library's one `unsafe` block. monoio's TCP streams expose their descriptor only as a
//! raw integer (no `AsFd`), and the connection driver does its non-blocking reads and writes
//! on it with socket2's safe calls between readiness polls; this borrows it for them.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use monoio::net::TcpStream;

/// The stream's descriptor, borrowed for as long as the stream is.
pub(crate) fn borrow(stream: &TcpStream) -> BorrowedFd<'_> {
    // SAFETY: `stream` owns an open descriptor and closes it only when dropped, which the
    // returned lifetime (that of `&stream`) rules out while the borrow lives.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}
