//! Connect to a gateway, send a few messages and print the echoes.
//! `cargo run --example echo_client -- 127.0.0.1:9000 <psk>`

use std::time::Duration;

use usmp::{Client, ClientConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9000".into()).parse().expect("ADDR:PORT");
    let psk = args.next().expect("usage: echo_client ADDR:PORT PSK");
    usmp::block_on(async move {
        let client = Client::connect(&ClientConfig::new(addr, psk.into_bytes())).await.expect("connect");
        println!("connected: device {} session {}", client.device_id(), client.session_id());
        for msg in [&b"hello"[..], &[], &[7u8; 1808]] {
            client.send(msg).await.expect("send");
            let back = client.recv_timeout(Duration::from_secs(5)).await.expect("recv");
            println!("sent {} bytes, got {} back, equal: {}", msg.len(), back.len(), back == msg);
        }
        client.disconnect().await;
    });
}
