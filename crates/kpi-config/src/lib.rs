//! Configuration of the KPI engine (SPEC section 4).
//!
//! Layers: `config/default.toml` (built in), then the `--config` file, then environment
//! variables `KPI__SECTION__KEY`. Every struct denies unknown fields, and [`Config::validate`]
//! checks every value in one pass, so a start-up failure lists all problems, each naming its
//! key. Secrets (`nats.password`, `nats.token`) are never printed: `Debug` hides them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use kpi_model::event::is_valid_tenant;
use kpi_model::money::{decimal_from_config_float, parse_decimal_exact, Decimal, MAX_FX_RATE};
use kpi_model::{DecodeLimits, TenantSettings, Tenants};
use serde::Deserialize;

/// The built-in defaults, the first layer.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    File {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("configuration: {0}")]
    Parse(config::ConfigError),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    pub stream: String,
    pub rejected_stream: String,
    pub consumer: String,
    /// Key-value bucket of the connectors' state.
    pub connector_state_bucket: String,
    pub credentials_file: String,
    pub user: String,
    pub password: String,
    pub token: String,
    pub ack_wait_ms: u64,
    pub max_ack_pending: i64,
    pub duplicate_window_s: u64,
    /// Replicas of the streams (and the connectors' bucket) when the engine creates them:
    /// 1 on a single server, 3 on a three-node cluster (SPEC section 5).
    pub replicas: usize,
}

impl NatsConfig {
    /// The servers of `url`, which may list several separated by commas (a cluster's seeds).
    pub fn servers(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|server| !server.is_empty())
            .collect()
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |s: &str| if s.is_empty() { "" } else { "<hidden>" };
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("stream", &self.stream)
            .field("rejected_stream", &self.rejected_stream)
            .field("consumer", &self.consumer)
            .field("connector_state_bucket", &self.connector_state_bucket)
            .field("credentials_file", &self.credentials_file)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("ack_wait_ms", &self.ack_wait_ms)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("replicas", &self.replicas)
            .field("duplicate_window_s", &self.duplicate_window_s)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub cache_capacity_mb: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// Basic auth on /metrics and /api/* (not /healthz, /readyz, or the signed webhooks).
    #[serde(default)]
    pub basic_auth_username: Option<String>,
    #[serde(default)]
    pub basic_auth_password: Option<String>,
    /// The password in a file (its first line), instead of `basic_auth_password`.
    #[serde(default)]
    pub basic_auth_password_file: Option<PathBuf>,
    /// TLS: a PEM certificate chain and its PEM private key.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Longest a request may take before it is answered 503.
    pub request_timeout_ms: u64,
    /// Longest wait for a request's headers: on a new connection, and between two requests
    /// of a kept-alive one (the idle timeout). Past it the connection is closed.
    pub idle_timeout_ms: u64,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Requests handled at once at most (health probes aside); more are answered 503 with
    /// `Retry-After` at once.
    pub max_concurrent_requests: usize,
    /// Largest request body (webhooks); a larger one is answered 413.
    pub max_body_bytes: usize,
    /// Rows (channels, campaigns, tenants) in one API answer at most; `limit` and `offset`
    /// page through the rest.
    pub max_rows: usize,
    /// On shutdown, how long requests in flight may take to finish.
    pub shutdown_timeout_ms: u64,
}

impl fmt::Debug for HttpConfig {
    // The password never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("basic_auth_username", &self.basic_auth_username)
            .field(
                "basic_auth_password",
                &self.basic_auth_password.as_ref().map(|_| "***"),
            )
            .field("basic_auth_password_file", &self.basic_auth_password_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_rows", &self.max_rows)
            .field("shutdown_timeout_ms", &self.shutdown_timeout_ms)
            .finish()
    }
}

impl HttpConfig {
    /// `(username, password)` when basic auth is configured (the file read, first line).
    pub fn basic_auth(&self) -> Result<Option<(String, String)>, String> {
        let Some(username) = &self.basic_auth_username else {
            return Ok(None);
        };
        let password = match (&self.basic_auth_password, &self.basic_auth_password_file) {
            (Some(password), _) => password.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|error| {
                    format!(
                        "http.basic_auth_password_file: cannot read {}: {error}",
                        file.display()
                    )
                })?
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
            (None, None) => String::new(),
        };
        Ok(Some((username.clone(), password)))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub batch_max_events: usize,
    pub batch_max_wait_ms: u64,
    pub checkpoint_max_events: usize,
    pub checkpoint_max_wait_ms: u64,
    pub max_event_bytes: usize,
    pub max_future_hours: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub max_tenants: usize,
    pub max_channels_per_tenant: usize,
    pub max_campaigns_per_tenant: usize,
    pub max_stages_per_tenant: usize,
    /// Past periods exported as `kpi_history_*` gauges (the current one included): months,
    /// quarters and years of KPIs, and years of retention. 0 turns a granularity off.
    pub history_months: u32,
    pub history_quarters: u32,
    pub history_years: u32,
}

/// Several engines sharing one NATS cluster (SPEC section 5).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Off (the default): one engine, exactly as in SPEC section 4.
    pub enabled: bool,
    /// This engine's name, unique among the running engines; empty means the host name.
    pub engine: String,
    /// Partitions the tenants are hashed into; the same on every engine. Changing it is a
    /// rebuild.
    pub partitions: u32,
    /// An engine that stops renewing its partitions loses them after this long; its partitions
    /// move to the others. Membership is renewed five times per lease.
    pub lease_ms: u64,
    /// JetStream key-value bucket of the membership and the partition leases.
    pub bucket: String,
    /// Warm standbys: each engine also applies (without exporting) the partitions it would
    /// take over if their owner stopped, and an engine joining running engines applies the
    /// partitions it is to own before taking them. A takeover or a join then costs a lease
    /// and a handover rather than a catch-up, for twice the applying over the engines.
    pub standby: bool,
}

impl ClusterConfig {
    /// The engine's name: `engine`, or the host name.
    pub fn engine_name(&self) -> String {
        if !self.engine.is_empty() {
            return self.engine.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|name| !name.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|name| name.trim().to_string())
                    .filter(|name| !name.is_empty())
            })
            .unwrap_or_else(|| "kpi".to_string())
    }
}

/// Whether `name` may name an engine: letters, digits, `_`, `-` and `.` (it is a key of the
/// cluster bucket), 1 to 64 of them.
pub fn is_valid_engine_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// How the engine logs (to standard error).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (for people; colours only on a terminal) or `json` (one object per line, for
    /// log shippers).
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether a configuration key holds a secret (its value is never printed).
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "token",
        "secret",
        "api_key",
        "apikey",
        "credentials",
        "private_key",
    ]
    .iter()
    .any(|word| key.contains(word))
        && !key.ends_with("_file")
}

fn mask_secrets(tree: &mut serde_json::Value) {
    match tree {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if is_secret_key(key) && !value.is_object() && !value.is_array() {
                    let empty = matches!(value, serde_json::Value::String(text) if text.is_empty());
                    if !empty && !value.is_null() {
                        *value = serde_json::Value::String("********".to_string());
                    }
                } else {
                    mask_secrets(value);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

/// A number written as a TOML float, integer or string.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Number {
    Float(f64),
    Integer(i64),
    Text(String),
}

impl Number {
    fn to_decimal(&self) -> Option<Decimal> {
        match self {
            Number::Float(value) => decimal_from_config_float(*value),
            Number::Integer(value) => Some(Decimal::from(*value)),
            Number::Text(text) => parse_decimal_exact(text.trim()).ok(),
        }
    }

    fn to_f64(&self) -> Option<f64> {
        match self {
            Number::Float(value) => Some(*value),
            Number::Integer(value) => Some(*value as f64),
            Number::Text(text) => text.trim().parse().ok(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub timezone: Option<String>,
    pub currency: Option<String>,
    #[serde(default)]
    pub fx: BTreeMap<String, Number>,
    #[serde(default)]
    pub cac_threshold: BTreeMap<String, Number>,
}

/// A connector declaration (SPEC section 4). The kind-specific `params` are checked by the
/// connector kind itself when the engine builds it (`kpi-connect`), naming the key too.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    pub id: String,
    pub kind: String,
    pub tenant: String,
    pub every: String,
    #[serde(default)]
    pub lookback_days: u32,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

impl ConnectorConfig {
    /// The poll interval (`every`), validated by [`Config::validate`].
    pub fn interval(&self) -> Duration {
        parse_duration(&self.every).unwrap_or(Duration::from_secs(3600))
    }
}

/// Connector ids name metrics series and stored state: short and plain.
pub fn is_valid_connector_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Parses `90s`, `15m`, `1h`, `1d`, `1h30m`: whole numbers, each with a unit.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    let mut any = false;
    for character in text.trim().chars() {
        if character.is_ascii_digit() {
            number.push(character);
            continue;
        }
        let value: u64 = number.parse().ok()?;
        number.clear();
        let unit = match character {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        total = total.checked_add(value.checked_mul(unit)?)?;
        any = true;
    }
    (any && number.is_empty() && total > 0).then(|| Duration::from_secs(total))
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub store: StoreConfig,
    pub http: HttpConfig,
    pub ingest: IngestConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub tenants: HashMap<String, TenantConfig>,
    #[serde(default)]
    pub connectors: Vec<ConnectorConfig>,
}

/// Connector kinds this build knows (each implemented in `kpi-connect`, whose registry test
/// checks the two lists agree).
pub const CONNECTOR_KINDS: &[&str] = &[
    "google_ads",
    "meta_ads",
    "linkedin_ads",
    "mailchimp",
    "brevo",
    "hubspot",
    "pipedrive",
    "csv",
    "webhook",
    "exec",
];

impl Config {
    /// Loads the layers (defaults, `file`, environment) and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (merged, fx_overrides) = Self::merged(file, env)?;
        let mut config: Config = merged.try_deserialize().map_err(ConfigError::Parse)?;
        // The config crate lowercases the keys of environment variables; currency codes are
        // upper case (`KPI__TENANTS__ACME__FX__USD` means `fx.USD`, not `fx.usd`).
        for (tenant, code) in fx_overrides {
            if let Some(fx) = config.tenants.get_mut(&tenant).map(|t| &mut t.fx) {
                if let Some(rate) = fx.remove(&code.to_lowercase()) {
                    fx.insert(code.to_uppercase(), rate);
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration (defaults, file and environment merged) as a tree, every
    /// value whose key names a secret (password, token, secret, key, credentials) masked: what
    /// `kpi config check` prints. Call after [`Config::load`] succeeded.
    pub fn effective(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<serde_json::Value, ConfigError> {
        let (merged, _) = Self::merged(file, env)?;
        let mut tree: serde_json::Value = merged.try_deserialize().map_err(ConfigError::Parse)?;
        mask_secrets(&mut tree);
        Ok(tree)
    }

    /// Defaults, then the file, then `KPI__*` variables, merged; and the `fx` keys the
    /// environment sets, as (tenant, currency code in its case).
    fn merged(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(config::Config, Vec<(String, String)>), ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            // Read the file ourselves so that a missing file names its path.
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::File {
                path: path.to_path_buf(),
                source: config::ConfigError::Message(error.to_string()),
            })?;
            let check = config::Config::builder()
                .add_source(config::File::from_str(&text, config::FileFormat::Toml))
                .build();
            if let Err(source) = check {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    source,
                });
            }
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with("KPI__"))
            .collect();
        let fx_overrides: Vec<(String, String)> = env
            .keys()
            .filter_map(|key| {
                let rest = key.strip_prefix("KPI__TENANTS__")?;
                let (tenant, code) = rest.split_once("__FX__")?;
                Some((tenant.to_lowercase(), code.to_string()))
            })
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("KPI")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let merged = builder.build().map_err(ConfigError::Parse)?;
        Ok((merged, fx_overrides))
    }

    /// Checks every value, collecting all errors.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if self.nats.replicas == 0 || self.nats.replicas > 5 {
            errors.push("nats.replicas: must be between 1 and 5 (JetStream's limit)".to_string());
        }
        for server in self.nats.url.split(',').map(str::trim) {
            let rest = server
                .strip_prefix("nats://")
                .or_else(|| server.strip_prefix("tls://"))
                .or_else(|| server.strip_prefix("ws://"))
                .or_else(|| server.strip_prefix("wss://"))
                .unwrap_or(server);
            let host_port = rest.rsplit('@').next().unwrap_or(rest);
            let port_ok = match host_port.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
                None => !host_port.is_empty(),
            };
            if server.is_empty() || !port_ok {
                errors.push(format!(
                    "nats.url: `{server}` is not a server such as nats://10.0.0.1:4222 (several are separated by commas)"
                ));
            }
        }
        if self.nats.url.trim().is_empty() {
            errors.push("nats.url: must not be empty".to_string());
        }
        for (key, value) in [
            ("nats.stream", &self.nats.stream),
            ("nats.rejected_stream", &self.nats.rejected_stream),
            ("nats.consumer", &self.nats.consumer),
            (
                "nats.connector_state_bucket",
                &self.nats.connector_state_bucket,
            ),
        ] {
            if value.is_empty()
                || !value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                errors.push(format!("{key}: `{value}` must be letters, digits, _ or -"));
            }
        }
        let cluster = &self.cluster;
        if !(1..=1024).contains(&cluster.partitions) {
            errors.push("cluster.partitions: must be between 1 and 1024".to_string());
        }
        if cluster.lease_ms < 1000 || cluster.lease_ms > 600_000 {
            errors.push("cluster.lease_ms: must be between 1000 and 600000".to_string());
        }
        if cluster.bucket.is_empty()
            || !cluster
                .bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            errors.push(format!(
                "cluster.bucket: `{}` must be letters, digits, _ or -",
                cluster.bucket
            ));
        }
        if cluster.enabled && !is_valid_engine_name(&cluster.engine_name()) {
            errors.push(format!(
                "cluster.engine: `{}` must be 1 to 64 letters, digits, _, - or . (the host name is the default)",
                cluster.engine_name()
            ));
        }
        if self.nats.stream == self.nats.rejected_stream {
            errors.push("nats.rejected_stream: must differ from nats.stream".to_string());
        }
        for (key, value, most) in [
            ("metrics.history_months", self.metrics.history_months, 120),
            (
                "metrics.history_quarters",
                self.metrics.history_quarters,
                40,
            ),
            ("metrics.history_years", self.metrics.history_years, 30),
        ] {
            if value > most {
                errors.push(format!(
                    "{key}: at most {most} (each period is a set of series)"
                ));
            }
        }
        if self.nats.ack_wait_ms < 1000 {
            errors.push("nats.ack_wait_ms: must be at least 1000".to_string());
        }
        if self.nats.max_ack_pending < self.ingest.batch_max_events as i64 {
            errors.push(format!(
                "nats.max_ack_pending: must be at least ingest.batch_max_events ({})",
                self.ingest.batch_max_events
            ));
        }
        if self.nats.max_ack_pending > 0
            && self.ingest.checkpoint_max_events as i64 > self.nats.max_ack_pending
        {
            errors.push(format!(
                "ingest.checkpoint_max_events: must be at most nats.max_ack_pending ({})",
                self.nats.max_ack_pending
            ));
        }
        if self.ingest.checkpoint_max_wait_ms.saturating_mul(4) > self.nats.ack_wait_ms {
            errors.push(format!(
                "ingest.checkpoint_max_wait_ms: must be at most a quarter of nats.ack_wait_ms ({})",
                self.nats.ack_wait_ms
            ));
        }
        if self.store.path.as_os_str().is_empty() {
            errors.push("store.path: must not be empty".to_string());
        }
        if SocketAddr::from_str(&self.http.listen).is_err() {
            errors.push(format!(
                "http.listen: `{}` is not an address such as 127.0.0.1:9464",
                self.http.listen
            ));
        }
        let http = &self.http;
        for (key, value, least) in [
            ("http.request_timeout_ms", http.request_timeout_ms, 100),
            ("http.idle_timeout_ms", http.idle_timeout_ms, 100),
            ("http.max_connections", http.max_connections as u64, 1),
            (
                "http.max_concurrent_requests",
                http.max_concurrent_requests as u64,
                1,
            ),
            ("http.max_body_bytes", http.max_body_bytes as u64, 1024),
            ("http.max_rows", http.max_rows as u64, 1),
        ] {
            if value < least {
                errors.push(format!("{key}: must be at least {least}"));
            }
        }
        match (
            &http.basic_auth_username,
            &http.basic_auth_password,
            &http.basic_auth_password_file,
        ) {
            (None, None, None) => {}
            (Some(username), _, _) if username.is_empty() || username.contains(':') => errors
                .push("http.basic_auth_username: must be non-empty and without `:`".to_string()),
            (Some(_), Some(_), Some(_)) => errors.push(
                "http.basic_auth_password_file: give the password or the file, not both".to_string(),
            ),
            (Some(_), None, None) => errors.push(
                "http.basic_auth_password: required with http.basic_auth_username (or basic_auth_password_file)"
                    .to_string(),
            ),
            (None, _, _) => errors.push(
                "http.basic_auth_username: required with a basic auth password".to_string(),
            ),
            (Some(_), password, file) => {
                if password.as_ref().is_some_and(|p| p.len() < 12) {
                    errors.push("http.basic_auth_password: use 12 characters or more".to_string());
                }
                if let Err(error) = http.basic_auth() {
                    errors.push(error);
                } else if file.is_some() && http.basic_auth().ok().flatten().is_some_and(|(_, p)| p.len() < 12) {
                    errors.push("http.basic_auth_password_file: the password has fewer than 12 characters".to_string());
                }
            }
        }
        match (&http.tls_cert_file, &http.tls_key_file) {
            (None, None) => {}
            (Some(_), None) => {
                errors.push("http.tls_key_file: required with http.tls_cert_file".to_string())
            }
            (None, Some(_)) => {
                errors.push("http.tls_cert_file: required with http.tls_key_file".to_string())
            }
            (Some(cert), Some(key)) => {
                for (name, path) in [("http.tls_cert_file", cert), ("http.tls_key_file", key)] {
                    if let Err(error) = std::fs::metadata(path) {
                        errors.push(format!("{name}: cannot read {}: {error}", path.display()));
                    }
                }
            }
        }
        if !(1..=100_000).contains(&self.ingest.batch_max_events) {
            errors.push("ingest.batch_max_events: must be between 1 and 100000".to_string());
        }
        if !(1..=1_000_000).contains(&self.ingest.checkpoint_max_events) {
            errors.push("ingest.checkpoint_max_events: must be between 1 and 1000000".to_string());
        }
        if self.ingest.max_event_bytes == 0 {
            errors.push("ingest.max_event_bytes: must be positive".to_string());
        }
        let mut tenant_names: Vec<&String> = self.tenants.keys().collect();
        tenant_names.sort();
        for name in tenant_names {
            let tenant = &self.tenants[name];
            if !is_valid_tenant(name) {
                errors.push(format!(
                    "tenants.{name}: a tenant name is [a-z0-9_-]{{1,64}}"
                ));
            }
            if let Some(zone) = &tenant.timezone {
                if chrono_tz::Tz::from_str(zone).is_err() {
                    errors.push(format!(
                        "tenants.{name}.timezone: `{zone}` is not an IANA time zone such as Europe/Paris"
                    ));
                }
            }
            if let Some(currency) = &tenant.currency {
                if !is_currency_code(currency) {
                    errors.push(format!(
                        "tenants.{name}.currency: `{currency}` is not an ISO 4217 code such as EUR"
                    ));
                }
            }
            for (code, rate) in &tenant.fx {
                if !is_currency_code(code) {
                    errors.push(format!(
                        "tenants.{name}.fx.{code}: not an ISO 4217 code (write them in upper case)"
                    ));
                }
                match rate.to_decimal() {
                    Some(rate) if rate > Decimal::ZERO && rate <= MAX_FX_RATE => {}
                    Some(rate) if rate > MAX_FX_RATE => errors.push(format!(
                        "tenants.{name}.fx.{code}: {rate} is above the largest rate, {MAX_FX_RATE}"
                    )),
                    _ => errors.push(format!(
                        "tenants.{name}.fx.{code}: the rate must be a positive number"
                    )),
                }
            }
            for (channel, threshold) in &tenant.cac_threshold {
                match threshold.to_f64() {
                    Some(value) if value >= 0.0 && value.is_finite() => {}
                    _ => errors.push(format!(
                        "tenants.{name}.cac_threshold.{channel}: must be a non-negative number"
                    )),
                }
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (index, connector) in self.connectors.iter().enumerate() {
            if !ids.insert(connector.id.as_str()) {
                errors.push(format!(
                    "connectors[{index}].id: `{}` is declared twice",
                    connector.id
                ));
            }
            if !is_valid_tenant(&connector.tenant) {
                errors.push(format!(
                    "connectors[{index}].tenant: `{}` is not a tenant name [a-z0-9_-]{{1,64}}",
                    connector.tenant
                ));
            }
            if !CONNECTOR_KINDS.contains(&connector.kind.as_str()) {
                errors.push(format!(
                    "connectors[{index}].kind: `{}` is not a connector kind of this build (known: {})",
                    connector.kind,
                    CONNECTOR_KINDS.join(", ")
                ));
            }
            if !is_valid_connector_id(&connector.id) {
                errors.push(format!(
                    "connectors[{index}].id: `{}` must be 1 to 64 characters [a-zA-Z0-9_-]",
                    connector.id
                ));
            }
            if parse_duration(&connector.every).is_none() {
                errors.push(format!(
                    "connectors[{index}].every: `{}` is not a duration such as 30s, 15m, 1h or 1d",
                    connector.every
                ));
            }
            if connector.lookback_days > 366 {
                errors.push(format!(
                    "connectors[{index}].lookback_days: {} is more than 366",
                    connector.lookback_days
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The validated per-tenant settings of the model.
    pub fn tenants(&self) -> Tenants {
        let configured = self
            .tenants
            .iter()
            .map(|(name, tenant)| {
                let defaults = TenantSettings::default();
                let settings = TenantSettings {
                    timezone: tenant
                        .timezone
                        .as_deref()
                        .and_then(|zone| chrono_tz::Tz::from_str(zone).ok())
                        .unwrap_or(defaults.timezone),
                    currency: tenant.currency.clone().unwrap_or(defaults.currency),
                    fx: tenant
                        .fx
                        .iter()
                        .filter_map(|(code, rate)| Some((code.clone(), rate.to_decimal()?)))
                        .collect(),
                    cac_threshold: tenant
                        .cac_threshold
                        .iter()
                        .filter_map(|(channel, value)| Some((channel.clone(), value.to_f64()?)))
                        .collect(),
                };
                (name.clone(), settings)
            })
            .collect();
        Tenants::new(configured)
    }

    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_event_bytes: self.ingest.max_event_bytes,
            max_future: Duration::from_secs(self.ingest.max_future_hours * 3600),
        }
    }

    /// The listen address (validated).
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from_str(&self.http.listen)
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9464)))
    }
}

fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(toml.as_bytes()).expect("write");
        Config::load_with_env(
            Some(file.path()),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_match_spec() {
        let config = Config::load_with_env(None, Vec::new()).expect("defaults load");
        assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(config.store.path, PathBuf::from("./var/kpi-store"));
        assert_eq!(config.http.listen, "127.0.0.1:9464");
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let config = load(
            "[nats]\nurl = \"nats://10.0.0.1:4222\"\n[tenants.acme]\ntimezone = \"Europe/Paris\"\nfx = { USD = 0.92 }\ncac_threshold = { all = 250.0 }\n",
            &[("KPI__HTTP__LISTEN", "127.0.0.1:1234"), ("KPI__STORE__PATH", "/tmp/x")],
        )
        .expect("valid");
        assert_eq!(config.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(config.http.listen, "127.0.0.1:1234");
        assert_eq!(config.store.path, PathBuf::from("/tmp/x"));
        let tenants = config.tenants();
        let acme = tenants.get("acme");
        assert_eq!(acme.timezone, chrono_tz::Europe::Paris);
        assert_eq!(acme.fx["USD"].to_string(), "0.92");
        assert_eq!(acme.cac_threshold["all"], 250.0);
    }

    #[test]
    fn environment_overrides_reach_every_section() {
        // One key per section the README documents, each through KPI__SECTION__KEY; tenant
        // tables too, currency codes in upper case (the config crate lowercases the keys).
        let config = load(
            "[tenants.acme]\nfx = { GBP = 1.17 }\n",
            &[
                ("KPI__NATS__STREAM", "EVENTS_X"),
                ("KPI__STORE__CACHE_CAPACITY_MB", "32"),
                ("KPI__HTTP__MAX_ROWS", "50"),
                ("KPI__INGEST__BATCH_MAX_EVENTS", "500"),
                ("KPI__METRICS__HISTORY_MONTHS", "24"),
                ("KPI__TENANTS__ACME__FX__USD", "0.92"),
                ("KPI__TENANTS__ACME__TIMEZONE", "Europe/Paris"),
                ("KPI__TENANTS__ACME__CURRENCY", "CHF"),
                ("KPI__TENANTS__ACME__CAC_THRESHOLD__PAID_SEARCH", "300"),
                ("KPI__TENANTS__BETA__FX__EUR", "1.1"),
            ],
        )
        .expect("valid");
        assert_eq!(config.nats.stream, "EVENTS_X");
        assert_eq!(config.store.cache_capacity_mb, 32);
        assert_eq!(config.http.max_rows, 50);
        assert_eq!(config.ingest.batch_max_events, 500);
        assert_eq!(config.metrics.history_months, 24);
        let tenants = config.tenants();
        let acme = tenants.get("acme");
        assert_eq!(acme.fx["USD"].to_string(), "0.92");
        assert_eq!(acme.fx["GBP"].to_string(), "1.17", "the file's rates stay");
        assert_eq!(acme.timezone, chrono_tz::Europe::Paris);
        assert_eq!(acme.currency, "CHF");
        assert_eq!(acme.cac_threshold["paid_search"], 300.0);
        assert_eq!(tenants.get("beta").fx["EUR"].to_string(), "1.1");
        // A lower-case code in a file is still refused, naming the key.
        let error = load("[tenants.acme]\nfx = { usd = 0.92 }\n", &[]).expect_err("lower case");
        assert!(error.to_string().contains("tenants.acme.fx.usd"), "{error}");
    }

    #[test]
    fn the_effective_configuration_masks_every_secret() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(
            b"[nats]\npassword = \"nats-pass\"\nuser = \"kpi\"\n[[connectors]]\nid = \"g\"\nkind = \"google_ads\"\ntenant = \"acme\"\nevery = \"1h\"\n[connectors.params]\ndeveloper_token = \"dev-token-value\"\nclient_secret = \"${GADS_SECRET}\"\ncustomer_id = \"123\"\n",
        )
        .expect("write");
        let env = [(
            "KPI__HTTP__BASIC_AUTH_PASSWORD".to_string(),
            "web-pass".to_string(),
        )];
        let tree = Config::effective(Some(file.path()), env.clone()).expect("loads");
        let text = tree.to_string();
        for secret in ["nats-pass", "dev-token-value", "GADS_SECRET", "web-pass"] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
        assert_eq!(tree["nats"]["user"], "kpi");
        assert_eq!(tree["connectors"][0]["params"]["customer_id"], "123");
        assert_eq!(tree["http"]["basic_auth_password"], "********");
        assert_eq!(tree["http"]["listen"], "127.0.0.1:9464");
    }

    #[test]
    fn nats_url_lists_several_servers_and_replicas_are_bounded() {
        let config = load(
            "[nats]\nurl = \"nats://10.0.0.1:4222, nats://10.0.0.2:4222,nats://10.0.0.3:4222\"\nreplicas = 3\n",
            &[],
        )
        .expect("valid");
        assert_eq!(
            config.nats.servers(),
            [
                "nats://10.0.0.1:4222",
                "nats://10.0.0.2:4222",
                "nats://10.0.0.3:4222"
            ]
        );
        assert_eq!(config.nats.replicas, 3);
        let defaults = Config::load_with_env(None, Vec::new()).expect("defaults");
        assert_eq!(defaults.nats.replicas, 1);
        assert_eq!(defaults.nats.servers(), ["nats://127.0.0.1:4222"]);
        let error = load(
            "[nats]\nurl = \"nats://a:4222,nats://b:42x22\"\nreplicas = 7\n",
            &[],
        )
        .expect_err("refused")
        .to_string();
        assert!(error.contains("nats.url: `nats://b:42x22`"), "{error}");
        assert!(error.contains("nats.replicas"), "{error}");
    }

    #[test]
    fn an_unknown_key_is_named() {
        let error = load("[http]\nlisten_on = \"x\"\n", &[]).expect_err("unknown key");
        let message = error.to_string();
        assert!(message.contains("listen_on"), "{message}");
    }

    #[test]
    fn connector_declarations_are_checked_by_key() {
        let error = load(
            "[[connectors]]\nid = \"a b\"\nkind = \"fax\"\ntenant = \"Acme\"\nevery = \"often\"\nlookback_days = 400\n",
            &[],
        )
        .expect_err("invalid");
        let message = error.to_string();
        for key in [
            "connectors[0].id",
            "connectors[0].kind",
            "connectors[0].tenant",
            "connectors[0].every",
            "connectors[0].lookback_days",
        ] {
            assert!(message.contains(key), "{key} missing from: {message}");
        }
        let config = load(
            "[[connectors]]\nid = \"gads\"\nkind = \"google_ads\"\ntenant = \"acme\"\nevery = \"1h30m\"\n",
            &[],
        )
        .expect("valid");
        assert_eq!(config.connectors[0].interval(), Duration::from_secs(5400));
    }

    #[test]
    fn checkpoints_must_fit_the_consumer_limits() {
        for (toml, key) in [
            (
                "[nats]\nmax_ack_pending = 5000\n",
                "ingest.checkpoint_max_events",
            ),
            (
                "[ingest]\ncheckpoint_max_events = 0\n",
                "ingest.checkpoint_max_events",
            ),
            (
                "[nats]\nack_wait_ms = 3000\n",
                "ingest.checkpoint_max_wait_ms",
            ),
        ] {
            assert_refused_naming(toml, key);
        }
        let config = load(
            "[nats]\nmax_ack_pending = 5000\n[ingest]\ncheckpoint_max_events = 5000\n",
            &[],
        )
        .expect("valid");
        assert_eq!(config.ingest.checkpoint_max_events, 5000);
    }

    /// Loading `toml` fails, and the error names `key`.
    fn assert_refused_naming(toml: &str, key: &str) {
        let error = load(toml, &[]).expect_err(toml).to_string();
        assert!(error.contains(key), "{key} missing from: {error}");
    }

    #[test]
    fn http_protection_settings_are_checked_by_key() {
        for (toml, key) in [
            ("[http]\nbasic_auth_username = \"p\"\n", "http.basic_auth_password"),
            ("[http]\nbasic_auth_password = \"long-enough-secret\"\n", "http.basic_auth_username"),
            ("[http]\nbasic_auth_username = \"p\"\nbasic_auth_password = \"short\"\n", "http.basic_auth_password"),
            ("[http]\nbasic_auth_username = \"p\"\nbasic_auth_password_file = \"/nonexistent/pw\"\n", "http.basic_auth_password_file"),
            ("[http]\ntls_cert_file = \"/etc/hostname\"\n", "http.tls_key_file"),
            ("[http]\ntls_cert_file = \"/nonexistent/c.pem\"\ntls_key_file = \"/etc/hostname\"\n", "http.tls_cert_file"),
        ] {
            assert_refused_naming(toml, key);
        }
        let config = load(
            "[http]\nbasic_auth_username = \"prometheus\"\nbasic_auth_password = \"a-long-password\"\n",
            &[],
        )
        .expect("valid");
        assert!(
            !format!("{config:?}").contains("a-long-password"),
            "the password is in Debug"
        );
        assert_eq!(
            config.http.basic_auth(),
            Ok(Some((
                "prometheus".to_string(),
                "a-long-password".to_string()
            )))
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        for bad in ["", "10", "h", "1x", "0s", "-1h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_bad_value_is_reported_with_its_key() {
        let error = load(
            "[http]\nlisten = \"nowhere\"\n[tenants.acme]\ntimezone = \"Mars/Olympus\"\ncurrency = \"euro\"\nfx = { USD = -1 }\n",
            &[],
        )
        .expect_err("invalid");
        let message = error.to_string();
        for key in [
            "http.listen",
            "tenants.acme.timezone",
            "tenants.acme.currency",
            "tenants.acme.fx.USD",
        ] {
            assert!(message.contains(key), "{key} missing from: {message}");
        }
    }

    #[test]
    fn a_bad_environment_value_is_named() {
        let error = Config::load_with_env(
            None,
            vec![(
                "KPI__INGEST__BATCH_MAX_EVENTS".to_string(),
                "many".to_string(),
            )],
        )
        .expect_err("bad number");
        assert!(error.to_string().contains("batch_max_events"), "{error}");
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let config = load("[nats]\npassword = \"s3cret\"\n", &[]).expect("valid");
        assert!(!format!("{config:?}").contains("s3cret"));
    }
}
