//! The SQL of `usersync setup --role NAME`: the least-privilege role the daemon can run
//! as, and its SQL (`sql/role.sql` is this output for the role `usersync`).
//! The role gets exactly what the daemon uses: LOGIN REPLICATION, SELECT on
//! the users table, UPDATE of the two sync columns only, use of schema
//! `usersync` and its tables, and EXECUTE on the replication origin functions
//! the write-back calls (superuser-only by default in PostgreSQL 15).
//! usersync never sets a password: the DBA does (`\password NAME` in psql).

use crate::config::{quote_ident, quote_literal, DatabaseConfig};
use crate::core::table::EXTERNAL_ID_COLUMN;
use crate::core::table::SYNCED_AT_COLUMN;
use crate::store::setup::Step;

/// Every replication origin function the daemon calls (store::writeback,
/// store::progress, store::origin), with the argument types GRANT needs.
pub const ORIGIN_FUNCTIONS: &[&str] = &[
    "pg_replication_origin_session_setup(text)",
    "pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)",
    "pg_replication_origin_progress(text, boolean)",
];

/// A role name usersync accepts: what `database.slot` accepts, so it never
/// needs quoting surprises in the DBA's scripts.
pub fn valid_role_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        || name.starts_with("pg_")
    {
        return Err(format!(
            "role name {name:?} must be 1-63 characters of lower-case letters, digits and '_', not starting with pg_"
        ));
    }
    Ok(())
}

/// The statements that create (or bring up to date) the role. Idempotent.
pub fn steps(cfg: &DatabaseConfig, role: &str) -> Vec<Step> {
    let r = quote_ident(role);
    let table = cfg.table.quoted();
    let table_schema = quote_ident(&cfg.table.schema);
    let functions = ORIGIN_FUNCTIONS
        .iter()
        .map(|f| format!("GRANT EXECUTE ON FUNCTION {f} TO {r};"))
        .collect::<Vec<_>>()
        .join("\n");
    vec![
        Step {
            comment: "The role usersync connects as: it may log in and stream a replication slot, nothing more. usersync sets no password: set one with \\password in psql (or ALTER ROLE ... PASSWORD) and give it to usersync through database.password_env.",
            sql: format!(
                "DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN\n        CREATE ROLE {r} LOGIN REPLICATION;\n    ELSE\n        ALTER ROLE {r} LOGIN REPLICATION;\n    END IF;\nEND\n$$;",
                lit = quote_literal(role)
            ),
        },
        Step {
            comment: "Read the users table (replays and backfills read current rows).",
            sql: format!("GRANT USAGE ON SCHEMA {table_schema} TO {r};\nGRANT SELECT ON {table} TO {r};"),
        },
        Step {
            comment: "Write back only the two sync columns: no other column can be changed by this role.",
            sql: format!(
                "GRANT UPDATE ({EXTERNAL_ID_COLUMN}, {SYNCED_AT_COLUMN}) ON {table} TO {r};"
            ),
        },
        Step {
            comment: "usersync's own tables (dead letters, progress, and those later versions add): read and write rows, create nothing.",
            sql: format!(
                "GRANT USAGE ON SCHEMA usersync TO {r};\n\
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA usersync TO {r};\n\
                 GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA usersync TO {r};\n\
                 ALTER DEFAULT PRIVILEGES IN SCHEMA usersync GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r};\n\
                 ALTER DEFAULT PRIVILEGES IN SCHEMA usersync GRANT USAGE, SELECT ON SEQUENCES TO {r};"
            ),
        },
        Step {
            comment: "The replication origin functions the write-back calls to tag its transactions (superuser-only by default).",
            sql: functions,
        },
    ]
}

/// What the inbound sources (`[inbound]`) write to the users table, which
/// the role must then be allowed: INSERT of the written columns when a
/// source creates users, UPDATE of them, DELETE only for `on_delete =
/// delete`, and the sources' replication origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundWrites {
    pub insert: bool,
    /// Mapped columns, id columns and soft-delete columns.
    pub columns: std::collections::BTreeSet<String>,
    /// What a row created by a source (`on_create = "insert"`) can carry:
    /// its id column and the user object's mapped columns. Fields of other
    /// objects (`subscription:/…`, `plan:/…`) only ever update a row.
    pub insert_columns: std::collections::BTreeSet<String>,
    pub delete: bool,
    /// `<origin>_in_<source>` of every source.
    pub origins: Vec<String>,
}

impl InboundWrites {
    pub fn of(inbound: &crate::config::inbound::InboundConfig, own_origin: &str) -> InboundWrites {
        use crate::config::inbound::{InboundOnDelete, OnCreate};
        let mut w = InboundWrites::default();
        for s in &inbound.sources {
            w.insert |= s.on_create == OnCreate::Insert;
            w.columns.insert(s.id_column.clone());
            w.columns.extend(s.mapping.iter().map(|(c, _)| c.clone()));
            if s.on_create == OnCreate::Insert {
                w.insert_columns.insert(s.id_column.clone());
                w.insert_columns.extend(
                    s.mapping
                        .iter()
                        .filter(|(_, f)| f.stream().is_none())
                        .map(|(c, _)| c.clone()),
                );
            }
            match &s.on_delete {
                InboundOnDelete::Soft(c) => {
                    w.columns.insert(c.clone());
                }
                InboundOnDelete::Delete => w.delete = true,
                InboundOnDelete::Unlink | InboundOnDelete::Ignore => {}
            }
            w.origins.push(s.origin(own_origin));
        }
        w
    }

    /// The columns an inbound insert may name (the soft-delete column is
    /// only ever updated, but granting it costs nothing).
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The statements for the inbound sources' writes. Idempotent.
pub fn inbound_steps(cfg: &DatabaseConfig, writes: &InboundWrites, role: &str) -> Vec<Step> {
    let r = quote_ident(role);
    let table = cfg.table.quoted();
    let columns = writes.column_list();
    let mut steps = vec![Step {
        comment: "Inbound webhooks update the users they match: UPDATE of the mapped, id and soft-delete columns only.",
        sql: format!("GRANT UPDATE ({columns}) ON {table} TO {r};"),
    }];
    if writes.insert {
        steps.push(Step {
            comment: "Inbound webhooks create users (on_create = \"insert\"): INSERT of the same columns, and the key's sequence for its default.",
            sql: format!(
                "GRANT INSERT ({columns}) ON {table} TO {r};\n\
                 DO $$\nDECLARE s text;\nBEGIN\n    FOR s IN SELECT pg_get_serial_sequence({lit}, attname) FROM pg_attribute\n        WHERE attrelid = {lit}::regclass AND attnum > 0 AND NOT attisdropped\n        AND pg_get_serial_sequence({lit}, attname) IS NOT NULL\n    LOOP\n        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %I', s, {role_lit});\n    END LOOP;\nEND\n$$;",
                lit = quote_literal(&table),
                role_lit = quote_literal(role)
            ),
        });
    }
    if writes.delete {
        steps.push(Step {
            comment: "A source with on_delete = \"delete\" deletes the user's row.",
            sql: format!("GRANT DELETE ON {table} TO {r};"),
        });
    }
    if !writes.origins.is_empty() {
        steps.push(Step {
            comment: "Each inbound source tags its writes with a replication origin of its own (created here, so the role needs no right to create origins).",
            sql: writes
                .origins
                .iter()
                .map(|o| {
                    let lit = quote_literal(o);
                    format!("SELECT pg_replication_origin_create({lit}) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = {lit});")
                })
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    steps
}

/// The role section a DBA can run with `psql -f` after the setup script.
pub fn render(cfg: &DatabaseConfig, role: &str) -> String {
    render_with(cfg, role, None)
}

/// [`render`] plus the grants for the inbound sources' writes.
pub fn render_with(cfg: &DatabaseConfig, role: &str, inbound: Option<&InboundWrites>) -> String {
    let mut out = format!(
        "-- usersync least-privilege role {role} for table {}.\n\
         -- Run as a superuser after the setup script (CREATE ROLE ... REPLICATION and\n\
         -- GRANT on the replication origin functions need one). Idempotent.\n",
        cfg.table
    );
    let mut all = steps(cfg, role);
    if let Some(w) = inbound {
        all.extend(inbound_steps(cfg, w, role));
    }
    for step in all {
        out.push_str("\n-- ");
        out.push_str(step.comment);
        out.push('\n');
        out.push_str(&step.sql);
        out.push('\n');
    }
    out
}

/// Runs the role's statements; a failure names the step.
pub async fn run_steps(
    client: &tokio_postgres::Client,
    cfg: &DatabaseConfig,
    role: &str,
    inbound: Option<&InboundWrites>,
) -> Result<(), crate::store::setup::StepError> {
    let mut all = steps(cfg, role);
    if let Some(w) = inbound {
        all.extend(inbound_steps(cfg, w, role));
    }
    for step in all {
        client
            .batch_execute(&step.sql)
            .await
            .map_err(|source| crate::store::setup::StepError {
                step: step.comment.to_string(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> DatabaseConfig {
        let env: std::collections::BTreeMap<String, String> = Default::default();
        crate::config::load_database(
            std::path::Path::new("/nonexistent/sync.toml"),
            false,
            &env,
            false,
        )
        .unwrap()
    }

    #[test]
    fn committed_role_sql_is_current() {
        assert_eq!(
            include_str!("../../sql/role.sql"),
            render(&defaults(), "usersync"),
            "sql/role.sql differs: regenerate with `usersync setup --print-sql --role usersync --role-only > sql/role.sql`"
        );
    }

    #[test]
    fn role_names() {
        assert!(valid_role_name("usersync_app").is_ok());
        for bad in ["", "Robert", "a;drop", "pg_x", &"a".repeat(64)] {
            assert!(valid_role_name(bad).is_err(), "{bad}");
        }
    }
}
