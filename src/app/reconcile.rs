//! `usersync reconcile`: reads both sides, the users table (`store::reconcile`)
//! and the sink's service through its list API (`sink::list`), matches them
//! (by the row's external id, else by the record's back-reference to the
//! row key, as the sinks link records) and reports per user what differs:
//! only in the table, only in the service, linked to a record that no
//! longer exists, mapped values that differ, one record claimed by two rows.
//! `--fix push` queues a sync request per fixable row, so the running
//! daemon pushes it in the user's own lane, ordered with live changes and
//! dead-lettered as usual.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::table::CurrentRow;
use crate::observe::progress::Progress;
use crate::sink::list::{ExternalRecord, Lister};
use crate::sink::mapping::as_text;
use crate::sink::SinkError;
use crate::store::db::{connect, ConnectError};
use crate::store::requests::{self, RequestError};
use crate::store::rows::{RowError, RowReader, SESSION_SETTINGS};
use crate::store::schema::{self, SchemaError};

/// Rows per chunk of the table scan.
const SCAN_CHUNK: usize = 1000;
/// How long `--fix push` waits for the daemon to work off its requests.
const FIX_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Rows(#[from] RowError),
    #[error(transparent)]
    Requests(#[from] RequestError),
    #[error("{0}")]
    Config(String),
    #[error("listing the service's records: {0}")]
    List(#[source] SinkError),
    #[error("no daemon is streaming from replication slot {0}: --fix push queues sync requests, which `usersync run` pushes; start it and run reconcile again")]
    NoDaemon(String),
    #[error("the daemon did not work off the {0} queued fix(es) in time; they stay queued")]
    FixTimeout(usize),
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Import(#[from] crate::app::import::ImportError),
}

impl crate::core::error::Classify for ReconcileError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        use crate::core::error::ErrorKind;
        match self {
            ReconcileError::Connect(e) => e.kind(),
            ReconcileError::Schema(e) => e.kind(),
            ReconcileError::Rows(e) => e.kind(),
            ReconcileError::Requests(e) => e.kind(),
            ReconcileError::Config(_) => ErrorKind::Config,
            ReconcileError::Import(e) => e.kind(),
            ReconcileError::List(_)
            | ReconcileError::NoDaemon(_)
            | ReconcileError::FixTimeout(_)
            | ReconcileError::Interrupted => ErrorKind::Permanent,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// A row with no record: never pushed, or its record was never made.
    OnlyInTable,
    /// A record no row links to or is keyed by.
    OnlyInService,
    /// A row whose external id names a record that no longer exists.
    LinkedMissing,
    /// A linked pair whose mapped values differ.
    FieldsDiffer,
    /// One external id stored in two or more rows.
    ClaimedTwice,
}

impl DriftKind {
    pub const ALL: [DriftKind; 5] = [
        DriftKind::OnlyInTable,
        DriftKind::OnlyInService,
        DriftKind::LinkedMissing,
        DriftKind::FieldsDiffer,
        DriftKind::ClaimedTwice,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::OnlyInTable => "only_in_table",
            DriftKind::OnlyInService => "only_in_service",
            DriftKind::LinkedMissing => "linked_missing",
            DriftKind::FieldsDiffer => "fields_differ",
            DriftKind::ClaimedTwice => "claimed_twice",
        }
    }
}

/// One difference. Values themselves are not reported (personal data);
/// the field paths that differ are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub kind: DriftKind,
    /// The row's key (claimed twice: every claiming row's key).
    pub user_keys: Vec<String>,
    pub external_id: Option<String>,
    /// Fields differ: the mapped field paths whose values differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub rows: u64,
    pub records: u64,
    pub counts: BTreeMap<&'static str, u64>,
    pub drifts: Vec<Drift>,
    /// `--fix push`: sync requests queued and their outcomes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed: Option<BTreeMap<String, u64>>,
}

impl Report {
    pub fn in_agreement(&self) -> bool {
        self.drifts.is_empty()
    }

    /// `12 rows, 11 records: 1 only_in_table, 0 only_in_service, …`
    pub fn summary_line(&self) -> String {
        let counts: Vec<String> = DriftKind::ALL
            .iter()
            .map(|k| {
                format!(
                    "{} {}",
                    self.counts.get(k.as_str()).unwrap_or(&0),
                    k.as_str()
                )
            })
            .collect();
        format!(
            "{} rows, {} records: {}; {}",
            self.rows,
            self.records,
            counts.join(", "),
            if self.in_agreement() {
                "in agreement"
            } else {
                "NOT in agreement"
            }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    Push,
    Pull,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub fix: Option<Fix>,
    /// Compare with an inbound source (its name or kind) through its
    /// `[inbound]` mapping instead of the sink's service. `--fix pull`
    /// without it uses the source of the sink's own service.
    pub from: Option<String>,
    /// Log lines instead of a bar even on a terminal.
    pub quiet: bool,
}

/// Compares the two sides. `field` reads a mapped path from a record.
pub fn compare(
    rows: &[CurrentRow],
    records: &[ExternalRecord],
    mapping: &[(String, String)],
    field: impl Fn(&ExternalRecord, &str) -> Option<String>,
) -> Vec<Drift> {
    let live: Vec<&ExternalRecord> = records.iter().filter(|r| !r.marked_deleted).collect();
    let by_id: HashMap<&str, &ExternalRecord> =
        records.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut by_key: HashMap<&str, Vec<&ExternalRecord>> = HashMap::new();
    for r in &live {
        if let Some(k) = &r.key {
            by_key.entry(k.as_str()).or_default().push(r);
        }
    }
    let mut claims: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for row in rows {
        if let Some(id) = &row.external_id {
            claims
                .entry(id.as_str())
                .or_default()
                .push(row.key.text.as_str());
        }
    }
    let mut drifts = Vec::new();
    let mut used: HashSet<&str> = claims.keys().copied().collect();
    for (id, keys) in &claims {
        if keys.len() > 1 {
            drifts.push(Drift {
                kind: DriftKind::ClaimedTwice,
                user_keys: keys.iter().map(|k| k.to_string()).collect(),
                external_id: Some(id.to_string()),
                fields: Vec::new(),
            });
        }
    }
    for row in rows {
        let key = row.key.text.as_str();
        let record = match &row.external_id {
            Some(id) if claims.get(id.as_str()).is_some_and(|k| k.len() > 1) => continue,
            Some(id) => match by_id.get(id.as_str()) {
                Some(r) if !r.marked_deleted => Some(*r),
                _ => {
                    drifts.push(Drift {
                        kind: DriftKind::LinkedMissing,
                        user_keys: vec![key.to_string()],
                        external_id: Some(id.clone()),
                        fields: Vec::new(),
                    });
                    continue;
                }
            },
            // Not linked yet: the sink links a record carrying the row's
            // key rather than making a second one.
            None => by_key
                .get(key)
                .and_then(|rs| rs.iter().find(|r| !claims.contains_key(r.id.as_str())))
                .copied(),
        };
        let Some(record) = record else {
            drifts.push(Drift {
                kind: DriftKind::OnlyInTable,
                user_keys: vec![key.to_string()],
                external_id: None,
                fields: Vec::new(),
            });
            continue;
        };
        used.insert(record.id.as_str());
        let differing: Vec<String> = mapping
            .iter()
            .filter(|(path, _)| path != "password")
            .filter(|(path, column)| {
                let table = row
                    .data
                    .get(column)
                    .and_then(as_text)
                    .filter(|s| !s.is_empty());
                table != field(record, path)
            })
            .map(|(path, _)| path.clone())
            .collect();
        if !differing.is_empty() {
            drifts.push(Drift {
                kind: DriftKind::FieldsDiffer,
                user_keys: vec![key.to_string()],
                external_id: Some(record.id.clone()),
                fields: differing,
            });
        }
    }
    for r in live {
        if !used.contains(r.id.as_str()) {
            drifts.push(Drift {
                kind: DriftKind::OnlyInService,
                user_keys: r.key.iter().cloned().collect(),
                external_id: Some(r.id.clone()),
                fields: Vec::new(),
            });
        }
    }
    drifts
}

/// Reads both sides and compares them; with `--fix push`, queues the
/// fixable rows and waits for the daemon to push them.
pub async fn run(
    cfg: &Config,
    opts: &Options,
    cancel: CancellationToken,
) -> Result<Report, ReconcileError> {
    if opts.from.is_some() || opts.fix == Some(Fix::Pull) {
        return run_source(cfg, opts, cancel).await;
    }
    let lister = Lister::new(&cfg.sink).map_err(ReconcileError::Config)?;
    let client = connect(&cfg.database, "usersync-reconcile").await?;
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(|source| {
            RowError::Db(crate::store::db::DbError {
                context: "reconcile session settings",
                source,
            })
        })?;
    let shape = schema::inspect_table(&client, &cfg.database.table).await?;
    schema::check_table_ready(&shape)?;
    let reader =
        RowReader::new(&client, shape, &cfg.sink.columns, &cfg.database.publication).await?;
    if opts.fix == Some(Fix::Push) {
        requests::check(&client, &cfg.database).await?;
        if !requests::slot_active(&client, &cfg.database.slot).await? {
            return Err(ReconcileError::NoDaemon(cfg.database.slot.clone()));
        }
    }

    let total = crate::store::reconcile::count_rows(&client, &reader).await?;
    let mut progress = Progress::new("reconcile", "rows", total, 0, opts.quiet);
    let mut rows = Vec::new();
    crate::store::reconcile::scan_rows(&client, &reader, SCAN_CHUNK, |row| {
        rows.push(row);
        progress.inc(1);
    })
    .await?;
    progress.finish();

    let mut progress = Progress::new("reconcile", "records", 0, 0, opts.quiet);
    let mut records = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        if cancel.is_cancelled() {
            return Err(ReconcileError::Interrupted);
        }
        let page = tokio::select! {
            page = lister.page(cursor.as_deref()) => page.map_err(ReconcileError::List)?,
            _ = cancel.cancelled() => return Err(ReconcileError::Interrupted),
        };
        let n = page.records.len() as u64;
        records.extend(page.records);
        // The list APIs give no total up front (Stripe) or only a count of
        // live records; the bar grows with what has arrived.
        progress.set_total(records.len() as u64 + if page.next.is_some() { n } else { 0 });
        progress.inc(n);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    progress.finish();

    let drifts = compare(&rows, &records, &cfg.sink.mapping, |r, path| {
        lister.field_text(r, path)
    });
    let mut report = Report {
        rows: rows.len() as u64,
        records: records.iter().filter(|r| !r.marked_deleted).count() as u64,
        ..Report::default()
    };
    for k in DriftKind::ALL {
        report.counts.insert(k.as_str(), 0);
    }
    for d in &drifts {
        *report.counts.entry(d.kind.as_str()).or_default() += 1;
    }
    report.drifts = drifts;
    if opts.fix == Some(Fix::Push) {
        report.fixed = Some(push_fixes(&client, &reader, &report.drifts, &cancel).await?);
    }
    Ok(report)
}

/// The drifts between the table and an inbound source, from the import's
/// plan of every listed record (`import::survey`) and every row's link:
/// a record no row matches is only in the service; one that matches a row
/// not linked to it yet differs in the id column; one whose linked row
/// holds other values differs in those columns; a row linked to an id the
/// list no longer has is linked to a missing record (unless `on_delete =
/// soft(…)` marked it deleted); a row linked to nothing is only in the
/// table, unless the source's delete unlinked it; one id in two rows is
/// claimed twice.
pub fn compare_source(
    id_column: &str,
    plans: &[crate::app::import::Planned],
    rows: &[crate::store::import::LinkState],
) -> Vec<Drift> {
    use crate::app::import::Plan;
    let mut drifts = Vec::new();
    let mut claims: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in rows {
        if let Some(id) = &r.id {
            claims.entry(id.as_str()).or_default().push(r.key.clone());
        }
    }
    for (id, keys) in &claims {
        if keys.len() > 1 {
            drifts.push(Drift {
                kind: DriftKind::ClaimedTwice,
                user_keys: keys.clone(),
                external_id: Some(id.to_string()),
                fields: Vec::new(),
            });
        }
    }
    let listed: HashSet<&str> = plans.iter().map(|p| p.external_id.as_str()).collect();
    let mut matched: HashSet<&str> = HashSet::new();
    let mut service = Vec::new();
    for p in plans {
        let (kind, keys, fields) = match &p.plan {
            Plan::Unchanged { .. } => continue,
            Plan::Insert | Plan::Unmatched => (DriftKind::OnlyInService, Vec::new(), Vec::new()),
            Plan::Link { key } => {
                matched.insert(key.as_str());
                (
                    DriftKind::FieldsDiffer,
                    vec![key.clone()],
                    vec![id_column.to_string()],
                )
            }
            Plan::Update { key, columns } => {
                (DriftKind::FieldsDiffer, vec![key.clone()], columns.clone())
            }
        };
        service.push(Drift {
            kind,
            user_keys: keys,
            external_id: Some(p.external_id.clone()),
            fields,
        });
    }
    for r in rows {
        match &r.id {
            Some(id) if claims.get(id.as_str()).is_some_and(|k| k.len() > 1) => {}
            Some(id) if !listed.contains(id.as_str()) && !r.soft_deleted => drifts.push(Drift {
                kind: DriftKind::LinkedMissing,
                user_keys: vec![r.key.clone()],
                external_id: Some(id.clone()),
                fields: Vec::new(),
            }),
            Some(_) => {}
            // The source deleted its record and its policy is to unlink:
            // the table agrees with the service.
            None if r.unlinked || matched.contains(r.key.as_str()) => {}
            None => drifts.push(Drift {
                kind: DriftKind::OnlyInTable,
                user_keys: vec![r.key.clone()],
                external_id: None,
                fields: Vec::new(),
            }),
        }
    }
    drifts.extend(service);
    drifts
}

/// `reconcile --from <source>` and `--fix pull`: compares the table with
/// an inbound source through its mapping; pulling writes every record that
/// differs (import's write path: tagged with the import origin, so the
/// stream never pushes it back to its own service) and applies the
/// source's `on_delete` to rows linked to records that are gone. Rows only
/// in the table and double claims need a decision pulling cannot make.
async fn run_source(
    cfg: &Config,
    opts: &Options,
    cancel: CancellationToken,
) -> Result<Report, ReconcileError> {
    use crate::app::import;
    if opts.fix == Some(Fix::Push) {
        return Err(ReconcileError::Config(
            "--fix push makes the sink's service match the table; with --from, use --fix pull"
                .into(),
        ));
    }
    let from = match &opts.from {
        Some(f) => f.clone(),
        None => cfg.sink.kind.name().to_string(),
    };
    let source = import::resolve_source(cfg, &from).map_err(ReconcileError::Config)?;
    let client = connect(&cfg.database, "usersync-reconcile").await?;
    let shape = schema::inspect_table(&client, &cfg.database.table).await?;
    schema::check_table_ready(&shape)?;
    let soft = match &source.on_delete {
        crate::config::inbound::InboundOnDelete::Soft(c) => Some(c.as_str()),
        _ => None,
    };
    let cols = crate::store::import::MatchColumns {
        id_column: &source.id_column,
        email_column: None,
        soft_column: soft,
    };
    let rows = crate::store::import::link_states(&client, &shape, &cols, &source.name)
        .await
        .map_err(import::ImportError::Db)?;
    let survey = import::survey(cfg, &source.name, cancel.clone(), opts.quiet).await?;
    let drifts = compare_source(&source.id_column, &survey.plans, &rows);
    let mut report = Report {
        rows: rows.len() as u64,
        records: survey.plans.len() as u64,
        ..Report::default()
    };
    for k in DriftKind::ALL {
        report.counts.insert(k.as_str(), 0);
    }
    for d in &drifts {
        *report.counts.entry(d.kind.as_str()).or_default() += 1;
    }
    report.drifts = drifts;
    if opts.fix == Some(Fix::Pull) {
        let pulled = import::run(
            cfg,
            &import::Options {
                from: source.name.clone(),
                dry_run: false,
                restart: true,
                quiet: opts.quiet,
            },
            cancel,
        )
        .await?;
        let stale: Vec<String> = report
            .drifts
            .iter()
            .filter(|d| d.kind == DriftKind::LinkedMissing)
            .filter_map(|d| d.external_id.clone())
            .collect();
        let deleted = import::pull_deletes(cfg, source, &shape, &stale).await?;
        let mut fixed = BTreeMap::new();
        fixed.insert("inserted".to_string(), pulled.inserted);
        fixed.insert("linked".to_string(), pulled.linked);
        fixed.insert("updated".to_string(), pulled.updated);
        fixed.insert("deleted".to_string(), deleted);
        fixed.insert("failed".to_string(), pulled.failed);
        report.fixed = Some(fixed);
    }
    Ok(report)
}

/// `[reconcile] every`: a read-only reconcile at start and then once per
/// interval, for the whole run; each result sets `usersync_drift_records`
/// by kind and is logged as its summary line (keys and values never). A
/// failed run is logged and the gauges keep their last values.
pub fn spawn_periodic(cfg: Config, every: Duration, cancel: CancellationToken) {
    tokio::spawn(async move {
        let opts = Options {
            fix: None,
            from: cfg.reconcile.from.clone(),
            quiet: true,
        };
        loop {
            match run(&cfg, &opts, cancel.child_token()).await {
                Ok(report) => {
                    for kind in DriftKind::ALL {
                        crate::observe::metrics::set_drift(
                            kind.as_str(),
                            report.counts.get(kind.as_str()).copied().unwrap_or(0),
                        );
                    }
                    tracing::info!(
                        drifts = report.drifts.len(),
                        "periodic reconcile: {}",
                        report.summary_line()
                    );
                }
                Err(ReconcileError::Interrupted) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "periodic reconcile failed; next in {every:?}")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// Queues one sync request per row the table can fix by pushing (only in
/// the table, values differ, linked to a missing record), and waits until
/// the daemon has worked them off. Records only in the service and double
/// claims need a decision the table cannot make; they are left as they are.
async fn push_fixes(
    client: &tokio_postgres::Client,
    reader: &RowReader,
    drifts: &[Drift],
    cancel: &CancellationToken,
) -> Result<BTreeMap<String, u64>, ReconcileError> {
    let keys: Vec<String> = drifts
        .iter()
        .filter(|d| {
            matches!(
                d.kind,
                DriftKind::OnlyInTable | DriftKind::FieldsDiffer | DriftKind::LinkedMissing
            )
        })
        .flat_map(|d| d.user_keys.iter().cloned())
        .collect();
    // A push with the stale id would be refused (Stripe answers 404), so the
    // row forgets it first and the push creates the record anew.
    for d in drifts.iter().filter(|d| d.kind == DriftKind::LinkedMissing) {
        if let (Some(key), Some(stale)) = (d.user_keys.first(), &d.external_id) {
            crate::store::reconcile::unlink_missing(client, reader, key, stale).await?;
        }
    }
    let mut outcomes = BTreeMap::new();
    if keys.is_empty() {
        return Ok(outcomes);
    }
    let ids = requests::enqueue(client, &keys, "reconcile").await?;
    let deadline = tokio::time::Instant::now() + FIX_WAIT;
    let mut progress = Progress::new("reconcile --fix push", "users", ids.len() as u64, 0, false);
    loop {
        let open = requests::open_count(client, &ids).await?;
        progress.set(ids.len() as u64 - u64::try_from(open).unwrap_or(0));
        if open == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ReconcileError::FixTimeout(ids.len()));
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(ReconcileError::Interrupted),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    progress.finish();
    for (outcome, n) in requests::outcomes(client, &ids).await? {
        outcomes.insert(outcome, n);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::change::UserKey;
    use serde_json::{json, Map, Value};

    fn row(key: &str, ext: Option<&str>, email: &str) -> CurrentRow {
        let mut data = Map::new();
        data.insert("email".into(), Value::String(email.into()));
        CurrentRow {
            key: UserKey {
                text: key.into(),
                json: Value::String(key.into()),
            },
            data,
            external_id: ext.map(str::to_string),
            omitted: Vec::new(),
        }
    }

    fn record(id: &str, key: Option<&str>, email: &str) -> ExternalRecord {
        ExternalRecord {
            id: id.into(),
            key: key.map(str::to_string),
            marked_deleted: false,
            raw: json!({"id": id, "email": email}),
        }
    }

    #[test]
    fn every_kind_is_found() {
        let rows = vec![
            row("1", Some("cus_1"), "a@x"),    // agrees
            row("2", None, "b@x"),             // only in table
            row("3", Some("cus_gone"), "c@x"), // linked missing
            row("4", Some("cus_4"), "d@x"),    // differs
            row("5", Some("cus_5"), "e@x"),    // claimed twice
            row("6", Some("cus_5"), "f@x"),
            row("7", None, "g@x"), // linked by back-reference
        ];
        let records = vec![
            record("cus_1", Some("1"), "a@x"),
            record("cus_4", Some("4"), "other@x"),
            record("cus_5", Some("5"), "e@x"),
            record("cus_7", Some("7"), "g@x"),
            record("cus_9", None, "z@x"), // only in service
        ];
        let mapping = vec![("email".to_string(), "email".to_string())];
        let drifts = compare(&rows, &records, &mapping, |r, p| {
            r.raw.get(p).and_then(as_text)
        });
        let kinds: Vec<(DriftKind, Vec<String>)> = drifts
            .iter()
            .map(|d| (d.kind, d.user_keys.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (DriftKind::ClaimedTwice, vec!["5".into(), "6".into()]),
                (DriftKind::OnlyInTable, vec!["2".into()]),
                (DriftKind::LinkedMissing, vec!["3".into()]),
                (DriftKind::FieldsDiffer, vec!["4".into()]),
                (DriftKind::OnlyInService, vec![]),
            ]
        );
        assert_eq!(drifts[3].fields, vec!["email".to_string()]);
    }
}
