//! Peers that stop reading (issue 15, items 1 and 2), over real sockets: a TCP device that
//! shrinks its receive buffer and never reads must not keep a session, its descriptor and
//! its limit slot for good, and must not hold up the rest of its shard.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::raw::RawDevice;
use usmp::{DeviceId, ErrorKind, Gateway, GatewayHandle, PskSource, Session};

const PSK: &[u8] = b"stall-test-key-0123456789";
const BIG: [u8; 1808] = [0x5a; 1808];

fn builder() -> usmp::GatewayBuilder {
    Gateway::builder().listen("127.0.0.1:0".parse().unwrap()).shards(1).psk(PskSource::single(PSK).unwrap())
}

async fn drain(s: Session) {
    while s.recv().await.is_ok() {}
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// Write sealed messages without blocking until the gateway stops taking them (or `for_at_most`).
fn write_until_blocked(dev: &mut RawDevice, for_at_most: Duration) {
    dev.stream.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < for_at_most {
        let f = dev.seal(&[7u8; 1000]);
        let mut off = 0;
        while off < f.len() {
            match dev.stream.write(&f[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t0.elapsed() > for_at_most {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
    }
}

/// Downlinks to `device` until its queue has answered "busy" for 300 ms straight: the
/// socket buffers (megabytes on loopback) are full and our queue with them.
fn fill_until_stalled(h: &GatewayHandle, device: DeviceId) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let (mut queued, mut busy_since) = (0, None::<Instant>);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        // A shard that awaited a stalled session would never answer: fail, do not hang.
        let answer = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), h.deliver(device, &BIG)).await });
        match answer.expect("the shard answers while one of its sessions is stalled") {
            Ok(()) => {
                queued += 1;
                busy_since = None;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Timeout, "busy, not {e}");
                let since = *busy_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(300) {
                    return queued;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    panic!("the queue of {device} never stayed full");
}

/// The watchdog fires on a session whose reader paused (its echoes do not leave), and its
/// BYE can never leave either: the session must still end, and free its limit slot.
#[test]
fn a_peer_that_never_reads_cannot_keep_its_session_or_its_slot() {
    let gw = builder()
        .max_sessions(1)
        .session_timeout(Duration::from_secs(1))
        .close_grace(Duration::from_secs(1))
        .serve_messages(|s, m| {
            let _ = s.try_send(m);
        })
        .unwrap();
    let (addr, h) = (gw.local_addr(), gw.handle());
    let mut hog = RawDevice::connect_small(addr, PSK, [1; 6], 2048);
    wait_for("the session is up", Duration::from_secs(5), || h.session_count() == 1);
    let t0 = Instant::now();
    write_until_blocked(&mut hog, Duration::from_secs(3));
    wait_for("the stalled session ends", Duration::from_secs(8), || h.session_count() == 0);
    eprintln!("stalled session ended {:?} after the hog started writing", t0.elapsed());
    let s = h.stats();
    // Its reader paused, so the watchdog or the stalled-output rule ends it, whichever
    // comes first; both abandon the output that cannot leave.
    assert_eq!((s.closed_watchdog + s.closed_stalled, s.sessions_closed), (1, 1), "{s:?}");
    // Its slot is free: with max_sessions = 1 a new device gets in.
    let mut next = RawDevice::connect(addr, PSK, [2; 6]);
    let hi = next.seal(b"hi");
    next.write(&hi);
    assert!(next.next_frame().is_some(), "the next device is served");
    drop(hog);
    gw.shutdown();
}

/// A BYE queued behind output the peer never takes: the close grace bounds the wait.
#[test]
fn a_bye_stuck_behind_output_is_abandoned_after_the_close_grace() {
    let gw = builder()
        .close_grace(Duration::from_secs(1))
        .serve(|s: Session| async move {
            // Queue far more than the peer's window and the socket buffers take, then say
            // BYE: it is queued behind output that never leaves.
            let mut busy = 0;
            while busy < 30 {
                match s.try_send(&BIG) {
                    Ok(()) => busy = 0,
                    Err(_) => {
                        busy += 1;
                        monoio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            s.close();
            drain(s).await;
        })
        .unwrap();
    let h = gw.handle();
    let t0 = Instant::now();
    let _hog = RawDevice::connect_small(gw.local_addr(), PSK, [3; 6], 2048);
    wait_for("the closing session ends", Duration::from_secs(8), || h.stats().sessions_closed == 1);
    eprintln!("closing session reset {:?} after it started", t0.elapsed());
    assert_eq!(h.stats().closed_stalled, 1, "ended by the close grace, and counted");
    gw.shutdown();
}

/// A peer that keeps sending (so the watchdog never fires) but takes none of our output:
/// the session ends once its output has not moved for the watchdog's length.
#[test]
fn output_that_does_not_move_for_the_watchdog_ends_an_active_session() {
    let gw = builder().session_timeout(Duration::from_secs(1)).serve(drain).unwrap();
    let h = gw.handle();
    let mut dev = RawDevice::connect_small(gw.local_addr(), PSK, [4; 6], 2048);
    wait_for("the session is up", Duration::from_secs(5), || h.session_count() == 1);
    let t0 = Instant::now();
    let queued = fill_until_stalled(&h, DeviceId::new([4; 6]));
    eprintln!("{queued} downlinks queued before the output stalled");
    // Alive on the receive side: a message every 100 ms.
    while h.session_count() == 1 && t0.elapsed() < Duration::from_secs(8) {
        let f = dev.seal(b"still here");
        if dev.stream.write_all(&f).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("the session ends", Duration::from_millis(500), || h.session_count() == 0);
    eprintln!("stalled output ended an active session after {:?}: {:?}", t0.elapsed(), h.stats());
    assert!(t0.elapsed() < Duration::from_secs(6), "within the watchdog plus a sweep");
    assert_eq!(h.stats().closed_stalled, 1);
    gw.shutdown();
}

/// Item 2: a device with a full queue is answered "busy" at once; a downlink to another
/// device on the same shard arrives at once; kicking the stalled device works.
#[test]
fn a_stalled_device_never_holds_up_its_shard() {
    let gw = builder().serve(drain).unwrap();
    let (addr, h) = (gw.local_addr(), gw.handle());
    let _hog = RawDevice::connect_small(addr, PSK, [5; 6], 2048);
    let mut other = RawDevice::connect(addr, PSK, [6; 6]);
    wait_for("both sessions are up", Duration::from_secs(5), || h.session_count() == 2);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let hog = DeviceId::new([5; 6]);
    // Until it stays busy: a first refusal can come while the kernel is still taking what
    // the gateway writes, and the queue then has room again a moment later.
    let busy_after = fill_until_stalled(&h, hog);
    eprintln!("busy after {busy_after} downlinks of 1808 B");
    assert!(h.stats().downlinks_busy >= 1, "busy is counted");
    // A broadcast reaches the other device and is counted busy for the hog.
    let t0 = Instant::now();
    let other_id = DeviceId::new([6; 6]);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(2), h.deliver(other_id, b"for the other one")).await
    })
    .expect("the shard answers at once")
    .unwrap();
    other.stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let f = other.next_frame().expect("the downlink arrives");
    let mut f = f.clone();
    let got = match other.session.open(&mut f, Duration::ZERO).unwrap() {
        usmp::proto::session::Received::Message(m) => m.to_vec(),
        _ => panic!("expected a message"),
    };
    assert_eq!(got, b"for the other one");
    assert!(t0.elapsed() < Duration::from_millis(500), "at once: {:?}", t0.elapsed());
    let before = h.stats().downlinks_busy;
    h.broadcast(b"all").unwrap();
    wait_for("the broadcast copy for the hog is counted busy", Duration::from_secs(2), || {
        h.stats().downlinks_busy > before
    });
    // Kicking the stalled device ends its session although its BYE cannot leave.
    assert!(h.kick(hog));
    wait_for("the kicked hog's session ends", Duration::from_secs(2), || h.session_count() == 1);
    gw.shutdown();
}

/// The gateway's accepted socket whose peer is `client` (found among this process's
/// descriptors, since the gateway runs in it): its `TCP_USER_TIMEOUT` once set, and whether
/// it has `TCP_NODELAY`.
fn accepted_user_timeout(client: std::net::SocketAddr) -> Option<(Duration, bool)> {
    use std::os::fd::BorrowedFd;
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // SAFETY: the descriptor is only queried (getpeername, getsockopt), never closed or
        // kept; if another thread closes it meanwhile, the calls fail or describe another
        // socket, whose peer then does not match.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let s = socket2::SockRef::from(&fd);
        let peer = s.peer_addr().ok().and_then(|a| a.as_socket());
        if peer == Some(client) {
            let nodelay = s.nodelay().unwrap_or(false);
            return s.tcp_user_timeout().ok().flatten().map(|t| (t, nodelay));
        }
    }
    None
}

/// Item 1's kernel backstop: every accepted TCP socket carries `TCP_USER_TIMEOUT`, twice the
/// watchdog and at least 30 s, so a peer that acknowledges nothing we send (zero-window
/// probes included) is given up by the kernel even if the gateway's own checks failed. And
/// `TCP_NODELAY`: replies are small frames that must not wait for Nagle.
#[test]
fn accepted_sockets_carry_tcp_user_timeout_from_the_watchdog() {
    for (watchdog, want) in [(20, 40), (5, 30)] {
        let gw = builder().session_timeout(Duration::from_secs(watchdog)).serve(drain).unwrap();
        let client = std::net::TcpStream::connect(gw.local_addr()).unwrap();
        let me = client.local_addr().unwrap();
        let mut got = None;
        wait_for("the gateway accepts and sets the option", Duration::from_secs(5), || {
            got = accepted_user_timeout(me);
            got.is_some()
        });
        // Both come from the listener (inherited on accept, no system call per connection).
        assert_eq!(got, Some((Duration::from_secs(want), true)), "watchdog {watchdog} s");
        drop(client);
        gw.shutdown();
    }
}

/// A session handler that blocks its shard's thread on `FREEZE` (as a misbehaving
/// application could): the shard takes nothing from its inbox meanwhile.
async fn freezes_on_request(s: Session) {
    while let Ok(m) = s.recv().await {
        if m == b"FREEZE" {
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

/// Item 2: the shard inbox is bounded. While a shard takes nothing, downlinks fill it up to a
/// headroom and are then refused as busy (counted); an operator's kick still gets in, and
/// takes effect once the shard runs again.
#[test]
fn a_full_shard_inbox_refuses_downlinks_but_keeps_room_for_a_kick() {
    let gw = builder().serve(freezes_on_request).unwrap();
    let (addr, h) = (gw.local_addr(), gw.handle());
    let mut dev = RawDevice::connect(addr, PSK, [7; 6]);
    let id = DeviceId::new([7; 6]);
    wait_for("the session is up", Duration::from_secs(5), || h.session_count() == 1);
    let freeze = dev.seal(b"FREEZE");
    dev.write(&freeze);
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let mut accepted = 0;
    let refused = loop {
        match h.send_to(id, b"x") {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted <= usmp::gateway::INBOX_CAP, "the inbox is bounded");
    };
    assert!(t0.elapsed() < Duration::from_secs(1), "the frozen shard was not waited for");
    assert_eq!(refused.kind(), ErrorKind::Timeout, "{refused}");
    assert!(accepted >= usmp::gateway::INBOX_CAP / 2, "only {accepted} downlinks were taken");
    assert!(h.broadcast(b"all").is_err(), "a broadcast is refused as busy too");
    assert!(h.stats().inbox_full >= 2, "refusals are counted");
    assert!(h.kick(id), "the kick gets in although downlinks are refused");
    // Once the shard runs again, the queued downlinks go out and the kick ends the session.
    wait_for("the kicked session ends", Duration::from_secs(10), || h.session_count() == 0);
    gw.shutdown();
}

/// Item 1: revocation, like a kick, removes a session whose peer takes nothing: its BYE
/// could never leave, so the output is abandoned and the socket reset at once.
#[test]
fn revoking_a_stalled_devices_key_ends_its_session_at_once() {
    let mut reg = usmp::psk::Registry::new();
    reg.insert([5; 6], PSK).unwrap();
    reg.insert([6; 6], PSK).unwrap();
    let gw = Gateway::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        // Long timers: only the revocation can end the stalled session within the test.
        .session_timeout(Duration::from_secs(60))
        .close_grace(Duration::from_secs(60))
        .psk(PskSource::registry(reg))
        .serve(drain)
        .unwrap();
    let (addr, h) = (gw.local_addr(), gw.handle());
    let hog = RawDevice::connect_small(addr, PSK, [5; 6], 2048);
    let _other = RawDevice::connect(addr, PSK, [6; 6]);
    wait_for("both sessions are up", Duration::from_secs(5), || h.session_count() == 2);
    fill_until_stalled(&h, DeviceId::new([5; 6]));
    let mut kept = usmp::psk::Registry::new();
    kept.insert([6; 6], PSK).unwrap();
    h.replace_keys(kept);
    let took =
        wait_for("the revoked, stalled session ends", Duration::from_secs(3), || h.session_count() == 1);
    eprintln!("revoked stalled session ended after {took:?}");
    assert_eq!(h.sessions()[0].device_id, DeviceId::new([6; 6]), "the other device keeps its session");
    assert_eq!(h.stats().sessions_closed, 1, "{:?}", h.stats());
    drop(hog);
    gw.shutdown();
}
