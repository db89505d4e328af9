//! The TCP driver of an established connection: one future per connection waits for
//! readiness (the runtime's edge-triggered epoll, registered once per connection: no
//! buffer held while idle, no poll re-armed per message), reads into a buffer the thread
//! lends only while a frame is incomplete, opens frames in place through [`Conn::on_frame`],
//! and sends queued output without waiting.
//!
//! The stream is monoio's poll-style `TcpStreamPoll` (feature `poll-io`): under io_uring the
//! runtime keeps one epoll, polled through the ring once per wake-up of the whole thread, and
//! each connection is registered with it once. Waiting with `TcpStream::readable` instead arms
//! a one-shot io_uring poll for every message of every connection: bench/floor measured that
//! at 1.5 x the server CPU per saturated TCP echo.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use tokio::io::AsyncWrite;

use super::conn::{CloseReason, Conn, FrameOutcome};
use crate::proto::deframer::Deframer;
use crate::proto::host::partly_written_after;
use crate::proto::session::MAX_SEALED_MESSAGE_LEN;

/// Read storage lent to this thread's TCP connections: a connection holds a buffer only
/// while one of its frames is incomplete, so an idle connection costs no read buffer.
const READ_BUF_LEN: usize = 2048;
/// Spare read buffers a thread keeps (one is enough unless frames are left incomplete).
const READ_BUFS_KEPT: usize = 64;

thread_local! {
    static READ_BUFS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn lend_read_buf(d: &mut Deframer) {
    if !d.has_storage() {
        let buf = READ_BUFS.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0; READ_BUF_LEN]);
        d.install_storage(buf);
    }
}

fn return_read_buf(d: &mut Deframer) {
    if let Some(buf) = d.release_storage() {
        if buf.len() == READ_BUF_LEN {
            READ_BUFS.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < READ_BUFS_KEPT {
                    p.push(buf);
                }
            });
        }
    }
}

/// What woke [`drive`].
enum Woke {
    /// The first read after a wait: see [`read_some`].
    Read(std::io::Result<(usize, bool)>),
    /// Output left, the socket no longer full (or failed).
    Wrote(std::io::Result<()>),
    Event,
}

/// Run a connection until it closes, as one future with no buffer of its own while idle: it
/// waits for readiness (the runtime's epoll, not a read holding a buffer), then reads what is
/// there into a lent buffer and opens the frames in place; queued output is sent at once
/// without waiting, and only a full socket buffer waits for writability. Returns once the
/// socket is closed; [`Conn::close_reason`] says why.
pub fn drive(conn: Rc<Conn>, stream: TcpStreamPoll, deframer: Deframer) -> impl Future<Output = ()> {
    drive_then(conn, stream, deframer, |_| {})
}

/// [`drive`], then `then(&conn)` in the same future (the gateway unregisters the session there).
/// Written as a function returning an `async move` block that uses its captures in place:
/// an `async fn` would keep a second copy of its arguments, and this future is held for a
/// connection's whole life, so every byte of it is per-connection memory.
// Not an `async fn` on purpose (see above); the size test below holds it to that.
#[allow(clippy::manual_async_fn)]
pub fn drive_then<F: FnOnce(&Rc<Conn>)>(
    conn: Rc<Conn>,
    mut stream: TcpStreamPoll,
    mut deframer: Deframer,
    then: F,
) -> impl Future<Output = ()> {
    async move {
        let mut quiet = Context::from_waker(Waker::noop());
        // Frames that arrived together with the last handshake frame.
        let mut reading = drain_frames(&conn, &mut deframer);
        return_read_buf(&mut deframer);
        let mut stalled = conn.input_blocked() && deframer.buffered() > 0;
        let mut write_blocked = false;
        let mut reset = false;
        loop {
            if !write_blocked {
                // A quiet waker: if the socket is full, the wait below polls again and
                // registers the task's own.
                match flush(&conn, &mut stream, &mut quiet) {
                    Ok(blocked) => write_blocked = blocked,
                    Err(_) => {
                        conn.close(CloseReason::Io, false);
                        break;
                    }
                }
            }
            if conn.closing.get().is_some() {
                if !write_blocked {
                    break; // the last frames (BYE) are out
                }
                if conn.abandoned() {
                    // Aborted: the peer takes nothing. Reset instead of waiting for room.
                    let _ = socket2::SockRef::from(&super::fd::borrow(&stream))
                        .set_linger(Some(std::time::Duration::ZERO));
                    reset = true;
                    break;
                }
                reading = false;
            }
            // Backpressure: an application that does not read, or an inline hook whose replies
            // do not leave, pauses reading (PINGs wait too, which is what TCP would do anyway).
            let read_now = reading && !conn.input_blocked();
            if read_now && stalled {
                // Frames left buffered while input was blocked: take them before waiting for
                // more bytes, which may never come.
                reading = drain_frames(&conn, &mut deframer);
                return_read_buf(&mut deframer);
                stalled = conn.input_blocked() && deframer.buffered() > 0;
                continue;
            }
            // Created after every check above: nothing can notify in between on this thread.
            let mut event = conn.ev.wait();
            let (st, df, cn) = (&mut stream, &mut deframer, &conn);
            let woke = std::future::poll_fn(move |cx| {
                if read_now {
                    if let Poll::Ready(r) = read_some(st, df, cx) {
                        return Poll::Ready(Woke::Read(r));
                    }
                }
                if write_blocked {
                    match flush(cn, st, cx) {
                        Ok(true) => {} // still full; this task's waker is registered
                        Ok(false) => return Poll::Ready(Woke::Wrote(Ok(()))),
                        Err(e) => return Poll::Ready(Woke::Wrote(Err(e))),
                    }
                }
                Pin::new(&mut event).poll(cx).map(|()| Woke::Event)
            })
            .await;
            match woke {
                Woke::Event => {}
                Woke::Wrote(r) => {
                    write_blocked = false;
                    if r.is_err() {
                        conn.close(CloseReason::Io, false);
                        break;
                    }
                }
                Woke::Read(r) => {
                    reading = on_read(&conn, &mut stream, &mut deframer, &mut quiet, r);
                    stalled = conn.input_blocked() && deframer.buffered() > 0;
                }
            }
        }
        if conn.closing.get().is_none() {
            conn.close(CloseReason::PeerClosed, false);
        }
        if !reset {
            // The FIN now, not when the descriptor is finally closed.
            let _ = socket2::SockRef::from(&super::fd::borrow(&stream)).shutdown(std::net::Shutdown::Write);
        }
        return_read_buf(&mut deframer);
        conn.set_done();
        then(&conn);
    }
}

/// [`super::wire::poll_read_into`] a lent buffer, returned when nothing came (or the read
/// failed) so that an idle connection holds none.
fn read_some(
    stream: &mut TcpStreamPoll,
    deframer: &mut Deframer,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<(usize, bool)>> {
    lend_read_buf(deframer);
    let r = super::wire::poll_read_into(stream, deframer, cx);
    if !matches!(r, Poll::Ready(Ok(_))) {
        return_read_buf(deframer);
    }
    r
}

/// The socket had something: handle the first read's result, its frames, and whatever else is
/// there. False once the connection must read no more (closed by the peer, an error, a BYE).
fn on_read(
    conn: &Conn,
    stream: &mut TcpStreamPoll,
    deframer: &mut Deframer,
    quiet: &mut Context<'_>,
    first: std::io::Result<(usize, bool)>,
) -> bool {
    let mut r = Poll::Ready(first);
    let more = loop {
        let (n, short) = match r {
            Poll::Pending => break true,
            Poll::Ready(Ok((0, _))) => {
                if conn.closing.get().is_none() {
                    conn.close(CloseReason::PeerClosed, false);
                }
                break false;
            }
            Poll::Ready(Ok(read)) => read,
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => (0, false),
            Poll::Ready(Err(_)) => {
                if conn.closing.get().is_none() {
                    conn.close(CloseReason::Io, false);
                }
                break false;
            }
        };
        if n > 0 && !drain_frames(conn, deframer) {
            break false;
        }
        // A short read drained the socket: the next wait asks again (a non-blocking read that
        // finds nothing and re-arms, as an edge-triggered server does). Stop early under
        // backpressure.
        if short || conn.input_blocked() {
            break true;
        }
        r = read_some(stream, deframer, quiet);
    };
    return_read_buf(deframer);
    more
}

/// Send the queued bytes without waiting. `Ok(true)` if the socket's buffer is full and
/// bytes are left for when it is writable (the waker in `cx` is then registered).
fn flush(conn: &Conn, stream: &mut TcpStreamPoll, cx: &mut Context<'_>) -> std::io::Result<bool> {
    let mut out = conn.out.borrow_mut();
    let mut off = 0;
    let mut result = Ok(false);
    while off < out.len() {
        // monoio sends with MSG_NOSIGNAL: no SIGPIPE for a peer that left, which an embedding
        // application may not ignore.
        match Pin::new(&mut *stream).poll_write(cx, &out[off..]) {
            Poll::Ready(Ok(0)) => {
                result = Err(std::io::ErrorKind::WriteZero.into());
                break;
            }
            Poll::Ready(Ok(n)) => off += n,
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Poll::Ready(Err(e)) => {
                result = Err(e);
                break;
            }
            Poll::Pending => {
                result = Ok(true);
                break;
            }
        }
    }
    conn.note_out_progress(super::now(), off > 0, off < out.len());
    if off > 0 {
        // Where the first frame not yet begun starts (a REKEY from the peer re-seals from there).
        let rest = partly_written_after(&out, usize::from(conn.head_rest.get()), off);
        conn.head_rest.set(u16::try_from(rest).unwrap_or(0));
        out.drain(..off);
        if out.capacity() > 4 * MAX_SEALED_MESSAGE_LEN && out.len() <= MAX_SEALED_MESSAGE_LEN {
            out.shrink_to(MAX_SEALED_MESSAGE_LEN);
        }
        drop(out);
        conn.ev.notify(); // room for senders and a paused reader
        conn.output_progressed();
    }
    result
}

fn drain_frames(conn: &Conn, deframer: &mut Deframer) -> bool {
    // The frames of one read arrived together.
    let t = super::now();
    loop {
        // An application holding acknowledgements bounds what it has taken in per frame, not
        // per read: the frames left buffered wait for `resume_input`.
        if conn.input_blocked() && deframer.buffered() > 0 {
            return true;
        }
        match deframer.next_frame() {
            Ok(Some(frame)) => match conn.on_frame(frame, t) {
                FrameOutcome::Accepted | FrameOutcome::AcceptedHeld | FrameOutcome::Rejected(_) => {}
                FrameOutcome::AcceptedAndClosed | FrameOutcome::Closed => return false,
            },
            Ok(None) => return true,
            Err(e) => {
                conn.close(CloseReason::Protocol(e.kind()), false);
                return false;
            }
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    fn returned_size<A, B, C, D, R>(_: fn(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// An idle TCP connection is this state, a monoio task around the driver (48 bytes of
    /// header and trailer) and nothing else: 320 bytes is its allocator size class (the next
    /// is 384, where it was while it held a pending io_uring poll). The gateway's `then` holds
    /// one `Rc`, as a function pointer does.
    #[test]
    fn tcp_driver_task_fits_320_bytes() {
        let future = returned_size(drive_then::<fn(&Rc<Conn>)>);
        assert!(future + 48 <= 320, "the driver future is {future} bytes");
    }
}
