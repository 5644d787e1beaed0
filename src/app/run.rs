//! `usersync run`: checks the database, then wires reader → pipeline →
//! write-back and keeps them running. A lost connection or a sink that stays
//! down tears the session down and starts a new one from the slot's confirmed
//! position (nothing past it was acknowledged, so nothing is lost); a
//! configuration or schema problem stops the daemon with one message.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::error::{Classify, ErrorKind};
use crate::core::outcome::SyncReport;
use crate::core::table::TableShape;
use crate::pipeline::{Channels, Pipeline, PipelineError};
use crate::sink::Sink;
use crate::source::rows::RowBuilder;
use crate::source::stream::{self, Reader, SourceError};
use crate::store::db::{connect, ConnectError};
use crate::store::deadletter::{self, DeadLetterError};
use crate::store::lanes::{LaneStoreError, PgLaneStore};
use crate::store::progress::ProgressError;
use crate::store::schema::{self, SchemaError};
use crate::store::writeback::{WritebackError, Writer};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("sink.columns or [sink.mapping] names column {column}, which {table} does not have")]
    UnknownColumn { column: String, table: String },
    #[error("{0}")]
    Sink(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Writeback(#[from] WritebackError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    #[error(transparent)]
    Lanes(#[from] LaneStoreError),
    #[error(transparent)]
    Inbound(#[from] crate::app::inbound::InboundError),
    /// Every host of a multi-host database.url that answered is a standby:
    /// a promotion is under way, or the URL lists no primary.
    #[error("no host of database.url ({0}, …) is a primary now: each one that answered is a standby in recovery; waiting for a promotion")]
    NoPrimary(String),
    /// A session ended with an error that reconnecting cannot fix.
    #[error("{0}; usersync stopped, because retrying cannot fix this")]
    Stopped(Box<RunError>),
}

impl Classify for RunError {
    /// Decided by the innermost cause (SQLSTATE, status); see
    /// `core::error`. A session that fails for good after streaming has
    /// begun is a runtime failure (exit 1), even when its cause is the
    /// operator's to fix: the setup was right when the daemon started.
    fn kind(&self) -> ErrorKind {
        match self {
            RunError::Connect(e) => e.kind(),
            RunError::Schema(e) => e.kind(),
            RunError::UnknownColumn { .. } | RunError::Sink(_) => ErrorKind::Config,
            RunError::Source(e) => e.kind(),
            RunError::Pipeline(e) => e.kind(),
            RunError::Writeback(e) => e.kind(),
            RunError::Progress(e) => e.kind(),
            RunError::DeadLetters(e) => e.kind(),
            RunError::Lanes(e) => e.kind(),
            RunError::Inbound(e) => e.kind(),
            RunError::Stopped(_) => ErrorKind::Permanent,
            RunError::NoPrimary(_) => ErrorKind::Transient,
        }
    }
}

/// The metrics endpoint (`metrics.listen`) and, with it, the lag poller
/// that feeds its lag figure; both until `cancel` fires. `None` when off.
pub async fn serve_metrics(
    cfg: &Config,
    cancel: CancellationToken,
) -> Result<Option<crate::observe::metrics::Server>, crate::observe::metrics::MetricsError> {
    let server = crate::observe::metrics::serve(cfg, cancel.clone()).await?;
    if server.is_some() {
        crate::store::lag::spawn_poller(cfg.database.clone(), cancel);
        crate::app::page::install(cfg);
    }
    Ok(server)
}

/// Runs until `cancel` fires. `reports` receives every completed sync (the demo prints them).
pub async fn run(
    cfg: &Config,
    cancel: CancellationToken,
    reports: Option<mpsc::UnboundedSender<SyncReport>>,
) -> Result<(), RunError> {
    let sink = crate::sink::build(&cfg.sink).map_err(RunError::Sink)?;
    run_with_sink(cfg, sink, cancel, reports).await
}

/// `run` with any sink (benchmarks use a null sink). Not elected: the CLI
/// and the demo go through `app::leader`.
pub async fn run_with_sink(
    cfg: &Config,
    sink: Arc<dyn Sink>,
    cancel: CancellationToken,
    reports: Option<mpsc::UnboundedSender<SyncReport>>,
) -> Result<(), RunError> {
    run_with_switch(cfg, sink, cancel, reports, None).await
}

/// `run` with the off switch driven from outside (`usersync run` flips it
/// on SIGHUP); without one, `[sync] enabled` holds for the whole run. One
/// leadership term: `app::leader::run_elected` calls it while this daemon
/// leads, with `cancel` firing when leadership ends.
pub async fn run_with_switch(
    cfg: &Config,
    sink: Arc<dyn Sink>,
    cancel: CancellationToken,
    reports: Option<mpsc::UnboundedSender<SyncReport>>,
    switch: Option<watch::Receiver<bool>>,
) -> Result<(), RunError> {
    // The first check fails fast: a wrong setup is reported, not retried.
    let shape = prepare(cfg).await?;
    check_sink(cfg, sink.as_ref()).await?;
    crate::store::synclog::start(cfg, cancel.clone());
    // The inbound receiver (when `[inbound]` has sources) runs beside the
    // stream on its own sessions, for the whole run.
    crate::app::inbound::start(cfg, &shape, cancel.clone()).await?;
    crate::store::requests::spawn_pruner(cfg.database.clone(), cancel.clone());
    if let Some(every) = cfg.reconcile.every {
        crate::app::reconcile::spawn_periodic(cfg.clone(), every, cancel.clone());
    }
    let (_fixed, fixed_rx) = watch::channel(cfg.sync.enabled);
    let switch = switch.unwrap_or(fixed_rx);
    if cfg.backfill.on_start {
        crate::app::backfill::spawn_beside_daemon(cfg.clone(), cancel.clone());
    }
    let mut delay = Duration::from_millis(500);
    let mut shape = Some(shape);
    loop {
        let current = match shape.take() {
            Some(s) => s,
            None => match prepare(cfg).await {
                Ok(s) => s,
                Err(e) if e.kind().is_transient() => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot start a session yet");
                    if sleep_or_cancel(delay, &cancel).await {
                        return Ok(());
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                    continue;
                }
                Err(e) => return Err(RunError::Stopped(Box::new(e))),
            },
        };
        let started = std::time::Instant::now();
        match session(
            cfg,
            &current,
            Arc::clone(&sink),
            cancel.clone(),
            reports.clone(),
            switch.clone(),
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(e) if e.kind().is_transient() => {
                if started.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_millis(500);
                }
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "session ended; restarting from the slot's confirmed position");
                if sleep_or_cancel(delay, &cancel).await {
                    return Ok(());
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(RunError::Stopped(Box::new(explain(cfg, e).await))),
        }
    }
}

/// A session that failed for good may have failed because of the slot (the
/// server's "can no longer get changes from replication slot", 55000, names
/// no fix): the preflight's slot check says what happened and what to run.
async fn explain(cfg: &Config, e: RunError) -> RunError {
    match prepare(cfg).await {
        Err(RunError::Schema(
            found @ (SchemaError::SlotInvalidated { .. } | SchemaError::SlotMissing(_)),
        )) => RunError::Schema(found),
        _ => e,
    }
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// A wrong API key is refused before anything is consumed; an unreachable
/// service is only a warning (pushes retry, nothing is lost).
pub async fn check_sink(cfg: &Config, sink: &dyn Sink) -> Result<(), RunError> {
    match sink.check().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.status(), Some(401 | 403)) => Err(RunError::Sink(format!(
            "the {} API rejected the API key from {} ({e}); check that it is a valid key with access",
            sink.name(),
            cfg.sink.api_key_source
        ))),
        Err(e) => {
            tracing::warn!(sink = sink.name(), error = %e, "the sink is not reachable yet; pushes will retry");
            Ok(())
        }
    }
}

/// Preflight: everything the session needs exists and has the right shape.
pub async fn prepare(cfg: &Config) -> Result<TableShape, RunError> {
    let client = connect(&cfg.database, "usersync-check").await?;
    let shape = schema::preflight(&client, &cfg.database).await?;
    for column in &cfg.sink.columns {
        if !shape.has_column(column) {
            return Err(RunError::UnknownColumn {
                column: column.clone(),
                table: shape.table.to_string(),
            });
        }
    }
    Ok(shape)
}

async fn session(
    cfg: &Config,
    shape: &TableShape,
    sink: Arc<dyn Sink>,
    cancel: CancellationToken,
    reports: Option<mpsc::UnboundedSender<SyncReport>>,
    switch: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let db = connect(&cfg.database, "usersync").await?;
    let parked: HashSet<String> = deadletter::parked_users(&db).await?.into_iter().collect();
    if !parked.is_empty() {
        tracing::warn!(
            users = parked.len(),
            "users with dead letters are parked; see `usersync dlq list`"
        );
    }
    let done = crate::store::progress::load(&db, &cfg.database.origin, &cfg.database.slot).await?;
    if !done.users.is_empty() {
        tracing::info!(
            users = done.users.len(),
            "changes written back before the last stop are skipped when replayed"
        );
    }
    let mut types = crate::source::value::TypeRegistry::default();
    crate::store::types::load_kinds(&db, &shape.table, &mut types)
        .await
        .map_err(WritebackError::from)?;
    let not_streamed = crate::store::catalog::unstreamed_generated_columns(
        &db,
        &shape.table.quoted(),
        &cfg.database.publication,
    )
    .await
    .map_err(crate::store::db::DbError::ctx(
        "reading the generated columns",
    ))
    .map_err(WritebackError::from)?;
    // Taking the origin waits up to 30 s for a predecessor's session to let
    // go; a stop or a lost leadership ends that wait at once (the new leader
    // is the one who needs the origin).
    let writer = tokio::select! {
        w = Writer::connect(&cfg.database, shape, cfg.writeback.batch_size) => w?,
        _ = cancel.cancelled() => return Ok(()),
    };
    // A multi-host database.url: the replication connection goes to the
    // host that is a primary now (after a failover, the promoted one).
    let (host, port) = crate::store::db::primary_endpoint(&cfg.database)
        .await?
        .ok_or_else(|| RunError::NoPrimary(cfg.database.describe()))?;
    let mut target = cfg.database.clone();
    target.host = host;
    target.port = port;
    let client = stream::open(&target, "usersync").await?;
    tracing::info!(
        slot = %cfg.database.slot,
        publication = %cfg.database.publication,
        table = %shape.table,
        database = %target.describe(),
        "streaming"
    );
    let _streaming = crate::observe::metrics::streaming();
    let reader = Reader {
        client,
        rows: RowBuilder::new(
            shape.table.clone(),
            shape.key_column.clone(),
            &cfg.sink.columns,
        )
        .with_types(types)
        .with_not_streamed(not_streamed)
        .with_table_columns(shape.columns.iter().map(|(c, _)| c.as_str())),
        origin: cfg.database.origin.clone(),
        echo_origins: crate::app::inbound::echo_origins(cfg)
            .into_iter()
            .chain(crate::app::import::echo_origins(cfg))
            .collect(),
        target: target.describe(),
    };
    let (source_tx, source_rx) = mpsc::channel(1024);
    let (write_tx, write_rx) = mpsc::channel(cfg.writeback.batch_size * 4);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = watch::channel(0u64);
    let session_cancel = cancel.child_token();

    let reader_cancel = session_cancel.clone();
    let mut reader_task = tokio::spawn(reader.run(source_tx, ack_rx, reader_cancel));
    let mut writer_task = tokio::spawn(writer.run(write_rx, done_tx, reports));
    let pipeline = Pipeline {
        sink,
        retry: cfg.retry.clone(),
        max_in_flight: cfg.sink.max_in_flight,
        max_buffered: cfg.pipeline.max_buffered_changes,
        log_personal_data: cfg.log.personal_data,
        store: Arc::new(PgLaneStore::connect(cfg, shape, db).await?),
        sync_enabled: Some(switch),
    };
    let channels = Channels {
        source: source_rx,
        writer: write_tx,
        written: done_rx,
        acks: ack_tx,
    };
    let pipeline_cancel = session_cancel.clone();
    let mut writer_ended = false;
    let outcome: Result<(), RunError> = tokio::select! {
        r = pipeline.run(channels, parked, done, pipeline_cancel) => r.map_err(RunError::from),
        r = &mut reader_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        },
        r = &mut writer_task => {
            writer_ended = true;
            match r {
                Ok(Ok(())) => Err(PipelineError::WriterGone.into()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
    };
    // The pipeline sees a failed writer only as its closed channel, and can
    // see it before the writer's result is in: the writer's own error says
    // what failed and whether retrying can fix it (a refused write-back
    // stops `run`; "the write-back task stopped" alone would be retried
    // forever).
    let outcome = match outcome {
        Err(RunError::Pipeline(PipelineError::WriterGone)) if !writer_ended => {
            match tokio::time::timeout(Duration::from_secs(5), &mut writer_task).await {
                Ok(Ok(Err(e))) => Err(e.into()),
                Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                _ => Err(PipelineError::WriterGone.into()),
            }
        }
        other => other,
    };
    // The pipeline also ends when the reader's channel closes: without a
    // stop request, that is the stream failing, not a clean stop.
    let outcome = match outcome {
        Ok(()) if !cancel.is_cancelled() => {
            let reader = tokio::time::timeout(Duration::from_secs(5), &mut reader_task).await;
            Err(match reader {
                Ok(Ok(Err(e))) => RunError::Source(e),
                _ => RunError::Source(SourceError::Ended),
            })
        }
        other => other,
    };
    session_cancel.cancel();
    if outcome.is_ok() && !reader_task.is_finished() {
        // The reader passes the last acknowledgement to the server, then ends.
        match tokio::time::timeout(Duration::from_secs(10), &mut reader_task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "while confirming the last position"),
            Ok(_) => {}
            Err(_) => tracing::warn!("the last confirmed position may not have reached the server; those changes are replayed next start"),
        }
    }
    reader_task.abort();
    writer_task.abort();
    outcome
}
