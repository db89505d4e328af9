//! The northbound NATS bridge (`--mode nats`): device messages stored durably in JetStream
//! (`P.up.<device>` in stream `USMP_UP`), downlinks by request/reply on `P.down.<device>`
//! with an offline queue in stream `USMP_DOWN`, session events on `P.evt.<device>.*`,
//! presence in KV bucket `USMP_PRESENCE`, fleet keys from a KV bucket, and takeover of a
//! device that connects to another gateway of the fleet.
//!
//! The official client (`async-nats`) runs on a tokio runtime of the bridge's own thread(s);
//! shards hand it work through channels and never block on it (see [`link`]).
//!
//! ```no_run
//! use usmp::nats::{NatsBridge, NatsConfig};
//! use usmp::{Gateway, PskSource};
//!
//! let cfg = NatsConfig { urls: vec!["nats://127.0.0.1:4222".into()], ..NatsConfig::default() };
//! let bridge = NatsBridge::start(cfg, 2).unwrap();
//! let gw = Gateway::builder()
//!     .shards(2)
//!     .psk(PskSource::single(b"a-key-of-16-bytes-or-more").unwrap())
//!     .serve_app(bridge.app())
//!     .unwrap();
//! bridge.attach(gw.handle());
//! gw.wait();
//! bridge.shutdown(std::time::Duration::from_secs(5));
//! ```

/// The bridge's per-message maps (keys are its own tokens, session ids it drew and device
/// ids): foldhash with a per-process random seed, a fraction of SipHash's cost on these keys.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

mod bridge;
pub mod config;
mod ctx;
mod downlink;
mod keys;
pub mod link;
mod shard;
mod uplink;

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

pub use bridge::{DOWN_STREAM, PRESENCE_BUCKET, UP_STREAM};
pub use config::NatsConfig;
pub use downlink::Reply;
pub use keys::DEFAULT_KEY;
pub use link::NatsStats;

use crate::gateway::app::{App, ShardApp};
use crate::gateway::GatewayHandle;
use crate::psk::Registry;
use link::{Down, Up};

/// A running bridge: its thread, the channels to the shards, and its counters.
pub struct NatsBridge {
    ctx: Arc<ctx::Ctx>,
    up: flume::Sender<Vec<Up>>,
    downs: Vec<flume::Receiver<Vec<Down>>>,
    runtime: tokio::runtime::Handle,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    keys_loaded: tokio::sync::watch::Receiver<bool>,
    keys_tx: Mutex<Option<tokio::sync::watch::Sender<bool>>>,
}

/// The shards' side of the bridge, for [`crate::gateway::GatewayBuilder::serve_app`].
pub struct NatsApp {
    up: flume::Sender<Vec<Up>>,
    downs: Vec<flume::Receiver<Vec<Down>>>,
    stats: Arc<NatsStats>,
    max_unacked: u32,
    prefix: String,
    linger: Duration,
}

impl App for NatsApp {
    fn on_shard(&self, shard: usize) -> Rc<dyn ShardApp> {
        let down = self.downs.get(shard).cloned().unwrap_or_else(|| flume::unbounded().1);
        Rc::new(shard::NatsShard::new(
            shard,
            self.up.clone(),
            down,
            self.stats.clone(),
            self.max_unacked,
            self.prefix.clone(),
            self.linger,
        ))
    }
}

impl NatsBridge {
    /// Validate `cfg`, start the bridge thread and begin connecting (in the background: the
    /// gateway runs, holding acknowledgements, until NATS answers). `shards` must match the
    /// gateway's shard count. Fails only on configuration (naming the flag).
    pub fn start(cfg: NatsConfig, shards: usize) -> Result<NatsBridge, crate::psk::ConfigError> {
        cfg.validate()?;
        let stats = Arc::new(NatsStats::default());
        let (up_tx, up_rx) = flume::unbounded();
        let (down_txs, downs): (Vec<_>, Vec<_>) = (0..shards).map(|_| flume::unbounded()).unzip();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let threads = cfg.threads;
        let thread_cfg = cfg.clone();
        let linger = cfg.linger;
        let thread = std::thread::Builder::new()
            .name("usmp-nats".into())
            .spawn(move || {
                // One thread (the default): a current-thread runtime on this thread, so the
                // bridge's tasks, the client's connection task and the I/O driver never hand
                // work to each other across threads.
                let built = if threads == 1 {
                    tokio::runtime::Builder::new_current_thread().enable_all().build()
                } else {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(threads)
                        .thread_name("usmp-nats-worker")
                        .enable_all()
                        .build()
                };
                let rt = match built {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start the bridge runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let client = match bridge::connect(&thread_cfg, stats.clone(), shards).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let js = async_nats::jetstream::new(client.clone());
                    let ctx = Arc::new(ctx::Ctx {
                        cfg: thread_cfg,
                        client,
                        js,
                        stats,
                        shards: down_txs.into_iter().map(|tx| link::ToShard::new(tx, linger)).collect(),
                        gateway: OnceLock::new(),
                        deliveries: Mutex::default(),
                        next_delivery: AtomicU64::new(1),
                        unsettled: AtomicU64::new(0),
                        farewells: AtomicU64::new(0),
                        local: Mutex::default(),
                        draining: Mutex::default(),
                        ready: tokio::sync::watch::channel(0).0,
                        presence: tokio::sync::OnceCell::new(),
                        down_stream: tokio::sync::OnceCell::new(),
                    });
                    for i in 0..ctx.shards.len() {
                        let ctx = ctx.clone();
                        tokio::spawn(async move { ctx.shards[i].flush_forever().await });
                    }
                    tokio::spawn(bridge::provision(ctx.clone()));
                    tokio::spawn(downlink::serve_requests(ctx.clone()));
                    tokio::spawn(downlink::expire_requests(ctx.clone()));
                    tokio::spawn(bridge::watch_takeovers(ctx.clone()));
                    tokio::spawn(bridge::sample_queue_depth(ctx.clone()));
                    let dispatch = tokio::spawn(uplink::dispatch(ctx.clone(), up_rx));
                    let _ = ready_tx.send(Ok((ctx, tokio::runtime::Handle::current())));
                    let _ = stop_rx.await;
                    dispatch.abort();
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| {
                crate::psk::ConfigError::new("--nats", format!("cannot start the bridge thread: {e}"))
            })?;
        let (ctx, runtime) = match ready_rx.recv() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(crate::psk::ConfigError::new("--nats", e)),
            Err(_) => {
                return Err(crate::psk::ConfigError::new("--nats", "the bridge thread failed to start"))
            }
        };
        let (keys_tx, keys_loaded) = tokio::sync::watch::channel(false);
        Ok(NatsBridge {
            ctx,
            up: up_tx,
            downs,
            runtime,
            stop: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
            keys_loaded,
            keys_tx: Mutex::new(Some(keys_tx)),
        })
    }

    /// Wait up to `timeout` for NATS to be reachable and the bridge set up (streams, the
    /// downlink subscription); false if it is not yet (it goes on trying in the background).
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.ctx.ready.subscribe();
        self.runtime.block_on(async move {
            tokio::time::timeout(timeout, rx.wait_for(|n| *n >= 2)).await.is_ok_and(|r| r.is_ok())
        })
    }

    /// The shards' half, for [`crate::gateway::GatewayBuilder::serve_app`].
    pub fn app(&self) -> NatsApp {
        NatsApp {
            up: self.up.clone(),
            downs: self.downs.clone(),
            stats: self.ctx.stats.clone(),
            max_unacked: self.ctx.cfg.max_unacked,
            prefix: self.ctx.cfg.prefix.clone(),
            linger: self.ctx.cfg.linger,
        }
    }

    /// Counters (for metrics).
    pub fn stats(&self) -> Arc<NatsStats> {
        self.ctx.stats.clone()
    }

    /// The running gateway: downlinks find its sessions through it, and its `/metrics`
    /// gains the bridge's counters.
    pub fn attach(&self, gateway: GatewayHandle) {
        let stats = self.ctx.stats.clone();
        gateway.add_metrics(Arc::new(move |o: &mut String| stats.render(o)));
        let _ = self.ctx.gateway.set(gateway);
    }

    /// Keep `registry` (the gateway's key registry) in step with the KV bucket
    /// `--psk-kv`: every change is swapped in and, once the gateway is attached, sessions
    /// are revalidated (removed or rotated keys end with BYE).
    pub fn watch_keys(&self, bucket: &str, registry: Arc<RwLock<Arc<Registry>>>) {
        let Some(loaded) = self.keys_tx.lock().take() else { return };
        let ctx = self.ctx.clone();
        let apply: Arc<dyn Fn(Registry) + Send + Sync> =
            Arc::new(move |reg: Registry| match ctx.gateway.get() {
                Some(gw) => gw.replace_keys(reg),
                None => *registry.write() = Arc::new(reg),
            });
        self.runtime.spawn(keys::watch(self.ctx.clone(), bucket.to_string(), apply, loaded));
    }

    /// Wait up to `timeout` for the key bucket's current content to be in force; false if
    /// it was not (NATS unreachable: the gateway starts with the keys it has).
    pub fn wait_keys(&self, timeout: Duration) -> bool {
        let mut rx = self.keys_loaded.clone();
        self.runtime.block_on(async move {
            tokio::time::timeout(timeout, rx.wait_for(|v| *v)).await.is_ok_and(|r| r.is_ok())
        })
    }

    /// Send a downlink to `device` wherever it is connected (a request on `P.down.<device>`,
    /// as any NATS client would make); waits up to `timeout` for the reply. Runs on the
    /// bridge's runtime, so it can be awaited from any executor (the admin API's).
    pub async fn send_downlink(&self, device: [u8; 6], payload: &[u8], timeout: Duration) -> Reply {
        let ctx = self.ctx.clone();
        let payload = bytes::Bytes::copy_from_slice(payload);
        let task = self.runtime.spawn(async move {
            let req = async_nats::Request::new().payload(payload).timeout(Some(timeout));
            match ctx.client.send_request(ctx.cfg.down_subject(&device), req).await {
                Ok(m) => Reply::parse(&m.payload)
                    .unwrap_or(Reply { status: "rejected", reason: Some("unreadable reply".into()) }),
                Err(e) => Reply { status: "rejected", reason: Some(format!("nats: {e}")) },
            }
        });
        task.await.unwrap_or(Reply { status: "rejected", reason: Some("the bridge stopped".into()) })
    }

    /// The device's presence entry (JSON), if it is online anywhere.
    pub async fn presence(&self, device: [u8; 6]) -> Result<Option<serde_json::Value>, String> {
        let ctx = self.ctx.clone();
        let task = self.runtime.spawn(async move {
            let kv = match ctx.presence.get() {
                Some(kv) => kv.clone(),
                None => ctx.js.get_key_value(PRESENCE_BUCKET).await.map_err(|e| e.to_string())?,
            };
            let v = kv.get(config::device_token(&device)).await.map_err(|e| e.to_string())?;
            Ok(v.and_then(|b| serde_json::from_slice(&b).ok()))
        });
        task.await.map_err(|_| "the bridge stopped".to_string())?
    }

    /// After the gateway stopped: wait up to `grace` for uplinks in flight to be stored and
    /// the last events to leave, then stop the bridge thread.
    pub fn shutdown(&self, grace: Duration) {
        let end = Instant::now() + grace;
        // The shards have handed over all they read (they flush as they stop): wait until the
        // dispatcher took it all, JetStream acknowledged every publish, and every session's
        // disconnect event and presence clean-up is done. Settled twice in a row, 10 ms apart:
        // a batch being taken is off the channel a moment before it counts.
        let settled = || {
            self.up.is_empty()
                && self.ctx.unsettled.load(Ordering::Acquire) == 0
                && self.ctx.farewells.load(Ordering::Acquire) == 0
        };
        let mut calm = 0;
        while calm < 2 && Instant::now() < end {
            calm = if settled() { calm + 1 } else { 0 };
            std::thread::sleep(Duration::from_millis(10));
        }
        let ctx = self.ctx.clone();
        let left = end.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(left, ctx.client.flush()).await;
        });
        if let Some(stop) = self.stop.lock().take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}
