//! Reading the configuration again (SIGHUP, `relayctl reload`): what changed is applied
//! live where it can be (TURN credentials, peer policy, lifetimes and limits, the log level)
//! and named where it waits for a restart. The daemon and the control API both use it.

use std::sync::Arc;

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    config::{Changes, Config},
    turn::driver::TurnService,
};

/// What a reload (SIGHUP) needs from the binary: the configuration as a start would load it
/// now (file, environment and command-line overrides, validated), and the log filter's
/// handle.
pub struct Reload {
    pub load: LoadConfig,
    pub set_log_level: SetLogLevel,
}

/// Loads and validates the configuration; the error lists its problems.
pub type LoadConfig = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;
/// Changes the log filter (a `log.level` value).
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Reloads the configuration, on SIGHUP or `relayctl reload`: applies what can change live
/// (TURN credentials, peer policy, lifetimes and limits, the log level) and names what
/// waits for a restart. A configuration with problems changes nothing.
pub struct Reloader {
    running: std::sync::Mutex<Config>,
    hooks: Reload,
    turn: Option<Arc<TurnService>>,
}

impl Reloader {
    pub fn new(running: Config, hooks: Reload, turn: Option<Arc<TurnService>>) -> Reloader {
        Reloader {
            running: std::sync::Mutex::new(running),
            hooks,
            turn,
        }
    }

    /// Reads the configuration again and applies its live changes; the error lists the
    /// problems that made it change nothing.
    pub fn reload(&self) -> Result<Changes, String> {
        let mut running = self.running.lock().expect("reloader poisoned");
        let new = (self.hooks.load)().inspect_err(|problems| {
            tracing::error!("reload: nothing changed, the configuration has problems: {problems}");
        })?;
        let changes = running.changes(&new);
        if changes.live.is_empty() && changes.restart.is_empty() {
            tracing::info!("reload: the configuration is unchanged");
            return Ok(changes);
        }
        let merged = running.with_live_changes(&new);
        if let Some(turn) = &self.turn
            && changes.live.iter().any(|key| key.starts_with("turn."))
            && let Err(err) = turn.reconfigure(&merged.turn)
        {
            tracing::error!("reload: nothing changed: {err:#}");
            return Err(format!("{err:#}"));
        }
        if changes.live.contains(&"log.level")
            && let Err(err) = (self.hooks.set_log_level)(&merged.log.level)
        {
            tracing::error!(%err, "reload: log.level not applied");
        }
        tracing::info!(
            applied = %changes.live.join(", "),
            needs_restart = %changes.restart.join(", "),
            "reload: configuration reloaded"
        );
        if !changes.restart.is_empty() {
            tracing::warn!(
                keys = %changes.restart.join(", "),
                "reload: these changes take effect only when relayd restarts"
            );
        }
        *running = merged;
        Ok(changes)
    }
}

/// Reloads on every SIGHUP until relayd stops.
pub async fn reload_on_hangup(reloader: Arc<Reloader>, mut stopped: watch::Receiver<bool>) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(err) => {
            tracing::warn!(%err, "cannot handle SIGHUP: reload with `relayctl reload`");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => {}
            _ = stopped.changed() => return,
        }
        let _ = reloader.reload();
    }
}
