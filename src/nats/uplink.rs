//! Uplinks into JetStream. Each message is published with a reply subject of the bridge's own
//! (`<inbox>.<n>`), and JetStream's acknowledgements come back on one subscription to
//! `<inbox>.*`: one map entry and one reply subject per publish, where a client-side request
//! (`jetstream::Context::publish`) also pays a oneshot channel, a timer and a generic JSON
//! decode per message. At 10,000 messages/s that bookkeeping, not the bytes, was most of the
//! bridge's cost.
//!
//! The rules are the ones the shards count on: a session has one publish in flight, so its
//! messages reach the stream in the order the device sent them; a publish is repeated (same
//! `Nats-Msg-Id`, so JetStream drops a copy it already holds) until it is acknowledged; only
//! then does the shard hear [`Down::Stored`].

use std::collections::{BTreeMap, VecDeque};

use super::FastMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_nats::message::OutboundMessage;
use async_nats::{HeaderMap, HeaderName, Subject};
use bytes::Bytes;
use futures_util::{FutureExt, Sink, StreamExt};

use super::bridge::{closed, opened};
use super::ctx::{Ctx, Waiter};
use super::downlink::answered_by_holder;
use super::link::{Down, PublishTag, Up};

/// How long a publish waits for its acknowledgement before it goes out again. A publish lost
/// with a dropped connection is only noticed this way.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest wait before a refused publish (no stream yet, JetStream busy) is retried:
/// short, because devices are waiting for their UTACKs (a UDP device gives up after about 12 s
/// of silence).
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(250);
/// How often retries and acknowledgement timeouts are looked at while anything is in flight.
const TICK: Duration = Duration::from_millis(25);

/// One uplink on its way into the stream.
struct Publish {
    shard: usize,
    tag: Arc<PublishTag>,
    number: u64,
    payload: Bytes,
    /// The wait before the next retry, should this attempt be refused.
    retry_in: Duration,
}

/// A publish made and not yet acknowledged.
struct InFlight {
    publish: Publish,
    /// When the client took it (`None` while it waits in [`Uplinks::outbox`]): its answer is
    /// awaited from then on, so a publish that cannot leave during an outage is never sent
    /// again in the meantime (copies would pile up).
    sent: Option<Instant>,
}

/// Tokens are never 0: an outbox entry with token 0 is an answer, not an uplink.
const NOT_AN_UPLINK: u64 = 0;

/// JetStream's answer to a publish; only what decides success is read.
#[derive(serde::Deserialize)]
struct PubAck<'a> {
    // Cow: a stream name with a JSON escape cannot be borrowed.
    #[serde(default, borrow)]
    stream: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

/// What an answer to a publish says: `Some(duplicate)` if the message is stored (now, or
/// already), `None` if it is not (no stream answered, JetStream refused it, or the answer is
/// unreadable).
fn stored_as(status: Option<async_nats::StatusCode>, payload: &[u8]) -> Option<bool> {
    if status.is_some_and(|s| s != async_nats::StatusCode::OK) {
        return None;
    }
    match serde_json::from_slice::<PubAck>(payload).ok()? {
        PubAck { stream: Some(_), duplicate, error: None } => Some(duplicate),
        _ => None,
    }
}

/// The headers every uplink of the session carries, spelled once.
fn session_headers(tag: &PublishTag, gateway: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HeaderName::from_static("Usmp-Device"), tag.device.as_str());
    h.insert(HeaderName::from_static("Usmp-Session"), tag.session_hex.as_str());
    h.insert(HeaderName::from_static("Usmp-Transport"), tag.transport);
    h.insert(HeaderName::from_static("Usmp-Gateway"), gateway);
    h
}

/// The uplinks the bridge holds: in flight, queued behind their session's publish in flight,
/// waiting to be retried, or waiting for room in the client's command channel.
struct Uplinks {
    ctx: Arc<Ctx>,
    /// `<inbox>.`: reply subjects are this and a number.
    inbox: String,
    next_token: u64,
    in_flight: FastMap<u64, InFlight>,
    /// Hand-over order of the tokens above, for timeouts (acknowledged ones are skipped
    /// lazily).
    order: VecDeque<(Instant, u64)>,
    /// Sessions with a publish in flight (or due for retry), and their uplinks behind it.
    waiting: FastMap<[u8; 16], VecDeque<Publish>>,
    /// Refused publishes by due time (and token, to keep equal times apart).
    retries: BTreeMap<(Instant, u64), Publish>,
    /// Made, not yet taken by the client (its command channel was full), with their tokens.
    outbox: VecDeque<(u64, OutboundMessage)>,
}

impl Uplinks {
    fn busy(&self) -> bool {
        !self.in_flight.is_empty() || !self.retries.is_empty() || !self.outbox.is_empty()
    }

    fn take(&mut self, up: Up) {
        match up {
            Up::Publish { shard, tag, number, payload } => {
                self.ctx.unsettled.fetch_add(1, Ordering::AcqRel);
                let p = Publish { shard, tag, number, payload, retry_in: RETRY_FIRST };
                match self.waiting.get_mut(&p.tag.session) {
                    Some(q) => q.push_back(p),
                    None => {
                        self.waiting.insert(p.tag.session, VecDeque::new());
                        self.send(p);
                    }
                }
            }
            Up::Opened(f) => opened(&self.ctx, f),
            Up::Closed(f, reason) => closed(&self.ctx, f, reason),
            Up::Delivery { id, outcome } => {
                let waiter = self.ctx.deliveries.lock().remove(&id);
                match waiter {
                    Some(Waiter::Task(tx)) => {
                        let _ = tx.send(outcome);
                    }
                    Some(Waiter::Request { reply, device, payload, .. }) => {
                        if let Some((to, r)) = answered_by_holder(&self.ctx, device, payload, reply, outcome)
                        {
                            let answer = OutboundMessage {
                                subject: to,
                                reply: None,
                                payload: r.to_json(),
                                headers: None,
                            };
                            self.outbox.push_back((NOT_AN_UPLINK, answer));
                        }
                    }
                    None => {}
                }
            }
        }
    }

    fn send(&mut self, p: Publish) {
        use std::fmt::Write;
        let token = self.next_token;
        self.next_token += 1;
        let mut headers =
            p.tag.headers.get_or_init(|| session_headers(&p.tag, &self.ctx.cfg.gateway_id)).clone();
        let mut msg_id = String::with_capacity(p.tag.session_hex.len() + 21);
        let _ = write!(msg_id, "{}-{}", p.tag.session_hex, p.number);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        let mut reply = String::with_capacity(self.inbox.len() + 20);
        let _ = write!(reply, "{}{token}", self.inbox);
        let msg = OutboundMessage {
            subject: p.tag.subject.clone(),
            reply: Some(Subject::from(reply)),
            payload: p.payload.clone(),
            headers: Some(headers),
        };
        self.outbox.push_back((token, msg));
        self.in_flight.insert(token, InFlight { publish: p, sent: None });
    }

    fn on_ack(&mut self, msg: async_nats::Message) {
        let token = msg.subject.as_str().rsplit('.').next().and_then(|t| t.parse::<u64>().ok());
        // A late answer to an attempt that timed out and went out again: the retry's answer
        // settles it.
        let Some(f) = token.and_then(|t| self.in_flight.remove(&t)) else { return };
        match stored_as(msg.status, &msg.payload) {
            Some(duplicate) => {
                let stats = &self.ctx.stats;
                if let Some(sent) = f.sent {
                    stats.ack_latency.record(sent.elapsed());
                }
                stats.published.fetch_add(1, Ordering::Relaxed);
                if duplicate {
                    stats.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                self.stored(f.publish);
            }
            _ => {
                let why = String::from_utf8_lossy(&msg.payload);
                self.refused(f.publish, msg.status.map(|s| s.as_u16()), &why);
            }
        }
    }

    /// Tell the shard, and send the session's next uplink.
    fn stored(&mut self, p: Publish) {
        self.ctx.unsettled.fetch_sub(1, Ordering::AcqRel);
        if let Some(tx) = self.ctx.shards.get(p.shard) {
            let _ = tx.send(Down::Stored { session: p.tag.session });
        }
        let session = p.tag.session;
        match self.waiting.get_mut(&session).and_then(VecDeque::pop_front) {
            Some(next) => self.send(next),
            None => {
                self.waiting.remove(&session);
            }
        }
    }

    fn refused(&mut self, mut p: Publish, status: Option<u16>, why: &str) {
        self.ctx.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(subject = %p.tag.subject, ?status, %why, "nats: publish not stored; retrying");
        let due = Instant::now() + p.retry_in;
        p.retry_in = (p.retry_in * 2).min(RETRY_MAX);
        self.next_token += 1;
        self.retries.insert((due, self.next_token), p);
    }

    fn on_tick(&mut self, now: Instant) {
        while let Some(&(sent, token)) = self.order.front() {
            if !self.in_flight.contains_key(&token) {
                self.order.pop_front();
            } else if sent + ACK_TIMEOUT <= now {
                self.order.pop_front();
                if let Some(f) = self.in_flight.remove(&token) {
                    self.refused(f.publish, None, "no acknowledgement in time");
                }
            } else {
                break;
            }
        }
        while self.retries.first_key_value().is_some_and(|((due, _), _)| *due <= now) {
            if let Some((_, p)) = self.retries.pop_first() {
                self.send(p);
            }
        }
    }

    /// Hand the client as many made messages as its command channel takes; `Err` once the
    /// client is closed. A message the client refuses (bigger than the server's
    /// `max_payload`, which it learns anew at each connection) is an uplink refused like any
    /// other, retried and counted; the dispatcher goes on.
    fn poll_hand_over(
        &mut self,
        sink: &mut async_nats::Client,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<(), ()>> {
        let mut sink = std::pin::Pin::new(sink);
        while !self.outbox.is_empty() {
            match sink.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Pending => return Poll::Pending,
            }
            if let Some((token, m)) = self.outbox.pop_front() {
                if let Err(e) = sink.as_mut().start_send(m) {
                    match self.in_flight.remove(&token) {
                        Some(f) => self.refused(f.publish, None, &e.to_string()),
                        None => tracing::warn!(error = %e, "nats: a downlink answer could not be sent"),
                    }
                    continue;
                }
                if let Some(f) = self.in_flight.get_mut(&token) {
                    let now = Instant::now();
                    f.sent = Some(now);
                    self.order.push_back((now, token));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Route everything the shards send, and store their uplinks (see the module's doc).
pub(super) async fn dispatch(ctx: Arc<Ctx>, up: flume::Receiver<Vec<Up>>) {
    let inbox = format!("{}.", ctx.client.new_inbox());
    let mut acks = loop {
        match ctx.client.subscribe(format!("{inbox}*")).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "nats: cannot subscribe to publish acknowledgements; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let mut u = Uplinks {
        ctx: ctx.clone(),
        inbox,
        next_token: 1,
        in_flight: FastMap::default(),
        order: VecDeque::new(),
        waiting: FastMap::default(),
        retries: BTreeMap::new(),
        outbox: VecDeque::new(),
    };
    let mut sink = ctx.client.clone();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shards_gone = false;
    // Once the shards are gone, finish what they handed over.
    while !shards_gone || u.busy() {
        tokio::select! {
            // Work comes in bursts (a shard's batch, an acknowledgement per stored uplink):
            // take what is already here before another turn of this loop polls every branch.
            batch = up.recv_async(), if !shards_gone => match batch {
                Ok(batch) => {
                    batch.into_iter().for_each(|m| u.take(m));
                    while let Ok(batch) = up.try_recv() {
                        batch.into_iter().for_each(|m| u.take(m));
                    }
                }
                Err(_) => shards_gone = true,
            },
            Some(ack) = acks.next() => {
                u.on_ack(ack);
                while let Some(Some(ack)) = acks.next().now_or_never() {
                    u.on_ack(ack);
                }
            }
            handed = std::future::poll_fn(|cx| u.poll_hand_over(&mut sink, cx)), if !u.outbox.is_empty() => {
                if handed.is_err() {
                    tracing::warn!("nats: the client is closed; uplinks not stored stay unacknowledged");
                    return;
                }
            }
            _ = tick.tick(), if u.busy() => u.on_tick(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::StatusCode;

    #[test]
    fn only_an_acknowledgement_naming_a_stream_counts_as_stored() {
        assert_eq!(stored_as(None, br#"{"stream":"USMP_UP","seq":7}"#), Some(false));
        assert_eq!(stored_as(None, br#"{"stream":"USMP_UP","seq":7,"duplicate":true}"#), Some(true));
        assert_eq!(stored_as(Some(StatusCode::OK), br#"{"stream":"USMP_UP","seq":1}"#), Some(false));
        // Refusals and non-answers: retried, never reported as stored.
        let refused = br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#;
        assert_eq!(stored_as(None, refused), None);
        assert_eq!(stored_as(None, br#"{"stream":"US\u004dP_UP","seq":2}"#), Some(false));
        let both = br#"{"stream":"USMP_UP","error":{"code":500,"description":"x"}}"#;
        assert_eq!(stored_as(None, both), None);
        assert_eq!(stored_as(Some(StatusCode::NO_RESPONDERS), b""), None);
        assert_eq!(stored_as(None, b""), None);
        assert_eq!(stored_as(None, b"+OK"), None);
        assert_eq!(stored_as(None, br#"{"seq":1}"#), None);
    }
}
