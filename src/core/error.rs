//! The one error model: every error usersync reports has a kind, and the
//! kind alone decides what happens next. Each layer's error types say their
//! kind through [`Classify`] (database errors by SQLSTATE, HTTP errors by
//! status, never by message text); the daemon retries only `Transient`, and
//! the command line maps kinds to exit codes in one place.

/// What can be done about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operator must change the configuration or the database setup
    /// (missing privilege, table or slot, wrong version, bad key). Exit 2
    /// before streaming started; retrying cannot help.
    Config,
    /// Worth retrying as it is: a lost connection, a server shutting down
    /// or in recovery, a lock or serialization conflict, an overloaded API.
    Transient,
    /// Neither retrying nor reconfiguring this run helps without a person
    /// looking (a server error that persists, a stream we cannot decode).
    /// Exit 1 with the message.
    Permanent,
}

impl ErrorKind {
    /// The process exit code for an error of this kind that ends a command:
    /// 2 for usage and configuration problems, 1 for everything else.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Config => 2,
            ErrorKind::Transient | ErrorKind::Permanent => 1,
        }
    }

    pub fn is_transient(self) -> bool {
        self == ErrorKind::Transient
    }
}

/// An error that knows its kind.
pub trait Classify {
    fn kind(&self) -> ErrorKind;
}

/// How a five-character SQLSTATE is to be treated. Lives here, with no
/// driver types, so that both database clients (tokio-postgres for SQL,
/// pgwire-replication for the stream) are classified by the same table; the
/// table is also in DESIGN.md ("Errors by SQLSTATE").
pub fn sqlstate_kind(code: &str) -> ErrorKind {
    let class = code.get(..2).unwrap_or("");
    match code {
        // Not enough room for usersync's slot or origin: the server's
        // max_replication_slots / max_active_replication_origins.
        "53400" => return ErrorKind::Config,
        // Query canceled, admin shutdown, crash shutdown, cannot connect now
        // (starting up or in recovery), idle session timeout.
        "57014" | "57P01" | "57P02" | "57P03" | "57P05" => return ErrorKind::Transient,
        // Object in use (the slot or origin is still held by a session that
        // is going away) and lock not available.
        "55006" | "55P03" => return ErrorKind::Transient,
        // Read-only transaction: connected to a standby (after a failover,
        // before the multi-host URL finds the new primary).
        "25006" => return ErrorKind::Transient,
        // Object not in prerequisite state: wal_level below logical, an
        // invalidated slot ("can no longer get changes"), a slot created
        // on a standby. Retrying cannot fix any of them.
        "55000" => return ErrorKind::Config,
        _ => {}
    }
    match class {
        // Connection exceptions, transaction rollback (serialization,
        // deadlock), insufficient resources (too many connections, out of
        // memory, disk full: an operator frees them and we carry on),
        // system errors.
        "08" | "40" | "53" | "58" => ErrorKind::Transient,
        // Invalid authorization, unknown database, privileges, undefined
        // objects (table, column, publication, slot, function), feature not
        // supported (an option the server version lacks).
        "28" | "3D" | "42" | "0A" => ErrorKind::Config,
        _ => ErrorKind::Permanent,
    }
}

/// What an operator should do about a SQLSTATE that stops usersync, or
/// `None` when the server's message says it best.
pub fn sqlstate_fix(code: &str) -> Option<&'static str> {
    Some(match code {
        "42501" => "grant the missing privilege: `usersync setup --role NAME` (or its --print-sql) creates a role with exactly what usersync needs; `usersync check` lists what is missing",
        "42P01" | "42703" | "42704" | "42883" => "a table, column, publication, slot or function usersync needs is gone: run `usersync check`, then `usersync setup`",
        "55000" => "the server is not in a state logical replication needs (wal_level = logical? an invalidated slot?): run `usersync check`",
        "53400" => "the server has no room for another replication slot or origin: raise max_replication_slots (and on PostgreSQL 18 max_active_replication_origins), then restart PostgreSQL",
        "28000" | "28P01" => "check database.url's user and the password reference (database.password_env / password_file)",
        "3D000" => "the database in database.url does not exist",
        "0A000" => "the server does not support what usersync asked for: usersync needs PostgreSQL 14 or newer (`usersync check`)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_code_not_text() {
        assert_eq!(sqlstate_kind("08006"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("57P01"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("57P03"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("40001"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("55006"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("25006"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("53300"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("53400"), ErrorKind::Config);
        assert_eq!(sqlstate_kind("42501"), ErrorKind::Config);
        assert_eq!(sqlstate_kind("42704"), ErrorKind::Config);
        assert_eq!(sqlstate_kind("55000"), ErrorKind::Config);
        assert_eq!(sqlstate_kind("28P01"), ErrorKind::Config);
        assert_eq!(sqlstate_kind("22P02"), ErrorKind::Permanent);
        assert_eq!(sqlstate_kind("XX000"), ErrorKind::Permanent);
        assert_eq!(sqlstate_kind(""), ErrorKind::Permanent);
        assert_eq!(ErrorKind::Config.exit_code(), 2);
        assert_eq!(ErrorKind::Permanent.exit_code(), 1);
        assert!(sqlstate_fix("42501").is_some());
    }
}
