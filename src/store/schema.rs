//! What the daemon needs from the database before it consumes anything:
//! the users table's shape (single-column key, the two sync columns, replica
//! identity) and the replication objects (wal_level, publication, slot,
//! origin). Every failed check is one message that says what to fix.

use crate::core::table::TableShape;
use tokio_postgres::Client;

use crate::config::{DatabaseConfig, TableName};
use crate::core::error::{Classify, ErrorKind};
use crate::store::db::error_text;

pub const EXTERNAL_ID_COLUMN: &str = "external_user_id";
pub const SYNCED_AT_COLUMN: &str = "external_synced_at";

/// The oldest supported server, as `server_version_num`.
pub const MIN_SERVER_VERSION_NUM: i32 = 140_000;

/// Key types whose text form round-trips through `$1::type` in the write-back.
const KEY_TYPES: &[&str] = &[
    "uuid",
    "smallint",
    "integer",
    "bigint",
    "text",
    "character varying",
];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "table {0} does not exist (set database.table to the users table, as \"schema.table\")"
    )]
    TableMissing(TableName),
    #[error("table {0} has no primary key; usersync needs a single-column primary key (uuid, integer, bigint or text) to identify users")]
    NoPrimaryKey(TableName),
    #[error("table {table} has a composite primary key ({columns}); usersync needs a single-column primary key (uuid, integer, bigint or text)")]
    CompositeKey { table: TableName, columns: String },
    #[error("primary key column {column} of {table} has type {ty}; supported key types are uuid, smallint, integer, bigint, text and varchar")]
    KeyType {
        table: TableName,
        column: String,
        ty: String,
    },
    #[error("table {table} lacks column {column} ({ty}); run `usersync setup` or: ALTER TABLE {} ADD COLUMN {column} {ty};", .table.quoted())]
    MissingColumn {
        table: TableName,
        column: &'static str,
        ty: &'static str,
    },
    #[error("column {column} of {table} has type {found}, expected {expected}")]
    ColumnType {
        table: TableName,
        column: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("table {table} has REPLICA IDENTITY {found}; usersync needs FULL so that deletes carry the external id: run `usersync setup` or: ALTER TABLE {} REPLICA IDENTITY FULL;", .table.quoted())]
    ReplicaIdentity {
        table: TableName,
        found: &'static str,
    },
    #[error("PostgreSQL {0} is not supported: usersync needs PostgreSQL 14 or newer, because its replication stream asks pgoutput for logical decoding messages (messages 'true'), which older servers refuse; upgrade the server")]
    ServerVersion(String),
    #[error("wal_level is {0}; logical replication needs wal_level = logical in postgresql.conf (then restart PostgreSQL)")]
    WalLevel(String),
    #[error("publication {0} does not exist; run `usersync setup` (or `usersync setup --print-sql` for the DBA)")]
    PublicationMissing(String),
    #[error("publication {publication} does not include {table}; run `usersync setup` or: ALTER PUBLICATION {} ADD TABLE {};", crate::config::quote_ident(.publication), .table.quoted())]
    PublicationLacksTable {
        publication: String,
        table: TableName,
    },
    #[error("replication slot {0} does not exist; run `usersync setup` (or `usersync setup --print-sql` for the DBA). If usersync synced this database before (the slot was dropped, or a failover promoted a standby that did not have it), run `usersync recover` instead: it creates the slot and pushes what changed meanwhile")]
    SlotMissing(String),
    /// The slot exists but can never stream again: retrying cannot help,
    /// and a new slot alone would skip the changes it lost.
    #[error("replication slot {slot} {problem}; the changes made since usersync last confirmed can no longer be streamed. Run `usersync recover` (try `usersync recover --dry-run` first): it recreates the slot and pushes every row that changed or was deleted meanwhile")]
    SlotInvalidated { slot: String, problem: String },
    #[error("replication slot {slot} {problem}; drop it or set database.slot to another name")]
    SlotUnusable { slot: String, problem: String },
    #[error("replication origin {0} does not exist; run `usersync setup` (or `usersync setup --print-sql` for the DBA)")]
    OriginMissing(String),
    #[error("table {0} does not exist; run `usersync setup` (or `usersync setup --print-sql` for the DBA)")]
    OwnTablesMissing(&'static str),
    #[error("{0}")]
    Requests(String),
    #[error("database query failed while checking {what}: {}", error_text(.source))]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("checking the replication slot: {0}")]
    Slot(#[source] Box<crate::store::status::StatusError>),
    #[error("checking {what}: {source}")]
    Store {
        what: &'static str,
        #[source]
        source: crate::store::requests::RequestError,
    },
}

impl Classify for SchemaError {
    /// Every shape problem is the operator's to fix; a failed query is
    /// whatever its SQLSTATE says (a lost connection is retried).
    fn kind(&self) -> ErrorKind {
        match self {
            SchemaError::Query { source, .. } => crate::store::db::kind_of(source),
            // The database lost data usersync needed: no setting fixes it,
            // a person runs `recover` (exit 1 at start and later).
            SchemaError::SlotInvalidated { .. } => ErrorKind::Permanent,
            SchemaError::Store { source, .. } => source.kind(),
            SchemaError::Slot(e) => e.kind(),
            _ => ErrorKind::Config,
        }
    }
}

fn query_err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> SchemaError + Copy {
    move |source| SchemaError::Query { what, source }
}

/// Reads the table's key, columns and replica identity; refuses a missing
/// table and a key usersync cannot address.
pub async fn inspect_table(client: &Client, table: &TableName) -> Result<TableShape, SchemaError> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_err("the users table"))?
        .ok_or_else(|| SchemaError::TableMissing(table.clone()))?;
    let q = query_err("the users table");
    let oid: u32 = row.try_get(0).map_err(q)?;
    let ident: String = row.try_get(1).map_err(q)?;
    let columns: Vec<(String, String)> = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(query_err("the users table's columns"))?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(query_err("the users table's columns"))?;
    let key: Vec<(String, String)> = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await
        .map_err(query_err("the users table's primary key"))?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(query_err("the users table's primary key"))?;
    let (key_column, key_type) = match key.as_slice() {
        [] => return Err(SchemaError::NoPrimaryKey(table.clone())),
        [one] => one.clone(),
        many => {
            return Err(SchemaError::CompositeKey {
                table: table.clone(),
                columns: many
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    let base_type = key_type.split('(').next().unwrap_or_default().trim();
    if !KEY_TYPES.contains(&base_type) {
        return Err(SchemaError::KeyType {
            table: table.clone(),
            column: key_column,
            ty: key_type,
        });
    }
    Ok(TableShape {
        table: table.clone(),
        key_column,
        key_type,
        columns,
        replica_identity: ident.chars().next().unwrap_or('d'),
    })
}

/// The sync columns exist with the right types and deletes carry the old row.
pub fn check_table_ready(shape: &TableShape) -> Result<(), SchemaError> {
    if let Some(first) = sync_column_problems(shape).into_iter().next() {
        return Err(first);
    }
    check_replica_identity(shape)
}

/// Every problem with the two sync columns (missing, wrong type), so that
/// `usersync check` can list them all while `run` stops at the first.
pub fn sync_column_problems(shape: &TableShape) -> Vec<SchemaError> {
    let mut problems = Vec::new();
    for (column, expected, accepted) in [
        (
            EXTERNAL_ID_COLUMN,
            "text",
            &["text", "character varying"][..],
        ),
        (
            SYNCED_AT_COLUMN,
            "timestamptz",
            &["timestamp with time zone"][..],
        ),
    ] {
        match shape.column_type(column) {
            None => problems.push(SchemaError::MissingColumn {
                table: shape.table.clone(),
                column,
                ty: expected,
            }),
            Some(found) => {
                let base = found.split('(').next().unwrap_or_default();
                if !accepted.contains(&base) {
                    problems.push(SchemaError::ColumnType {
                        table: shape.table.clone(),
                        column,
                        found: found.to_string(),
                        expected,
                    });
                }
            }
        }
    }
    problems
}

/// Deletes and updates must carry the whole old row (REPLICA IDENTITY FULL).
pub fn check_replica_identity(shape: &TableShape) -> Result<(), SchemaError> {
    if shape.replica_identity != 'f' {
        let found = match shape.replica_identity {
            'd' => "DEFAULT",
            'n' => "NOTHING",
            'i' => "USING INDEX",
            _ => "unknown",
        };
        return Err(SchemaError::ReplicaIdentity {
            table: shape.table.clone(),
            found,
        });
    }
    Ok(())
}

/// The server is one usersync supports (14 or newer); returns its version.
pub async fn check_server_version(client: &Client) -> Result<String, SchemaError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(query_err("the server version"))?;
    let q = query_err("the server version");
    let num: i32 = row.try_get(0).map_err(q)?;
    let version: String = row.try_get(1).map_err(q)?;
    if num < MIN_SERVER_VERSION_NUM {
        return Err(SchemaError::ServerVersion(version));
    }
    Ok(version)
}

pub async fn check_wal_level(client: &Client) -> Result<(), SchemaError> {
    let level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(query_err("wal_level"))?
        .try_get(0)
        .map_err(query_err("wal_level"))?;
    if level != "logical" {
        return Err(SchemaError::WalLevel(level));
    }
    Ok(())
}

pub async fn check_publication(client: &Client, cfg: &DatabaseConfig) -> Result<(), SchemaError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
        .map_err(query_err("the publication"))?
        .is_some();
    if !exists {
        return Err(SchemaError::PublicationMissing(cfg.publication.clone()));
    }
    let has_table = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&cfg.publication, &cfg.table.schema, &cfg.table.name],
        )
        .await
        .map_err(query_err("the publication"))?
        .is_some();
    if !has_table {
        return Err(SchemaError::PublicationLacksTable {
            publication: cfg.publication.clone(),
            table: cfg.table.clone(),
        });
    }
    Ok(())
}

pub async fn check_slot(client: &Client, cfg: &DatabaseConfig) -> Result<(), SchemaError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(query_err("the replication slot"))?
        .ok_or_else(|| SchemaError::SlotMissing(cfg.slot.clone()))?;
    let q = query_err("the replication slot");
    let plugin: Option<String> = row.try_get(0).map_err(q)?;
    let kind: String = row.try_get(1).map_err(q)?;
    let database: Option<String> = row.try_get(2).map_err(q)?;
    let problem = if kind != "logical" {
        Some(format!("is a {kind} slot, not a logical one"))
    } else if plugin.as_deref() != Some("pgoutput") {
        Some(format!(
            "uses output plugin {}, not pgoutput",
            plugin.unwrap_or_default()
        ))
    } else if database.as_deref() != Some(cfg.dbname.as_str()) {
        Some(format!(
            "belongs to database {}, not {}",
            database.unwrap_or_default(),
            cfg.dbname
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(SchemaError::SlotUnusable {
            slot: cfg.slot.clone(),
            problem,
        });
    }
    let info = crate::store::status::slot_info(client, &cfg.slot)
        .await
        .map_err(|e| SchemaError::Slot(Box::new(e)))?;
    if let Some(problem) = info.as_ref().and_then(|s| s.invalidated()) {
        return Err(SchemaError::SlotInvalidated {
            slot: cfg.slot.clone(),
            problem,
        });
    }
    Ok(())
}

pub async fn check_origin(client: &Client, cfg: &DatabaseConfig) -> Result<(), SchemaError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_origin WHERE roname = $1",
            &[&cfg.origin],
        )
        .await
        .map_err(query_err("the replication origin"))?
        .is_some();
    if !exists {
        return Err(SchemaError::OriginMissing(cfg.origin.clone()));
    }
    Ok(())
}

/// usersync's own tables exist (an older setup may predate them).
pub async fn check_own_tables(client: &Client) -> Result<(), SchemaError> {
    for table in [
        "usersync.dead_letters",
        "usersync.user_progress",
        "usersync.sync_log",
    ] {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(query_err("usersync's tables"))?
            .try_get(0)
            .map_err(query_err("usersync's tables"))?;
        if !exists {
            return Err(SchemaError::OwnTablesMissing(table));
        }
    }
    Ok(())
}

/// Everything `run` needs before it opens the stream.
pub async fn preflight(client: &Client, cfg: &DatabaseConfig) -> Result<TableShape, SchemaError> {
    check_server_version(client).await?;
    check_wal_level(client).await?;
    let shape = inspect_table(client, &cfg.table).await?;
    check_table_ready(&shape)?;
    check_publication(client, cfg).await?;
    check_slot(client, cfg).await?;
    check_origin(client, cfg).await?;
    check_own_tables(client).await?;
    check_requests(client, cfg).await?;
    Ok(shape)
}

/// The request tables exist and requests are published (see `requests`).
pub async fn check_requests(client: &Client, cfg: &DatabaseConfig) -> Result<(), SchemaError> {
    use crate::store::requests::RequestError;
    match crate::store::requests::check(client, cfg).await {
        Ok(()) => Ok(()),
        Err(source @ RequestError::Db(_)) => Err(SchemaError::Store {
            what: "usersync's request tables",
            source,
        }),
        Err(e) => Err(SchemaError::Requests(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_hints_quote_the_table_as_the_applied_sql_does() {
        let table = TableName::parse("public.Users").expect("name");
        let hints = [
            SchemaError::ReplicaIdentity {
                table: table.clone(),
                found: "DEFAULT",
            }
            .to_string(),
            SchemaError::MissingColumn {
                table: table.clone(),
                column: "external_user_id",
                ty: "text",
            }
            .to_string(),
            SchemaError::PublicationLacksTable {
                publication: "Pub".into(),
                table,
            }
            .to_string(),
        ];
        assert!(hints[0].contains("ALTER TABLE \"public\".\"Users\" REPLICA IDENTITY FULL;"));
        assert!(hints[1].contains("ALTER TABLE \"public\".\"Users\" ADD COLUMN"));
        assert!(hints[2].contains("ALTER PUBLICATION \"Pub\" ADD TABLE \"public\".\"Users\";"));
    }
}

/// How the table answers one of the inbound look-ups (`WHERE <expr> =
/// value`): whether an index serves it, and the table's estimated rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupIndex {
    pub indexed: bool,
    /// `pg_class.reltuples`; 0 before the first ANALYZE.
    pub rows: i64,
}

/// Asks the planner whether `WHERE <expr> = 'x'` on `table` (aliased `u`)
/// can use an index, with sequential scans switched off for the question
/// so the answer does not depend on the table's size today. `expr` is
/// built by the caller from quoted identifiers.
pub async fn lookup_index(
    client: &Client,
    table: &TableName,
    expr: &str,
) -> Result<LookupIndex, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN; SET LOCAL enable_seqscan = off")
        .await?;
    let plan = client
        .query_one(
            &format!(
                "EXPLAIN (FORMAT JSON) SELECT 1 FROM {} AS u WHERE {expr} = 'x'",
                table.quoted()
            ),
            &[],
        )
        .await;
    let rows = client
        .query_one(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await;
    client.batch_execute("ROLLBACK").await?;
    let plan: serde_json::Value = plan?.try_get(0)?;
    Ok(LookupIndex {
        indexed: !plan.to_string().contains("\"Seq Scan\""),
        rows: rows?.try_get(0)?,
    })
}
