//! A device that keeps its session across gateway restarts: reconnects with backoff
//! (2 s doubling to 60 s) and fresh keys, sending one reading every 5 seconds.
//! `cargo run --example reconnect_client -- 127.0.0.1:9000 <psk>`

use std::time::Duration;

use usmp::client::{Backoff, ReconnectingClient};
use usmp::ClientConfig;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9000".into()).parse().expect("ADDR:PORT");
    let psk = args.next().expect("usage: reconnect_client ADDR:PORT PSK");
    usmp::block_on(async move {
        let cfg = ClientConfig { keepalive: Some(Duration::from_secs(20)), ..ClientConfig::new(addr, psk) };
        let mut device = ReconnectingClient::new(cfg, Backoff::default());
        for reading in 0u32.. {
            match device.send(&reading.to_le_bytes()).await {
                Ok(()) => println!("sent reading {reading} (connects so far: {})", device.connects),
                Err(e) => eprintln!("send failed: {e}"),
            }
            monoio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}
