//! A shard's inbox: cross-shard work (downlinks, broadcasts, kicks, lockout events, session
//! listings, key revalidation, shutdown) handled on the shard that owns the sessions.

use std::rc::Rc;

use super::shard::Shard;
use super::stats::ShardStats;
use super::Command;
use crate::proto::DeviceId;
use crate::proto::ErrorKind;
use crate::psk::KeyState;
use crate::rt::conn::{CloseReason, Conn};
use crate::rt::Error;

pub(super) async fn inbox_loop(shard: Rc<Shard>, inbox: flume::Receiver<Command>) {
    // Nothing below awaits a session: one device that takes no output must not hold up the
    // downlinks, kicks, lockout events and listings of every other session on the shard.
    loop {
        let stop = shard.stopping.wait();
        if shard.is_stopping() && inbox.is_empty() {
            shard.stopping.notify();
            return;
        }
        let cmd = monoio::select! {
            c = inbox.recv_async() => c,
            _ = stop => continue,
        };
        let Ok(cmd) = cmd else { return };
        match cmd {
            Command::SendTo { device_id, msg, reply } => {
                let r = match live_conn(&shard, &device_id) {
                    Some(conn) => conn.try_send(&msg).map_err(|e| busy(&shard, e)),
                    None => Err(Error::misuse(ErrorKind::NotConnected, "device not connected")),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            Command::Broadcast(msg) => {
                let conns: Vec<Rc<Conn>> =
                    shard.sessions.borrow().iter().map(|(_, l)| l.conn.clone()).collect();
                for c in conns {
                    let _ = c.try_send(&msg).map_err(|e| busy(&shard, e));
                }
            }
            Command::Kick(device_id) => {
                if let Some(conn) = live_conn(&shard, &device_id) {
                    tracing::info!(device = %DeviceId::new(device_id), "session kicked");
                    conn.end(CloseReason::Kicked);
                }
            }
            Command::Lockout { ip, device, failed, at } => {
                shard.apply_lockout(ip, &device, failed, at, false)
            }
            Command::ListSessions(reply) => {
                let rows = shard
                    .sessions
                    .borrow()
                    .iter()
                    .map(|(_, l)| {
                        let st = l.conn.stats();
                        super::SessionRow {
                            info: l.info(shard.idx),
                            frames_in: st.frames_in,
                            frames_out: st.frames_out,
                        }
                    })
                    .collect();
                let _ = reply.send(rows);
            }
            Command::Revalidate(before) => {
                let Some(psk) = shard.shared.cfg.psk.as_ref() else { continue };
                let now = match psk {
                    crate::psk::PskSource::Registry { current, .. } => Some(current.read().clone()),
                    _ => None,
                };
                // A device whose key (its own, else the wildcard) changed was authenticated
                // with a key no longer in force: end its session too.
                let rotated = |d: &[u8; 6]| match (&before, &now) {
                    (Some(b), Some(n)) => b.raw_key(d) != n.raw_key(d),
                    _ => false,
                };
                let revoked: Vec<(Rc<Conn>, &str)> = shard
                    .sessions
                    .borrow()
                    .iter()
                    .filter_map(|(_, l)| {
                        let d = l.conn.device_id();
                        let why = match psk.key_state(&d) {
                            KeyState::Unknown => return None,
                            KeyState::Removed => "key removed",
                            KeyState::Key(fp) if fp != l.key || rotated(&d) => "key rotated",
                            KeyState::Key(_) => return None,
                        };
                        Some((l.conn.clone(), why))
                    })
                    .collect();
                for (c, why) in revoked {
                    tracing::info!(device = %DeviceId::new(c.device_id()), peer = %c.peer(), why, "session closed: key revoked");
                    c.end(CloseReason::Revoked);
                }
            }
            Command::Shutdown => {
                shard.stopping.notify();
                return;
            }
        }
    }
}

/// A downlink a session could not take: count a full queue ("busy") for the operator.
fn busy(shard: &Shard, e: Error) -> Error {
    if e.kind() == ErrorKind::Timeout {
        ShardStats::inc(&shard.stats().downlinks_busy);
    }
    e
}

fn live_conn(shard: &Shard, device_id: &[u8; 6]) -> Option<Rc<Conn>> {
    let key = *shard.by_device.borrow().get(device_id)?;
    shard.sessions.borrow().get(key).map(|l| l.conn.clone())
}
