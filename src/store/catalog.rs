//! Catalog reads behind `usersync check`: replication capacity and the
//! current role's privileges. The decisions (ok, warn, fail, the fix to
//! print) stay in `app::check`; these only ask the server.

use tokio_postgres::{Client, Error};

/// Replication slots and WAL senders: configured maximum and in use.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub max_slots: i32,
    pub slots: i32,
    pub max_senders: i32,
    pub senders: i32,
}

pub async fn replication_capacity(client: &Client) -> Result<Capacity, Error> {
    let row = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_replication_slots), \
                    current_setting('max_wal_senders')::int, \
                    (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'walsender')",
            &[],
        )
        .await?;
    Ok(Capacity {
        max_slots: row.try_get(0)?,
        slots: row.try_get(1)?,
        max_senders: row.try_get(2)?,
        senders: row.try_get(3)?,
    })
}

/// The role this session runs as.
#[derive(Debug, Clone)]
pub struct CurrentRole {
    pub name: String,
    pub superuser: bool,
    pub replication: bool,
}

pub async fn current_role(client: &Client) -> Result<CurrentRole, Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, r.rolreplication \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    Ok(CurrentRole {
        name: row.try_get(0)?,
        superuser: row.try_get(1)?,
        replication: row.try_get(2)?,
    })
}

/// USAGE on `schema`; `None` when there is no such schema.
pub async fn schema_usage(client: &Client, schema: &str) -> Result<Option<bool>, Error> {
    client
        .query_one(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) \
             THEN has_schema_privilege($1, 'USAGE') END",
            &[&schema],
        )
        .await?
        .try_get(0)
}

/// SELECT on a table (`quoted_table` as `TableName::quoted` spells it).
pub async fn can_select(client: &Client, quoted_table: &str) -> Result<bool, Error> {
    client
        .query_one("SELECT has_table_privilege($1, 'SELECT')", &[&quoted_table])
        .await?
        .try_get(0)
}

/// UPDATE of one column of a table.
pub async fn can_update_column(
    client: &Client,
    quoted_table: &str,
    column: &str,
) -> Result<bool, Error> {
    client
        .query_one(
            "SELECT has_column_privilege($1, $2, 'UPDATE')",
            &[&quoted_table, &column],
        )
        .await?
        .try_get(0)
}

/// `has_column_privilege(table, column, privilege)` for the current role.
pub async fn has_column_privilege(
    client: &Client,
    quoted_table: &str,
    column: &str,
    privilege: &str,
) -> Result<bool, Error> {
    client
        .query_one(
            "SELECT has_column_privilege($1, $2, $3)",
            &[&quoted_table, &column, &privilege],
        )
        .await?
        .try_get(0)
}

/// `has_table_privilege(table, privilege)` for the current role.
pub async fn has_table_privilege(
    client: &Client,
    quoted_table: &str,
    privilege: &str,
) -> Result<bool, Error> {
    client
        .query_one(
            "SELECT has_table_privilege($1, $2)",
            &[&quoted_table, &privilege],
        )
        .await?
        .try_get(0)
}

/// Columns an INSERT must name: NOT NULL, no default, not identity or
/// generated.
pub async fn required_columns(client: &Client, quoted_table: &str) -> Result<Vec<String>, Error> {
    client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass \
             AND attnum > 0 AND NOT attisdropped AND attnotnull AND NOT atthasdef \
             AND attidentity = '' AND attgenerated = '' ORDER BY attnum",
            &[&quoted_table],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect()
}

/// usersync's tables this role may not read and write, by name.
pub async fn usersync_tables_not_writable(client: &Client) -> Result<Vec<String>, Error> {
    client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'usersync' AND c.relkind = 'r' \
             AND NOT has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE') ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect()
}

/// EXECUTE on a function given with its argument types.
pub async fn can_execute(client: &Client, function: &str) -> Result<bool, Error> {
    client
        .query_one("SELECT has_function_privilege($1, 'EXECUTE')", &[&function])
        .await?
        .try_get(0)
}

/// Generated columns of the table that the stream does not carry: all of
/// them before PostgreSQL 18; from 18 the virtual ones, and the stored ones
/// unless the publication has `publish_generated_columns = stored`. (The
/// publication's flag is read through `to_jsonb` because the column exists
/// only from 18 on.)
pub async fn unstreamed_generated_columns(
    client: &Client,
    quoted_table: &str,
    publication: &str,
) -> Result<Vec<String>, Error> {
    client
        .query(
            "SELECT a.attname::text FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             AND a.attgenerated <> '' \
             AND NOT (a.attgenerated = 's' \
                 AND current_setting('server_version_num')::int >= 180000 \
                 AND EXISTS (SELECT 1 FROM pg_publication p WHERE p.pubname = $2 \
                     AND to_jsonb(p) ->> 'pubgencols' IN ('s', 'true'))) \
             ORDER BY a.attnum",
            &[&quoted_table, &publication],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect()
}

/// Who streams WAL from this server, for the failover check.
#[derive(Debug, Clone)]
pub struct StandbyTopology {
    /// WAL senders that serve no database: physical standbys (or base
    /// backups running now).
    pub physical_senders: i64,
    /// 17+: the physical slots logical failover slots wait for; empty when
    /// unset or before 17.
    pub synchronized_standby_slots: String,
}

pub async fn standby_topology(client: &Client) -> Result<StandbyTopology, Error> {
    let row = client
        .query_one(
            // A physical walsender serves no database (a logical one does,
            // also before it has acquired its slot).
            "SELECT (SELECT count(*) FROM pg_stat_activity \
                     WHERE backend_type = 'walsender' AND datname IS NULL), \
                 coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await?;
    Ok(StandbyTopology {
        physical_senders: row.try_get(0)?,
        synchronized_standby_slots: row.try_get(1)?,
    })
}
