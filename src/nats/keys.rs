//! Fleet keys from a NATS KV bucket (`--psk-kv`): key `<device>` (12 lowercase hex digits)
//! holds that device's key in the registry file's format (text, or `hex:…`), key `_default`
//! the wildcard. The bucket is watched: every change is applied to the gateway's registry at
//! once (sessions of deleted or rotated devices end with BYE, as on a SIGHUP reload). While
//! NATS is unreachable the last known keys stay in force; handshakes never wait on NATS.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use zeroize::Zeroizing;

use super::config::parse_device_token;
use super::ctx::Ctx;
use crate::psk::{parse_hex, Registry};

/// The bucket key of the wildcard entry.
pub const DEFAULT_KEY: &str = "_default";

/// The bucket's current entries, by bucket key, as raw key bytes (zeroized when replaced,
/// deleted or dropped).
#[derive(Default)]
pub(super) struct KeySet {
    entries: HashMap<String, Zeroizing<Vec<u8>>>,
}

/// A key value in the registry file's format.
fn parse_value(v: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let key = Zeroizing::new(match s.strip_prefix("hex:") {
        Some(h) => parse_hex(h)?,
        None => s.as_bytes().to_vec(),
    });
    (key.len() >= crate::proto::crypto::MIN_PSK_LEN).then_some(key)
}

impl KeySet {
    /// Apply one bucket entry; false if it was not a valid key (the entry is ignored and
    /// the last good key of that name, if any, stays).
    pub(super) fn apply(&mut self, key: &str, op: kv::Operation, value: &[u8]) -> bool {
        if key != DEFAULT_KEY && parse_device_token(key).is_none() {
            return false;
        }
        match op {
            kv::Operation::Delete | kv::Operation::Purge => {
                self.entries.remove(key);
                true
            }
            kv::Operation::Put => match parse_value(value) {
                Some(k) => {
                    self.entries.insert(key.to_string(), k);
                    true
                }
                None => false,
            },
        }
    }

    /// The registry these entries make.
    pub(super) fn registry(&self) -> Registry {
        let mut reg = Registry::new();
        for (name, key) in &self.entries {
            // Entries were validated on the way in; a failure here cannot happen.
            let _ = match parse_device_token(name) {
                Some(d) => reg.insert(d, key),
                None => reg.set_wildcard(key),
            };
        }
        reg
    }
}

/// Watch the key bucket for as long as the gateway runs, re-opening the watch after errors.
/// `apply` installs a registry (the gateway swaps it in and revalidates sessions); `loaded`
/// is told once the bucket's current content is in force.
pub(super) async fn watch(
    ctx: Arc<Ctx>,
    bucket: String,
    apply: Arc<dyn Fn(Registry) + Send + Sync>,
    loaded: tokio::sync::watch::Sender<bool>,
) {
    let mut keys = KeySet::default();
    let mut delay = Duration::from_millis(100);
    loop {
        match watch_once(&ctx, &bucket, &mut keys, &*apply, &loaded).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(e) => {
                ctx.stats.side_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, bucket = %bucket, "nats: key bucket unavailable; the last known keys stay in force");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn watch_once(
    ctx: &Ctx,
    bucket: &str,
    keys: &mut KeySet,
    apply: &(dyn Fn(Registry) + Send + Sync),
    loaded: &tokio::sync::watch::Sender<bool>,
) -> Result<(), String> {
    let store = super::bridge::ensure_bucket(&ctx.js, bucket, ctx.cfg.replicas).await?;
    // Current values first (then every change): rebuild from scratch, so that a key deleted
    // while we were away is gone here too.
    let mut fresh = KeySet::default();
    let pending = store.status().await.map_err(|e| e.to_string())?.values();
    let mut watch = store.watch_with_history(">").await.map_err(|e| e.to_string())?;
    let mut initial = pending > 0;
    if !initial {
        *keys = fresh;
        fresh = KeySet::default();
        apply(keys.registry());
        let _ = loaded.send(true);
    }
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| e.to_string())?;
        let target = if initial { &mut fresh } else { &mut *keys };
        if !target.apply(&entry.key, entry.operation, &entry.value) {
            ctx.stats.kv_invalid.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(bucket, key = %entry.key, "nats: key bucket entry is not a valid key (≥ 16 bytes, text or hex:…, under a 12-hex-digit device id or _default); ignored");
        }
        if initial && entry.delta == 0 {
            initial = false;
            *keys = std::mem::take(&mut fresh);
        }
        if !initial {
            apply(keys.registry());
            ctx.stats.kv_applied.fetch_add(1, Ordering::Relaxed);
            let created = SystemTime::from(entry.created);
            let lag = SystemTime::now().duration_since(created).unwrap_or_default();
            ctx.stats.kv_lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
            let _ = loaded.send(true);
        }
    }
    Err("watch ended".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_in_the_registry_format_and_bad_ones_ignored() {
        let mut k = KeySet::default();
        assert!(k.apply("001122334455", kv::Operation::Put, b"a-text-key-of-16-bytes"));
        assert!(k.apply("00112233445a", kv::Operation::Put, b"hex:000102030405060708090a0b0c0d0e0f"));
        assert!(k.apply(DEFAULT_KEY, kv::Operation::Put, b"fallback-key-0123456789"));
        assert!(!k.apply("001122334455", kv::Operation::Put, b"short"), "too short");
        assert!(!k.apply("00112233445b", kv::Operation::Put, b"hex:zz"), "bad hex");
        assert!(!k.apply("00:11:22:33:44:55", kv::Operation::Put, b"a-text-key-of-16-bytes"));
        let reg = k.registry();
        assert_eq!(reg.raw_key(&[0, 0x11, 0x22, 0x33, 0x44, 0x55]), Some(&b"a-text-key-of-16-bytes"[..]));
        assert!(reg.has_wildcard());
        assert_eq!(reg.len(), 2);
        assert!(k.apply("001122334455", kv::Operation::Delete, b""));
        assert!(k.apply(DEFAULT_KEY, kv::Operation::Purge, b""));
        let reg = k.registry();
        assert!(!reg.has_wildcard());
        assert_eq!(reg.len(), 1);
    }
}
