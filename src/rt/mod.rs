//! Runtime glue shared by the gateway and the client: per-thread monoio runtimes (io_uring,
//! with a clean fallback to epoll), the monotonic clock the sans-IO core is fed from, the
//! connection driver, and small single-thread primitives.

pub mod conn;
pub mod datagram;
pub mod error;
pub mod event;
pub(crate) mod fd;
mod outcome;
pub mod tcp;
pub mod udp;
pub mod wire;

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use error::Error;

/// Entries of each shard's io_uring submission queue.
pub const URING_ENTRIES: u32 = 4096;

/// Monotonic time since the process's first call, the `now` the protocol core expects.
/// One origin for every thread, so shards can exchange times (lockout events).
pub fn now() -> Duration {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed()
}

/// Let every other ready task of the thread run once before the caller continues (long
/// loops over many sessions or datagrams call this between chunks).
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Which I/O driver a runtime ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Driver {
    /// io_uring.
    IoUring,
    /// epoll (kernels without io_uring, or io_uring disabled).
    Legacy,
}

/// Run `fut` to completion on a new single-thread monoio runtime on this thread: io_uring
/// where the kernel offers it, epoll otherwise (`USMP_FORCE_EPOLL=1` forces the fallback).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    run(fut).0
}

/// Like [`block_on`], also reporting the driver used.
pub fn run<F: Future>(fut: F) -> (F::Output, Driver) {
    let force_legacy = std::env::var_os("USMP_FORCE_EPOLL").is_some_and(|v| v == "1");
    run_with(if force_legacy { Driver::Legacy } else { Driver::IoUring }, fut)
}

/// Run `fut` on `preferred` (io_uring falls back to epoll when the kernel refuses it).
pub fn run_with<F: Future>(preferred: Driver, fut: F) -> (F::Output, Driver) {
    if preferred == Driver::IoUring {
        if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build()
        {
            return (rt.block_on(fut), Driver::IoUring);
        }
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("cannot build an epoll runtime");
    (rt.block_on(fut), Driver::Legacy)
}

/// Runs a future and turns a panic inside it into `Err(())`, so a panicking session handler
/// ends its own session instead of the shard's runtime (and every other session on it).
pub struct CatchUnwind<F: Future>(std::pin::Pin<Box<F>>);

impl<F: Future> CatchUnwind<F> {
    /// Wrap `fut`.
    pub fn new(fut: F) -> Self {
        CatchUnwind(Box::pin(fut))
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}
