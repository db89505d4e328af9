//! The attack modes (`--mode hello-flood|garbage-flood`): what the gateway's flood defences
//! are measured against.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use monoio::time::Instant;
use usmp::Transport;

use super::{splitmix, Ctx, Flood};

/// One attacker: `rate` attempts per second (0 = back to back) until `end`. Each attempt is a
/// new connection (TCP) or datagram (UDP) carrying a fresh well-formed HELLO or garbage; an
/// attack HELLO waits at most 1 s for a reply and never answers it. Counted as messages sent.
pub(super) async fn flood(ctx: &Ctx, idx: u64, kind: Flood, start: Instant, end: Instant) {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    let interval = (ctx.spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / ctx.spec.rate));
    let local = (!ctx.spec.source_ips.is_empty())
        .then(|| SocketAddr::new(ctx.spec.source_ips[idx as usize % ctx.spec.source_ips.len()], 0));
    let udp = if ctx.spec.transport == Transport::Udp {
        let bind = local.unwrap_or_else(|| "0.0.0.0:0".parse().expect("literal"));
        match std::net::UdpSocket::bind(bind).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(s) => monoio::net::udp::UdpSocket::from_std(s).ok(),
            Err(_) => None,
        }
    } else {
        None
    };
    let mut k = 0u64;
    let rng = ring::rand::SystemRandom::new();
    loop {
        let intended = match interval {
            Some(i) => start + i.mul_f64(k as f64),
            None => Instant::now(),
        };
        if intended >= end {
            return;
        }
        ctx.sched.sleep_until(intended).await;
        k += 1;
        let r = splitmix(idx.wrapping_mul(1_000_003) ^ k);
        let bytes = match kind {
            Flood::Garbage => (0..(r % 200 + 1) as usize).map(|i| splitmix(r ^ i as u64) as u8).collect(),
            Flood::Hello => {
                let mut p = [0u8; 38];
                for (i, b) in p.iter_mut().enumerate() {
                    *b = splitmix(r ^ (i as u64) << 8) as u8;
                }
                // A valid X25519 public key: the basepoint times a random scalar.
                if let Ok(key) = usmp::proto::crypto::EphemeralKey::generate(&rng) {
                    p[6..].copy_from_slice(key.public());
                }
                let mut out = [0u8; 64];
                let n = usmp::proto::frame::encode_frame(usmp::proto::PacketType::Hello, 0, &p, &mut out)
                    .expect("fits");
                out[..n].to_vec()
            }
        };
        ctx.counters.borrow_mut().messages_sent += 1;
        ctx.progress.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = &udp {
            let _ = s.send_to(bytes, ctx.spec.target).await;
            continue;
        }
        let cfg = ctx.config(idx, 0);
        let stream = match cfg.bind {
            Some(l) => {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
                match s.and_then(|s| {
                    s.set_nonblocking(true)?;
                    s.bind(&l.into())?;
                    match s.connect(&ctx.spec.target.into()) {
                        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
                        _ => {}
                    }
                    Ok(s)
                }) {
                    Ok(s) => match monoio::net::TcpStream::from_std(s.into()) {
                        Ok(t) => t.writable(false).await.map(|_| t),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            None => monoio::net::TcpStream::connect_addr(ctx.spec.target).await,
        };
        let Ok(mut stream) = stream else {
            ctx.error("flood_connect_failed".into());
            continue;
        };
        let (res, _) = stream.write_all(bytes).await;
        if res.is_err() {
            continue;
        }
        if kind == Flood::Hello {
            // Read whatever comes (CHALLENGE, or the close), for at most a second; never answer.
            let buf = vec![0u8; 128];
            if let Ok((Ok(n), _)) = monoio::time::timeout(Duration::from_secs(1), stream.read(buf)).await {
                if n > 0 {
                    ctx.counters.borrow_mut().messages_received += 1;
                }
            }
        }
    }
}
