//! The bridge thread: a tokio runtime of its own running the async-nats client. It stores
//! uplinks in JetStream (retrying until stored, so a device is only ever told of a message
//! JetStream holds), publishes session events and presence, closes sessions of devices that
//! connected elsewhere, and hosts the downlink and key-bucket tasks. Shards talk to it through
//! channels only; nothing here runs on a shard.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;

use super::config::{device_token, NatsConfig};
use super::ctx::{Ctx, LocalSession};
use super::link::{Down, NatsStats, SessionFacts};
use crate::psk::to_hex;
use crate::rt::conn::CloseReason;

/// JetStream stream of uplinks.
pub const UP_STREAM: &str = "USMP_UP";
/// JetStream stream of downlinks queued for offline devices.
pub const DOWN_STREAM: &str = "USMP_DOWN";
/// KV bucket of who is online where.
pub const PRESENCE_BUCKET: &str = "USMP_PRESENCE";

/// RFC 3339 UTC with microseconds.
pub(super) fn rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

pub(super) fn close_reason_label(r: CloseReason) -> &'static str {
    match r {
        CloseReason::PeerBye | CloseReason::LocalBye => "bye",
        CloseReason::Watchdog | CloseReason::Stalled => "timeout",
        CloseReason::Revoked => "revoked",
        CloseReason::Kicked => "kicked",
        CloseReason::Takeover | CloseReason::Replaced => "takeover",
        CloseReason::Shutdown => "shutdown",
        CloseReason::PeerClosed | CloseReason::PeerGone => "peer_gone",
        CloseReason::Protocol(_) | CloseReason::Io | CloseReason::HandlerDone => "error",
    }
}

pub(super) fn transport_label(t: crate::proto::Transport) -> &'static str {
    match t {
        crate::proto::Transport::Tcp => "tcp",
        crate::proto::Transport::Udp => "udp",
    }
}

/// Connect (in the background: the gateway starts whether or not NATS answers yet).
pub(super) async fn connect(
    cfg: &NatsConfig,
    stats: Arc<NatsStats>,
    shards: usize,
) -> Result<async_nats::Client, String> {
    let mut opts = match &cfg.creds {
        Some(p) => async_nats::ConnectOptions::with_credentials_file(p)
            .await
            .map_err(|e| format!("--nats-creds {}: {e}", p.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(ca) = &cfg.tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let ev_stats = stats.clone();
    opts = opts
        .name(format!("usmp-gateway {}", cfg.gateway_id))
        .retry_on_initial_connect()
        // Every publish acknowledgement arrives on one subscription (`uplink`): room for all
        // the shards can have in flight, so a burst (after a reconnect) drops none of them.
        .subscription_capacity((shards * super::link::SHARD_IN_FLIGHT + 4096).max(65_536))
        .max_reconnects(None)
        // Back within a second of the server: devices are waiting for their UTACKs.
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(250)))
        .event_callback(move |ev| {
            let stats = ev_stats.clone();
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        if stats.connected.swap(1, Ordering::Relaxed) == 0 {
                            stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!("nats: connected");
                    }
                    async_nats::Event::Disconnected => {
                        stats.connected.store(0, Ordering::Relaxed);
                        tracing::warn!(
                            "nats: disconnected; uplinks wait (TCP reading pauses, UDP UTACKs held)"
                        );
                    }
                    other => tracing::warn!(event = %other, "nats"),
                }
            }
        });
    let urls: Vec<async_nats::ServerAddr> =
        cfg.urls.iter().filter_map(|u| u.parse().ok()).collect::<Vec<_>>();
    opts.connect(urls).await.map_err(|e| format!("--nats: {e}"))
}

/// Create or update the gateway's streams and buckets, retrying until NATS answers.
pub(super) async fn provision(ctx: Arc<Ctx>) {
    let mut delay = Duration::from_millis(100);
    loop {
        match try_provision(&ctx).await {
            Ok(()) => {
                tracing::info!(
                    up = UP_STREAM,
                    down = DOWN_STREAM,
                    presence = PRESENCE_BUCKET,
                    "nats: streams ready"
                );
                return;
            }
            Err(e) => {
                ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "nats: cannot set up streams yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn ensure_stream(js: &jetstream::Context, want: stream::Config) -> Result<stream::Stream, String> {
    let name = want.name.clone();
    let mut s = js.get_or_create_stream(want.clone()).await.map_err(|e| format!("stream {name}: {e}"))?;
    let have = s.info().await.map_err(|e| format!("stream {name}: {e}"))?.config.clone();
    // Servers report "unlimited" as -1 whatever was sent (0 or -1).
    let limit = |v: i64| if v <= 0 { -1 } else { v };
    let differs = have.subjects != want.subjects
        || have.max_age != want.max_age
        || limit(have.max_bytes) != limit(want.max_bytes)
        || limit(have.max_messages_per_subject) != limit(want.max_messages_per_subject)
        || have.discard != want.discard
        || have.discard_new_per_subject != want.discard_new_per_subject;
    if differs {
        // The operator changed a limit: apply it (replicas and storage stay as created).
        let update = stream::Config { num_replicas: have.num_replicas, storage: have.storage, ..want };
        js.update_stream(update).await.map_err(|e| format!("update stream {name}: {e}"))?;
        tracing::info!(stream = %name, "nats: stream limits updated");
    }
    Ok(s)
}

async fn try_provision(ctx: &Ctx) -> Result<(), String> {
    let c = &ctx.cfg;
    ensure_stream(
        &ctx.js,
        stream::Config {
            name: UP_STREAM.into(),
            subjects: vec![format!("{}.up.>", c.prefix)],
            max_age: c.up_max_age,
            max_bytes: c.up_max_bytes,
            storage: stream::StorageType::File,
            num_replicas: c.replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await?;
    if !c.downlink_ttl.is_zero() {
        let s = ensure_stream(
            &ctx.js,
            stream::Config {
                name: DOWN_STREAM.into(),
                subjects: vec![format!("{}.queue.>", c.prefix)],
                max_age: c.downlink_ttl,
                max_messages_per_subject: i64::from(c.downlink_queue),
                // A full queue refuses the newest (the request hears `queue_full`) instead of
                // silently dropping the oldest.
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                storage: stream::StorageType::File,
                num_replicas: c.replicas,
                ..Default::default()
            },
        )
        .await?;
        let _ = ctx.down_stream.set(s);
    }
    let presence = ensure_bucket(&ctx.js, PRESENCE_BUCKET, c.replicas).await?;
    let _ = ctx.presence.set(presence);
    Ok(())
}

/// Open KV bucket `bucket`, creating it if missing. The bucket's stream is made here as a KV
/// bucket is defined (stream `KV_<bucket>` on `$KV.<bucket>.>`, one value per key, rollups,
/// direct gets): async-nats's own `create_key_value` first reads account information in a
/// form nats-server 2.9 does not send.
pub(super) async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    if let Ok(s) = js.get_key_value(bucket).await {
        return Ok(s);
    }
    let cfg = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_message_size: -1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    js.get_or_create_stream(cfg).await.map_err(|e| format!("bucket {bucket}: {e}"))?;
    js.get_key_value(bucket).await.map_err(|e| format!("bucket {bucket}: {e}"))
}

fn facts_json(ctx: &Ctx, f: &SessionFacts) -> serde_json::Value {
    serde_json::json!({
        "device": device_token(&f.device),
        "session": to_hex(&f.session),
        "gateway": ctx.cfg.gateway_id,
        "transport": transport_label(f.transport),
        "peer": f.peer.to_string(),
        "at": rfc3339(f.at),
    })
}

/// A session came up here: close an older one of the device on this gateway, route its
/// downlinks here, announce it (other gateways close theirs), record presence, then send
/// what was queued for it while it was away.
pub(super) fn opened(ctx: &Arc<Ctx>, f: SessionFacts) {
    // Queued downlinks go out before any new one: claim the drain before the device becomes
    // routable here, so that a request arriving meanwhile joins the queue behind them.
    let drain = !ctx.cfg.downlink_ttl.is_zero() && super::downlink::claim_drain(ctx, f.device);
    let (routable, route_ready) = tokio::sync::oneshot::channel();
    let route = tokio::spawn(super::downlink::serve_route(ctx.clone(), f.device, routable));
    let old = ctx.local.lock().insert(f.device, LocalSession { session: f.session, shard: f.shard, route });
    if let Some(old) = old {
        old.route.abort();
        if old.session != f.session {
            if let Some(tx) = ctx.shards.get(old.shard) {
                let _ = tx.send(Down::Close { session: old.session, reason: CloseReason::Takeover });
            }
        }
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        // Announce the session only once downlinks can find it here: whoever reads the event
        // or the presence entry and sends at once must not find the device unroutable (and
        // get `queued` for an online device with nothing queued). If the subscription
        // failed, announce anyway. With downlinks queued, new ones queue behind them until
        // they have gone out.
        let _ = route_ready.await;
        let drain = drain && super::downlink::keep_drain_claim(&ctx, f.device).await;
        let event = facts_json(&ctx, &f);
        let presence = serde_json::json!({
            "gateway": ctx.cfg.gateway_id,
            "session": to_hex(&f.session),
            "transport": transport_label(f.transport),
            "since": rfc3339(f.at),
        });
        if let Some(kv) = ctx.presence.get() {
            if let Err(e) = kv.put(device_token(&f.device), presence.to_string().into()).await {
                ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "nats: presence not recorded");
            }
        }
        let subject = ctx.cfg.event_subject(&f.device, "connected");
        if ctx.client.publish(subject, event.to_string().into()).await.is_err() {
            ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
        }
        if drain {
            super::downlink::drain_queue(ctx.clone(), f.device).await;
        }
    });
}

/// A session ended here: stop routing to it, announce it, clear presence if it is still ours.
pub(super) fn closed(ctx: &Arc<Ctx>, f: SessionFacts, reason: CloseReason) {
    {
        let mut local = ctx.local.lock();
        if local.get(&f.device).is_some_and(|l| l.session == f.session) {
            if let Some(l) = local.remove(&f.device) {
                l.route.abort();
            }
        }
    }
    /// Counts the farewell while it runs, whichever way it ends.
    struct Farewell(Arc<Ctx>);
    impl Drop for Farewell {
        fn drop(&mut self) {
            self.0.farewells.fetch_sub(1, Ordering::AcqRel);
        }
    }
    ctx.farewells.fetch_add(1, Ordering::AcqRel);
    let farewell = Farewell(ctx.clone());
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _farewell = farewell;
        let mut event = facts_json(&ctx, &f);
        event["reason"] = close_reason_label(reason).into();
        let subject = ctx.cfg.event_subject(&f.device, "disconnected");
        if ctx.client.publish(subject, event.to_string().into()).await.is_err() {
            ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
        }
        let Some(kv) = ctx.presence.get() else { return };
        let key = device_token(&f.device);
        // Only our own entry: the device may already be online elsewhere.
        if let Ok(Some(entry)) = kv.entry(key.clone()).await {
            let ours = serde_json::from_slice::<serde_json::Value>(&entry.value)
                .ok()
                .is_some_and(|v| v["session"] == to_hex(&f.session));
            if ours && kv.delete_expect_revision(key, Some(entry.revision)).await.is_err() {
                ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
}

/// Close our session of a device that connected to another gateway.
pub(super) async fn watch_takeovers(ctx: Arc<Ctx>) {
    let subject = format!("{}.evt.*.connected", ctx.cfg.prefix);
    let mut sub = match ctx.client.subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "nats: cannot watch connect events; takeovers will rely on the watchdog");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
        let (Some(dev), Some(sess)) = (v["device"].as_str(), v["session"].as_str()) else { continue };
        let Some(device) = super::config::parse_device_token(dev) else { continue };
        let local = ctx.local.lock().get(&device).map(|l| (l.session, l.shard));
        if let Some((mine, shard)) = local {
            if to_hex(&mine) != sess {
                if let Some(tx) = ctx.shards.get(shard) {
                    let _ = tx.send(Down::Close { session: mine, reason: CloseReason::Takeover });
                }
            }
        }
    }
}

/// Sample the offline queue's depth for the metrics.
pub(super) async fn sample_queue_depth(ctx: Arc<Ctx>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some(s) = ctx.down_stream.get() {
            if let Ok(info) = s.get_info().await {
                ctx.stats.queue_depth.store(info.state.messages, Ordering::Relaxed);
            }
        }
    }
}
