//! The backfill's SQL: its resumable cursor (one row).

/// The cursor. `status` (another command) reads mode, cursor, rows_total,
/// rows_done, started_at, updated_at and finished_at.
pub const TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.backfill (
    id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    mode text NOT NULL,
    cursor text,
    rows_total bigint,
    rows_done bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    finished_at timestamptz,
    rows_queued bigint NOT NULL DEFAULT 0
);";
