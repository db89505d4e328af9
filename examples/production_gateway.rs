//! The reference seeds' production gateway in Rust: a device registry, session tracking,
//! commands to one device and to all, and error handling per error kind.
//! `cargo run --example production_gateway -- devices.txt`

use std::time::Duration;

use usmp::{ErrorKind, Gateway, PskSource, Session};

async fn handle(session: Session) {
    println!("up: {} {} from {}", session.device_id(), session.session_id(), session.peer_addr());
    loop {
        match session.recv_timeout(Duration::from_secs(30)).await {
            Ok(msg) if msg == b"status" => {
                let _ = session.send(b"ok").await;
            }
            Ok(msg) => println!("{}: {} bytes", session.device_id(), msg.len()),
            Err(e) => match e.kind() {
                // Quiet device: check it is still there (the watchdog ends it otherwise).
                ErrorKind::Timeout => {
                    let _ = session.ping();
                }
                ErrorKind::ConnectionClosed | ErrorKind::NotConnected => break,
                other => {
                    eprintln!("{}: {} ({})", session.device_id(), e, other.class_name());
                    break;
                }
            },
        }
    }
    println!("down: {} ({:?})", session.device_id(), session.close_reason());
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = std::env::args().nth(1).unwrap_or_else(|| "devices.txt".into());
    let gw = Gateway::builder()
        .listen("0.0.0.0:9000".parse()?)
        .psk(PskSource::registry_file(&registry)?)
        .session_timeout(Duration::from_secs(120))
        .on_timeout(|device, session| eprintln!("timeout: {device} {session}"))
        .serve(handle)?;
    let handle = gw.handle();
    // A backend thread: command one device, then everyone, every minute.
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(60));
        for s in handle.sessions() {
            if let Err(e) = handle.send_to(s.device_id, b"report") {
                eprintln!("send_to {}: {e}", s.device_id);
            }
        }
        let _ = handle.broadcast(b"tick");
    });
    gw.wait();
    Ok(())
}
