//! The HTTP server under the metrics and admin endpoints: hyper (HTTP/1.1) serving an axum
//! router on one small dedicated thread with its own tokio runtime, beside the shards and
//! never on the frame path. Route handlers are async, so they can await the shards' answers
//! (and, later, a message bus).
//!
//! Abuse it survives:
//! - **a deadline for the whole request** ([`REQUEST_DEADLINE`]: reading it, handling it,
//!   writing the answer), not per read: a client that drips one byte a second is cut off,
//!   and slow clients cost a small task each, not a thread;
//! - one request per connection, at most [`MAX_CONNECTIONS`] at once (more are closed at
//!   once, counted by nobody but never queued);
//! - hyper's header parser (linear, at most [`MAX_HEADER`] bytes and 100 headers), real
//!   reason phrases, `Transfer-Encoding: chunked` bodies decoded (not read as empty), bodies
//!   over [`MAX_BODY`] refused with 413.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

/// Largest body read; bigger requests get 413.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head (request line and headers).
pub const MAX_HEADER: usize = 16 * 1024;
/// The whole request (head, body, handling, answer) must be done within this.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 1024;

/// A running server; stops accepting and ends its thread when dropped.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Bind `addr` and serve `router` on a thread of its own (`usmp-admin`). Each request's
    /// extensions carry the client's address as `ConnectInfo<SocketAddr>`.
    pub fn start(addr: SocketAddr, router: axum::Router) -> std::io::Result<HttpServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new().name("usmp-admin".into()).spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => accept_loop(l, router, stopped).await,
                    Err(e) => tracing::error!(error = %e, "cannot register the admin listener"),
                }
            });
        })?;
        Ok(HttpServer { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait for the next readiness, not a spin.
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(MAX_HEADER)
                .serve_connection(TokioIo::new(stream), svc);
            // The whole request, whatever the client does: dropping the connection closes it.
            let _ = tokio::time::timeout(REQUEST_DEADLINE, conn).await;
        });
    }
}
