//! A shard's thread: pinned to its core, its own monoio runtime, the shard's background tasks
//! (inbox, sweeper, evictor, application, UDP) and its TCP accept loop, then a graceful
//! shutdown.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpListener;

use super::bind::ShardSockets;
use super::registry::links;
use super::shard::Shard;
use super::tcp::accept_loop;
use super::{Command, Handler, Shared};
use crate::rt::conn::{CloseReason, Conn};
use crate::rt::{now, wire};

/// Thread body of shard `idx`.
pub(super) fn run(
    idx: usize,
    shared: Arc<Shared>,
    sockets: ShardSockets,
    inbox: flume::Receiver<Command>,
    handler: Arc<Handler>,
) {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let pick = match &shared.cfg.cpus {
        Some(list) if !list.is_empty() => Some(list[idx % list.len()]),
        _ if !cores.is_empty() => Some(cores[idx % cores.len()].id),
        _ => None,
    };
    if let Some(id) = pick {
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            tracing::warn!(
                shard = idx,
                core = id,
                "cannot pin shard to its core (outside the allowed CPU set?); running unpinned"
            );
        }
    }
    let app = match &*handler {
        Handler::App(a) => Some(a.on_shard(idx)),
        _ => None,
    };
    let tcp_links = links(idx, &handler, app.as_ref(), None);
    let shard = Rc::new(Shard::new(idx, shared, app, tcp_links));
    let preferred = shard.shared.cfg.io_driver;
    let (_, driver) = crate::rt::run_with(preferred, shard_main(shard, sockets, inbox, handler));
    tracing::debug!(shard = idx, ?driver, "shard exited");
}

async fn shard_main(
    shard: Rc<Shard>,
    sockets: ShardSockets,
    inbox: flume::Receiver<Command>,
    handler: Arc<Handler>,
) {
    tracing::info!(
        shard = shard.idx,
        driver = if monoio::utils::is_legacy() { "epoll" } else { "io_uring" },
        "shard started"
    );
    // Background tasks are awaited at shutdown: a runtime dropped with pending tasks leaks them.
    let mut background = vec![
        monoio::spawn(super::inbox::inbox_loop(shard.clone(), inbox)),
        monoio::spawn(super::sweeper::sweeper(shard.clone())),
        monoio::spawn(super::sweeper::evictor(shard.clone())),
    ];
    if let Some(app) = &shard.app {
        background.push(monoio::spawn(app.clone().run(super::app::ShardContext { shard: shard.clone() })));
    }
    let udp = match sockets.udp.map(|u| wire::random::<32>(&shard.rng).map(|secret| (u, secret))) {
        Some(Ok((u, secret))) => match super::udp::UdpShard::new(u, secret, &shard, &handler) {
            Ok(udp) => {
                let endpoint = Rc::downgrade(&udp);
                *shard.on_success.borrow_mut() = Some(Box::new(move |ip, device, at| {
                    if let Some(u) = endpoint.upgrade() {
                        u.remember(ip, device, at);
                    }
                }));
                background.extend(super::udp::start(&shard, &udp, handler.clone()));
                Some(udp)
            }
            Err(e) => {
                tracing::error!(shard = shard.idx, error = %e, "cannot register UDP socket");
                None
            }
        },
        _ => None,
    };
    match sockets.tcp.map(TcpListener::from_std) {
        Some(Ok(l)) => accept_loop(&shard, l, &handler).await,
        Some(Err(e)) => tracing::error!(shard = shard.idx, error = %e, "cannot register listener"),
        None => {
            while !shard.is_stopping() {
                let stop = shard.stopping.wait();
                if shard.is_stopping() {
                    break;
                }
                stop.await;
            }
        }
    }
    // Graceful shutdown: handshakes in progress are abandoned, every session gets BYE, and
    // we wait for them (bounded), then exit.
    let pending: Vec<Rc<dyn Fn()>> = shard.pending.borrow().iter().map(|(_, p)| p.evict.clone()).collect();
    for evict in pending {
        evict();
    }
    let conns: Vec<Rc<Conn>> = shard.sessions.borrow().iter().map(|(_, l)| l.conn.clone()).collect();
    for c in &conns {
        c.close(CloseReason::Shutdown, true);
    }
    let deadline = now() + shard.shared.cfg.shutdown_grace;
    while (!shard.sessions.borrow().is_empty() || shard.handshakes.get() > 0) && now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(udp) = &udp {
        super::udp::stop(&shard, udp);
    }
    // Every background task watches `stopping`; give them a bounded moment to return.
    let _ = monoio::time::timeout(Duration::from_secs(2), async {
        for t in background {
            t.await;
        }
    })
    .await;
}
