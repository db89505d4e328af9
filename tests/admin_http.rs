//! The admin listener under abuse (issue 15, item 10), with a real HTTP client over loopback:
//! slow-drip clients cannot take `/healthz` down, chunked bodies arrive whole, requests
//! naming another host or coming from another origin are refused.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use usmp::ops::{self, OpsOptions};
use usmp::{Client, ClientConfig, Gateway, PskSource, Session};

const PSK: &[u8] = b"admin-http-test-key-0123";

async fn sink(s: Session) {
    while s.recv().await.is_ok() {}
}

fn gateway() -> Gateway {
    Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .psk(PskSource::single(PSK).unwrap())
        .serve(sink)
        .unwrap()
}

fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn slow_drip_clients_cannot_take_healthz_down_and_are_cut_at_the_deadline() {
    let gw = gateway();
    let srv = ops::serve("127.0.0.1:0".parse().unwrap(), gw.handle(), OpsOptions::default()).unwrap();
    let addr = srv.local_addr();
    let mut slow: Vec<TcpStream> = (0..128).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in &mut slow {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ").unwrap();
    }
    let t0 = Instant::now();
    let r = ureq::get(&format!("http://{addr}/healthz")).timeout(Duration::from_secs(3)).call().unwrap();
    assert_eq!(r.into_string().unwrap(), "ok\n");
    assert!(t0.elapsed() < Duration::from_secs(1), "healthz took {:?}", t0.elapsed());
    // Dripping a byte now and then does not extend the whole-request deadline.
    let start = Instant::now();
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    let mut closed = 0;
    while closed < slow.len() && start.elapsed() < Duration::from_secs(9) {
        closed = 0;
        for s in &mut slow {
            let _ = s.write_all(b"a");
            let mut b = [0u8; 256];
            match s.read(&mut b) {
                Ok(_) => closed += 1,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => closed += 1,
            }
        }
    }
    assert_eq!(closed, slow.len(), "every slow client is cut off");
    assert!(start.elapsed() < Duration::from_secs(8), "within the deadline: {:?}", start.elapsed());
    drop(srv);
    gw.shutdown();
}

#[test]
fn chunked_bodies_arrive_whole_and_reason_phrases_are_real() {
    let gw = gateway();
    let srv = ops::serve("127.0.0.1:0".parse().unwrap(), gw.handle(), OpsOptions::default()).unwrap();
    let (addr, h) = (srv.local_addr(), gw.handle());
    let gw_addr = gw.local_addr();
    usmp::block_on(async move {
        let c = Client::connect(&ClientConfig { device_id: Some([1; 6]), ..ClientConfig::new(gw_addr, PSK) })
            .await
            .unwrap();
        while h.session_count() < 1 {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        let resp = std::thread::spawn(move || {
            raw(
                addr,
                b"POST /devices/010101010101/send HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n7\r\nchunked\r\n0\r\n\r\n",
            )
        })
        .join()
        .unwrap();
        assert!(resp.starts_with("HTTP/1.1 202 Accepted\r\n"), "{resp}");
        assert_eq!(c.recv_timeout(Duration::from_secs(5)).await.unwrap(), b"hello chunked");
        let big = format!("POST /broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n", 1809, "x".repeat(1809));
        let resp = std::thread::spawn(move || raw(addr, big.as_bytes())).join().unwrap();
        assert!(resp.starts_with("HTTP/1.1 413 Payload Too Large\r\n"), "{resp}");
        c.disconnect().await;
    });
    drop(srv);
    gw.shutdown();
}

#[test]
fn other_hosts_and_origins_cannot_use_the_admin_api() {
    let gw = gateway();
    let opts = OpsOptions { allowed_hosts: vec!["gw.example".into()], ..Default::default() };
    let srv = ops::serve("127.0.0.1:0".parse().unwrap(), gw.handle(), opts).unwrap();
    let addr = srv.local_addr();
    let post = |host: &str, extra: &str| {
        let r = raw(
            addr,
            format!("POST /broadcast HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 2\r\n\r\nhi")
                .as_bytes(),
        );
        r.split_whitespace().nth(1).unwrap_or("").to_string()
    };
    let me = format!("127.0.0.1:{}", addr.port());
    assert_eq!(post("attacker.example", ""), "403", "DNS rebinding: a name that is not ours");
    assert_eq!(post(&me, "Origin: http://attacker.example\r\n"), "403", "CSRF from a page");
    assert_eq!(post(&me, "Sec-Fetch-Site: cross-site\r\n"), "403");
    assert_eq!(post(&me, &format!("Origin: http://{me}\r\n")), "202", "same origin");
    assert_eq!(post(&me, ""), "202");
    assert_eq!(post("localhost", ""), "202");
    assert_eq!(post("gw.example:9100", ""), "202", "an allowed name");
    let r =
        ureq::get(&format!("http://{addr}/metrics")).set("Host", "prometheus-target.example").call().unwrap();
    assert_eq!(r.status(), 200, "metrics answer any Host");
    drop(srv);
    gw.shutdown();
}

/// Header parsing is linear and bounded: thousands of tiny header lines, or one huge one, are
/// refused at once (431, or the connection closed) and the listener goes on serving.
#[test]
fn header_floods_are_refused_at_once() {
    let gw = gateway();
    let srv = ops::serve("127.0.0.1:0".parse().unwrap(), gw.handle(), OpsOptions::default()).unwrap();
    let addr = srv.local_addr();
    let many: String = (0..3000).map(|i| format!("x{i}:y\r\n")).collect();
    let huge = format!("X-Big: {}\r\n", "a".repeat(256 * 1024));
    for headers in [many, huge] {
        let t0 = Instant::now();
        let req = format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(req.as_bytes()); // the server may stop reading and close early
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{}", out.lines().next().unwrap_or(""));
        assert!(t0.elapsed() < Duration::from_secs(2), "refused after {:?}", t0.elapsed());
    }
    let r = ureq::get(&format!("http://{addr}/healthz")).timeout(Duration::from_secs(3)).call().unwrap();
    assert_eq!(r.into_string().unwrap(), "ok\n");
    drop(srv);
    gw.shutdown();
}
