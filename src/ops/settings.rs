//! `usmp-gateway` settings: every command-line flag has a config-file key of the same name
//! (`--session-timeout` ⇔ `session-timeout = 60`). The file is TOML; unknown keys and values of
//! the wrong type are errors naming the key; flags given on the command line override the file.
//! The binary reads the file (TOML) and the flags (clap); here the settings are merged and
//! resolved, and the enumerated values parse from the names the flags and the file spell.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::gateway::{Config, Transports};
use crate::nats::NatsConfig;
use crate::psk::{parse_hex, to_hex, validate_key, ConfigError, PskSource, Registry};

/// What the gateway binary does with each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyMode {
    /// Reply with the same bytes.
    Echo,
    /// Reply with a short acknowledgement (`ACK`).
    Ack,
    /// Print one JSON line per message on stdout; reply nothing.
    Log,
    /// Store every message in NATS JetStream; downlinks come from NATS (see `--nats`).
    Nats,
}

/// The shards' I/O driver (`--io-driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring (epoll when the kernel refuses it).
    Uring,
    /// epoll (both drivers wait for TCP readiness through one epoll; README's benchmarks
    /// compare them).
    Epoll,
}

/// `transport = "tcp" | "udp" | "both"` in a config file, as `--transport` spells it.
impl<'de> Deserialize<'de> for Transports {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| serde::de::Error::unknown_variant(&s, &["tcp", "udp", "both"]))
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The names `--mode`, `--io-driver` and `--log-format` (and the config file) spell.
macro_rules! spelled {
    ($t:ty { $($name:literal => $v:expr),+ $(,)? }) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok($v),)+
                    _ => Err(format!("{s:?} is not one of {}", [$($name),+].join(", "))),
                }
            }
        }
    };
}
spelled!(ReplyMode { "echo" => ReplyMode::Echo, "ack" => ReplyMode::Ack, "log" => ReplyMode::Log, "nats" => ReplyMode::Nats });
spelled!(IoDriver { "uring" => IoDriver::Uring, "epoll" => IoDriver::Epoll });
spelled!(LogFormat { "text" => LogFormat::Text, "json" => LogFormat::Json });

/// Every setting, each optional so that layers (file, flags) can be merged. Its `Debug`
/// shows whether a key or token is set, never the secret.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--transport`
    pub transport: Option<Transports>,
    /// `--io-driver`
    pub io_driver: Option<IoDriver>,
    /// `--shards`
    pub shards: Option<usize>,
    /// `--cpus`
    pub cpus: Option<String>,
    /// `--psk`
    pub psk: Option<String>,
    /// `--psk-hex`
    pub psk_hex: Option<String>,
    /// `--psk-file`
    pub psk_file: Option<PathBuf>,
    /// `--mode`
    pub mode: Option<ReplyMode>,
    /// `--handshake-timeout` (seconds)
    pub handshake_timeout: Option<f64>,
    /// `--session-timeout` (seconds)
    pub session_timeout: Option<f64>,
    /// `--max-sessions`
    pub max_sessions: Option<usize>,
    /// `--max-per-ip`
    pub max_per_ip: Option<usize>,
    /// `--max-handshakes`
    pub max_handshakes: Option<usize>,
    /// `--metrics`
    pub metrics: Option<SocketAddr>,
    /// `--admin-token`
    pub admin_token: Option<String>,
    /// `--admin-token-file` (the token is the file's first line)
    pub admin_token_file: Option<PathBuf>,
    /// `--admin-host` (repeatable): host names an admin request may name in `Host`
    pub admin_hosts: Option<Vec<String>>,
    /// `--log-format`
    pub log_format: Option<LogFormat>,
    /// `--cookie-rate-per-ip`
    pub cookie_rate_per_ip: Option<f64>,
    /// `--handshake-rate`
    pub handshake_rate: Option<f64>,
    /// `--nats` (comma-separated URLs)
    pub nats: Option<String>,
    /// `--nats-creds`
    pub nats_creds: Option<PathBuf>,
    /// `--nats-user`
    pub nats_user: Option<String>,
    /// `--nats-password`
    pub nats_password: Option<String>,
    /// `--nats-tls-ca`
    pub nats_tls_ca: Option<PathBuf>,
    /// `--nats-prefix`
    pub nats_prefix: Option<String>,
    /// `--gateway-id`
    pub gateway_id: Option<String>,
    /// `--downlink-ttl` (seconds; 0 = no offline queue)
    pub downlink_ttl: Option<u64>,
    /// `--downlink-queue`
    pub downlink_queue: Option<u32>,
    /// `--psk-kv`
    pub psk_kv: Option<String>,
    /// `--nats-max-unacked`
    pub nats_max_unacked: Option<u32>,
    /// `--nats-replicas`
    pub nats_replicas: Option<usize>,
    /// `--nats-threads`
    pub nats_threads: Option<usize>,
    /// `--nats-linger` (microseconds)
    pub nats_linger: Option<u64>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |v: &Option<String>| v.as_ref().map(|_| crate::psk::REDACTED);
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("transport", &self.transport)
            .field("io_driver", &self.io_driver)
            .field("shards", &self.shards)
            .field("cpus", &self.cpus)
            .field("psk", &secret(&self.psk))
            .field("psk_hex", &secret(&self.psk_hex))
            .field("psk_file", &self.psk_file)
            .field("mode", &self.mode)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("max_sessions", &self.max_sessions)
            .field("max_per_ip", &self.max_per_ip)
            .field("max_handshakes", &self.max_handshakes)
            .field("metrics", &self.metrics)
            .field("admin_token", &secret(&self.admin_token))
            .field("admin_token_file", &self.admin_token_file)
            .field("admin_hosts", &self.admin_hosts)
            .field("log_format", &self.log_format)
            .field("cookie_rate_per_ip", &self.cookie_rate_per_ip)
            .field("handshake_rate", &self.handshake_rate)
            .field("nats", &self.nats)
            .field("nats_creds", &self.nats_creds)
            .field("nats_user", &self.nats_user)
            .field("nats_password", &secret(&self.nats_password))
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_prefix", &self.nats_prefix)
            .field("gateway_id", &self.gateway_id)
            .field("downlink_ttl", &self.downlink_ttl)
            .field("downlink_queue", &self.downlink_queue)
            .field("psk_kv", &self.psk_kv)
            .field("nats_max_unacked", &self.nats_max_unacked)
            .field("nats_replicas", &self.nats_replicas)
            .field("nats_threads", &self.nats_threads)
            .field("nats_linger", &self.nats_linger)
            .finish()
    }
}

/// Settings resolved into a gateway configuration plus what the binary needs around it.
#[derive(Clone)]
pub struct Resolved {
    /// The gateway configuration.
    pub config: Config,
    /// Reply mode.
    pub mode: ReplyMode,
    /// Metrics/admin listener.
    pub metrics: Option<SocketAddr>,
    /// Admin bearer token (from `--admin-token`, `--admin-token-file` or `USMP_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// Host names an admin request may name besides IP addresses and `localhost`.
    pub admin_hosts: Vec<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// A key generated because none was configured (printed once by the binary).
    pub generated_key: Option<String>,
    /// The NATS bridge's settings (`--mode nats`).
    pub nats: Option<NatsConfig>,
    /// Warnings for the operator (key files others can read), logged once logging is up.
    pub warnings: Vec<String>,
}

/// A key or token file readable by group or others, as a warning naming the file.
fn file_warning(path: &std::path::Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    crate::psk::permission_warning(&meta).map(|w| format!("{}: {w}", path.display()))
}

fn named(key: &str) -> String {
    format!("{key} (--{key})")
}

fn secs(key: &str, v: f64) -> Result<Duration, ConfigError> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        return Err(ConfigError::new(named(key), "must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Parse a core list like `0,1` or `2-5`.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError::new(named("cpus"), format!("`{s}` is not a core list like `0,1` or `2-5`"));
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

impl Settings {
    /// `top` over `self`: each setting given in `top` wins. The key settings (`psk`,
    /// `psk-hex`, `psk-file`) move as one: a key on the command line replaces the file's.
    pub fn overlay(self, top: Settings) -> Settings {
        let top_has_key =
            top.psk.is_some() || top.psk_hex.is_some() || top.psk_file.is_some() || top.psk_kv.is_some();
        let (psk, psk_hex, psk_file, psk_kv) = if top_has_key {
            (top.psk, top.psk_hex, top.psk_file, top.psk_kv)
        } else {
            (self.psk, self.psk_hex, self.psk_file, self.psk_kv)
        };
        Settings {
            listen: top.listen.or(self.listen),
            transport: top.transport.or(self.transport),
            io_driver: top.io_driver.or(self.io_driver),
            shards: top.shards.or(self.shards),
            cpus: top.cpus.or(self.cpus),
            psk,
            psk_hex,
            psk_file,
            mode: top.mode.or(self.mode),
            handshake_timeout: top.handshake_timeout.or(self.handshake_timeout),
            session_timeout: top.session_timeout.or(self.session_timeout),
            max_sessions: top.max_sessions.or(self.max_sessions),
            max_per_ip: top.max_per_ip.or(self.max_per_ip),
            max_handshakes: top.max_handshakes.or(self.max_handshakes),
            metrics: top.metrics.or(self.metrics),
            admin_token: top.admin_token.or(self.admin_token),
            admin_token_file: top.admin_token_file.or(self.admin_token_file),
            admin_hosts: top.admin_hosts.or(self.admin_hosts),
            log_format: top.log_format.or(self.log_format),
            cookie_rate_per_ip: top.cookie_rate_per_ip.or(self.cookie_rate_per_ip),
            handshake_rate: top.handshake_rate.or(self.handshake_rate),
            nats: top.nats.or(self.nats),
            nats_creds: top.nats_creds.or(self.nats_creds),
            nats_user: top.nats_user.or(self.nats_user),
            nats_password: top.nats_password.or(self.nats_password),
            nats_tls_ca: top.nats_tls_ca.or(self.nats_tls_ca),
            nats_prefix: top.nats_prefix.or(self.nats_prefix),
            gateway_id: top.gateway_id.or(self.gateway_id),
            downlink_ttl: top.downlink_ttl.or(self.downlink_ttl),
            downlink_queue: top.downlink_queue.or(self.downlink_queue),
            psk_kv,
            nats_max_unacked: top.nats_max_unacked.or(self.nats_max_unacked),
            nats_replicas: top.nats_replicas.or(self.nats_replicas),
            nats_threads: top.nats_threads.or(self.nats_threads),
            nats_linger: top.nats_linger.or(self.nats_linger),
        }
    }

    /// The NATS bridge's settings, when `--mode nats`; the NATS flags without it are an error
    /// (they would silently do nothing).
    fn nats_config(&self) -> Result<Option<NatsConfig>, ConfigError> {
        if self.mode != Some(ReplyMode::Nats) {
            let stray = [
                ("nats", self.nats.is_some()),
                ("psk-kv", self.psk_kv.is_some()),
                ("downlink-ttl", self.downlink_ttl.is_some()),
                ("downlink-queue", self.downlink_queue.is_some()),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
                return Err(ConfigError::new(named(flag), "needs --mode nats"));
            }
            return Ok(None);
        }
        let d = NatsConfig::default();
        let c = NatsConfig {
            urls: match &self.nats {
                Some(u) => NatsConfig::parse_urls(u)?,
                None => d.urls.clone(),
            },
            creds: self.nats_creds.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            prefix: self.nats_prefix.clone().unwrap_or(d.prefix.clone()),
            gateway_id: self.gateway_id.clone().unwrap_or(d.gateway_id.clone()),
            downlink_ttl: self.downlink_ttl.map_or(d.downlink_ttl, Duration::from_secs),
            downlink_queue: self.downlink_queue.unwrap_or(d.downlink_queue),
            psk_kv: self.psk_kv.clone(),
            max_unacked: self.nats_max_unacked.unwrap_or(d.max_unacked),
            replicas: self.nats_replicas.unwrap_or(d.replicas),
            threads: self.nats_threads.unwrap_or(d.threads),
            linger: self.nats_linger.map_or(d.linger, Duration::from_micros),
            ..d
        };
        c.validate()?;
        Ok(Some(c))
    }

    fn psk_source(&self) -> Result<(PskSource, Option<String>), ConfigError> {
        let given =
            [self.psk.is_some(), self.psk_hex.is_some(), self.psk_file.is_some(), self.psk_kv.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(ConfigError::new(named("psk"), "give only one of psk, psk-hex, psk-file, psk-kv"));
        }
        if self.psk_kv.is_some() {
            // Filled from the bucket by the NATS bridge.
            return Ok((PskSource::registry(Registry::new()), None));
        }
        if let Some(p) = &self.psk {
            validate_key(&named("psk"), p.as_bytes())?;
            return Ok((PskSource::single(p.as_bytes())?, None));
        }
        if let Some(h) = &self.psk_hex {
            let key = parse_hex(h)
                .ok_or_else(|| ConfigError::new(named("psk-hex"), "not an even-length hex string"))?;
            validate_key(&named("psk-hex"), &key)?;
            return Ok((PskSource::single(&key)?, None));
        }
        if let Some(path) = &self.psk_file {
            return Ok((PskSource::registry_file(path)?, None));
        }
        let mut key = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| ConfigError::new(named("psk"), "no randomness to generate a key"))?;
        let text = to_hex(&key);
        Ok((PskSource::single(text.as_bytes())?, Some(text)))
    }

    /// The admin token: from `admin-token`, else `admin-token-file` (a flag shows in `ps`, a
    /// file need not), else the `USMP_ADMIN_TOKEN` environment variable.
    fn admin_token(&self, warnings: &mut Vec<String>) -> Result<Option<String>, ConfigError> {
        if self.admin_token.is_some() && self.admin_token_file.is_some() {
            return Err(ConfigError::new(
                named("admin-token"),
                "give only one of admin-token, admin-token-file",
            ));
        }
        let (token, field) = if let Some(t) = &self.admin_token {
            (t.clone(), named("admin-token"))
        } else if let Some(path) = &self.admin_token_file {
            let field = named("admin-token-file");
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new(&field, format!("cannot read {}: {e}", path.display())))?;
            warnings.extend(file_warning(path));
            (text.lines().next().unwrap_or("").trim().to_string(), field)
        } else {
            match std::env::var("USMP_ADMIN_TOKEN") {
                Ok(t) if !t.is_empty() => (t, "USMP_ADMIN_TOKEN".to_string()),
                _ => return Ok(None),
            }
        };
        if token.len() < 16 {
            return Err(ConfigError::new(field, "use at least 16 characters"));
        }
        Ok(Some(token))
    }

    /// Validate everything and build the gateway configuration (defaults for what is unset).
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let nats = self.nats_config()?;
        let (psk, generated_key) = self.psk_source()?;
        let mut config = Config { psk: Some(psk), ..Config::default() };
        if let Some(l) = self.listen {
            config.listen = l;
        }
        config.transports = self.transport.unwrap_or_default();
        // Unset keeps the builder's default (io_uring, or epoll under USMP_FORCE_EPOLL=1).
        match self.io_driver {
            Some(IoDriver::Uring) => config.io_driver = crate::rt::Driver::IoUring,
            Some(IoDriver::Epoll) => config.io_driver = crate::rt::Driver::Legacy,
            None => {}
        }
        if let Some(n) = self.shards {
            if n == 0 || n > 1024 {
                return Err(ConfigError::new(named("shards"), "must be between 1 and 1024"));
            }
            config.shards = n;
        }
        if let Some(c) = &self.cpus {
            config.cpus = Some(parse_cpus(c)?);
        }
        config.handshake_timeout = secs("handshake-timeout", self.handshake_timeout.unwrap_or(10.0))?;
        config.session_timeout = secs("session-timeout", self.session_timeout.unwrap_or(60.0))?;
        config.max_sessions = self.max_sessions.unwrap_or(0);
        config.max_per_ip = self.max_per_ip.unwrap_or(0);
        config.max_handshakes_per_shard = self.max_handshakes.unwrap_or(4096);
        if config.max_handshakes_per_shard == 0 {
            return Err(ConfigError::new(named("max-handshakes"), "must be at least 1"));
        }
        if let Some(r) = self.cookie_rate_per_ip {
            if !(r.is_finite() && r > 0.0) {
                return Err(ConfigError::new(named("cookie-rate-per-ip"), "must be a positive rate"));
            }
            config.cookie_rate_per_ip = r;
        }
        if let Some(r) = self.handshake_rate {
            crate::gateway::check_handshake_rate(r)
                .map_err(|m| ConfigError::new(named("handshake-rate"), m))?;
            config.handshake_rate_per_shard = r;
        }
        let mut warnings: Vec<String> = self.psk_file.iter().filter_map(|p| file_warning(p)).collect();
        let admin_token = self.admin_token(&mut warnings)?;
        Ok(Resolved {
            config,
            // Without a configured key the quick start echoes, so the printed key can be tried.
            mode: match self.mode {
                Some(ReplyMode::Nats) => ReplyMode::Nats,
                _ if generated_key.is_some() => ReplyMode::Echo,
                m => m.unwrap_or(ReplyMode::Echo),
            },
            metrics: self.metrics,
            admin_token,
            admin_hosts: self.admin_hosts.clone().unwrap_or_default(),
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            generated_key,
            nats,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Transport;

    /// A config file's text read as the binary reads it (`usmp-gateway --config`).
    fn from_toml(text: &str, origin: &str) -> Result<Settings, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::new(origin, e.to_string().trim_end()))
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = from_toml("shards = 2\nsesion-timeout = 5\n", "gw.toml").unwrap_err();
        assert!(e.message.contains("sesion-timeout"), "{e}");
        assert_eq!(e.field, "gw.toml");
        let e = from_toml("shards = \"two\"\n", "gw.toml").unwrap_err();
        assert!(e.message.contains("shards"), "{e}");
        let e = from_toml("listen = \"nowhere\"\n", "gw.toml").unwrap_err();
        assert!(e.message.contains("listen"), "{e}");
        let s = from_toml("psk = \"k-0123456789abcdef\"\nshards = 0\n", "gw.toml").unwrap();
        assert!(s.resolve().err().unwrap().to_string().contains("--shards"));
        let s = from_toml("psk = \"short\"\n", "gw.toml").unwrap();
        assert!(s.resolve().err().unwrap().to_string().contains("--psk"));
    }

    #[test]
    fn flags_override_the_file_and_keys_move_together() {
        let file = from_toml(
            "listen = \"127.0.0.1:7000\"\nshards = 4\npsk-file = \"/nonexistent\"\nsession-timeout = 30\n",
            "f",
        )
        .unwrap();
        let flags =
            Settings { shards: Some(1), psk: Some("flag-key-0123456789".into()), ..Default::default() };
        let merged = file.overlay(flags);
        assert_eq!(merged.shards, Some(1));
        assert_eq!(merged.listen, Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(merged.psk_file, None, "the flag's key replaces the file's");
        let r = merged.resolve().unwrap();
        assert_eq!(r.config.session_timeout, Duration::from_secs(30));
        assert_eq!(r.config.shards, 1);
        assert!(r.generated_key.is_none());
    }

    #[test]
    fn io_driver_is_a_config_key_and_names_itself_when_wrong() {
        let k = "psk = \"k-0123456789abcdef\"\n";
        let epoll = from_toml(&format!("{k}io-driver = \"epoll\"\n"), "f").unwrap();
        assert_eq!(epoll.resolve().unwrap().config.io_driver, crate::rt::Driver::Legacy);
        let uring = from_toml(&format!("{k}io-driver = \"uring\"\n"), "f").unwrap();
        assert_eq!(uring.resolve().unwrap().config.io_driver, crate::rt::Driver::IoUring);
        let e = from_toml(&format!("{k}io-driver = \"kqueue\"\n"), "f").unwrap_err();
        assert!(e.to_string().contains("io-driver"), "{e}");
    }

    #[test]
    fn transports_are_spelled_as_the_flag_spells_them() {
        let s = from_toml("psk = \"k-0123456789abcdef\"\ntransport = \"udp\"\n", "f").unwrap();
        let t = s.resolve().unwrap().config.transports;
        assert!(t.contains(Transport::Udp) && !t.contains(Transport::Tcp));
        assert_eq!(t.to_string(), "udp");
        let both = from_toml("psk = \"k-0123456789abcdef\"\n", "f").unwrap();
        assert_eq!(both.resolve().unwrap().config.transports, Transports::BOTH);
        let e = from_toml("transport = \"sctp\"\n", "f").unwrap_err();
        assert!(e.message.contains("sctp") && e.message.contains("both"), "{e}");
    }

    #[test]
    fn enumerated_values_parse_from_the_names_the_file_spells() {
        for (name, mode) in [
            ("echo", ReplyMode::Echo),
            ("ack", ReplyMode::Ack),
            ("log", ReplyMode::Log),
            ("nats", ReplyMode::Nats),
        ] {
            assert_eq!(name.parse::<ReplyMode>(), Ok(mode));
            let file = from_toml(&format!("mode = \"{name}\"\n"), "f").unwrap();
            assert_eq!(file.mode, Some(mode), "the file and the flag agree");
        }
        assert_eq!("epoll".parse::<IoDriver>(), Ok(IoDriver::Epoll));
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("Echo".parse::<ReplyMode>().unwrap_err().contains("echo, ack, log, nats"));
    }

    #[test]
    fn no_key_generates_one_and_echoes() {
        let r = Settings { mode: Some(ReplyMode::Log), ..Default::default() }.resolve().unwrap();
        assert_eq!(r.generated_key.as_ref().map(|k| k.len()), Some(32));
        assert_eq!(r.mode, ReplyMode::Echo);
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuning/usmp-gateway.toml");
        let mut s = from_toml(&std::fs::read_to_string(&path).unwrap(), "usmp-gateway.toml").unwrap();
        // The example points at /etc; check everything but the registry file itself.
        assert!(s.psk_file.is_some(), "the example shows a registry");
        s.psk_file = None;
        s.psk = Some("example-key-0123456789".into());
        let r = s.resolve().unwrap();
        assert!(r.metrics.is_some());
    }
}
