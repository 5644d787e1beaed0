//! Progress of the long commands (backfill, reconcile, import): an
//! `indicatif` bar on stderr when stderr is a terminal, otherwise a plain
//! log line every few seconds (and one at the end), so that a log collector
//! never receives carriage returns and escape codes.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the log-line fallback reports.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    what: &'static str,
    unit: &'static str,
    bar: Option<ProgressBar>,
    total: u64,
    start_done: u64,
    done: u64,
    started: Instant,
    last_log: Option<Instant>,
    logged: Option<u64>,
}

impl Progress {
    /// `what` names the command ("backfill"), `unit` what is counted
    /// ("rows"). `quiet_terminal` forces log lines even on a terminal (a
    /// backfill beside the daemon shares stderr with its logs).
    pub fn new(
        what: &'static str,
        unit: &'static str,
        total: u64,
        done: u64,
        quiet_terminal: bool,
    ) -> Progress {
        let bar = (!quiet_terminal && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!(
                "{what}: {{wide_bar}} {{pos}}/{{len}} {unit} ({{percent}}%), {{per_sec}}, ETA {{eta}}"
            );
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style);
            }
            bar.set_position(done);
            bar.reset_eta();
            bar
        });
        Progress {
            what,
            unit,
            bar,
            total,
            start_done: done,
            done,
            started: Instant::now(),
            last_log: None,
            logged: None,
        }
    }

    /// Whether this draws a bar (stderr is a terminal) or logs lines.
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// The total may only be known (or grow) as pages arrive.
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    pub fn set(&mut self, done: u64) {
        self.done = done.max(self.done);
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None => {
                if self.last_log.is_some_and(|t| t.elapsed() < LOG_EVERY) {
                    return;
                }
                self.log();
            }
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.set(self.done + n);
    }

    /// The plain line the fallback logs: done, total, rate, ETA.
    pub fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done.saturating_sub(self.start_done) as f64 / secs;
        let left = self.total.saturating_sub(self.done);
        let eta = if rate > 0.0 {
            format_secs(left as f64 / rate)
        } else {
            "?".into()
        };
        let pct = if self.total > 0 {
            (self.done as f64 * 100.0 / self.total as f64).min(100.0)
        } else {
            100.0
        };
        format!(
            "{}: {}/{} {} ({pct:.1}%), {rate:.0} {}/s, ETA {eta}",
            self.what, self.done, self.total, self.unit, self.unit
        )
    }

    fn log(&mut self) {
        self.last_log = Some(Instant::now());
        self.logged = Some(self.done);
        tracing::info!(done = self.done, total = self.total, "{}", self.line());
    }

    /// Ends the bar, or logs the final state if the last line did not show it.
    pub fn finish(&mut self) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None => {
                if self.logged != Some(self.done) {
                    self.log();
                }
            }
        }
    }
}

pub fn format_secs(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_readable() {
        assert_eq!(format_secs(5.2), "5s");
        assert_eq!(format_secs(125.0), "2m05s");
        assert_eq!(format_secs(3725.0), "1h02m");
    }

    #[test]
    fn lines_name_the_command_and_unit() {
        // Test harness stderr is captured, not a terminal: the fallback.
        let mut p = Progress::new("reconcile", "records", 10, 0, false);
        assert!(!p.is_bar());
        p.set(4);
        assert!(p.line().starts_with("reconcile: 4/10 records (40.0%)"));
        p.finish();
        assert_eq!(p.logged, Some(4));
    }
}
