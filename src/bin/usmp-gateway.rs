//! `usmp-gateway`: the USMP gateway as a service. Run without any key for a quick start: it
//! generates one, prints it once, and echoes every message back.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use clap::{Parser, ValueEnum};
use usmp::gateway::{Config, Gateway, Session, Transports};
use usmp::psk::{parse_hex, to_hex, validate_key, ConfigError, PskSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// TCP and UDP on the same port number.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Reply with the same bytes.
    Echo,
    /// Reply with a short acknowledgement (`ACK`).
    Ack,
    /// Print one JSON line per message on stdout; reply nothing.
    Log,
}

/// Thread-per-core io_uring gateway for USMP devices.
#[derive(Debug, Parser)]
#[command(name = "usmp-gateway", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:9000", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// Transports to serve, on the same port number.
    #[arg(long, value_enum, default_value = "both")]
    transport: TransportArg,
    /// Shard threads (default: one per core).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Pin shard i to the i-th listed core, e.g. `0,1` or `2-5`.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// One key for every device, as text (≥ 16 bytes).
    #[arg(long, value_name = "STRING", group = "key")]
    psk: Option<String>,
    /// One key for every device, as hex (≥ 16 bytes).
    #[arg(long, value_name = "HEX", group = "key")]
    psk_hex: Option<String>,
    /// Device registry: one `device_id key` per line (see README).
    #[arg(long, value_name = "PATH", group = "key")]
    psk_file: Option<std::path::PathBuf>,
    /// What to do with each message.
    #[arg(long, value_enum, default_value = "echo")]
    mode: Mode,
    /// Bound on the whole handshake, seconds.
    #[arg(long, value_name = "SECS", default_value = "10")]
    handshake_timeout: f64,
    /// Inactivity watchdog, seconds.
    #[arg(long, value_name = "SECS", default_value = "60")]
    session_timeout: f64,
    /// Sessions gateway-wide (0 = unlimited).
    #[arg(long, value_name = "N", default_value = "0")]
    max_sessions: usize,
    /// Sessions per source IP (0 = unlimited).
    #[arg(long, value_name = "N", default_value = "0")]
    max_per_ip: usize,
    /// Handshakes in progress per shard.
    #[arg(long, value_name = "N", default_value = "4096")]
    max_handshakes: usize,
}

fn parse_cpus(s: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError::new("--cpus", format!("`{s}` is not a core list like `0,1` or `2-5`"));
    let mut out = vec![];
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

fn secs(field: &str, v: f64) -> Result<Duration, ConfigError> {
    if !(v.is_finite() && v > 0.0) {
        return Err(ConfigError::new(field, "must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn build_config(a: &Args) -> Result<(Config, Option<String>), ConfigError> {
    let mut generated = None;
    let psk = if let Some(p) = &a.psk {
        validate_key("--psk", p.as_bytes())?;
        PskSource::single(p.as_bytes())?
    } else if let Some(h) = &a.psk_hex {
        let key =
            parse_hex(h).ok_or_else(|| ConfigError::new("--psk-hex", "not an even-length hex string"))?;
        validate_key("--psk-hex", &key)?;
        PskSource::single(&key)?
    } else if let Some(path) = &a.psk_file {
        PskSource::registry_file(path)?
    } else {
        let mut key = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| ConfigError::new("--psk", "no randomness to generate a key"))?;
        let text = to_hex(&key);
        generated = Some(text.clone());
        PskSource::single(text.as_bytes())?
    };
    let mut cfg = Config {
        listen: a.listen,
        transports: match a.transport {
            TransportArg::Tcp => Transports::Tcp,
            TransportArg::Udp => Transports::Udp,
            TransportArg::Both => Transports::Both,
        },
        psk: Some(psk),
        handshake_timeout: secs("--handshake-timeout", a.handshake_timeout)?,
        session_timeout: secs("--session-timeout", a.session_timeout)?,
        max_sessions: a.max_sessions,
        max_per_ip: a.max_per_ip,
        max_handshakes_per_shard: a.max_handshakes,
        ..Config::default()
    };
    if let Some(n) = a.shards {
        if n == 0 {
            return Err(ConfigError::new("--shards", "must be at least 1"));
        }
        cfg.shards = n;
    }
    if a.max_handshakes == 0 {
        return Err(ConfigError::new("--max-handshakes", "must be at least 1"));
    }
    if let Some(c) = &a.cpus {
        cfg.cpus = Some(parse_cpus(c)?);
    }
    Ok((cfg, generated))
}

/// RFC 3339 UTC timestamp with microseconds (no extra dependency for one format).
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

async fn handle(session: Session, mode: Mode) {
    while let Ok(msg) = session.recv().await {
        let sent = match mode {
            Mode::Echo => session.send(&msg).await,
            Mode::Ack => session.send(b"ACK").await,
            Mode::Log => {
                let line = serde_json::json!({
                    "device_id": session.device_id(),
                    "session_id": session.session_id(),
                    "timestamp": rfc3339(SystemTime::now()),
                    "payload": base64::engine::general_purpose::STANDARD.encode(&msg),
                });
                println!("{line}");
                Ok(())
            }
        };
        if sent.is_err() {
            break;
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (cfg, generated) = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("usmp-gateway: error: {e}");
            return ExitCode::from(2);
        }
    };
    let mode = if generated.is_some() { Mode::Echo } else { args.mode };
    if let Some(key) = &generated {
        tracing::warn!("no key configured: generated a one-off PSK for this run (echo mode)");
        eprintln!("USMP PSK (text, {} bytes): {key}", key.len());
    }
    let shards = cfg.shards;
    let transports = match cfg.transports {
        Transports::Tcp => "tcp",
        Transports::Udp => "udp",
        Transports::Both => "tcp+udp",
    };
    let gw = match Gateway::builder().config(cfg).serve(move |s| handle(s, mode)) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("usmp-gateway: error: cannot start on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    tracing::info!(address = %gw.local_addr(), shards, transports, mode = ?mode, "usmp-gateway listening");
    let handle = gw.handle();
    std::thread::spawn(move || {
        let mut signals = match signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ]) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return;
            }
        };
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "shutting down: BYE to every session");
            handle.shutdown();
        }
    });
    gw.wait();
    tracing::info!("usmp-gateway stopped");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(5);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000005Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpus("2-4,7").unwrap(), vec![2, 3, 4, 7]);
        assert_eq!(parse_cpus("x").unwrap_err().field, "--cpus");
        assert!(parse_cpus("3-1").is_err());
    }
}
