//! A seeded, lossy UDP relay for tests (no `tc netem` here): drops, duplicates and delays
//! (reorders) datagrams in both directions. Each direction has its own seeded generator, so
//! for the same datagram sequence the same datagrams are hit.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counters: dropped, duplicated, delayed.
pub type ProxyStats = Arc<[AtomicU64; 3]>;

pub struct LossyProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub stats: ProxyStats,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pct(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

/// How long a delayed datagram is held (unless the next one in its direction comes first).
const DELAY: Duration = Duration::from_millis(15);

impl LossyProxy {
    /// Relay between one client (the first to send) and `upstream`; percentages per datagram.
    pub fn start(upstream: SocketAddr, seed: u64, loss: u64, dup: u64, reorder: u64) -> LossyProxy {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        back.connect(upstream).unwrap();
        let addr = front.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stats: ProxyStats = Arc::new(Default::default());
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let mut threads = vec![];
        for dir in 0..2u64 {
            let (front, back, stop, stats, client) =
                (front.clone(), back.clone(), stop.clone(), stats.clone(), client.clone());
            threads.push(std::thread::spawn(move || {
                let (from, to) = if dir == 0 { (&front, &back) } else { (&back, &front) };
                from.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
                let mut rng = Rng((seed.wrapping_mul(2654435761) ^ (dir + 1)).max(1));
                let mut held: Option<(Vec<u8>, Instant)> = None;
                let mut buf = [0u8; 4096];
                let send = |d: &[u8]| {
                    if dir == 0 {
                        let _ = to.send(d);
                    } else if let Some(c) = *client.lock().unwrap() {
                        let _ = to.send_to(d, c);
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let got = from.recv_from(&mut buf).ok();
                    if got.is_none() && held.as_ref().is_some_and(|(_, at)| at.elapsed() >= DELAY) {
                        if let Some((h, _)) = held.take() {
                            send(&h);
                        }
                    }
                    let Some((n, src)) = got else { continue };
                    if dir == 0 {
                        *client.lock().unwrap() = Some(src);
                    }
                    let d = buf[..n].to_vec();
                    if rng.pct(loss) {
                        stats[0].fetch_add(1, Ordering::Relaxed);
                    } else if held.is_none() && rng.pct(reorder) {
                        stats[2].fetch_add(1, Ordering::Relaxed);
                        held = Some((d, Instant::now()));
                        continue;
                    } else {
                        send(&d);
                        if rng.pct(dup) {
                            stats[1].fetch_add(1, Ordering::Relaxed);
                            send(&d);
                        }
                    }
                    // A later datagram overtook the held one: now release it (reordered).
                    if let Some((h, _)) = held.take() {
                        send(&h);
                    }
                }
            }));
        }
        LossyProxy { addr, stop, stats, threads }
    }

    pub fn counts(&self) -> (u64, u64, u64) {
        let s = &self.stats;
        (s[0].load(Ordering::Relaxed), s[1].load(Ordering::Relaxed), s[2].load(Ordering::Relaxed))
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
