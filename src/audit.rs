//! Security events: written to the `stepgate::audit` log target at once and to the store by a
//! background writer, so that a flood of failed attempts never waits on the disk. The queue is
//! bounded; if the store falls that far behind, events still reach the log and the drop is
//! logged. [`Audit`] is the front the layers and operations record through.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use crate::clock::{SharedClock, rfc3339};
use crate::error::Attempt;
use crate::store::{AuditEvent, Store};

/// Who an event is about: a consumer's id and name.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

/// Records security events with the time they happened. Cheap to clone (one shared handle):
/// the request path carries it into every request's future.
#[derive(Clone)]
pub struct Audit(Arc<AuditFront>);

struct AuditFront {
    log: AuditLog,
    clock: SharedClock,
}

impl Audit {
    pub fn new(log: AuditLog, clock: SharedClock) -> Self {
        Self(Arc::new(AuditFront { log, clock }))
    }

    /// An event about `who` (or nobody in particular), with the key it came with.
    pub fn event(
        &self,
        kind: &str,
        who: Option<Who<'_>>,
        key_prefix: Option<&str>,
        detail: serde_json::Value,
    ) {
        self.0.log.record(AuditEvent {
            id: 0,
            at: self.0.clock.now(),
            kind: kind.to_owned(),
            consumer_id: who.map(|w| w.id.to_owned()),
            consumer_name: who.map(|w| w.name.to_owned()),
            key_prefix: key_prefix.map(str::to_owned),
            detail,
        });
    }

    /// An event about the consumer and key of a failed attempt.
    pub fn attempt(&self, kind: &str, by: &Attempt, detail: serde_json::Value) {
        self.event(
            kind,
            Some(Who {
                id: &by.consumer_id,
                name: &by.consumer_name,
            }),
            Some(&by.key_prefix),
            detail,
        );
    }

    /// Waits until every event recorded so far is stored (or given up on).
    pub async fn flush(&self) {
        self.0.log.flush().await;
    }
}

const QUEUE: usize = 10_000;
/// Events written to the store in one transaction at most.
const BATCH: usize = 512;

/// Where audit events are also written as JSON lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

enum Message {
    Event(AuditEvent),
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
}

impl AuditLog {
    /// Starts the writer on the current runtime.
    pub fn start(store: Arc<dyn Store>, sink: Option<Sink>) -> Self {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        tokio::spawn(async move {
            let mut sink = SinkWriter::open(sink).await;
            // Events are stored in batches (one transaction each) so that a burst of failed
            // attempts costs the store a few writes, not one per event.
            let mut batch = Vec::with_capacity(BATCH);
            let mut flushes = Vec::new();
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some(message) = next.take() {
                    match message {
                        Message::Event(event) => {
                            sink.write(&AuditView::of(event.clone())).await;
                            batch.push(event);
                        }
                        Message::Flush(done) => flushes.push(done),
                    }
                    if batch.len() < BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                // A store that is away (a restart, an outage) loses no event: the batch is
                // tried again, with backoff, while new events wait in the queue (and past its
                // bound reach the log only, counted above).
                let mut backoff = std::time::Duration::from_millis(100);
                while !batch.is_empty() {
                    match store.append_audit_batch(batch.clone()).await {
                        Ok(()) => batch.clear(),
                        Err(error) => {
                            tracing::error!(%error, count = batch.len(), "could not store audit events; retrying");
                            // Whoever waits for a flush reads what is stored meanwhile.
                            for done in flushes.drain(..) {
                                let _ = done.send(());
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                        }
                    }
                }
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn record(&self, event: AuditEvent) {
        tracing::info!(
            target: "stepgate::audit",
            kind = %event.kind,
            consumer_id = event.consumer_id.as_deref(),
            consumer = event.consumer_name.as_deref(),
            key_prefix = event.key_prefix.as_deref(),
            detail = %event.detail,
        );
        if self.tx.try_send(Message::Event(event)).is_err() {
            // One line per thousand drops, not one per drop: a flood must not flood the log.
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed);
            if dropped.is_multiple_of(1000) {
                tracing::error!(
                    dropped = dropped + 1,
                    "audit queue full; events kept in the log only (the store is behind)"
                );
            }
        }
    }

    /// Waits until every event recorded before this call is in the store and the sink.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

enum SinkWriter {
    None,
    Stdout(tokio::io::Stdout),
    File(tokio::fs::File),
}

impl SinkWriter {
    async fn open(sink: Option<Sink>) -> Self {
        match sink {
            None => SinkWriter::None,
            Some(Sink::Stdout) => SinkWriter::Stdout(tokio::io::stdout()),
            Some(Sink::File(path)) => {
                if let Some(dir) = path.parent() {
                    let _ = tokio::fs::create_dir_all(dir).await;
                }
                match tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await
                {
                    Ok(file) => SinkWriter::File(file),
                    Err(error) => {
                        tracing::error!(%error, path = %path.display(), "cannot open the audit log file; events go to the store and log only");
                        SinkWriter::None
                    }
                }
            }
        }
    }

    async fn write(&mut self, event: &AuditView) {
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let result = match self {
            SinkWriter::None => Ok(()),
            SinkWriter::Stdout(out) => out.write_all(&line).await,
            SinkWriter::File(file) => match file.write_all(&line).await {
                Ok(()) => file.flush().await,
                Err(e) => Err(e),
            },
        };
        if let Err(error) = result {
            tracing::error!(%error, "cannot write the audit log sink");
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditView {
    /// Assigned by the store; absent on lines written to the sink before storing.
    #[serde(skip_serializing_if = "is_unassigned")]
    pub id: i64,
    pub at: String,
    pub kind: String,
    pub consumer_id: Option<String>,
    pub consumer: Option<String>,
    pub key_prefix: Option<String>,
    pub detail: serde_json::Value,
}

impl AuditView {
    pub fn of(e: AuditEvent) -> Self {
        Self {
            id: e.id,
            at: rfc3339(e.at),
            kind: e.kind,
            consumer_id: e.consumer_id,
            consumer: e.consumer_name,
            key_prefix: e.key_prefix,
            detail: e.detail,
        }
    }
}

fn is_unassigned(id: &i64) -> bool {
    *id == 0
}
