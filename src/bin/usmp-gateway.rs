//! `usmp-gateway`: the USMP gateway as a service. Run without any key for a quick start: it
//! generates one, prints it once, and echoes every message back.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use std::path::PathBuf;

use usmp::nats::{NatsBridge, NatsConfig};
use usmp::ops::msglog::{LogApp, MessageLog};
use usmp::ops::settings::{IoDriver, LogFormat, ReplyMode, Resolved, Settings};
use usmp::ops::{self, OpsOptions};
use usmp::{ConfigError, Gateway, PskSource, Session, Transports};

/// `--transport tcp|udp|both`, listed in `--help` as a value enum would be.
fn transports_arg() -> impl clap::builder::TypedValueParser<Value = Transports> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["tcp", "udp", "both"])
        .map(|s| s.parse::<Transports>().expect("one of the listed values"))
}

/// A flag taking one of the listed names (each with its line of help), parsed by the library's
/// `FromStr` for `T`: the same spelling as the config file's.
fn one_of<T, const N: usize>(
    values: [(&'static str, &'static str); N],
) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
{
    use clap::builder::{PossibleValue, TypedValueParser as _};
    clap::builder::PossibleValuesParser::new(values.map(|(name, help)| PossibleValue::new(name).help(help)))
        .map(|s| s.parse::<T>().unwrap_or_else(|_| unreachable!("{s} is one of the listed values")))
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Thread-per-core io_uring gateway for USMP devices.
///
/// Every flag can also be set in the `--config` file (same name, no dashes); flags win.
// No `Debug`: it would print the key and the admin token.
#[derive(Parser)]
#[command(name = "usmp-gateway", version, about)]
struct Args {
    /// TOML config file with any of the settings below.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:9000].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Transports to serve, on the same port number [default: both].
    #[arg(long, value_parser = transports_arg())]
    transport: Option<Transports>,
    /// Shard threads [default: one per core].
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
    /// Device registry: one `device_id key` per line (see README); reloaded on SIGHUP.
    #[arg(long, value_name = "PATH", group = "key")]
    psk_file: Option<PathBuf>,
    /// What to do with each message [default: echo].
    #[arg(long, value_parser = one_of::<ReplyMode, 4>([
        ("echo", "Reply with the same bytes"),
        ("ack", "Reply with a short acknowledgement (`ACK`)"),
        ("log", "Print one JSON line per message on stdout; reply nothing"),
        ("nats", "Store every message in NATS JetStream; downlinks come from NATS (see `--nats`)"),
    ]))]
    mode: Option<ReplyMode>,
    /// The shards' I/O driver [default: uring; epoll if the kernel has no io_uring].
    #[arg(long, value_parser = one_of::<IoDriver, 2>([
        ("uring", "io_uring (epoll when the kernel refuses it)"),
        ("epoll", "epoll (both drivers wait for TCP readiness through one epoll; README's benchmarks compare them)"),
    ]))]
    io_driver: Option<IoDriver>,
    /// Bound on the whole handshake, seconds [default: 10].
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<f64>,
    /// Inactivity watchdog, seconds [default: 60].
    #[arg(long, value_name = "SECS")]
    session_timeout: Option<f64>,
    /// Sessions gateway-wide, 0 = unlimited [default: 0].
    #[arg(long, value_name = "N")]
    max_sessions: Option<usize>,
    /// Sessions per source IP, 0 = unlimited [default: 0].
    #[arg(long, value_name = "N")]
    max_per_ip: Option<usize>,
    /// Handshakes in progress per shard [default: 4096].
    #[arg(long, value_name = "N")]
    max_handshakes: Option<usize>,
    /// Serve Prometheus `/metrics`, `/healthz` and the admin API here.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Bearer token for the admin API (without it the admin API is loopback-only).
    #[arg(long, value_name = "TOKEN")]
    admin_token: Option<String>,
    /// File holding the admin bearer token (first line); keeps it out of `ps`. The
    /// `USMP_ADMIN_TOKEN` environment variable is read when neither token flag is given.
    #[arg(long, value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
    /// Host name an admin request may name in `Host` besides IP addresses and `localhost`
    /// (repeatable; against DNS rebinding).
    #[arg(long, value_name = "NAME")]
    admin_host: Vec<String>,
    /// Log line format [default: text].
    #[arg(long, value_parser = one_of::<LogFormat, 2>([
        ("text", "Human-readable lines"),
        ("json", "One JSON object per line"),
    ]))]
    log_format: Option<LogFormat>,
    /// UDP: HELLOs answered per second per source IP (fleets behind NAT) [default: 1000].
    #[arg(long, value_name = "N")]
    cookie_rate_per_ip: Option<f64>,
    /// Handshakes (X25519) started per second per shard, 0 = unlimited [default: 20000].
    #[arg(long, value_name = "N")]
    handshake_rate: Option<f64>,
    /// NATS servers for `--mode nats` [default: nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL[,URL…]")]
    nats: Option<String>,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, value_name = "PATH")]
    nats_creds: Option<PathBuf>,
    /// NATS user (with --nats-password).
    #[arg(long, value_name = "USER")]
    nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(long, value_name = "PASSWORD")]
    nats_password: Option<String>,
    /// CA certificate (PEM) for TLS to NATS.
    #[arg(long, value_name = "PATH")]
    nats_tls_ca: Option<PathBuf>,
    /// First token of every NATS subject [default: usmp].
    #[arg(long, value_name = "P")]
    nats_prefix: Option<String>,
    /// This gateway's name in NATS headers, events and presence [default: host name].
    #[arg(long, value_name = "NAME")]
    gateway_id: Option<String>,
    /// Seconds a downlink for an offline device stays queued, 0 = no queue [default: 3600].
    #[arg(long, value_name = "SECS")]
    downlink_ttl: Option<u64>,
    /// Queued downlinks per device [default: 50].
    #[arg(long, value_name = "N")]
    downlink_queue: Option<u32>,
    /// Device keys from this NATS KV bucket (watched) instead of --psk/--psk-file.
    #[arg(long, value_name = "BUCKET", group = "key")]
    psk_kv: Option<String>,
    /// TCP: a session's uplinks not yet stored before its reading pauses [default: 16].
    #[arg(long, value_name = "N")]
    nats_max_unacked: Option<u32>,
    /// Replicas of the gateway's streams and buckets [default: 1].
    #[arg(long, value_name = "N")]
    nats_replicas: Option<usize>,
    /// Threads of the NATS bridge [default: 1].
    #[arg(long, value_name = "N")]
    nats_threads: Option<usize>,
    /// Microseconds the shards and the bridge gather messages before waking each other
    /// (0: every event-loop turn) [default: 1000].
    #[arg(long, value_name = "MICROS")]
    nats_linger: Option<u64>,
}

impl Args {
    fn settings(&self) -> Settings {
        Settings {
            listen: self.listen,
            transport: self.transport,
            io_driver: self.io_driver,
            shards: self.shards,
            cpus: self.cpus.clone(),
            psk: self.psk.clone(),
            psk_hex: self.psk_hex.clone(),
            psk_file: self.psk_file.clone(),
            mode: self.mode,
            handshake_timeout: self.handshake_timeout,
            session_timeout: self.session_timeout,
            max_sessions: self.max_sessions,
            max_per_ip: self.max_per_ip,
            max_handshakes: self.max_handshakes,
            metrics: self.metrics,
            admin_token: self.admin_token.clone(),
            admin_token_file: self.admin_token_file.clone(),
            admin_hosts: (!self.admin_host.is_empty()).then(|| self.admin_host.clone()),
            log_format: self.log_format,
            cookie_rate_per_ip: self.cookie_rate_per_ip,
            handshake_rate: self.handshake_rate,
            nats: self.nats.clone(),
            nats_creds: self.nats_creds.clone(),
            nats_user: self.nats_user.clone(),
            nats_password: self.nats_password.clone(),
            nats_tls_ca: self.nats_tls_ca.clone(),
            nats_prefix: self.nats_prefix.clone(),
            gateway_id: self.gateway_id.clone(),
            downlink_ttl: self.downlink_ttl,
            downlink_queue: self.downlink_queue,
            psk_kv: self.psk_kv.clone(),
            nats_max_unacked: self.nats_max_unacked,
            nats_replicas: self.nats_replicas,
            nats_threads: self.nats_threads,
            nats_linger: self.nats_linger,
        }
    }

    fn resolve(&self) -> Result<Resolved, ConfigError> {
        let file = match &self.config {
            Some(p) => load(p)?,
            None => Settings::default(),
        };
        file.overlay(self.settings()).resolve()
    }
}

/// Read and parse a TOML config file; errors name the file, and the key where one is wrong.
fn load(path: &std::path::Path) -> Result<Settings, ConfigError> {
    let origin = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::new(&origin, format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| ConfigError::new(&origin, e.to_string().trim_end()))
}

/// The built-in modes answer inline, on the shard that received the message: no task per
/// session (see `GatewayBuilder::serve_messages`).
fn on_message(session: &Session, msg: &[u8], mode: ReplyMode) {
    let sent = match mode {
        ReplyMode::Echo => session.try_send(msg),
        ReplyMode::Ack => session.try_send(b"ACK"),
        // Served by their applications (`LogApp`, the NATS bridge), never by this hook.
        ReplyMode::Log | ReplyMode::Nats => Ok(()),
    };
    // Only a device that stopped taking replies for far too long gets here.
    if sent.is_err() {
        session.close();
    }
}

/// Start the NATS bridge and, with `--psk-kv`, load the fleet keys before devices arrive
/// (bounded: with NATS away the gateway starts and takes the keys when they come).
fn start_bridge(cfg: &NatsConfig, r: &Resolved) -> Result<NatsBridge, ConfigError> {
    let bridge = NatsBridge::start(cfg.clone(), r.config.shards)?;
    // Devices are served either way; waiting a moment only makes a healthy start orderly
    // (streams exist and downlinks are answered before the first device arrives).
    if !bridge.wait_ready(std::time::Duration::from_secs(5)) {
        tracing::warn!(nats = %cfg.urls.join(","), "nats: not reachable yet; starting anyway (uplinks wait, TCP reading pauses, UDP UTACKs are held)");
    }
    if let Some(bucket) = &cfg.psk_kv {
        let Some(PskSource::Registry { current, .. }) = &r.config.psk else {
            return Err(ConfigError::new("--psk-kv", "keys are not a registry"));
        };
        bridge.watch_keys(bucket, current.clone());
        if !bridge.wait_keys(std::time::Duration::from_secs(5)) {
            tracing::warn!(bucket = %bucket, "nats: key bucket not loaded yet; devices are refused until it is");
        }
    }
    tracing::info!(nats = %cfg.urls.join(","), gateway_id = %cfg.gateway_id, prefix = %cfg.prefix, "NATS bridge started");
    Ok(bridge)
}

/// Log lines waiting for stderr before new ones are dropped (and counted).
const LOG_BACKLOG: usize = 64 * 1024;

/// Logs go to stderr from a thread of their own, so a shard never waits for a slow journal,
/// pipe or terminal. Past [`LOG_BACKLOG`] waiting lines new ones are dropped rather than
/// stalling the shards; a watcher reports how many, straight to stderr. Keep the guard until
/// exit: dropping it flushes what is left.
fn init_logs(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: a journal or a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BACKLOG)
        .thread_name("usmp-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    let _ = std::thread::Builder::new().name("usmp-log-watch".into()).spawn(move || {
        let mut reported = 0;
        loop {
            std::thread::sleep(std::time::Duration::from_secs(10));
            let n = dropped.dropped_lines();
            if n > reported {
                eprintln!(
                    "usmp-gateway: {} log lines dropped: stderr is not keeping up ({n} in all)",
                    n - reported
                );
                reported = n;
            }
        }
    });
    guard
}

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match args.resolve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("usmp-gateway: error: {e}");
            return ExitCode::from(2);
        }
    };
    let _log_flush = init_logs(r.log_format);
    for w in &r.warnings {
        tracing::warn!("{w}");
    }
    let log = match r.mode {
        ReplyMode::Log => match MessageLog::to_stdout() {
            Ok(l) => Some(std::sync::Arc::new(l)),
            Err(e) => {
                eprintln!("usmp-gateway: error: cannot start the message log: {e}");
                return ExitCode::from(1);
            }
        },
        _ => None,
    };
    if let Some(key) = &r.generated_key {
        tracing::warn!("no key configured: generated a one-off PSK for this run (echo mode)");
        eprintln!("USMP PSK (text, {} bytes): {key}", key.len());
    }
    let (mode, shards, listen) = (r.mode, r.config.shards, r.config.listen);
    let transports = r.config.transports;
    let bridge = match &r.nats {
        Some(cfg) => match start_bridge(cfg, &r) {
            Ok(b) => Some(std::sync::Arc::new(b)),
            Err(e) => {
                eprintln!("usmp-gateway: error: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let builder = Gateway::builder().config(r.config.clone());
    let started = match (&bridge, &log) {
        (Some(b), _) => builder.serve_app(b.app()),
        (None, Some(log)) => builder.serve_app(LogApp::new(log.clone())),
        (None, None) => builder.serve_messages(move |s, m| on_message(s, m, mode)),
    };
    let gw = match started {
        Ok(g) => g,
        // Settings were resolved above; a setting the library still refuses is the operator's
        // to fix, as is every other configuration error (exit code 2).
        Err(usmp::Error::Config(e)) => {
            eprintln!("usmp-gateway: error: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("usmp-gateway: error: cannot start on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    let handle = gw.handle();
    if let Some(b) = &bridge {
        b.attach(handle.clone());
    }
    let _ops = match r.metrics {
        None => None,
        Some(addr) => {
            let opts = OpsOptions {
                admin_token: r.admin_token.clone(),
                allowed_hosts: r.admin_hosts.clone(),
                nats: bridge.clone(),
            };
            match ops::serve(addr, handle.clone(), opts) {
                Ok(s) => {
                    tracing::info!(address = %s.local_addr(), admin_token = r.admin_token.is_some(), "metrics and admin API listening");
                    Some(s)
                }
                Err(e) => {
                    eprintln!("usmp-gateway: error: cannot serve metrics on {addr}: {e}");
                    handle.shutdown();
                    gw.wait();
                    return ExitCode::from(1);
                }
            }
        }
    };
    // Handlers go in before the "listening" line: whoever reads that line may signal at once,
    // and a SIGHUP that beats the handler would kill the process (its default action).
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usmp-gateway: error: cannot install signal handlers: {e}");
            handle.shutdown();
            gw.wait();
            return ExitCode::from(1);
        }
    };
    tracing::info!(address = %gw.local_addr(), shards, %transports, mode = ?mode, "usmp-gateway listening");
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == SIGHUP {
                match handle.reload_keys() {
                    Ok(r) => tracing::info!(
                        devices = r.devices,
                        wildcard = r.wildcard,
                        "key registry reloaded (SIGHUP)"
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "key registry reload failed: old keys stay in force")
                    }
                }
                continue;
            }
            tracing::info!(signal = sig, "shutting down: BYE to every session");
            handle.shutdown();
            return;
        }
    });
    gw.wait();
    if let Some(b) = &bridge {
        // Uplinks already read are stored before the process ends.
        b.shutdown(std::time::Duration::from_secs(5));
    }
    if let Some(lost) = log.as_ref().map(|l| l.lost()).filter(|&n| n > 0) {
        tracing::warn!(lines = lost, "message log: lines not written because stdout was closed");
    }
    tracing::info!("usmp-gateway stopped");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_lists() {
        use usmp::ops::settings::parse_cpus;
        assert_eq!(parse_cpus("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpus("2-4,7").unwrap(), vec![2, 3, 4, 7]);
        assert_eq!(parse_cpus("x").unwrap_err().field, "cpus (--cpus)");
        assert!(parse_cpus("3-1").is_err());
    }
}
