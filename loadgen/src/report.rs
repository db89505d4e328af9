//! Result aggregation and reporting for loadgen.
//!
//! * [`Hist`]: latency histograms, values in **microseconds** (1 µs .. 1 h, 3 significant digits).
//! * [`Counters`]: plain event counters, mergeable across workers / processes.
//! * [`hist_to_pairs`] / [`hist_from_pairs`] (and [`WorkerSnapshot`]): a JSON-friendly form of a
//!   histogram, used to ship results from worker processes to the parent.
//! * [`Report`]: the final result: JSON summary, human summary table, and the `--hist-dir`
//!   artefacts (HdrHistogram `.hgrm` percentile distributions, SVG percentile plots,
//!   `summary.json`).
//!
//! The `.hgrm` text is byte-for-byte the layout of HdrHistogram's Java
//! `AbstractHistogram.outputPercentileDistribution(printStream, 5, 1000.0)`, so the files can be fed
//! to HistogramLogAnalyzer or <https://hdrhistogram.github.io/HdrHistogram/plotFiles.html>.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Latency histogram; values are microseconds.
pub type Hist = Histogram<u64>;

/// Lowest discernible value of [`new_hist`] histograms (µs).
pub const HIST_LOW_US: u64 = 1;
/// Highest trackable value of [`new_hist`] histograms (µs): one hour.
pub const HIST_HIGH_US: u64 = 3_600_000_000;
/// Significant value digits of [`new_hist`] histograms.
pub const HIST_SIGFIG: u8 = 3;
/// Percentile ticks per half distance used for the `.hgrm` output (HdrHistogram's default).
pub const PERCENTILE_TICKS_PER_HALF_DISTANCE: u32 = 5;
/// Output value unit scaling ratio for the `.hgrm` output: µs -> ms.
pub const US_PER_MS: f64 = 1000.0;

/// Title used for the handshake latency plot.
pub const HANDSHAKE_METRIC: &str = "Handshake latency";
/// Title used for the round-trip-time plot.
pub const RTT_METRIC: &str = "Echo round-trip time";

/// A fresh histogram: 1 µs .. 3_600_000_000 µs (1 h), 3 significant digits, auto-resize off.
pub fn new_hist() -> Hist {
    let mut h = Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
        .expect("constant histogram bounds are valid");
    h.auto(false);
    h
}

/// Record one value (µs), clamping it into the histogram's range. Never panics.
#[inline]
pub fn record_us(h: &mut Hist, us: u64) {
    h.saturating_record(us);
}

/// Record one duration (converted to whole µs), clamping into the histogram's range.
#[inline]
pub fn record_duration(h: &mut Hist, d: Duration) {
    record_us(h, u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
}

/// Add `from` into `into` (counts saturate). Never panics: if the histograms have different
/// configurations or `from` holds values outside `into`'s range, values are re-recorded one bucket
/// at a time, clamped into `into`'s range.
pub fn merge(into: &mut Hist, from: &Hist) {
    if from.is_empty() {
        return;
    }
    let same_config =
        into.low() == from.low() && into.high() == from.high() && into.sigfig() == from.sigfig();
    // `add` validates the range before touching anything, so an Err leaves `into` unchanged.
    if same_config && into.add(from).is_ok() {
        return;
    }
    for v in from.iter_recorded() {
        let c = v.count_at_value();
        if c > 0 {
            into.saturating_record_n(v.value_iterated_to(), c);
        }
    }
}

/// `(value, count)` for every non-empty bucket (the value is the bucket's highest equivalent
/// value, so it lands in the same bucket when recorded again).
pub fn hist_to_pairs(h: &Hist) -> Vec<(u64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).filter(|&(_, c)| c > 0).collect()
}

/// Inverse of [`hist_to_pairs`]: a [`new_hist`] histogram with `count` records of each `value`
/// (values clamped to the trackable range; zero counts ignored). Never panics.
pub fn hist_from_pairs(p: &[(u64, u64)]) -> Hist {
    let mut h = new_hist();
    for &(v, c) in p {
        if c > 0 {
            h.saturating_record_n(v, c);
        }
    }
    h
}

/// Event counters. Mergeable with [`Counters::add`]; serialisable for worker -> parent shipping.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub devices_requested: u64,
    pub devices_connected: u64,
    pub devices_failed: u64,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub messages_lost: u64,
    /// How long the handshakes took place over, in ms: the ramp, plus the steady phase in
    /// handshake mode (threads run side by side: merged by maximum). 0: unknown, use the
    /// steady phase's duration.
    pub handshake_ms: u64,
    /// Messages received within the steady phase (each thread's own window).
    pub steady_messages: u64,
    /// Handshakes completed within the steady phase.
    pub steady_handshakes: u64,
    /// loadgen's own CPU time over the steady phase, summed over its threads (ns).
    pub steady_cpu_ns: u64,
    /// Threads whose steady phase was measured.
    pub steady_threads: u64,
    /// The steady phase in wall-clock time (ms since the Unix epoch): the earliest start and
    /// the latest end over the threads (0: not measured).
    pub steady_start_unix_ms: u64,
    pub steady_end_unix_ms: u64,
    /// error kind -> count
    pub errors: BTreeMap<String, u64>,
}

impl Counters {
    /// Field-wise saturating sum; error maps are merged by kind.
    pub fn add(&mut self, other: &Counters) {
        self.devices_requested = self.devices_requested.saturating_add(other.devices_requested);
        self.devices_connected = self.devices_connected.saturating_add(other.devices_connected);
        self.devices_failed = self.devices_failed.saturating_add(other.devices_failed);
        self.handshakes_ok = self.handshakes_ok.saturating_add(other.handshakes_ok);
        self.handshakes_failed = self.handshakes_failed.saturating_add(other.handshakes_failed);
        self.messages_sent = self.messages_sent.saturating_add(other.messages_sent);
        self.messages_received = self.messages_received.saturating_add(other.messages_received);
        self.messages_lost = self.messages_lost.saturating_add(other.messages_lost);
        self.handshake_ms = self.handshake_ms.max(other.handshake_ms);
        self.steady_messages = self.steady_messages.saturating_add(other.steady_messages);
        self.steady_handshakes = self.steady_handshakes.saturating_add(other.steady_handshakes);
        self.steady_cpu_ns = self.steady_cpu_ns.saturating_add(other.steady_cpu_ns);
        self.steady_threads = self.steady_threads.saturating_add(other.steady_threads);
        self.steady_start_unix_ms = match (self.steady_start_unix_ms, other.steady_start_unix_ms) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.steady_end_unix_ms = self.steady_end_unix_ms.max(other.steady_end_unix_ms);
        for (k, v) in &other.errors {
            let e = self.errors.entry(k.clone()).or_insert(0);
            *e = e.saturating_add(*v);
        }
    }

    /// Count one error of `kind`.
    pub fn error(&mut self, kind: &str) {
        self.error_n(kind, 1);
    }

    /// Count `n` errors of `kind`.
    pub fn error_n(&mut self, kind: &str, n: u64) {
        if let Some(e) = self.errors.get_mut(kind) {
            *e = e.saturating_add(n);
        } else {
            self.errors.insert(kind.to_owned(), n);
        }
    }

    /// Sum over all error kinds.
    pub fn total_errors(&self) -> u64 {
        self.errors.values().fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// Everything a worker process ships to the parent (serialise with serde_json).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerSnapshot {
    pub counters: Counters,
    /// [`hist_to_pairs`] of the handshake latency histogram.
    pub handshake_us: Vec<(u64, u64)>,
    /// [`hist_to_pairs`] of the RTT histogram.
    pub rtt_us: Vec<(u64, u64)>,
}

impl WorkerSnapshot {
    pub fn new(counters: &Counters, handshake_us: &Hist, rtt_us: &Hist) -> Self {
        WorkerSnapshot {
            counters: counters.clone(),
            handshake_us: hist_to_pairs(handshake_us),
            rtt_us: hist_to_pairs(rtt_us),
        }
    }

    /// Merge this snapshot into the parent's aggregate.
    pub fn merge_into(&self, counters: &mut Counters, handshake_us: &mut Hist, rtt_us: &mut Hist) {
        counters.add(&self.counters);
        merge(handshake_us, &hist_from_pairs(&self.handshake_us));
        merge(rtt_us, &hist_from_pairs(&self.rtt_us));
    }
}

/// Summary statistics of one histogram (µs). All zero for an empty histogram.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
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

/// Handshakes per second over the time they took place in (see [`Counters::handshake_ms`]).
pub fn handshakes_per_sec(c: &Counters, duration_s: f64) -> f64 {
    match c.handshake_ms {
        0 => per_sec(c.handshakes_ok, duration_s),
        ms => per_sec(c.handshakes_ok, ms as f64 / 1000.0),
    }
}

/// `count / duration_s`, or 0 when the duration is not a positive finite number.
pub fn per_sec(count: u64, duration_s: f64) -> f64 {
    if duration_s.is_finite() && duration_s > 0.0 {
        count as f64 / duration_s
    } else {
        0.0
    }
}

/// loadgen's own CPU over the steady phase: µs per message and per handshake completed in it
/// (0 when none were), and the share of its threads' time it kept them busy.
pub fn loadgen_cpu(c: &Counters, duration_s: f64) -> (f64, f64, f64) {
    let us = c.steady_cpu_ns as f64 / 1e3;
    let per = |n: u64| if n > 0 { us / n as f64 } else { 0.0 };
    let busy = per_sec(c.steady_cpu_ns, duration_s * 1e9 * c.steady_threads.max(1) as f64);
    (per(c.steady_messages), per(c.steady_handshakes), busy)
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
    /// An empty report with the given headings.
    pub fn new(target: impl Into<String>, transport: impl Into<String>, mode: impl Into<String>) -> Self {
        Report { target: target.into(), transport: transport.into(), mode: mode.into(), ..Report::default() }
    }

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

    /// `--hist-dir DIR`: create DIR and write `handshake_latency.hgrm`, `rtt.hgrm`,
    /// `handshake_latency.svg`, `rtt.svg` and `summary.json`.
    pub fn write_hist_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let subtitle = self.subtitle();
        std::fs::write(
            dir.join("handshake_latency.hgrm"),
            percentile_distribution(&self.handshake_us, PERCENTILE_TICKS_PER_HALF_DISTANCE, US_PER_MS),
        )?;
        std::fs::write(
            dir.join("rtt.hgrm"),
            percentile_distribution(&self.rtt_us, PERCENTILE_TICKS_PER_HALF_DISTANCE, US_PER_MS),
        )?;
        std::fs::write(
            dir.join("handshake_latency.svg"),
            percentile_svg(&self.handshake_us, HANDSHAKE_METRIC, &subtitle),
        )?;
        std::fs::write(dir.join("rtt.svg"), percentile_svg(&self.rtt_us, RTT_METRIC, &subtitle))?;
        self.write_json(&dir.join("summary.json"))
    }

    fn subtitle(&self) -> String {
        format!(
            "target {}, transport {}, mode {}, steady state {:.1} s",
            self.target,
            self.transport,
            self.mode,
            self.duration()
        )
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

// ------------------------------------------------------------------------------------------------
// .hgrm percentile distribution
// ------------------------------------------------------------------------------------------------

/// Sub-bucket count of a histogram (HdrHistogram's `subBucketCount`, 2048 for 3 digits), derived
/// from public accessors: `distinct_values == (buckets + 1) * sub_bucket_count / 2`.
fn sub_bucket_count(h: &Hist) -> usize {
    2 * h.distinct_values() / (h.buckets() as usize + 1)
}

/// The percentile distribution text exactly as HdrHistogram's Java
/// `outputPercentileDistribution(printStream, ticks_per_half_distance, value_unit_scaling, false)`
/// writes it (the `.hgrm` format): header, blank line, one row per quantile tick
/// (`%12.{sigfig}f %2.12f %10d %14.2f`, the final 100% row without the last column), then the
/// `#[Mean ...]`, `#[Max ...]`, `#[Buckets ...]` footer.
pub fn percentile_distribution(h: &Hist, ticks_per_half_distance: u32, value_unit_scaling: f64) -> String {
    let ticks = ticks_per_half_distance.max(1);
    let scale =
        if value_unit_scaling.is_finite() && value_unit_scaling > 0.0 { value_unit_scaling } else { 1.0 };
    let p = h.sigfig() as usize;
    let mut out = String::with_capacity(8 * 1024);
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        let mut total: u64 = 0;
        for v in h.iter_quantiles(ticks) {
            total = total.saturating_add(v.count_since_last_iteration());
            let value = v.value_iterated_to() as f64 / scale;
            let q = v.quantile_iterated_to();
            if q != 1.0 {
                let _ = writeln!(out, "{value:12.p$} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q));
            } else {
                let _ = writeln!(out, "{value:12.p$} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale, h.max() as f64 / scale)
    };
    let _ = writeln!(out, "#[Mean    = {mean:12.p$}, StdDeviation   = {stdev:12.p$}]");
    let _ = writeln!(out, "#[Max     = {max:12.p$}, Total count    = {:12}]", h.len());
    let _ = writeln!(out, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), sub_bucket_count(h));
    out
}

// ------------------------------------------------------------------------------------------------
// SVG percentile plot
// ------------------------------------------------------------------------------------------------

const SVG_W: f64 = 960.0;
const SVG_H: f64 = 560.0;
const SVG_ML: f64 = 90.0;
const SVG_MR: f64 = 40.0;
const SVG_MT: f64 = 80.0;
const SVG_MB: f64 = 70.0;
/// Samples of the curve per decade of 1/(1-p).
const SVG_SAMPLES_PER_DECADE: u32 = 100;
const X_TICK_LABELS: [&str; 8] = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%", "99.99999%"];

/// Escape text for use in XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Characters not allowed in XML 1.0 documents.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A "nice" axis step (1, 2, 2.5, 5 x 10^k) not smaller than `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let base = 10f64.powf(raw.log10().floor());
    let f = raw / base;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * base
}

/// Axis label: up to 3 decimals, trailing zeros trimmed.
fn axis_label(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// Percentile plot of `h` (µs) as a self-contained SVG 1.1 document: x axis log-scaled in
/// 1/(1-p) with ticks at 0%, 90%, 99%, 99.9%, 99.99%, 99.999% (more decades when the sample count
/// warrants), y axis latency in ms (linear) with gridlines. An empty histogram yields a valid
/// document saying "no samples".
pub fn percentile_svg(h: &Hist, metric: &str, subtitle: &str) -> String {
    let n = h.len();
    let title = format!("{metric}: {n} samples");
    let mut s = String::with_capacity(32 * 1024);
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8" standalone="no"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#,
        w = SVG_W,
        h = SVG_H
    );
    let _ = writeln!(s, "<title>{}</title>", xml_escape(&title));
    let _ = writeln!(s, r##"<rect x="0" y="0" width="{SVG_W}" height="{SVG_H}" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="30" text-anchor="middle" font-size="18" font-weight="bold">{}</text>"#,
        SVG_W / 2.0,
        xml_escape(&title)
    );
    if !subtitle.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="52" text-anchor="middle" font-size="12" fill="#555555">{}</text>"##,
            SVG_W / 2.0,
            xml_escape(subtitle)
        );
    }

    let pw = SVG_W - SVG_ML - SVG_MR;
    let ph = SVG_H - SVG_MT - SVG_MB;
    let _ = writeln!(
        s,
        r##"<rect x="{SVG_ML}" y="{SVG_MT}" width="{pw}" height="{ph}" fill="none" stroke="#333333" stroke-width="1"/>"##
    );

    if h.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="20" fill="#777777">no samples</text>"##,
            SVG_ML + pw / 2.0,
            SVG_MT + ph / 2.0
        );
        s.push_str("</svg>\n");
        return s;
    }

    // x range: decades of 1/(1-p); at least 5 (99.999%), more for large sample counts.
    let decades = ((n as f64).log10().ceil() as usize).clamp(5, X_TICK_LABELS.len() - 1);
    let x_of = |d: f64| SVG_ML + d.clamp(0.0, decades as f64) / decades as f64 * pw;

    // y range: 0 .. nice ceiling above max (ms), at least 1 µs.
    let max_ms = (h.max() as f64 / US_PER_MS).max(0.001);
    let step = nice_step(max_ms / 6.0).max(0.001);
    let ymax = ((max_ms * 1.02) / step).ceil() * step;
    let y_of = |v: f64| SVG_MT + ph - (v / ymax).clamp(0.0, 1.0) * ph;

    // Gridlines and tick labels.
    s.push_str("<g stroke=\"#dddddd\" stroke-width=\"1\">\n");
    let nyticks = (ymax / step).round() as usize;
    for i in 1..nyticks {
        let y = y_of(i as f64 * step);
        let _ = writeln!(s, r#"<line x1="{SVG_ML}" y1="{y:.2}" x2="{:.2}" y2="{y:.2}"/>"#, SVG_ML + pw);
    }
    for d in 1..decades {
        let x = x_of(d as f64);
        let _ = writeln!(s, r#"<line x1="{x:.2}" y1="{SVG_MT}" x2="{x:.2}" y2="{:.2}"/>"#, SVG_MT + ph);
    }
    s.push_str("</g>\n");
    s.push_str("<g font-size=\"11\" fill=\"#333333\">\n");
    for i in 0..=nyticks {
        let v = i as f64 * step;
        let _ = writeln!(
            s,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="end">{}</text>"#,
            SVG_ML - 8.0,
            y_of(v) + 4.0,
            axis_label(v)
        );
    }
    for (d, label) in X_TICK_LABELS.iter().enumerate().take(decades + 1) {
        let _ = writeln!(
            s,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{}</text>"#,
            x_of(d as f64),
            SVG_MT + ph + 18.0,
            label
        );
    }
    s.push_str("</g>\n");
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">Percentile</text>"#,
        SVG_ML + pw / 2.0,
        SVG_H - 22.0
    );
    let (lx, ly) = (24.0, SVG_MT + ph / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 {lx:.1} {ly:.1})">Latency (ms)</text>"#
    );

    // The curve: value at quantile sampled densely on the log axis.
    let steps = SVG_SAMPLES_PER_DECADE as usize * decades;
    let ds: Vec<f64> = (0..=steps).map(|i| i as f64 / SVG_SAMPLES_PER_DECADE as f64).collect();
    let qs: Vec<f64> = ds.iter().map(|&d| if d == 0.0 { 0.0 } else { 1.0 - 10f64.powf(-d) }).collect();
    let vals: Vec<u64> = h.value_at_quantiles(qs.iter().copied()).collect();
    let pts: Vec<(f64, f64)> =
        ds.iter().zip(vals.iter()).map(|(&d, &v)| (x_of(d), y_of(v as f64 / US_PER_MS))).collect();
    // Drop interior points of horizontal runs.
    let mut poly = String::with_capacity(pts.len() * 16);
    for (i, &(x, y)) in pts.iter().enumerate() {
        let keep = i == 0
            || i + 1 == pts.len()
            || (pts[i - 1].1 - y).abs() > 1e-9
            || (pts[i + 1].1 - y).abs() > 1e-9;
        if keep {
            let _ = write!(poly, "{x:.2},{y:.2} ");
        }
    }
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" stroke-linejoin="round" points="{}"/>"##,
        poly.trim_end()
    );

    // Markers and legend for the headline percentiles.
    let st = LatencyStats::of(h);
    let marks: [(&str, f64, u64); 4] =
        [("p50", 0.5, st.p50), ("p90", 0.9, st.p90), ("p99", 0.99, st.p99), ("p99.9", 0.999, st.p999)];
    s.push_str("<g fill=\"#d62728\">\n");
    for &(_, q, v) in &marks {
        let d = (1.0 / (1.0 - q)).log10();
        let _ =
            writeln!(s, r#"<circle cx="{:.2}" cy="{:.2}" r="3.5"/>"#, x_of(d), y_of(v as f64 / US_PER_MS));
    }
    s.push_str("</g>\n");
    // Legend box in the bottom-right corner: the curve is non-decreasing and ends at max (>= ~75%
    // of the y range), so that corner is empty in practice.
    let (bw, bh) = (170.0, 18.0 * 6.0 + 8.0);
    let (bx, by) = (SVG_ML + pw - 12.0 - bw, SVG_MT + ph - 12.0 - bh);
    let _ = writeln!(
        s,
        r##"<rect x="{bx:.1}" y="{by:.1}" width="{bw:.1}" height="{bh:.1}" fill="#ffffff" fill-opacity="0.85" stroke="#bbbbbb"/>"##
    );
    let legend: [(&str, String); 6] = [
        ("p50", ms(st.p50)),
        ("p90", ms(st.p90)),
        ("p99", ms(st.p99)),
        ("p99.9", ms(st.p999)),
        ("max", ms(st.max)),
        ("mean", format!("{:.3}", st.mean / US_PER_MS)),
    ];
    s.push_str("<g font-size=\"12\" fill=\"#222222\">\n");
    for (i, (k, v)) in legend.iter().enumerate() {
        let y = by + 20.0 + 18.0 * i as f64;
        let _ = writeln!(s, r#"<text x="{:.1}" y="{y:.1}">{k}</text>"#, bx + 10.0);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{y:.1}" text-anchor="end">{v} ms</text>"#, bx + 160.0);
    }
    s.push_str("</g>\n");
    s.push_str("</svg>\n");
    s
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_1_to_10000() -> Hist {
        let mut h = new_hist();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        h
    }

    fn sample_report() -> Report {
        let mut r = Report::new("127.0.0.1:7000 & <friends>", "tcp", "echo");
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
            record_us(&mut r.handshake_us, 1_000 + v * 10);
        }
        for v in 1..=9_990u64 {
            record_us(&mut r.rtt_us, 200 + (v % 1000) * 3);
        }
        r
    }

    // ---- .hgrm parsing helpers -------------------------------------------------------------

    struct Row {
        value: f64,
        percentile: f64,
        total: u64,
        inv: Option<f64>,
    }

    struct Hgrm {
        rows: Vec<Row>,
        mean: f64,
        max: f64,
        total: u64,
        buckets: u64,
        sub_buckets: u64,
    }

    fn footer_nums(line: &str) -> Vec<f64> {
        line.trim_start_matches("#[")
            .trim_end_matches(']')
            .split(',')
            .map(|kv| kv.split('=').nth(1).unwrap().trim().parse::<f64>().unwrap())
            .collect()
    }

    fn parse_hgrm(text: &str) -> Hgrm {
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "       Value     Percentile TotalCount 1/(1-Percentile)");
        assert_eq!(lines[1], "");
        let mut rows = Vec::new();
        let mut footer = Vec::new();
        for l in &lines[2..] {
            if l.starts_with("#[") {
                footer.push(*l);
                continue;
            }
            assert!(footer.is_empty(), "row after footer: {l:?}");
            // Fixed-width layout: %12.3f ' ' %2.12f ' ' %10d [' ' %14.2f]
            assert_eq!(&l[12..13], " ", "{l:?}");
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert!(cols.len() == 3 || cols.len() == 4, "{l:?}");
            let value_col = &l[..12];
            assert_eq!(value_col.trim().split('.').nth(1).unwrap().len(), 3, "{l:?}");
            assert_eq!(cols[1].split('.').nth(1).unwrap().len(), 12, "{l:?}");
            rows.push(Row {
                value: cols[0].parse().unwrap(),
                percentile: cols[1].parse().unwrap(),
                total: cols[2].parse().unwrap(),
                inv: cols.get(3).map(|c| {
                    assert_eq!(c.split('.').nth(1).unwrap().len(), 2, "{l:?}");
                    c.parse().unwrap()
                }),
            });
        }
        assert_eq!(footer.len(), 3, "{text}");
        assert!(footer[0].starts_with("#[Mean    = "), "{}", footer[0]);
        assert!(footer[0].contains(", StdDeviation   = "));
        assert!(footer[1].starts_with("#[Max     = "), "{}", footer[1]);
        assert!(footer[1].contains(", Total count    = "));
        assert!(footer[2].starts_with("#[Buckets = "), "{}", footer[2]);
        assert!(footer[2].contains(", SubBuckets     = "));
        let f0 = footer_nums(footer[0]);
        let f1 = footer_nums(footer[1]);
        let f2 = footer_nums(footer[2]);
        Hgrm {
            rows,
            mean: f0[0],
            max: f1[0],
            total: f1[1] as u64,
            buckets: f2[0] as u64,
            sub_buckets: f2[1] as u64,
        }
    }

    // ---- minimal XML well-formedness check ---------------------------------------------------

    fn check_xml(doc: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = doc;
        let mut saw_root = false;
        while let Some(lt) = rest.find('<') {
            let text = &rest[..lt];
            check_text(text);
            if !stack.is_empty() || !saw_root {
                // ok
            } else {
                assert!(text.trim().is_empty(), "text after root: {text:?}");
            }
            let gt = rest[lt..].find('>').expect("unterminated tag") + lt;
            let tag = &rest[lt + 1..gt];
            rest = &rest[gt + 1..];
            if tag.starts_with('?') {
                assert!(tag.ends_with('?'));
                assert!(!saw_root, "PI after root");
                continue;
            }
            assert!(!tag.starts_with('!'), "unexpected markup <{tag}>");
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes in <{tag}>");
            assert!(!tag.contains('<'), "'<' inside tag <{tag}>");
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().unwrap_or_else(|| panic!("stray </{name}>"));
                assert_eq!(open, name.trim(), "mismatched close tag");
                continue;
            }
            let name: String = tag.chars().take_while(|c| !c.is_whitespace() && *c != '/').collect();
            assert!(!name.is_empty());
            if stack.is_empty() {
                assert!(!saw_root, "second root element <{name}>");
                assert_eq!(name, "svg");
                saw_root = true;
            }
            // attribute values must not contain raw '&' other than entities
            check_text(tag);
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        assert!(rest.trim().is_empty(), "trailing text: {rest:?}");
        assert!(stack.is_empty(), "unclosed elements: {stack:?}");
        assert!(saw_root);
    }

    fn check_text(t: &str) {
        assert!(!t.contains('>') || t.trim().is_empty() || !t.contains('<'));
        let mut i = 0;
        while let Some(p) = t[i..].find('&') {
            let after = &t[i + p..];
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| after.starts_with(e));
            assert!(ok, "raw '&' in {t:?}");
            i += p + 1;
        }
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("loadgen-report-test-{}-{}", std::process::id(), name));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    // ---- histograms ----------------------------------------------------------------------------

    #[test]
    fn new_hist_bounds() {
        let mut h = new_hist();
        assert_eq!(h.low(), 1);
        assert_eq!(h.high(), 3_600_000_000);
        assert_eq!(h.sigfig(), 3);
        assert!(!h.is_auto_resize());
        assert!(h.record(3_600_000_000).is_ok());
        assert!(h.record(3_600_000_000_000).is_err(), "auto-resize must be off");
        record_us(&mut h, u64::MAX); // clamps, no panic
        record_duration(&mut h, Duration::from_secs(1_000_000));
        assert_eq!(h.len(), 3);
        assert!(h.max() >= 3_600_000_000 && h.max() < 3_610_000_000);
    }

    #[test]
    fn merge_sums_counts() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in 1..=1000u64 {
            a.record(v).unwrap();
            b.record(v * 2).unwrap();
            b.record(v * 3).unwrap();
        }
        merge(&mut a, &b);
        assert_eq!(a.len(), 3000);
        assert_eq!(a.count_at(500), 2); // once from a, once from b (250 * 2)
        assert_eq!(a.max(), b.max());
        // merging into empty and from empty
        let mut e = new_hist();
        merge(&mut e, &a);
        assert_eq!(e.len(), a.len());
        assert_eq!(e.value_at_quantile(0.99), a.value_at_quantile(0.99));
        merge(&mut e, &new_hist());
        assert_eq!(e.len(), 3000);
    }

    #[test]
    fn merge_never_panics_on_mismatched_histograms() {
        let mut small = Histogram::<u64>::new_with_bounds(1, 1000, 2).unwrap();
        let mut big = Histogram::<u64>::new_with_bounds(1, 1u64 << 50, 4).unwrap();
        big.record(10).unwrap();
        big.record_n(1_000_000_000_000, 5).unwrap();
        merge(&mut small, &big); // different config + out of range: clamps
        assert_eq!(small.len(), 6);
        let mut h = new_hist();
        merge(&mut h, &big);
        assert_eq!(h.len(), 6);
        assert!(h.max() >= 3_600_000_000);
        // saturating counts
        let mut x = new_hist();
        x.record_n(5, u64::MAX - 1).unwrap();
        let mut y = new_hist();
        y.record_n(5, 10).unwrap();
        merge(&mut x, &y);
        assert_eq!(x.count_at(5), u64::MAX);
    }

    #[test]
    fn pairs_round_trip() {
        let mut h = new_hist();
        for v in 1..=50_000u64 {
            h.record(v * 7 % 123_457 + 1).unwrap();
        }
        h.record_n(2_000_000, 42).unwrap();
        let pairs = hist_to_pairs(&h);
        assert!(pairs.iter().all(|&(_, c)| c > 0));
        assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0));
        // through JSON, as the worker -> parent path does
        let json = serde_json::to_string(&pairs).unwrap();
        let back: Vec<(u64, u64)> = serde_json::from_str(&json).unwrap();
        let h2 = hist_from_pairs(&back);
        assert_eq!(h2.len(), h.len());
        assert_eq!(h2.max(), h.max());
        assert_eq!(h2.min(), h.min());
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
            assert_eq!(h2.value_at_quantile(q), h.value_at_quantile(q), "q={q}");
        }
        assert_eq!(hist_to_pairs(&h2), pairs);
        // empty, clamping, zero counts
        assert!(hist_to_pairs(&new_hist()).is_empty());
        assert!(hist_from_pairs(&[]).is_empty());
        let c = hist_from_pairs(&[(u64::MAX, 3), (0, 1), (77, 0)]);
        assert_eq!(c.len(), 4);
        assert!(c.max() < 3_700_000_000, "value must be clamped, max={}", c.max());
        assert_eq!(c.count_at(77), 0);
    }

    #[test]
    fn worker_snapshot_round_trip() {
        let r = sample_report();
        let snap = WorkerSnapshot::new(&r.counters, &r.handshake_us, &r.rtt_us);
        let text = serde_json::to_string(&snap).unwrap();
        let back: WorkerSnapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back, snap);
        let mut c = Counters::default();
        let (mut hs, mut rtt) = (new_hist(), new_hist());
        back.merge_into(&mut c, &mut hs, &mut rtt);
        back.merge_into(&mut c, &mut hs, &mut rtt);
        assert_eq!(c.messages_sent, 20_000);
        assert_eq!(hs.len(), 2 * r.handshake_us.len());
        assert_eq!(rtt.value_at_quantile(0.5), r.rtt_us.value_at_quantile(0.5));
    }

    // ---- counters -------------------------------------------------------------------------------

    #[test]
    fn counters_add() {
        let mut a = Counters { devices_requested: 1, messages_sent: 5, ..Default::default() };
        a.error("timeout");
        let mut b = Counters {
            devices_requested: 2,
            devices_connected: 2,
            devices_failed: 3,
            handshakes_ok: 4,
            handshakes_failed: 5,
            messages_sent: u64::MAX,
            messages_received: 7,
            messages_lost: 8,
            handshake_ms: 4000,
            steady_messages: 6,
            steady_handshakes: 1,
            steady_cpu_ns: 3_000,
            steady_threads: 2,
            steady_start_unix_ms: 1_000,
            steady_end_unix_ms: 9_000,
            errors: BTreeMap::new(),
        };
        b.error_n("timeout", 2);
        b.error("reset");
        a.add(&b);
        assert_eq!(a.devices_requested, 3);
        assert_eq!(a.devices_connected, 2);
        assert_eq!(a.devices_failed, 3);
        assert_eq!(a.handshakes_ok, 4);
        assert_eq!(a.handshakes_failed, 5);
        assert_eq!(a.messages_sent, u64::MAX, "saturating");
        assert_eq!(a.messages_received, 7);
        assert_eq!(a.messages_lost, 8);
        assert_eq!(a.handshake_ms, 4000, "threads ramp side by side: the longest counts");
        assert_eq!((a.steady_messages, a.steady_cpu_ns, a.steady_threads), (6, 3_000, 2));
        assert_eq!(
            (a.steady_start_unix_ms, a.steady_end_unix_ms),
            (1_000, 9_000),
            "unset start is not a minimum"
        );
        let mut c = Counters { steady_start_unix_ms: 500, steady_end_unix_ms: 8_000, ..Default::default() };
        c.add(&b);
        assert_eq!(
            (c.steady_start_unix_ms, c.steady_end_unix_ms),
            (500, 9_000),
            "earliest start, latest end"
        );
        assert_eq!(handshakes_per_sec(&a, 60.0), 1.0, "over the time they took, not the steady phase");
        a.handshake_ms = 0;
        assert!((handshakes_per_sec(&a, 60.0) - 4.0 / 60.0).abs() < 1e-12, "unknown: the steady phase");
        assert_eq!(a.errors["timeout"], 3);
        assert_eq!(a.errors["reset"], 1);
        assert_eq!(a.total_errors(), 4);
        // serde round trip; missing fields default
        let back: Counters = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
        let partial: Counters = serde_json::from_str(r#"{"messages_sent":3}"#).unwrap();
        assert_eq!(partial.messages_sent, 3);
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
        let mut r = Report::new("t", "udp", "connect");
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

    // ---- .hgrm ----------------------------------------------------------------------------------

    #[test]
    fn hgrm_known_sample() {
        let h = uniform_1_to_10000();
        let text = percentile_distribution(&h, 5, 1000.0);
        let parsed = parse_hgrm(&text);
        let lines: Vec<&str> = text.lines().collect();
        // first row, exact bytes (Java: "%12.3f %2.12f %10d %14.2f")
        assert_eq!(lines[2], "       0.001 0.000000000000          1           1.00");
        let p50 = parsed.rows.iter().find(|r| (r.percentile - 0.5).abs() < 1e-12).expect("50% row");
        assert!((p50.value - 5.000).abs() <= 0.01, "p50 row value {}", p50.value);
        assert_eq!(p50.inv, Some(2.0));
        assert!((5000..=5004).contains(&p50.total), "{}", p50.total);
        // with 5 ticks per half distance the first tick at or above 99% is 99.0625%
        let p99 = parsed.rows.iter().find(|r| r.percentile >= 0.99).expect("99% row");
        assert!((p99.percentile - 0.990625).abs() < 1e-9, "{}", p99.percentile);
        assert!((p99.value - 9.9).abs() <= 0.02, "p99 row value {}", p99.value);
        let p90 = parsed.rows.iter().find(|r| (r.percentile - 0.9).abs() < 1e-9).expect("90% row");
        assert!((p90.value - 9.0).abs() <= 0.01, "{}", p90.value);
        let last = parsed.rows.last().unwrap();
        assert_eq!(last.percentile, 1.0);
        assert!(last.inv.is_none(), "final row has no 1/(1-p) column");
        assert_eq!(last.value, 10.007); // highest equivalent of 10000 at 3 digits
        assert_eq!(parsed.total, 10_000);
        assert_eq!(last.total, 10_000);
        assert_eq!(parsed.max, 10.007);
        assert!((parsed.mean - 5.0).abs() < 0.01, "{}", parsed.mean);
        assert_eq!(parsed.buckets, 22);
        assert_eq!(parsed.sub_buckets, 2048);
        assert_eq!(lines[lines.len() - 1], "#[Buckets =           22, SubBuckets     =         2048]");
        assert_eq!(lines[lines.len() - 2], "#[Max     =       10.007, Total count    =        10000]");
    }

    #[test]
    fn hgrm_parses_back_consistently() {
        let mut h = new_hist();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200_000 {
            // xorshift; heavy-tailed-ish distribution
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v =
                100 + (x % 1000) * (1 + (x >> 40) % 50) + if (x >> 20) & 0x3ff == 0 { 2_000_000 } else { 0 };
            h.record(v).unwrap();
        }
        let parsed = parse_hgrm(&percentile_distribution(&h, 5, 1000.0));
        assert!(parsed.rows.len() > 50);
        for w in parsed.rows.windows(2) {
            assert!(w[1].value >= w[0].value, "values must not decrease");
            assert!(w[1].percentile >= w[0].percentile, "percentiles must not decrease");
            assert!(w[1].total >= w[0].total, "total counts must not decrease");
        }
        assert!(parsed.rows[..parsed.rows.len() - 1].iter().all(|r| r.inv.is_some()));
        let last = parsed.rows.last().unwrap();
        assert_eq!(last.percentile, 1.0);
        assert_eq!(last.total, h.len());
        assert_eq!(parsed.total, h.len());
        assert!((last.value - h.max() as f64 / 1000.0).abs() < 0.001);
        assert!((parsed.max - h.max() as f64 / 1000.0).abs() < 0.001);
        // every row's value equals the histogram's value at that row's percentile (±rounding)
        // (the printed percentile is rounded to 12 decimals, so allow for a bucket either side)
        for r in &parsed.rows {
            let lo = h.value_at_quantile((r.percentile - 1e-9).max(0.0)) as f64 / 1000.0;
            let hi = h.value_at_quantile((r.percentile + 1e-9).min(1.0)) as f64 / 1000.0;
            assert!(r.value >= lo - 0.0011 && r.value <= hi + 0.0011, "row {} vs [{lo}, {hi}]", r.value);
        }
    }

    #[test]
    fn hgrm_single_value_and_empty() {
        let mut h = new_hist();
        h.record(1234).unwrap();
        let p = parse_hgrm(&percentile_distribution(&h, 5, 1000.0));
        assert_eq!(p.rows.first().unwrap().percentile, 0.0);
        assert_eq!(p.rows.last().unwrap().percentile, 1.0);
        assert_eq!(p.rows.last().unwrap().total, 1);
        assert_eq!(p.total, 1);
        let e = percentile_distribution(&new_hist(), 5, 1000.0);
        let p = parse_hgrm(&e);
        assert!(p.rows.is_empty());
        assert_eq!(p.total, 0);
        assert_eq!(p.mean, 0.0);
        assert_eq!(p.max, 0.0);
    }

    // ---- SVG ------------------------------------------------------------------------------------

    #[test]
    fn svg_non_empty() {
        let h = uniform_1_to_10000();
        let svg = percentile_svg(&h, RTT_METRIC, "target a&b <x>");
        assert!(svg.starts_with("<?xml") || svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#));
        assert!(svg.contains(r#"version="1.1""#));
        assert!(svg.contains(RTT_METRIC));
        assert!(svg.contains("10000 samples"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        for tick in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"] {
            assert!(svg.contains(&format!(">{tick}</text>")), "missing x tick {tick}");
        }
        assert!(svg.contains("Latency (ms)"));
        assert!(!svg.contains("no samples"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert!(svg.contains("a&amp;b &lt;x&gt;"));
        assert!(!svg.contains("href"), "no external assets");
        check_xml(&svg);
        // polyline coordinates are inside the plot area and y is monotone (latency never decreases)
        let pts_attr = svg.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        let pts: Vec<(f64, f64)> = pts_attr
            .split_whitespace()
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert!(pts.len() >= 2);
        for w in pts.windows(2) {
            assert!(w[1].0 > w[0].0, "x increasing");
            assert!(w[1].1 <= w[0].1 + 1e-9, "svg y decreasing as latency grows");
        }
        for &(x, y) in &pts {
            assert!((SVG_ML..=SVG_W - SVG_MR).contains(&x) && (SVG_MT..=SVG_H - SVG_MB).contains(&y));
        }
    }

    #[test]
    fn svg_empty_and_degenerate() {
        let svg = percentile_svg(&new_hist(), HANDSHAKE_METRIC, "");
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("no samples"));
        assert!(svg.contains(HANDSHAKE_METRIC));
        check_xml(&svg);
        // single tiny value, value 0, huge sample count
        for build in [
            (|h: &mut Hist| h.record(1).unwrap()) as fn(&mut Hist),
            |h: &mut Hist| h.record(0).unwrap(),
            |h: &mut Hist| h.record_n(3_600_000_000, 5_000_000_000).unwrap(),
        ] {
            let mut h = new_hist();
            build(&mut h);
            let svg = percentile_svg(&h, "m", "s");
            check_xml(&svg);
            assert!(svg.contains("<polyline"));
            assert!(!svg.contains("NaN") && !svg.contains("inf"));
        }
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.5), 2.0);
        assert_eq!(nice_step(2.2), 2.5);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(7.0), 10.0);
        assert!((nice_step(0.013) - 0.02).abs() < 1e-12);
        assert_eq!(axis_label(2.5), "2.5");
        assert_eq!(axis_label(10.0), "10");
        assert_eq!(axis_label(0.0), "0");
    }

    // ---- whole report / files -------------------------------------------------------------------

    #[test]
    fn write_hist_dir_files() {
        let d = tmpdir("hist").join("sub");
        let r = sample_report();
        r.write_hist_dir(&d).unwrap();
        for f in ["handshake_latency.hgrm", "rtt.hgrm", "handshake_latency.svg", "rtt.svg", "summary.json"] {
            assert!(d.join(f).is_file(), "missing {f}");
        }
        let hs = parse_hgrm(&std::fs::read_to_string(d.join("handshake_latency.hgrm")).unwrap());
        assert_eq!(hs.total, 98);
        let rtt = parse_hgrm(&std::fs::read_to_string(d.join("rtt.hgrm")).unwrap());
        assert_eq!(rtt.total, 9_990);
        let svg = std::fs::read_to_string(d.join("handshake_latency.svg")).unwrap();
        check_xml(&svg);
        assert!(svg.contains(HANDSHAKE_METRIC) && svg.contains("98 samples"));
        let svg = std::fs::read_to_string(d.join("rtt.svg")).unwrap();
        check_xml(&svg);
        assert!(svg.contains(RTT_METRIC));
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
        let svg = std::fs::read_to_string(d.join("rtt.svg")).unwrap();
        assert!(svg.contains("no samples"));
        check_xml(&svg);
        r.write_json(&d.join("x.json")).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
