//! Applications that need more than a message hook: session up/down, acknowledgements held
//! until a message is stored downstream, delivery receipts for downlinks, and a task of their
//! own on every shard. The NATS bridge is one; an embedding application can be another.
//!
//! Everything here runs on the shard's thread, inline, like
//! [`GatewayBuilder::serve_messages`](super::GatewayBuilder::serve_messages): no task or
//! queue per session.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use super::session::Session;
use crate::proto::DeviceId;
use crate::rt::conn::{CloseReason, Conn, MessageHook};
use crate::rt::event::LocalEvent;

pub use crate::rt::conn::Ack;

/// Makes the per-shard half of an application, once per shard, on the shard's thread.
pub trait App: Send + Sync + 'static {
    /// The application's state for shard `shard` (called before the shard takes traffic).
    fn on_shard(&self, shard: usize) -> Rc<dyn ShardApp>;
}

/// The per-shard half of an application. Every method runs inline on the shard's thread and
/// must not block.
pub trait ShardApp {
    /// A session is established (after SESSION_OK).
    fn on_open(&self, _session: &Session) {}
    /// One complete message from the device. Return [`Ack::Held`] to keep the device's
    /// acknowledgement back until [`Session::release_ack`].
    fn on_message(&self, session: &Session, msg: &[u8]) -> Ack;
    /// UDP: the acknowledgement an [`Ack::Held`] kept back; hand it to
    /// [`Session::release_ack`] to send it.
    fn on_ack_held(&self, _session: &Session, _utack: &[u8]) {}
    /// Whether the session's input must wait (too many held acknowledgements): TCP stops
    /// reading, UDP leaves new messages unacknowledged for the device to retransmit.
    fn input_blocked(&self, _session: &Session) -> bool {
        false
    }
    /// Output of the session left its queue (see [`Session::bytes_gone`]).
    fn on_output_progress(&self, _session: &Session) {}
    /// The session ended.
    fn on_close(&self, _session: &Session, _reason: CloseReason) {}
    /// The application's task on this shard, started once the shard runs and awaited at
    /// shutdown (it should return soon after [`ShardContext::stopped`] completes).
    fn run(self: Rc<Self>, _shard: ShardContext) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async {})
    }
}

/// What a [`ShardApp`]'s task can reach on its shard.
#[derive(Clone)]
pub struct ShardContext {
    pub(super) shard: Rc<dyn ShardAccess>,
}

/// What a [`ShardContext`] needs of its shard. A trait, so that this file does not depend on
/// the shard's state, which depends on it (the state holds the shard's [`ShardApp`]).
pub(super) trait ShardAccess {
    /// The shard's index.
    fn index(&self) -> usize;
    /// The live session of `device_id` on this shard, if any.
    fn session(&self, device_id: &[u8; 6]) -> Option<Session>;
    /// Whether the gateway is shutting down.
    fn is_stopping(&self) -> bool;
    /// Notified when shutdown begins.
    fn stopping(&self) -> &LocalEvent;
}

impl ShardContext {
    /// This shard's index.
    pub fn index(&self) -> usize {
        self.shard.index()
    }

    /// The live session of `device_id` on this shard, if any.
    pub fn session(&self, device_id: DeviceId) -> Option<Session> {
        self.shard.session(device_id.as_bytes())
    }

    /// Completes once the gateway is shutting down.
    pub async fn stopped(&self) {
        while !self.shard.is_stopping() {
            let stop = self.shard.stopping().wait();
            if self.shard.is_stopping() {
                break;
            }
            stop.await;
        }
    }
}

/// Adapts a [`ShardApp`] to the connection layer's hook.
pub(super) struct AppHook {
    pub(super) app: Rc<dyn ShardApp>,
    pub(super) shard: usize,
}

impl AppHook {
    fn session(&self, conn: &Rc<Conn>) -> Session {
        Session { conn: conn.clone(), shard: self.shard, transport: conn.transport() }
    }
}

impl MessageHook for AppHook {
    fn on_message(&self, conn: &Rc<Conn>, msg: &[u8]) -> Ack {
        let s = self.session(conn);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.app.on_message(&s, msg))) {
            Ok(ack) => ack,
            Err(_) => {
                tracing::error!(device = %s.device_id(), "message handler panicked");
                conn.close(CloseReason::HandlerDone, true);
                Ack::Now
            }
        }
    }

    fn on_ack_held(&self, conn: &Rc<Conn>, utack: &[u8]) {
        self.app.on_ack_held(&self.session(conn), utack);
    }

    fn input_blocked(&self, conn: &Conn) -> bool {
        // Called on every read decision: build the session view only from a live handle.
        match conn.weak().upgrade() {
            Some(c) => self.app.input_blocked(&self.session(&c)),
            None => false,
        }
    }

    fn on_output_progress(&self, conn: &Rc<Conn>) {
        self.app.on_output_progress(&self.session(conn));
    }
}
