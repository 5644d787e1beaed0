//! What operators look at, checked without Docker: the Grafana dashboard
//! (docker/grafana/usersync.json) and the alert rules
//! (docker/prometheus/alerts.yml) query only series that a real usersync run
//! exports, under the names Prometheus stores them (counters with `_total`,
//! histograms as `_bucket`/`_sum`/`_count`), with label names and values that
//! exist; `promtool` accepts the rules, the Prometheus config and the
//! dashboard's expressions; README.md's rules are the file's rules; and the
//! compose file wires usersync, Prometheus and Grafana to one another.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::observability::{http_get, metrics_url, sample};

const WAIT: Duration = Duration::from_secs(60);
/// The dashboard's data source: a variable, so the file works provisioned
/// and imported into any Grafana alike.
const DATASOURCE_UID: &str = "${DS_PROMETHEUS}";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("docker/grafana/usersync.json"))
        .unwrap_or_else(|e| panic!("docker/grafana/usersync.json: {e}"))
}

fn alerts() -> Value {
    yaml("docker/prometheus/alerts.yml")
}

fn prometheus_config() -> Value {
    yaml("docker/prometheus/prometheus.yml")
}

/// The job name Prometheus scrapes usersync under.
fn scrape_job() -> String {
    let cfg = prometheus_config();
    let jobs = cfg["scrape_configs"].as_array().expect("scrape_configs");
    assert_eq!(jobs.len(), 1, "one scrape job expected: {jobs:?}");
    jobs[0]["job_name"].as_str().expect("job_name").to_string()
}

/// Panels, including those nested in collapsed rows.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// (where, PromQL) for every query of the dashboard's panels.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| {
                panic!("panel {:?}: a target without a PromQL expr", p["title"])
            });
            out.push((
                format!("dashboard panel {} ({})", p["title"], t["refId"]),
                expr.to_string(),
            ));
        }
    }
    out
}

/// (where, selector, label) for the dashboard's `label_values(selector, label)` variables.
fn dashboard_label_values(d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().expect("templating.list") {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .expect("query variable's query");
        let args = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: only label_values(...) is checked: {q}",
                    v["name"]
                )
            });
        let (selector, label) = args
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        out.push((
            format!("dashboard variable {}", v["name"]),
            selector.trim().to_string(),
            label.trim().to_string(),
        ));
    }
    out
}

/// (where, PromQL) for every rule of a rules file.
fn rule_exprs(rules: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in rules["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .expect("rule name");
            let expr = r["expr"].as_str().expect("expr");
            out.push((format!("alert {name}"), expr.to_string()));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Enough of PromQL to find metric names, their label matchers and grouping
// labels: strings, durations, `[range]`s and Grafana's `$variables` are
// skipped; an identifier followed by `(` is a function or aggregation.

#[derive(Debug, Clone)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

#[derive(Debug, Clone)]
struct MetricRef {
    name: String,
    matchers: Vec<Matcher>,
}

#[derive(Debug, Default)]
struct Query {
    metrics: Vec<MetricRef>,
    /// Labels of `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_*(...)`.
    grouping: Vec<String>,
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 7] = ["and", "or", "unless", "bool", "offset", "atan2", "start"];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Reads a quoted string at `b[*i]`, leaving `*i` after its closing quote.
fn read_string(b: &[u8], i: &mut usize) -> String {
    let quote = b[*i];
    let mut out = Vec::new();
    *i += 1;
    while *i < b.len() && b[*i] != quote {
        if b[*i] == b'\\' && quote != b'`' && *i + 1 < b.len() {
            *i += 1;
        }
        out.push(b[*i]);
        *i += 1;
    }
    *i += 1;
    String::from_utf8(out).expect("utf-8 string")
}

fn skip_space(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn read_ident(b: &[u8], i: &mut usize) -> String {
    let start = *i;
    while *i < b.len() && is_ident(b[*i]) {
        *i += 1;
    }
    String::from_utf8(b[start..*i].to_vec()).expect("ascii")
}

fn parse_matchers(expr: &str, b: &[u8], i: &mut usize) -> Vec<Matcher> {
    let mut out = Vec::new();
    *i += 1; // '{'
    loop {
        skip_space(b, i);
        match b.get(*i) {
            None => panic!("unclosed {{ in {expr}"),
            Some(b'}') => {
                *i += 1;
                return out;
            }
            Some(b',') => *i += 1,
            Some(c) if is_ident_start(*c) => {
                let label = read_ident(b, i);
                skip_space(b, i);
                let op = ["=~", "!~", "!=", "="]
                    .into_iter()
                    .find(|op| b[*i..].starts_with(op.as_bytes()))
                    .unwrap_or_else(|| panic!("no matcher operator after {label} in {expr}"));
                *i += op.len();
                skip_space(b, i);
                assert!(
                    matches!(b.get(*i), Some(b'"' | b'\'' | b'`')),
                    "matcher {label}{op} without a string in {expr}"
                );
                let value = read_string(b, i);
                out.push(Matcher {
                    label,
                    op: op.to_string(),
                    value,
                });
            }
            Some(c) => panic!("unexpected {:?} in a matcher of {expr}", *c as char),
        }
    }
}

fn parse_promql(expr: &str) -> Query {
    let b = expr.as_bytes();
    let mut q = Query::default();
    let mut i = 0;
    // Whether the previous token was a metric name (so `{` holds its matchers).
    let mut after_metric = false;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let was_metric = std::mem::take(&mut after_metric);
        match c {
            b'"' | b'\'' | b'`' => {
                read_string(b, &mut i);
            }
            b'{' => {
                let m = parse_matchers(expr, b, &mut i);
                assert!(
                    was_metric,
                    "a selector without a metric name is not supported here: {expr}"
                );
                q.metrics.last_mut().expect("metric").matchers = m;
            }
            b'[' => {
                while i < b.len() && b[i] != b']' {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    while i < b.len() && b[i] != b'}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    read_ident(b, &mut i);
                }
            }
            c if c.is_ascii_digit() || c == b'.' => {
                while i < b.len() && (is_ident(b[i]) || b[i] == b'.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let ident = read_ident(b, &mut i);
                let mut j = i;
                skip_space(b, &mut j);
                // `f(`, or an aggregation with its clause first: `sum by (le) (`.
                let call = b.get(j) == Some(&b'(')
                    || ["by", "without"].iter().any(|k| {
                        b[j..].starts_with(k.as_bytes())
                            && !b.get(j + k.len()).copied().is_some_and(is_ident)
                    });
                if GROUPING.contains(&ident.as_str()) {
                    if call {
                        i = j + 1;
                        loop {
                            skip_space(b, &mut i);
                            match b.get(i) {
                                Some(b')') => {
                                    i += 1;
                                    break;
                                }
                                Some(b',') => i += 1,
                                Some(c) if is_ident_start(*c) => {
                                    q.grouping.push(read_ident(b, &mut i));
                                }
                                _ => panic!("bad label list after {ident} in {expr}"),
                            }
                        }
                    }
                } else if call
                    || KEYWORDS.contains(&ident.as_str())
                    || ident.eq_ignore_ascii_case("inf")
                    || ident.eq_ignore_ascii_case("nan")
                {
                    // A function or aggregation, or an operator word.
                } else {
                    q.metrics.push(MetricRef {
                        name: ident,
                        matchers: Vec::new(),
                    });
                    after_metric = true;
                }
            }
            _ => i += 1,
        }
    }
    q
}

// ---------------------------------------------------------------------------
// The scraped exposition (OpenMetrics text).

type Labels = BTreeMap<String, String>;

#[derive(Debug, Default)]
struct Exposition {
    /// Family name → type, from `# TYPE` lines.
    families: BTreeMap<String, String>,
    /// Series name as Prometheus stores it → the label sets exposed.
    series: BTreeMap<String, Vec<Labels>>,
}

/// Labels Prometheus adds to every scraped series itself.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                e.families.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let b = line.as_bytes();
            let mut i = 0;
            let name = read_ident(b, &mut i);
            let mut labels = Labels::new();
            if b.get(i) == Some(&b'{') {
                i += 1;
                loop {
                    match b.get(i) {
                        Some(b'}') => break,
                        Some(b',') => i += 1,
                        Some(_) => {
                            let k = read_ident(b, &mut i);
                            assert_eq!(b.get(i), Some(&b'='), "bad sample line {line}");
                            i += 1;
                            labels.insert(k, read_string(b, &mut i));
                        }
                        None => panic!("bad sample line {line}"),
                    }
                }
            }
            e.series.entry(name).or_default().push(labels);
        }
        e
    }

    fn labels_of(&self, series: &str) -> BTreeSet<&str> {
        self.series
            .get(series)
            .into_iter()
            .flatten()
            .flat_map(|l| l.keys().map(String::as_str))
            .chain(TARGET_LABELS)
            .collect()
    }

    /// Why `name` is not a stored series: the family it belongs to and the
    /// names Prometheus stores for that type.
    fn hint(&self, name: &str) -> String {
        let stored = |family: &str, kind: &str| match kind {
            "counter" => format!("{family}_total"),
            "histogram" => format!("{family}_bucket, {family}_sum, {family}_count"),
            "summary" => format!("{family}, {family}_sum, {family}_count"),
            _ => family.to_string(),
        };
        let family = [
            "", "_total", "_bucket", "_sum", "_count", "_created", "_info",
        ]
        .iter()
        .find_map(|suffix| {
            let f = name.strip_suffix(suffix)?;
            self.families.get(f).map(|kind| (f, kind))
        });
        match family {
            Some((f, kind)) => format!("{f} is a {kind}: query {}", stored(f, kind)),
            None => format!(
                "exported: {}",
                self.series.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// What is wrong with `expr` against the exposition; empty when nothing.
fn problems(place: &str, expr: &str, e: &Exposition, job: &str) -> Vec<String> {
    let q = parse_promql(expr);
    let mut out = Vec::new();
    if q.metrics.is_empty() {
        out.push(format!("{place}: no metric in {expr}"));
    }
    let mut labels: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
    for m in &q.metrics {
        if m.name == "up" {
            // Prometheus's own per target: only usersync's job is ours.
            let ok = m
                .matchers
                .iter()
                .any(|x| x.label == "job" && x.op == "=" && x.value == job);
            if !ok {
                out.push(format!(
                    "{place}: up without {{job=\"{job}\"}} (prometheus.yml's job) in {expr}"
                ));
            }
            continue;
        }
        let Some(samples) = e.series.get(&m.name) else {
            out.push(format!(
                "{place}: {} is not exported ({}) in {expr}",
                m.name,
                e.hint(&m.name)
            ));
            continue;
        };
        let known = e.labels_of(&m.name);
        labels.extend(known.iter().copied());
        for x in &m.matchers {
            if !known.contains(x.label.as_str()) {
                out.push(format!(
                    "{place}: {} has no label {} ({known:?}) in {expr}",
                    m.name, x.label
                ));
            } else if x.op == "="
                && !TARGET_LABELS.contains(&x.label.as_str())
                && !samples.iter().any(|l| l.get(&x.label) == Some(&x.value))
            {
                out.push(format!(
                    "{place}: no {}{{{}=\"{}\"}} series in {expr}",
                    m.name, x.label, x.value
                ));
            }
        }
    }
    for g in &q.grouping {
        if !labels.contains(g.as_str()) {
            out.push(format!(
                "{place}: grouping label {g} is on none of its metrics ({labels:?}) in {expr}"
            ));
        }
    }
    out
}

fn spawn_run(db: &TestDb) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(db.log_path())
        .expect("log file");
    let log2 = log.try_clone().expect("log file");
    db.binary_command(&["run"])
        .env("USERSYNC_LOG_LEVEL", "info,usersync=debug")
        .env("USERSYNC_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(log)
        .stderr(log2)
        .spawn()
        .expect("spawn usersync")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let mut child = spawn_run(&db);
    let base = metrics_url(&db).await;
    // One change synced and one dead-lettered: every labelled series exists.
    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com'), (2, 'not-an-email')")
        .await;
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let (_, text) = http_get(&format!("{base}/metrics")).await;
        if sample(&text, "usersync_changes_synced_total{operation=\"insert\"}") == Some(1.0)
            && sample(&text, "usersync_dead_letters_total{state=\"failed\"}") == Some(1.0)
            && sample(&text, "usersync_streaming") == Some(1.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no sync within {WAIT:?}:\n{text}\n{}",
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();

    let e = Exposition::parse(&text);
    let job = scrape_job();
    let d = dashboard();
    let mut exprs = dashboard_exprs(&d);
    exprs.extend(rule_exprs(&alerts()));
    let mut found = Vec::new();
    for (place, expr) in &exprs {
        found.extend(problems(place, expr, &e, &job));
    }
    for (place, selector, label) in dashboard_label_values(&d) {
        found.extend(problems(&place, &selector, &e, &job));
        for m in parse_promql(&selector).metrics {
            if !e.labels_of(&m.name).contains(label.as_str()) {
                found.push(format!("{place}: {} has no label {label}", m.name));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the dashboard or the alert rules query what usersync does not export:\n{}\n\nscraped:\n{text}",
        found.join("\n")
    );

    // The dashboard shows what the issue asks for.
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|(_, x)| parse_promql(x).metrics)
        .map(|m| m.name)
        .collect();
    for needed in [
        "usersync_replication_lag_bytes",
        "usersync_pushes_total",
        "usersync_push_duration_seconds_bucket",
        "usersync_push_retries_total",
        "usersync_dead_letters_total",
        "usersync_sync_latency_seconds_bucket",
        "usersync_streaming",
    ] {
        assert!(used.contains(needed), "nothing shows {needed}: {used:?}");
    }
    for (place, expr) in dashboard_exprs(&d) {
        if expr.contains("_bucket") {
            assert!(
                expr.contains("histogram_quantile(") && expr.contains("le"),
                "{place}: buckets without histogram_quantile by le: {expr}"
            );
        }
    }

    // The check itself catches what it is for: broken on purpose.
    for (why, expr) in [
        ("misspelled", "rate(usersync_pushs_total[5m])"),
        ("counter without _total", "rate(usersync_pushes[5m])"),
        (
            "histogram without _bucket",
            "histogram_quantile(0.9, sum by (le) (rate(usersync_push_duration_seconds[5m])))",
        ),
        ("gauge with _total", "usersync_streaming_total"),
        (
            "label value",
            "increase(usersync_dead_letters_total{state=\"faild\"}[15m])",
        ),
        (
            "label name",
            "sum by (sinks) (rate(usersync_pushes_total[5m]))",
        ),
        ("other job", "up{job=\"node\"} == 0"),
        ("no such metric", "max(usersync_follower)"),
    ] {
        let p = problems(why, expr, &e, &job);
        assert!(!p.is_empty(), "{why} not caught: {expr}");
    }
    let p = problems("hint", "rate(usersync_pushes[5m])", &e, &job);
    assert!(p[0].contains("query usersync_pushes_total"), "{p:?}");
}

// ---------------------------------------------------------------------------
// promtool

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install Debian's `prometheus` package, which ships it \
                 (apt-get install prometheus; .ci/run installs it on CI)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_the_rules_the_config_and_the_dashboard_queries() {
    let (ok, text) = promtool(&["check", "rules", "docker/prometheus/alerts.yml"]);
    assert!(
        ok,
        "promtool check rules docker/prometheus/alerts.yml:\n{text}"
    );
    assert!(text.contains("SUCCESS"), "{text}");
    let (ok, text) = promtool(&["check", "config", "docker/prometheus/prometheus.yml"]);
    assert!(
        ok,
        "promtool check config docker/prometheus/prometheus.yml:\n{text}"
    );

    // The dashboard's queries as recording rules, Grafana's variables filled
    // in, so promtool parses each one as PromQL.
    let rules: Vec<Value> = dashboard_exprs(&dashboard())
        .into_iter()
        .enumerate()
        .map(|(n, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "unknown variable in {expr}");
            serde_json::json!({ "record": format!("usersync_dashboard:query_{n}"), "expr": expr })
        })
        .collect();
    let file = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, serde_yaml_ng::to_string(&file).expect("yaml")).expect("write");
    let (ok, text) = promtool(&["check", "rules", path.to_str().expect("utf-8 path")]);
    assert!(ok, "the dashboard's queries:\n{text}");
}

#[test]
fn readme_alert_rules_are_the_rules_file() {
    let readme = read("README.md");
    let at = readme
        .find("alert rules")
        .expect("README.md shows the alert rules");
    let block = readme[at..]
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a yaml block after the alert rules")
        .0;
    let shown: Value = serde_yaml_ng::from_str(block).expect("README's rules parse");
    assert_eq!(
        shown,
        alerts(),
        "README.md's alert rules and docker/prometheus/alerts.yml differ"
    );
}

// ---------------------------------------------------------------------------
// The compose file's wiring.

fn compose() -> Value {
    yaml("docker/docker-compose.yml")
}

/// (host path relative to docker/, container path) of a service's bind mounts.
fn mounts(svc: &Value) -> Vec<(String, String)> {
    svc["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            let v = v.as_str().expect("short volume syntax");
            let mut parts = v.split(':');
            let host = parts.next().expect("host path");
            let target = parts.next().expect("container path");
            let host = host.strip_prefix("./").expect("a path under docker/");
            assert!(
                repo().join("docker").join(host).exists(),
                "mount of missing docker/{host}"
            );
            (host.to_string(), target.to_string())
        })
        .collect()
}

fn mount_target(svc: &Value, host: &str) -> String {
    mounts(svc)
        .into_iter()
        .find(|(h, _)| h == host)
        .unwrap_or_else(|| panic!("docker/{host} is not mounted"))
        .1
}

#[test]
fn compose_wires_usersync_prometheus_and_grafana() {
    let c = compose();
    let svc = |name: &str| {
        c.pointer(&format!("/services/{name}"))
            .unwrap_or_else(|| panic!("compose has no service {name}"))
    };

    // Prometheus reaches usersync's metrics where usersync listens.
    let usersync = svc("usersync");
    let listen = usersync["environment"]["USERSYNC_METRICS_LISTEN"]
        .as_str()
        .expect("usersync sets USERSYNC_METRICS_LISTEN");
    let (host, port) = listen.rsplit_once(':').expect("host:port");
    assert!(
        matches!(host, "0.0.0.0" | "[::]" | ""),
        "usersync's metrics listen on {listen}: Prometheus in another container cannot reach loopback"
    );
    let reached_as = match usersync["network_mode"].as_str() {
        Some(mode) => mode
            .strip_prefix("service:")
            .unwrap_or_else(|| panic!("network_mode {mode}"))
            .to_string(),
        None => "usersync".to_string(),
    };
    svc(&reached_as);
    let cfg = prometheus_config();
    let targets = &cfg["scrape_configs"][0]["static_configs"][0]["targets"];
    assert_eq!(
        targets,
        &serde_json::json!([format!("{reached_as}:{port}")]),
        "prometheus.yml scrapes usersync at {reached_as}:{port}"
    );
    assert_eq!(
        scrape_job(),
        "usersync",
        "alerts.yml's up{{job=\"usersync\"}}"
    );

    // Prometheus loads alerts.yml from beside its config.
    let prometheus = svc("prometheus");
    let config_at = mount_target(prometheus, "prometheus/prometheus.yml");
    let cmd: Vec<&str> = prometheus["command"]
        .as_array()
        .expect("prometheus command")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    assert!(
        cmd.contains(&format!("--config.file={config_at}").as_str()),
        "{cmd:?}"
    );
    let config_dir = Path::new(&config_at).parent().expect("dir");
    for rule_file in cfg["rule_files"].as_array().expect("rule_files") {
        let rule_file = config_dir.join(rule_file.as_str().expect("path"));
        assert_eq!(
            Path::new(&mount_target(prometheus, "prometheus/alerts.yml")),
            rule_file,
            "Prometheus reads its rules from {}",
            rule_file.display()
        );
    }

    // Grafana: the provisioned data source is that Prometheus, and the
    // provisioned dashboard folder holds usersync.json.
    let grafana = svc("grafana");
    assert_eq!(
        mount_target(grafana, "grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let ds = yaml("docker/grafana/provisioning/datasources/prometheus.yml");
    let ds = &ds["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    assert_eq!(
        ds["isDefault"], true,
        "the dashboard's variable picks the default"
    );
    svc("prometheus");
    assert_eq!(ds["url"], "http://prometheus:9090");
    let provider = yaml("docker/grafana/provisioning/dashboards/usersync.yml");
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path");
    let dashboard_at = mount_target(grafana, "grafana/usersync.json");
    assert_eq!(
        Path::new(&dashboard_at).parent(),
        Some(Path::new(path)),
        "the dashboard provider reads {path}"
    );

    // One data source throughout the dashboard: the DS_PROMETHEUS variable.
    let d = dashboard();
    let var = d["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .find(|v| format!("${{{}}}", v["name"].as_str().unwrap_or("")) == DATASOURCE_UID)
        .expect("a DS_PROMETHEUS variable");
    assert_eq!(
        (&var["type"], &var["query"]),
        (&"datasource".into(), &"prometheus".into())
    );
    let expected = serde_json::json!({ "type": "prometheus", "uid": DATASOURCE_UID });
    for p in panels(&d) {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], expected, "panel {}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"], expected, "panel {}", p["title"]);
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            assert_eq!(v["datasource"], expected, "variable {}", v["name"]);
        }
    }
    let ids: Vec<u64> = panels(&d).iter().filter_map(|p| p["id"].as_u64()).collect();
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "panel ids repeat");
    assert_eq!(d["uid"], "usersync", "README and compose link /d/usersync");
}
