//! Security events (DESIGN.md §1, §4): written to the `stepgate::audit` log target at once and
//! to the store by a background writer, so that a flood of failed attempts never waits on the
//! disk. The queue is bounded; if the store falls that far behind, events still reach the log
//! and the drop is logged.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{AuditEvent, Store};

const QUEUE: usize = 10_000;

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
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                match message {
                    Message::Event(event) => {
                        let kind = event.kind.clone();
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

    /// Waits until every event recorded before this call is in the store.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}
