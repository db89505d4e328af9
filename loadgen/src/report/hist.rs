//! Latency histograms: the one configuration every loadgen thread and process records into, the
//! merge that never panics, HdrHistogram's own V2 encoding for shipping a worker's histograms to
//! the parent, and the `.hgrm` percentile distribution that HdrHistogram's plotter reads.

use std::fmt::Write as _;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;

/// Latency histogram; values are microseconds.
pub type Hist = Histogram<u64>;

/// Lowest discernible value of [`new_hist`] histograms (µs).
const HIST_LOW_US: u64 = 1;
/// Highest trackable value of [`new_hist`] histograms (µs): one hour.
const HIST_HIGH_US: u64 = 3_600_000_000;
/// Significant value digits of [`new_hist`] histograms.
const HIST_SIGFIG: u8 = 3;
/// Percentile ticks per half distance used for the `.hgrm` output (HdrHistogram's default).
pub const PERCENTILE_TICKS_PER_HALF_DISTANCE: u32 = 5;
/// Output value unit scaling ratio for the `.hgrm` output: µs -> ms.
pub const US_PER_MS: f64 = 1000.0;

/// A fresh histogram: 1 µs .. 3_600_000_000 µs (1 h), 3 significant digits, auto-resize off.
pub fn new_hist() -> Hist {
    let mut h = Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
        .expect("constant histogram bounds are valid");
    h.auto(false);
    h
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

/// `h` in HdrHistogram's V2 encoding, as base64 so that it travels inside a JSON line (the
/// worker's `RESULT` line). Any HdrHistogram implementation decodes it; every bucket keeps its
/// exact count, which a list of percentiles would not.
pub fn encode_v2(h: &Hist) -> Result<String, String> {
    let mut bytes = Vec::new();
    V2Serializer::new().serialize(h, &mut bytes).map_err(|e| format!("histogram encoding: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Inverse of [`encode_v2`]. The histogram keeps the configuration it was encoded with; [`merge`]
/// it into a [`new_hist`] to combine it with others.
pub fn decode_v2(text: &str) -> Result<Hist, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    Deserializer::new().deserialize(&mut bytes.as_slice()).map_err(|e| format!("histogram decoding: {e:?}"))
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn uniform_1_to_10000() -> Hist {
        let mut h = new_hist();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        h
    }

    // ---- .hgrm parsing helpers -------------------------------------------------------------

    pub(crate) struct Row {
        value: f64,
        percentile: f64,
        total: u64,
        inv: Option<f64>,
    }

    pub(crate) struct Hgrm {
        pub(crate) rows: Vec<Row>,
        mean: f64,
        max: f64,
        pub(crate) total: u64,
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

    pub(crate) fn parse_hgrm(text: &str) -> Hgrm {
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
        h.saturating_record(u64::MAX); // clamps, no panic
        h.saturating_record(1_000_000_000_000); // 11.6 days
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
    fn v2_round_trip() {
        let mut h = new_hist();
        for v in 1..=50_000u64 {
            h.record(v * 7 % 123_457 + 1).unwrap();
        }
        h.record_n(2_000_000, 42).unwrap();
        // through JSON, as the worker -> parent path does
        let line = serde_json::json!({ "rtt": encode_v2(&h).unwrap() }).to_string();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let back = decode_v2(v["rtt"].as_str().unwrap()).unwrap();
        assert_eq!(back, h, "every bucket, count and the configuration survive");
        let mut merged = new_hist();
        merge(&mut merged, &back);
        merge(&mut merged, &back);
        assert_eq!(merged.len(), 2 * h.len());
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
            assert_eq!(merged.value_at_quantile(q), h.value_at_quantile(q), "q={q}");
        }
        // empty histograms travel too
        let empty = decode_v2(&encode_v2(&new_hist()).unwrap()).unwrap();
        assert!(empty.is_empty());
        // garbage is an error, never a panic
        assert!(decode_v2("not base64!").is_err());
        assert!(decode_v2("AAAA").is_err());
        let mut cut = base64::engine::general_purpose::STANDARD.decode(encode_v2(&h).unwrap()).unwrap();
        cut.truncate(cut.len() / 2);
        assert!(decode_v2(&base64::engine::general_purpose::STANDARD.encode(cut)).is_err());
    }

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
}
