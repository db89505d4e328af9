//! The application's view of one session (the reference's `USMPSession`), handed to the
//! handler on the shard that owns it.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::proto::{DeviceId, SessionId, Transport};
use crate::rt::conn::{CloseReason, Conn};
use crate::rt::Error;

/// One established session. Not `Send`: it lives on its shard's thread.
#[derive(Clone)]
pub struct Session {
    pub(crate) conn: Rc<Conn>,
    pub(crate) shard: usize,
    pub(crate) transport: Transport,
}

impl Session {
    /// The device (`Display`: colon hex, `00:11:22:33:44:55`).
    pub fn device_id(&self) -> DeviceId {
        DeviceId::new(self.conn.device_id())
    }
    /// Device id bytes, for maps inside the crate (the API gives [`Session::device_id`]).
    pub(crate) fn device_id_bytes(&self) -> [u8; 6] {
        self.conn.device_id()
    }
    /// The session (`Display`: 32 lowercase hex characters).
    pub fn session_id(&self) -> SessionId {
        SessionId::new(self.conn.session_id())
    }
    /// Session id bytes, for maps inside the crate (the API gives [`Session::session_id`]).
    pub(crate) fn session_id_bytes(&self) -> [u8; 16] {
        self.conn.session_id()
    }
    /// The device's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.conn.peer()
    }
    /// TCP or UDP (the only way the application can tell them apart).
    pub fn transport(&self) -> Transport {
        self.transport
    }
    /// The shard (thread) running this session.
    pub fn shard(&self) -> usize {
        self.shard
    }
    /// Send one message (0..=1808 bytes).
    pub async fn send(&self, msg: &[u8]) -> Result<(), Error> {
        self.conn.send(msg).await
    }
    /// Queue one message without waiting: for [`crate::gateway::GatewayBuilder::serve_messages`]
    /// hooks, which cannot await. Refused (`TimeoutError`) while far more is queued than the
    /// device takes in; `NotConnectedError` once the session is closing.
    pub fn try_send(&self, msg: &[u8]) -> Result<(), Error> {
        self.conn.try_send(msg)
    }
    /// Next message from the device; `ConnectionClosedError` once the session ended. Sessions
    /// of an inline-message gateway ([`crate::gateway::GatewayBuilder::serve_messages`]) never
    /// queue messages for this.
    pub async fn recv(&self) -> Result<Vec<u8>, Error> {
        self.conn.recv().await
    }
    /// [`Session::recv`] with a deadline (`TimeoutError`; the session goes on).
    pub async fn recv_timeout(&self, d: Duration) -> Result<Vec<u8>, Error> {
        self.conn.recv_timeout(d).await
    }
    /// Send a PING.
    pub fn ping(&self) -> Result<(), Error> {
        self.conn.ping()
    }
    /// Rotate the session keys in band (REKEY as initiator).
    pub fn rekey(&self) -> Result<(), Error> {
        self.conn.rekey()
    }
    /// Say BYE and close without waiting (from a message hook); see [`Session::bye`].
    pub fn close(&self) {
        self.conn.close(CloseReason::LocalBye, true);
    }
    /// Say BYE and close; returns once the socket is closed.
    pub async fn bye(&self) {
        self.conn.close(CloseReason::LocalBye, true);
        self.conn.closed().await;
    }
    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.conn.close_reason()
    }
    /// Close with `reason`, saying BYE (from an application on the shard: a takeover, a
    /// revoked key).
    pub fn close_with(&self, reason: CloseReason) {
        self.conn.close(reason, true);
    }
    /// Send an acknowledgement an [`Ack::Held`](crate::gateway::app::Ack) kept back (UDP; the
    /// bytes [`ShardApp::on_ack_held`](crate::gateway::app::ShardApp::on_ack_held) received),
    /// and let input that waited for it go on.
    pub fn release_ack(&self, utack: &[u8]) {
        self.conn.send_held_ack(utack);
        self.conn.resume_input();
    }
    /// Input blocked by the application may go on (TCP resumes reading).
    pub fn resume_input(&self) {
        self.conn.resume_input();
    }
    /// Bytes of output queued since the session began: a message sent when this became `n`
    /// is delivered once [`Session::bytes_gone`] reaches `n`.
    pub fn bytes_queued(&self) -> u64 {
        self.conn.bytes_queued()
    }
    /// Bytes of output delivered since the session began: TCP, written to the socket; UDP,
    /// acknowledged by the device.
    pub fn bytes_gone(&self) -> u64 {
        self.conn.bytes_gone()
    }
    /// The same session (the same connection), not just the same device.
    pub fn same_as(&self, other: &Session) -> bool {
        Rc::ptr_eq(&self.conn, &other.conn)
    }
}
