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

/// The role section a DBA can run with `psql -f` after the setup script.
pub fn render(cfg: &DatabaseConfig, role: &str) -> String {
    let mut out = format!(
        "-- usersync least-privilege role {role} for table {}.\n\
         -- Run as a superuser after the setup script (CREATE ROLE ... REPLICATION and\n\
         -- GRANT on the replication origin functions need one). Idempotent.\n",
        cfg.table
    );
    for step in steps(cfg, role) {
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
) -> Result<(), crate::store::setup::StepError> {
    for step in steps(cfg, role) {
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
