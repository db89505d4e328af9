//! Helpers shared by the NATS bridge tests: the key, device ids, the reference peer script,
//! Rust devices on their own threads, and reading the uplink stream back.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use usmp::{Client, ClientConfig, Transport};

use super::pyref;

/// The fleet key of the NATS tests.
pub const PSK: &[u8] = b"nats-bridge-test-key-0123456789";

/// `PSK` as hex, for `--psk-hex` and the reference client.
pub fn psk_hex() -> String {
    PSK.iter().map(|b| format!("{b:02x}")).collect()
}

/// Device id `n` (distinct per test through `base`).
pub fn dev(base: u8, n: u8) -> [u8; 6] {
    [0x0a, base, 0, 0, 0, n]
}

/// 12 lowercase hex digits.
pub fn token(d: &[u8; 6]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Start the reference device: `nats_peer.py send` (stdout piped, JSON lines).
pub fn reference_sender(addr: SocketAddr, t: Transport, device: [u8; 6], count: usize, tag: &str) -> Child {
    let proto = if t == Transport::Udp { "udp" } else { "tcp" };
    Command::new(pyref::python())
        .arg(pyref::script("nats_peer.py"))
        .args(["send", "--port", &addr.port().to_string(), "--protocol", proto])
        .args(["--psk-hex", &psk_hex(), "--device-id-hex", &token(&device)])
        .args(["--count", &count.to_string(), "--tag", tag])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The JSON lines a reference peer printed (until it exits).
pub fn lines_of(child: &mut Child) -> Vec<serde_json::Value> {
    let out = child.stdout.take().unwrap();
    BufReader::new(out).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect()
}

/// A Rust device's config.
pub fn config(addr: SocketAddr, t: Transport, device: [u8; 6]) -> ClientConfig {
    ClientConfig { transport: t, device_id: Some(device), ..ClientConfig::new(addr, PSK) }
}

/// A Rust device on its own thread sending `count` messages `tag-i`, then BYE.
pub fn rust_sender(
    addr: SocketAddr,
    t: Transport,
    device: [u8; 6],
    count: usize,
    tag: &str,
) -> std::thread::JoinHandle<()> {
    let tag = tag.to_string();
    std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, t, device)).await.unwrap();
            for i in 0..count {
                c.send(format!("{tag}-{i}").as_bytes()).await.unwrap();
            }
            c.disconnect().await;
        })
    })
}

/// One stored uplink.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Every message of stream `name`, in stream order.
pub async fn read_stream(js: &async_nats::jetstream::Context, name: &str) -> Vec<Stored> {
    let mut stream = js.get_stream(name).await.unwrap();
    let info = stream.info().await.unwrap().clone();
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let Ok(m) = stream.get_raw_message(seq).await else { continue };
        let headers = m
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.first().map(|v| v.to_string()).unwrap_or_default()))
            .collect();
        out.push(Stored { subject: m.subject.to_string(), payload: m.payload.to_vec(), headers });
    }
    out
}

/// Wait until stream `name` holds at least `n` messages (or `d` passes); how many it holds.
pub async fn wait_stream_len(js: &async_nats::jetstream::Context, name: &str, n: u64, d: Duration) -> u64 {
    let end = std::time::Instant::now() + d;
    loop {
        let have = match js.get_stream(name).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        if have >= n || std::time::Instant::now() > end {
            return have;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request on `subject`; the reply's `status`.
pub async fn request_status(client: &async_nats::Client, subject: String, payload: &[u8]) -> String {
    let req = async_nats::Request::new()
        .payload(bytes::Bytes::copy_from_slice(payload))
        .timeout(Some(Duration::from_secs(25)));
    let m = client.send_request(subject, req).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    v["status"].as_str().unwrap().to_string()
}
