//! A backend that answers every device uplink with a downlink of the same bytes, through NATS
//! only: it reads `usmp.up.>` and requests `usmp.down.<device>`. With `usmp-gateway --mode
//! nats` and `loadgen --mode echo`, the load generator's echo then crosses the whole path
//! (device → gateway → JetStream → this → gateway → device); `bench/nats-echo` runs it.
//!
//! ```sh
//! cargo run --release --example nats_responder -- nats://127.0.0.1:4222 [PREFIX]
//! ```
//!
//! It reads uplinks with a core queue subscription (as cheap as a reader gets: every gateway
//! publish is also a core message); a production backend would use a durable JetStream
//! consumer on `USMP_UP` instead, to survive its own restarts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let prefix = args.next().unwrap_or_else(|| "usmp".into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let client = async_nats::connect(&url).await.unwrap_or_else(|e| {
            eprintln!("nats_responder: cannot connect to {url}: {e}");
            std::process::exit(2)
        });
        let mut sub =
            client.queue_subscribe(format!("{prefix}.up.>"), "usmp-responder".into()).await.unwrap();
        client.flush().await.unwrap();
        eprintln!("nats_responder: answering {prefix}.up.> on {url}");
        let stats: Arc<[AtomicU64; 3]> = Arc::new(Default::default()); // delivered, other, failed
        let report = stats.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let [d, o, f] = &*report;
                eprintln!(
                    "nats_responder: delivered {} other {} failed {}",
                    d.load(Ordering::Relaxed),
                    o.load(Ordering::Relaxed),
                    f.load(Ordering::Relaxed)
                );
            }
        });
        while let Some(msg) = sub.next().await {
            let Some(device) = msg.subject.rsplit('.').next().map(String::from) else { continue };
            let (client, stats, prefix) = (client.clone(), stats.clone(), prefix.clone());
            tokio::spawn(async move {
                let req =
                    async_nats::Request::new().payload(msg.payload).timeout(Some(Duration::from_secs(30)));
                match client.send_request(format!("{prefix}.down.{device}"), req).await {
                    Ok(r) if r.payload.starts_with(br#"{"status":"delivered""#) => &stats[0],
                    Ok(_) => &stats[1],
                    Err(_) => &stats[2],
                }
                .fetch_add(1, Ordering::Relaxed);
            });
        }
    });
}
