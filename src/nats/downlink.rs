//! Downlinks. A request on `P.down.<device>` reaches exactly one gateway (a queue group of
//! all of them), which answers it exactly once:
//! 1. the device is connected here: deliver it, answer when it got out;
//! 2. else ask whoever serves `P.route.<device>` (the gateway holding the session subscribes
//!    to it: NATS's subject routing is the routing table) and relay its answer;
//! 3. else nobody holds the device: queue it in `USMP_DOWN` (`queued`, `queue_full`) or
//!    answer `offline`, then nudge the route subject in case the device just connected.
//!
//! Queued downlinks go out in order when the device next connects to any gateway, each
//! removed from the stream only once delivered; expired ones are discarded unsent. While they
//! go out, new downlinks for the device join the back of its queue (`queued`) instead of
//! overtaking them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::config::{parse_device_token, MAX_DOWNLINK};
use super::ctx::{Ctx, Drain, Waiter};
use super::link::{Delivery, Down};
use super::FastMap;

/// How long a holder may take to get a downlink out (UDP: five attempts with backoff).
const HOLDER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a cluster may take to spread a new route subscription (see [`route`]).
const ROUTE_SETTLE: Duration = Duration::from_millis(50);
/// How long a drain waits before trying again a downlink its device did not take.
const DRAIN_RETRY: Duration = Duration::from_secs(1);
/// Header marking a route message as "your device has queued downlinks".
const NUDGE: &str = "Usmp-Nudge";

/// A reply as requesters read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// One of `delivered`, `queued`, `offline`, `too_large`, `queue_full`, `rejected`
    /// (and, between gateways only, `gone`).
    pub status: &'static str,
    /// Why, for `rejected`.
    pub reason: Option<String>,
}

impl Reply {
    fn of(status: &'static str) -> Self {
        Reply { status, reason: None }
    }
    fn rejected(reason: impl Into<String>) -> Self {
        Reply { status: "rejected", reason: Some(reason.into()) }
    }
    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        // Every delivered downlink is answered: spare the common case a JSON tree.
        if self.reason.is_none() {
            match self.status {
                "delivered" => return Bytes::from_static(br#"{"status":"delivered"}"#),
                "queued" => return Bytes::from_static(br#"{"status":"queued"}"#),
                "offline" => return Bytes::from_static(br#"{"status":"offline"}"#),
                _ => {}
            }
        }
        let mut v = serde_json::json!({ "status": self.status });
        if let Some(r) = &self.reason {
            v["reason"] = r.clone().into();
        }
        v.to_string().into()
    }
    /// Parse a reply body (another gateway's answer).
    pub fn parse(b: &[u8]) -> Option<Reply> {
        let v: serde_json::Value = serde_json::from_slice(b).ok()?;
        let status = match v["status"].as_str()? {
            "delivered" => "delivered",
            "queued" => "queued",
            "offline" => "offline",
            "too_large" => "too_large",
            "queue_full" => "queue_full",
            "rejected" => "rejected",
            "gone" => "gone",
            _ => return None,
        };
        Some(Reply { status, reason: v["reason"].as_str().map(String::from) })
    }
}

/// Hand a downlink to the shard holding the device here; `None` if no session is here.
async fn deliver_local(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes) -> Option<Delivery> {
    let (done, wait) = oneshot::channel();
    let id = hand_to_shard(ctx, device, payload, Waiter::Task(done))?;
    match tokio::time::timeout(HOLDER_TIMEOUT, wait).await {
        Ok(Ok(d)) => Some(d),
        // Still on its way to the device: not `Gone`, which would queue it a second time.
        _ => {
            ctx.deliveries.lock().remove(&id);
            Some(Delivery::Busy)
        }
    }
}

/// Register `waiter` for the outcome and hand the downlink to the shard holding `device`; its
/// delivery id, or `None` (the waiter dropped) if the device has no session here.
fn hand_to_shard(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes, waiter: Waiter) -> Option<u64> {
    // Held here once the bridge has heard the session open (and claimed its queue's drain),
    // not as soon as the gateway's directory has it: a downlink handed over in between would
    // overtake the queue.
    let shard = ctx.local.lock().get(&device)?.shard;
    let tx = ctx.shards.get(shard)?;
    let id = ctx.next_delivery.fetch_add(1, Ordering::Relaxed);
    ctx.deliveries.lock().insert(id, waiter);
    if tx.send(Down::Deliver { id, device, payload }).is_err() {
        ctx.deliveries.lock().remove(&id);
        return None;
    }
    Some(id)
}

pub(super) fn local_reply(d: Delivery) -> Reply {
    match d {
        Delivery::Delivered => Reply::of("delivered"),
        Delivery::Busy => Reply::rejected("device busy: its send queue is full or it is not acknowledging"),
        Delivery::Gone => Reply::of("gone"),
    }
}

/// Decide one downlink (steps 1–3 of the module doc).
pub(super) async fn route(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes) -> Reply {
    if payload.len() > MAX_DOWNLINK {
        return Reply::of("too_large");
    }
    if draining(ctx, device) {
        return queue_behind(ctx, device, payload).await;
    }
    if let Some(d) = deliver_local(ctx, device, payload.clone()).await {
        let r = local_reply(d);
        if r.status != "gone" {
            return r;
        }
    }
    route_elsewhere(ctx, device, payload).await
}

/// Steps 2 and 3 of the module doc: the device has no session here.
async fn route_elsewhere(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes) -> Reply {
    // A holder's route subscription reaches the other nodes of a cluster a moment after its
    // own server has it: a device that has just connected may look unroutable from here for
    // a few milliseconds. One second look before concluding it is offline.
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(ROUTE_SETTLE).await;
        }
        let req = async_nats::Request::new().payload(payload.clone()).timeout(Some(HOLDER_TIMEOUT));
        match ctx.client.send_request(ctx.cfg.route_subject(&device), req).await {
            Ok(msg) => match Reply::parse(&msg.payload) {
                Some(r) if r.status != "gone" => return r,
                Some(_) => {}
                None => return Reply::rejected("unreadable answer from the holding gateway"),
            },
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {}
            Err(e) if e.kind() == RequestErrorKind::TimedOut => {
                return Reply::rejected("the holding gateway did not answer in time")
            }
            Err(e) => return Reply::rejected(format!("nats: {e}")),
        }
    }
    offline(ctx, device, payload).await
}

/// Nobody holds the device: queue the downlink or say it is offline.
async fn offline(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes) -> Reply {
    if ctx.cfg.downlink_ttl.is_zero() {
        return Reply::of("offline");
    }
    let r = enqueue(ctx, device, payload).await;
    if r.status == "queued" {
        // The device may have connected since we looked: its gateway drains on a nudge.
        nudge(ctx, device).await;
    }
    r
}

/// Tell whichever gateway holds `device` that its queue has something new.
async fn nudge(ctx: &Arc<Ctx>, device: [u8; 6]) {
    let mut h = HeaderMap::new();
    h.insert(NUDGE, "1");
    let _ = ctx.client.publish_with_headers(ctx.cfg.route_subject(&device), h, Bytes::new()).await;
}

/// Store a downlink at the back of the device's queue.
async fn enqueue(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes) -> Reply {
    let subject = ctx.cfg.queue_subject(&device);
    let res = match ctx.js.publish(subject, payload).await {
        Ok(ack) => ack.await,
        Err(e) => return Reply::rejected(format!("queue unavailable: {e}")),
    };
    match res {
        Ok(_) => Reply::of("queued"),
        Err(e) if queue_is_full(&e) => Reply::of("queue_full"),
        Err(e) => Reply::rejected(format!("queue unavailable: {e}")),
    }
}

/// The device's queue is going out here (or is about to, its session having just opened):
/// a new downlink delivered now would overtake older ones.
pub(super) fn draining(ctx: &Ctx, device: [u8; 6]) -> bool {
    ctx.draining.lock().contains_key(&device)
}

/// The device is here but its queue is still going out: put this downlink behind it, and
/// make the drain look again (or start one, if it finished meanwhile).
async fn queue_behind(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes) -> Reply {
    let r = enqueue(ctx, device, payload).await;
    if r.status == "queued" {
        if claim_drain(ctx, device) {
            tokio::spawn(drain_queue(ctx.clone(), device));
        }
        // The device may have moved to another gateway meanwhile: its drain there looks again.
        nudge(ctx, device).await;
    }
    r
}

/// A session just opened here with the drain of its queue claimed: keep the claim (true) if
/// the queue holds anything or a downlink joined it meanwhile, else give it up, so that new
/// downlinks go straight to the device.
pub(super) async fn keep_drain_claim(ctx: &Arc<Ctx>, device: [u8; 6]) -> bool {
    let queued = match ctx.down_stream.get() {
        // Unreadable for now counts as queued: the drain retries while the device is here.
        Some(stream) => !matches!(
            stream.raw_message_builder().sequence(0).next_by_subject(ctx.cfg.queue_subject(&device)).send().await,
            Err(e) if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound
        ),
        None => false,
    };
    queued || !finish_drain_unless_nudged(ctx, device)
}

/// End the drain of `device`'s queue unless a nudge asked for another look meanwhile (then
/// false, the nudge consumed): one lock for both, so no nudge falls in between.
fn finish_drain_unless_nudged(ctx: &Arc<Ctx>, device: [u8; 6]) -> bool {
    let mut d = ctx.draining.lock();
    if let Some(drain) = d.get_mut(&device).filter(|d| d.again) {
        drain.again = false;
        return false;
    }
    release(ctx, &mut d, device);
    true
}

/// The drain of `device`'s queue is over: release it, and hand the device the requests held
/// meanwhile, in order (under the lock, so that no new request overtakes them).
fn finish_drain(ctx: &Arc<Ctx>, device: [u8; 6]) {
    release(ctx, &mut ctx.draining.lock(), device);
}

fn release(ctx: &Arc<Ctx>, d: &mut FastMap<[u8; 6], Drain>, device: [u8; 6]) {
    let Some(drain) = d.remove(&device) else { return };
    for (reply, payload) in drain.held {
        if !hand_request(ctx, device, payload.clone(), reply.clone()) {
            // The session ended meanwhile: the request goes on elsewhere.
            answer_elsewhere(ctx, device, payload, reply);
        }
    }
}

/// A downlink request for a device held here while its queue goes out: keep it for when the
/// queue is out. False if there is no drain, or the held ones reach the queue's cap (the
/// request then takes the queue's way, which answers `queue_full` at the cap).
fn hold_while_draining(ctx: &Ctx, device: [u8; 6], msg: &async_nats::Message) -> bool {
    let mut d = ctx.draining.lock();
    match d.get_mut(&device) {
        Some(drain) if drain.held.len() < ctx.cfg.downlink_queue as usize => {
            drain.held.push_back((msg.reply.clone(), msg.payload.clone()));
            true
        }
        _ => false,
    }
}

/// Become the one drain of `device`'s queue: true if none runs; else ask the running one to
/// look again before it ends, and false.
pub(super) fn claim_drain(ctx: &Ctx, device: [u8; 6]) -> bool {
    let mut d = ctx.draining.lock();
    match d.get_mut(&device) {
        Some(drain) => {
            drain.again = true;
            false
        }
        None => {
            d.insert(device, Default::default());
            true
        }
    }
}

/// JetStream refused the message because the device's subject is at its cap
/// (`discard_new_per_subject`): error code 10077, "maximum messages per subject exceeded".
fn queue_is_full(e: &async_nats::jetstream::context::PublishError) -> bool {
    use std::error::Error;
    let api = e.source().and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
    match api {
        Some(api) => api.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED,
        None => false,
    }
}

/// Serve `P.down.*` (one of every gateway answers each request).
pub(super) async fn serve_requests(ctx: Arc<Ctx>) {
    let subject = format!("{}.down.*", ctx.cfg.prefix);
    let group = format!("{}-downlink", ctx.cfg.prefix);
    let mut sub = match ctx.client.queue_subscribe(subject, group).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "nats: cannot serve downlink requests");
            return;
        }
    };
    if ctx.client.flush().await.is_ok() {
        ctx.ready.send_modify(|n| *n += 1);
    }
    while let Some(msg) = sub.next().await {
        if let Some(device) = msg.subject.rsplit('.').next().and_then(parse_device_token) {
            if msg.payload.len() <= MAX_DOWNLINK
                && (hold_while_draining(&ctx, device, &msg)
                    || (!draining(&ctx, device) && hand_to_holder(&ctx, device, &msg)))
            {
                continue;
            }
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let reply = match msg.subject.rsplit('.').next().and_then(parse_device_token) {
                None => {
                    ctx.stats.bad_subjects.fetch_add(1, Ordering::Relaxed);
                    Reply::rejected("the subject names no device id (12 lowercase hex digits)")
                }
                Some(device) => route(&ctx, device, msg.payload).await,
            };
            ctx.stats.downlink(reply.status);
            match msg.reply {
                Some(to) => {
                    let _ = ctx.client.publish(to, reply.to_json()).await;
                }
                None => tracing::debug!("nats: downlink request without a reply subject"),
            }
        });
    }
}

/// The common case of a downlink: its device is held here. Hand it to the shard and leave the
/// answer to the uplink dispatcher, which hears the outcome ([`answered_by_holder`]); false if
/// the device has no session here.
fn hand_to_holder(ctx: &Arc<Ctx>, device: [u8; 6], msg: &async_nats::Message) -> bool {
    hand_request(ctx, device, msg.payload.clone(), msg.reply.clone())
}

/// [`hand_to_holder`] for a request's parts.
fn hand_request(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes, reply: Option<async_nats::Subject>) -> bool {
    let waiter =
        Waiter::Request { reply, device, payload: payload.clone(), since: std::time::Instant::now() };
    hand_to_shard(ctx, device, payload, waiter).is_some()
}

/// The outcome of a downlink request handed to a shard by [`hand_to_holder`]: where to send
/// which answer, or `None` when there is nothing to send now (no reply subject, or the
/// session ended first and the request goes on elsewhere, in a task that answers it itself).
pub(super) fn answered_by_holder(
    ctx: &Arc<Ctx>,
    device: [u8; 6],
    payload: Bytes,
    reply: Option<async_nats::Subject>,
    outcome: Delivery,
) -> Option<(async_nats::Subject, Reply)> {
    if outcome != Delivery::Gone {
        let r = local_reply(outcome);
        ctx.stats.downlink(r.status);
        return reply.map(|to| (to, r));
    }
    answer_elsewhere(ctx, device, payload, reply);
    None
}

/// A request whose device has no session here (any more): route it on in a task that
/// answers it.
fn answer_elsewhere(ctx: &Arc<Ctx>, device: [u8; 6], payload: Bytes, reply: Option<async_nats::Subject>) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let r = route_elsewhere(&ctx, device, payload).await;
        ctx.stats.downlink(r.status);
        if let Some(to) = reply {
            let _ = ctx.client.publish(to, r.to_json()).await;
        }
    });
}

/// Answer requests handed to a shard that has not reported within [`HOLDER_TIMEOUT`] (as
/// [`deliver_local`] does for a task): the message may still get out, so not `gone`.
pub(super) async fn expire_requests(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = std::time::Instant::now();
        let expired: Vec<Option<async_nats::Subject>> = {
            let mut d = ctx.deliveries.lock();
            let ids: Vec<u64> = d
                .iter()
                .filter_map(|(id, w)| match w {
                    Waiter::Request { since, .. } if now.duration_since(*since) >= HOLDER_TIMEOUT => {
                        Some(*id)
                    }
                    _ => None,
                })
                .collect();
            ids.into_iter()
                .filter_map(|id| match d.remove(&id) {
                    Some(Waiter::Request { reply, .. }) => Some(reply),
                    _ => None,
                })
                .collect()
        };
        for reply in expired {
            let r = local_reply(Delivery::Busy);
            ctx.stats.downlink(r.status);
            if let Some(to) = reply {
                let _ = ctx.client.publish(to, r.to_json()).await;
            }
        }
    }
}

/// While a device's session is here: answer its route subject (deliver, or `gone`) and
/// drain its queue when nudged.
/// `routable` hears once requests can reach this subscription.
pub(super) async fn serve_route(ctx: Arc<Ctx>, device: [u8; 6], routable: oneshot::Sender<()>) {
    let group = format!("{}-route", ctx.cfg.prefix);
    let mut sub = match ctx.client.queue_subscribe(ctx.cfg.route_subject(&device), group).await {
        Ok(s) => s,
        Err(_) => {
            ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    // Before anyone could route here the subscription must be on the server.
    let _ = ctx.client.flush().await;
    let _ = routable.send(());
    while let Some(msg) = sub.next().await {
        if msg.headers.as_ref().is_some_and(|h| h.get(NUDGE).is_some()) {
            if claim_drain(&ctx, device) {
                tokio::spawn(drain_queue(ctx.clone(), device));
            }
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let r = if draining(&ctx, device) {
                queue_behind(&ctx, device, msg.payload).await
            } else {
                match deliver_local(&ctx, device, msg.payload).await {
                    Some(d) => local_reply(d),
                    None => Reply::of("gone"),
                }
            };
            if let Some(to) = msg.reply {
                let _ = ctx.client.publish(to, r.to_json()).await;
            }
        });
    }
}

/// Send the device's queued downlinks in order, each deleted once delivered. One drain per
/// device at a time: the caller claimed it ([`claim_drain`]); a nudge during a drain makes it
/// look again. While it runs, new downlinks for the device join the queue behind. It goes
/// on while the device's session is here, retrying a downlink the device is not taking (or
/// a queue NATS cannot read for now) rather than letting newer ones overtake it; it ends
/// with the session, the rest waiting for the next connection.
pub(super) async fn drain_queue(ctx: Arc<Ctx>, device: [u8; 6]) {
    let Some(stream) = ctx.down_stream.get() else {
        finish_drain(&ctx, device);
        return;
    };
    let subject = ctx.cfg.queue_subject(&device);
    let held_here = || ctx.local.lock().contains_key(&device);
    loop {
        let mut next = 0u64;
        loop {
            let msg = match stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject.clone())
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                    break
                }
                Err(_) if held_here() => {
                    ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(DRAIN_RETRY).await;
                    continue;
                }
                Err(_) => {
                    finish_drain(&ctx, device);
                    return;
                }
            };
            next = msg.sequence + 1;
            let age = SystemTime::now().duration_since(SystemTime::from(msg.time)).unwrap_or_default();
            if age >= ctx.cfg.downlink_ttl {
                ctx.stats.expired.fetch_add(1, Ordering::Relaxed);
                let _ = stream.delete_message(msg.sequence).await;
                continue;
            }
            match deliver_local(&ctx, device, msg.payload).await {
                Some(Delivery::Delivered) => {
                    if stream.delete_message(msg.sequence).await.is_err() {
                        ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Delivery::Busy) if held_here() => {
                    // Its send queue is full or it is slow to acknowledge: the same one again.
                    tokio::time::sleep(DRAIN_RETRY).await;
                    next = msg.sequence;
                }
                _ => {
                    finish_drain(&ctx, device);
                    return;
                }
            }
        }
        if finish_drain_unless_nudged(&ctx, device) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip_and_match_their_json() {
        for status in super::super::link::DOWNLINK_STATUSES {
            let r = Reply { status, reason: None };
            let body = r.to_json();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v, serde_json::json!({ "status": status }), "{status}");
            assert_eq!(Reply::parse(&body), Some(r));
        }
        let r = Reply::rejected("device busy");
        let v: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(v, serde_json::json!({ "status": "rejected", "reason": "device busy" }));
        assert_eq!(Reply::parse(&r.to_json()), Some(r));
    }
}
