//! Security events (DESIGN.md §1, §4): written to the `stepgate::audit` log target at once and
//! to the store by a background writer, so that a flood of failed attempts never waits on the
//! disk. The queue is bounded; if the store falls that far behind, events still reach the log
//! and the drop is logged.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use crate::clock::rfc3339;
use crate::store::{AuditEvent, Store};

const QUEUE: usize = 10_000;

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
}

impl AuditLog {
    /// Starts the writer on the current runtime.
    pub fn start(store: Arc<dyn Store>, sink: Option<Sink>) -> Self {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        tokio::spawn(async move {
            let mut sink = SinkWriter::open(sink).await;
            while let Some(message) = rx.recv().await {
                match message {
                    Message::Event(event) => {
                        let kind = event.kind.clone();
                        sink.write(&AuditView::of(event.clone())).await;
                        if let Err(error) = store.append_audit(event).await {
                            tracing::error!(%error, kind, "could not store an audit event");
                        }
                    }
                    Message::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self { tx }
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
        if let Err(error) = self.tx.try_send(Message::Event(event)) {
            tracing::error!(reason = %error, "audit queue full or closed; event kept in the log only");
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
