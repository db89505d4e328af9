//! `loadgen`: emulates USMP devices (each a real session: own socket, handshake, keys and
//! sequence numbers) against a gateway — ours or the reference — and reports
//! coordinated-omission-free latency. The parent process plans the run, starts worker
//! processes (each under the per-process fd limit, pinned to cores), and merges their
//! per-thread histograms and counters at the end.

mod plan;
mod raw;
mod report;
mod sched;
mod worker;

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::json;
use usmp::Transport;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Send messages and verify their echoes byte for byte.
    Echo,
    /// Repeated handshakes (connect, BYE).
    Handshake,
    /// Attack: valid-looking HELLOs (fresh device id and key each) that never finish.
    HelloFlood,
    /// Attack: random bytes instead of frames.
    GarbageFlood,
    /// No USMP: bare connections (TCP) or datagrams (UDP) echoed by a bare server
    /// (`examples/bare_echo`), scheduled and checked byte for byte as in echo mode.
    RawEcho,
    /// No USMP: the handshake's round trips and sizes over bare sockets, as in handshake mode
    /// (TCP: connect, two echoed round trips, a BYE-sized message, close; UDP: its 8 datagrams
    /// each way in 4 round trips).
    RawHandshake,
}

impl Mode {
    fn is_raw(self) -> bool {
        matches!(self, Mode::RawEcho | Mode::RawHandshake)
    }
}

/// Emulate USMP devices and measure a gateway.
// No `Debug`: it would print the key.
#[derive(Parser, Clone)]
#[command(name = "loadgen", version, about)]
struct Args {
    /// Gateway address.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9000")]
    target: SocketAddr,
    /// Transport.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: TransportArg,
    /// Emulated devices.
    #[arg(long, value_name = "N", default_value = "100")]
    devices: u64,
    /// One key for every device, as text.
    #[arg(long, value_name = "STRING", group = "key")]
    psk: Option<String>,
    /// One key for every device, as hex.
    #[arg(long, value_name = "HEX", group = "key")]
    psk_hex: Option<String>,
    /// Registry file (the gateway's format): each device uses its own key.
    #[arg(long, value_name = "PATH", group = "key")]
    psk_file: Option<PathBuf>,
    /// Device i gets id base+i (12 hex digits), so a registry can list them.
    #[arg(long, value_name = "HEX12", default_value = "020000000000")]
    device_id_base: String,
    /// What each device does.
    #[arg(long, value_enum, default_value = "echo")]
    mode: Mode,
    /// Messages (echo), handshakes (handshake mode) or attack attempts (floods) per second per
    /// device; 0 = closed loop.
    #[arg(long, value_name = "R", default_value = "1")]
    rate: f64,
    /// Message size, 0..=1808 bytes.
    #[arg(long, value_name = "BYTES", default_value = "64")]
    payload: usize,
    /// Steady-state seconds (after ramp-up, before drain).
    #[arg(long, value_name = "SECS", default_value = "10")]
    duration: f64,
    /// New handshakes per second while ramping up; 0 = unlimited.
    #[arg(long, value_name = "N", default_value = "0")]
    connect_rate: f64,
    /// Worker processes (default: enough for the fd limit, at least one per core).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Cores to pin workers (and their threads) to, e.g. `1` or `0-3`.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// Local source addresses to spread devices over, e.g. 127.0.0.2-127.0.0.9.
    #[arg(long, value_name = "A-B")]
    source_ips: Option<String>,
    /// Send a PING after this many idle seconds.
    #[arg(long, value_name = "SECS")]
    keepalive: Option<f64>,
    /// Reconnect after losing the session, as firmware does (full-jitter exponential
    /// backoff: retry n waits a random time up to min(0.5 s · 2^n, 5 s)).
    #[arg(long)]
    reconnect: bool,
    /// Write the JSON summary here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write the merged histograms (.hgrm, for HdrHistogram's plotter) and the JSON summary here.
    #[arg(long, value_name = "DIR")]
    hist_dir: Option<PathBuf>,
    /// No progress line and no summary table.
    #[arg(long)]
    quiet: bool,
    /// Handshake deadline per attempt, seconds.
    #[arg(long, value_name = "SECS", default_value = "10")]
    connect_timeout: f64,
    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    #[arg(long, hide = true)]
    worker_count: Option<usize>,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("loadgen: error: {msg}");
    ExitCode::from(2)
}

fn keys(a: &Args) -> Result<worker::Keys, String> {
    if let Some(p) = &a.psk {
        return Ok(worker::Keys::One(p.as_bytes().to_vec()));
    }
    if let Some(h) = &a.psk_hex {
        return usmp::psk::parse_hex(h).map(worker::Keys::One).ok_or_else(|| "--psk-hex: not hex".into());
    }
    if let Some(path) = &a.psk_file {
        let reg = usmp::psk::Registry::load(path).map_err(|e| format!("--psk-file: {e}"))?;
        return Ok(worker::Keys::Registry(Arc::new(reg)));
    }
    if a.mode.is_raw() {
        return Ok(worker::Keys::One(Vec::new())); // nothing to authenticate
    }
    Err("one of --psk, --psk-hex, --psk-file is required".into())
}

fn validate(a: &Args) -> Result<(), String> {
    if a.payload > 1808 {
        return Err("--payload: at most 1808 bytes (4 frames)".into());
    }
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        return Err("--rate: must be ≥ 0".into());
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        return Err("--duration: must be positive".into());
    }
    if a.mode == Mode::RawEcho && a.payload == 0 {
        return Err("--payload: raw-echo needs at least 1 byte (its echo is how it is counted)".into());
    }
    if a.mode.is_raw() && a.reconnect {
        return Err("--reconnect: not with the raw modes (nothing to resume)".into());
    }
    if a.devices == 0 {
        return Err("--devices: must be at least 1".into());
    }
    if u64::from_str_radix(&a.device_id_base, 16).is_err() || a.device_id_base.len() != 12 {
        return Err("--device-id-base: 12 hex digits".into());
    }
    keys(a)?;
    if let Some(c) = &a.cpus {
        plan::parse_cpus(c)?;
    }
    if let Some(s) = &a.source_ips {
        plan::parse_ip_range(s)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    if let Err(e) = validate(&a) {
        return fail(e);
    }
    match (a.worker_index, a.worker_count) {
        (Some(i), Some(n)) => run_worker(&a, i, n),
        _ => run_parent(&a),
    }
}

/// The cores the run may use: those of `--cpus`, or all of them.
fn usable_cores(a: &Args) -> usize {
    let listed = a.cpus.as_deref().and_then(|c| plan::parse_cpus(c).ok()).map_or(0, |c| c.len());
    if listed > 0 {
        return listed;
    }
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn is_flood(a: &Args) -> bool {
    matches!(a.mode, Mode::HelloFlood | Mode::GarbageFlood)
}

fn source_ips(a: &Args) -> Vec<std::net::IpAddr> {
    plan::source_ips(
        a.source_ips.as_deref().map(|s| plan::parse_ip_range(s).unwrap_or_default()),
        a.target.ip(),
        a.devices,
        a.transport == TransportArg::Udp && !is_flood(a),
    )
}

fn shared_udp(a: &Args, ips: &[std::net::IpAddr]) -> bool {
    plan::shared_udp(a.transport == TransportArg::Udp, is_flood(a), a.target.ip(), ips)
}

/// A worker: its threads run their devices; progress and the result go to stdout as JSON lines.
fn run_worker(a: &Args, index: usize, count: usize) -> ExitCode {
    let cores = usable_cores(a);
    let threads = (cores / count).max(1);
    let cpus = a.cpus.as_deref().map(|c| plan::parse_cpus(c).unwrap_or_default()).unwrap_or_default();
    let source_ips = source_ips(a);
    let spec = worker::Spec {
        target: a.target,
        transport: if a.transport == TransportArg::Udp { Transport::Udp } else { Transport::Tcp },
        keys: keys(a).expect("validated"),
        device_id_base: u64::from_str_radix(&a.device_id_base, 16).expect("validated"),
        echo: matches!(a.mode, Mode::Echo | Mode::RawEcho),
        raw: a.mode.is_raw(),
        flood: match a.mode {
            Mode::HelloFlood => Some(worker::Flood::Hello),
            Mode::GarbageFlood => Some(worker::Flood::Garbage),
            _ => None,
        },
        rate: a.rate,
        payload: a.payload,
        duration: Duration::from_secs_f64(a.duration),
        connect_rate: a.connect_rate / (count * threads) as f64,
        keepalive: a.keepalive.map(Duration::from_secs_f64),
        reconnect: a.reconnect,
        shared_udp: shared_udp(a, &source_ips),
        source_ips,
        connect_timeout: Duration::from_secs_f64(a.connect_timeout),
    };
    let progress: Vec<Arc<worker::Progress>> = (0..threads).map(|_| Arc::default()).collect();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (spec, p) = (spec.clone(), progress[t].clone());
            let devices: Vec<u64> = plan::devices_of(a.devices, index, count, t, threads).collect();
            let core = (!cpus.is_empty()).then(|| cpus[(index * threads + t) % cpus.len()]);
            std::thread::spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(core_affinity::CoreId { id: c });
                }
                usmp::block_on(worker::run_thread(spec, devices, p))
            })
        })
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reporter = {
        let (stop, progress) = (stop.clone(), progress.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let sum = |f: fn(&worker::Progress) -> u64| progress.iter().map(|p| f(p)).sum::<u64>();
                let line = json!({
                    "connected": sum(|p| p.connected.load(Ordering::Relaxed)),
                    "sent": sum(|p| p.sent.load(Ordering::Relaxed)),
                    "received": sum(|p| p.received.load(Ordering::Relaxed)),
                });
                println!("PROGRESS {line}");
            }
        })
    };
    let mut counters = report::Counters::default();
    let (mut hs, mut rtt) = (report::new_hist(), report::new_hist());
    for h in handles {
        match h.join() {
            Ok(r) => {
                counters.add(&r.counters);
                report::merge(&mut hs, &r.handshake);
                report::merge(&mut rtt, &r.rtt);
            }
            Err(_) => *counters.errors.entry("worker_thread_panicked".into()).or_insert(0) += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    let (hs, rtt) = match (report::encode_v2(&hs), report::encode_v2(&rtt)) {
        (Ok(hs), Ok(rtt)) => (hs, rtt),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let out = json!({ "counters": counters, "handshake": hs, "rtt": rtt });
    println!("RESULT {out}");
    let _ = std::io::stdout().flush();
    ExitCode::SUCCESS
}

#[derive(Default, Clone, Copy)]
struct Live {
    connected: u64,
    sent: u64,
    received: u64,
}

/// The parent: start the workers, show progress, merge, report.
fn run_parent(a: &Args) -> ExitCode {
    let cores = usable_cores(a);
    let source_ips = source_ips(a);
    let shared = shared_udp(a, &source_ips);
    let sockets = plan::sockets(a.devices, shared, source_ips.len(), cores);
    let workers = plan::workers(a.workers, sockets, cores).min(a.devices as usize).max(1);
    if !a.quiet && !source_ips.is_empty() {
        eprintln!(
            "loadgen: {} devices over {} source addresses{}, {workers} worker processes",
            a.devices,
            source_ips.len(),
            if shared { " sharing a UDP socket per thread" } else { "" }
        );
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find my own executable: {e}")),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let started = Instant::now();
    let live = Arc::new(Mutex::new(vec![Live::default(); workers]));
    let mut children = Vec::new();
    for w in 0..workers {
        let child = Command::new(&exe)
            .args(&args)
            .args(["--worker-index", &w.to_string(), "--worker-count", &workers.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => return fail(format!("cannot start worker {w}: {e}")),
        }
    }
    let readers: Vec<_> = children
        .iter_mut()
        .enumerate()
        .map(|(w, c)| {
            let out = c.stdout.take().expect("piped");
            let live = live.clone();
            std::thread::spawn(move || {
                let mut result = None;
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(p) = line.strip_prefix("PROGRESS ") {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(p) {
                            live.lock().expect("progress")[w] = Live {
                                connected: v["connected"].as_u64().unwrap_or(0),
                                sent: v["sent"].as_u64().unwrap_or(0),
                                received: v["received"].as_u64().unwrap_or(0),
                            };
                        }
                    } else if let Some(r) = line.strip_prefix("RESULT ") {
                        result = serde_json::from_str::<serde_json::Value>(r).ok();
                    }
                }
                result
            })
        })
        .collect();
    let show = !a.quiet && std::io::stderr().is_terminal();
    let mut last = (Instant::now(), 0u64);
    while readers.iter().any(|r| !r.is_finished()) {
        std::thread::sleep(Duration::from_millis(250));
        if show {
            let l = live.lock().expect("progress").clone();
            let c = report::Counters {
                devices_connected: l.iter().map(|x| x.connected).sum(),
                messages_sent: l.iter().map(|x| x.sent).sum(),
                messages_received: l.iter().map(|x| x.received).sum(),
                ..Default::default()
            };
            let rate = if last.0.elapsed() > Duration::from_millis(900) {
                let r = (c.messages_received - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), c.messages_received);
                r
            } else {
                0.0
            };
            eprint!("\r{}", report::progress_line(started.elapsed().as_secs_f64(), &c, rate));
        }
    }
    if show {
        eprintln!();
    }
    let mut counters = report::Counters::default();
    let (mut hs, mut rtt) = (report::new_hist(), report::new_hist());
    let mut missing = 0;
    for r in readers {
        match r.join().ok().flatten() {
            Some(v) => {
                if let Ok(c) = serde_json::from_value::<report::Counters>(v["counters"].clone()) {
                    counters.add(&c);
                }
                for (key, into) in [("handshake", &mut hs), ("rtt", &mut rtt)] {
                    match report::decode_v2(v[key].as_str().unwrap_or_default()) {
                        Ok(h) => report::merge(into, &h),
                        // Counted, not dropped in silence: the latencies would be short of it.
                        Err(e) => {
                            eprintln!("loadgen: a worker's {key} histogram: {e}");
                            counters.error("worker_histogram_unreadable");
                        }
                    }
                }
            }
            None => missing += 1,
        }
    }
    for mut c in children {
        let _ = c.wait();
    }
    if missing > 0 {
        *counters.errors.entry("worker_failed".into()).or_insert(0) += missing;
    }
    let rep = report::Report {
        counters,
        handshake_us: hs,
        rtt_us: rtt,
        duration_s: a.duration,
        target: a.target.to_string(),
        transport: format!("{:?}", a.transport).to_lowercase(),
        mode: a.mode.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string()),
    };
    if !a.quiet {
        println!("{}", rep.summary_table());
    }
    if let Some(p) = &a.json {
        if let Err(e) = rep.write_json(p) {
            return fail(format!("--json {}: {e}", p.display()));
        }
    }
    if let Some(d) = &a.hist_dir {
        if let Err(e) = rep.write_hist_dir(d) {
            return fail(format!("--hist-dir {}: {e}", d.display()));
        }
    }
    if missing > 0 {
        eprintln!("loadgen: {missing} worker(s) produced no result");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
