//! Result aggregation and reporting for loadgen.
//!
//! * [`Hist`]: latency histograms, values in **microseconds** (1 µs .. 1 h, 3 significant digits),
//!   shipped from worker processes to the parent in HdrHistogram's V2 encoding
//!   ([`encode_v2`] / [`decode_v2`]).
//! * [`Counters`]: plain event counters, mergeable across workers / processes.
//! * [`Report`]: the final result: JSON summary, human summary table, and the `--hist-dir`
//!   artefacts (HdrHistogram `.hgrm` percentile distributions and `summary.json`).
//!
//! The `.hgrm` text is byte-for-byte the layout of HdrHistogram's Java
//! `AbstractHistogram.outputPercentileDistribution(printStream, 5, 1000.0)`, so the files can be fed
//! to HdrHistogram's plotter (<https://hdrhistogram.github.io/HdrHistogram/plotFiles.html>) or
//! HistogramLogAnalyzer; loadgen draws no plots of its own.

mod counters;
mod hist;

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use serde_json::{json, Value};

pub use counters::{handshakes_per_sec, loadgen_cpu, per_sec, Counters};
pub use hist::{decode_v2, encode_v2, merge, new_hist, percentile_distribution, Hist};
use hist::{PERCENTILE_TICKS_PER_HALF_DISTANCE, US_PER_MS};

/// Summary statistics of one histogram (µs). All zero for an empty histogram.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct LatencyStats {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl LatencyStats {
    pub fn of(h: &Hist) -> Self {
        if h.is_empty() {
            return LatencyStats::default();
        }
        let mut q = h.value_at_quantiles([0.5, 0.9, 0.99, 0.999]);
        let mut next = || q.next().unwrap_or(0);
        let (p50, p90, p99, p999) = (next(), next(), next(), next());
        let mean = h.mean();
        LatencyStats {
            count: h.len(),
            min: h.min(),
            p50,
            p90,
            p99,
            p999,
            max: h.max(),
            mean: if mean.is_finite() { mean } else { 0.0 },
        }
    }

    fn to_json(self) -> Value {
        json!({
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "p999": self.p999,
            "max": self.max,
            "min": self.min,
            "mean": self.mean,
            "count": self.count,
        })
    }
}

/// µs -> "ms with 3 decimals".
fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / US_PER_MS)
}

/// The final result of a run.
pub struct Report {
    pub counters: Counters,
    /// handshake latency (µs)
    pub handshake_us: Hist,
    /// echo round-trip time measured from the intended send time (µs)
    pub rtt_us: Hist,
    /// steady-state duration used for the per-second rates
    pub duration_s: f64,
    pub target: String,
    pub transport: String,
    pub mode: String,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            counters: Counters::default(),
            handshake_us: new_hist(),
            rtt_us: new_hist(),
            duration_s: 0.0,
            target: String::new(),
            transport: String::new(),
            mode: String::new(),
        }
    }
}

impl Report {
    fn duration(&self) -> f64 {
        if self.duration_s.is_finite() && self.duration_s > 0.0 {
            self.duration_s
        } else {
            0.0
        }
    }

    /// The JSON summary (see the module docs / task brief for the key layout). Latencies are
    /// integer microseconds; rates are per second of `duration_s`.
    pub fn to_json(&self) -> Value {
        let c = &self.counters;
        let d = self.duration();
        let hs = LatencyStats::of(&self.handshake_us);
        let rtt = LatencyStats::of(&self.rtt_us);
        let errors: serde_json::Map<String, Value> =
            c.errors.iter().map(|(k, v)| (k.clone(), Value::from(*v))).collect();
        let (cpu_msg, cpu_hs, busy) = loadgen_cpu(c, d);
        json!({
            "target": self.target,
            "transport": self.transport,
            "mode": self.mode,
            "duration_s": d,
            "devices": {
                "requested": c.devices_requested,
                "connected": c.devices_connected,
                "failed": c.devices_failed,
            },
            "handshakes": {
                "ok": c.handshakes_ok,
                "failed": c.handshakes_failed,
                "per_sec": handshakes_per_sec(c, d),
                "latency_us": hs.to_json(),
            },
            "messages": {
                "sent": c.messages_sent,
                "received": c.messages_received,
                "lost": c.messages_lost,
                "per_sec": per_sec(c.messages_received, d),
                "rtt_us": rtt.to_json(),
            },
            "steady": {
                "start_unix_s": c.steady_start_unix_ms as f64 / 1e3,
                "end_unix_s": c.steady_end_unix_ms as f64 / 1e3,
                "messages": c.steady_messages,
                "handshakes": c.steady_handshakes,
            },
            "loadgen": {
                "cpu_s": c.steady_cpu_ns as f64 / 1e9,
                "cpu_us_per_message": cpu_msg,
                "cpu_us_per_handshake": cpu_hs,
                "busy": busy,
            },
            "errors": Value::Object(errors),
        })
    }

    /// Human summary table for stdout. Latencies in ms with 3 decimals.
    pub fn summary_table(&self) -> String {
        let c = &self.counters;
        let d = self.duration();
        let rule = "-".repeat(86);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "loadgen summary: target {}  transport {}  mode {}  steady state {:.3} s",
            self.target, self.transport, self.mode, d
        );
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            "{:<12} {:<10}{:>14}   {:<10}{:>14}   {:<8}{:>14}",
            "devices",
            "requested",
            c.devices_requested,
            "connected",
            c.devices_connected,
            "failed",
            c.devices_failed
        );
        let _ = writeln!(
            s,
            "{:<12} {:<10}{:>14}   {:<10}{:>14}   {:<8}{:>14.2}",
            "handshakes",
            "ok",
            c.handshakes_ok,
            "failed",
            c.handshakes_failed,
            "per sec",
            handshakes_per_sec(c, d)
        );
        let _ = writeln!(
            s,
            "{:<12} {:<10}{:>14}   {:<10}{:>14}   {:<8}{:>14}",
            "messages", "sent", c.messages_sent, "received", c.messages_received, "lost", c.messages_lost
        );
        let _ = writeln!(s, "{:<12} {:<10}{:>14.2}", "", "per sec", per_sec(c.messages_received, d));
        let (cpu_msg, cpu_hs, busy) = loadgen_cpu(c, d);
        let _ = writeln!(
            s,
            "{:<12} {:<10}{:>14.2}   {:<10}{:>14.2}   {:<8}{:>13.1}%",
            "loadgen cpu",
            "µs/msg",
            cpu_msg,
            "µs/hs",
            cpu_hs,
            "busy",
            busy * 100.0
        );
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            "{:<16}{:>12}{:>11}{:>11}{:>11}{:>11}{:>11}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, h) in [("handshake", &self.handshake_us), ("echo rtt", &self.rtt_us)] {
            let st = LatencyStats::of(h);
            let _ = writeln!(
                s,
                "{:<16}{:>12}{:>11}{:>11}{:>11}{:>11}{:>11}",
                name,
                st.count,
                ms(st.p50),
                ms(st.p90),
                ms(st.p99),
                ms(st.p999),
                ms(st.max)
            );
        }
        let _ = writeln!(s, "{rule}");
        if c.errors.is_empty() {
            let _ = writeln!(s, "{:<12} none", "errors");
        } else {
            let _ = writeln!(s, "{:<12} {:<40}{:>14}", "errors", "total", c.total_errors());
            for (kind, n) in &c.errors {
                let _ = writeln!(s, "{:<12}   {:<38}{:>14}", "", kind, n);
            }
        }
        s
    }

    /// `--json PATH`: pretty-printed [`Report::to_json`] plus a trailing newline.
    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                std::fs::create_dir_all(parent)?;
            }
        }
        let mut text = serde_json::to_string_pretty(&self.to_json()).map_err(io::Error::other)?;
        text.push('\n');
        std::fs::write(path, text)
    }

    /// `--hist-dir DIR`: create DIR and write `handshake_latency.hgrm`, `rtt.hgrm` (feed them to
    /// HdrHistogram's plotter for percentile plots) and `summary.json`.
    pub fn write_hist_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, h) in [("handshake_latency.hgrm", &self.handshake_us), ("rtt.hgrm", &self.rtt_us)] {
            let text = percentile_distribution(h, PERCENTILE_TICKS_PER_HALF_DISTANCE, US_PER_MS);
            std::fs::write(dir.join(name), text)?;
        }
        self.write_json(&dir.join("summary.json"))
    }
}

/// One-line live progress string for stderr (no trailing newline).
pub fn progress_line(elapsed_s: f64, c: &Counters, msgs_per_s: f64) -> String {
    let elapsed = if elapsed_s.is_finite() { elapsed_s.max(0.0) } else { 0.0 };
    let rate = if msgs_per_s.is_finite() { msgs_per_s.max(0.0) } else { 0.0 };
    // Only the fields that carry information: live progress often has just the connected count.
    let mut s = format!("[{elapsed:>8.1}s] connected {}", c.devices_connected);
    if c.devices_requested > 0 {
        let _ = write!(s, "/{}", c.devices_requested);
    }
    if c.devices_failed > 0 {
        let _ = write!(s, " (failed {})", c.devices_failed);
    }
    let _ = write!(s, "  sent {}  recv {}", c.messages_sent, c.messages_received);
    if c.messages_lost > 0 {
        let _ = write!(s, "  lost {}", c.messages_lost);
    }
    let _ = write!(s, "  {rate:.0} msg/s");
    let errs = c.total_errors();
    if errs > 0 {
        let _ = write!(s, "  errors {errs}");
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::hist::tests::parse_hgrm;
    use super::*;

    fn headed(target: &str, transport: &str, mode: &str) -> Report {
        Report { target: target.into(), transport: transport.into(), mode: mode.into(), ..Report::default() }
    }

    fn sample_report() -> Report {
        let mut r = headed("127.0.0.1:7000 & <friends>", "tcp", "echo");
        r.duration_s = 10.0;
        r.counters = Counters {
            devices_requested: 100,
            devices_connected: 98,
            devices_failed: 2,
            handshakes_ok: 98,
            handshakes_failed: 2,
            messages_sent: 10_000,
            messages_received: 9_990,
            messages_lost: 10,
            handshake_ms: 0,
            steady_messages: 9_000,
            steady_handshakes: 0,
            steady_cpu_ns: 45_000_000,
            steady_threads: 1,
            steady_start_unix_ms: 1_700_000_000_000,
            steady_end_unix_ms: 1_700_000_010_000,
            errors: BTreeMap::from([("timeout".to_owned(), 7), ("connect_refused".to_owned(), 2)]),
        };
        for v in 1..=98u64 {
            r.handshake_us.saturating_record(1_000 + v * 10);
        }
        for v in 1..=9_990u64 {
            r.rtt_us.saturating_record(200 + (v % 1000) * 3);
        }
        r
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("loadgen-report-test-{}-{}", std::process::id(), name));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    // ---- JSON -----------------------------------------------------------------------------------

    const REQUIRED_NUMERIC: &[&str] = &[
        "devices.requested",
        "devices.connected",
        "devices.failed",
        "handshakes.ok",
        "handshakes.failed",
        "handshakes.per_sec",
        "handshakes.latency_us.p50",
        "handshakes.latency_us.p90",
        "handshakes.latency_us.p99",
        "handshakes.latency_us.p999",
        "handshakes.latency_us.max",
        "messages.sent",
        "messages.received",
        "messages.lost",
        "messages.per_sec",
        "messages.rtt_us.p50",
        "messages.rtt_us.p90",
        "messages.rtt_us.p99",
        "messages.rtt_us.p999",
        "messages.rtt_us.max",
        "duration_s",
    ];

    fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
        path.split('.').fold(v, |cur, k| {
            assert!(cur.is_object(), "parent of {k} in {path} is not an object: {cur}");
            cur.get(k).unwrap_or_else(|| panic!("missing key path {path}"))
        })
    }

    fn check_json_shape(j: &Value) {
        for p in REQUIRED_NUMERIC {
            assert!(at(j, p).is_number(), "{p} is not a number: {}", at(j, p));
        }
        assert!(at(j, "errors").is_object());
        assert!(at(j, "errors").as_object().unwrap().values().all(Value::is_u64));
        // flattened keys must not exist: the structure is nested
        assert!(j.get("devices.requested").is_none());
        assert!(j.get("handshakes_ok").is_none());
    }

    #[test]
    fn to_json_structure_and_values() {
        let r = sample_report();
        let j = r.to_json();
        check_json_shape(&j);
        assert_eq!(j["devices"]["requested"], 100);
        assert_eq!(j["devices"]["connected"], 98);
        assert_eq!(j["devices"]["failed"], 2);
        assert_eq!(j["handshakes"]["ok"], 98);
        assert_eq!(j["handshakes"]["failed"], 2);
        assert!((j["handshakes"]["per_sec"].as_f64().unwrap() - 9.8).abs() < 1e-9);
        assert_eq!(j["messages"]["sent"], 10_000);
        assert_eq!(j["messages"]["received"], 9_990);
        assert_eq!(j["messages"]["lost"], 10);
        assert!((j["messages"]["per_sec"].as_f64().unwrap() - 999.0).abs() < 1e-9);
        assert_eq!(j["errors"]["timeout"], 7);
        assert_eq!(j["errors"]["connect_refused"], 2);
        assert_eq!(j["steady"]["messages"], 9_000);
        assert!((j["steady"]["end_unix_s"].as_f64().unwrap() - 1_700_000_010.0).abs() < 1e-3);
        assert!((j["loadgen"]["cpu_us_per_message"].as_f64().unwrap() - 5.0).abs() < 1e-9);
        assert_eq!(j["loadgen"]["cpu_us_per_handshake"], 0.0, "no handshakes in the window");
        assert!((j["loadgen"]["busy"].as_f64().unwrap() - 0.0045).abs() < 1e-9);
        assert_eq!(j["duration_s"], 10.0);
        let lat = &j["handshakes"]["latency_us"];
        assert_eq!(lat["p50"].as_u64().unwrap(), r.handshake_us.value_at_quantile(0.5));
        assert_eq!(lat["p999"].as_u64().unwrap(), r.handshake_us.value_at_quantile(0.999));
        assert_eq!(lat["max"].as_u64().unwrap(), r.handshake_us.max());
        let rtt = &j["messages"]["rtt_us"];
        let (p50, p90, p99, p999, max) = (
            rtt["p50"].as_u64().unwrap(),
            rtt["p90"].as_u64().unwrap(),
            rtt["p99"].as_u64().unwrap(),
            rtt["p999"].as_u64().unwrap(),
            rtt["max"].as_u64().unwrap(),
        );
        assert!(p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max);
        assert!((1690..=1710).contains(&p50), "p50={p50}");
        // serialises and parses back
        let text = serde_json::to_string(&j).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        check_json_shape(&back);
    }

    #[test]
    fn to_json_zero_duration_and_empty() {
        let mut r = headed("t", "udp", "connect");
        r.duration_s = 0.0;
        r.counters.handshakes_ok = 5;
        let j = r.to_json();
        check_json_shape(&j);
        assert_eq!(j["handshakes"]["per_sec"].as_f64(), Some(0.0));
        assert_eq!(j["messages"]["per_sec"].as_f64(), Some(0.0));
        for k in ["p50", "p90", "p99", "p999", "max"] {
            assert_eq!(j["handshakes"]["latency_us"][k], 0, "{k}");
            assert_eq!(j["messages"]["rtt_us"][k], 0, "{k}");
        }
        r.duration_s = f64::NAN;
        let j = r.to_json();
        check_json_shape(&j); // NaN would serialise as null -> not a number
        assert_eq!(j["duration_s"], 0.0);
    }

    #[test]
    fn write_json_file() {
        let d = tmpdir("json");
        let p = d.join("nested").join("out.json");
        let r = sample_report();
        r.write_json(&p).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v, r.to_json());
        let _ = std::fs::remove_dir_all(&d);
    }

    // ---- table / progress -----------------------------------------------------------------------

    #[test]
    fn summary_table_contents() {
        let r = sample_report();
        let t = r.summary_table();
        for needle in [
            "devices",
            "requested",
            "connected",
            "failed",
            "handshakes",
            "per sec",
            "messages",
            "sent",
            "received",
            "lost",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "errors",
            "timeout",
            "connect_refused",
            "tcp",
            "echo",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        // latencies in ms with 3 decimals
        let p50 = r.rtt_us.value_at_quantile(0.5);
        assert!(t.contains(&format!("{:.3}", p50 as f64 / 1000.0)), "{t}");
        assert!(t.contains("999.00"), "messages per sec:\n{t}");
    }

    #[test]
    fn progress_line_is_one_line() {
        let c = Counters {
            devices_requested: 10,
            devices_connected: 9,
            messages_sent: 1234,
            messages_received: 1200,
            ..Default::default()
        };
        let l = progress_line(12.34, &c, 456.7);
        assert!(!l.contains('\n'));
        assert!(l.contains("12.3s"), "{l}");
        assert!(l.contains("9/10"), "{l}");
        assert!(l.contains("1234") && l.contains("1200"), "{l}");
        assert!(l.contains("457 msg/s"), "{l}");
        assert!(!l.contains("lost") && !l.contains("failed"), "zero fields omitted: {l}");
        let c2 = Counters { devices_connected: 3, messages_lost: 2, devices_failed: 1, ..Default::default() };
        let l = progress_line(1.0, &c2, 0.0);
        assert!(l.contains("connected 3 ") && l.contains("lost 2") && l.contains("failed 1"), "{l}");
        let l = progress_line(f64::NAN, &Counters::default(), f64::INFINITY);
        assert!(!l.contains("NaN") && !l.contains("inf"), "{l}");
    }

    // ---- whole report / files -------------------------------------------------------------------

    #[test]
    fn write_hist_dir_files() {
        let d = tmpdir("hist").join("sub");
        let r = sample_report();
        r.write_hist_dir(&d).unwrap();
        for f in ["handshake_latency.hgrm", "rtt.hgrm", "summary.json"] {
            assert!(d.join(f).is_file(), "missing {f}");
        }
        let hs = parse_hgrm(&std::fs::read_to_string(d.join("handshake_latency.hgrm")).unwrap());
        assert_eq!(hs.total, 98);
        let rtt = parse_hgrm(&std::fs::read_to_string(d.join("rtt.hgrm")).unwrap());
        assert_eq!(rtt.total, 9_990);
        let j: Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap();
        assert_eq!(j, r.to_json());
        let _ = std::fs::remove_dir_all(d.parent().unwrap());
    }

    #[test]
    fn empty_report_never_panics() {
        let r = Report::default();
        check_json_shape(&r.to_json());
        let t = r.summary_table();
        assert!(t.contains("0.000"));
        assert!(t.contains("none"));
        let _ = progress_line(0.0, &r.counters, 0.0);
        let d = tmpdir("empty");
        r.write_hist_dir(&d).unwrap();
        let p = parse_hgrm(&std::fs::read_to_string(d.join("rtt.hgrm")).unwrap());
        assert!(p.rows.is_empty());
        r.write_json(&d.join("x.json")).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
