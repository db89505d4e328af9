//! Control-plane device directory: which shard holds a device's session, so `send_to` and
//! `kick` reach it from any thread. Touched at session up/down and by admin calls only —
//! never per frame. Striped by crc32c of the device id to keep lock hold times tiny.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::proto::Transport;

const STRIPES: usize = 16;

/// A live session as seen by the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Device id bytes.
    pub device_id: [u8; 6],
    /// Session id bytes.
    pub session_id: [u8; 16],
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

/// device_id → the newest session of that device.
pub struct Directory {
    stripes: Vec<Mutex<HashMap<[u8; 6], SessionInfo>>>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory { stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl Directory {
    fn stripe(&self, id: &[u8; 6]) -> &Mutex<HashMap<[u8; 6], SessionInfo>> {
        &self.stripes[crc32c::crc32c(id) as usize % STRIPES]
    }

    /// Record a new session (it shadows an older one of the same device).
    pub fn insert(&self, info: SessionInfo) {
        self.stripe(&info.device_id).lock().insert(info.device_id, info);
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
        self.stripe(device_id).lock().get(device_id).cloned()
    }

    /// Every current session.
    pub fn snapshot(&self) -> Vec<SessionInfo> {
        self.stripes.iter().flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>()).collect()
    }

    /// Number of devices with a session.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }
}
