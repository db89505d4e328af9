//! The state every task of the NATS bridge shares (its context), in a file of its own: the
//! bridge's tasks, the downlink router and the key watcher all use it, and it uses none of
//! them.

use super::FastMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use async_nats::jetstream::{self, kv, stream};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::config::NatsConfig;
use super::link::{Delivery, NatsStats, ToShard};
use crate::gateway::GatewayHandle;

/// A device's queue being drained here.
#[derive(Default)]
pub(super) struct Drain {
    /// A nudge asked for another look before the drain ends.
    pub(super) again: bool,
    /// Downlink requests that came meanwhile, in order: handed to the device once the queue
    /// is out (kept here, not in JetStream: a device's ordinary traffic must not take the
    /// queue's much longer way just because it has just connected).
    pub(super) held: std::collections::VecDeque<(Option<async_nats::Subject>, bytes::Bytes)>,
}

/// A session of this gateway as the bridge tracks it.
pub(super) struct LocalSession {
    pub(super) session: [u8; 16],
    pub(super) shard: usize,
    /// Serves the device's route subject while the session lives.
    pub(super) route: tokio::task::JoinHandle<()>,
}

/// Who waits for the outcome of a downlink handed to a shard.
pub(super) enum Waiter {
    /// A task (the admin API, a route request, a queue drain).
    Task(oneshot::Sender<Delivery>),
    /// A downlink request for a device held here, answered by the uplink dispatcher when the
    /// shard reports (no task, channel or timer per downlink: see
    /// [`super::downlink::serve_requests`]).
    Request {
        /// Where the answer goes.
        reply: Option<async_nats::Subject>,
        device: [u8; 6],
        /// Kept to route the message elsewhere should the session end first.
        payload: bytes::Bytes,
        since: std::time::Instant,
    },
}

/// Everything the bridge's tasks share.
pub(super) struct Ctx {
    pub(super) cfg: NatsConfig,
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    pub(super) stats: Arc<NatsStats>,
    pub(super) shards: Vec<ToShard>,
    pub(super) gateway: OnceLock<GatewayHandle>,
    pub(super) deliveries: Mutex<FastMap<u64, Waiter>>,
    pub(super) next_delivery: AtomicU64,
    /// Uplinks the dispatcher took and JetStream has not yet acknowledged (what a clean
    /// shutdown waits for: the shards may be gone by then, so it cannot be their count).
    pub(super) unsettled: AtomicU64,
    /// Disconnect events and presence clean-ups under way (a clean shutdown waits for them).
    pub(super) farewells: AtomicU64,
    pub(super) local: Mutex<FastMap<[u8; 6], LocalSession>>,
    /// Steps of the start done (streams provisioned, downlink requests served): see
    /// [`super::NatsBridge::wait_ready`].
    pub(super) ready: tokio::sync::watch::Sender<u8>,
    /// Devices whose queue is being drained here, with the requests held until it is out.
    pub(super) draining: Mutex<FastMap<[u8; 6], Drain>>,
    pub(super) presence: tokio::sync::OnceCell<kv::Store>,
    pub(super) down_stream: tokio::sync::OnceCell<stream::Stream>,
}
