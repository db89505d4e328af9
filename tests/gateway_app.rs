//! Applications on every shard (`GatewayBuilder::serve_app`): acknowledgements held until the
//! application releases them (UDP: the UTACK waits; TCP: reading pauses past a bound) and
//! delivery progress of output (what the NATS bridge's guarantees stand on).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use usmp::gateway::app::{Ack, App, ShardApp, ShardContext};
use usmp::{Client, ClientConfig, CloseReason, Gateway, PskSource, Session, Transport};

const PSK: &[u8] = b"app-hook-test-key-0123456789";

/// What the test's shard half reports.
#[derive(Debug, PartialEq)]
enum Seen {
    Open,
    Message(Vec<u8>),
    Delivered,
    Closed(CloseReason),
}

struct TestApp {
    seen: flume::Sender<Seen>,
    release: flume::Receiver<()>,
    /// Held acknowledgements after which input waits.
    cap: usize,
}

struct TestShard {
    seen: flume::Sender<Seen>,
    release: flume::Receiver<()>,
    cap: usize,
    held: Cell<usize>,
    /// The session and its held UTACKs (UDP).
    sessions: RefCell<Vec<(Session, Vec<Vec<u8>>)>>,
    /// Output position at which the last reply is delivered.
    reply_at: Cell<u64>,
}

impl App for TestApp {
    fn on_shard(&self, _shard: usize) -> Rc<dyn ShardApp> {
        Rc::new(TestShard {
            seen: self.seen.clone(),
            release: self.release.clone(),
            cap: self.cap,
            held: Cell::new(0),
            sessions: RefCell::new(Vec::new()),
            reply_at: Cell::new(0),
        })
    }
}

impl ShardApp for TestShard {
    fn on_open(&self, s: &Session) {
        self.sessions.borrow_mut().push((s.clone(), Vec::new()));
        let _ = self.seen.send(Seen::Open);
    }
    fn on_message(&self, s: &Session, msg: &[u8]) -> Ack {
        let _ = self.seen.send(Seen::Message(msg.to_vec()));
        if msg == b"reply" {
            s.try_send(b"the reply").unwrap();
            self.reply_at.set(s.bytes_queued());
            return Ack::Now;
        }
        self.held.set(self.held.get() + 1);
        Ack::Held
    }
    fn on_ack_held(&self, s: &Session, utack: &[u8]) {
        for (sess, held) in self.sessions.borrow_mut().iter_mut() {
            if sess.same_as(s) {
                held.push(utack.to_vec());
            }
        }
    }
    fn input_blocked(&self, _s: &Session) -> bool {
        self.held.get() >= self.cap
    }
    fn on_output_progress(&self, s: &Session) {
        let at = self.reply_at.get();
        if at > 0 && s.bytes_gone() >= at {
            self.reply_at.set(0);
            let _ = self.seen.send(Seen::Delivered);
        }
    }
    fn on_close(&self, _s: &Session, reason: CloseReason) {
        let _ = self.seen.send(Seen::Closed(reason));
    }
    fn run(self: Rc<Self>, shard: ShardContext) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
        Box::pin(async move {
            let stop = shard.stopped();
            let work = async {
                while self.release.recv_async().await.is_ok() {
                    self.held.set(0);
                    for (s, held) in self.sessions.borrow_mut().iter_mut() {
                        for utack in held.drain(..) {
                            s.release_ack(&utack);
                        }
                        s.resume_input();
                    }
                }
            };
            monoio::select! {
                _ = stop => {}
                _ = work => {}
            }
        })
    }
}

fn gateway(cap: usize) -> (Gateway, flume::Receiver<Seen>, flume::Sender<()>) {
    let (seen_tx, seen) = flume::unbounded();
    let (release, release_rx) = flume::unbounded();
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .psk(PskSource::single(PSK).unwrap())
        .serve_app(TestApp { seen: seen_tx, release: release_rx, cap })
        .unwrap();
    (gw, seen, release)
}

fn config(addr: std::net::SocketAddr, t: Transport) -> ClientConfig {
    ClientConfig { transport: t, ..ClientConfig::new(addr, PSK) }
}

/// Messages seen within `d`.
fn messages_within(seen: &flume::Receiver<Seen>, d: Duration) -> Vec<Vec<u8>> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    while let Ok(s) = seen.recv_deadline(end) {
        if let Seen::Message(m) = s {
            out.push(m);
        }
    }
    out
}

#[test]
fn udp_utack_waits_for_the_release_and_retransmissions_are_not_delivered_twice() {
    let (gw, seen, release) = gateway(1);
    let addr = gw.local_addr();
    let client = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, Transport::Udp)).await.unwrap();
            c.send(b"first").await.unwrap();
            c.send(b"second").await.unwrap();
            // Both reach the gateway only once their UTACKs are released.
            monoio::time::sleep(Duration::from_secs(3)).await;
            c.disconnect().await;
        })
    });
    assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap(), Seen::Open);
    // The device retransmits "first" (about 0.5 s) while its UTACK is held: not delivered again,
    // and "second" cannot go out before "first" is acknowledged.
    assert_eq!(messages_within(&seen, Duration::from_millis(1200)), vec![b"first".to_vec()]);
    release.send(()).unwrap();
    assert_eq!(messages_within(&seen, Duration::from_millis(800)), vec![b"second".to_vec()]);
    release.send(()).unwrap();
    client.join().unwrap();
    gw.shutdown();
}

#[test]
fn tcp_reading_pauses_at_the_held_bound_and_resumes_on_release() {
    let (gw, seen, release) = gateway(2);
    let addr = gw.local_addr();
    let client = std::thread::spawn(move || {
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, Transport::Tcp)).await.unwrap();
            // Six messages in one burst: the gateway takes in two, then stops reading.
            for i in 0..6u8 {
                c.send(&[i; 10]).await.unwrap();
            }
            monoio::time::sleep(Duration::from_secs(3)).await;
            c.disconnect().await;
        })
    });
    assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap(), Seen::Open);
    assert_eq!(messages_within(&seen, Duration::from_millis(600)).len(), 2);
    release.send(()).unwrap();
    assert_eq!(messages_within(&seen, Duration::from_millis(600)), vec![vec![2u8; 10], vec![3u8; 10]]);
    release.send(()).unwrap();
    assert_eq!(messages_within(&seen, Duration::from_millis(600)).len(), 2);
    release.send(()).unwrap();
    client.join().unwrap();
    gw.shutdown();
}

#[test]
fn output_progress_reports_delivery_and_close_reports_the_reason() {
    for t in [Transport::Tcp, Transport::Udp] {
        let (gw, seen, _release) = gateway(100);
        let addr = gw.local_addr();
        usmp::block_on(async move {
            let c = Client::connect(&config(addr, t)).await.unwrap();
            c.send(b"reply").await.unwrap();
            assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"the reply");
            c.disconnect().await;
        });
        let all: Vec<Seen> =
            std::iter::from_fn(|| seen.recv_timeout(Duration::from_secs(3)).ok()).take(4).collect();
        assert_eq!(all[0], Seen::Open, "{t:?}");
        assert_eq!(all[1], Seen::Message(b"reply".to_vec()), "{t:?}");
        assert_eq!(all[2], Seen::Delivered, "{t:?}");
        assert_eq!(all[3], Seen::Closed(CloseReason::PeerBye), "{t:?}");
        gw.shutdown();
    }
}
