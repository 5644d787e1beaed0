//! Plain SQL connections to the app database (for setup, preflight and the
//! write-back), with errors that say which server could not be reached.

use tokio_postgres::Client;

use crate::config::DatabaseConfig;
use crate::core::error::{sqlstate_fix, sqlstate_kind, Classify, ErrorKind};

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {target}: {reason} (check database.url / USERSYNC_DATABASE_URL, the password reference, and that the server accepts connections)")]
pub struct ConnectError {
    pub target: String,
    pub reason: String,
    /// The driver's error, when there is one (a TLS setup problem has none).
    #[source]
    pub source: Option<tokio_postgres::Error>,
}

impl Classify for ConnectError {
    /// An unreachable or restarting server is worth waiting for; a refused
    /// login, an unknown database or a TLS setup that cannot work is not.
    /// The latter are runtime failures (exit 1), not configuration errors:
    /// the same configuration works once the server side is fixed.
    fn kind(&self) -> ErrorKind {
        match self.source.as_ref().map(kind_of) {
            Some(ErrorKind::Transient) => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        }
    }
}

/// The kind of a driver error: by SQLSTATE when the server sent one; without
/// one, a closed connection or an I/O failure is transient and anything else
/// (a value that does not convert, a protocol surprise) is not.
pub fn kind_of(e: &tokio_postgres::Error) -> ErrorKind {
    if let Some(code) = e.code() {
        return sqlstate_kind(code.code());
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if inner.is::<std::io::Error>() {
            return ErrorKind::Transient;
        }
        source = inner.source();
    }
    if e.is_closed() {
        ErrorKind::Transient
    } else {
        ErrorKind::Permanent
    }
}

/// The operator's fix for a driver error that stops usersync, if the
/// SQLSTATE has one.
pub fn fix_of(e: &tokio_postgres::Error) -> Option<&'static str> {
    e.code().and_then(|c| sqlstate_fix(c.code()))
}

/// A statement that failed: what usersync was doing, and the driver's error
/// with its SQLSTATE kept for whoever must decide by it.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {}{}", error_text(.source), fix_of(.source).map(|f| format!(" ({f})")).unwrap_or_default())]
pub struct DbError {
    pub context: &'static str,
    #[source]
    pub source: tokio_postgres::Error,
}

impl DbError {
    /// For `map_err`: `.map_err(DbError::ctx("writing the sync log"))`.
    pub fn ctx(context: &'static str) -> impl Fn(tokio_postgres::Error) -> DbError + Copy {
        move |source| DbError { context, source }
    }

    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        self.source.code()
    }
}

impl Classify for DbError {
    fn kind(&self) -> ErrorKind {
        kind_of(&self.source)
    }
}

/// Opens a connection and drives it on a background task. `app` names the
/// session in `pg_stat_activity` so a DBA can tell usersync's sessions apart.
pub async fn connect(cfg: &DatabaseConfig, app: &str) -> Result<Client, ConnectError> {
    Ok(connect_watched(cfg, app).await?.0)
}

/// Like [`connect`], plus a token that fires the moment the connection ends
/// (closed by the server or the network), for sessions whose loss must be
/// acted on at once rather than at their next statement.
pub async fn connect_watched(
    cfg: &DatabaseConfig,
    app: &str,
) -> Result<(Client, tokio_util::sync::CancellationToken), ConnectError> {
    let mut pg = cfg.pg.clone();
    pg.application_name(app);
    pg.connect_timeout(std::time::Duration::from_secs(10));
    let tls = cfg.tls.connector().map_err(|reason| ConnectError {
        target: cfg.describe(),
        reason,
        source: None,
    })?;
    let (client, connection) = pg.connect(tls).await.map_err(|e| ConnectError {
        target: cfg.describe(),
        reason: crate::config::tls::explain(&cfg.tls, error_text(&e)),
        source: Some(e),
    })?;
    let closed = tokio_util::sync::CancellationToken::new();
    let on_close = closed.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
        on_close.cancel();
    });
    Ok((client, closed))
}

/// The most useful text of a tokio-postgres error: the server's message and
/// hint when there is one, else the client-side cause.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = db.message().to_string();
        if let Some(detail) = db.detail() {
            s.push_str(" (");
            s.push_str(detail);
            s.push(')');
        }
        if let Some(hint) = db.hint() {
            s.push_str("; hint: ");
            s.push_str(hint);
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Runs `job` at once and then every `every` on a connection of its own
/// (named `app`) until `cancel`: the daemon's housekeeping (pruning the sync
/// log and answered sync requests). A failed run is logged as `what` and
/// drops the connection; the next tick reconnects.
pub fn spawn_periodic<J, F>(
    db: DatabaseConfig,
    app: &'static str,
    what: &'static str,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
    job: J,
) where
    J: Fn(std::sync::Arc<Client>) -> F + Send + 'static,
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send,
{
    tokio::spawn(async move {
        let mut client = None;
        loop {
            if client.is_none() {
                client = connect(&db, app).await.ok().map(std::sync::Arc::new);
            }
            if let Some(c) = &client {
                if let Err(e) = job(std::sync::Arc::clone(c)).await {
                    tracing::warn!(error = %error_text(&e), "cannot {what}; will retry");
                    client = None;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// The server the replication connection must reach. pgwire-replication
/// connects to one host; a `database.url` naming several (libpq's
/// `postgres://h1:p1,h2:p2/app?target_session_attrs=read-write`, the usual
/// form beside a standby that may be promoted) is resolved here the way
/// libpq resolves `read-write`: the hosts in order, the first one that
/// accepts a connection and is not in recovery. `Ok(None)`: every host
/// that answered is a standby (a promotion under way); the caller retries.
/// One host: that host, unprobed.
pub async fn primary_endpoint(cfg: &DatabaseConfig) -> Result<Option<(String, u16)>, ConnectError> {
    use tokio_postgres::config::Host;
    let hosts = cfg.pg.get_hosts();
    if hosts.len() <= 1 {
        return Ok(Some((cfg.host.clone(), cfg.port)));
    }
    let ports = cfg.pg.get_ports();
    let tls = cfg.tls.connector().map_err(|reason| ConnectError {
        target: cfg.describe(),
        reason,
        source: None,
    })?;
    let mut last: Option<ConnectError> = None;
    for (i, host) in hosts.iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let mut pg = tokio_postgres::Config::new();
        let name = match host {
            Host::Tcp(h) => {
                pg.host(h);
                h.clone()
            }
            Host::Unix(p) => {
                pg.host_path(p);
                p.display().to_string()
            }
        };
        pg.port(port)
            .user(&cfg.user)
            .dbname(&cfg.dbname)
            .ssl_mode(cfg.pg.get_ssl_mode())
            .application_name("usersync-probe")
            .connect_timeout(std::time::Duration::from_secs(5));
        if let Some(p) = cfg.pg.get_password() {
            pg.password(p);
        }
        let target = format!("{name}:{port}/{} as {}", cfg.dbname, cfg.user);
        let client = match pg.connect(tls.clone()).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
            }
            Err(e) => {
                tracing::debug!(host = %target, error = %e, "host not reachable for the replication connection");
                last = Some(ConnectError {
                    target,
                    reason: error_text(&e),
                    source: Some(e),
                });
                continue;
            }
        };
        match client.query_one("SELECT pg_is_in_recovery()", &[]).await {
            Ok(row) if matches!(row.try_get::<_, bool>(0), Ok(false)) => {
                return Ok(Some((name, port)))
            }
            Ok(_) => tracing::debug!(host = %target, "host is a standby; trying the next"),
            Err(e) => {
                last = Some(ConnectError {
                    target,
                    reason: error_text(&e),
                    source: Some(e),
                })
            }
        }
    }
    match last {
        // Some host answered as a standby: a primary may come (promotion).
        Some(e) if e.kind() != ErrorKind::Transient => Err(e),
        _ => Ok(None),
    }
}
