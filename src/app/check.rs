//! `usersync check`: diagnoses every setup mistake at once, one line per
//! check (what is wrong, why it matters, the command or SQL that fixes it).
//! Unlike the preflight of `run` (src/schema.rs), it keeps going after the
//! first problem; it calls the same per-check functions so both agree.

use std::path::Path;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{self, quote_ident, Config, DatabaseConfig, Env};
use crate::core::table::TableShape;
use crate::core::table::EXTERNAL_ID_COLUMN;
use crate::core::table::SYNCED_AT_COLUMN;
use crate::store::catalog;
use crate::store::db::error_text;
use crate::store::schema::{self, SchemaError};
use crate::store::status::{self, SlotInfo};

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works now, but will hurt (retained WAL, slot held by another process).
    Warn,
    Fail,
    /// Could not be checked because an earlier check failed.
    Skipped,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
            Level::Skipped => "skip",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable name, e.g. `wal_level`, `privilege.replication`.
    pub check: &'static str,
    pub level: Level,
    /// What is wrong and why it matters (or what was found, when ok).
    pub message: String,
    /// The exact command or SQL that fixes it, when one exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, message: impl Into<String>) -> Self {
        Finding {
            check,
            level: Level::Ok,
            message: message.into(),
            fix: None,
        }
    }
    fn fail(check: &'static str, message: impl Into<String>, fix: Option<String>) -> Self {
        Finding {
            check,
            level: Level::Fail,
            message: message.into(),
            fix,
        }
    }
    fn warn(check: &'static str, message: impl Into<String>, fix: Option<String>) -> Self {
        Finding {
            check,
            level: Level::Warn,
            message: message.into(),
            fix,
        }
    }
    fn skipped(check: &'static str, message: impl Into<String>) -> Self {
        Finding {
            check,
            level: Level::Skipped,
            message: message.into(),
            fix: None,
        }
    }
    fn from_schema(check: &'static str, e: SchemaError) -> Self {
        let fix = match &e {
            SchemaError::WalLevel(_) => {
                Some("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".to_string())
            }
            SchemaError::SlotInvalidated { .. } => Some(
                "usersync recover --dry-run (what it would push), then usersync recover".to_string(),
            ),
            SchemaError::SlotMissing(_) => Some(
                "first install: usersync setup; after a failover or a dropped slot: usersync recover"
                    .to_string(),
            ),
            _ => None,
        };
        Finding::fail(check, e.to_string(), fix)
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when every check is ok (warnings count as not ok).
    pub ok: bool,
    pub checks: Vec<Finding>,
}

impl Report {
    fn new(checks: Vec<Finding>) -> Self {
        Report {
            ok: checks
                .iter()
                .all(|f| matches!(f.level, Level::Ok | Level::Skipped)),
            checks,
        }
    }

    /// The server is too old: a setup problem no command of ours can fix
    /// (exit code 2, like `run`).
    pub fn unsupported_server(&self) -> bool {
        self.checks
            .iter()
            .any(|f| f.check == "server_version" && f.level == Level::Fail)
    }

    /// One line per check, for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.checks {
            out.push_str(&format!("[{}] {}: {}", f.level.label(), f.check, f.message));
            if let Some(fix) = &f.fix {
                out.push_str(" -- fix: ");
                out.push_str(fix);
            }
            out.push('\n');
        }
        let bad = self
            .checks
            .iter()
            .filter(|f| matches!(f.level, Level::Fail | Level::Warn))
            .count();
        if bad == 0 {
            out.push_str("all checks passed\n");
        } else {
            out.push_str(&format!(
                "{bad} problem{} found\n",
                if bad == 1 { "" } else { "s" }
            ));
        }
        out
    }
}

/// Runs every check it can. Config errors are findings, not failures: a
/// missing secret still lets the database be checked.
/// The metrics endpoint bound beyond loopback serves /metrics to whoever can
/// reach the host: worth a warning, not a failure (a container needs it).
fn metrics_listen(listen: &str) -> Option<Finding> {
    let addr: std::net::SocketAddr = listen.parse().ok()?;
    Some(if addr.ip().is_loopback() {
        Finding::ok(
            "metrics_listen",
            format!("metrics on {addr} (loopback only)"),
        )
    } else {
        Finding::warn(
            "metrics_listen",
            format!("metrics.listen = {addr} is reachable beyond this host: /metrics, /healthz and /readyz are served to the network"),
            Some("set metrics.listen = \"127.0.0.1:9187\" unless a firewall or network policy guards the port".to_string()),
        )
    })
}

pub async fn run(path: &Path, explicit: bool, env: &dyn Env) -> Report {
    let mut out = Vec::new();
    let full = Config::load(path, explicit, env);
    let db = match &full {
        Ok(cfg) => {
            out.push(Finding::ok(
                "config",
                format!("{} is valid", path.display()),
            ));
            Some(cfg.database.clone())
        }
        Err(e) => {
            out.push(Finding::fail(
                "config",
                format!("{e}; usersync cannot start until it is fixed"),
                None,
            ));
            // The [database] part is read first, so its error (if any) is the one above.
            config::load_database(path, explicit, env, true).ok()
        }
    };
    match &db {
        Some(db) => {
            let sink_columns = full
                .as_ref()
                .map(|c| c.sink.columns.clone())
                .unwrap_or_default();
            let inbound = full.as_ref().ok().and_then(|c| {
                c.inbound
                    .as_ref()
                    .map(|i| crate::store::role::InboundWrites::of(i, &c.database.origin))
            });
            let lookups: Vec<Lookup> = full
                .as_ref()
                .ok()
                .and_then(|c| c.inbound.as_ref())
                .map(|i| i.sources.iter().map(Lookup::of).collect())
                .unwrap_or_default();
            database_checks(db, &sink_columns, inbound.as_ref(), &lookups, &mut out).await
        }
        None => out.push(Finding::skipped(
            "database",
            "not checked: the [database] configuration has an error (above)",
        )),
    }
    if let Ok(cfg) = &full {
        out.extend(metrics_listen(&cfg.metrics.listen));
    }
    match &full {
        Ok(cfg) => out.push(sink_check(cfg).await),
        Err(_) => out.push(Finding::skipped(
            "sink",
            "not checked: the configuration has an error (above)",
        )),
    }
    Report::new(out)
}

async fn database_checks(
    db: &DatabaseConfig,
    sink_columns: &[String],
    inbound: Option<&crate::store::role::InboundWrites>,
    lookups: &[Lookup],
    out: &mut Vec<Finding>,
) {
    let client = match crate::store::db::connect(db, "usersync-check").await {
        Ok(c) => {
            out.push(Finding::ok(
                "connect",
                format!("connected to {}", db.describe()),
            ));
            c
        }
        Err(e) => {
            out.push(Finding::fail("connect", e.to_string(), None));
            out.push(Finding::skipped(
                "database",
                "the remaining database checks need a connection",
            ));
            return;
        }
    };
    out.push(match schema::check_server_version(&client).await {
        Ok(version) => Finding::ok("server_version", format!("PostgreSQL {version}")),
        Err(e) => Finding::from_schema("server_version", e),
    });
    out.push(match schema::check_wal_level(&client).await {
        Ok(()) => Finding::ok("wal_level", "wal_level = logical"),
        Err(e) => Finding::from_schema("wal_level", e),
    });
    let slot = match status::slot_info(&client, &db.slot).await {
        Ok(s) => s,
        Err(e) => {
            out.push(Finding::fail(
                "slot",
                format!("cannot read pg_replication_slots: {e}"),
                None,
            ));
            None
        }
    };
    out.extend(capacity(&client, slot.as_ref()).await);
    let shape = match schema::inspect_table(&client, &db.table).await {
        Ok(shape) => {
            out.push(Finding::ok(
                "table",
                format!(
                    "{} has primary key {} ({})",
                    shape.table, shape.key_column, shape.key_type
                ),
            ));
            Some(shape)
        }
        Err(e) => {
            out.push(Finding::from_schema("table", e));
            None
        }
    };
    match &shape {
        Some(shape) => {
            let problems = schema::sync_column_problems(shape);
            if problems.is_empty() {
                out.push(Finding::ok(
                    "columns",
                    format!("{EXTERNAL_ID_COLUMN} and {SYNCED_AT_COLUMN} exist"),
                ));
            }
            out.extend(
                problems
                    .into_iter()
                    .map(|e| Finding::from_schema("columns", e)),
            );
            // `run` refuses these too; a column that does not exist is never synced.
            for column in sink_columns.iter().filter(|c| !shape.has_column(c)) {
                out.push(Finding::fail(
                    "sink_columns",
                    format!(
                        "sink.columns or [sink.mapping] names column {column}, which {} does not have; usersync refuses to start",
                        shape.table
                    ),
                    Some(format!(
                        "remove {column} from sink.columns / [sink.mapping], or add the column to {}",
                        shape.table
                    )),
                ));
            }
            match catalog::unstreamed_generated_columns(
                &client,
                &shape.table.quoted(),
                &db.publication,
            )
            .await
            {
                Ok(cols) if !cols.is_empty() => {
                    let named: Vec<&String> =
                        cols.iter().filter(|c| sink_columns.contains(c)).collect();
                    let what = format!(
                        "generated column(s) {} of {} are not in the replication stream, so pushes list them in `omitted` instead of sending them (PostgreSQL 18 streams stored generated columns once `usersync setup` set publish_generated_columns = stored; virtual ones never)",
                        cols.join(", "),
                        shape.table
                    );
                    out.push(if named.is_empty() {
                        Finding::ok("generated_columns", what)
                    } else {
                        Finding::warn(
                            "generated_columns",
                            what,
                            Some(
                                "on PostgreSQL 18 run `usersync setup`; before 18 remove them from sink.columns / [sink.mapping]"
                                    .to_string(),
                            ),
                        )
                    });
                }
                Ok(_) => {}
                Err(e) => out.push(Finding::fail(
                    "generated_columns",
                    format!(
                        "cannot read the table's generated columns: {}",
                        error_text(&e)
                    ),
                    None,
                )),
            }
            out.push(match schema::check_replica_identity(shape) {
                Ok(()) => Finding::ok("replica_identity", "REPLICA IDENTITY FULL"),
                Err(e) => Finding::from_schema("replica_identity", e),
            });
        }
        None => out.push(Finding::skipped(
            "columns",
            "the sync columns and replica identity need the table (above)",
        )),
    }
    out.push(match schema::check_publication(&client, db).await {
        Ok(()) => Finding::ok(
            "publication",
            format!("publication {} includes {}", db.publication, db.table),
        ),
        Err(e) => Finding::from_schema("publication", e),
    });
    out.push(match schema::check_slot(&client, db).await {
        Ok(()) => Finding::ok("slot", format!("logical slot {} (pgoutput)", db.slot)),
        Err(e) => Finding::from_schema("slot", e),
    });
    if let Some(slot) = &slot {
        out.extend(slot_health(db, slot));
    }
    out.push(failover(&client, db, slot.as_ref()).await);
    out.push(match schema::check_origin(&client, db).await {
        Ok(()) => Finding::ok("origin", format!("replication origin {}", db.origin)),
        Err(e) => Finding::from_schema("origin", e),
    });
    out.push(match schema::check_own_tables(&client).await {
        Ok(()) => Finding::ok("usersync_tables", "usersync's tables exist"),
        Err(e) => Finding::from_schema("usersync_tables", e),
    });
    match privileges(&client, db, shape.as_ref()).await {
        Ok(found) => out.extend(found),
        Err(e) => out.push(Finding::fail(
            "privileges",
            format!("cannot check privileges: {}", error_text(&e)),
            None,
        )),
    }
    if let (Some(writes), Some(_)) = (inbound, shape.as_ref()) {
        match inbound_checks(&client, db, writes).await {
            Ok(found) => out.extend(found),
            Err(e) => out.push(Finding::fail(
                "inbound",
                format!("cannot check the inbound privileges: {}", error_text(&e)),
                None,
            )),
        }
    }
    if let Some(shape) = &shape {
        out.extend(lookup_checks(&client, shape, lookups).await);
    }
}

/// From about this many rows, a look-up without an index costs enough per
/// webhook and per imported record to warn about.
const LOOKUP_WARN_ROWS: i64 = 10_000;

/// The look-ups an inbound source makes per event and per imported record
/// (`store::inbound::Applier::find`, `store::import::candidates`): by its
/// id column, and with `match_email` by `lower(email)`.
pub struct Lookup {
    source: String,
    id_column: String,
    email_column: Option<String>,
}

impl Lookup {
    fn of(s: &crate::config::inbound::InboundSource) -> Lookup {
        Lookup {
            source: s.name.clone(),
            id_column: s.id_column.clone(),
            email_column: s.email_column.clone().filter(|_| s.match_email),
        }
    }
}

/// Whether an index serves each look-up. usersync does not create these
/// indexes: the users table is the app's, and `setup` adds only the two
/// sync columns to it (DESIGN.md, "Import and pull"). Without one, each
/// look-up scans the table, which is fine for a small table and costs a
/// scan per webhook and per imported record on a large one: warn from
/// [`LOOKUP_WARN_ROWS`] rows, else say it and give the statement.
async fn lookup_checks(client: &Client, shape: &TableShape, lookups: &[Lookup]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for l in lookups {
        let mut wanted = vec![(
            "inbound.id_index",
            l.id_column.as_str(),
            format!("u.{}", quote_ident(&l.id_column)),
            format!("({})", quote_ident(&l.id_column)),
            format!("by {}", l.id_column),
        )];
        if let Some(c) = &l.email_column {
            wanted.push((
                "inbound.email_index",
                c.as_str(),
                format!("lower(u.{}::text)", quote_ident(c)),
                format!("(lower(({})::text))", quote_ident(c)),
                format!("by lower({c}) (match_email)"),
            ));
        }
        for (check, column, expr, index_expr, what) in wanted {
            // A missing column is reported by the inbound checks above.
            if !shape.has_column(column) || !seen.insert(expr.clone()) {
                continue;
            }
            let fix = format!(
                "CREATE INDEX CONCURRENTLY ON {} {index_expr};",
                shape.table.quoted()
            );
            out.push(match schema::lookup_index(client, &shape.table, &expr).await {
                Ok(found) if found.indexed => Finding::ok(
                    check,
                    format!("source {}: matching {what} uses an index", l.source),
                ),
                Ok(found) => {
                    let message = format!(
                        "source {}: matching {what} has no index, so each webhook and each imported record scans {} (about {} rows)",
                        l.source, shape.table, found.rows
                    );
                    if found.rows >= LOOKUP_WARN_ROWS {
                        Finding::warn(check, message, Some(fix))
                    } else {
                        Finding {
                            check,
                            level: Level::Ok,
                            message: format!("{message}; fine at this size, create it before the table grows"),
                            fix: Some(fix),
                        }
                    }
                }
                Err(e) => Finding::warn(
                    check,
                    format!("source {}: cannot tell whether matching {what} has an index: {}", l.source, error_text(&e)),
                    None,
                ),
            });
        }
    }
    out
}

/// A slot (if none exists yet) and a WAL sender must be free.
async fn capacity(client: &Client, slot: Option<&SlotInfo>) -> Vec<Finding> {
    let row = match catalog::replication_capacity(client).await {
        Ok(r) => r,
        Err(e) => {
            return vec![Finding::fail(
                "replication_capacity",
                format!("cannot read replication settings: {}", error_text(&e)),
                None,
            )]
        }
    };
    let catalog::Capacity {
        max_slots,
        slots,
        max_senders,
        senders,
    } = row;
    let mut out = Vec::new();
    if slot.is_none() && slots >= max_slots {
        out.push(Finding::fail(
            "replication_slots",
            format!("all {max_slots} replication slots are in use, so usersync's slot cannot be created"),
            Some(format!(
                "ALTER SYSTEM SET max_replication_slots = {}; then restart PostgreSQL (or drop an unused slot with SELECT pg_drop_replication_slot('name'))",
                max_slots + 1
            )),
        ));
    } else {
        out.push(Finding::ok(
            "replication_slots",
            format!("{slots} of {max_slots} replication slots used"),
        ));
    }
    // A running usersync already holds its sender; only a new one needs a free one.
    let ours_running = slot.is_some_and(|s| s.active);
    if !ours_running && senders >= max_senders {
        out.push(Finding::fail(
            "wal_senders",
            format!("all {max_senders} WAL senders are busy, so usersync cannot open its replication connection"),
            Some(format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart PostgreSQL",
                max_senders + 1
            )),
        ));
    } else {
        out.push(Finding::ok(
            "wal_senders",
            format!("{senders} of {max_senders} WAL senders busy"),
        ));
    }
    out
}

/// The slot is free for this daemon and does not hold back too much WAL.
fn slot_health(db: &DatabaseConfig, slot: &SlotInfo) -> Vec<Finding> {
    let mut out = Vec::new();
    if let (Some(pid), Some("usersync")) = (slot.active_pid, slot.application_name.as_deref()) {
        // The daemon's own replication connection: the normal, healthy state
        // while `check` runs beside it.
        out.push(Finding::ok(
            "slot_active",
            format!(
                "slot {} is streamed by a running usersync (server process {pid}); a second usersync on this slot would wait as a standby",
                db.slot
            ),
        ));
    } else if let Some(pid) = slot.active_pid {
        out.push(Finding::warn(
            "slot_active",
            format!(
                "slot {} is being streamed by server process {pid} (application {}); a second usersync on this slot fails to start",
                db.slot,
                slot.application_name.as_deref().unwrap_or("unknown")
            ),
            Some(format!(
                "stop the other consumer, or, if it is stale: SELECT pg_terminate_backend({pid});"
            )),
        ));
    }
    if slot.invalidated().is_some() {
        // The `slot` finding above says why and what to run; its retained
        // WAL means nothing any more.
    } else if let Some(bytes) = slot.retained_bytes {
        let limit =
            i64::try_from(db.max_retained_wal_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
        if bytes > limit {
            out.push(Finding::warn(
                "retained_wal",
                format!(
                    "slot {} retains {} MiB of WAL (limit database.max_retained_wal_mb = {}); PostgreSQL keeps it until usersync confirms, so the disk fills while the daemon is stopped or behind",
                    db.slot,
                    bytes / (1024 * 1024),
                    db.max_retained_wal_mb
                ),
                Some("start `usersync run` (or look at `usersync status`); if the slot is abandoned: usersync teardown --yes".to_string()),
            ));
        } else {
            out.push(Finding::ok(
                "retained_wal",
                format!("slot retains {} MiB of WAL", bytes / (1024 * 1024)),
            ));
        }
    }
    out
}

/// Whether the slot survives a failover to a standby: synchronized on
/// PostgreSQL 17+ (`failover = true` on the primary's slot, `synced` on the
/// standby's copy, `synchronized_standby_slots` so usersync never gets ahead
/// of the standby), lost before 17, where `usersync recover` rebuilds it.
async fn failover(client: &Client, db: &DatabaseConfig, slot: Option<&SlotInfo>) -> Finding {
    const CHECK: &str = "failover";
    let topology = match catalog::standby_topology(client).await {
        Ok(t) => t,
        Err(e) => {
            return Finding::fail(
                CHECK,
                format!("cannot read the replication settings: {}", error_text(&e)),
                None,
            )
        }
    };
    let Some(slot) = slot else {
        return Finding::skipped(CHECK, "needs the slot (above)");
    };
    let name = &db.slot;
    if slot.in_recovery {
        return match slot.synced {
            Some(true) => Finding::ok(
                CHECK,
                format!("this server is a standby holding a synchronized copy of slot {name}: once promoted, usersync continues from it"),
            ),
            _ => Finding::warn(
                CHECK,
                format!("this server is a standby and its slot {name} is not synchronized from the primary: usersync cannot stream here until promotion, and then the slot's position is not the primary's"),
                Some("connect usersync to the primary (a multi-host database.url with target_session_attrs=read-write picks it); on PostgreSQL 17+ set on this standby sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name and a dbname in primary_conninfo".to_string()),
            ),
        };
    }
    let standby = if topology.physical_senders > 0 {
        format!(
            "{} physical standby(s) stream from this server",
            topology.physical_senders
        )
    } else {
        "no physical standby streams from this server now".to_string()
    };
    if slot.server_version_num < 170_000 {
        let message = format!("PostgreSQL before 17 cannot synchronize logical slots to a standby ({standby}): after a failover the promoted server has no slot {name}, and `usersync run` stops saying so");
        let fix = "after a failover run `usersync recover` on the new primary: it creates the slot and pushes every row changed or deleted meanwhile; or upgrade to 17+ for failover slots".to_string();
        return if topology.physical_senders > 0 {
            Finding::warn(CHECK, message, Some(fix))
        } else {
            Finding::ok(CHECK, format!("{message}; {fix}"))
        };
    }
    if slot.failover != Some(true) {
        let message = format!("slot {name} was created without failover = true, so no standby synchronizes it ({standby}): a failover loses it");
        let fix = format!(
            "psql \"{} replication=database\" -c 'ALTER_REPLICATION_SLOT {} (FAILOVER true)' while usersync is stopped (or `usersync recover` recreates it with failover after a loss)",
            "dbname=<your database>",
            quote_ident(name)
        );
        return if topology.physical_senders > 0 {
            Finding::warn(CHECK, message, Some(fix))
        } else {
            Finding::ok(CHECK, format!("{message}; {fix}"))
        };
    }
    if topology.synchronized_standby_slots.is_empty() {
        let message = format!("slot {name} has failover = true, but synchronized_standby_slots is empty ({standby}): usersync may receive changes a standby has not, and after a failover the standby's copy of the slot may lag or be unusable");
        let fix = "on the primary: ALTER SYSTEM SET synchronized_standby_slots = '<the standby's physical slot>'; SELECT pg_reload_conf(); on the standby: sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name, and a dbname in primary_conninfo".to_string();
        return if topology.physical_senders > 0 {
            Finding::warn(CHECK, message, Some(fix))
        } else {
            Finding::ok(CHECK, format!("{message}; when a standby is added: {fix}"))
        };
    }
    Finding::ok(
        CHECK,
        format!(
            "slot {name} has failover = true and waits for the standby slot(s) {} (synchronized_standby_slots); {standby}. A standby with sync_replication_slots = on keeps a synchronized copy: check `synced` in pg_replication_slots there",
            topology.synchronized_standby_slots
        ),
    )
}

/// Every privilege the daemon uses, checked for the role it connects as.
async fn privileges(
    client: &Client,
    db: &DatabaseConfig,
    shape: Option<&TableShape>,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut out = Vec::new();
    let catalog::CurrentRole {
        name: user,
        superuser,
        replication,
    } = catalog::current_role(client).await?;
    let role = quote_ident(&user);
    if superuser {
        // Works, so not a failure; the hint points at the least-privilege role.
        out.push(Finding::ok(
            "privileges",
            format!("role {user} is a superuser (consider `usersync setup --role usersync` and connecting as that least-privilege role)"),
        ));
        return Ok(out);
    }
    out.push(if replication {
        Finding::ok(
            "privilege.replication",
            format!("role {user} has REPLICATION"),
        )
    } else {
        Finding::fail(
            "privilege.replication",
            format!("role {user} lacks REPLICATION, so it cannot stream the slot"),
            Some(format!("ALTER ROLE {role} REPLICATION;")),
        )
    });
    let table = db.table.quoted();
    // A missing schema is the table check's finding, not a privilege one.
    let schema_ok = catalog::schema_usage(client, &db.table.schema).await?;
    if schema_ok == Some(false) {
        out.push(Finding::fail(
            "privilege.table_schema",
            format!(
                "role {user} lacks USAGE on schema {}, so it cannot reach the users table",
                db.table.schema
            ),
            Some(format!(
                "GRANT USAGE ON SCHEMA {} TO {role};",
                quote_ident(&db.table.schema)
            )),
        ));
    }
    if shape.is_some() {
        let select = catalog::can_select(client, &table).await?;
        out.push(if select {
            Finding::ok(
                "privilege.select",
                format!("role {user} may read {}", db.table),
            )
        } else {
            Finding::fail(
                "privilege.select",
                format!(
                    "role {user} lacks SELECT on {}, so replays and backfills cannot read rows",
                    db.table
                ),
                Some(format!("GRANT SELECT ON {table} TO {role};")),
            )
        });
    }
    if let Some(shape) = shape {
        let mut missing = Vec::new();
        for column in [EXTERNAL_ID_COLUMN, SYNCED_AT_COLUMN] {
            if !shape.has_column(column) {
                continue;
            }
            let ok = catalog::can_update_column(client, &table, column).await?;
            if !ok {
                missing.push(column);
            }
        }
        out.push(if missing.is_empty() {
            Finding::ok(
                "privilege.update",
                format!("role {user} may update the sync columns"),
            )
        } else {
            Finding::fail(
                "privilege.update",
                format!(
                    "role {user} lacks UPDATE on {}.({}), so results cannot be written back",
                    db.table,
                    missing.join(", ")
                ),
                Some(format!(
                    "GRANT UPDATE ({EXTERNAL_ID_COLUMN}, {SYNCED_AT_COLUMN}) ON {table} TO {role};"
                )),
            )
        });
    }
    let usersync_schema = catalog::schema_usage(client, "usersync").await?;
    match usersync_schema {
        // A missing schema is reported by the usersync_tables check.
        None => {}
        Some(false) => out.push(Finding::fail(
            "privilege.usersync_schema",
            format!("role {user} lacks USAGE on schema usersync, so dead letters and progress cannot be recorded"),
            Some(format!(
                "GRANT USAGE ON SCHEMA usersync TO {role}; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA usersync TO {role}; GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA usersync TO {role};"
            )),
        )),
        Some(true) => {
            let lacking = catalog::usersync_tables_not_writable(client).await?;
            out.push(if lacking.is_empty() {
                Finding::ok(
                    "privilege.usersync_schema",
                    format!("role {user} may use schema usersync and write its tables"),
                )
            } else {
                Finding::fail(
                    "privilege.usersync_schema",
                    format!(
                        "role {user} may not write usersync.{}, so dead letters and progress cannot be recorded",
                        lacking.join(", usersync.")
                    ),
                    Some(format!(
                        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA usersync TO {role}; GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA usersync TO {role};"
                    )),
                )
            });
        }
    }
    let mut missing = Vec::new();
    for f in crate::store::role::ORIGIN_FUNCTIONS {
        let ok = catalog::can_execute(client, f).await?;
        if !ok {
            missing.push(*f);
        }
    }
    out.push(if missing.is_empty() {
        Finding::ok(
            "privilege.origin",
            format!("role {user} may use the replication origin functions"),
        )
    } else {
        Finding::fail(
            "privilege.origin",
            format!(
                "role {user} may not call {}, so write-backs cannot be tagged and would be pushed again",
                missing.join(", ")
            ),
            Some(
                missing
                    .iter()
                    .map(|f| format!("GRANT EXECUTE ON FUNCTION {f} TO {role};"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        )
    });
    Ok(out)
}

/// What the inbound sources write: the privileges for it (INSERT and
/// UPDATE of the written columns, DELETE for `on_delete = "delete"`), and
/// NOT NULL columns an inbound insert would leave empty.
async fn inbound_checks(
    client: &Client,
    db: &DatabaseConfig,
    writes: &crate::store::role::InboundWrites,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut out = Vec::new();
    let table = db.table.quoted();
    let user = catalog::current_role(client).await?.name;
    let role = quote_ident(&user);
    let columns: Vec<&String> = writes.columns.iter().collect();
    let mut wanted: Vec<(&str, bool)> = vec![("UPDATE", true), ("INSERT", writes.insert)];
    wanted.retain(|(_, needed)| *needed);
    for (privilege, _) in wanted {
        let mut missing = Vec::new();
        for column in &columns {
            if !catalog::has_column_privilege(client, &table, column, privilege).await? {
                missing.push(column.as_str());
            }
        }
        let name = if privilege == "INSERT" {
            "privilege.inbound_insert"
        } else {
            "privilege.inbound_update"
        };
        out.push(if missing.is_empty() {
            Finding::ok(
                name,
                format!("role {user} may {privilege} the columns inbound webhooks write"),
            )
        } else {
            Finding::fail(
                name,
                format!(
                    "role {user} lacks {privilege} on {}.({}), so inbound webhooks cannot be applied (they are answered 503 and retried by the provider)",
                    db.table,
                    missing.join(", ")
                ),
                Some(format!(
                    "GRANT {privilege} ({}) ON {table} TO {role}; (or `usersync setup --role {user}` with this configuration)",
                    writes.column_list()
                )),
            )
        });
    }
    if writes.delete {
        let ok = catalog::has_table_privilege(client, &table, "DELETE").await?;
        out.push(if ok {
            Finding::ok(
                "privilege.inbound_delete",
                format!("role {user} may delete users (on_delete = \"delete\")"),
            )
        } else {
            Finding::fail(
                "privilege.inbound_delete",
                format!(
                    "role {user} lacks DELETE on {}, which on_delete = \"delete\" needs",
                    db.table
                ),
                Some(format!("GRANT DELETE ON {table} TO {role};")),
            )
        });
    }
    if writes.insert {
        let unfilled: Vec<String> = catalog::required_columns(client, &table)
            .await?
            .into_iter()
            .filter(|c| !writes.insert_columns.contains(c))
            .collect();
        out.push(if unfilled.is_empty() {
            Finding::ok(
                "inbound.insert_columns",
                "every NOT NULL column of a user created by a webhook is mapped or has a default",
            )
        } else {
            Finding::warn(
                "inbound.insert_columns",
                format!(
                    "{} ({}) NOT NULL without a default or a mapping: users created by inbound webhooks (on_create = \"insert\") will fail and become inbound dead letters",
                    db.table,
                    unfilled.join(", ")
                ),
                Some("map the column in [inbound.sources.<name>.mapping], give it a DEFAULT, or set on_create = \"ignore\"".to_string()),
            )
        });
    }
    Ok(out)
}

/// Reachability and credentials of the sink, probed without creating anything.
async fn sink_check(cfg: &Config) -> Finding {
    let sink = match crate::sink::build(&cfg.sink) {
        Ok(s) => s,
        Err(e) => return Finding::fail("sink", e, None),
    };
    match sink.check().await {
        Err(e) if matches!(e.status(), Some(401 | 403)) => {
            return Finding::fail(
                "sink",
                format!(
                    "the {} API rejected the API key from {} ({}), so every push would fail",
                    sink.name(),
                    cfg.sink.api_key_source,
                    e.summary()
                ),
                Some(format!(
                    "put a valid {} secret key into {}",
                    sink.name(),
                    cfg.sink.api_key_source
                )),
            )
        }
        Err(e) => {
            return Finding::fail(
                "sink",
                format!(
                    "the {} service at {} is not reachable ({}); changes would wait and retry, then be dead-lettered",
                    sink.name(),
                    cfg.sink.url,
                    e.summary()
                ),
                Some("check sink.url, DNS, firewalls and proxies from this host".to_string()),
            )
        }
        Ok(()) => {}
    }
    if cfg.sink.kind == config::SinkKind::Webhook {
        // A webhook has no read-only endpoint: any HTTP answer to a GET
        // (even 404 or 405) proves the endpoint is reachable; nothing is posted.
        let client = match crate::sink::http_client(cfg.sink.timeout, 1) {
            Ok(c) => c,
            Err(e) => return Finding::fail("sink", e, None),
        };
        if let Err(e) = client.get(&cfg.sink.url).send().await {
            let e = e.without_url();
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                reason.push_str(": ");
                reason.push_str(&inner.to_string());
                source = inner.source();
            }
            return Finding::fail(
                "sink",
                format!(
                    "the webhook endpoint {} is not reachable ({reason}); changes would wait and retry, then be dead-lettered",
                    cfg.sink.url
                ),
                Some("check sink.url, DNS, firewalls and proxies from this host".to_string()),
            );
        }
    }
    Finding::ok(
        "sink",
        format!("the {} service at {} answers", sink.name(), cfg.sink.url),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_beyond_loopback_warn() {
        assert_eq!(
            metrics_listen("127.0.0.1:9187").map(|f| f.level),
            Some(Level::Ok)
        );
        let f = metrics_listen("0.0.0.0:9187").expect("a finding");
        assert_eq!(f.level, Level::Warn);
        assert!(f.fix.as_deref().is_some_and(|x| x.contains("127.0.0.1")));
        assert!(metrics_listen("").is_none());
    }
}
