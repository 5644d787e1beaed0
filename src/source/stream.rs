//! The reader task: opens the slot with pgwire-replication, decodes each
//! message, drops our own write-back transactions (Origin message naming our
//! origin), assembles changes with their transaction position, and forwards
//! them to the pipeline. It also carries the pipeline's acknowledged LSN back
//! to the server. Sending blocks when the pipeline is full, which stops reading
//! (pgwire-replication keeps the keepalives going meanwhile).

use pgwire_replication::{Lsn as WireLsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::pgoutput::{decode, DecodeError, PgOutputMessage};
use super::rows::{RowBuilder, RowError, TxnPosition};
use crate::config::DatabaseConfig;
use crate::core::change::{format_lsn, Change, Lsn, PG_EPOCH_OFFSET_US};
use crate::core::error::{sqlstate_fix, sqlstate_kind, Classify, ErrorKind};

/// What the reader hands the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    Change(Box<Change>),
    /// A sync request (`usersync.sync_requests` INSERT): push the user's
    /// current row in its lane. `change` carries the position and the key.
    Request {
        change: Box<Change>,
        id: i64,
    },
    /// Every change of the transaction ending at `end_lsn` has been sent.
    TxnEnd {
        end_lsn: Lsn,
    },
    /// The server has sent everything up to `wal_end` and no transaction is open.
    Idle {
        wal_end: Lsn,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("replication stream from {target}: {reason}{}", fix_for(.source))]
    Stream {
        target: String,
        reason: String,
        #[source]
        source: pgwire_replication::PgWireError,
    },
    #[error("cannot decode the replication stream at {lsn}: {source}")]
    Decode { lsn: String, source: DecodeError },
    #[error("cannot build a change at {lsn}: {source}")]
    Row { lsn: String, source: RowError },
    #[error("the replication stream ended")]
    Ended,
}

impl Classify for SourceError {
    /// A server error by its SQLSTATE (an invalidated slot or a dropped
    /// publication will not come back by reconnecting; a restarting server
    /// will); network and task failures are worth reconnecting for; a
    /// message we cannot decode will not decode better next time.
    fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Stream { source, .. } => wire_kind(source),
            SourceError::Ended => ErrorKind::Transient,
            SourceError::Decode { .. } => ErrorKind::Permanent,
            SourceError::Row { source, .. } => source.kind(),
        }
    }
}

/// The SQLSTATE of a server error from the replication client.
/// pgwire-replication 0.5 keeps the ErrorResponse's code only in the text it
/// formats, as a trailing "(SQLSTATE XXXXX)"; the code itself does not
/// depend on the server's language, so reading it back is still deciding by
/// code, not by message.
pub fn wire_sqlstate(e: &pgwire_replication::PgWireError) -> Option<&str> {
    let pgwire_replication::PgWireError::Server(text) = e else {
        return None;
    };
    let rest = text.trim_end().strip_suffix(')')?;
    let code = rest.get(rest.len().checked_sub(5)?..)?;
    let before = rest.get(..rest.len() - 5)?;
    (before.ends_with("(SQLSTATE ") && code.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(code)
}

fn wire_kind(e: &pgwire_replication::PgWireError) -> ErrorKind {
    use pgwire_replication::PgWireError as W;
    match e {
        // A connection cut mid-message shows up as a protocol error too.
        W::Io(_) | W::Task(_) | W::Protocol(_) => ErrorKind::Transient,
        W::Server(_) => wire_sqlstate(e).map_or(ErrorKind::Permanent, sqlstate_kind),
        _ => ErrorKind::Permanent,
    }
}

fn fix_for(e: &pgwire_replication::PgWireError) -> String {
    wire_sqlstate(e)
        .and_then(sqlstate_fix)
        .map(|f| format!(" ({f})"))
        .unwrap_or_default()
}

/// Session settings that make the text output of values deterministic.
pub const SESSION_OPTIONS: &str = crate::core::session::STARTUP_OPTIONS;

pub fn replication_config(cfg: &DatabaseConfig, app: &str) -> ReplicationConfig {
    ReplicationConfig::new(
        cfg.host.clone(),
        cfg.user.clone(),
        cfg.password.clone().unwrap_or_default(),
        cfg.dbname.clone(),
        cfg.slot.clone(),
        cfg.publication.as_str(),
    )
    .with_port(cfg.port)
    .with_start_lsn(WireLsn::ZERO)
    .with_options(SESSION_OPTIONS)
    .with_application_name(app)
    // Confirmed positions reach the server within 100 ms: a restart then
    // replays little, and lag figures stay honest.
    .with_status_interval(std::time::Duration::from_millis(100))
    .with_buffer_size(1024)
    // Without an observer the client does not track whether an acknowledged
    // position is still waiting to be reported, which a clean stop waits for.
    .with_feedback_observer(pgwire_replication::FeedbackObserver::new(|_| {}))
    .with_tls(cfg.tls.replication(&cfg.host))
}

pub async fn open(cfg: &DatabaseConfig, app: &str) -> Result<ReplicationClient, SourceError> {
    let err = |e: pgwire_replication::PgWireError| SourceError::Stream {
        target: cfg.describe(),
        reason: crate::config::tls::explain(&cfg.tls, e.to_string()),
        source: e,
    };
    let mut client = ReplicationClient::connect(replication_config(cfg, app))
        .await
        .map_err(err)?;
    client.wait_started().await.map_err(err)?;
    Ok(client)
}

struct OpenTxn {
    commit_lsn: Lsn,
    xid: u32,
    commit_time_us: i64,
    ours: bool,
    position: u32,
}

/// A keepalive's `wal_end` says the server has sent everything before it,
/// which is true of a transaction only once its Commit has arrived: the
/// walsender also sends keepalives in the middle of a large transaction
/// while it waits for the socket. Passed on there, `wal_end` (past the
/// transaction's commit) would let the ack confirm past the transaction's
/// rows not received yet, and a crash would lose them.
fn idle_at(wal_end: Lsn, txn: &Option<OpenTxn>) -> Option<SourceEvent> {
    txn.is_none().then_some(SourceEvent::Idle { wal_end })
}

pub struct Reader {
    pub client: ReplicationClient,
    pub rows: RowBuilder,
    pub origin: String,
    /// Origins of inbound sources whose service is the sink's own: their
    /// writes came from that service and are dropped like the write-back's
    /// (no echo per sink). Other inbound origins are pushed as usual.
    pub echo_origins: Vec<String>,
    pub target: String,
}

impl Reader {
    /// Runs until `cancel` fires (returns Ok) or the stream fails.
    pub async fn run(
        mut self,
        out: mpsc::Sender<SourceEvent>,
        mut acks: watch::Receiver<Lsn>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut txn: Option<OpenTxn> = None;
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return self.finish(acks).await,
                changed = acks.changed() => {
                    if changed.is_ok() {
                        self.client.update_applied_lsn(WireLsn::from_u64(*acks.borrow_and_update()));
                    }
                    continue;
                }
                ev = self.client.recv() => ev,
            };
            let event = match event {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err(SourceError::Ended),
                Err(e) => {
                    return Err(SourceError::Stream {
                        target: self.target.clone(),
                        reason: e.to_string(),
                        source: e,
                    })
                }
            };
            let forward = match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    xid,
                } => {
                    txn = Some(OpenTxn {
                        commit_lsn: final_lsn.as_u64(),
                        xid,
                        commit_time_us: commit_time_micros + PG_EPOCH_OFFSET_US,
                        ours: false,
                        position: 0,
                    });
                    None
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    txn = None;
                    Some(SourceEvent::TxnEnd {
                        end_lsn: end_lsn.as_u64(),
                    })
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => idle_at(wal_end.as_u64(), &txn),
                ReplicationEvent::XLogData {
                    wal_start, data, ..
                } => {
                    let msg = decode(&data).map_err(|source| SourceError::Decode {
                        lsn: wal_start.to_string(),
                        source,
                    })?;
                    // Relation and Type messages carry no WAL position of
                    // their own (0/0); the open transaction's commit says
                    // where in the stream the failing change is.
                    let at = match (wal_start.as_u64(), &txn) {
                        (0, Some(t)) => t.commit_lsn,
                        (at, _) => at,
                    };
                    self.handle(msg, &mut txn)
                        .map_err(|source| SourceError::Row {
                            lsn: format_lsn(at),
                            source,
                        })?
                }
                ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => None,
            };
            let Some(forward) = forward else { continue };
            // Wait for room in the pipeline, still passing acknowledgements on.
            let mut pending = Some(forward);
            while let Some(ev) = pending.take() {
                let permit = tokio::select! {
                    _ = cancel.cancelled() => return self.finish(acks).await,
                    changed = acks.changed() => {
                        if changed.is_ok() {
                            self.client.update_applied_lsn(WireLsn::from_u64(*acks.borrow_and_update()));
                        }
                        pending = Some(ev);
                        continue;
                    }
                    permit = out.reserve() => permit,
                };
                match permit {
                    Ok(p) => p.send(ev),
                    Err(_) => return self.finish(acks).await,
                }
            }
        }
    }

    /// Stops reading but keeps passing acknowledgements on until the
    /// pipeline has drained (it drops the sender), then waits until the last
    /// one has reached the server, so a clean stop does not replay changes
    /// that were already written back.
    async fn finish(self, mut acks: watch::Receiver<Lsn>) -> Result<(), SourceError> {
        while acks.changed().await.is_ok() {
            self.client
                .update_applied_lsn(WireLsn::from_u64(*acks.borrow_and_update()));
        }
        self.client
            .update_applied_lsn(WireLsn::from_u64(*acks.borrow()));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.client.feedback_pending_since().is_some()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.client.stop();
        Ok(())
    }

    fn handle(
        &mut self,
        msg: PgOutputMessage,
        txn: &mut Option<OpenTxn>,
    ) -> Result<Option<SourceEvent>, RowError> {
        match msg {
            PgOutputMessage::Origin { name, .. } => {
                if let Some(t) = txn.as_mut() {
                    t.ours = name == self.origin || self.echo_origins.contains(&name);
                }
                Ok(None)
            }
            PgOutputMessage::Relation(rel) => {
                self.rows.on_relation(rel);
                Ok(None)
            }
            PgOutputMessage::Type {
                oid,
                namespace,
                name,
            } => {
                self.rows.on_type(oid, namespace, name);
                Ok(None)
            }
            PgOutputMessage::Insert { rel_id, new } => {
                // Requests are routed even from our own transactions: the
                // write-back turns pending users into requests (off switch).
                if let Some(request) = self.rows.request_of(rel_id, &new)? {
                    let Some(t) = txn.as_mut() else {
                        return Ok(None);
                    };
                    let at = TxnPosition {
                        commit_lsn: t.commit_lsn,
                        xid: t.xid,
                        commit_time_us: t.commit_time_us,
                        position: t.position,
                    };
                    t.position += 1;
                    let change = Box::new(self.rows.request_change(&request, at));
                    return Ok(Some(SourceEvent::Request {
                        change,
                        id: request.id,
                    }));
                }
                let Some(at) = self.position(rel_id, txn)? else {
                    return Ok(None);
                };
                let change = self.rows.insert(rel_id, &new, at)?;
                Ok(Some(SourceEvent::Change(Box::new(change))))
            }
            PgOutputMessage::Update { rel_id, old, new } => {
                let Some(at) = self.position(rel_id, txn)? else {
                    return Ok(None);
                };
                Ok(self
                    .rows
                    .update(rel_id, old.as_ref(), &new, at)?
                    .map(|c| SourceEvent::Change(Box::new(c))))
            }
            PgOutputMessage::Delete { rel_id, old } => {
                let Some(at) = self.position(rel_id, txn)? else {
                    return Ok(None);
                };
                let change = self.rows.delete(rel_id, &old, at)?;
                Ok(Some(SourceEvent::Change(Box::new(change))))
            }
            PgOutputMessage::Truncate { rel_ids, .. } => {
                for rel_id in rel_ids {
                    if self.rows.is_users_relation(rel_id).unwrap_or(false) {
                        tracing::error!(
                            "the users table was TRUNCATEd: PostgreSQL does not send the removed rows, \
                             so no user.deleted events are pushed for them; remove those users from the \
                             external service by hand"
                        );
                    }
                }
                Ok(None)
            }
            // pgwire-replication delivers these as their own events; decoded
            // here only if a future version forwards them raw.
            PgOutputMessage::Begin { .. }
            | PgOutputMessage::Commit { .. }
            | PgOutputMessage::Message { .. } => Ok(None),
        }
    }

    /// The change's place in its transaction, or `None` when it is not ours
    /// to push (another table, or our own write-back). Every users-table change
    /// takes a position, pushed or not, so event ids do not depend on filters.
    fn position(
        &mut self,
        rel_id: u32,
        txn: &mut Option<OpenTxn>,
    ) -> Result<Option<TxnPosition>, RowError> {
        if !self.rows.is_users_relation(rel_id)? {
            return Ok(None);
        }
        let Some(t) = txn.as_mut() else {
            return Ok(None);
        };
        let position = t.position;
        t.position += 1;
        if t.ours {
            return Ok(None);
        }
        Ok(Some(TxnPosition {
            commit_lsn: t.commit_lsn,
            xid: t.xid,
            commit_time_us: t.commit_time_us,
            position,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError as W;

    fn server(text: &str) -> W {
        W::Server(text.to_string())
    }

    #[test]
    fn the_sqlstate_is_read_from_the_end_of_a_server_error_only() {
        let slot_gone =
            server("ERROR: replication slot \"usersync\" does not exist (SQLSTATE 42704)");
        assert_eq!(wire_sqlstate(&slot_gone), Some("42704"));
        assert_eq!(
            wire_sqlstate(&server("FATAL: terminating connection (SQLSTATE 57P01) \n")),
            Some("57P01")
        );
        // Not a server error, no code, a cut-off code, a code not introduced
        // as one: nothing to decide by.
        assert_eq!(wire_sqlstate(&W::Protocol("(SQLSTATE 42704)".into())), None);
        assert_eq!(wire_sqlstate(&server("something failed")), None);
        assert_eq!(wire_sqlstate(&server("ERROR: x (SQLSTATE 4270)")), None);
        assert_eq!(wire_sqlstate(&server("ERROR: x (SQLSTATE 42704")), None);
        assert_eq!(wire_sqlstate(&server("ERROR: order 12345)")), None);
        assert_eq!(wire_sqlstate(&server("ERROR: x (SQLSTATE 42-04)")), None);
        assert_eq!(wire_sqlstate(&server("42704)")), None);
    }

    #[test]
    fn a_keepalive_is_an_idle_position_only_between_transactions() {
        assert!(matches!(
            idle_at(500, &None),
            Some(SourceEvent::Idle { wal_end: 500 })
        ));
        let open = OpenTxn {
            commit_lsn: 400,
            xid: 7,
            commit_time_us: 0,
            ours: false,
            position: 3,
        };
        assert!(idle_at(500, &Some(open)).is_none());
    }

    #[test]
    fn replication_errors_are_classified_by_code_and_name_the_fix() {
        let io = W::Io(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(wire_kind(&io), ErrorKind::Transient);
        assert_eq!(wire_kind(&W::Protocol("cut".into())), ErrorKind::Transient);
        assert_eq!(wire_kind(&W::Task("gone".into())), ErrorKind::Transient);
        assert_eq!(
            wire_kind(&server(
                "FATAL: the database system is shutting down (SQLSTATE 57P01)"
            )),
            ErrorKind::Transient
        );
        let missing =
            server("ERROR: replication slot \"usersync\" does not exist (SQLSTATE 42704)");
        assert_eq!(wire_kind(&missing), ErrorKind::Config);
        assert_eq!(wire_kind(&server("no code at all")), ErrorKind::Permanent);
        assert_eq!(
            wire_kind(&W::Auth("bad password".into())),
            ErrorKind::Permanent
        );

        let err = SourceError::Stream {
            target: "db:5432/app as usersync".into(),
            reason: "server error".into(),
            source: missing,
        };
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("usersync setup"), "{err}");
        let err = SourceError::Stream {
            target: "db:5432/app as usersync".into(),
            reason: "server error".into(),
            source: server("ERROR: odd (SQLSTATE 99999)"),
        };
        assert!(
            !err.to_string().contains('('),
            "no fix for an unknown code: {err}"
        );
    }
}
