//! UDP, live against the reference SDK in both directions.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use usmp::{Client, ClientConfig, ErrorKind, Transport};

const PSK: &[u8] = b"udp-interop-key-0123456789";

fn udp(addr: SocketAddr) -> ClientConfig {
    ClientConfig { transport: Transport::Udp, ..ClientConfig::new(addr, PSK) }
}

#[test]
fn our_udp_client_against_the_python_udp_server() {
    let srv = common::pyref::RefServer::start("udp", PSK, "rekey-echo");
    usmp::block_on(async {
        let c = Client::connect(&udp(srv.addr)).await.unwrap();
        for n in [0usize, 1, 452, 453, 1808] {
            let m: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            c.send(&m).await.unwrap();
            assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), m, "size {n}");
        }
        assert_eq!(c.send(&[0; 1809]).await.unwrap_err().kind(), ErrorKind::Payload);
        c.ping().unwrap();
        for i in 0..75u32 {
            c.send(&i.to_le_bytes()).await.unwrap();
            assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), i.to_le_bytes());
        }
        c.rekey().unwrap();
        for i in 0..5u32 {
            c.send(&i.to_be_bytes()).await.unwrap();
            assert_eq!(
                c.recv_timeout(Duration::from_secs(10)).await.unwrap(),
                i.to_be_bytes(),
                "after our rekey"
            );
        }
        c.send(b"REKEY-NOW").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), b"REKEYED");
        c.send(b"after their rekey").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), b"after their rekey");
        c.disconnect().await;
    });
    let srv = common::pyref::RefServer::start("udp", PSK, "bye-after-echo");
    usmp::block_on(async {
        let c = Client::connect(&udp(srv.addr)).await.unwrap();
        c.send(b"one").await.unwrap();
        assert_eq!(c.recv_timeout(Duration::from_secs(10)).await.unwrap(), b"one");
        assert!(c.recv_timeout(Duration::from_secs(10)).await.is_err());
        assert_eq!(c.close_reason(), Some(usmp::CloseReason::PeerBye));
    });
}
