//! `usersync import --from <source>`: pages through the source's list API
//! (`sink::list`) and brings every record into the users table through the
//! inbound write path (`store::inbound::Applier`, the source's `[inbound]`
//! mapping and matching), so a user who already has a row is linked, not
//! duplicated, and the write is tagged with an origin of the source's own
//! (`<origin>_import_in_<source>`, dropped by the stream like the
//! receiver's when the source is the sink's service: no echo).
//!
//! Each page's records are first compared with the rows they match
//! (`store::import::candidates`): what already agrees is not written, so a
//! re-run changes nothing, and `--dry-run` can say what it would insert,
//! link and update. The list cursor after each applied page is kept in
//! `usersync.import_cursors`; a crashed import resumes at the page it was
//! on (records applied before the crash then agree and are skipped).

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::inbound::{InboundOnDelete, InboundSource, OnCreate};
use crate::config::Config;
use crate::core::inbound_event::{from_listed, InboundRecord, SourceKind};
use crate::observe::progress::Progress;
use crate::sink::list::{Lister, Service};
use crate::sink::mapping::as_text;
use crate::sink::SinkError;
use crate::store::db::{connect, ConnectError, DbError};
use crate::store::import::{self as cursor, Candidate, MatchColumns};
use crate::store::inbound::{Applied, Applier, ApplyError};
use crate::store::schema::{self, SchemaError};

/// How often, and how long apart, a record whose user has an outbound
/// change in flight is tried again before the import leaves it.
const DEFERRED_RETRIES: u32 = 40;
const DEFERRED_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// How long the import waits for its origin (a previous import's session
/// may linger for a moment after a crash).
const ORIGIN_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("{0}")]
    Config(String),
    #[error("listing the source's records: {0}")]
    List(#[source] SinkError),
    #[error("interrupted; the next `usersync import` resumes at the page it was on")]
    Interrupted,
}

impl crate::core::error::Classify for ImportError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        use crate::core::error::ErrorKind;
        match self {
            ImportError::Connect(e) => e.kind(),
            ImportError::Schema(e) => e.kind(),
            ImportError::Db(e) => e.kind(),
            ImportError::Config(_) => ErrorKind::Config,
            ImportError::Apply(_) | ImportError::List(_) | ImportError::Interrupted => {
                ErrorKind::Permanent
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// A source name under `[inbound.sources]`, or its kind when only one
    /// source has it.
    pub from: String,
    pub dry_run: bool,
    /// Start at the first page even if an unfinished import left a cursor.
    pub restart: bool,
    /// Log lines instead of a bar even on a terminal.
    pub quiet: bool,
}

/// What one listed record comes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Plan {
    /// No row matches: a new row.
    Insert,
    /// A row matches by back-reference or email: it gets the record's id.
    Link { key: String },
    /// The linked row's mapped values differ (the columns named).
    Update { key: String, columns: Vec<String> },
    /// The linked row already agrees.
    Unchanged { key: String },
    /// No row matches and `on_create = "ignore"`; or the one row with the
    /// record's email is linked to another record (never taken over, and
    /// no second row is made for the email).
    Unmatched,
}

impl Plan {
    fn writes(&self) -> bool {
        matches!(self, Plan::Insert | Plan::Link { .. } | Plan::Update { .. })
    }
}

/// One record's plan, for `--dry-run`.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub external_id: String,
    #[serde(flatten)]
    pub plan: Plan,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub source: String,
    pub dry_run: bool,
    /// Pages already applied by the import this one resumed.
    pub resumed_after_pages: Option<i64>,
    pub listed: u64,
    pub inserted: u64,
    pub linked: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// No row and `on_create = "ignore"`, or marked deleted by usersync.
    pub skipped: u64,
    /// A newer version of the record was applied already (a webhook).
    pub stale: u64,
    /// Records the table refused (recorded in usersync.inbound_events) or
    /// that could not be read.
    pub failed: u64,
    /// `--dry-run`: every record that would be written.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<Planned>,
}

impl Report {
    pub fn summary_line(&self) -> String {
        let verb = if self.dry_run { "would " } else { "" };
        format!(
            "{}: {} listed; {verb}insert {}, {verb}link {}, {verb}update {}; {} unchanged, {} skipped, {} stale, {} failed",
            self.source,
            self.listed,
            self.inserted,
            self.linked,
            self.updated,
            self.unchanged,
            self.skipped,
            self.stale,
            self.failed
        )
    }
}

/// The configured source `from` names: by name, else the only one of that
/// kind.
pub fn resolve_source<'a>(cfg: &'a Config, from: &str) -> Result<&'a InboundSource, String> {
    let sources = cfg
        .inbound
        .as_ref()
        .map(|i| i.sources.as_slice())
        .unwrap_or_default();
    if let Some(s) = sources.iter().find(|s| s.name == from) {
        return Ok(s);
    }
    let of_kind: Vec<&InboundSource> = sources.iter().filter(|s| s.kind.name() == from).collect();
    match of_kind.as_slice() {
        [one] => Ok(one),
        [] => Err(format!(
            "no source {from:?} under [inbound.sources]: import uses a source's mapping and matching rules; add [inbound.sources.{from}] with kind = \"{from}\" (see sync.toml.example)"
        )),
        _ => Err(format!(
            "several sources are of kind {from:?}; name one: {}",
            of_kind.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The list API of a source: its own `api_key_env` (and `api_url`,
/// `api_rate_limit_per_sec`) when set, else the sink's key, URL and rate
/// limit when the sink pushes to the same service.
pub fn lister_for(cfg: &Config, source: &InboundSource) -> Result<Lister, String> {
    let service = match source.kind {
        SourceKind::Clerk => Service::Clerk,
        SourceKind::Memberstack => Service::Memberstack,
        SourceKind::Stripe => Service::Stripe,
        SourceKind::Standard => {
            return Err(format!(
                "source {} is a Standard Webhooks sender, which has no list API usersync knows",
                source.name
            ))
        }
    };
    if let Some(api) = &source.api {
        let mut policy = cfg.sink.clone();
        policy.rate_limit_per_sec = api.rate_limit_per_sec;
        return Lister::with(service, &policy, &api.url, api.key.clone());
    }
    match Service::of_sink(cfg.sink.kind) {
        Some(s) if s == service => Lister::new(&cfg.sink),
        _ => Err(format!(
            "source {} ({}) has no API key: set api_key_env under [inbound.sources.{}] (the provider's secret API key) for import and reconcile",
            source.name,
            source.kind.name(),
            source.name
        )),
    }
}

/// The config the import's write session uses: the same in every respect
/// but the origin base, so the import's origin is its own
/// (`<origin>_import_in_<source>`) and never waits for the receiver's.
pub fn import_config(cfg: &Config) -> Config {
    let mut c = cfg.clone();
    c.database.origin = import_origin_base(&cfg.database.origin);
    c
}

fn import_origin_base(own: &str) -> String {
    format!("{own}_import")
}

/// The origins of imports from the sink's own service: the stream drops
/// them like the receiver's (no echo).
pub fn echo_origins(cfg: &Config) -> Vec<String> {
    let base = import_origin_base(&cfg.database.origin);
    cfg.inbound
        .iter()
        .flat_map(|i| i.sources.iter())
        .filter(|s| s.same_service_as(cfg.sink.kind.name()))
        .map(|s| s.origin(&base))
        .collect()
}

/// Two values agree when equal as JSON or as text (a number the provider
/// sends as a string, a text column holding a number).
fn same_value(record: &Value, row: Option<&Value>) -> bool {
    let row = row.unwrap_or(&Value::Null);
    if record == row {
        return true;
    }
    let text = |v: &Value| as_text(v).filter(|s| !s.is_empty());
    text(record) == text(row)
}

/// What writing `record` would do to the table, with the matching rules of
/// the write path (`Applier`): the provider's id in the id column (exactly
/// one row), then the back-reference, then (with `match_email`) the email
/// (exactly one row).
pub fn plan(record: &InboundRecord, source: &InboundSource, rows: &[Candidate]) -> Plan {
    let by_id: Vec<&Candidate> = rows
        .iter()
        .filter(|c| c.id.as_deref() == Some(record.subject.as_str()))
        .collect();
    let (row, linked) = if let [one] = by_id.as_slice() {
        (Some(*one), true)
    } else if let Some(r) = record
        .back_ref
        .as_deref()
        .and_then(|b| rows.iter().find(|c| c.key == b))
    {
        (Some(r), false)
    } else {
        let email = record.email.as_deref().map(str::to_lowercase);
        let by_email: Vec<&Candidate> = match (&email, source.match_email) {
            (Some(e), true) if source.email_column.is_some() => rows
                .iter()
                .filter(|c| c.email.as_deref() == Some(e.as_str()))
                .collect(),
            _ => Vec::new(),
        };
        match by_email.as_slice() {
            // Another record's row (see `store::inbound::Applier::find`).
            [one] if one.id.is_some() => return Plan::Unmatched,
            [one] => (Some(*one), false),
            _ => (None, false),
        }
    };
    let Some(row) = row else {
        return match source.on_create {
            OnCreate::Insert => Plan::Insert,
            OnCreate::Ignore => Plan::Unmatched,
        };
    };
    if !linked {
        return Plan::Link {
            key: row.key.clone(),
        };
    }
    let mut columns: Vec<String> = record
        .values
        .iter()
        .filter(|(column, value)| !same_value(value, row.doc.get(column.as_str())))
        .map(|(column, _)| column.clone())
        .collect();
    if row.soft_deleted {
        if let InboundOnDelete::Soft(c) = &source.on_delete {
            columns.push(c.clone());
        }
    }
    if columns.is_empty() {
        Plan::Unchanged {
            key: row.key.clone(),
        }
    } else {
        Plan::Update {
            key: row.key.clone(),
            columns,
        }
    }
}

/// The event id of a listed record: its id, version and content, so the
/// same state listed again claims the same id.
fn event_id(record: &InboundRecord) -> String {
    let text = serde_json::to_string(&(
        &record.values,
        &record.back_ref,
        &record.email,
        record.version,
    ))
    .unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("import-{}-{hex}", record.subject)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The version of an object listed now that has none of its own: a second
/// before the listing, in whole seconds, so an event the provider stamps
/// in the same second (Stripe's `created` has seconds only) still wins
/// over the listed state, which it is not older than.
fn listed_version() -> i64 {
    (now_ms() / 1000 - 1) * 1000
}

/// Turns a page's raw objects into records; an object that cannot be read
/// is counted as failed and skipped.
fn records_of(
    source: &InboundSource,
    objects: &[crate::sink::list::ExternalRecord],
    report: &mut Report,
) -> Vec<InboundRecord> {
    let listed_at = listed_version();
    let mut out = Vec::with_capacity(objects.len());
    for o in objects {
        if o.marked_deleted {
            report.skipped += 1;
            continue;
        }
        match from_listed(
            source.kind,
            &o.raw,
            &source.mapping,
            String::new(),
            listed_at,
        ) {
            Ok(mut r) => {
                r.event_id = event_id(&r);
                out.push(r);
            }
            Err(e) => {
                tracing::warn!(external_id = %o.id, error = %e, "a listed record cannot be read; skipped");
                report.failed += 1;
            }
        }
    }
    out
}

/// Runs the import to the last page (or, with `--dry-run`, reports what it
/// would do without writing anything).
pub async fn run(
    cfg: &Config,
    opts: &Options,
    cancel: CancellationToken,
) -> Result<Report, ImportError> {
    walk(cfg, opts, cancel, false).await
}

/// Lists every record of `from` and plans each against the table without
/// writing: what `reconcile --from` compares (`plans` holds every record,
/// unchanged ones included).
pub async fn survey(
    cfg: &Config,
    from: &str,
    cancel: CancellationToken,
    quiet: bool,
) -> Result<Report, ImportError> {
    let opts = Options {
        from: from.to_string(),
        dry_run: true,
        restart: false,
        quiet,
    };
    walk(cfg, &opts, cancel, true).await
}

/// The version stream a source's user objects are ordered in (as its
/// webhooks name it).
fn stream_of(kind: SourceKind) -> &'static str {
    match kind {
        SourceKind::Memberstack => "member",
        SourceKind::Stripe => "customer",
        SourceKind::Clerk | SourceKind::Standard => "user",
    }
}

/// `reconcile --fix pull` for rows linked to records the service no longer
/// has: each gets the delete its webhook would have brought (the source's
/// `on_delete`), through the write path and tagged like an import. Returns
/// how many were applied.
pub async fn pull_deletes(
    cfg: &Config,
    source: &InboundSource,
    shape: &crate::core::table::TableShape,
    stale_ids: &[String],
) -> Result<u64, ImportError> {
    if stale_ids.is_empty() {
        return Ok(0);
    }
    let mut applier = Applier::connect(&import_config(cfg), source, shape, ORIGIN_WAIT).await?;
    // Missing now: a delete at this moment, which a later re-creation
    // (a newer version) undoes and an older update does not.
    let version = now_ms();
    let mut applied = 0;
    for id in stale_ids {
        let record = InboundRecord {
            event_id: format!("reconcile-delete-{id}-{version}"),
            event_type: format!("{}.missing", source.kind.name()),
            action: crate::core::inbound_event::Action::Delete,
            stream: stream_of(source.kind),
            subject: id.clone(),
            object_id: None,
            back_ref: None,
            email: None,
            version,
            values: serde_json::Map::new(),
            idempotency_key: None,
        };
        if let Applied::Applied(_) = applier.apply(&record).await? {
            applied += 1;
        }
    }
    Ok(applied)
}

async fn walk(
    cfg: &Config,
    opts: &Options,
    cancel: CancellationToken,
    all_plans: bool,
) -> Result<Report, ImportError> {
    let source = resolve_source(cfg, &opts.from).map_err(ImportError::Config)?;
    let lister = lister_for(cfg, source).map_err(ImportError::Config)?;
    let client = connect(&cfg.database, "usersync-import").await?;
    let shape = schema::inspect_table(&client, &cfg.database.table).await?;
    schema::check_table_ready(&shape)?;
    let soft = match &source.on_delete {
        InboundOnDelete::Soft(c) => Some(c.as_str()),
        _ => None,
    };
    let cols = MatchColumns {
        id_column: &source.id_column,
        email_column: source
            .email_column
            .as_deref()
            .filter(|_| source.match_email),
        soft_column: soft,
    };
    let mut report = Report {
        source: source.name.clone(),
        dry_run: opts.dry_run,
        ..Report::default()
    };
    let mut cursor_at: Option<String> = None;
    let mut applier = None;
    if !opts.dry_run {
        match cursor::unfinished(&client, &source.name).await? {
            Some(resume) if !opts.restart => {
                tracing::info!(
                    source = %source.name,
                    pages = resume.pages,
                    "resuming the unfinished import after page {}",
                    resume.pages
                );
                report.resumed_after_pages = Some(resume.pages);
                cursor_at = resume.cursor;
            }
            _ => cursor::start(&client, &source.name).await?,
        }
        applier = Some(Applier::connect(&import_config(cfg), source, &shape, ORIGIN_WAIT).await?);
    }

    let same_service = source.same_service_as(cfg.sink.kind.name());
    let mut progress = Progress::new("import", "records", 0, 0, opts.quiet);
    loop {
        if cancel.is_cancelled() {
            return Err(ImportError::Interrupted);
        }
        let page = tokio::select! {
            page = lister.page(cursor_at.as_deref()) => page.map_err(ImportError::List)?,
            _ = cancel.cancelled() => return Err(ImportError::Interrupted),
        };
        let n = page.records.len() as u64;
        report.listed += n;
        let records = records_of(source, &page.records, &mut report);
        let ids: Vec<String> = records.iter().map(|r| r.subject.clone()).collect();
        let keys: Vec<String> = records.iter().filter_map(|r| r.back_ref.clone()).collect();
        let emails: Vec<String> = if cols.email_column.is_some() {
            records.iter().filter_map(|r| r.email.clone()).collect()
        } else {
            Vec::new()
        };
        let rows = cursor::candidates(&client, &shape, &cols, &ids, &keys, &emails).await?;
        for record in &records {
            let plan = plan(record, source, &rows);
            if let Some(applier) = applier.as_mut().filter(|_| plan.writes()) {
                // An outbound change of this user is not written back yet.
                // From the sink's own service the listed record is older
                // than that change, which the push is bringing to the
                // service: applying it afterwards would revert the app's
                // value in the table (and nothing would push it back), so
                // it is left, as a stale record is. From another service,
                // wait for the write-back a little (milliseconds), then
                // leave the record to the next import rather than revert
                // the app's newer value.
                let mut applied = applier.apply(record).await?;
                let retries = if same_service { 0 } else { DEFERRED_RETRIES };
                for _ in 0..retries {
                    if applied != Applied::Deferred || cancel.is_cancelled() {
                        break;
                    }
                    tokio::time::sleep(DEFERRED_WAIT).await;
                    applied = applier.apply(record).await?;
                }
                match applied {
                    Applied::Applied(_) => count(&mut report, &plan),
                    Applied::Deferred if same_service => {
                        tracing::debug!(external_id = %record.subject, "the user's own change is being pushed; the listed record is older than it");
                        report.stale += 1;
                    }
                    Applied::Deferred => {
                        tracing::warn!(external_id = %record.subject, "the user's own change is still being pushed; not imported now, run the import again");
                        report.skipped += 1;
                    }
                    Applied::Stale => report.stale += 1,
                    Applied::Failed(reason) => {
                        tracing::warn!(external_id = %record.subject, %reason, "the table refused a listed record");
                        report.failed += 1;
                    }
                    // A state this import claimed before (a crash right
                    // after its commit); or nothing matched after all.
                    Applied::Duplicate | Applied::Echo | Applied::Ignored => report.unchanged += 1,
                    Applied::Unmatched => report.skipped += 1,
                }
            } else {
                count(&mut report, &plan);
                if opts.dry_run && (plan.writes() || all_plans) {
                    report.plans.push(Planned {
                        external_id: record.subject.clone(),
                        plan,
                    });
                }
            }
        }
        if !opts.dry_run {
            cursor::advance(
                &client,
                &source.name,
                page.next.as_deref(),
                i64::try_from(n).unwrap_or(i64::MAX),
            )
            .await?;
        }
        progress.set_total(report.listed + if page.next.is_some() { n } else { 0 });
        progress.inc(n);
        match page.next {
            Some(next) => cursor_at = Some(next),
            None => break,
        }
    }
    progress.finish();
    Ok(report)
}

fn count(report: &mut Report, plan: &Plan) {
    match plan {
        Plan::Insert => report.inserted += 1,
        Plan::Link { .. } => report.linked += 1,
        Plan::Update { .. } => report.updated += 1,
        Plan::Unchanged { .. } => report.unchanged += 1,
        Plan::Unmatched => report.skipped += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::inbound_event::{Action, Field};
    use serde_json::{json, Map};

    fn source(match_email: bool) -> InboundSource {
        let toml = format!(
            "[database]\nurl = \"postgres://x@localhost/db\"\n[sink]\nkind = \"stripe\"\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n\
             [inbound.sources.stripe]\nkind = \"stripe\"\nsecret_env = \"S\"\nmatch_email = {match_email}\n\
             [inbound.sources.stripe.mapping]\nemail = \"/email\"\nname = \"/name\"\n"
        );
        let env: std::collections::BTreeMap<String, String> = [
            ("K".to_string(), "sk_test_x".to_string()),
            ("S".to_string(), "whsec_dGVzdHNlY3JldA==".to_string()),
        ]
        .into();
        let cfg = Config::from_parts(Some(&toml), "test", &env).expect("config");
        let s = cfg.inbound.expect("inbound").sources[0].clone();
        assert_eq!(s.mapping[0].1, Field::Pointer("/email".into()));
        s
    }

    fn record(subject: &str, back_ref: Option<&str>, email: &str, name: &str) -> InboundRecord {
        let mut values = Map::new();
        values.insert("email".into(), json!(email));
        values.insert("name".into(), json!(name));
        InboundRecord {
            event_id: String::new(),
            event_type: "stripe.listed".into(),
            action: Action::Upsert,
            stream: "customer",
            subject: subject.into(),
            object_id: None,
            back_ref: back_ref.map(str::to_string),
            email: Some(email.into()),
            version: 1,
            values,
            idempotency_key: None,
        }
    }

    fn row(key: &str, id: Option<&str>, email: &str, name: Value) -> Candidate {
        let doc = json!({"id": key.parse::<i64>().unwrap_or(0), "email": email, "name": name, "external_user_id": id});
        Candidate {
            key: key.into(),
            id: id.map(str::to_string),
            email: Some(email.to_lowercase()),
            soft_deleted: false,
            doc: doc.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn plans_follow_the_write_paths_matching() {
        let s = source(true);
        let rows = vec![
            row("1", Some("cus_1"), "a@x.io", json!("A")),
            row("2", None, "b@x.io", json!("B")),
            row("3", None, "C@x.io", Value::Null),
        ];
        assert_eq!(
            plan(&record("cus_1", None, "a@x.io", "A"), &s, &rows),
            Plan::Unchanged { key: "1".into() }
        );
        assert_eq!(
            plan(&record("cus_1", None, "a@x.io", "Ann"), &s, &rows),
            Plan::Update {
                key: "1".into(),
                columns: vec!["name".into()]
            }
        );
        assert_eq!(
            plan(&record("cus_2", Some("2"), "other@x.io", "B"), &s, &rows),
            Plan::Link { key: "2".into() }
        );
        assert_eq!(
            plan(&record("cus_3", None, "c@X.io", "C"), &s, &rows),
            Plan::Link { key: "3".into() }
        );
        assert_eq!(
            plan(&record("cus_9", None, "z@x.io", "Z"), &s, &rows),
            Plan::Insert
        );
        // Without match_email an email alone links nothing.
        assert_eq!(
            plan(&record("cus_3", None, "c@x.io", "C"), &source(false), &rows),
            Plan::Insert
        );
    }

    #[test]
    fn the_same_state_has_the_same_event_id() {
        let a = record("cus_1", None, "a@x.io", "A");
        assert_eq!(event_id(&a), event_id(&a.clone()));
        assert_ne!(
            event_id(&a),
            event_id(&record("cus_1", None, "a@x.io", "B"))
        );
        assert!(same_value(&json!(5), Some(&json!("5"))));
        assert!(same_value(&Value::Null, None));
        assert!(same_value(&json!(""), None));
        assert!(!same_value(&json!("a"), Some(&json!("b"))));
    }
}
