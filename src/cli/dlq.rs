//! `usersync dlq …` at the edge: which command, how its entries look on a
//! terminal or as JSON, and the exit code. The work is `app::dlq`.

use crate::app::dlq::{self as app, ReplayError, Replayer, Selection};
use crate::config::{self, Config, ProcessEnv};
use crate::store::deadletter::Entry;

use super::{DlqCommand, Failure};

pub(super) async fn run(
    command: DlqCommand,
    path: &std::path::Path,
    explicit: bool,
) -> Result<(), Failure> {
    if let DlqCommand::Discard { yes: false, .. } = command {
        return Err(Failure::usage(
            "dlq discard deletes dead letters for good (their changes are never pushed); \
             nothing was deleted: add --yes to confirm, or use `usersync dlq replay` to push the users' current rows instead",
        ));
    }
    if let DlqCommand::Replay {
        inbound: Some(target),
        ..
    } = &command
    {
        let cfg = Config::load(path, explicit, &ProcessEnv).map_err(Failure::usage)?;
        crate::observe::logging::init_logging("warn", cfg.log.format == "json");
        return replay_inbound(&cfg, target).await;
    }
    if let DlqCommand::Replay { id, user, all, .. } = command {
        let cfg = Config::load(path, explicit, &ProcessEnv).map_err(Failure::usage)?;
        // One line per user goes to stdout; logs only for retries and
        // problems (RUST_LOG still overrides).
        crate::observe::logging::init_logging("warn", cfg.log.format == "json");
        return replay(&cfg, id, user, all).await;
    }
    let db = config::load_database(path, explicit, &ProcessEnv, true).map_err(Failure::usage)?;
    crate::observe::logging::init_logging("warn", false);
    let client = app::open(&db).await.map_err(Failure::of)?;
    match command {
        DlqCommand::List {
            json,
            inbound: true,
            ..
        } => {
            let entries = crate::store::inbound::dead_letters(&client, None)
                .await
                .map_err(Failure::of)?;
            if json {
                let text = serde_json::to_string_pretty(&entries).map_err(Failure::runtime)?;
                println!("{text}");
            } else if entries.is_empty() {
                println!("no inbound dead letters");
            } else {
                print!("{}", render_inbound(&entries));
            }
            Ok(())
        }
        DlqCommand::List { json, user, .. } => {
            let entries = app::list(&client, user.as_deref())
                .await
                .map_err(Failure::of)?;
            if json {
                let text = serde_json::to_string_pretty(&entries).map_err(Failure::runtime)?;
                println!("{text}");
            } else if entries.is_empty() {
                match &user {
                    Some(user) => println!("no dead letters for user {user}"),
                    None => println!("no dead letters"),
                }
            } else {
                print!("{}", render_table(&entries));
            }
            if !json && user.is_none() {
                // Inbound dead letters have no user (yet): pointed at, not mixed in.
                let inbound = crate::store::inbound::dead_letters(&client, None)
                    .await
                    .map_err(Failure::of)?;
                if !inbound.is_empty() {
                    println!(
                        "{} inbound dead letter{}: see `usersync dlq list --inbound`",
                        inbound.len(),
                        if inbound.len() == 1 { "" } else { "s" }
                    );
                }
            }
            Ok(())
        }
        DlqCommand::Show {
            inbound: Some(target),
            ..
        } => {
            let (source, event) = split_target(&target)?;
            let entry = crate::store::inbound::dead_letter(&client, source, event)
                .await
                .map_err(Failure::of)?
                .ok_or_else(|| {
                    Failure::runtime(format!("no inbound dead letter {source}/{event}"))
                })?;
            let text = serde_json::to_string_pretty(&entry).map_err(Failure::runtime)?;
            println!("{text}");
            Ok(())
        }
        DlqCommand::Show { id, .. } => {
            let id = id.unwrap_or_default();
            let entry = app::show(&client, id).await.map_err(Failure::of)?;
            let text = serde_json::to_string_pretty(&entry).map_err(Failure::runtime)?;
            println!("{text}");
            Ok(())
        }
        DlqCommand::Discard {
            inbound: Some(target),
            ..
        } => {
            let (source, event) = split_target(&target)?;
            let gone = crate::store::inbound::discard_dead_letter(&client, source, event)
                .await
                .map_err(Failure::of)?;
            if !gone {
                return Err(Failure::runtime(format!(
                    "no inbound dead letter {source}/{event} (see `usersync dlq list --inbound`)"
                )));
            }
            println!("discarded inbound dead letter {source}/{event}; a redelivery of it changes nothing");
            Ok(())
        }
        DlqCommand::Discard { id: Some(id), .. } => {
            let (e, parked) = app::discard_one(&client, id).await.map_err(Failure::of)?;
            println!(
                "discarded dead letter {} ({}, user {}, {}, {})",
                e.id, e.event_id, e.user_key, e.operation, e.state
            );
            if !parked {
                println!("user {} has no dead letters left", e.user_key);
            }
            Ok(())
        }
        DlqCommand::Discard { user, .. } => {
            let user = user.unwrap_or_default();
            let gone = app::discard_user(&client, &user)
                .await
                .map_err(Failure::of)?;
            if gone.is_empty() {
                println!("no dead letters for user {user}");
            }
            for e in &gone {
                println!(
                    "discarded dead letter {} ({}, user {}, {}, {})",
                    e.id, e.event_id, e.user_key, e.operation, e.state
                );
            }
            Ok(())
        }
        // Handled above, before any table query.
        DlqCommand::Replay { .. } => Ok(()),
    }
}

/// `SOURCE/EVENT_ID`: event ids (`msg_…`, `evt_…`) and source names hold
/// no `/`.
fn split_target(target: &str) -> Result<(&str, &str), Failure> {
    match target.split_once('/') {
        Some((s, e)) if !s.is_empty() && !e.is_empty() => Ok((s, e)),
        _ => Err(Failure::usage(format!(
            "{target:?}: name an inbound dead letter as SOURCE/EVENT_ID (see `usersync dlq list --inbound`)"
        ))),
    }
}

async fn replay_inbound(cfg: &Config, target: &str) -> Result<(), Failure> {
    use crate::app::inbound::Replayed;
    use crate::store::inbound::Applied;
    let (source, event) = split_target(target)?;
    match crate::app::inbound::replay(cfg, source, event)
        .await
        .map_err(Failure::of)?
    {
        Replayed::NotFound => Err(Failure::runtime(format!(
            "no inbound dead letter {source}/{event} (see `usersync dlq list --inbound`)"
        ))),
        Replayed::Handed => {
            println!("{source}/{event}: handed to the running daemon's receiver, which applies it");
            Ok(())
        }
        Replayed::Applied(Applied::Failed(reason)) => Err(Failure::runtime(format!(
            "{source}/{event} still cannot be applied: {reason}; it stays a dead letter"
        ))),
        Replayed::Applied(outcome) => {
            println!("{source}/{event}: {}", outcome.outcome());
            Ok(())
        }
    }
}

/// The readable table of `dlq list --inbound`.
pub fn render_inbound(entries: &[crate::store::inbound::InboundEntry]) -> String {
    let mut out = String::from("SOURCE/EVENT  TYPE  SUBJECT  RECEIVED  ERROR\n");
    for e in entries {
        out.push_str(&format!(
            "{}/{}  {}  {}  {}  {}\n",
            e.source,
            e.event_id,
            excerpt(&e.event_type, 40),
            excerpt(&e.subject, 40),
            e.received_at,
            excerpt(&e.error, 80)
        ));
    }
    out
}

async fn replay(
    cfg: &Config,
    id: Option<i64>,
    user: Option<String>,
    all: bool,
) -> Result<(), Failure> {
    let fail = Failure::of::<ReplayError>;
    let selection = match (id, user) {
        (Some(id), _) => Selection::Entry(id),
        (None, Some(user)) => Selection::User(user),
        (None, None) if all => Selection::All,
        (None, None) => return Err(Failure::usage("name an entry id, --user KEY or --all")),
    };
    let mut replayer = Replayer::connect(cfg).await.map_err(fail)?;
    let users = replayer.users(&selection).await.map_err(fail)?;
    if users.is_empty() {
        match &selection {
            Selection::User(user) => println!("no dead letters for user {user}"),
            _ => println!("no dead letters to replay"),
        }
        return Ok(());
    }
    let outcomes = replayer
        .replay(&users, |outcome| {
            if outcome.is_failure() {
                eprintln!("{outcome}");
            } else {
                println!("{outcome}");
            }
        })
        .await
        .map_err(fail)?;
    let failed = outcomes.iter().filter(|o| o.is_failure()).count();
    if failed > 0 {
        return Err(Failure::runtime(format!(
            "replay failed for {failed} of {} user{}; their dead letters stay (see `usersync dlq list`)",
            outcomes.len(),
            if outcomes.len() == 1 { "" } else { "s" }
        )));
    }
    Ok(())
}

/// At most `max` characters on one line, with `…` where it was cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let one_line = one_line.trim();
    if one_line.chars().count() <= max {
        return one_line.to_string();
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The readable table of `dlq list`.
pub fn render_table(entries: &[Entry]) -> String {
    const HEADERS: [&str; 9] = [
        "ID",
        "EVENT",
        "USER",
        "OPERATION",
        "STATE",
        "ATTEMPTS",
        "STATUS",
        "LAST ATTEMPT",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 9]> = entries
        .iter()
        .map(|e| {
            [
                e.id.to_string(),
                e.event_id.clone(),
                excerpt(&e.user_key, 60),
                e.operation.clone(),
                e.state.clone(),
                e.attempts.to_string(),
                e.last_status
                    .map_or_else(|| "-".to_string(), |s| s.to_string()),
                e.last_attempt_at.clone(),
                excerpt(&e.last_error, 60),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let last = cells.len() - 1;
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = w - cell.chars().count() + 2;
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&HEADERS.map(str::to_string));
    for row in &rows {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_is_bounded_and_one_line() {
        assert_eq!(
            excerpt("  HTTP 400:\n{\"error\":1}  ", 60),
            "HTTP 400: {\"error\":1}"
        );
        let long = excerpt(&"é".repeat(100), 60);
        assert_eq!(long.chars().count(), 60);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn table_aligns_columns() {
        let e = Entry {
            id: 7,
            event_id: "evt_0000000001000000_0".into(),
            user_key: "42".into(),
            operation: "user.updated".into(),
            state: "failed".into(),
            attempts: 3,
            last_status: None,
            last_error: "cannot connect".into(),
            first_attempt_at: "2026-01-01T00:00:00Z".into(),
            last_attempt_at: "2026-01-01T00:00:01Z".into(),
            commit_lsn: "0/1000000".into(),
            envelope: None,
        };
        let text = render_table(&[e]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("EVENT"), lines[1].find("evt_"));
        assert_eq!(lines[0].find("LAST ERROR"), lines[1].find("cannot connect"));
        assert!(lines[1].contains(" - "));
    }
}
