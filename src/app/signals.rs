//! Signals for every long-running command: SIGTERM/Ctrl-C stop (a second
//! one exits at once), SIGHUP re-reads `[sync] enabled`.

use tokio_util::sync::CancellationToken;

/// Ctrl-C and SIGTERM both ask for a clean stop; a second one exits at once.
pub fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    cancel.cancel();
                    return;
                }
            };
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!(
                    "stopping: finishing pushes in flight (signal again to exit at once)"
                );
                cancel.cancel();
            } else {
                std::process::exit(130);
            }
        }
    });
}

/// The off switch for `usersync run`: on SIGHUP the config is read again and
/// `[sync] enabled` applied at once; any other changed key needs a restart.
pub fn spawn_reload_handler(
    path: std::path::PathBuf,
    explicit: bool,
    cfg: &crate::config::Config,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(cfg.sync.enabled);
    let mut current = cfg.clone();
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; [sync] enabled applies at restart only");
                // Keeps the sender, so the switch stays as configured.
                std::future::pending::<()>().await;
                return;
            }
        };
        while hup.recv().await.is_some() {
            let new = match crate::config::Config::load(&path, explicit, &crate::config::ProcessEnv)
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the config is invalid; nothing changed");
                    continue;
                }
            };
            let mut others = new.clone();
            others.sync.enabled = current.sync.enabled;
            if format!("{others:?}") != format!("{current:?}") {
                tracing::warn!(
                    "SIGHUP: keys other than [sync] enabled changed; restart to apply them"
                );
            }
            if new.sync.enabled != current.sync.enabled {
                tracing::info!(
                    enabled = new.sync.enabled,
                    "SIGHUP: applying [sync] enabled"
                );
            } else {
                tracing::info!(
                    enabled = new.sync.enabled,
                    "SIGHUP: [sync] enabled unchanged"
                );
            }
            current.sync.enabled = new.sync.enabled;
            let _ = tx.send(new.sync.enabled);
        }
    });
    rx
}
