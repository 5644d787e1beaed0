//! The typed `sync.toml`: parsing, `USERSYNC_<SECTION>_<KEY>` environment
//! overrides, secret references and validation. Everything that can be wrong
//! in a configuration is reported here, before any connection is made.

pub mod inbound;
pub mod tls;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::core::signature::WebhookSecret;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("environment variable {var}: expected {expected}, got {got:?}")]
    EnvType {
        var: String,
        expected: &'static str,
        got: String,
    },
    #[error("missing config key {key} (set it in sync.toml or as {env})")]
    Missing { key: &'static str, env: String },
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("secret for {key}: environment variable {var} is not set (export it, or point {key_file} at a file)")]
    SecretEnvMissing {
        key: &'static str,
        var: String,
        key_file: &'static str,
    },
    #[error("secret for {key}: cannot read file {path}: {source}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How an environment override is turned into a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Str,
    Int,
    Bool,
    StrList,
    /// `field=column,field=column`
    Map,
}

/// Every key the config knows, with its type. Drives environment overrides
/// and lets a test check that `sync.toml.example` documents each of them.
pub const KEYS: &[(&str, &str, KeyKind)] = &[
    ("database", "url", KeyKind::Str),
    ("database", "password_env", KeyKind::Str),
    ("database", "password_file", KeyKind::Str),
    ("database", "table", KeyKind::Str),
    ("database", "slot", KeyKind::Str),
    ("database", "publication", KeyKind::Str),
    ("database", "origin", KeyKind::Str),
    ("database", "max_retained_wal_mb", KeyKind::Int),
    ("database", "leader_lease_secs", KeyKind::Int),
    ("database", "sslmode", KeyKind::Str),
    ("database", "sslrootcert", KeyKind::Str),
    ("sink", "kind", KeyKind::Str),
    ("sink", "url", KeyKind::Str),
    ("sink", "secret_env", KeyKind::Str),
    ("sink", "secret_file", KeyKind::Str),
    ("sink", "external_id_pointer", KeyKind::Str),
    ("sink", "columns", KeyKind::StrList),
    ("sink", "timeout_ms", KeyKind::Int),
    ("sink", "max_in_flight", KeyKind::Int),
    ("sink", "api_key_env", KeyKind::Str),
    ("sink", "api_key_file", KeyKind::Str),
    ("sink", "rate_limit_per_sec", KeyKind::Int),
    ("sink", "on_delete", KeyKind::Str),
    ("sink", "mapping", KeyKind::Map),
    ("sink", "max_response_bytes", KeyKind::Int),
    ("sink", "max_external_id_length", KeyKind::Int),
    ("retry", "max_attempts", KeyKind::Int),
    ("retry", "initial_backoff_ms", KeyKind::Int),
    ("retry", "max_backoff_ms", KeyKind::Int),
    ("retry", "max_elapsed_secs", KeyKind::Int),
    ("writeback", "batch_size", KeyKind::Int),
    ("pipeline", "max_buffered_changes", KeyKind::Int),
    ("log", "level", KeyKind::Str),
    ("log", "format", KeyKind::Str),
    ("log", "personal_data", KeyKind::Bool),
    ("metrics", "listen", KeyKind::Str),
    ("metrics", "ready_max_lag_mb", KeyKind::Int),
    ("sync_log", "enabled", KeyKind::Bool),
    ("sync_log", "retention_days", KeyKind::Int),
    ("sync", "enabled", KeyKind::Bool),
    ("backfill", "on_start", KeyKind::Bool),
    ("backfill", "chunk_size", KeyKind::Int),
    ("reconcile", "every", KeyKind::Str),
    ("reconcile", "from", KeyKind::Str),
    ("inbound", "listen", KeyKind::Str),
    ("inbound", "max_body_bytes", KeyKind::Int),
    ("inbound", "request_timeout_ms", KeyKind::Int),
    ("inbound", "batch_max", KeyKind::Int),
];

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    database: RawDatabase,
    sink: RawSink,
    retry: RetryConfig,
    writeback: WritebackConfig,
    pipeline: PipelineConfig,
    log: LogConfig,
    metrics: MetricsConfig,
    sync_log: SyncLogConfig,
    sync: SyncConfig,
    backfill: BackfillConfig,
    reconcile: RawReconcile,
    inbound: inbound::RawInbound,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawReconcile {
    every: String,
    from: String,
}

/// `[reconcile]`: the read-only reconcile `run` repeats.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReconcileConfig {
    /// How often; `None` (the default, `every = ""`): never.
    pub every: Option<std::time::Duration>,
    /// Compare with this inbound source instead of the sink's service.
    pub from: Option<String>,
}

/// `"90s"`, `"15m"`, `"6h"`, `"1d"` (a bare number is seconds).
pub fn parse_interval(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDatabase {
    url: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    table: String,
    slot: String,
    publication: String,
    origin: String,
    max_retained_wal_mb: u64,
    leader_lease_secs: u64,
    sslmode: Option<String>,
    sslrootcert: Option<PathBuf>,
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: None,
            password_env: None,
            password_file: None,
            table: "public.users".into(),
            slot: "usersync".into(),
            publication: "usersync_users".into(),
            origin: "usersync".into(),
            max_retained_wal_mb: 1024,
            leader_lease_secs: 10,
            sslmode: None,
            sslrootcert: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSink {
    kind: String,
    url: Option<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    external_id_pointer: String,
    columns: Vec<String>,
    timeout_ms: u64,
    max_in_flight: usize,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    rate_limit_per_sec: Option<u32>,
    on_delete: Option<String>,
    mapping: std::collections::BTreeMap<String, String>,
    max_response_bytes: u64,
    max_external_id_length: usize,
}

impl Default for RawSink {
    fn default() -> Self {
        RawSink {
            kind: "webhook".into(),
            url: None,
            secret_env: None,
            secret_file: None,
            external_id_pointer: "/id".into(),
            columns: Vec::new(),
            timeout_ms: 10_000,
            max_in_flight: 16,
            api_key_env: None,
            api_key_file: None,
            rate_limit_per_sec: None,
            on_delete: None,
            mapping: std::collections::BTreeMap::new(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_external_id_length: DEFAULT_MAX_EXTERNAL_ID_LENGTH,
        }
    }
}

/// Retry policy for pushes to the sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub max_attempts: usize,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub max_elapsed_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 50,
            initial_backoff_ms: 200,
            max_backoff_ms: 30_000,
            max_elapsed_secs: 3_600,
        }
    }
}

/// How write-backs are grouped into transactions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WritebackConfig {
    pub batch_size: usize,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        WritebackConfig { batch_size: 500 }
    }
}

/// Bounds on what the daemon holds in memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub max_buffered_changes: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_buffered_changes: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: String,
    /// Log emails, names and other row values. Off by default.
    pub personal_data: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
            personal_data: false,
        }
    }
}

/// The HTTP endpoint for Prometheus and health probes (`src/metrics.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` for /metrics, /healthz and /readyz; empty disables them.
    pub listen: String,
    /// /readyz answers 503 while the slot lags more than this many MiB.
    pub ready_max_lag_mb: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9187".into(),
            ready_max_lag_mb: 64,
        }
    }
}

/// The per-change audit table `usersync.sync_log` (`src/synclog.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncLogConfig {
    pub enabled: bool,
    /// Rows older than this are pruned; 0 keeps them forever.
    pub retention_days: u64,
}

impl Default for SyncLogConfig {
    fn default() -> Self {
        SyncLogConfig {
            enabled: true,
            retention_days: 30,
        }
    }
}

/// The off switch: with `enabled = false` the daemon keeps consuming the
/// slot (so WAL does not pile up) but pushes nothing, and records which users
/// changed; switching it back on (SIGHUP or restart) pushes those users.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub enabled: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { enabled: true }
    }
}

/// Pushing the users that already exist in the table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillConfig {
    /// Run a backfill (changed rows only) beside the stream when `run` starts.
    pub on_start: bool,
    /// Rows scanned, and requests queued, per step.
    pub chunk_size: usize,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            on_start: false,
            chunk_size: 500,
        }
    }
}

pub use crate::core::names::{quote_ident, quote_literal, TableName};

/// Connection settings, with the password resolved but never printed.
#[derive(Clone)]
pub struct DatabaseConfig {
    pub pg: tokio_postgres::Config,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<String>,
    pub table: TableName,
    pub slot: String,
    pub publication: String,
    pub origin: String,
    /// `check` and `status` warn when the slot retains more WAL than this.
    pub max_retained_wal_mb: u64,
    /// How long a leader that stopped answering keeps leadership
    /// (`app::leader`): the lock session's `idle_session_timeout`.
    pub leader_lease_secs: u64,
    /// sslmode and sslrootcert, from `[database]` or the URL's query.
    pub tls: crate::config::tls::TlsSettings,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("origin", &self.origin)
            .field("max_retained_wal_mb", &self.max_retained_wal_mb)
            .field("leader_lease_secs", &self.leader_lease_secs)
            .field("tls", &self.tls)
            .finish()
    }
}

impl DatabaseConfig {
    /// `host:port[,host:port…]/dbname as user`, for messages: every host
    /// of a multi-host URL, since the one answering may be any of them.
    pub fn describe(&self) -> String {
        let ports = self.pg.get_ports();
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                // One port serves every host; else they pair up.
                let port = ports
                    .get(if ports.len() == 1 { 0 } else { i })
                    .copied()
                    .unwrap_or(self.port);
                format!("{host}:{port}")
            })
            .collect();
        let hosts = if hosts.is_empty() {
            format!("{}:{}", self.host, self.port)
        } else {
            hosts.join(",")
        };
        format!("{hosts}/{} as {}", self.dbname, self.user)
    }
}

/// Which external service the sink talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Webhook,
    Memberstack,
    Stripe,
}

impl SinkKind {
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Memberstack => "memberstack",
            SinkKind::Stripe => "stripe",
        }
    }
}

/// What a delete in the table does to the external record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    /// Delete the external record.
    Delete,
    /// Leave it alone.
    Ignore,
    /// Keep it and mark it deleted (metadata `deleted_at`).
    Mark,
}

/// A secret value: never printed by `Debug`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub kind: SinkKind,
    /// The webhook endpoint, or the vendor API's base URL.
    pub url: String,
    /// Webhook signing secret (webhook only).
    pub secret: Option<WebhookSecret>,
    /// Vendor API key (memberstack, stripe).
    pub api_key: Option<Secret>,
    /// Where the API key came from, for messages ("environment variable X").
    pub api_key_source: String,
    pub external_id_pointer: String,
    /// Columns sent and watched; empty means every column but the two sync
    /// columns. With `[sink.mapping]`, exactly the mapped columns.
    pub columns: Vec<String>,
    /// External field path (dots for nesting) → users column.
    pub mapping: Vec<(String, String)>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    /// Client-side request rate limit; 0 means none.
    pub rate_limit_per_sec: u32,
    pub on_delete: OnDelete,
    /// The most bytes of a response body the sink reads; a longer answer
    /// is a permanent failure of that change.
    pub max_response_bytes: u64,
    /// The longest external id accepted from a response, in bytes.
    pub max_external_id_length: usize,
}

/// `sink.max_response_bytes` unless configured: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1024 * 1024;
/// `sink.max_external_id_length` unless configured.
pub const DEFAULT_MAX_EXTERNAL_ID_LENGTH: usize = 255;

#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub sink: SinkConfig,
    pub retry: RetryConfig,
    pub writeback: WritebackConfig,
    pub pipeline: PipelineConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub sync_log: SyncLogConfig,
    pub sync: SyncConfig,
    pub backfill: BackfillConfig,
    pub reconcile: ReconcileConfig,
    /// `[inbound]`: the webhook receiver, when any source is configured.
    pub inbound: Option<inbound::InboundConfig>,
}

/// Where environment values come from; a map in tests, the process env otherwise.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
    fn vars(&self) -> Vec<(String, String)>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

pub fn env_name(section: &str, key: &str) -> String {
    format!("USERSYNC_{}_{}", section.to_uppercase(), key.to_uppercase())
}

impl Config {
    /// Loads `path` (if given or if `sync.toml` exists), applies environment
    /// overrides and validates. `explicit` says the user named the file, so a
    /// missing file is an error rather than "configure from the environment".
    pub fn load(path: &Path, explicit: bool, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = read_config_file(path, explicit)?;
        Self::from_parts(text.as_deref(), &path.display().to_string(), env)
    }

    pub fn from_parts(
        file_text: Option<&str>,
        origin: &str,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        raw_config(file_text, origin, env)?.validate(env)
    }
}

/// Only the `[database]` part, for commands that never talk to the sink
/// (`setup`). Without `require_url`, a missing URL is fine (printing SQL).
pub fn load_database(
    path: &Path,
    explicit: bool,
    env: &dyn Env,
    require_url: bool,
) -> Result<DatabaseConfig, ConfigError> {
    let text = read_config_file(path, explicit)?;
    raw_config(text.as_deref(), &path.display().to_string(), env)?.database(env, require_url)
}

fn read_config_file(path: &Path, explicit: bool) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn raw_config(
    file_text: Option<&str>,
    origin: &str,
    env: &dyn Env,
) -> Result<RawConfig, ConfigError> {
    {
        let mut table: toml::Table = match file_text {
            Some(text) => toml::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })?,
            None => toml::Table::new(),
        };
        let file_has_url_password = table
            .get("database")
            .and_then(|d| d.get("url"))
            .and_then(|u| u.as_str())
            .and_then(|u| {
                tokio_postgres::Config::from_str(&crate::config::tls::split_url(u).0).ok()
            })
            .is_some_and(|c| c.get_password().is_some());
        if file_has_url_password {
            return Err(ConfigError::Invalid {
                key: "database.url",
                message: format!(
                    "{origin} contains a password in the URL; secrets are never written in the config file: \
                     remove it and set database.password_env (or password_file), or pass the URL in {}",
                    env_name("database", "url")
                ),
            });
        }
        apply_env_overrides(&mut table, env)?;
        inbound::apply_env_overrides(&mut table, env);
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin: format!("{origin} (with environment overrides)"),
                message: e.to_string(),
            })
    }
}

fn apply_env_overrides(table: &mut toml::Table, env: &dyn Env) -> Result<(), ConfigError> {
    for (section, key, kind) in KEYS {
        let var = env_name(section, key);
        let Some(raw) = env.get(&var) else { continue };
        let value = match kind {
            KeyKind::Str => toml::Value::String(raw),
            KeyKind::Int => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| ConfigError::EnvType {
                    var: var.clone(),
                    expected: "an integer",
                    got: raw.clone(),
                })?)
            }
            KeyKind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
                "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
                _ => {
                    return Err(ConfigError::EnvType {
                        var,
                        expected: "true or false",
                        got: raw,
                    })
                }
            },
            KeyKind::Map => {
                let mut t = toml::Table::new();
                for pair in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let Some((field, column)) = pair.split_once('=') else {
                        return Err(ConfigError::EnvType {
                            var,
                            expected: "field=column pairs separated by commas",
                            got: raw.clone(),
                        });
                    };
                    t.insert(
                        field.trim().to_string(),
                        toml::Value::String(column.trim().to_string()),
                    );
                }
                toml::Value::Table(t)
            }
            KeyKind::StrList => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
        };
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), value);
            }
            _ => {
                return Err(ConfigError::Parse {
                    origin: "config".into(),
                    message: format!("[{section}] must be a table"),
                })
            }
        }
    }
    // A misspelt override would otherwise be ignored in silence.
    let referenced: Vec<String> = ["database", "sink"]
        .iter()
        .flat_map(|s| {
            let t = table.get(*s).and_then(|v| v.as_table());
            ["password_env", "secret_env", "api_key_env"]
                .iter()
                .filter_map(move |k| t.and_then(|t| t.get(*k)).and_then(|v| v.as_str()))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    for (name, _) in env.vars() {
        let Some(rest) = name.strip_prefix("USERSYNC_") else {
            continue;
        };
        let section = rest.split('_').next().unwrap_or_default().to_lowercase();
        let known_section = KEYS.iter().any(|(s, _, _)| *s == section);
        let known_key = KEYS.iter().any(|(s, k, _)| env_name(s, k) == name);
        if known_section
            && !known_key
            && !referenced.contains(&name)
            && !inbound::is_source_override(&name, table)
        {
            tracing::warn!(
                variable = %name,
                "environment variable looks like a config override but names no config key; ignored"
            );
        }
    }
    Ok(())
}

fn read_secret(
    env: &dyn Env,
    key: &'static str,
    key_file: &'static str,
    var: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    if let Some(var) = var.as_ref().filter(|v| !v.is_empty()) {
        return match env.get(var) {
            Some(v) => Ok(Some(v.trim_end_matches(['\n', '\r']).to_string())),
            None => Err(ConfigError::SecretEnvMissing {
                key,
                var: var.clone(),
                key_file,
            }),
        };
    }
    if let Some(path) = file.as_ref().filter(|p| !p.as_os_str().is_empty()) {
        return std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|source| ConfigError::SecretFile {
                key,
                path: path.clone(),
                source,
            });
    }
    Ok(None)
}

impl RawConfig {
    fn database(&self, env: &dyn Env, require_url: bool) -> Result<DatabaseConfig, ConfigError> {
        let url = match (&self.database.url, require_url) {
            (Some(url), _) => url.clone(),
            // Printing the setup SQL needs names, not a server.
            (None, false) => "postgres://postgres@localhost/postgres".to_string(),
            (None, true) => {
                return Err(ConfigError::Missing {
                    key: "database.url",
                    env: env_name("database", "url"),
                })
            }
        };
        // sslmode and sslrootcert are ours to interpret (verify-ca and
        // verify-full are unknown to tokio-postgres).
        let (url, url_sslmode, url_sslrootcert) = crate::config::tls::split_url(&url);
        let mut pg = tokio_postgres::Config::from_str(&url).map_err(|e| ConfigError::Invalid {
            key: "database.url",
            message: format!(
                "not a PostgreSQL connection URL ({e}); expected postgres://user@host:port/dbname"
            ),
        })?;
        let password = read_secret(
            env,
            "database.password",
            "database.password_file",
            &self.database.password_env,
            &self.database.password_file,
        )?;
        // Like libpq, fall back to PGPASSWORD.
        let password = password.or_else(|| env.get("PGPASSWORD").filter(|p| !p.is_empty()));
        if let Some(p) = &password {
            pg.password(p.as_bytes());
        }
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg
            .get_user()
            .map(str::to_string)
            .ok_or(ConfigError::Invalid {
                key: "database.url",
                message: "the URL names no user (postgres://USER@host/dbname)".into(),
            })?;
        let dbname = pg.get_dbname().unwrap_or(&user).to_string();
        let tls = self.tls_settings(url_sslmode, url_sslrootcert)?;
        pg.ssl_mode(tls.tokio_postgres_mode());
        let url_password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let table =
            TableName::parse(&self.database.table).map_err(|message| ConfigError::Invalid {
                key: "database.table",
                message,
            })?;
        for (key, v) in [
            ("database.slot", &self.database.slot),
            ("database.publication", &self.database.publication),
            ("database.origin", &self.database.origin),
        ] {
            if v.is_empty()
                || v.len() > 63
                || !v
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "{v:?} must be 1-63 characters of lower-case letters, digits and '_'"
                    ),
                });
            }
        }
        if !(2..=3600).contains(&self.database.leader_lease_secs) {
            return Err(ConfigError::Invalid {
                key: "database.leader_lease_secs",
                message: format!(
                    "{} must be between 2 and 3600 seconds",
                    self.database.leader_lease_secs
                ),
            });
        }
        Ok(DatabaseConfig {
            pg,
            host,
            port,
            user,
            dbname,
            password: password.or(url_password),
            table,
            slot: self.database.slot.clone(),
            publication: self.database.publication.clone(),
            origin: self.database.origin.clone(),
            max_retained_wal_mb: self.database.max_retained_wal_mb,
            leader_lease_secs: self.database.leader_lease_secs,
            tls,
        })
    }

    /// `[database] sslmode` / `sslrootcert` win over the URL's query (so
    /// USERSYNC_DATABASE_SSLMODE can override a URL); the default is prefer,
    /// as in libpq.
    fn tls_settings(
        &self,
        url_sslmode: Option<String>,
        url_sslrootcert: Option<String>,
    ) -> Result<crate::config::tls::TlsSettings, ConfigError> {
        let (mode_key, mode) = match self.database.sslmode.as_ref().filter(|m| !m.is_empty()) {
            Some(m) => ("database.sslmode", m.clone()),
            None => (
                "database.url",
                url_sslmode.unwrap_or_else(|| "prefer".into()),
            ),
        };
        let mode =
            crate::config::tls::SslMode::parse(&mode).map_err(|message| ConfigError::Invalid {
                key: mode_key,
                message,
            })?;
        let (root_key, root_cert) = match self
            .database
            .sslrootcert
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            Some(p) => ("database.sslrootcert", Some(p.clone())),
            None => (
                "database.url",
                url_sslrootcert.filter(|p| !p.is_empty()).map(PathBuf::from),
            ),
        };
        if let Some(path) = &root_cert {
            if let Err(e) = std::fs::metadata(path) {
                return Err(ConfigError::Invalid {
                    key: root_key,
                    message: format!("sslrootcert {}: {e}", path.display()),
                });
            }
        }
        Ok(crate::config::tls::TlsSettings { mode, root_cert })
    }

    /// The `[sink]` section: kind, endpoint, credentials, mapping, policies.
    fn sink_parts(&self, env: &dyn Env) -> Result<SinkConfig, ConfigError> {
        let s = &self.sink;
        let kind = match s.kind.as_str() {
            "webhook" => SinkKind::Webhook,
            "memberstack" => SinkKind::Memberstack,
            "stripe" => SinkKind::Stripe,
            other => {
                return Err(ConfigError::Invalid {
                    key: "sink.kind",
                    message: format!(
                    "unknown sink kind {other:?}; use \"webhook\", \"memberstack\" or \"stripe\""
                ),
                })
            }
        };
        let url = match (&s.url, kind) {
            (Some(u), _) => u.clone(),
            (None, SinkKind::Memberstack) => "https://admin.memberstack.com".into(),
            (None, SinkKind::Stripe) => "https://api.stripe.com".into(),
            (None, SinkKind::Webhook) => {
                return Err(ConfigError::Missing {
                    key: "sink.url",
                    env: env_name("sink", "url"),
                })
            }
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                key: "sink.url",
                message: format!("{url:?} is not an http:// or https:// URL"),
            });
        }
        let mut secret = None;
        let mut api_key = None;
        let mut api_key_source = String::new();
        if kind == SinkKind::Webhook {
            let text = read_secret(
                env,
                "sink.secret",
                "sink.secret_file",
                &s.secret_env,
                &s.secret_file,
            )?
            .ok_or(ConfigError::Invalid {
                key: "sink.secret_env",
                message:
                    "the webhook signing secret is required: set sink.secret_env to the name of an \
                     environment variable (or sink.secret_file to a file) holding whsec_<base64>"
                        .into(),
            })?;
            secret = Some(
                WebhookSecret::parse(&text).map_err(|e| ConfigError::Invalid {
                    key: "sink.secret_env",
                    message: e.to_string(),
                })?,
            );
        } else {
            let key = read_secret(
                env,
                "sink.api_key",
                "sink.api_key_file",
                &s.api_key_env,
                &s.api_key_file,
            )?
            .filter(|k| !k.is_empty())
            .ok_or(ConfigError::Invalid {
                key: "sink.api_key_env",
                message: format!(
                    "the {} API key is required: set sink.api_key_env to the name of an \
                     environment variable (or sink.api_key_file to a file) holding it",
                    kind.name()
                ),
            })?;
            api_key = Some(Secret::new(key));
            api_key_source = match s.api_key_env.as_ref().filter(|v| !v.is_empty()) {
                Some(var) => format!("environment variable {var}"),
                None => format!(
                    "file {}",
                    s.api_key_file
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            };
        }
        let on_delete = match (s.on_delete.as_deref(), kind) {
            (Some("delete"), _) => OnDelete::Delete,
            (Some("ignore"), _) => OnDelete::Ignore,
            (Some("mark"), SinkKind::Webhook) => {
                return Err(ConfigError::Invalid {
                    key: "sink.on_delete",
                    message: "\"mark\" needs a service that keeps metadata; the webhook sink supports \"delete\" and \"ignore\"".into(),
                })
            }
            (Some("mark"), _) => OnDelete::Mark,
            (Some(other), _) => {
                return Err(ConfigError::Invalid {
                    key: "sink.on_delete",
                    message: format!("{other:?}: use \"delete\", \"ignore\" or \"mark\""),
                })
            }
            (None, SinkKind::Stripe) => OnDelete::Mark,
            (None, _) => OnDelete::Delete,
        };
        if !s.mapping.is_empty() && !s.columns.is_empty() {
            return Err(ConfigError::Invalid {
                key: "sink.columns",
                message: "set either sink.columns or [sink.mapping], not both: with a mapping, the mapped columns are the synced ones".into(),
            });
        }
        // The two sync columns are usersync's own: synced, they would make
        // every write-back a change to push (an echo past the origin filter)
        // and let a vendor value overwrite the guarded write-back.
        let sync_column = |c: &String| {
            c == crate::core::table::EXTERNAL_ID_COLUMN || c == crate::core::table::SYNCED_AT_COLUMN
        };
        if let Some(c) = s.columns.iter().find(|c| sync_column(c)) {
            return Err(ConfigError::Invalid {
                key: "sink.columns",
                message: format!(
                    "{c:?} is one of the two columns usersync writes back (external_user_id, \
                     external_synced_at) and cannot be synced: remove it from sink.columns"
                ),
            });
        }
        if let Some((f, c)) = s.mapping.iter().find(|(_, c)| sync_column(c)) {
            return Err(ConfigError::Invalid {
                key: "sink.mapping",
                message: format!(
                    "{f} = {c:?}: {c:?} is one of the two columns usersync writes back \
                     (external_user_id, external_synced_at) and cannot be synced: map another column"
                ),
            });
        }
        let mapping: Vec<(String, String)> = s
            .mapping
            .iter()
            .map(|(f, c)| (f.clone(), c.clone()))
            .collect();
        if let Some((f, _)) = mapping
            .iter()
            .find(|(f, _)| f.is_empty() || f.split('.').any(str::is_empty))
        {
            return Err(ConfigError::Invalid {
                key: "sink.mapping",
                message: format!("{f:?} is not a field path (names separated by dots)"),
            });
        }
        if kind == SinkKind::Memberstack && !mapping.iter().any(|(f, _)| f == "email") {
            return Err(ConfigError::Invalid {
                key: "sink.mapping",
                message: "Memberstack needs an email: map it, e.g. email = \"email\" under [sink.mapping]".into(),
            });
        }
        let mut columns = s.columns.clone();
        for (_, c) in &mapping {
            if !columns.contains(c) {
                columns.push(c.clone());
            }
        }
        Ok(SinkConfig {
            kind,
            url,
            secret,
            api_key,
            api_key_source,
            external_id_pointer: s.external_id_pointer.clone(),
            columns,
            mapping,
            timeout: Duration::from_millis(s.timeout_ms),
            max_in_flight: s.max_in_flight,
            rate_limit_per_sec: s.rate_limit_per_sec.unwrap_or(match kind {
                SinkKind::Webhook => 0,
                SinkKind::Memberstack | SinkKind::Stripe => 25,
            }),
            on_delete,
            max_response_bytes: s.max_response_bytes,
            max_external_id_length: s.max_external_id_length,
        })
    }

    fn validate(self, env: &dyn Env) -> Result<Config, ConfigError> {
        let database = self.database(env, true)?;
        let sink = self.sink_parts(env)?;
        if !self.sink.external_id_pointer.is_empty()
            && !self.sink.external_id_pointer.starts_with('/')
        {
            return Err(ConfigError::Invalid {
                key: "sink.external_id_pointer",
                message: format!(
                    "{:?} is not a JSON pointer (it starts with '/', e.g. \"/id\" or \"/data/id\")",
                    self.sink.external_id_pointer
                ),
            });
        }
        for (key, v) in [
            ("sink.max_in_flight", self.sink.max_in_flight as u64),
            ("sink.max_response_bytes", self.sink.max_response_bytes),
            (
                "sink.max_external_id_length",
                self.sink.max_external_id_length as u64,
            ),
            ("sink.timeout_ms", self.sink.timeout_ms),
            ("retry.max_attempts", self.retry.max_attempts as u64),
            ("writeback.batch_size", self.writeback.batch_size as u64),
            (
                "pipeline.max_buffered_changes",
                self.pipeline.max_buffered_changes as u64,
            ),
            ("backfill.chunk_size", self.backfill.chunk_size as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    message: "must be at least 1".into(),
                });
            }
        }
        if self.retry.initial_backoff_ms > self.retry.max_backoff_ms {
            return Err(ConfigError::Invalid {
                key: "retry.initial_backoff_ms",
                message: "must not exceed retry.max_backoff_ms".into(),
            });
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid {
                key: "log.format",
                message: format!("{:?}: use \"text\" or \"json\"", self.log.format),
            });
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::Invalid {
                key: "log.level",
                message: format!(
                    "{:?}: use error, warn, info, debug or trace",
                    self.log.level
                ),
            });
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::Invalid {
                key: "metrics.listen",
                message: format!(
                    "{:?} is not an address: use IP:port such as \"127.0.0.1:9187\", or \"\" to disable",
                    self.metrics.listen
                ),
            });
        }
        let inbound = self
            .inbound
            .validate(env, sink.kind.name(), &self.metrics.listen)?;
        let every = match self.reconcile.every.trim() {
            "" => None,
            s => Some(parse_interval(s).ok_or_else(|| ConfigError::Invalid {
                key: "reconcile.every",
                message: format!("{s:?} is not an interval: use e.g. \"90s\", \"15m\", \"6h\" or \"1d\", or \"\" for never"),
            })?),
        };
        let from = Some(self.reconcile.from.trim().to_string()).filter(|s| !s.is_empty());
        if let Some(f) = &from {
            let known = inbound
                .as_ref()
                .is_some_and(|i| i.sources.iter().any(|s| &s.name == f || s.kind.name() == f));
            if !known {
                return Err(ConfigError::Invalid {
                    key: "reconcile.from",
                    message: format!("{f:?} names no source under [inbound.sources]"),
                });
            }
        }
        if every.is_some() && from.is_none() && sink.kind == SinkKind::Webhook {
            return Err(ConfigError::Invalid {
                key: "reconcile.every",
                message: "the webhook sink has no list API to reconcile with; set reconcile.from to an inbound source, or every = \"\"".into(),
            });
        }
        Ok(Config {
            reconcile: ReconcileConfig { every, from },
            inbound,
            database,
            sink,
            retry: self.retry,
            writeback: self.writeback,
            pipeline: self.pipeline,
            log: self.log,
            metrics: self.metrics,
            sync_log: self.sync_log,
            sync: self.sync,
            backfill: self.backfill,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_intervals() {
        assert_eq!(
            parse_interval("90s"),
            Some(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            parse_interval("15m"),
            Some(std::time::Duration::from_secs(900))
        );
        assert_eq!(
            parse_interval("6h"),
            Some(std::time::Duration::from_secs(21_600))
        );
        assert_eq!(
            parse_interval("1d"),
            Some(std::time::Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_interval("30"),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(parse_interval("0s"), None);
        assert_eq!(parse_interval("5 weeks"), None);
        assert_eq!(parse_interval("m"), None);
    }

    #[test]
    fn describe_names_every_host_of_a_multi_host_url() {
        let one = MINIMAL;
        let two = MINIMAL.replace(
            "postgres://app@db.example:5433/app",
            "postgres://app@db1.example:5433,db2.example:5434/app?target_session_attrs=read-write",
        );
        let shared = MINIMAL.replace(
            "postgres://app@db.example:5433/app",
            "postgres://app@db1.example,db2.example/app",
        );
        let e = env(&[("HOOK_SECRET", SECRET)]);
        let d = |toml: &str| {
            Config::from_parts(Some(toml), "test", &e)
                .expect("config")
                .database
                .describe()
        };
        assert_eq!(d(one), "db.example:5433/app as app");
        assert_eq!(d(&two), "db1.example:5433,db2.example:5434/app as app");
        assert_eq!(d(&shared), "db1.example:5432,db2.example:5432/app as app");
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    const MINIMAL: &str = r#"
[database]
url = "postgres://app@db.example:5433/app"
[sink]
url = "https://hooks.example/users"
secret_env = "HOOK_SECRET"
"#;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::from_parts(Some(MINIMAL), "t", &env(&[("HOOK_SECRET", SECRET)])).unwrap();
        assert_eq!(c.database.host, "db.example");
        assert_eq!(c.database.port, 5433);
        assert_eq!(c.database.table.to_string(), "public.users");
        assert_eq!(c.database.slot, "usersync");
        assert_eq!(c.sink.external_id_pointer, "/id");
        assert_eq!(c.sink.max_in_flight, 16);
    }

    #[test]
    fn env_overrides_every_kind() {
        let e = env(&[
            ("HOOK_SECRET", SECRET),
            ("USERSYNC_SINK_URL", "http://127.0.0.1:9/x"),
            ("USERSYNC_RETRY_MAX_ATTEMPTS", "3"),
            ("USERSYNC_LOG_PERSONAL_DATA", "true"),
            ("USERSYNC_SINK_COLUMNS", "email, name"),
            ("USERSYNC_DATABASE_TABLE", "app.members"),
        ]);
        let c = Config::from_parts(Some(MINIMAL), "t", &e).unwrap();
        assert_eq!(c.sink.url, "http://127.0.0.1:9/x");
        assert_eq!(c.retry.max_attempts, 3);
        assert!(c.log.personal_data);
        assert_eq!(c.sink.columns, vec!["email", "name"]);
        assert_eq!(c.database.table.schema, "app");
    }

    #[test]
    fn env_alone_is_enough() {
        let e = env(&[
            ("USERSYNC_DATABASE_URL", "postgres://u:pw@h/db"),
            ("USERSYNC_SINK_URL", "http://127.0.0.1:9/"),
            ("USERSYNC_SINK_SECRET_ENV", "S"),
            ("S", SECRET),
        ]);
        let c = Config::from_parts(None, "t", &e).unwrap();
        assert_eq!(c.database.password.as_deref(), Some("pw"));
    }

    #[test]
    fn bad_env_type_names_the_variable() {
        let e = env(&[
            ("HOOK_SECRET", SECRET),
            ("USERSYNC_SINK_MAX_IN_FLIGHT", "lots"),
        ]);
        let err = Config::from_parts(Some(MINIMAL), "t", &e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("USERSYNC_SINK_MAX_IN_FLIGHT"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = format!("{MINIMAL}\nmax_inflight = 3\n");
        let err = Config::from_parts(Some(&text), "sync.toml", &env(&[("HOOK_SECRET", SECRET)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_inflight"), "{err}");
    }

    #[test]
    fn wrong_type_is_refused() {
        let text = MINIMAL.replace(
            "secret_env = \"HOOK_SECRET\"",
            "secret_env = \"HOOK_SECRET\"\ntimeout_ms = \"soon\"",
        );
        let err = Config::from_parts(Some(&text), "sync.toml", &env(&[("HOOK_SECRET", SECRET)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout_ms"), "{err}");
    }

    #[test]
    fn password_in_file_url_is_refused_without_echoing_it() {
        let text = MINIMAL.replace("app@db", "app:hunter2@db");
        let err = Config::from_parts(Some(&text), "sync.toml", &env(&[("HOOK_SECRET", SECRET)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("password"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn missing_secret_env_is_named() {
        let err = Config::from_parts(Some(MINIMAL), "t", &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("HOOK_SECRET"), "{err}");
    }

    #[test]
    fn missing_url_names_env_var() {
        let err = Config::from_parts(Some("[sink]\nurl='http://x'"), "t", &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("USERSYNC_DATABASE_URL"), "{err}");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let e = env(&[("HOOK_SECRET", SECRET), ("PW", "hunter2")]);
        let text = MINIMAL.replace("[sink]", "password_env = \"PW\"\n[sink]");
        let c = Config::from_parts(Some(&text), "t", &e).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "{dbg}");
    }

    #[test]
    fn a_sync_column_in_sink_columns_is_refused() {
        for col in ["external_user_id", "external_synced_at"] {
            let text = MINIMAL.replace(
                "secret_env = \"HOOK_SECRET\"",
                &format!("secret_env = \"HOOK_SECRET\"\ncolumns = [\"email\", \"{col}\"]"),
            );
            let err =
                Config::from_parts(Some(&text), "sync.toml", &env(&[("HOOK_SECRET", SECRET)]))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains("sink.columns") && err.contains(col), "{err}");
            assert!(err.contains("writes back"), "{err}");
            let e = env(&[
                ("HOOK_SECRET", SECRET),
                ("USERSYNC_SINK_COLUMNS", &format!("email,{col}")),
            ]);
            let err = Config::from_parts(Some(MINIMAL), "t", &e)
                .unwrap_err()
                .to_string();
            assert!(err.contains(col), "{err}");
            let text = format!("{MINIMAL}\n[sink.mapping]\nid = \"{col}\"\n");
            let err =
                Config::from_parts(Some(&text), "sync.toml", &env(&[("HOOK_SECRET", SECRET)]))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains("sink.mapping") && err.contains(col), "{err}");
        }
    }

    #[test]
    fn example_documents_every_key_and_parses() {
        let example = include_str!("../../sync.toml.example");
        let table: toml::Table = toml::from_str(example).unwrap();
        for (section, key, _) in KEYS {
            let documented = table
                .get(*section)
                .and_then(|s| s.as_table())
                .is_some_and(|s| s.contains_key(*key))
                || example.contains(&format!("# {key} ="));
            assert!(documented, "sync.toml.example lacks {section}.{key}");
        }
        let e = env(&[("USERSYNC_WEBHOOK_SECRET", SECRET)]);
        Config::from_parts(Some(example), "sync.toml.example", &e).unwrap();
    }
}
