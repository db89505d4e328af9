//! The NATS bridge's settings, checked before anything connects: a misconfigured start fails
//! with an error naming the flag, never later.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::proto::reassembly::MAX_MESSAGE_LEN;
use crate::psk::ConfigError;

/// How the gateway talks to NATS (`--mode nats`).
#[derive(Clone)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`, `tls://host:port`); any one will do, the client
    /// learns the rest of the cluster from it.
    pub urls: Vec<String>,
    /// A `.creds` file (JWT + NKey seed).
    pub creds: Option<PathBuf>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// CA certificate (PEM) to verify the servers' TLS certificates with; requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// First subject token of everything the gateway publishes (`usmp`).
    pub prefix: String,
    /// This gateway's name in headers, events and presence.
    pub gateway_id: String,
    /// How long a downlink for an offline device stays queued (zero: no queue, `offline`).
    pub downlink_ttl: Duration,
    /// Queued downlinks per device; past it a request gets `queue_full`.
    pub downlink_queue: u32,
    /// Take device keys from this KV bucket instead of `--psk`/`--psk-file`.
    pub psk_kv: Option<String>,
    /// TCP: publishes of one session not yet acknowledged by JetStream before the gateway
    /// stops reading from it (what a crash can lose at most per TCP session).
    pub max_unacked: u32,
    /// `USMP_UP`: how long uplinks are kept.
    pub up_max_age: Duration,
    /// `USMP_UP`: bytes kept (oldest dropped first); -1 = unlimited.
    pub up_max_bytes: i64,
    /// Replicas of the gateway's streams and buckets (1, or 3 on a 3-node cluster).
    pub replicas: usize,
    /// Bridge threads (tokio workers).
    pub threads: usize,
    /// How long either side of the shard↔bridge link gathers messages after the first before
    /// waking the other thread (like a producer's `linger.ms`). Zero hands over every turn.
    pub linger: Duration,
}

impl fmt::Debug for NatsConfig {
    // By hand: the password must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("urls", &self.urls)
            .field("creds", &self.creds)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls_ca", &self.tls_ca)
            .field("prefix", &self.prefix)
            .field("gateway_id", &self.gateway_id)
            .field("downlink_ttl", &self.downlink_ttl)
            .field("downlink_queue", &self.downlink_queue)
            .field("psk_kv", &self.psk_kv)
            .field("max_unacked", &self.max_unacked)
            .finish_non_exhaustive()
    }
}

/// The host name, for `--gateway-id`'s default.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "usmp-gateway".into())
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            urls: vec!["nats://127.0.0.1:4222".into()],
            creds: None,
            user: None,
            password: None,
            tls_ca: None,
            prefix: "usmp".into(),
            gateway_id: host_name(),
            downlink_ttl: Duration::from_secs(3600),
            downlink_queue: 50,
            psk_kv: None,
            max_unacked: 16,
            up_max_age: Duration::from_secs(7 * 86_400),
            up_max_bytes: 1 << 30,
            replicas: 1,
            threads: 1,
            linger: Duration::from_micros(DEFAULT_LINGER_US),
        }
    }
}

/// `--nats-linger`'s default, in microseconds.
pub const DEFAULT_LINGER_US: u64 = 1000;
/// `--nats-linger`'s ceiling: past it the wait would eat into the devices' retransmission
/// timers rather than save wake-ups.
pub const MAX_LINGER_US: u64 = 100_000;

fn err(flag: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::new(format!("--{flag}"), msg)
}

/// A subject token (or dotted tokens): printable, no spaces, no wildcards.
fn subject_ok(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| !t.is_empty())
        && s.chars().all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
}

/// A stream or bucket name as JetStream accepts it.
fn bucket_ok(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl NatsConfig {
    /// Parse `--nats URL[,URL…]`.
    pub fn parse_urls(s: &str) -> Result<Vec<String>, ConfigError> {
        let urls: Vec<String> =
            s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
        if urls.is_empty() {
            return Err(err("nats", "give at least one URL, e.g. nats://127.0.0.1:4222"));
        }
        for u in &urls {
            let addr = async_nats::ServerAddr::from_str(u)
                .map_err(|e| err("nats", format!("`{u}` is not a NATS URL: {e}")))?;
            if !matches!(addr.scheme(), "nats" | "tls") {
                return Err(err("nats", format!("`{u}`: use nats:// or tls://")));
            }
        }
        Ok(urls)
    }

    /// Check every setting; the error names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let joined = self.urls.join(",");
        Self::parse_urls(&joined)?;
        if let Some(p) = &self.creds {
            std::fs::File::open(p)
                .map_err(|e| err("nats-creds", format!("cannot read {}: {e}", p.display())))?;
        }
        if let Some(p) = &self.tls_ca {
            std::fs::File::open(p)
                .map_err(|e| err("nats-tls-ca", format!("cannot read {}: {e}", p.display())))?;
        }
        match (&self.user, &self.password) {
            (Some(_), None) => return Err(err("nats-password", "--nats-user needs --nats-password")),
            (None, Some(_)) => return Err(err("nats-user", "--nats-password needs --nats-user")),
            _ => {}
        }
        if self.creds.is_some() && self.user.is_some() {
            return Err(err("nats-creds", "give either --nats-creds or --nats-user/--nats-password"));
        }
        if !subject_ok(&self.prefix) {
            return Err(err(
                "nats-prefix",
                format!("`{}` is not a subject prefix (no spaces, * or >)", self.prefix),
            ));
        }
        if !subject_ok(&self.gateway_id) || self.gateway_id.contains('.') || self.gateway_id.len() > 128 {
            return Err(err("gateway-id", format!("`{}`: use letters, digits, - and _", self.gateway_id)));
        }
        if self.downlink_queue == 0 && !self.downlink_ttl.is_zero() {
            return Err(err(
                "downlink-queue",
                "must be at least 1 (use --downlink-ttl 0 to turn the queue off)",
            ));
        }
        if let Some(b) = &self.psk_kv {
            if !bucket_ok(b) {
                return Err(err("psk-kv", format!("`{b}` is not a bucket name (letters, digits, - and _)")));
            }
        }
        if self.max_unacked == 0 {
            return Err(err("nats-max-unacked", "must be at least 1"));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(err("nats-replicas", "must be between 1 and 5"));
        }
        if self.threads == 0 || self.threads > 64 {
            return Err(err("nats-threads", "must be between 1 and 64"));
        }
        if self.linger > Duration::from_micros(MAX_LINGER_US) {
            return Err(err("nats-linger", format!("must be at most {MAX_LINGER_US} µs")));
        }
        Ok(())
    }

    /// `P.up.<device>`.
    pub fn up_subject(&self, device: &[u8; 6]) -> String {
        up_subject(&self.prefix, device)
    }
    /// `P.down.<device>`.
    pub fn down_subject(&self, device: &[u8; 6]) -> String {
        format!("{}.down.{}", self.prefix, device_token(device))
    }
    /// `P.route.<device>`: what the gateway holding a device's session subscribes to.
    pub fn route_subject(&self, device: &[u8; 6]) -> String {
        format!("{}.route.{}", self.prefix, device_token(device))
    }
    /// `P.queue.<device>`: the device's offline downlinks in `USMP_DOWN`.
    pub fn queue_subject(&self, device: &[u8; 6]) -> String {
        format!("{}.queue.{}", self.prefix, device_token(device))
    }
    /// `P.evt.<device>.<what>`.
    pub fn event_subject(&self, device: &[u8; 6], what: &str) -> String {
        format!("{}.evt.{}.{what}", self.prefix, device_token(device))
    }
}

/// Largest downlink a device can take.
pub const MAX_DOWNLINK: usize = MAX_MESSAGE_LEN;

/// `P.up.<device>` for prefix `prefix` (the shards spell it without the whole configuration).
pub fn up_subject(prefix: &str, device: &[u8; 6]) -> String {
    format!("{prefix}.up.{}", device_token(device))
}

/// A device id as subjects and keys spell it: 12 lowercase hex digits.
pub fn device_token(d: &[u8; 6]) -> String {
    crate::psk::to_hex(d)
}

/// Parse a subject or key token: exactly 12 lowercase hex digits.
pub fn parse_device_token(s: &str) -> Option<[u8; 6]> {
    if s.len() != 12 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let v = crate::psk::parse_hex(s)?;
    v.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> NatsConfig {
        NatsConfig { gateway_id: "gw-a".into(), ..NatsConfig::default() }
    }

    #[test]
    fn defaults_are_valid_and_subjects_are_spelled_as_documented() {
        let c = ok();
        c.validate().unwrap();
        let d = [0x00, 0x11, 0x22, 0x33, 0x44, 0x55];
        assert_eq!(c.up_subject(&d), "usmp.up.001122334455");
        assert_eq!(c.down_subject(&d), "usmp.down.001122334455");
        assert_eq!(c.event_subject(&d, "connected"), "usmp.evt.001122334455.connected");
        assert_eq!(c.downlink_ttl, Duration::from_secs(3600));
        assert_eq!(c.downlink_queue, 50);
    }

    #[test]
    fn device_tokens_are_twelve_lowercase_hex_digits() {
        assert_eq!(parse_device_token("001122334455"), Some([0, 0x11, 0x22, 0x33, 0x44, 0x55]));
        for bad in ["00112233445", "0011223344556", "00112233445G", "00112233445A", "00:11:22:33:44", "*", ""]
        {
            assert_eq!(parse_device_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let cases: Vec<(NatsConfig, &str)> = vec![
            (NatsConfig { urls: vec!["http://x:1".into()], ..ok() }, "--nats"),
            (NatsConfig { urls: vec!["nats://exa mple:1".into()], ..ok() }, "--nats"),
            (NatsConfig { creds: Some("/nonexistent/x.creds".into()), ..ok() }, "--nats-creds"),
            (NatsConfig { tls_ca: Some("/nonexistent/ca.pem".into()), ..ok() }, "--nats-tls-ca"),
            (NatsConfig { user: Some("u".into()), ..ok() }, "--nats-password"),
            (NatsConfig { prefix: "us mp".into(), ..ok() }, "--nats-prefix"),
            (NatsConfig { prefix: "usmp.>".into(), ..ok() }, "--nats-prefix"),
            (NatsConfig { gateway_id: "a.b".into(), ..ok() }, "--gateway-id"),
            (NatsConfig { downlink_queue: 0, ..ok() }, "--downlink-queue"),
            (NatsConfig { psk_kv: Some("bad bucket".into()), ..ok() }, "--psk-kv"),
            (NatsConfig { max_unacked: 0, ..ok() }, "--nats-max-unacked"),
            (NatsConfig { linger: Duration::from_millis(101), ..ok() }, "--nats-linger"),
        ];
        for (c, flag) in cases {
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, flag, "{e}");
        }
        assert!(NatsConfig::parse_urls(" , ").is_err());
        assert_eq!(NatsConfig::parse_urls("nats://a:1, tls://b:2").unwrap().len(), 2);
    }

    #[test]
    fn debug_hides_the_password() {
        let c = NatsConfig { user: Some("u".into()), password: Some("s3cret-pa55".into()), ..ok() };
        assert!(!format!("{c:?}").contains("s3cret-pa55"));
    }
}
