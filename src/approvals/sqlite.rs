//! Requests for approval on one node, in a table of the gateway's SQLite database (a second
//! connection beside the store's, in WAL mode): a restart keeps the pending, approved and
//! spent ones, so an approval granted is never lost. Rows go a while after they expire.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Approval, ApprovalStore, Stage, State, keep_for};
use crate::store::StoreError;
use crate::store::sqlite::{blocking, connect};

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    state TEXT NOT NULL,
    pending INTEGER NOT NULL,
    keep_until INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_pending ON approvals (pending) WHERE pending = 1;";

pub struct SqliteApprovals {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteApprovals {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        blocking(&self.conn, f).await
    }
}

fn decode(record: &str, state: &str) -> Result<(Approval, State), StoreError> {
    let approval: Approval = serde_json::from_str(record).map_err(unavailable)?;
    let state = State::decode(state).ok_or_else(|| unavailable("an unreadable approval state"))?;
    Ok((approval, state))
}

#[async_trait]
impl ApprovalStore for SqliteApprovals {
    async fn put(&self, approval: &Approval) -> Result<(), StoreError> {
        let record = serde_json::to_string(approval).map_err(unavailable)?;
        let (id, now) = (approval.id.clone(), approval.created_at);
        let keep_until = now.saturating_add(keep_for(approval));
        self.with(move |conn| {
            conn.execute("DELETE FROM approvals WHERE keep_until < ?1", params![now as i64])
                .map_err(unavailable)?;
            conn.execute(
                "INSERT INTO approvals (id, record, state, pending, keep_until) VALUES (?1, ?2, ?3, 1, ?4)",
                params![id, record, State::Pending.encode(), keep_until as i64],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<(Approval, State)>, StoreError> {
        let id = id.to_owned();
        self.with(move |conn| {
            let row: Option<(String, String)> = conn
                .query_row(
                    "SELECT record, state FROM approvals WHERE id = ?1",
                    params![id],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(record, state)| decode(&record, &state))
                .transpose()
        })
        .await
    }

    async fn transition(
        &self,
        id: &str,
        from: Stage,
        to: &State,
    ) -> Result<Result<(), Option<State>>, StoreError> {
        let (id, to) = (id.to_owned(), to.encode());
        let prefix = from.prefix();
        self.with(move |conn| {
            // One statement: the state moves only if it is still of the kind expected.
            let moved = conn
                .execute(
                    "UPDATE approvals SET state = ?2, pending = 0 \
                     WHERE id = ?1 AND substr(state, 1, length(?3)) = ?3",
                    params![id, to, prefix],
                )
                .map_err(unavailable)?;
            if moved == 1 {
                return Ok(Ok(()));
            }
            let found: Option<String> = conn
                .query_row(
                    "SELECT state FROM approvals WHERE id = ?1",
                    params![id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            Ok(Err(found.as_deref().and_then(State::decode)))
        })
        .await
    }

    async fn pending(&self) -> Result<Vec<Approval>, StoreError> {
        self.with(|conn| {
            let mut statement = conn
                .prepare("SELECT record FROM approvals WHERE pending = 1")
                .map_err(unavailable)?;
            let records = statement
                .query_map([], |row| row.get::<_, String>(0))
                .map_err(unavailable)?;
            records
                .map(|record| {
                    let record = record.map_err(unavailable)?;
                    serde_json::from_str(&record).map_err(unavailable)
                })
                .collect()
        })
        .await
    }
}
