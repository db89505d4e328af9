//! A client that re-handshakes (fresh keys every time) after losing its session, backing off
//! 2 s, 4 s, … up to 60 s between attempts, as device firmware does, with jitter: a fleet
//! that lost its gateway at the same instant does not come back in lockstep.

use std::time::Duration;

use super::{Client, ClientConfig};
use crate::rt::Error;

/// Exponential backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(2), max: Duration::from_secs(60) }
    }
}

impl Backoff {
    /// Delay before attempt `n` (0-based) after a failure.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max)
    }

    /// [`Backoff::delay`] with "equal jitter": uniform in [delay/2, delay], `r` a random u32.
    pub fn jittered(&self, attempt: u32, r: u32) -> Duration {
        let d = self.delay(attempt);
        d / 2 + (d / 2).mul_f64(f64::from(r) / f64::from(u32::MAX))
    }
}

fn random_u32() -> u32 {
    crate::rt::wire::random::<4>(&ring::rand::SystemRandom::new()).map_or(0, u32::from_le_bytes)
}

/// Keeps one session alive across gateway restarts and network loss.
pub struct ReconnectingClient {
    cfg: ClientConfig,
    backoff: Backoff,
    client: Option<Client>,
    /// Successful handshakes so far.
    pub connects: u64,
}

impl ReconnectingClient {
    /// A wrapper that connects lazily with `cfg` (the device id is fixed at creation).
    pub fn new(mut cfg: ClientConfig, backoff: Backoff) -> Self {
        if cfg.device_id.is_none() {
            cfg.device_id = crate::rt::wire::random::<6>(&ring::rand::SystemRandom::new()).ok();
        }
        ReconnectingClient { cfg, backoff, client: None, connects: 0 }
    }

    /// The live client, reconnecting (with backoff, until `give_up_after` attempts) if needed.
    pub async fn client(&mut self, give_up_after: u32) -> Result<&Client, Error> {
        if self.client.as_ref().is_some_and(|c| c.close_reason().is_some()) {
            self.client = None;
            // Lost, maybe with the whole fleet at once: spread the first attempts over
            // [0, initial) instead of every device reconnecting in the same instant.
            let spread = self.backoff.initial.mul_f64(f64::from(random_u32()) / f64::from(u32::MAX));
            monoio::time::sleep(spread).await;
        }
        if self.client.is_none() {
            let mut attempt = 0;
            loop {
                match Client::connect(&self.cfg).await {
                    Ok(c) => {
                        self.connects += 1;
                        self.client = Some(c);
                        break;
                    }
                    Err(e) if attempt + 1 >= give_up_after => return Err(e),
                    Err(_) => {
                        monoio::time::sleep(self.backoff.jittered(attempt, random_u32())).await;
                        attempt += 1;
                    }
                }
            }
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Send, reconnecting first if the session was lost.
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.client(u32::MAX).await?.send(msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_2s_to_60s() {
        let b = Backoff::default();
        let got: Vec<u64> = (0..7).map(|i| b.delay(i).as_secs()).collect();
        assert_eq!(got, vec![2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn retries_are_jittered_within_half_to_all_of_the_delay() {
        let b = Backoff::default();
        for attempt in 0..7 {
            let d = b.delay(attempt);
            assert_eq!(b.jittered(attempt, 0), d / 2);
            assert_eq!(b.jittered(attempt, u32::MAX), d);
        }
        let draws: std::collections::HashSet<Duration> =
            (0..64).map(|_| b.jittered(3, random_u32())).collect();
        assert!(draws.len() > 32, "random spread, not one value: {draws:?}");
        assert!(draws.iter().all(|d| (Duration::from_secs(8)..=Duration::from_secs(16)).contains(d)));
    }

    /// The reconnect loop sleeps the jittered delays: clients failing together finish their
    /// attempts at different times, each between the sum of the half delays and the delays.
    #[test]
    fn failed_reconnects_back_off_with_jitter() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into(); // nothing listens now
        let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
        let took: Vec<Duration> = crate::rt::block_on(async {
            let tries = (0..8).map(|_| async {
                let mut c =
                    ReconnectingClient::new(ClientConfig::new(addr, &b"0123456789abcdef"[..]), backoff);
                let t0 = std::time::Instant::now();
                assert!(c.client(4).await.is_err(), "nothing listens");
                t0.elapsed()
            });
            futures_util::future::join_all(tries).await
        });
        // Three sleeps of 100, 200 and 400 ms, each jittered into [half, all].
        let (least, most) = (Duration::from_millis(350), Duration::from_millis(700));
        assert!(took.iter().all(|t| *t >= least), "{took:?}");
        assert!(took.iter().any(|t| *t < most - Duration::from_millis(100)), "no jitter: {took:?}");
    }
}
