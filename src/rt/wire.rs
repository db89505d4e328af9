//! Handshake-phase socket helpers: read one frame through the deframer, write bytes, draw
//! randomness. (After the handshake, [`crate::rt::tcp`] drives the socket.) The socket is the
//! poll-style stream the session keeps: registered once with the runtime's epoll, read and
//! written with non-blocking calls, as the established path does.

use std::cell::Cell;
use std::future::poll_fn;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::event::LocalEvent;
use super::Error;
use crate::proto::deframer::Deframer;
use crate::proto::ErrorKind;

/// Make `stream` the poll-style stream the handshake and the session use.
pub fn into_poll(stream: TcpStream) -> Result<TcpStreamPoll, Error> {
    stream.try_into_poll_io().map_err(|(e, _)| e.into())
}

/// A handshake's "give up now" switch (the gateway evicts the oldest handshakes under a flood).
#[derive(Default)]
pub struct Abort {
    fired: Cell<bool>,
    ev: LocalEvent,
}

impl Abort {
    /// Make the pending (or next) [`read_frame`] with this switch fail.
    pub fn fire(&self) {
        self.fired.set(true);
        self.ev.notify();
    }

    /// Whether [`Abort::fire`] was called.
    pub fn fired(&self) -> bool {
        self.fired.get()
    }
}

/// One non-blocking read into the deframer's free space: the bytes read (0 for the peer's FIN)
/// and whether that was less than there was room for. `Pending` (the waker in `cx`
/// registered) when the socket has nothing. The deframer must hold storage.
pub(crate) fn poll_read_into(
    stream: &mut TcpStreamPoll,
    d: &mut Deframer,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<(usize, bool)>> {
    let mut rb = ReadBuf::new(d.spare_mut());
    let room = rb.remaining();
    let r = std::task::ready!(Pin::new(stream).poll_read(cx, &mut rb));
    let n = rb.filled().len();
    Poll::Ready(r.map(|()| {
        d.commit(n);
        (n, n < room)
    }))
}

/// Read until the deframer yields one complete, CRC-checked frame; returns a copy of it
/// (handshake frames are small). EOF, and a fired `abort`, are `ConnectionClosed`.
pub async fn read_frame(
    stream: &mut TcpStreamPoll,
    d: &mut Deframer,
    abort: Option<&Abort>,
) -> Result<Vec<u8>, Error> {
    loop {
        if let Some(f) = d.next_frame()? {
            return Ok(f.to_vec());
        }
        let mut aborted = abort.map(|a| a.ev.wait());
        // `None`: aborted.
        let read = poll_fn(|cx| {
            if abort.is_some_and(Abort::fired) {
                return Poll::Ready(None);
            }
            if let Poll::Ready(r) = poll_read_into(stream, d, cx) {
                return Poll::Ready(Some(r));
            }
            match aborted.as_mut().map(|w| Pin::new(w).poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(None),
                _ => Poll::Pending,
            }
        })
        .await;
        match read {
            None => return Err(Error::closed("handshake evicted")),
            Some(Ok((0, _))) => return Err(Error::closed("connection closed during the handshake")),
            Some(Ok(_)) => {}
            Some(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Write all of `bytes`.
pub async fn write_all(stream: &mut TcpStreamPoll, bytes: &[u8]) -> Result<(), Error> {
    let mut off = 0;
    while off < bytes.len() {
        match poll_fn(|cx| Pin::new(&mut *stream).poll_write(cx, &bytes[off..])).await {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Fill `N` bytes from the OS RNG.
pub fn random<const N: usize>(rng: &SystemRandom) -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    rng.fill(&mut b).map_err(|_| Error::misuse(ErrorKind::Crypto, "OS randomness unavailable"))?;
    Ok(b)
}
