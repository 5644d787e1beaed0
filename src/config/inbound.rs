//! The `[inbound]` section: the receiver's own listen address and limits,
//! and the webhook sources (kind, secrets by reference, mapping of event
//! fields to columns, how users are matched, what creates and deletes do).
//! Per-source environment overrides are `USERSYNC_INBOUND_<SOURCE>_<KEY>`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{env_name, ConfigError, Env};
use crate::core::inbound::Verifier;
use crate::core::inbound_event::{Field, SourceKind};
use crate::core::table::{EXTERNAL_ID_COLUMN, SYNCED_AT_COLUMN};

/// One secret reference or several (rotation).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawInbound {
    listen: String,
    max_body_bytes: usize,
    request_timeout_ms: u64,
    batch_max: usize,
    sources: BTreeMap<String, RawSource>,
}

impl Default for RawInbound {
    fn default() -> Self {
        RawInbound {
            listen: "127.0.0.1:9188".into(),
            max_body_bytes: 256 * 1024,
            request_timeout_ms: 10_000,
            // Opt-in: on the shared benchmark machine (fsync off) batching
            // measured no faster than one transaction per event
            // (BENCHMARKS.md, scenario 10); where each commit waits for a
            // WAL flush it saves one flush per event.
            batch_max: 1,
            sources: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawSource {
    kind: String,
    secret_env: Option<OneOrMany>,
    secret_file: Option<OneOrMany>,
    id_column: Option<String>,
    email_column: Option<String>,
    match_email: bool,
    on_create: Option<String>,
    on_delete: Option<String>,
    mapping: BTreeMap<String, String>,
    /// The provider's API, for `usersync import` and `reconcile --from`.
    api_key_env: Option<String>,
    api_url: Option<String>,
    api_rate_limit_per_sec: Option<u32>,
}

/// What an event for a user not in the table does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCreate {
    Insert,
    Ignore,
}

/// What the provider deleting a user does to the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundOnDelete {
    /// Set this timestamptz column to the time of the apply.
    Soft(String),
    /// Clear the id column: the row stays, unlinked from the provider.
    Unlink,
    Delete,
    Ignore,
}

#[derive(Debug, Clone)]
pub struct InboundSource {
    /// The name under `[inbound.sources]`; the URL path is `/<name>`.
    pub name: String,
    pub kind: SourceKind,
    pub verifier: Verifier,
    /// The column holding the provider's id of the user.
    pub id_column: String,
    /// The column compared with the provider's email when `match_email`.
    pub email_column: Option<String>,
    pub match_email: bool,
    pub on_create: OnCreate,
    pub on_delete: InboundOnDelete,
    /// Column → field, in column order.
    pub mapping: Vec<(String, Field)>,
    /// The provider's list API (`api_key_env`), for import and reconcile.
    pub api: Option<SourceApi>,
}

/// Where and how fast a source's records can be listed.
#[derive(Debug, Clone)]
pub struct SourceApi {
    /// The API's base URL without the version.
    pub url: String,
    pub key: crate::config::Secret,
    /// Client-side requests per second; 0 for none.
    pub rate_limit_per_sec: u32,
}

/// The provider's API base URL and documented rate limit, where usersync
/// lists the kind: Clerk allows 1,000 requests per 10 s per instance
/// (100 for a development instance); Memberstack 25/s; Stripe 25/s in test
/// mode.
fn api_defaults(kind: SourceKind) -> (&'static str, u32) {
    match kind {
        SourceKind::Clerk => ("https://api.clerk.com", 10),
        SourceKind::Memberstack => ("https://admin.memberstack.com", 25),
        SourceKind::Stripe => ("https://api.stripe.com", 25),
        SourceKind::Standard => ("", 0),
    }
}

impl InboundSource {
    /// The replication origin that tags this source's writes.
    pub fn origin(&self, own_origin: &str) -> String {
        origin_name(own_origin, &self.name)
    }

    /// Whether this source's service is the one `sink_kind` pushes to: its
    /// writes must then never be pushed (the no-echo rule per sink).
    pub fn same_service_as(&self, sink_kind: &str) -> bool {
        self.kind.service() == Some(sink_kind)
    }
}

/// `<origin>_in_<source>`: per source, because one origin admits one
/// session and the write-back holds usersync's own.
pub fn origin_name(own_origin: &str, source: &str) -> String {
    format!("{own_origin}_in_{source}")
}

#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// At most this many deliveries of one source that arrived while its
    /// session was busy are applied in one transaction; 1 applies each in
    /// its own.
    pub batch_max: usize,
    pub sources: Vec<InboundSource>,
}

impl InboundConfig {
    pub fn source(&self, name: &str) -> Option<&InboundSource> {
        self.sources.iter().find(|s| s.name == name)
    }
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Keys a source accepts from the environment (`USERSYNC_INBOUND_<SOURCE>_<KEY>`).
const SOURCE_ENV_KEYS: &[&str] = &[
    "secret_env",
    "secret_file",
    "on_create",
    "on_delete",
    "match_email",
    "id_column",
    "email_column",
];

/// Whether `var` overrides a key of a source named in `table`.
pub(crate) fn is_source_override(var: &str, table: &toml::Table) -> bool {
    source_names(table).iter().any(|name| {
        SOURCE_ENV_KEYS
            .iter()
            .any(|k| var == env_name("inbound", &format!("{name}_{k}")))
    })
}

fn source_names(table: &toml::Table) -> Vec<String> {
    table
        .get("inbound")
        .and_then(|i| i.get("sources"))
        .and_then(|s| s.as_table())
        .map(|s| s.keys().cloned().collect())
        .unwrap_or_default()
}

/// Applies `USERSYNC_INBOUND_<SOURCE>_<KEY>` to sources named in the file.
pub(crate) fn apply_env_overrides(table: &mut toml::Table, env: &dyn Env) {
    for name in source_names(table) {
        for key in SOURCE_ENV_KEYS {
            let Some(raw) = env.get(&env_name("inbound", &format!("{name}_{key}"))) else {
                continue;
            };
            let value = match *key {
                "match_email" => toml::Value::Boolean(matches!(
                    raw.trim().to_ascii_lowercase().as_str(),
                    "true" | "1" | "yes" | "on"
                )),
                "secret_env" | "secret_file" => toml::Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_string()))
                        .collect(),
                ),
                _ => toml::Value::String(raw),
            };
            if let Some(src) = table
                .get_mut("inbound")
                .and_then(|i| i.get_mut("sources"))
                .and_then(|s| s.get_mut(&name))
                .and_then(|s| s.as_table_mut())
            {
                src.insert((*key).to_string(), value);
            }
        }
    }
}

fn read_secrets(env: &dyn Env, name: &str, raw: &RawSource) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for var in raw
        .secret_env
        .as_ref()
        .map(OneOrMany::list)
        .unwrap_or_default()
    {
        match env.get(&var) {
            Some(v) => out.push(v.trim().to_string()),
            None => {
                return Err(invalid(
                    "inbound.sources.<name>.secret_env",
                    format!("source {name}: environment variable {var} is not set (export it, or use secret_file)"),
                ))
            }
        }
    }
    for path in raw
        .secret_file
        .as_ref()
        .map(OneOrMany::list)
        .unwrap_or_default()
    {
        let path = PathBuf::from(path);
        match std::fs::read_to_string(&path) {
            Ok(s) => out.push(s.trim().to_string()),
            Err(e) => {
                return Err(invalid(
                    "inbound.sources.<name>.secret_file",
                    format!("source {name}: cannot read {}: {e}", path.display()),
                ))
            }
        }
    }
    Ok(out)
}

impl RawInbound {
    pub(crate) fn validate(
        &self,
        env: &dyn Env,
        sink_kind: &str,
        metrics_listen: &str,
    ) -> Result<Option<InboundConfig>, ConfigError> {
        if self.sources.is_empty() {
            return Ok(None);
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "inbound.listen",
                format!(
                    "{:?} is not host:port (e.g. \"127.0.0.1:9188\")",
                    self.listen
                ),
            ));
        }
        if !metrics_listen.is_empty() && self.listen == metrics_listen {
            return Err(invalid(
                "inbound.listen",
                "must differ from metrics.listen: the receiver has its own port".into(),
            ));
        }
        if self.max_body_bytes == 0 || self.request_timeout_ms == 0 {
            return Err(invalid(
                "inbound.max_body_bytes",
                "max_body_bytes and request_timeout_ms must be at least 1".into(),
            ));
        }
        if !(1..=1000).contains(&self.batch_max) {
            return Err(invalid(
                "inbound.batch_max",
                format!("{} is not between 1 and 1000", self.batch_max),
            ));
        }
        let mut sources = Vec::new();
        for (name, raw) in &self.sources {
            sources.push(validate_source(env, name, raw, sink_kind)?);
        }
        Ok(Some(InboundConfig {
            listen: self.listen.clone(),
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            batch_max: self.batch_max,
            sources,
        }))
    }
}

fn validate_source(
    env: &dyn Env,
    name: &str,
    raw: &RawSource,
    sink_kind: &str,
) -> Result<InboundSource, ConfigError> {
    // The name is part of a URL path and of an origin name (63 bytes).
    if !valid_ident(name) || name.len() > 30 {
        return Err(invalid(
            "inbound.sources",
            format!("source name {name:?} must be 1-30 characters of lower-case letters, digits and '_'"),
        ));
    }
    let kind = SourceKind::parse(&raw.kind).ok_or_else(|| {
        invalid(
            "inbound.sources.<name>.kind",
            format!(
                "source {name}: unknown kind {:?}; use \"clerk\", \"memberstack\", \"stripe\" or \"standard\"",
                raw.kind
            ),
        )
    })?;
    let secrets = read_secrets(env, name, raw)?;
    if secrets.is_empty() {
        return Err(invalid(
            "inbound.sources.<name>.secret_env",
            format!("source {name}: no signing secret; set secret_env (or secret_file) to the provider's whsec_ secret, several for a rotation"),
        ));
    }
    let verifier = Verifier::new(kind.scheme(), &secrets).map_err(|e| {
        invalid(
            "inbound.sources.<name>.secret_env",
            format!("source {name}: {e}"),
        )
    })?;
    let id_column = raw
        .id_column
        .clone()
        .unwrap_or_else(|| EXTERNAL_ID_COLUMN.to_string());
    if !valid_ident(&id_column) {
        return Err(invalid(
            "inbound.sources.<name>.id_column",
            format!("source {name}: {id_column:?} is not a plain column name"),
        ));
    }
    // external_user_id holds the sink's id; a source of another service
    // needs a column of its own or the two ids would overwrite each other.
    if id_column == EXTERNAL_ID_COLUMN && kind.service() != Some(sink_kind) {
        return Err(invalid(
            "inbound.sources.<name>.id_column",
            format!(
                "source {name} ({}) is not the service the sink pushes to ({sink_kind}), so its ids cannot share {EXTERNAL_ID_COLUMN} with the sink's: set id_column to a text column of its own (e.g. \"{}_id\")",
                kind.name(),
                kind.name()
            ),
        ));
    }
    let mut mapping = Vec::new();
    for (column, field) in &raw.mapping {
        if !valid_ident(column) || column == SYNCED_AT_COLUMN || *column == id_column {
            return Err(invalid(
                "inbound.sources.<name>.mapping",
                format!("source {name}: {column:?} cannot be mapped (a plain column name other than {SYNCED_AT_COLUMN} and the id column)"),
            ));
        }
        let f = Field::parse(field).ok_or_else(|| {
            invalid(
                "inbound.sources.<name>.mapping",
                format!("source {name}, column {column}: {field:?} is neither a JSON pointer (\"/first_name\"), another object's pointer (\"subscription:/status\") nor a built-in (\"primary_email\", \"auth_email\")"),
            )
        })?;
        if let Some(stream) = f.stream() {
            if !kind.object_streams().contains(&stream) {
                let known = kind.object_streams();
                return Err(invalid(
                    "inbound.sources.<name>.mapping",
                    format!(
                        "source {name}, column {column}: {} events carry no {stream:?} object; {}",
                        kind.name(),
                        if known.is_empty() {
                            "map the user object's fields with a plain pointer".to_string()
                        } else {
                            format!("the prefixes it knows: {}", known.join(", "))
                        }
                    ),
                ));
            }
        }
        mapping.push((column.clone(), f));
    }
    let email_column = match &raw.email_column {
        Some(c) => Some(c.clone()),
        None => raw
            .mapping
            .iter()
            .find(|(_, f)| matches!(f.as_str(), "primary_email" | "auth_email" | "/email"))
            .map(|(c, _)| c.clone()),
    };
    if raw.match_email && email_column.is_none() {
        return Err(invalid(
            "inbound.sources.<name>.match_email",
            format!(
                "source {name}: match_email needs email_column (or an email field in the mapping)"
            ),
        ));
    }
    let on_create = match raw.on_create.as_deref().unwrap_or("insert") {
        "insert" => OnCreate::Insert,
        "ignore" => OnCreate::Ignore,
        other => {
            return Err(invalid(
                "inbound.sources.<name>.on_create",
                format!("source {name}: {other:?}; use \"insert\" or \"ignore\""),
            ))
        }
    };
    let on_delete = parse_on_delete(raw.on_delete.as_deref().unwrap_or("soft(deleted_at)"))
        .ok_or_else(|| {
            invalid(
                "inbound.sources.<name>.on_delete",
                format!(
                    "source {name}: {:?}; use \"soft(<timestamptz column>)\", \"unlink\", \"delete\" or \"ignore\"",
                    raw.on_delete.as_deref().unwrap_or_default()
                ),
            )
        })?;
    let api = match &raw.api_key_env {
        None => None,
        Some(var) => {
            let key = env.get(var).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).ok_or_else(|| {
                invalid(
                    "inbound.sources.<name>.api_key_env",
                    format!("source {name}: environment variable {var} is not set (the provider's API key, for import and reconcile)"),
                )
            })?;
            let (url, rate) = api_defaults(kind);
            let url = raw.api_url.clone().unwrap_or_else(|| url.to_string());
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(
                    "inbound.sources.<name>.api_url",
                    format!("source {name}: api_url {url:?} is not an http(s) URL"),
                ));
            }
            Some(SourceApi {
                url,
                key: crate::config::Secret::new(key),
                rate_limit_per_sec: raw.api_rate_limit_per_sec.unwrap_or(rate),
            })
        }
    };
    Ok(InboundSource {
        api,
        name: name.to_string(),
        kind,
        verifier,
        id_column,
        email_column,
        match_email: raw.match_email,
        on_create,
        on_delete,
        mapping,
    })
}

fn parse_on_delete(s: &str) -> Option<InboundOnDelete> {
    match s.trim() {
        "unlink" => Some(InboundOnDelete::Unlink),
        "delete" => Some(InboundOnDelete::Delete),
        "ignore" => Some(InboundOnDelete::Ignore),
        other => {
            let column = other.strip_prefix("soft(")?.strip_suffix(')')?.trim();
            valid_ident(column).then(|| InboundOnDelete::Soft(column.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_delete_forms() {
        assert_eq!(
            parse_on_delete("soft(deleted_at)"),
            Some(InboundOnDelete::Soft("deleted_at".into()))
        );
        assert_eq!(parse_on_delete("unlink"), Some(InboundOnDelete::Unlink));
        assert_eq!(parse_on_delete("soft()"), None);
        assert_eq!(parse_on_delete("soft(x; drop)"), None);
        assert_eq!(parse_on_delete("purge"), None);
    }
}
