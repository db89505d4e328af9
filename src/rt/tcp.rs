//! The TCP driver of an established connection: one future per connection waits for
//! readiness (an io_uring poll, not a pending read that owns a buffer), reads into a buffer
//! the thread lends only while a frame is incomplete, opens frames in place through
//! [`Conn::on_frame`], and sends queued output without waiting.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::task::Poll;

use monoio::net::TcpStream;

use super::conn::{CloseReason, Conn, FrameOutcome};
use crate::proto::deframer::Deframer;
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
    Readable(std::io::Result<()>),
    Writable(std::io::Result<()>),
    Event,
}

/// Run a connection until it closes, as one future with no buffer of its own while idle: it
/// waits for readiness (an io_uring poll, not a read holding a buffer), then reads what is
/// there into a lent buffer and opens the frames in place; queued output is sent at once
/// without waiting, and only a full socket buffer waits for writability. Returns once the
/// socket is closed; [`Conn::close_reason`] says why.
pub fn drive(conn: Rc<Conn>, stream: TcpStream, deframer: Deframer) -> impl Future<Output = ()> {
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
    stream: TcpStream,
    mut deframer: Deframer,
    then: F,
) -> impl Future<Output = ()> {
    async move {
        let fd = super::fd::borrow(&stream);
        let sock = socket2::SockRef::from(&fd);
        // Reads and writes below are non-blocking calls made after a readiness poll (the handshake
        // before used io_uring reads, which a blocking descriptor suits).
        if sock.set_nonblocking(true).is_err() {
            conn.close(CloseReason::Io, false);
        }
        // Kept across wake-ups: re-arming a poll for every event would cost a cancel and a submit.
        let mut readable = std::pin::pin!(Some(stream.readable(false)));
        // Boxed, and only while a full socket buffer makes us wait: a rare state.
        let mut writable: Option<std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + '_>>> = None;
        // Frames that arrived together with the last handshake frame.
        let mut reading = drain_frames(&conn, &mut deframer);
        return_read_buf(&mut deframer);
        let mut stalled = conn.input_blocked() && deframer.buffered() > 0;
        let mut write_blocked = false;
        let mut reset = false;
        loop {
            if !write_blocked {
                match flush(&conn, &sock) {
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
                if conn.abandon.get() {
                    // Aborted: the peer takes nothing. Reset instead of waiting for room.
                    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
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
            if read_now && readable.is_none() {
                readable.set(Some(stream.readable(false)));
            }
            if write_blocked && writable.is_none() {
                writable = Some(Box::pin(stream.writable(false)));
            }
            // Created after every check above: nothing can notify in between on this thread.
            let mut event = conn.ev.wait();
            let (rd, wr) = (&mut readable, &mut writable);
            let woke = std::future::poll_fn(move |cx| {
                if read_now {
                    if let Some(Poll::Ready(r)) = rd.as_mut().as_pin_mut().map(|f| f.poll(cx)) {
                        return Poll::Ready(Woke::Readable(r));
                    }
                }
                if write_blocked {
                    if let Some(Poll::Ready(r)) = wr.as_mut().map(|f| f.as_mut().poll(cx)) {
                        return Poll::Ready(Woke::Writable(r));
                    }
                }
                std::pin::Pin::new(&mut event).poll(cx).map(|()| Woke::Event)
            })
            .await;
            match woke {
                Woke::Event => {}
                Woke::Writable(r) => {
                    writable = None;
                    write_blocked = false;
                    if r.is_err() {
                        conn.close(CloseReason::Io, false);
                        break;
                    }
                }
                Woke::Readable(r) => {
                    readable.set(None);
                    reading = r.is_ok() && read_ready(&conn, &sock, &mut deframer);
                    stalled = conn.input_blocked() && deframer.buffered() > 0;
                    if r.is_err() && conn.closing.get().is_none() {
                        conn.close(CloseReason::Io, false);
                    }
                }
            }
        }
        // Cancel the polls; they hold the descriptor until the kernel confirms, so the peer gets
        // our FIN now from the half-close rather than whenever the descriptor is finally closed.
        readable.set(None);
        drop(writable);
        if conn.closing.get().is_none() {
            conn.close(CloseReason::PeerClosed, false);
        }
        if !reset {
            let _ = sock.shutdown(std::net::Shutdown::Write);
        }
        return_read_buf(&mut deframer);
        conn.set_done();
        then(&conn);
    }
}

/// The socket is readable: read what is there and handle its frames. False once the
/// connection must read no more (closed by the peer, an error, a BYE).
fn read_ready(conn: &Conn, sock: &socket2::Socket, deframer: &mut Deframer) -> bool {
    lend_read_buf(deframer);
    let more = loop {
        let spare = deframer.spare_mut();
        let want = spare.len();
        let n = match std::io::Read::read(&mut &*sock, spare) {
            Ok(0) => {
                if conn.closing.get().is_none() {
                    conn.close(CloseReason::PeerClosed, false);
                }
                break false;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                if conn.closing.get().is_none() {
                    conn.close(CloseReason::Io, false);
                }
                break false;
            }
        };
        deframer.commit(n);
        if !drain_frames(conn, deframer) {
            break false;
        }
        // A short read drained the socket (the next poll says if more came); stop early
        // under backpressure.
        if n < want || conn.input_blocked() {
            break true;
        }
    };
    return_read_buf(deframer);
    more
}

/// Send the queued bytes without waiting. `Ok(true)` if the socket's buffer is full and
/// bytes are left for when it is writable.
fn flush(conn: &Conn, sock: &socket2::Socket) -> std::io::Result<bool> {
    let mut out = conn.out.borrow_mut();
    let mut off = 0;
    let mut result = Ok(false);
    while off < out.len() {
        // No SIGPIPE for a peer that left: an embedding application may not ignore it.
        let e = match sock.send_with_flags(&out[off..], libc::MSG_NOSIGNAL) {
            Ok(n) => {
                off += n;
                continue;
            }
            Err(e) => e,
        };
        match e.kind() {
            std::io::ErrorKind::WouldBlock => {
                result = Ok(true);
                break;
            }
            std::io::ErrorKind::Interrupted => {}
            _ => {
                result = Err(e);
                break;
            }
        }
    }
    conn.note_out_progress(super::now(), off > 0, off < out.len());
    if off > 0 {
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
    loop {
        // An application holding acknowledgements bounds what it has taken in per frame, not
        // per read: the frames left buffered wait for `resume_input`.
        if conn.input_blocked() && deframer.buffered() > 0 {
            return true;
        }
        match deframer.next_frame() {
            Ok(Some(frame)) => match conn.on_frame(frame) {
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
    /// header and trailer) and nothing else: 384 bytes is its allocator size class (the next
    /// is 448). The gateway's `then` holds one `Rc`, as a function pointer does.
    #[test]
    fn tcp_driver_task_fits_384_bytes() {
        let future = returned_size(drive_then::<fn(&Rc<Conn>)>);
        assert!(future + 48 <= 384, "the driver future is {future} bytes");
    }
}
