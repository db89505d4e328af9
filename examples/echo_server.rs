//! The smallest gateway: one key, echo every message.
//! `cargo run --example echo_server -- 0.0.0.0:9000 a-key-of-16-bytes-or-more`

use usmp::{Gateway, PskSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "0.0.0.0:9000".into()).parse()?;
    let psk = args.next().unwrap_or_else(|| "change-me-0123456789".into());
    let gw = Gateway::builder().listen(listen).psk(PskSource::single(psk.as_bytes())?).serve(
        |session| async move {
            while let Ok(msg) = session.recv().await {
                if session.send(&msg).await.is_err() {
                    break;
                }
            }
        },
    )?;
    println!("echoing on {}", gw.local_addr());
    gw.wait();
    Ok(())
}
