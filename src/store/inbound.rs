//! Applying inbound records to the users table, exactly once and in the
//! provider's order. One transaction per record, on a session tagged with the
//! source's own replication origin (`<origin>_in_<source>`) so the stream can
//! tell these writes apart: it claims the event id in
//! `usersync.inbound_events` (a replay finds it and writes nothing), compares
//! the provider's version with the one kept per provider object in
//! `usersync.inbound_versions` (older events, and creates older than a
//! delete's tombstone, change nothing; a Stripe customer that ties or comes
//! out of order is fetched from Stripe as it is now), finds the user's row,
//! defers the event while the user has an outbound change not yet written
//! back (its values differ from `user_progress.values_hash`), writes it, logs
//! it in `usersync.sync_log`, and, when the source is the service the sink
//! pushes to, records the values hash in `usersync.user_progress` so
//! `backfill` does not push them back. Deferred events and inbound dead
//! letters keep their verified delivery in `usersync.inbound_events`, so they
//! can be parsed and applied again.
//!
//! The entry points: [`Applier::receive`] (a verified delivery),
//! [`Applier::reapply`] (a deferred event or a dead letter) and
//! [`Applier::apply`] for other commands (import, reconcile): a source and
//! one [`InboundRecord`].

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::{Client, Statement};

use crate::config::inbound::{InboundOnDelete, InboundSource, OnCreate};
use crate::config::{quote_ident, Config};
use crate::core::error::{Classify, ErrorKind};
use crate::core::inbound_event::{parse, supersedes, Action, InboundRecord, SourceKind};
use crate::core::table::TableShape;
use crate::sink::memberstack::MemberstackSink;
use crate::sink::stripe::StripeSink;
use crate::sink::SinkError;
use crate::store::db::{connect, error_text, ConnectError, DbError};
use crate::store::origin::{self, OriginError};
use crate::store::rows::RowReader;

pub const EVENTS_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.inbound_events (
    source text NOT NULL,
    event_id text NOT NULL,
    event_type text NOT NULL,
    subject text NOT NULL,
    outcome text NOT NULL DEFAULT 'received',
    user_key text,
    error text,
    received_at timestamptz NOT NULL DEFAULT now(),
    body bytea,
    message_id text,
    delivered_at bigint,
    PRIMARY KEY (source, event_id)
);
ALTER TABLE usersync.inbound_events ADD COLUMN IF NOT EXISTS body bytea,
    ADD COLUMN IF NOT EXISTS message_id text, ADD COLUMN IF NOT EXISTS delivered_at bigint;
CREATE INDEX IF NOT EXISTS inbound_events_failed ON usersync.inbound_events (received_at) WHERE outcome = 'failed';
CREATE INDEX IF NOT EXISTS inbound_events_deferred ON usersync.inbound_events (received_at) WHERE outcome = 'deferred';";

pub const VERSIONS_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.inbound_versions (
    source text NOT NULL,
    stream text NOT NULL,
    subject text NOT NULL,
    version bigint NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (source, stream, subject)
);";

/// Rows a source's delete unlinked (`on_delete = "unlink"`): the record is
/// gone from the service on purpose, so `reconcile --from` that source
/// counts the row, while its id column stays empty, as agreeing rather than
/// as only in the table. Kept per (source, row) and written in the delete's
/// own transaction, so the mark and the unlink commit together.
pub const UNLINKED_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.inbound_unlinked (
    source text NOT NULL,
    user_key text NOT NULL,
    external_id text NOT NULL,
    unlinked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, user_key)
);";

/// How long an inbound apply waits for a row or version lock before it
/// gives up and the provider is asked to retry (503).
const LOCK_TIMEOUT: &str = "2s";

/// A deferred event older than this is applied even though its user still
/// differs from what was last pushed (a `sink.columns` change, a user whose
/// pushes keep failing): deferral must not hold an event forever.
const MAX_DEFERRAL: &str = "10 minutes";

/// The delivery as it was verified: kept with a deferred or failed event so
/// that it can be parsed again (with the mapping of that later day) and
/// re-applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub body: Vec<u8>,
    /// The Standard Webhooks `webhook-id` / `svix-id` header.
    pub message_id: Option<String>,
    /// The delivery's signed timestamp, seconds.
    pub delivered_at: i64,
}

/// What one record came to; each is answered 200 to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The row was written (inserted, updated, soft-deleted, unlinked or
    /// deleted); the row's key.
    Applied(String),
    /// The event id was already recorded: nothing written.
    Duplicate,
    /// Older than what was applied for that object (or than its tombstone).
    Stale,
    /// Caused by usersync's own push (Stripe `request.idempotency_key`).
    Echo,
    /// No row matches and the policy (or the action) creates none.
    Unmatched,
    /// An event type usersync does not map.
    Ignored,
    /// The user has an outbound change that is not written back yet: the
    /// event is kept (with its delivery) and applied once it is.
    Deferred,
    /// The record cannot be applied, ever (a value the column refuses, two
    /// rows with the email, a body that does not read): an inbound dead
    /// letter, kept with its delivery for `usersync dlq replay`.
    Failed(String),
}

impl Applied {
    pub fn outcome(&self) -> &'static str {
        match self {
            Applied::Applied(_) => "applied",
            Applied::Duplicate => "duplicate",
            Applied::Stale => "stale",
            Applied::Echo => "echo",
            Applied::Unmatched => "unmatched",
            Applied::Ignored => "ignored",
            Applied::Deferred => "deferred",
            Applied::Failed(_) => "failed",
        }
    }
}

/// Why an apply did not come to an outcome; the provider retries (503).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("replication origin {origin} is in use by another session (is another usersync receiving for this source?): {}", crate::store::db::error_text(.source))]
    OriginBusy {
        origin: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "inbound source {source_name}: {what} names column {column}, which {table} does not have"
    )]
    UnknownColumn {
        source_name: String,
        what: &'static str,
        column: String,
        table: String,
    },
    #[error("cannot prepare the inbound apply for source {source_name}: {source}")]
    Prepare {
        source_name: String,
        #[source]
        source: DbError,
    },
    #[error("cannot prepare the inbound apply for source {source_name}: {source}")]
    Reader {
        source_name: String,
        #[source]
        source: crate::store::rows::RowError,
    },
    /// The database did not answer or refused for a reason that is not the
    /// record's own (lock timeout, connection lost, missing privilege).
    #[error("inbound source {source_name}: database unavailable: {source}")]
    Database {
        source_name: String,
        #[source]
        source: DbError,
    },
    /// The receiver stopped before the delivery's batch was applied.
    #[error("inbound source {source_name}: the receiver stopped before applying the event")]
    Stopped { source_name: String },
    /// Fetching the provider's current object (Stripe, on a tie) failed.
    #[error(
        "inbound source {source_name}: cannot fetch the current object from the provider: {source}"
    )]
    Fetch {
        source_name: String,
        #[source]
        source: SinkError,
    },
}

impl Classify for ApplyError {
    fn kind(&self) -> ErrorKind {
        match self {
            ApplyError::Connect(e) => e.kind(),
            ApplyError::OriginBusy { .. } | ApplyError::Stopped { .. } => ErrorKind::Transient,
            ApplyError::UnknownColumn { .. } => ErrorKind::Config,
            ApplyError::Prepare { source, .. } | ApplyError::Database { source, .. } => {
                source.kind()
            }
            ApplyError::Reader { source, .. } => source.kind(),
            ApplyError::Fetch { source, .. } => match source.status() {
                Some(401 | 403) => ErrorKind::Config,
                _ if source.is_retryable() => ErrorKind::Transient,
                _ => ErrorKind::Permanent,
            },
        }
    }
}

/// What went wrong inside one apply transaction.
#[derive(Debug)]
enum Fault {
    Db(tokio_postgres::Error),
    Fetch(SinkError),
}

impl From<tokio_postgres::Error> for Fault {
    fn from(e: tokio_postgres::Error) -> Fault {
        Fault::Db(e)
    }
}

/// A failure of this record's own values, decided by SQLSTATE: class 22
/// (data exception: a value the column's type refuses) and class 23
/// (integrity: NOT NULL, UNIQUE, CHECK). Anything else is the database's
/// passing trouble or the operator's to fix, and the provider retries.
fn is_record_fault(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(c.code().get(..2), Some("22" | "23")))
}

/// How an apply claims its event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A delivery: a known event id is a duplicate.
    New,
    /// Re-evaluating a deferred event; `overdue` applies it even if its
    /// user is still in flight.
    Deferred { overdue: bool },
    /// `usersync dlq replay` of an inbound dead letter.
    DeadLetter,
}

impl Claim {
    fn stored_outcome(self) -> Option<&'static str> {
        match self {
            Claim::New => None,
            Claim::Deferred { .. } => Some("deferred"),
            Claim::DeadLetter => Some("failed"),
        }
    }
}

/// A deferred event due for another look.
#[derive(Debug, Clone)]
pub struct Stored {
    pub event_id: String,
    pub delivery: Delivery,
    /// Deferred for longer than the cap: apply it regardless.
    pub overdue: bool,
}

/// An inbound dead letter as `usersync dlq list` shows it; `body` only
/// where asked for (`dlq show`): it holds personal data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InboundEntry {
    pub source: String,
    pub event_id: String,
    pub event_type: String,
    pub subject: String,
    pub error: String,
    /// RFC 3339, UTC.
    pub received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

/// One source's apply session.
pub struct Applier {
    client: Client,
    source: InboundSource,
    shape: TableShape,
    /// Record the values hash (the source's service is the sink's).
    record_hash: bool,
    reader: RowReader,
    /// The provider's API for fetching an object as it is now, on a tie or
    /// an out-of-order event (the sink's key, when the sink is the source's
    /// service).
    fetcher: Option<Fetcher>,
    claim: Statement,
    reclaim: Statement,
    version: Statement,
    set_version: Statement,
    finish: Statement,
    fail: Statement,
    pushed_hash: Statement,
    sync_log: Option<Statement>,
    by_id: Statement,
    by_key: Statement,
    by_email: Option<Statement>,
    progress: Statement,
    /// (insert, brings a soft-deleted user back, columns) → statement.
    writes: HashMap<(bool, bool, Vec<String>), Statement>,
    /// The `on_delete` statement, once prepared.
    delete: Option<Statement>,
}

/// One statement of a pipeline and what it answers.
type Step<'a> = futures::future::BoxFuture<'a, Result<Out, tokio_postgres::Error>>;

enum Out {
    Done,
    Rows(Vec<tokio_postgres::Row>),
}

impl Out {
    fn rows(self) -> Vec<tokio_postgres::Row> {
        match self {
            Out::Rows(r) => r,
            _ => Vec::new(),
        }
    }
}

/// Runs `steps` as one pipeline on the session: each is polled in order,
/// and tokio-postgres sends a statement on its future's first poll, so
/// the statements reach the server in this order and their answers come
/// back together (one round trip). A failed statement aborts the open
/// transaction, so the ones after it fail too; the first error in order
/// is returned.
async fn pipeline(mut steps: Vec<Step<'_>>) -> Result<Vec<Out>, tokio_postgres::Error> {
    let mut out: Vec<Option<Out>> = steps.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (step, slot) in steps.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match step.as_mut().poll(cx) {
                    std::task::Poll::Ready(Ok(o)) => *slot = Some(o),
                    std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                    std::task::Poll::Pending => {}
                }
            }
        }
        if out.iter().all(Option::is_some) {
            std::task::Poll::Ready(Ok(()))
        } else {
            std::task::Poll::Pending
        }
    })
    .await?;
    Ok(out.into_iter().flatten().collect())
}

/// How an apply's transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The caller ends it (a batch: more records follow in it).
    Open,
    /// COMMIT goes with the record's last statements.
    Commit,
}

/// What an apply came to, and whether its COMMIT was sent and succeeded.
struct Ended {
    /// `None`: a duplicate, nothing written.
    outcome: Option<Applied>,
    committed: bool,
}

/// What an apply decided, before its writes are sent.
enum Plan {
    /// Only the event's outcome is recorded; `set_version` also moves the
    /// object's version (an echo, an unmatched event).
    Record { outcome: Applied, set_version: bool },
    /// The row of `key` is written (or, `key` `None`, inserted; `delete`:
    /// per `on_delete`).
    Write { key: Option<String>, delete: bool },
}

/// Where the current state of a provider's object is read.
enum Fetcher {
    /// `GET /v1/customers/{id}`, `/v1/subscriptions/{id}`,
    /// `/v1/checkout/sessions/{id}`.
    Stripe(StripeSink),
    /// `GET /members/{id}` (a plan connection is read from the member's
    /// `planConnections`).
    Memberstack(MemberstackSink),
}

impl Applier {
    /// Opens the source's session and takes its origin (created if missing,
    /// waiting up to `wait` for a previous holder to go away).
    pub async fn connect(
        cfg: &Config,
        source: &InboundSource,
        shape: &TableShape,
        wait: Duration,
    ) -> Result<Applier, ApplyError> {
        let name = source.name.clone();
        let prep = |context: &'static str| {
            let name = name.clone();
            move |e: tokio_postgres::Error| ApplyError::Prepare {
                source_name: name.clone(),
                source: DbError { context, source: e },
            }
        };
        let client = connect(&cfg.database, &format!("usersync-inbound-{}", source.name)).await?;
        let origin_name = source.origin(&cfg.database.origin);
        ensure_origin(&client, &origin_name)
            .await
            .map_err(prep("creating the source's replication origin"))?;
        match origin::take(&client, &origin_name, wait).await {
            Ok(()) => {}
            Err(OriginError::Busy(e)) => {
                return Err(ApplyError::OriginBusy {
                    origin: origin_name,
                    source: e,
                })
            }
            Err(OriginError::Failed(e)) => {
                return Err(prep("taking the source's replication origin")(e))
            }
        }
        // A row or version held by someone else makes the provider retry
        // later instead of holding the request until it gives up.
        client
            .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
            .await
            .map_err(prep("setting lock_timeout"))?;
        let unknown = |what: &'static str, column: &str| ApplyError::UnknownColumn {
            source_name: source.name.clone(),
            what,
            column: column.to_string(),
            table: shape.table.to_string(),
        };
        for (column, _) in &source.mapping {
            if !shape.has_column(column) {
                return Err(unknown("the mapping", column));
            }
        }
        if !shape.has_column(&source.id_column) {
            return Err(unknown("id_column", &source.id_column));
        }
        if source.on_delete == InboundOnDelete::Unlink {
            // A setup older than the unlink mark: say so at start, not at
            // the first delete.
            client
                .prepare("SELECT 1 FROM usersync.inbound_unlinked LIMIT 0")
                .await
                .map_err(prep(
                    "finding usersync.inbound_unlinked, which on_delete = \"unlink\" needs (run `usersync setup`)",
                ))?;
        }
        if let InboundOnDelete::Soft(c) = &source.on_delete {
            if !shape.has_column(c) {
                return Err(unknown("on_delete = soft(…)", c));
            }
        }
        let table = shape.table.quoted();
        let key = quote_ident(&shape.key_column);
        let id = quote_ident(&source.id_column);
        let p = prep("preparing the inbound statements");
        // The claimed row's ctid: the event's outcome is written to it by
        // that (`finish`), never through an index whose choice a plan cached
        // on an empty table could get wrong (it took the (source,
        // received_at) index once, a scan of every event of the source).
        let claim = client
            .prepare(
                "INSERT INTO usersync.inbound_events (source, event_id, event_type, subject) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING ctid::text",
            )
            .await
            .map_err(p.clone())?;
        // A deferred or dead-lettered event is taken back by the one that
        // re-applies it; a second one finds it taken and does nothing.
        let reclaim = client
            .prepare(
                "UPDATE usersync.inbound_events SET outcome = 'received' \
                 WHERE source = $1 AND event_id = $2 AND outcome = $3 RETURNING ctid::text",
            )
            .await
            .map_err(p.clone())?;
        // Inserting or touching the row locks it: deliveries of one object
        // take turns from here to commit.
        let version = client
            .prepare(
                "INSERT INTO usersync.inbound_versions AS v (source, stream, subject, version) \
                 VALUES ($1, $2, $3, -9223372036854775808) \
                 ON CONFLICT (source, stream, subject) DO UPDATE SET version = v.version \
                 RETURNING version, deleted",
            )
            .await
            .map_err(p.clone())?;
        let set_version = client
            .prepare(
                "UPDATE usersync.inbound_versions SET version = $4, deleted = $5 \
                 WHERE source = $1 AND stream = $2 AND subject = $3",
            )
            .await
            .map_err(p.clone())?;
        // The delivery is kept only while the event may still be applied
        // (deferred, dead letter); an applied event keeps no body.
        let finish = client
            .prepare(
                "UPDATE usersync.inbound_events SET outcome = $3, user_key = $4, error = $5, \
                 body = CASE WHEN $3 IN ('deferred', 'failed') THEN $6::bytea END, \
                 message_id = $7, delivered_at = $8 \
                 WHERE ctid = $9::text::tid AND source = $1 AND event_id = $2",
            )
            .await
            .map_err(p.clone())?;
        // A dead letter after a rolled-back attempt: recorded on its own,
        // never over an event another delivery applied meanwhile.
        let fail = client
            .prepare(
                "INSERT INTO usersync.inbound_events AS e \
                 (source, event_id, event_type, subject, outcome, error, body, message_id, delivered_at) \
                 VALUES ($1, $2, $3, $4, 'failed', $5, $6, $7, $8) \
                 ON CONFLICT (source, event_id) DO UPDATE SET outcome = 'failed', error = $5, \
                 body = $6, message_id = $7, delivered_at = $8 \
                 WHERE e.outcome IN ('received', 'deferred', 'failed')",
            )
            .await
            .map_err(p.clone())?;
        let pushed_hash = client
            .prepare("SELECT values_hash FROM usersync.user_progress WHERE user_key = $1")
            .await
            .map_err(p.clone())?;
        let sync_log = if cfg.sync_log.enabled {
            Some(
                crate::store::synclog::prepare_inbound(&client)
                    .await
                    .map_err(p.clone())?,
            )
        } else {
            None
        };
        // With the user's pushed values hash, for the deferral check.
        let by_id = client
            .prepare(&format!(
                "SELECT u.{key}::text, p.values_hash FROM {table} AS u \
                 LEFT JOIN usersync.user_progress AS p ON p.user_key = u.{key}::text \
                 WHERE u.{id} = $1 LIMIT 2 FOR UPDATE OF u"
            ))
            .await
            .map_err(p.clone())?;
        let by_key = client
            .prepare(&format!(
                "SELECT {key}::text FROM {table} WHERE {key} = $1::text::{} FOR UPDATE",
                shape.key_type
            ))
            .await
            .map_err(p.clone())?;
        let by_email = match (&source.email_column, source.match_email) {
            (Some(c), true) => Some(
                client
                    .prepare(&format!(
                        "SELECT {key}::text, {id} IS NULL FROM {table} WHERE lower({}::text) = lower($1) LIMIT 2 FOR UPDATE",
                        quote_ident(c)
                    ))
                    .await
                    .map_err(p.clone())?,
            ),
            _ => None,
        };
        let progress = client
            .prepare(
                "INSERT INTO usersync.user_progress (user_key, commit_lsn, position, values_hash) \
                 VALUES ($1, '0/0', 0, $2) ON CONFLICT (user_key) DO UPDATE SET values_hash = EXCLUDED.values_hash",
            )
            .await
            .map_err(p)?;
        let reader = RowReader::new(
            &client,
            shape.clone(),
            &cfg.sink.columns,
            &cfg.database.publication,
        )
        .await
        .map_err(|e| ApplyError::Reader {
            source_name: source.name.clone(),
            source: e,
        })?;
        let fetcher = fetcher_for(cfg, source);
        Ok(Applier {
            client,
            source: source.clone(),
            shape: shape.clone(),
            record_hash: source.same_service_as(cfg.sink.kind.name()),
            reader,
            fetcher,
            claim,
            reclaim,
            version,
            set_version,
            finish,
            fail,
            pushed_hash,
            sync_log,
            by_id,
            by_key,
            by_email,
            progress,
            writes: HashMap::new(),
            delete: None,
        })
    }

    pub fn source(&self) -> &InboundSource {
        &self.source
    }

    /// Applies one record in one transaction, without a delivery to keep
    /// (an import): a user whose outbound change is in flight comes back as
    /// [`Applied::Deferred`] with nothing recorded, for the caller to try
    /// again. `Err` only for passing problems; a record that can never
    /// apply comes back as [`Applied::Failed`], recorded under its event id.
    pub async fn apply(&mut self, record: &InboundRecord) -> Result<Applied, ApplyError> {
        self.apply_with(record, None, Claim::New).await
    }

    /// Applies a verified delivery's record. A deferred or failed event is
    /// kept with `delivery`, so the receiver re-applies it when its user's
    /// outbound change is written back, and `usersync dlq replay` after a
    /// fix.
    pub async fn receive(
        &mut self,
        record: &InboundRecord,
        delivery: &Delivery,
    ) -> Result<Applied, ApplyError> {
        self.apply_with(record, Some(delivery), Claim::New).await
    }

    /// Applies several verified deliveries in one transaction, in order,
    /// each with its own claim, version check and outcome, as
    /// [`Applier::receive`] would one by one; the commit makes them all
    /// durable at once, so the per-event BEGIN/COMMIT round trips and WAL
    /// flushes become per-batch ones. `None` when any of them failed (a
    /// value the table refuses, a fetch, the database): nothing was
    /// committed, and the caller applies them one by one, which gives each
    /// its own outcome or error. Events of one provider object in the batch
    /// see each other's writes, as consecutive transactions would.
    pub async fn receive_batch(
        &mut self,
        items: &[(InboundRecord, Delivery)],
    ) -> Option<Vec<Applied>> {
        let mut outcomes = Vec::with_capacity(items.len());
        for (i, (record, delivery)) in items.iter().enumerate() {
            match self
                .in_transaction(record, Some(delivery), Claim::New, i == 0, End::Open)
                .await
            {
                Ok(Ended {
                    outcome: Some(outcome),
                    ..
                }) => outcomes.push(outcome),
                // Claimed already: nothing of this event was written.
                Ok(Ended { outcome: None, .. }) => outcomes.push(Applied::Duplicate),
                Err(_) => {
                    let _ = self.client.batch_execute("ROLLBACK").await;
                    return None;
                }
            }
        }
        match self.client.batch_execute("COMMIT").await {
            Ok(()) => Some(outcomes),
            Err(_) => None,
        }
    }

    /// Whether the session is still connected (a failed batch may have lost
    /// it; then the next apply opens a new one).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Applies a stored event again (`claim`: deferred or a dead letter).
    pub async fn reapply(
        &mut self,
        record: &InboundRecord,
        delivery: &Delivery,
        claim: Claim,
    ) -> Result<Applied, ApplyError> {
        self.apply_with(record, Some(delivery), claim).await
    }

    async fn apply_with(
        &mut self,
        record: &InboundRecord,
        delivery: Option<&Delivery>,
        claim: Claim,
    ) -> Result<Applied, ApplyError> {
        match self.try_apply(record, delivery, claim).await {
            Ok(a) => Ok(a),
            Err(Fault::Db(e)) if is_record_fault(&e) => {
                let reason = error_text(&e);
                let recorded = self
                    .record_failure(
                        &record.event_id,
                        &record.event_type,
                        &record.subject,
                        delivery,
                        &reason,
                    )
                    .await?;
                Ok(if recorded {
                    Applied::Failed(reason)
                } else {
                    Applied::Duplicate
                })
            }
            Err(Fault::Db(e)) => Err(self.unavailable("applying an inbound event")(e)),
            Err(Fault::Fetch(e)) => Err(ApplyError::Fetch {
                source_name: self.source.name.clone(),
                source: e,
            }),
        }
    }

    fn unavailable(
        &self,
        context: &'static str,
    ) -> impl Fn(tokio_postgres::Error) -> ApplyError + '_ {
        move |e| ApplyError::Database {
            source_name: self.source.name.clone(),
            source: DbError { context, source: e },
        }
    }

    /// Records a delivery whose body cannot be read as an event (the same
    /// bytes would come again) as an inbound dead letter. Its id is the
    /// delivery's message id, else a digest of the body.
    pub async fn dead_letter_unreadable(
        &mut self,
        event_id: Option<&str>,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<Applied, ApplyError> {
        use sha2::Digest;
        let event_id = match event_id.or(delivery.message_id.as_deref()) {
            Some(id) if id.len() <= 255 => id.to_string(),
            _ => {
                let digest = sha2::Sha256::digest(&delivery.body);
                let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
                format!("body_{hex}")
            }
        };
        let recorded = self
            .record_failure(&event_id, "unreadable", "", Some(delivery), reason)
            .await?;
        Ok(if recorded {
            Applied::Failed(reason.to_string())
        } else {
            Applied::Duplicate
        })
    }

    async fn record_failure(
        &mut self,
        event_id: &str,
        event_type: &str,
        subject: &str,
        delivery: Option<&Delivery>,
        reason: &str,
    ) -> Result<bool, ApplyError> {
        // No row written: this event already ended otherwise (applied by
        // another delivery, or discarded by `dlq discard`), so this
        // delivery is a duplicate.
        let written = self
            .client
            .execute(
                &self.fail,
                &[
                    &self.source.name,
                    &event_id,
                    &event_type,
                    &subject,
                    &reason,
                    &delivery.map(|d| d.body.as_slice()),
                    &delivery.and_then(|d| d.message_id.as_deref()),
                    &delivery.map(|d| d.delivered_at),
                ],
            )
            .await
            .map_err(self.unavailable("recording an inbound dead letter"))?;
        Ok(written > 0)
    }

    /// Deferred events of this source, oldest first, at most `limit`.
    pub async fn deferred(&self, limit: i64) -> Result<Vec<Stored>, ApplyError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT event_id, body, message_id, coalesce(delivered_at, 0), \
                     received_at < now() - interval '{MAX_DEFERRAL}' \
                     FROM usersync.inbound_events \
                     WHERE source = $1 AND outcome = 'deferred' AND body IS NOT NULL \
                     ORDER BY received_at LIMIT $2"
                ),
                &[&self.source.name, &limit],
            )
            .await
            .map_err(self.unavailable("reading deferred inbound events"))?;
        rows.iter()
            .map(|r| {
                Ok(Stored {
                    event_id: r.try_get(0)?,
                    delivery: Delivery {
                        body: r.try_get(1)?,
                        message_id: r.try_get(2)?,
                        delivered_at: r.try_get(3)?,
                    },
                    overdue: r.try_get(4)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(self.unavailable("reading deferred inbound events"))
    }

    async fn try_apply(
        &mut self,
        record: &InboundRecord,
        delivery: Option<&Delivery>,
        claim: Claim,
    ) -> Result<Applied, Fault> {
        // BEGIN/COMMIT by hand: a `Transaction` would borrow the client for
        // its whole life, and the write statements are cached on `self`.
        // BEGIN goes with the first statements and COMMIT with the last
        // (pipelined), so an event costs three round trips, not ten.
        let result = self
            .in_transaction(record, delivery, claim, true, End::Commit)
            .await;
        match result {
            Ok(Ended {
                outcome: Some(outcome),
                committed: true,
            }) => Ok(outcome),
            // Deferred without a delivery to keep: nothing is recorded, the
            // caller tries again.
            Ok(Ended {
                outcome: Some(Applied::Deferred),
                committed: false,
            }) if delivery.is_none() => {
                self.client.batch_execute("ROLLBACK").await?;
                Ok(Applied::Deferred)
            }
            Ok(Ended {
                outcome: Some(outcome),
                committed: false,
            }) => {
                self.client.batch_execute("COMMIT").await?;
                Ok(outcome)
            }
            Ok(Ended { outcome: None, .. }) => {
                self.client.batch_execute("ROLLBACK").await?;
                Ok(Applied::Duplicate)
            }
            Err(e) => {
                // The session may be gone, or the pipelined COMMIT already
                // rolled back; the error that matters is `e`.
                let _ = self.client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// The transaction's statements, in three round trips where the row is
    /// known: (BEGIN,) the claim, the version lock and the row lock by the
    /// provider's id with the user's pushed values hash, pipelined; then,
    /// once decided, the version, the write, the event's outcome, the sync
    /// log row (and COMMIT with `End::Commit`), pipelined. `outcome` is
    /// `None` for a duplicate.
    async fn in_transaction(
        &mut self,
        record: &InboundRecord,
        delivery: Option<&Delivery>,
        claim: Claim,
        begin: bool,
        end: End,
    ) -> Result<Ended, Fault> {
        let lookups = record.action != Action::Ignore;
        // A source that may fetch the provider's object (on a tie) locks
        // the user's row only after the fetch, as before: an HTTP request
        // must not hold the app's writes to the row.
        let row_early = lookups && self.fetcher.is_none();
        let stream = record.stream.to_string();
        let (claimed, version, by_id) = {
            let this: &Applier = self;
            let c = &this.client;
            let name = &this.source.name;
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(4);
            if begin {
                steps.push(Box::pin(async move {
                    c.batch_execute("BEGIN").await.map(|()| Out::Done)
                }));
            }
            let claim_step: Step<'_> = match claim.stored_outcome() {
                None => Box::pin(async move {
                    c.query(
                        &this.claim,
                        &[name, &record.event_id, &record.event_type, &record.subject],
                    )
                    .await
                    .map(Out::Rows)
                }),
                Some(stored) => Box::pin(async move {
                    c.query(&this.reclaim, &[name, &record.event_id, &stored])
                        .await
                        .map(Out::Rows)
                }),
            };
            steps.push(claim_step);
            if lookups {
                let stream = &stream;
                steps.push(Box::pin(async move {
                    c.query(&this.version, &[name, stream, &record.subject])
                        .await
                        .map(Out::Rows)
                }));
            }
            if row_early {
                steps.push(Box::pin(async move {
                    c.query(&this.by_id, &[&record.subject])
                        .await
                        .map(Out::Rows)
                }));
            }
            let mut out = pipeline(steps).await?.into_iter();
            if begin {
                out.next();
            }
            let claimed = out.next().map(Out::rows).unwrap_or_default();
            let version = out.next().map(Out::rows);
            let by_id = out.next().map(Out::rows);
            (claimed, version, by_id)
        };
        let event_row: String = match claimed.as_slice() {
            [row] => row.try_get(0)?,
            _ => {
                return Ok(Ended {
                    outcome: None,
                    committed: false,
                })
            }
        };
        let (stored, deleted) = match version.as_deref() {
            Some([row]) => (row.try_get(0)?, row.try_get(1)?),
            _ => (i64::MIN, false),
        };
        let by_id = match by_id.as_deref() {
            None => None,
            Some([one]) => Some(Some((one.try_get(0)?, one.try_get(1)?))),
            Some(_) => Some(None),
        };
        let overdue = matches!(claim, Claim::Deferred { overdue: true });
        let reevaluate = matches!(claim, Claim::Deferred { .. });
        let (plan, current) = self
            .decide(record, reevaluate, overdue, (stored, deleted), by_id)
            .await?;
        let record = current.as_ref().unwrap_or(record);
        // Deferred without a delivery (an import): rolled back by the caller.
        let end = match (&plan, delivery) {
            (
                Plan::Record {
                    outcome: Applied::Deferred,
                    ..
                },
                None,
            ) => End::Open,
            _ => end,
        };
        self.carry_out(record, &event_row, plan, delivery, end)
            .await
    }

    /// `reevaluate`: a deferred event's second look, after its user's
    /// outbound change was written back. Where the source can fetch (its
    /// own key, or the sink is its service), that means the provider's
    /// current object, which has the pushed change: the event's own values
    /// are older than it. `version`: the stored version and tombstone,
    /// locked; `by_id`: the row of the provider's id (locked) and its
    /// pushed values hash when already read (`Some(None)`: not exactly one
    /// row). Writes nothing; the fetched object comes back to be written.
    async fn decide(
        &mut self,
        record: &InboundRecord,
        reevaluate: bool,
        overdue: bool,
        version: (i64, bool),
        by_id: Option<Option<(String, Option<String>)>>,
    ) -> Result<(Plan, Option<InboundRecord>), Fault> {
        let done = |outcome: Applied, set_version: bool| Plan::Record {
            outcome,
            set_version,
        };
        if record.action == Action::Ignore {
            return Ok((done(Applied::Ignored, false), None));
        }
        let (stored, deleted) = version;
        let echo = record
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.starts_with("usersync-"));
        // Stripe's `created` has a one-second resolution, and neither
        // provider promises an order: on a tie, on an event older than one
        // applied, and on a deferred event's second look, what counts is
        // the object (customer, subscription, checkout session, member,
        // plan connection) as it is now.
        let tied = stored != i64::MIN && record.version <= stored;
        let mut current = None;
        if let Some(fetcher) = &self.fetcher {
            if !echo && (tied || reevaluate) {
                match self.current(fetcher, record, stored).await? {
                    Some(r) if r.action != Action::Ignore => current = Some(r),
                    // Gone, or nothing mapped reads from it any more.
                    _ => return Ok((done(Applied::Stale, false), None)),
                }
            }
        }
        let r = current.as_ref().unwrap_or(record);
        let is_delete = r.action == Action::Delete;
        if !supersedes((r.version, is_delete), (stored, deleted)) {
            return Ok((done(Applied::Stale, false), None));
        }
        if echo {
            return Ok((done(Applied::Echo, true), None));
        }
        let (found, pushed) = self.find(r, by_id).await?;
        let found = match found {
            Found::Row(key) => Some(key),
            Found::Nothing => None,
            Found::LinkedElsewhere => return Ok((done(Applied::Unmatched, false), current)),
        };
        if let Some(key) = &found {
            if !overdue && self.in_flight(key, pushed).await? {
                return Ok((done(Applied::Deferred, false), current));
            }
        }
        let plan = match (r.action, found) {
            (Action::Delete, None) | (Action::Update, None) => done(Applied::Unmatched, true),
            (Action::Delete, Some(key)) => Plan::Write {
                key: Some(key),
                delete: true,
            },
            (Action::Upsert, None) if self.source.on_create == OnCreate::Ignore => {
                done(Applied::Unmatched, true)
            }
            (_, key) => Plan::Write { key, delete: false },
        };
        Ok((plan, current))
    }

    /// Sends what `plan` writes and the event's outcome, pipelined (one
    /// round trip where the row's key is known; a new row's key comes back
    /// from its INSERT first), with COMMIT last for `End::Commit`.
    async fn carry_out(
        &mut self,
        record: &InboundRecord,
        event_row: &str,
        plan: Plan,
        delivery: Option<&Delivery>,
        end: End,
    ) -> Result<Ended, Fault> {
        let is_delete = record.action == Action::Delete;
        let (outcome, set_version, write) = match plan {
            Plan::Record {
                outcome,
                set_version,
            } => (outcome, set_version, None),
            Plan::Write { key, delete } => {
                let stmt = if delete {
                    self.delete_statement().await?
                } else {
                    Some(self.write_statement(record, key.is_none()).await?)
                };
                (Applied::Applied(String::new()), true, Some((key, stmt)))
            }
        };
        let values = serde_json::Value::Object(record.values.clone());
        let values = &values;
        // A new row: its key comes back from the INSERT, before the rest.
        let mut set_version_sent = false;
        let key = match &write {
            Some((None, Some(insert))) => {
                let c = &self.client;
                let steps: Vec<Step<'_>> = vec![
                    Box::pin(self.set_version_step(record, is_delete)),
                    Box::pin(async move {
                        c.query(insert, &[values, &record.subject])
                            .await
                            .map(Out::Rows)
                    }),
                ];
                let mut out = pipeline(steps).await?.into_iter().skip(1);
                set_version_sent = true;
                match out.next().map(Out::rows).as_deref() {
                    Some([row]) => Some(row.try_get::<_, String>(0)?),
                    _ => None,
                }
            }
            Some((key, _)) => key.clone(),
            None => None,
        };
        let outcome = match (&write, key) {
            (Some(_), Some(key)) => Applied::Applied(key),
            (Some(_), None) => Applied::Unmatched,
            (None, _) => outcome,
        };
        let user_key = match &outcome {
            Applied::Applied(k) => Some(k.as_str()),
            _ => None,
        };
        // The values hash of the row as written, for the sink's own
        // service: read in the transaction after the write.
        let hashed = self.record_hash && user_key.is_some() && !is_delete;
        let update = match (&write, user_key) {
            (Some((Some(_), Some(stmt))), Some(key)) if !set_version_sent => Some((stmt, key)),
            _ => None,
        };
        let commit = end == End::Commit && !hashed;
        let unlink = self.source.on_delete == InboundOnDelete::Unlink;
        let source_name = self.source.name.as_str();
        let committed;
        {
            let c = &self.client;
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(6);
            if set_version && !set_version_sent {
                steps.push(Box::pin(self.set_version_step(record, is_delete)));
            }
            if let Some((stmt, key)) = update {
                steps.push(Box::pin(async move {
                    if is_delete && unlink {
                        c.execute(stmt, &[&key, &source_name, &record.subject])
                            .await
                            .map(|_| Out::Done)
                    } else if is_delete {
                        c.execute(stmt, &[&key]).await.map(|_| Out::Done)
                    } else {
                        c.execute(stmt, &[values, &record.subject, &key])
                            .await
                            .map(|_| Out::Done)
                    }
                }));
            }
            if !hashed {
                self.outcome_steps(&mut steps, record, event_row, &outcome, user_key, delivery);
            }
            if commit {
                steps.push(Box::pin(async move {
                    c.batch_execute("COMMIT").await.map(|()| Out::Done)
                }));
            }
            pipeline(steps).await?;
            committed = commit;
        }
        if hashed {
            if let Some(key) = user_key {
                if let Some(hash) = self.values_hash(key).await? {
                    self.client.execute(&self.progress, &[&key, &hash]).await?;
                }
            }
            let c = &self.client;
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(3);
            self.outcome_steps(&mut steps, record, event_row, &outcome, user_key, delivery);
            let commit = end == End::Commit;
            if commit {
                steps.push(Box::pin(async move {
                    c.batch_execute("COMMIT").await.map(|()| Out::Done)
                }));
            }
            pipeline(steps).await?;
            return Ok(Ended {
                outcome: Some(outcome),
                committed: commit,
            });
        }
        Ok(Ended {
            outcome: Some(outcome),
            committed,
        })
    }

    /// The event's outcome in `inbound_events` and, for a written row, its
    /// sync log row.
    fn outcome_steps<'a>(
        &'a self,
        steps: &mut Vec<Step<'a>>,
        record: &'a InboundRecord,
        event_row: &'a str,
        outcome: &'a Applied,
        user_key: Option<&'a str>,
        delivery: Option<&'a Delivery>,
    ) {
        let c = &self.client;
        let name = &self.source.name;
        steps.push(Box::pin(async move {
            c.execute(
                &self.finish,
                &[
                    name,
                    &record.event_id,
                    &outcome.outcome(),
                    &user_key,
                    &None::<String>,
                    &delivery.map(|d| d.body.as_slice()),
                    &delivery.and_then(|d| d.message_id.as_deref()),
                    &delivery.map(|d| d.delivered_at),
                    &event_row,
                ],
            )
            .await
            .map(|_| Out::Done)
        }));
        if let (Some(log), Some(key)) = (&self.sync_log, user_key) {
            let operation = format!("{}:{}", self.source.name, record.event_type);
            steps.push(Box::pin(async move {
                c.execute(log, &[&record.event_id, &operation, &key, &record.subject])
                    .await
                    .map(|_| Out::Done)
            }));
        }
    }

    async fn set_version_step(
        &self,
        record: &InboundRecord,
        is_delete: bool,
    ) -> Result<Out, tokio_postgres::Error> {
        self.client
            .execute(
                &self.set_version,
                &[
                    &self.source.name,
                    &record.stream,
                    &record.subject,
                    &record.version,
                    &is_delete,
                ],
            )
            .await
            .map(|_| Out::Done)
    }

    /// Whether the user has an outbound change that is not written back:
    /// the synced columns as they are now differ from the values last
    /// pushed (`user_progress.values_hash`, written with each write-back,
    /// and by this apply for the sink's own service). Also covers a change
    /// the stream has not decoded yet. A user never pushed, dead-lettered
    /// or with sync off has no hash and is not held.
    /// `pushed`: the hash when already read with the row.
    async fn in_flight(
        &self,
        key: &str,
        pushed: Option<Option<String>>,
    ) -> Result<bool, tokio_postgres::Error> {
        let pushed: Option<String> = match pushed {
            Some(p) => p,
            None => match self.client.query_opt(&self.pushed_hash, &[&key]).await? {
                Some(r) => r.try_get(0)?,
                None => None,
            },
        };
        let Some(pushed) = pushed else {
            return Ok(false);
        };
        Ok(self
            .values_hash(key)
            .await?
            .is_some_and(|now| now != pushed))
    }

    /// The provider's current object as a record of the same event (its
    /// id and type), at the newer of the two versions; `None` when the
    /// provider has no such object (a Memberstack member that is gone: its
    /// delete event carries the tombstone). A Memberstack delete, and a
    /// plan connection the member no longer lists, are taken as they are:
    /// there is nothing newer to read.
    async fn current(
        &self,
        fetcher: &Fetcher,
        record: &InboundRecord,
        stored: i64,
    ) -> Result<Option<InboundRecord>, Fault> {
        let version = record.version.max(stored);
        let fetch = Fault::Fetch;
        let (kind, envelope, message_id) = match fetcher {
            Fetcher::Stripe(stripe) => {
                let (collection, id) = match (record.stream, record.object_id.as_deref()) {
                    ("customer", _) => ("customers", record.subject.as_str()),
                    ("subscription", Some(id)) => ("subscriptions", id),
                    ("checkout", Some(id)) => ("checkout/sessions", id),
                    _ => return Ok(Some(record.clone())),
                };
                let Some(object) = stripe.retrieve(collection, id).await.map_err(fetch)? else {
                    return Ok(None);
                };
                let deleted =
                    object.get("deleted").and_then(serde_json::Value::as_bool) == Some(true);
                let event_type = match record.stream {
                    "customer" if deleted => "customer.deleted",
                    "customer" => "customer.updated",
                    _ => record.event_type.as_str(),
                };
                let envelope = serde_json::json!({
                    "id": record.event_id,
                    "type": event_type,
                    "created": version.div_euclid(1000),
                    "data": {"object": object},
                });
                (SourceKind::Stripe, envelope, None)
            }
            Fetcher::Memberstack(memberstack) => {
                if record.action == Action::Delete {
                    return Ok(Some(record.clone()));
                }
                let Some(member) = memberstack.member(&record.subject).await.map_err(fetch)? else {
                    return Ok(None);
                };
                let (event_type, payload) = match record.stream {
                    "plan" => {
                        let connection = member
                            .get("planConnections")
                            .and_then(serde_json::Value::as_array)
                            .and_then(|all| {
                                all.iter().find(|c| {
                                    c.get("id").and_then(serde_json::Value::as_str)
                                        == record.object_id.as_deref()
                                })
                            });
                        let Some(connection) = connection else {
                            return Ok(Some(record.clone()));
                        };
                        (
                            record.event_type.as_str(),
                            serde_json::json!({"id": record.subject, "planConnection": connection}),
                        )
                    }
                    _ => ("member.updated", member),
                };
                let envelope = serde_json::json!({
                    "event": event_type,
                    "timestamp": version,
                    "payload": payload,
                });
                (
                    SourceKind::Memberstack,
                    envelope,
                    Some(record.event_id.as_str()),
                )
            }
        };
        let what = record.stream;
        let mut current = parse(
            kind,
            envelope.to_string().as_bytes(),
            message_id,
            0,
            &self.source.mapping,
        )
        .map_err(|e| {
            Fault::Fetch(SinkError::Malformed(format!(
                "the provider's current {what} of {} does not read as one: {e}",
                record.subject
            )))
        })?;
        if current.subject != record.subject || current.stream != record.stream {
            return Err(Fault::Fetch(SinkError::Malformed(format!(
                "asked the provider for the {what} of {}, got another",
                record.subject
            ))));
        }
        current.event_type = record.event_type.clone();
        Ok(Some(current))
    }

    /// The row's key: by the provider's id, then the back-reference
    /// usersync's sinks store, then (when enabled) the email. An ambiguous
    /// email matches nothing.
    /// `by_id`: the provider's id already looked up (and locked) with the
    /// first statements: exactly one row (its key and pushed values hash)
    /// or not. A row found by id comes back with its pushed values hash.
    async fn find(
        &self,
        record: &InboundRecord,
        by_id: Option<Option<(String, Option<String>)>>,
    ) -> Result<(Found, Option<Option<String>>), tokio_postgres::Error> {
        let tx = &self.client;
        match by_id {
            Some(Some((key, pushed))) => return Ok((Found::Row(key), Some(pushed))),
            Some(None) => {}
            None => {
                let rows = tx.query(&self.by_id, &[&record.subject]).await?;
                if let [one] = rows.as_slice() {
                    return Ok((Found::Row(one.try_get(0)?), Some(one.try_get(1)?)));
                }
            }
        }
        if let Some(back) = record.back_ref.as_deref().filter(|b| self.key_text_fits(b)) {
            let rows = tx.query(&self.by_key, &[&back]).await?;
            if let Some(one) = rows.first() {
                return Ok((Found::Row(one.try_get(0)?), None));
            }
        }
        if let (Some(stmt), Some(email)) = (&self.by_email, record.email.as_deref()) {
            let rows = tx.query(stmt, &[&email]).await?;
            if let [one] = rows.as_slice() {
                // A row linked to another record of this source is that
                // record's: taking it would leave the other one without a
                // row (and, for the sink's service, a second record for the
                // user). Nor is a new row made for the same email.
                let unlinked: bool = one.try_get(1)?;
                return Ok((
                    if unlinked {
                        Found::Row(one.try_get(0)?)
                    } else {
                        Found::LinkedElsewhere
                    },
                    None,
                ));
            }
        }
        Ok((Found::Nothing, None))
    }

    /// Whether a back-reference can be the key's text at all, so a hostile
    /// metadata value never reaches a failing cast.
    fn key_text_fits(&self, s: &str) -> bool {
        let ty = self
            .shape
            .key_type
            .split('(')
            .next()
            .unwrap_or_default()
            .trim();
        match ty {
            "smallint" => s.parse::<i16>().is_ok(),
            "integer" => s.parse::<i32>().is_ok(),
            "bigint" => s.parse::<i64>().is_ok(),
            "uuid" => {
                s.len() == 36
                    && s.char_indices().all(|(i, c)| {
                        if matches!(i, 8 | 13 | 18 | 23) {
                            c == '-'
                        } else {
                            c.is_ascii_hexdigit()
                        }
                    })
            }
            _ => !s.is_empty() && s.len() <= 255,
        }
    }

    /// The statement that updates a row (`$3`: its key) or inserts one
    /// (`insert`) with the record's values (`$1`, jsonb) and the provider's
    /// id (`$2`); columns the event does not carry stay as they are (or
    /// take their defaults). Prepared once per column set.
    async fn write_statement(
        &mut self,
        record: &InboundRecord,
        insert: bool,
    ) -> Result<Statement, tokio_postgres::Error> {
        let mut columns: Vec<String> = record.values.keys().cloned().collect();
        columns.sort();
        // Subscription and plan state of a soft-deleted user does not
        // bring the user back; only the user object's own events do.
        let revive = record.action == Action::Upsert;
        if let Some(s) = self.writes.get(&(insert, revive, columns.clone())) {
            return Ok(s.clone());
        }
        let sql = self.write_sql(insert, revive, &columns);
        let s = self.client.prepare(&sql).await?;
        self.writes.insert((insert, revive, columns), s.clone());
        Ok(s)
    }

    fn write_sql(&self, insert: bool, revive: bool, columns: &[String]) -> String {
        let table = self.shape.table.quoted();
        let key = quote_ident(&self.shape.key_column);
        let id = quote_ident(&self.source.id_column);
        // jsonb_populate_record converts each JSON value with the column's
        // own input function, so every type the table uses is handled by
        // PostgreSQL, and a value the type refuses fails this record only.
        let from = format!("jsonb_populate_record(NULL::{table}, $1::jsonb) AS r");
        let soft = match &self.source.on_delete {
            InboundOnDelete::Soft(c) if revive && !columns.contains(c) => Some(quote_ident(c)),
            _ => None,
        };
        if insert {
            let names: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
            let picks: Vec<String> = columns
                .iter()
                .map(|c| format!("r.{}", quote_ident(c)))
                .collect();
            let mut cols = names.join(", ");
            let mut vals = picks.join(", ");
            if !cols.is_empty() {
                cols.push_str(", ");
                vals.push_str(", ");
            }
            format!(
                "INSERT INTO {table} ({cols}{id}) SELECT {vals}$2::text FROM {from} RETURNING {key}::text"
            )
        } else {
            let mut sets: Vec<String> = columns
                .iter()
                .map(|c| format!("{0} = r.{0}", quote_ident(c)))
                .collect();
            sets.push(format!("{id} = $2::text"));
            // A newer create or update after a delete brings the user back.
            if let Some(soft) = soft {
                sets.push(format!("{soft} = NULL"));
            }
            format!(
                "UPDATE {table} AS u SET {} FROM {from} WHERE u.{key} = $3::text::{}",
                sets.join(", "),
                self.shape.key_type
            )
        }
    }

    /// What the provider deleting the user does to the row (`$1`: its
    /// key), per `on_delete`; `None` for `ignore`. Prepared once.
    async fn delete_statement(&mut self) -> Result<Option<Statement>, tokio_postgres::Error> {
        if let Some(s) = &self.delete {
            return Ok(Some(s.clone()));
        }
        let table = self.shape.table.quoted();
        let k = quote_ident(&self.shape.key_column);
        let where_key = format!("WHERE {k} = $1::text::{}", self.shape.key_type);
        let sql = match &self.source.on_delete {
            InboundOnDelete::Soft(c) => {
                format!("UPDATE {table} SET {} = now() {where_key}", quote_ident(c))
            }
            // `$2`, `$3`: the source's name and the record's id, for the
            // mark `reconcile --from` reads (see UNLINKED_DDL).
            InboundOnDelete::Unlink => format!(
                "WITH u AS (UPDATE {table} SET {} = NULL {where_key} RETURNING {k}::text AS k) \
                 INSERT INTO usersync.inbound_unlinked AS x (source, user_key, external_id) \
                 SELECT $2::text, k, $3::text FROM u \
                 ON CONFLICT (source, user_key) DO UPDATE \
                 SET external_id = EXCLUDED.external_id, unlinked_at = now()",
                quote_ident(&self.source.id_column)
            ),
            InboundOnDelete::Delete => format!("DELETE FROM {table} {where_key}"),
            InboundOnDelete::Ignore => return Ok(None),
        };
        let s = self.client.prepare(&sql).await?;
        self.delete = Some(s.clone());
        Ok(Some(s))
    }

    /// The hash `backfill` compares: the row as the stream would push it.
    async fn values_hash(&self, key: &str) -> Result<Option<String>, tokio_postgres::Error> {
        match self.reader.read_in(&self.client, key).await {
            Ok(Some(row)) => Ok(Some(crate::core::outcome::values_hash(&row.data))),
            Ok(None) => Ok(None),
            Err(crate::store::rows::InTxError::Db(e)) => Err(e),
            // A value the stream could not decode either: no hash, so
            // backfill pushes (and dead-letters) it as it would anyway.
            Err(crate::store::rows::InTxError::Value) => Ok(None),
        }
    }
}

/// Where a Stripe or Memberstack source reads an object as it is now: its
/// own API key and URL (`api_key_env`, `api_url`, `api_rate_limit_per_sec`)
/// when set, else the sink's when the sink pushes to the same service;
/// `None` otherwise (Clerk and Standard Webhooks sources never fetch).
fn fetcher_for(cfg: &Config, source: &InboundSource) -> Option<Fetcher> {
    if let Some(api) = &source.api {
        let mut policy = cfg.sink.clone();
        policy.rate_limit_per_sec = api.rate_limit_per_sec;
        let made = match source.kind {
            SourceKind::Stripe => {
                StripeSink::reader(&policy, &api.url, api.key.clone()).map(Fetcher::Stripe)
            }
            SourceKind::Memberstack => MemberstackSink::reader(&policy, &api.url, api.key.clone())
                .map(Fetcher::Memberstack),
            SourceKind::Clerk | SourceKind::Standard => return None,
        };
        return made.ok();
    }
    match (source.kind, cfg.sink.kind.name()) {
        (SourceKind::Stripe, "stripe") => StripeSink::new(&cfg.sink).ok().map(Fetcher::Stripe),
        (SourceKind::Memberstack, "memberstack") => MemberstackSink::new(&cfg.sink)
            .ok()
            .map(Fetcher::Memberstack),
        _ => None,
    }
}

/// The row a record matches.
enum Found {
    Row(String),
    Nothing,
    /// The only row with the record's email holds another record's id.
    LinkedElsewhere,
}

/// Creates the origin if it does not exist yet (setup creates it too).
async fn ensure_origin(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_replication_origin_create($1) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&name],
        )
        .await
        .map(|_| ())
}

/// Whether `source` has deferred events waiting (left by an earlier run).
pub async fn deferred_waiting(client: &Client, source: &str) -> Result<bool, DbError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM usersync.inbound_events \
             WHERE source = $1 AND outcome = 'deferred')",
            &[&source],
        )
        .await
        .map_err(DbError::ctx("reading deferred inbound events"))?;
    row.try_get(0)
        .map_err(DbError::ctx("reading deferred inbound events"))
}

const ENTRY_COLUMNS: &str =
    "source, event_id, event_type, subject, coalesce(error, ''), received_at";

fn entry(
    row: &tokio_postgres::Row,
    with_body: bool,
) -> Result<InboundEntry, tokio_postgres::Error> {
    let received: std::time::SystemTime = row.try_get(5)?;
    let us = received
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let body = if with_body {
        let bytes: Option<Vec<u8>> = row.try_get(6)?;
        // Shown as JSON when it is JSON, else as text.
        bytes.map(|b| {
            serde_json::from_slice(&b).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&b).into_owned())
            })
        })
    } else {
        None
    };
    Ok(InboundEntry {
        source: row.try_get(0)?,
        event_id: row.try_get(1)?,
        event_type: row.try_get(2)?,
        subject: row.try_get(3)?,
        error: row.try_get(4)?,
        received_at: crate::core::change::format_time_us(us),
        body,
    })
}

/// Inbound dead letters (of one source, if given), oldest first, without
/// bodies. Empty when the table does not exist (an older setup).
pub async fn dead_letters(
    client: &Client,
    source: Option<&str>,
) -> Result<Vec<InboundEntry>, DbError> {
    let ctx = DbError::ctx("reading inbound dead letters");
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('usersync.inbound_events') IS NOT NULL",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(ctx)?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT {ENTRY_COLUMNS} FROM usersync.inbound_events \
                 WHERE outcome = 'failed' AND ($1::text IS NULL OR source = $1) \
                 ORDER BY received_at, source, event_id"
            ),
            &[&source],
        )
        .await
        .map_err(ctx)?;
    rows.iter()
        .map(|r| entry(r, false))
        .collect::<Result<_, _>>()
        .map_err(ctx)
}

/// One inbound dead letter with its body.
pub async fn dead_letter(
    client: &Client,
    source: &str,
    event_id: &str,
) -> Result<Option<InboundEntry>, DbError> {
    let ctx = DbError::ctx("reading an inbound dead letter");
    let row = client
        .query_opt(
            &format!(
                "SELECT {ENTRY_COLUMNS}, body FROM usersync.inbound_events \
                 WHERE outcome = 'failed' AND source = $1 AND event_id = $2"
            ),
            &[&source, &event_id],
        )
        .await
        .map_err(ctx)?;
    row.map(|r| entry(&r, true)).transpose().map_err(ctx)
}

/// Gives an inbound dead letter up: its kept body is dropped and its
/// outcome becomes `discarded`. The row stays, so a redelivery of the same
/// event by the provider is still a duplicate and is not applied. `false`
/// when there is no such dead letter.
pub async fn discard_dead_letter(
    client: &Client,
    source: &str,
    event_id: &str,
) -> Result<bool, DbError> {
    let n = client
        .execute(
            "UPDATE usersync.inbound_events SET outcome = 'discarded', body = NULL \
             WHERE outcome = 'failed' AND source = $1 AND event_id = $2",
            &[&source, &event_id],
        )
        .await
        .map_err(DbError::ctx("discarding an inbound dead letter"))?;
    Ok(n > 0)
}

/// A dead letter's stored delivery, for a replay.
pub async fn dead_letter_delivery(
    client: &Client,
    source: &str,
    event_id: &str,
) -> Result<Option<Delivery>, DbError> {
    let ctx = DbError::ctx("reading an inbound dead letter");
    let row = client
        .query_opt(
            "SELECT body, message_id, coalesce(delivered_at, 0) FROM usersync.inbound_events \
             WHERE outcome = 'failed' AND source = $1 AND event_id = $2 AND body IS NOT NULL",
            &[&source, &event_id],
        )
        .await
        .map_err(ctx)?;
    row.map(|r| {
        Ok(Delivery {
            body: r.try_get(0)?,
            message_id: r.try_get(1)?,
            delivered_at: r.try_get(2)?,
        })
    })
    .transpose()
    .map_err(ctx)
}

/// Hands a dead letter to the running receiver, which re-applies it like
/// a deferred event; false when there is no such dead letter.
pub async fn requeue(client: &Client, source: &str, event_id: &str) -> Result<bool, DbError> {
    client
        .execute(
            "UPDATE usersync.inbound_events SET outcome = 'deferred', received_at = now() \
             WHERE outcome = 'failed' AND source = $1 AND event_id = $2 AND body IS NOT NULL",
            &[&source, &event_id],
        )
        .await
        .map(|n| n == 1)
        .map_err(DbError::ctx(
            "handing an inbound dead letter to the receiver",
        ))
}
