//! Where device keys come from: one key for all, a registry file (device_id → key with an
//! optional `*` wildcard), or an application resolver (database, key vault). Every key is
//! validated (≥ 16 bytes) when it is configured, not when a device first shows up.
//!
//! Registry format, one entry per line (`#` starts a comment):
//!
//! ```text
//! # device_id        key
//! 001122334455       a-text-key-of-16-bytes-or-more
//! 00:11:22:33:44:66  hex:000102030405060708090a0b0c0d0e0f
//! *                  fallback-key-for-every-other-device
//! ```

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::RwLock;
use zeroize::Zeroizing;

use crate::proto::crypto::{Psk, DEVICE_ID_LEN, MIN_PSK_LEN};
// Key files spell keys in hex; the helpers live with the id types, which print hex too.
use crate::proto::id::DeviceId;
pub use crate::proto::id::{parse_hex, to_hex};

/// What `Debug` output shows in place of a key or token.
pub const REDACTED: &str = "<redacted>";

/// A device id as 6 raw bytes.
pub type DeviceIdBytes = [u8; DEVICE_ID_LEN];

/// A configuration problem, naming the field or line at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, flag or `file:line` that is wrong.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// Build an error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Validate a raw key, naming `field` when it is too short.
pub fn validate_key(field: &str, key: &[u8]) -> Result<Psk, ConfigError> {
    Psk::new(key).map_err(|_| {
        ConfigError::new(field, format!("key is {} bytes, at least {MIN_PSK_LEN} are required", key.len()))
    })
}

/// Parsed registry: keys per device plus an optional wildcard.
#[derive(Clone, Default)]
pub struct Registry {
    keys: HashMap<DeviceIdBytes, Psk>,
    wildcard: Option<Psk>,
    /// The key bytes, for the device side (load generators, tests) that must present them;
    /// zeroized when the registry is dropped (a reload drops the old one).
    raw: HashMap<DeviceIdBytes, Zeroizing<Vec<u8>>>,
    raw_wildcard: Option<Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("devices", &self.keys.len())
            .field("wildcard", &self.wildcard.is_some())
            .finish()
    }
}

impl Registry {
    /// An empty registry (every device refused until keys are added).
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace a device's key (validated).
    pub fn insert(&mut self, device_id: DeviceIdBytes, key: &[u8]) -> Result<(), ConfigError> {
        let psk = validate_key(&DeviceId::new(device_id).to_string(), key)?;
        self.keys.insert(device_id, psk);
        self.raw.insert(device_id, Zeroizing::new(key.to_vec()));
        Ok(())
    }

    /// Set the key used for devices not listed (the reference's `b""` entry).
    pub fn set_wildcard(&mut self, key: &[u8]) -> Result<(), ConfigError> {
        self.wildcard = Some(validate_key("*", key)?);
        self.raw_wildcard = Some(Zeroizing::new(key.to_vec()));
        Ok(())
    }

    /// The key for `device_id`: its own, else the wildcard.
    pub fn lookup(&self, device_id: &DeviceIdBytes) -> Option<&Psk> {
        self.keys.get(device_id).or(self.wildcard.as_ref())
    }

    /// The key bytes a device presents (its own, else the wildcard): for the device side.
    pub fn raw_key(&self, device_id: &DeviceIdBytes) -> Option<&[u8]> {
        self.raw.get(device_id).or(self.raw_wildcard.as_ref()).map(|k| k.as_slice())
    }

    /// Whether `device_id` would be accepted.
    pub fn contains(&self, device_id: &DeviceIdBytes) -> bool {
        self.lookup(device_id).is_some()
    }

    /// A wildcard key is set.
    pub fn has_wildcard(&self) -> bool {
        self.wildcard.is_some()
    }

    /// Devices listed explicitly.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No explicit devices and no wildcard.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.wildcard.is_none()
    }

    /// Parse the registry text format; `origin` names the source in errors (`file:line`).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut reg = Registry::new();
        for (no, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = format!("{origin}:{}", no + 1);
            let mut parts = line.split_whitespace();
            let id = parts.next().unwrap_or("");
            let key_text = parts
                .next()
                .ok_or_else(|| ConfigError::new(&at, "expected `device_id key`, found no key"))?;
            if parts.next().is_some() {
                return Err(ConfigError::new(&at, "expected `device_id key`, found extra fields"));
            }
            let key = Zeroizing::new(match key_text.strip_prefix("hex:") {
                Some(h) => {
                    parse_hex(h).ok_or_else(|| ConfigError::new(&at, "key after `hex:` is not hex"))?
                }
                None => key_text.as_bytes().to_vec(),
            });
            let psk = validate_key(&at, &key)?;
            if id == "*" {
                reg.wildcard = Some(psk);
                reg.raw_wildcard = Some(key);
            } else {
                // The field is not echoed: a line with its fields swapped would print the key.
                let dev = id.parse::<DeviceId>().map(<[u8; DEVICE_ID_LEN]>::from).map_err(|_| {
                    ConfigError::new(&at, "the first field is not a device id (12 hex digits or colon hex)")
                })?;
                reg.keys.insert(dev, psk);
                reg.raw.insert(dev, key);
            }
        }
        Ok(reg)
    }

    /// Read and parse a registry file. An empty registry, or a file whose last line has no
    /// newline (cut off while written), is refused like a corrupt one: a reload keeps the
    /// old keys instead of disconnecting the fleet. Warns when the file is readable by group
    /// or others.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        // The whole file is key material: its copy in memory is zeroized too.
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new(&name, format!("cannot read: {e}")))?,
        );
        if let Some(w) = std::fs::metadata(path).ok().and_then(|m| permission_warning(&m)) {
            tracing::warn!(path = %name, "{w}");
        }
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(ConfigError::new(
                &name,
                "truncated: the last line has no newline (write the file whole, then rename it into place)",
            ));
        }
        let reg = Self::parse(&text, &name)?;
        if reg.is_empty() {
            return Err(ConfigError::new(
                &name,
                "no device and no wildcard: an empty registry is refused (a half-written file would disconnect the fleet)",
            ));
        }
        Ok(reg)
    }

    /// A fingerprint of the key `device_id` authenticates with now (its own, else the
    /// wildcard): equal fingerprints, same key. A keyed hash: it tells nothing about the key.
    pub fn fingerprint(&self, device_id: &DeviceIdBytes) -> Option<u64> {
        self.raw_key(device_id).map(key_fingerprint)
    }
}

/// The process's fingerprint of a key's bytes (SipHash under a random key, fixed per process).
pub fn key_fingerprint(key: &[u8]) -> u64 {
    static HASHER: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    HASHER.get_or_init(RandomState::new).hash_one(key)
}

/// Why a key file's permissions are unsafe, if they are: readable by group or others.
#[cfg(unix)]
pub fn permission_warning(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!("key file mode is {mode:03o}: readable by group or others (chmod 600, owned by the gateway's user)")
    })
}

/// Why a key file's permissions are unsafe (not checked off Unix).
#[cfg(not(unix))]
pub fn permission_warning(_meta: &std::fs::Metadata) -> Option<String> {
    None
}

/// Which key a device would authenticate with now, as [`PskSource::key_state`] tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// The source cannot tell without I/O (a resolver, asked at the next handshake).
    Unknown,
    /// The device is no longer accepted.
    Removed,
    /// Its key has this [`key_fingerprint`].
    Key(u64),
}

/// A future resolving a device's key (`None` refuses the device). Runs on the shard's thread.
pub type PskFuture = Pin<Box<dyn Future<Output = Option<Vec<u8>>>>>;

/// Application-supplied key lookup (database, vault). Keys shorter than 16 bytes are refused
/// at handshake time and counted as failures.
pub trait PskResolver: Send + Sync + 'static {
    /// Look up the key for `device_id`.
    fn resolve(&self, device_id: DeviceIdBytes) -> PskFuture;
}

/// Where the gateway gets device keys.
#[derive(Clone)]
#[non_exhaustive]
pub enum PskSource {
    /// One key for every device.
    Single(Psk),
    /// A registry, swappable at run time (key rotation); `path` is where reloads read from.
    Registry {
        /// The live registry.
        current: Arc<RwLock<Arc<Registry>>>,
        /// The file it came from, if any.
        path: Option<PathBuf>,
    },
    /// An application resolver.
    Resolver(Arc<dyn PskResolver>),
}

impl fmt::Debug for PskSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PskSource::Single(_) => f.write_str("PskSource::Single"),
            PskSource::Registry { current, path } => {
                write!(f, "PskSource::Registry({:?}, {:?})", current.read(), path)
            }
            PskSource::Resolver(_) => f.write_str("PskSource::Resolver"),
        }
    }
}

impl PskSource {
    /// One key for all devices (validated).
    pub fn single(key: &[u8]) -> Result<Self, ConfigError> {
        Ok(PskSource::Single(validate_key("psk", key)?))
    }

    /// A fixed registry.
    pub fn registry(reg: Registry) -> Self {
        PskSource::Registry { current: Arc::new(RwLock::new(Arc::new(reg))), path: None }
    }

    /// A registry loaded from (and reloadable from) a file.
    pub fn registry_file(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        let path = path.into();
        let reg = Registry::load(&path)?;
        Ok(PskSource::Registry { current: Arc::new(RwLock::new(Arc::new(reg))), path: Some(path) })
    }

    /// An application resolver.
    pub fn resolver(r: impl PskResolver) -> Self {
        PskSource::Resolver(Arc::new(r))
    }

    /// Whether `device_id` is still accepted, for sources that can tell without I/O
    /// (a resolver is assumed to keep accepting: it is asked at the next handshake).
    pub fn still_accepts(&self, device_id: &DeviceIdBytes) -> bool {
        match self {
            PskSource::Single(_) | PskSource::Resolver(_) => true,
            PskSource::Registry { current, .. } => current.read().contains(device_id),
        }
    }

    /// Which key `device_id` would authenticate with now (a session remembers it, and a
    /// reload that changes it ends the session).
    pub fn key_state(&self, device_id: &DeviceIdBytes) -> KeyState {
        match self {
            PskSource::Single(_) => KeyState::Key(0),
            PskSource::Resolver(_) => KeyState::Unknown,
            PskSource::Registry { current, .. } => match current.read().fingerprint(device_id) {
                Some(fp) => KeyState::Key(fp),
                None => KeyState::Removed,
            },
        }
    }

    /// Resolve the key for `device_id` (awaits only for resolvers).
    pub async fn lookup(&self, device_id: DeviceIdBytes) -> Option<Psk> {
        match self {
            PskSource::Single(p) => Some(p.clone()),
            PskSource::Registry { current, .. } => current.read().lookup(&device_id).cloned(),
            PskSource::Resolver(r) => {
                let key = Zeroizing::new(r.resolve(device_id).await?);
                Psk::new(&key).ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_format() {
        let text = "# fleet\n001122334455 sixteen-byte-key\n\n00:11:22:33:44:66 hex:000102030405060708090a0b0c0d0e0f # lab\n* wildcard-key-0123\n";
        let r = Registry::parse(text, "reg").unwrap();
        assert_eq!(r.len(), 2);
        assert!(r.contains(&[0, 0x11, 0x22, 0x33, 0x44, 0x55]));
        assert!(r.contains(&[9; 6]), "wildcard");
        let no_wild = Registry::parse("001122334455 sixteen-byte-key", "reg").unwrap();
        assert!(!no_wild.contains(&[9; 6]));
    }

    #[test]
    fn registry_errors_name_the_line() {
        let e = Registry::parse("\n001122334455 short", "keys.txt").unwrap_err();
        assert_eq!(e.field, "keys.txt:2");
        assert!(e.message.contains("at least 16"), "{e}");
        let e = Registry::parse("0011223344 sixteen-byte-key", "k").unwrap_err();
        assert!(e.message.contains("not a device id"));
        let e = Registry::parse("a-swapped-secret-key-0123 001122334455", "k").unwrap_err();
        assert!(!e.to_string().contains("a-swapped-secret"), "the key is not echoed: {e}");
        let e = Registry::parse("001122334455", "k").unwrap_err();
        assert!(e.message.contains("no key"));
        let e = Registry::parse("001122334455 hex:zz00", "k").unwrap_err();
        assert!(e.message.contains("not hex"));
    }
}
