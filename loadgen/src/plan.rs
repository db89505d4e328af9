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

/// First address chosen for UDP devices on loopback: one address per device.
const UDP_AUTO_FIRST: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);
/// Most addresses chosen automatically (a `--source-ips` range has the same bound).
const MAX_AUTO_IPS: u64 = 65_534;

/// Source addresses for `devices` devices towards `target`: the given range; or, for a
/// loopback target, UDP devices get an address each (127.1.0.1, 127.1.0.2, …: they then share
/// a socket per thread, told apart by address) and TCP devices as many as their ports need
/// (127.0.0.2, 127.0.0.3, …).
pub fn source_ips(given: Option<Vec<IpAddr>>, target: IpAddr, devices: u64, udp: bool) -> Vec<IpAddr> {
    if let Some(g) = given {
        return g;
    }
    if !target.is_loopback() || !target.is_ipv4() {
        return vec![];
    }
    if udp {
        let first = u32::from(UDP_AUTO_FIRST);
        return (0..devices.min(MAX_AUTO_IPS) as u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(first + i)))
            .collect();
    }
    let need = devices.div_ceil(MAX_DEVICES_PER_SOURCE_IP);
    if need <= 1 {
        return vec![];
    }
    (0..need).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))).collect()
}

/// Whether UDP devices share sockets (one per thread and source address in use) rather than
/// each opening its own: possible with IPv4 source addresses to tell them apart.
pub fn shared_udp(udp: bool, flood: bool, target: IpAddr, ips: &[IpAddr]) -> bool {
    udp && !flood && target.is_ipv4() && !ips.is_empty() && ips.iter().all(IpAddr::is_ipv4)
}

/// Sockets the run needs: one per device, or with shared UDP sockets one per `ips` devices
/// of a thread.
pub fn sockets(devices: u64, shared: bool, ips: usize, threads: usize) -> u64 {
    if shared {
        devices.div_ceil(ips.max(1) as u64) + threads as u64
    } else {
        devices
    }
}

/// Worker processes: enough to stay under the fd limit with `sockets` sockets, at least one
/// per core.
pub fn workers(given: Option<usize>, sockets: u64, cores: usize) -> usize {
    given.unwrap_or_else(|| (sockets.div_ceil(MAX_DEVICES_PER_WORKER) as usize).max(cores).max(1))
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
        assert!(source_ips(None, lo, 1000, false).is_empty());
        assert_eq!(source_ips(None, lo, 50_000, false).len(), 2);
        let udp = source_ips(None, lo, 50_000, true);
        assert_eq!(udp.len(), 50_000);
        assert_eq!(udp[0], "127.1.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(udp[49_999], "127.1.195.80".parse::<IpAddr>().unwrap());
        assert_eq!(source_ips(None, lo, 100_000, true).len(), 65_534);
        let remote: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(source_ips(None, remote, 50_000, true).is_empty());
        assert!(shared_udp(true, false, lo, &udp));
        assert!(!shared_udp(true, false, lo, &[]), "no addresses: a socket per device");
        assert!(!shared_udp(true, true, lo, &udp), "floods bind their own sockets");
        assert!(!shared_udp(false, false, lo, &udp));
        assert_eq!(sockets(50_000, true, 50_000, 2), 3);
        assert_eq!(sockets(50_000, true, 2, 2), 25_002);
        assert_eq!(sockets(50_000, false, 2, 2), 50_000);
        assert_eq!(workers(None, 50_000, 2), 4);
        assert_eq!(workers(None, 3, 2), 2);
        assert_eq!(workers(None, 100, 2), 2);
        assert_eq!(workers(Some(1), 50_000, 2), 1);
        let mut all: Vec<u64> =
            (0..3).flat_map(|w| (0..2).flat_map(move |t| devices_of(100, w, 3, t, 2))).collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>(), "every device exactly once");
    }
}
