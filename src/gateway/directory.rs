//! Control-plane device directory: which shard holds a device's session, so `send_to` and
//! `kick` reach it from any thread. Touched at session up/down and by admin calls only —
//! never per frame. Striped by crc32c of the device id to keep lock hold times tiny.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::proto::{DeviceId, SessionId, Transport};

const STRIPES: usize = 16;

/// Device ids come from devices (any id, with a wildcard key): hashed with a per-process
/// random seed, and much faster than the standard SipHash on these 6-byte keys.
type DeviceMap = HashMap<[u8; 6], Entry, foldhash::fast::RandomState>;

/// A live session as seen by the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The device.
    pub device_id: DeviceId,
    /// Its session.
    pub session_id: SessionId,
    /// Transport.
    pub transport: Transport,
    /// Peer address.
    pub peer: SocketAddr,
    /// Shard holding it.
    pub shard: usize,
    /// Wall-clock time of SESSION_OK.
    pub since: SystemTime,
    /// Process-unique connection number.
    pub conn_id: u64,
}

/// A [`SessionInfo`] as the directory stores it: one entry per live device, so it is packed
/// (64 bytes with its key instead of 96).
#[derive(Clone, Copy)]
struct Entry {
    conn_id: u64,
    /// Nanoseconds since the Unix epoch.
    since: u64,
    session_id: [u8; 16],
    ip: IpAddr,
    port: u16,
    shard: u16,
    transport: Transport,
}

impl Entry {
    fn pack(i: &SessionInfo) -> Self {
        let since = i.since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Entry {
            conn_id: i.conn_id,
            since,
            session_id: i.session_id.into(),
            ip: i.peer.ip(),
            port: i.peer.port(),
            shard: i.shard as u16,
            transport: i.transport,
        }
    }

    fn unpack(&self, device_id: [u8; 6]) -> SessionInfo {
        SessionInfo {
            device_id: device_id.into(),
            session_id: self.session_id.into(),
            transport: self.transport,
            peer: SocketAddr::new(self.ip, self.port),
            shard: self.shard as usize,
            since: UNIX_EPOCH + Duration::from_nanos(self.since),
            conn_id: self.conn_id,
        }
    }
}

/// device_id → the newest session of that device.
pub struct Directory {
    stripes: Vec<Mutex<DeviceMap>>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory { stripes: (0..STRIPES).map(|_| Mutex::new(DeviceMap::default())).collect() }
    }
}

impl Directory {
    fn stripe(&self, id: &[u8; 6]) -> &Mutex<DeviceMap> {
        &self.stripes[crc32c::crc32c(id) as usize % STRIPES]
    }

    /// Record a new session (it shadows an older one of the same device).
    pub fn insert(&self, info: SessionInfo) {
        let id = *info.device_id.as_bytes();
        self.stripe(&id).lock().insert(id, Entry::pack(&info));
    }

    /// Forget a session, only if it is still the device's current one.
    pub fn remove(&self, device_id: &[u8; 6], conn_id: u64) {
        let mut m = self.stripe(device_id).lock();
        if m.get(device_id).is_some_and(|i| i.conn_id == conn_id) {
            m.remove(device_id);
        }
    }

    /// The device's current session.
    pub fn get(&self, device_id: &[u8; 6]) -> Option<SessionInfo> {
        self.stripe(device_id).lock().get(device_id).map(|e| e.unpack(*device_id))
    }

    /// Every current session.
    pub fn snapshot(&self) -> Vec<SessionInfo> {
        self.stripes
            .iter()
            .flat_map(|s| s.lock().iter().map(|(id, e)| e.unpack(*id)).collect::<Vec<_>>())
            .collect()
    }

    /// Number of devices with a session.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u8, peer: &str, conn_id: u64) -> SessionInfo {
        SessionInfo {
            device_id: DeviceId::new([id, 1, 2, 3, 4, 5]),
            session_id: SessionId::new([id; 16]),
            transport: if id.is_multiple_of(2) { Transport::Tcp } else { Transport::Udp },
            peer: peer.parse().unwrap(),
            shard: id as usize % 3,
            since: SystemTime::now(),
            conn_id,
        }
    }

    #[test]
    fn packed_entries_give_back_what_was_stored() {
        let d = Directory::default();
        let a = info(1, "10.1.2.3:4567", 7);
        let b = info(2, "[2001:db8::5]:9000", 8);
        d.insert(a.clone());
        d.insert(b.clone());
        assert_eq!(d.get(a.device_id.as_bytes()), Some(a.clone()));
        assert_eq!(d.get(b.device_id.as_bytes()), Some(b.clone()));
        let mut all = d.snapshot();
        all.sort_by_key(|i| i.conn_id);
        assert_eq!(all, vec![a.clone(), b.clone()]);
        // Only the device's current session is forgotten.
        d.remove(a.device_id.as_bytes(), 99);
        assert_eq!(d.len(), 2);
        d.remove(a.device_id.as_bytes(), 7);
        assert_eq!(d.get(a.device_id.as_bytes()), None);
        assert_eq!(d.len(), 1);
    }
}
