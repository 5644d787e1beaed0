//! The status page at `/` on the metrics listener: one server-rendered HTML
//! document with inline SVG, no scripts and no external assets (it works on
//! an offline host), refreshing itself. It shows what `usersync status`
//! shows plus the last hour as pictures. The figures come from a provider
//! the daemon installs (`set_provider`), which reads what usersync already
//! records (the sync log, the dead-letter table, the lag poller's samples);
//! nothing here runs per change. Every text from outside is escaped.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;

/// One dead letter as the page lists it.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterRow {
    pub id: i64,
    pub event_id: String,
    pub user_key: String,
    pub operation: String,
    pub state: String,
    pub status: Option<i32>,
    /// Empty unless `log.personal_data` is on (a response excerpt can hold
    /// anything the service echoed back).
    pub error: String,
    pub age_secs: i64,
}

/// Pushes that ended in one minute, by outcome.
#[derive(Debug, Clone, Default)]
pub struct Minute {
    /// Unix seconds at the start of the minute.
    pub at: i64,
    pub synced: i64,
    pub dead_lettered: i64,
    pub parked: i64,
}

/// Everything the page shows, in plain values.
#[derive(Debug, Clone, Default)]
pub struct PageData {
    pub table: String,
    pub slot: String,
    pub sink: String,
    /// This daemon streams right now.
    pub streaming: bool,
    /// `Some(false)`: another daemon leads and this one waits.
    pub leader: Option<bool>,
    /// The slot as PostgreSQL reports it.
    pub slot_active: Option<bool>,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub retained_bytes: Option<i64>,
    pub last_synced_at: Option<String>,
    pub minutes: Vec<Minute>,
    pub failed: i64,
    pub parked: i64,
    pub parked_users: i64,
    pub dead_letters: Vec<DeadLetterRow>,
    pub backfill: Option<String>,
    /// Inbound sources and their last event, once there are any.
    pub inbound: Vec<(String, String)>,
    /// Set when the database could not be read: the page says so instead
    /// of failing.
    pub database_error: Option<String>,
}

pub type Provider = Arc<dyn Fn() -> BoxFuture<'static, PageData> + Send + Sync>;

fn provider_cell() -> &'static OnceLock<Provider> {
    static CELL: OnceLock<Provider> = OnceLock::new();
    &CELL
}

/// Installs what the page reads (once per process; the daemon does it).
pub fn set_provider(p: Provider) {
    let _ = provider_cell().set(p);
}

/// The page, or `None` when no provider is installed (a bare metrics
/// endpoint, as in tests of other commands). `streaming` is this process's
/// own state (the metrics endpoint passes its gauge, so that this module
/// imports nothing and the metrics module can feed it lag samples).
pub async fn current(streaming: bool) -> Option<String> {
    let p = provider_cell().get()?.clone();
    let mut data = p().await;
    data.streaming = streaming;
    Some(render(&data, &lag_history()))
}

// ------------------------------------------------------------------ lag

const LAG_HISTORY: usize = 3600;

fn history() -> &'static Mutex<VecDeque<(i64, i64)>> {
    static H: OnceLock<Mutex<VecDeque<(i64, i64)>>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(VecDeque::with_capacity(LAG_HISTORY)))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One lag sample from the poller (once a second): the last hour is kept.
pub fn record_lag(bytes: i64) {
    let now = now_secs();
    if let Ok(mut h) = history().lock() {
        while h.len() >= LAG_HISTORY || h.front().is_some_and(|&(at, _)| now - at > 3600) {
            h.pop_front();
        }
        h.push_back((now, bytes));
    }
}

fn lag_history() -> Vec<(i64, i64)> {
    history()
        .lock()
        .map(|h| h.iter().copied().collect())
        .unwrap_or_default()
}

// ------------------------------------------------------------------ HTML

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

fn bytes(b: i64) -> String {
    if b.abs() < 1024 * 1024 {
        format!("{b} bytes")
    } else {
        format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
    }
}

fn age(secs: i64) -> String {
    let d = Duration::from_secs(u64::try_from(secs.max(0)).unwrap_or(0));
    match d.as_secs() {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// A polyline of `points` (x ascending) scaled into a `w`×`h` box.
fn sparkline(points: &[(i64, i64)], w: f64, h: f64, label: &str) -> String {
    let mut svg = format!(
        r##"<svg role="img" aria-label="{}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg"><rect width="{w}" height="{h}" fill="#f6f8fa"/>"##,
        esc(label)
    );
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        let span = (last.0 - first.0).max(1) as f64;
        let top = points.iter().map(|p| p.1).max().unwrap_or(0).max(1) as f64;
        let coords: Vec<String> = points
            .iter()
            .map(|&(x, y)| {
                let px = (x - first.0) as f64 / span * (w - 2.0) + 1.0;
                let py = h - 1.0 - (y.max(0) as f64 / top) * (h - 2.0);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{}"/>"##,
            coords.join(" ")
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Stacked bars of pushes per minute: synced, dead-lettered, parked.
fn bars(minutes: &[Minute], w: f64, h: f64) -> String {
    let mut svg = format!(
        r##"<svg role="img" aria-label="pushes per minute, last hour" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg"><rect width="{w}" height="{h}" fill="#f6f8fa"/>"##
    );
    let now = now_secs();
    let start = now - 3600;
    let top = minutes
        .iter()
        .map(|m| m.synced + m.dead_lettered + m.parked)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bw = w / 60.0;
    for m in minutes {
        let x = ((m.at - start) as f64 / 60.0).floor() * bw;
        if !(0.0..w).contains(&x) {
            continue;
        }
        let mut y = h;
        for (n, color) in [
            (m.synced, "#1a7f37"),
            (m.dead_lettered, "#cf222e"),
            (m.parked, "#9a6700"),
        ] {
            if n <= 0 {
                continue;
            }
            let bh = n as f64 / top * (h - 2.0);
            y -= bh;
            let _ = write!(
                svg,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"/>"##,
                (bw - 1.0).max(1.0)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The whole document.
pub fn render(d: &PageData, lag: &[(i64, i64)]) -> String {
    let mut body = String::new();
    let state = match (d.database_error.is_some(), d.leader, d.streaming) {
        (_, Some(false), _) => ("standby", "waiting: another usersync leads"),
        (_, _, true) => ("streaming", "streaming"),
        (true, _, false) => ("down", "not streaming: the database cannot be reached"),
        (false, _, false) => ("stopped", "not streaming (starting or reconnecting)"),
    };
    let _ = write!(
        body,
        r#"<h1>usersync <span id="state" class="{}">{}</span></h1><p class="sub">table {} · slot {} · sink {}</p>"#,
        state.0,
        esc(state.1),
        esc(&d.table),
        esc(&d.slot),
        esc(&d.sink)
    );
    if let Some(e) = &d.database_error {
        let _ = write!(
            body,
            r#"<p id="database-error" class="alert">PostgreSQL cannot be read: {}. The figures below are what this process knows.</p>"#,
            esc(&cut(e, 300))
        );
    }
    let lag_text = match (d.lag_bytes, d.lag_seconds) {
        (Some(b), Some(s)) => format!("{}, ~{s:.1} s", bytes(b)),
        (Some(b), None) => bytes(b),
        _ => "unknown".into(),
    };
    let _ = write!(
        body,
        r#"<section><h2>Lag</h2><p id="lag">{}</p>{}<p class="sub">last hour{}</p></section>"#,
        esc(&lag_text),
        sparkline(lag, 600.0, 60.0, "replication lag in bytes, last hour"),
        d.retained_bytes
            .map(|b| format!(" · retained WAL {}", bytes(b)))
            .unwrap_or_default()
    );
    let (s, dl, p) = d.minutes.iter().fold((0, 0, 0), |a, m| {
        (a.0 + m.synced, a.1 + m.dead_lettered, a.2 + m.parked)
    });
    let _ = write!(
        body,
        r#"<section><h2>Pushes per minute</h2>{}<p class="sub"><span class="ok">■</span> synced {s} · <span class="bad">■</span> dead-lettered {dl} · <span class="warn">■</span> parked {p} in the last hour · last successful push: <span id="last-push">{}</span></p></section>"#,
        bars(&d.minutes, 600.0, 60.0),
        esc(d.last_synced_at.as_deref().unwrap_or("none yet"))
    );
    let _ = write!(
        body,
        r#"<section><h2>Dead letters</h2><p id="dead-letter-counts">{} failed, {} parked behind them, {} parked users</p>"#,
        d.failed, d.parked, d.parked_users
    );
    if !d.dead_letters.is_empty() {
        body.push_str("<table id=\"dead-letters\"><tr><th>id</th><th>event</th><th>user</th><th>operation</th><th>state</th><th>status</th><th>error</th><th>age</th></tr>");
        for r in &d.dead_letters {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                r.id,
                esc(&cut(&r.event_id, 80)),
                esc(&cut(&r.user_key, 60)),
                esc(&r.operation),
                esc(&r.state),
                r.status.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                esc(&cut(&r.error, 120)),
                age(r.age_secs)
            );
        }
        body.push_str(
            "</table><p class=\"sub\">replay or discard with <code>usersync dlq</code></p>",
        );
    }
    body.push_str("</section>");
    let _ = write!(
        body,
        r#"<section><h2>Backfill and import</h2><p id="backfill">{}</p></section>"#,
        esc(d.backfill.as_deref().unwrap_or("never run"))
    );
    if !d.inbound.is_empty() {
        body.push_str("<section><h2>Inbound sources</h2><ul>");
        for (source, last) in &d.inbound {
            let _ = write!(body, "<li>{}: {}</li>", esc(source), esc(last));
        }
        body.push_str("</ul></section>");
    }
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5"><meta name="viewport" content="width=device-width"><title>usersync status</title><style>body{{font:14px system-ui,sans-serif;margin:2em;color:#1f2328;max-width:900px}}h1 span{{font-size:60%;padding:.2em .6em;border-radius:1em;vertical-align:middle}}.streaming{{background:#dafbe1}}.stopped,.standby{{background:#fff8c5}}.down{{background:#ffebe9}}.sub{{color:#59636e}}.alert{{background:#ffebe9;padding:.5em}}.ok{{color:#1a7f37}}.bad{{color:#cf222e}}.warn{{color:#9a6700}}table{{border-collapse:collapse}}td,th{{border-bottom:1px solid #d1d9e0;padding:.2em .6em;text-align:left}}</style></head><body>{body}</body></html>"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_escaped_and_bounded() {
        let d = PageData {
            table: "public.<users>".into(),
            dead_letters: vec![DeadLetterRow {
                user_key: "<script>alert(1)</script>".into(),
                error: "x".repeat(1000),
                ..DeadLetterRow::default()
            }],
            ..PageData::default()
        };
        let html = render(&d, &[(1, 5), (2, 9)]);
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("public.&lt;users&gt;"));
        assert!(!html.contains(&"x".repeat(200)));
        assert!(html.contains("<polyline"));
    }

    #[test]
    fn a_database_outage_is_a_page_not_an_error() {
        let d = PageData {
            database_error: Some("connection refused".into()),
            ..PageData::default()
        };
        let html = render(&d, &[]);
        assert!(html.contains("id=\"database-error\""));
        assert!(html.contains("the database cannot be reached"));
    }
}
