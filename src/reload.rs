//! Hot reload (DESIGN.md §5): a file change under the config or policies directory, SIGHUP and
//! the admin `POST /reload` all take this one path: read and validate the whole configuration,
//! then swap it in atomically. Requests in flight finish on the snapshot they started with;
//! an invalid configuration is refused as a whole, logged with `file:line:column`, counted,
//! and the old one keeps serving.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify_debouncer_full::notify::RecommendedWatcher;
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::{SharedClock, rfc3339};
use crate::config::{self, ConfigErrors, ConfigHandle, Snapshot};
use crate::metrics::{Metrics, ResultLabel};

/// What the admin API shows about the configuration in force.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: String,
    pub loaded_at: String,
    pub source: String,
    /// The last reload attempt that failed, if the most recent attempt failed.
    pub last_error: Option<Vec<String>>,
}

pub struct Reloader {
    config: ConfigHandle,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    status: Mutex<Status>,
    /// One reload at a time, so the last file state always wins.
    running: tokio::sync::Mutex<()>,
}

/// The result of one reload.
pub enum Outcome {
    Applied(Status),
    Unchanged(Status),
    Rejected(ConfigErrors),
}

impl Reloader {
    pub fn new(config: ConfigHandle, metrics: Arc<Metrics>, clock: SharedClock) -> Self {
        let snapshot = config.load();
        let status = Status {
            version: snapshot.version.clone(),
            loaded_at: rfc3339(clock.now()),
            source: snapshot.source.display().to_string(),
            last_error: None,
        };
        Self {
            config,
            metrics,
            clock,
            status: Mutex::new(status),
            running: tokio::sync::Mutex::new(()),
        }
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set_status(&self, change: impl FnOnce(&mut Status)) -> Status {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut status);
        status.clone()
    }

    /// Reads, validates and applies the configuration from the same file as the one in force.
    pub async fn reload(&self, trigger: &str) -> Outcome {
        let _one_at_a_time = self.running.lock().await;
        let path = self.config.load().source.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path)).await;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::error!(%error, "configuration reload task failed");
                return Outcome::Unchanged(self.status());
            }
        };
        match loaded {
            Err(errors) => {
                for error in errors.errors() {
                    tracing::error!(target: "stepgate::reload", trigger, "{error}");
                }
                tracing::error!(
                    target: "stepgate::reload",
                    trigger,
                    errors = errors.errors().len(),
                    "configuration rejected; the previous one keeps serving"
                );
                self.metrics
                    .config_reloads
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                self.metrics.config_last_reload_ok.set(0);
                let lines = errors.errors().iter().map(ToString::to_string).collect();
                self.set_status(|s| s.last_error = Some(lines));
                Outcome::Rejected(errors)
            }
            Ok(snapshot) => {
                self.metrics.config_last_reload_ok.set(1);
                let old = self.config.load_full();
                if snapshot.version == old.version {
                    return Outcome::Unchanged(self.set_status(|s| s.last_error = None));
                }
                warn_restart_only(&old, &snapshot);
                let version = snapshot.version.clone();
                self.config.store(Arc::new(snapshot));
                self.metrics
                    .config_reloads
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                tracing::info!(target: "stepgate::reload", trigger, %version, "configuration applied");
                let now = rfc3339(self.clock.now());
                Outcome::Applied(self.set_status(|s| {
                    s.version = version;
                    s.loaded_at = now;
                    s.last_error = None;
                }))
            }
        }
    }
}

/// Settings read once at start: a change is logged, and takes effect at the next restart.
fn warn_restart_only(old: &Snapshot, new: &Snapshot) {
    let changed = [
        ("listen", old.listen != new.listen),
        ("admin", old.admin != new.admin),
        ("data_dir", old.data_dir != new.data_dir),
        ("store", old.store != new.store),
        ("audit", old.audit_sink != new.audit_sink),
        (
            "limits.max_connections",
            old.limits.max_connections != new.limits.max_connections,
        ),
        ("limits.workers", old.limits.workers != new.limits.workers),
    ];
    for (field, _) in changed.iter().filter(|(_, changed)| *changed) {
        tracing::warn!(
            target: "stepgate::reload",
            field,
            "this setting changed but only takes effect after a restart"
        );
    }
}

/// Watches the directories of `gateway.yaml`, of the policies and of the TLS and CA files (not
/// the files: editors save by rename and Kubernetes swaps a symlinked directory), debounced,
/// and reloads on change. The set of directories follows the configuration in force.
pub struct Watcher {
    reloader: Arc<Reloader>,
    debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    events: mpsc::UnboundedReceiver<()>,
    watched: BTreeSet<PathBuf>,
}

impl Watcher {
    /// Starts watching at once, so that a change made right after start-up is not missed.
    pub fn new(reloader: Arc<Reloader>) -> Option<Self> {
        let (tx, events) = mpsc::unbounded_channel::<()>();
        let debouncer = new_debouncer(
            Duration::from_millis(200),
            None,
            move |result: DebounceEventResult| {
                // Reading the files (our own reloads do) raises access events: only changes
                // count.
                let changed = result.is_ok_and(|events| {
                    events
                        .iter()
                        .any(|e| e.kind.is_create() || e.kind.is_modify() || e.kind.is_remove())
                });
                if changed {
                    let _ = tx.send(());
                }
            },
        );
        let debouncer = match debouncer {
            Ok(debouncer) => debouncer,
            Err(error) => {
                tracing::warn!(%error, "cannot watch the configuration; reload with SIGHUP or POST /reload");
                return None;
            }
        };
        let mut watcher = Self {
            reloader,
            debouncer,
            events,
            watched: BTreeSet::new(),
        };
        watcher.follow_config();
        Some(watcher)
    }

    /// Watches the directories the configuration in force reads, and only those.
    fn follow_config(&mut self) {
        let wanted = watched_dirs(&self.reloader.config.load());
        for dir in self.watched.difference(&wanted) {
            let _ = self.debouncer.unwatch(dir);
        }
        for dir in wanted.difference(&self.watched) {
            if let Err(error) = self.debouncer.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(%error, dir = %dir.display(), "cannot watch directory");
            }
        }
        self.watched = wanted;
    }

    /// Reloads on every (debounced) change until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                event = self.events.recv() => {
                    if event.is_none() {
                        return;
                    }
                    // Coalesce a burst of changes into one reload.
                    while self.events.try_recv().is_ok() {}
                    self.reloader.reload("file change").await;
                    self.follow_config();
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// The directories to watch for a snapshot.
pub fn watched_dirs(snapshot: &Snapshot) -> BTreeSet<PathBuf> {
    let dir_of = |file: &std::path::Path| match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = BTreeSet::new();
    dirs.insert(dir_of(&snapshot.source));
    dirs.insert(snapshot.policies_dir.clone());
    for file in &snapshot.extra_files {
        dirs.insert(dir_of(file));
    }
    dirs
}
