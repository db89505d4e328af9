//! Inline message handlers (`GatewayBuilder::serve_messages`, what the binary's modes run on):
//! echo over both transports for every size class, replies queued behind each other, a hook
//! that panics or closes ends only its own session, and finished sessions are unregistered.

use std::time::{Duration, Instant};

use usmp::{Client, ClientConfig, CloseReason, Gateway, GatewayHandle, PskSource, Transport};

const PSK: &[u8] = b"inline-handler-test-key-0123";

fn gateway() -> Gateway {
    Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .psk(PskSource::single(PSK).unwrap())
        .serve_messages(|s, m| match m {
            b"PANIC" => panic!("message hook panics on purpose"),
            b"CLOSE" => s.close(),
            b"TWICE" => {
                s.try_send(b"one").unwrap();
                s.try_send(b"two").unwrap();
            }
            _ => s.try_send(m).unwrap(),
        })
        .unwrap()
}

fn config(addr: std::net::SocketAddr, t: Transport) -> ClientConfig {
    ClientConfig { transport: t, ..ClientConfig::new(addr, PSK) }
}

async fn wait_sessions(h: &GatewayHandle, n: usize) {
    let t = Instant::now();
    while h.session_count() != n && t.elapsed() < Duration::from_secs(10) {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.session_count(), n);
}

#[test]
fn inline_echo_of_every_size_over_tcp_and_udp() {
    let gw = gateway();
    let (addr, h) = (gw.local_addr(), gw.handle());
    usmp::block_on(async move {
        for t in [Transport::Tcp, Transport::Udp] {
            let c = Client::connect(&config(addr, t)).await.unwrap();
            // 452 fits one frame (opened in place); 453 and 1808 are reassembled.
            for size in [0usize, 1, 452, 453, 1808] {
                let msg: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
                c.send(&msg).await.unwrap();
                assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), msg, "{t:?} size {size}");
            }
            // A burst: replies queue behind each other (UDP: one in flight at a time).
            for i in 0..50u8 {
                c.send(&[i; 64]).await.unwrap();
            }
            for i in 0..50u8 {
                assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), vec![i; 64], "{t:?}");
            }
            c.send(b"TWICE").await.unwrap();
            assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"one");
            assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"two");
            wait_sessions(&h, 1).await;
            c.disconnect().await;
            // The session is unregistered once it ended (UDP: by the shard's reaper).
            wait_sessions(&h, 0).await;
        }
    });
    let s = gw.handle().stats();
    assert_eq!(s.sessions_open_tcp + s.sessions_open_udp, 0, "{s:?}");
    gw.shutdown();
}

#[test]
fn a_panicking_or_closing_hook_ends_only_its_own_session() {
    let gw = gateway();
    let (addr, h) = (gw.local_addr(), gw.handle());
    usmp::block_on(async move {
        for t in [Transport::Tcp, Transport::Udp] {
            for word in [&b"PANIC"[..], b"CLOSE"] {
                let bystander = Client::connect(&config(addr, t)).await.unwrap();
                let victim = Client::connect(&config(addr, t)).await.unwrap();
                wait_sessions(&h, 2).await;
                victim.send(word).await.unwrap();
                // The victim's session ends with BYE from the gateway...
                assert!(victim.recv_timeout(Duration::from_secs(5)).await.is_err());
                assert_eq!(victim.close_reason(), Some(CloseReason::PeerBye), "{t:?}");
                wait_sessions(&h, 1).await;
                // ...and the other session on the same shard goes on.
                bystander.send(b"still here").await.unwrap();
                assert_eq!(bystander.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"still here");
                bystander.disconnect().await;
                victim.disconnect().await;
                wait_sessions(&h, 0).await;
            }
        }
    });
    gw.shutdown();
}
