//! How a run is split: device ids, worker processes, threads, source addresses, cores.

use std::net::{IpAddr, Ipv4Addr};

/// Sockets one worker process may hold (the per-process fd limit here is 20 000).
pub const MAX_DEVICES_PER_WORKER: u64 = 15_000;
/// Ephemeral ports one source address can use towards one server port, with margin.
pub const MAX_DEVICES_PER_SOURCE_IP: u64 = 25_000;

/// Parse `127.0.0.2-127.0.0.9` (or a single address) into the list of addresses.
pub fn parse_ip_range(s: &str) -> Result<Vec<IpAddr>, String> {
    let bad = || format!("--source-ips: `{s}` is not an IPv4 range like 127.0.0.2-127.0.0.9");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
    let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
    let (a, b) = (u32::from(a), u32::from(b));
    if a > b || b - a > 65_535 {
        return Err(bad());
    }
    Ok((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))).collect())
}

/// Parse a core list (`0,1`, `2-5`).
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    usmp::ops::settings::parse_cpus(s).map_err(|e| e.to_string())
}

/// Source addresses for `devices` devices towards `target`: the given range, or, for a
/// loopback target that needs more ports than one address has, 127.0.0.2, 127.0.0.3, …
pub fn source_ips(given: Option<Vec<IpAddr>>, target: IpAddr, devices: u64) -> Vec<IpAddr> {
    if let Some(g) = given {
        return g;
    }
    let need = devices.div_ceil(MAX_DEVICES_PER_SOURCE_IP);
    if need <= 1 || !target.is_loopback() {
        return vec![];
    }
    (0..need).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))).collect()
}

/// Worker processes: enough to stay under the fd limit, at least one per core.
pub fn workers(given: Option<usize>, devices: u64, cores: usize) -> usize {
    given.unwrap_or_else(|| (devices.div_ceil(MAX_DEVICES_PER_WORKER) as usize).max(cores).max(1))
}

/// The devices (global indices) of worker `w` of `n`, thread `t` of `threads`.
pub fn devices_of(devices: u64, w: usize, n: usize, t: usize, threads: usize) -> impl Iterator<Item = u64> {
    let stride = (n * threads) as u64;
    let first = (w * threads + t) as u64;
    (first..devices).step_by(stride as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_splits() {
        assert_eq!(parse_ip_range("127.0.0.2-127.0.0.4").unwrap().len(), 3);
        assert_eq!(parse_ip_range("10.0.0.1").unwrap().len(), 1);
        assert!(parse_ip_range("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_ip_range("x").is_err());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(source_ips(None, lo, 1000).is_empty());
        assert_eq!(source_ips(None, lo, 50_000).len(), 2);
        assert_eq!(workers(None, 50_000, 2), 4);
        assert_eq!(workers(None, 100, 2), 2);
        assert_eq!(workers(Some(1), 50_000, 2), 1);
        let mut all: Vec<u64> =
            (0..3).flat_map(|w| (0..2).flat_map(move |t| devices_of(100, w, 3, t, 2))).collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>(), "every device exactly once");
    }
}
