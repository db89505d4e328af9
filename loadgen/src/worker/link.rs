//! What a device's traffic runs over, so the echo and handshake schedules serve the protocol
//! modes and the raw modes alike.

use std::time::Duration;

use monoio::time::Instant;
use usmp::Client;

use super::{reconnect, Ctx};
use crate::raw::RawLink;

/// How an error is counted: `io:Kind`, or the protocol's error class.
pub(super) fn error_kind(e: &usmp::Error) -> String {
    match e {
        usmp::Error::Io(io) => format!("io:{:?}", io.kind()),
        other => other.kind().class_name().to_string(),
    }
}

/// What a device's messages travel over: a USMP session, or a bare connection (raw modes).
pub(super) trait Link: Sized + 'static {
    /// Send one message; the error is counted under the returned kind.
    async fn send_msg(&self, m: &[u8]) -> Result<(), String>;
    /// The next message (`None`: the session is gone, or the deadline passed).
    async fn recv_msg(&self, deadline: Option<Duration>) -> Option<Vec<u8>>;
    fn gone(&self) -> bool;
    /// Messages may vanish (bare UDP: nothing retransmits): a missing echo is lost, not late.
    fn lossy(&self) -> bool;
    /// Say goodbye and close.
    async fn end(&self);
    /// A new session after losing this one (`--reconnect`).
    async fn reconnect(ctx: &Ctx, idx: u64, pos: usize, until: Instant) -> Option<Self>;
}

impl Link for Client {
    async fn send_msg(&self, m: &[u8]) -> Result<(), String> {
        self.send(m).await.map_err(|e| error_kind(&e))
    }
    async fn recv_msg(&self, deadline: Option<Duration>) -> Option<Vec<u8>> {
        match deadline {
            Some(d) => self.recv_timeout(d).await.ok(),
            None => self.recv().await.ok(),
        }
    }
    fn gone(&self) -> bool {
        self.close_reason().is_some()
    }
    fn lossy(&self) -> bool {
        false
    }
    async fn end(&self) {
        self.bye().await
    }
    async fn reconnect(ctx: &Ctx, idx: u64, pos: usize, until: Instant) -> Option<Self> {
        reconnect(ctx, idx, pos, until).await
    }
}

impl Link for RawLink {
    async fn send_msg(&self, m: &[u8]) -> Result<(), String> {
        self.send(m).await.map_err(|e| format!("io:{:?}", e.kind()))
    }
    async fn recv_msg(&self, deadline: Option<Duration>) -> Option<Vec<u8>> {
        self.recv(deadline).await
    }
    fn gone(&self) -> bool {
        self.is_closed()
    }
    fn lossy(&self) -> bool {
        matches!(self, RawLink::Udp { .. })
    }
    async fn end(&self) {
        self.close().await
    }
    async fn reconnect(_: &Ctx, _: u64, _: usize, _: Instant) -> Option<Self> {
        None // refused with the raw modes
    }
}
