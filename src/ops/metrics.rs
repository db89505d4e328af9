//! Prometheus text exposition (format 0.0.4) of a gateway's counters, summed from the
//! shards' relaxed atomics by the metrics thread: no lock on any frame path.

use std::fmt::Write;

use crate::gateway::{GatewayHandle, HANDSHAKE_BUCKETS_US};

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Render every metric of `h`.
pub fn render(h: &GatewayHandle) -> String {
    let s = h.stats();
    let shards = h.shard_stats();
    let mut o = String::with_capacity(8 * 1024);

    family(&mut o, "usmp_build_info", "gauge", "Build information.");
    let _ = writeln!(o, "usmp_build_info{{version=\"{}\",protocol=\"2\"}} 1", env!("CARGO_PKG_VERSION"));

    family(&mut o, "usmp_sessions_open", "gauge", "Sessions currently open, by transport and shard.");
    for (i, sh) in shards.iter().enumerate() {
        let _ = writeln!(o, "usmp_sessions_open{{transport=\"tcp\",shard=\"{i}\"}} {}", sh.sessions_open_tcp);
        let _ = writeln!(o, "usmp_sessions_open{{transport=\"udp\",shard=\"{i}\"}} {}", sh.sessions_open_udp);
    }

    family(
        &mut o,
        "usmp_sessions_parked",
        "gauge",
        "Open sessions idle long enough to have dropped their expanded keys.",
    );
    let _ = writeln!(o, "usmp_sessions_parked {}", s.sessions_parked);

    family(&mut o, "usmp_connections_accepted_total", "counter", "TCP connections accepted.");
    let _ = writeln!(o, "usmp_connections_accepted_total {}", s.accepted);

    family(&mut o, "usmp_handshakes_total", "counter", "Handshakes by outcome.");
    for (outcome, v) in [
        ("ok", s.handshakes_ok),
        ("bad_key", s.handshakes_bad_key),
        ("timeout", s.handshakes_timeout),
        ("malformed", s.handshakes_malformed),
        ("unknown_device", s.handshakes_unknown_device),
        ("locked_out", s.refused_locked_out),
        ("over_limit", s.refused_over_limit),
        ("evicted", s.handshakes_evicted),
    ] {
        let _ = writeln!(o, "usmp_handshakes_total{{outcome=\"{outcome}\"}} {v}");
    }

    let lat = h.handshake_latency();
    family(&mut o, "usmp_handshake_duration_seconds", "histogram", "Accept (or cookie HELLO) to SESSION_OK.");
    for (b, c) in HANDSHAKE_BUCKETS_US.iter().zip(lat.cumulative.iter()) {
        let _ = writeln!(o, "usmp_handshake_duration_seconds_bucket{{le=\"{}\"}} {c}", *b as f64 / 1e6);
    }
    let _ = writeln!(o, "usmp_handshake_duration_seconds_bucket{{le=\"+Inf\"}} {}", lat.count);
    let _ = writeln!(o, "usmp_handshake_duration_seconds_sum {}", lat.sum_us as f64 / 1e6);
    let _ = writeln!(o, "usmp_handshake_duration_seconds_count {}", lat.count);

    family(
        &mut o,
        "usmp_lockouts_active",
        "gauge",
        "Lockout entries currently refusing (largest shard view).",
    );
    let _ =
        writeln!(o, "usmp_lockouts_active {}", shards.iter().map(|x| x.lockouts_active).max().unwrap_or(0));
    family(&mut o, "usmp_lockouts_started_total", "counter", "Lockouts started.");
    let _ = writeln!(o, "usmp_lockouts_started_total {}", s.lockouts_started);

    family(&mut o, "usmp_frames_total", "counter", "Authenticated frames received and frames sent.");
    let _ = writeln!(o, "usmp_frames_total{{direction=\"in\"}} {}", s.frames_in_total());
    let _ = writeln!(o, "usmp_frames_total{{direction=\"out\"}} {}", s.frames_out_total());
    family(&mut o, "usmp_bytes_total", "counter", "Bytes of frames received and sent.");
    let _ = writeln!(o, "usmp_bytes_total{{direction=\"in\"}} {}", s.bytes_in_total());
    let _ = writeln!(o, "usmp_bytes_total{{direction=\"out\"}} {}", s.bytes_out_total());

    family(&mut o, "usmp_dropped_total", "counter", "Input dropped without ending a session, by reason.");
    for (reason, v) in [
        ("malformed", s.dropped_malformed),
        ("unauthenticated", s.dropped_unauthenticated),
        ("replayed", s.dropped_replayed),
        ("stray_ack", s.dropped_stray_ack),
        ("busy", s.dropped_busy),
        ("violation", s.dropped_violation),
        ("cookie_rate_limited", s.cookie_rate_limited),
        ("cookie_refused", s.cookies_refused),
    ] {
        let _ = writeln!(o, "usmp_dropped_total{{reason=\"{reason}\"}} {v}");
    }

    family(&mut o, "usmp_sessions_closed_total", "counter", "Sessions ended, by notable reason and in all.");
    let _ =
        writeln!(o, "usmp_sessions_closed_total{{reason=\"protocol_error\"}} {}", s.closed_protocol_error);
    let _ = writeln!(o, "usmp_sessions_closed_total{{reason=\"watchdog\"}} {}", s.closed_watchdog);
    let _ = writeln!(o, "usmp_sessions_closed_total{{reason=\"stalled\"}} {}", s.closed_stalled);
    let _ = writeln!(o, "usmp_sessions_closed_total{{reason=\"all\"}} {}", s.sessions_closed);
    family(&mut o, "usmp_watchdog_timeouts_total", "counter", "Sessions ended by the inactivity watchdog.");
    let _ = writeln!(o, "usmp_watchdog_timeouts_total {}", s.closed_watchdog);

    family(
        &mut o,
        "usmp_downlinks_busy_total",
        "counter",
        "Downlinks refused: the session's send queue was full.",
    );
    let _ = writeln!(o, "usmp_downlinks_busy_total {}", s.downlinks_busy);
    family(
        &mut o,
        "usmp_inbox_full_total",
        "counter",
        "Cross-shard commands refused: the shard's inbox was full.",
    );
    let _ = writeln!(o, "usmp_inbox_full_total {}", s.inbox_full);

    family(&mut o, "usmp_udp_datagrams_total", "counter", "UDP datagrams received.");
    let _ = writeln!(o, "usmp_udp_datagrams_total {}", s.datagrams_in);
    family(&mut o, "usmp_udp_retransmits_total", "counter", "UDP frames retransmitted by the ARQ.");
    let _ = writeln!(o, "usmp_udp_retransmits_total {}", s.udp_retransmits);
    family(&mut o, "usmp_udp_cookies_sent_total", "counter", "UDP HELLO_RETRY cookies sent.");
    let _ = writeln!(o, "usmp_udp_cookies_sent_total {}", s.cookies_sent);
    family(
        &mut o,
        "usmp_udp_cookies_sent_known_total",
        "counter",
        "UDP cookies sent from the budget reserved for devices that authenticated from that address before.",
    );
    let _ = writeln!(o, "usmp_udp_cookies_sent_known_total {}", s.cookies_sent_known);
    h.render_extra_metrics(&mut o);
    o
}
