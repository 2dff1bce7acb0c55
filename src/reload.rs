//! Hot reload (DESIGN.md §5): a file change under the config or policies directory, SIGHUP and
//! the admin `POST /reload` all take this one path: read and validate the whole configuration,
//! then swap it in atomically. Requests in flight finish on the snapshot they started with;
//! an invalid configuration is refused as a whole, logged with `file:line:column`, counted,
//! and the old one keeps serving.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify_debouncer_full::notify::RecommendedWatcher;
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::{SharedClock, rfc3339};
use crate::config::{self, ConfigErrors};
use crate::metrics::{Metrics, ResultLabel};
use crate::snapshot::{ConfigHandle, Snapshot};

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
            Ok(config) => {
                self.metrics.config_last_reload_ok.set(1);
                let old = self.config.load_full();
                if config.version == old.version {
                    return Outcome::Unchanged(self.set_status(|s| s.last_error = None));
                }
                // Built only now that all of it validated, and only when it changed.
                let snapshot = Snapshot::build(config);
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
    events: mpsc::UnboundedReceiver<Vec<PathBuf>>,
    watched: BTreeSet<PathBuf>,
}

impl Watcher {
    /// Starts watching at once, so that a change made right after start-up is not missed.
    pub fn new(reloader: Arc<Reloader>) -> Option<Self> {
        let (tx, events) = mpsc::unbounded_channel::<Vec<PathBuf>>();
        let debouncer = new_debouncer(
            Duration::from_millis(200),
            None,
            move |result: DebounceEventResult| {
                // Reading the files (our own reloads do) raises access events: only changes
                // count. Which files they touch is decided on the other side, against the
                // configuration in force.
                let Ok(events) = result else { return };
                let paths: Vec<PathBuf> = events
                    .iter()
                    .filter(|e| e.kind.is_create() || e.kind.is_modify() || e.kind.is_remove())
                    .flat_map(|e| e.paths.iter().cloned())
                    .collect();
                if !paths.is_empty() {
                    let _ = tx.send(paths);
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

    /// Reloads on every (debounced) change to a file the configuration reads, until
    /// `shutdown`. Changes to other files in the watched directories (a log file written
    /// beside `gateway.yaml`, say) are ignored without a word: logging them would feed a log
    /// written there back into the watcher.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                event = self.events.recv() => {
                    let Some(mut paths) = event else { return };
                    // Coalesce a burst of changes into one reload.
                    while let Ok(more) = self.events.try_recv() {
                        paths.extend(more);
                    }
                    let snapshot = self.reloader.config.load_full();
                    if !paths.iter().any(|p| concerns(&snapshot, p)) {
                        continue;
                    }
                    self.reloader.reload("file change").await;
                    self.follow_config();
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Whether a change to `path` may change the configuration `snapshot` was read from:
/// `gateway.yaml`, a policy file, a TLS or CA file it names, or an entry of a directory that
/// Kubernetes swaps atomically (`..data` and its timestamped siblings, behind the symlinks the
/// files are).
pub fn concerns(snapshot: &Snapshot, path: &Path) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    if name.to_str().is_some_and(|n| n.starts_with("..")) {
        return true;
    }
    let dir = parent_dir(path);
    let same_file =
        |file: &Path| file.file_name() == Some(name) && same_dir(&parent_dir(file), &dir);
    let policy = same_dir(&snapshot.policies_dir, &dir)
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
    policy
        || same_file(&snapshot.source)
        || snapshot.extra_files.iter().any(|f| same_file(f))
        || same_dir(&snapshot.policies_dir, path)
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether two directories are the same, as far as the watcher's event paths and the
/// configuration's (possibly relative) paths can tell.
fn same_dir(a: &Path, b: &Path) -> bool {
    a == b
        || a.canonicalize()
            .ok()
            .zip(b.canonicalize().ok())
            .is_some_and(|(a, b)| a == b)
}

/// The directories to watch for a snapshot.
pub fn watched_dirs(snapshot: &Snapshot) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    dirs.insert(parent_dir(&snapshot.source));
    dirs.insert(snapshot.policies_dir.clone());
    for file in &snapshot.extra_files {
        dirs.insert(parent_dir(file));
    }
    dirs
}
