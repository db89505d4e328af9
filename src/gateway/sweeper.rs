//! A shard's two housekeeping tasks: the sweeper (the watchdog of every session, key
//! parking, live-traffic gauges, lockout pruning) and the evictor of stalled handshakes.

use std::rc::Rc;
use std::time::Duration;

use super::shard::{Shard, Ticket};
use super::stats::ShardStats;
use crate::proto::{DeviceId, SessionId};
use crate::rt::conn::{CloseReason, Conn};
use crate::rt::now;

/// Under pressure (handshake table ⅞ full), handshakes older than this may be evicted: legitimate devices finish in a few round trips; a flood of idle or never-finishing
/// handshakes otherwise holds the slots for the whole handshake timeout.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// A pending handshake as the evictor sees it: start time, ticket, how to stop it.
type Evictable = (Duration, Ticket, Rc<dyn Fn()>);

/// Under pressure (the handshake table ⅞ full), evict the oldest handshakes pending for longer
/// than [`EVICT_AFTER`] until it is ¾ full. Only near the limit, and only as many as needed:
/// a reconnect storm on a busy shard has many slow but legitimate handshakes, and evicting them
/// throws away the X25519 already spent on them.
pub(super) async fn evictor(shard: Rc<Shard>) {
    let max = shard.shared.cfg.max_handshakes_per_shard;
    let (high, low) = ((max * 7).div_ceil(8), (max * 3) / 4);
    loop {
        let stop = shard.stopping.wait();
        if shard.is_stopping() {
            return;
        }
        monoio::select! {
            _ = monoio::time::sleep(Duration::from_millis(100)) => {},
            _ = stop => continue,
        }
        let len = shard.pending.borrow().len();
        if len < high.max(1) {
            continue;
        }
        let t = now();
        let mut old: Vec<Evictable> = shard
            .pending
            .borrow()
            .iter()
            .filter(|(_, p)| t.saturating_sub(p.started) > EVICT_AFTER)
            .map(|(k, p)| (p.started, (k, p.id), p.evict.clone()))
            .collect();
        old.sort_by_key(|(started, _, _)| *started);
        old.truncate(len.saturating_sub(low));
        if !old.is_empty() {
            tracing::info!(
                shard = shard.idx,
                evicted = old.len(),
                "handshake table under pressure: evicting stalled handshakes"
            );
        }
        for (_, ticket, evict) in old {
            ShardStats::inc(&shard.stats().handshakes_evicted);
            shard.unregister_pending(ticket);
            evict();
        }
    }
}

/// Sessions the sweeper looks at before letting the shard's other tasks run. In one go, a
/// sweep of 50 000 sessions held the shard for tens of milliseconds every tick, and that
/// showed as the p99 latency of every message arriving meanwhile.
const SWEEP_CHUNK: usize = 512;

/// The watchdog for every session of the shard, key parking, the live-traffic gauges, plus
/// lockout pruning.
pub(super) async fn sweeper(shard: Rc<Shard>) {
    let timeout = shard.shared.cfg.session_timeout;
    let tick = (timeout / 20).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut last_prune = now();
    loop {
        let stop = shard.stopping.wait();
        if shard.is_stopping() && shard.sessions.borrow().is_empty() {
            return;
        }
        monoio::select! {
            _ = monoio::time::sleep(tick) => {},
            _ = stop => {},
        }
        let t = now();
        let mut sweep = Sweep::default();
        let mut next = 0;
        loop {
            next = sweep_chunk(&shard, t, next, &mut sweep);
            if next >= shard.sessions.borrow().capacity() {
                break;
            }
            crate::rt::yield_now().await;
        }
        ShardStats::set(&shard.stats().sessions_parked, sweep.parked);
        for c in sweep.stalled {
            let (dev, stalled) = (DeviceId::new(c.device_id()), c.out_stalled_since());
            let secs = stalled.map_or(0.0, |s| t.saturating_sub(s).as_secs_f64());
            tracing::info!(device = %dev, peer = %c.peer(), closing = ?c.close_reason(), stalled_secs = secs, "session output stalled: abandoned and reset");
            ShardStats::inc(&shard.stats().closed_stalled);
            c.abort(CloseReason::Stalled);
        }
        if shard.is_stopping() {
            // The shutdown command may have found the inbox full: the flag is enough.
            shard.stopping.notify();
        }
        for c in sweep.expired {
            if c.close_reason().is_some() {
                continue;
            }
            let (dev, sid) = (DeviceId::new(c.device_id()), SessionId::new(c.session_id()));
            tracing::info!(device = %dev, session = %sid, "session timed out (watchdog)");
            ShardStats::inc(&shard.stats().closed_watchdog);
            if let Some(hook) = &shard.shared.cfg.on_timeout {
                hook(dev, sid);
            }
            c.end(CloseReason::Watchdog);
        }
        if t.saturating_sub(last_prune) > Duration::from_secs(10) {
            shard.lockout.borrow_mut().prune(t);
            last_prune = t;
        }
        for key in shard.lockout.borrow_mut().take_ended(t) {
            tracing::info!(ip = %key.ip(), ?key, "lockout ended");
        }
        publish_gauges(&shard, t, &sweep.live);
        if shard.is_stopping() && shard.sessions.borrow().is_empty() {
            return;
        }
    }
}

/// What one sweep found.
#[derive(Default)]
struct Sweep {
    parked: u64,
    expired: Vec<Rc<Conn>>,
    /// Output stalled beyond the watchdog (open) or the close grace (closing).
    stalled: Vec<Rc<Conn>>,
    live: crate::rt::conn::ConnStats,
}

/// Sweep the sessions with slab keys `from..from + SWEEP_CHUNK`; returns the next key.
fn sweep_chunk(shard: &Shard, t: Duration, from: usize, sweep: &mut Sweep) -> usize {
    let cfg = &shard.shared.cfg;
    let (timeout, park_after, grace) = (cfg.session_timeout, cfg.park_keys_after, cfg.close_grace);
    let sessions = shard.sessions.borrow();
    let to = (from + SWEEP_CHUNK).min(sessions.capacity());
    for l in (from..to).filter_map(|k| sessions.get(k)) {
        let st = l.conn.stats();
        sweep.live.frames_in += st.frames_in;
        sweep.live.frames_out += st.frames_out;
        sweep.live.bytes_in += st.bytes_in;
        sweep.live.bytes_out += st.bytes_out;
        let stalled = l.conn.out_stalled_since().map(|s| t.saturating_sub(s));
        if l.conn.close_reason().is_some() {
            if !l.conn.is_done() && stalled.is_some_and(|d| d > grace) {
                sweep.stalled.push(l.conn.clone());
            }
            continue;
        }
        if stalled.is_some_and(|d| d > timeout) {
            sweep.stalled.push(l.conn.clone());
            continue;
        }
        if t.saturating_sub(l.conn.last_rx()) > timeout {
            sweep.expired.push(l.conn.clone());
        } else if l.conn.park_if_idle(t, park_after) {
            sweep.parked += 1;
        }
    }
    to
}

/// Publish the gauges the metrics thread reads (live traffic, active lockouts), off the frame path.
fn publish_gauges(shard: &Shard, t: Duration, live: &crate::rt::conn::ConnStats) {
    let s = shard.stats();
    ShardStats::set(&s.live_frames_in, live.frames_in);
    ShardStats::set(&s.live_frames_out, live.frames_out);
    ShardStats::set(&s.live_bytes_in, live.bytes_in);
    ShardStats::set(&s.live_bytes_out, live.bytes_out);
    ShardStats::set(&s.lockouts_active, shard.lockout.borrow().active(t) as u64);
}
