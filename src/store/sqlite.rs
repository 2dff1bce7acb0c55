//! The embedded store: one SQLite file (WAL), schema migrations versioned in code through
//! `PRAGMA user_version`. rusqlite is blocking, so every call runs on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use subtle::ConstantTimeEq;

use super::{
    AuditEvent, BanRecord, Change, ChangeFeed, CodeCheck, ConsumerFilter, ConsumerRecord,
    ConsumerState, FailureCountRecord, Freshness, Hash, KeyRecord, LimiterChange, LimiterState,
    RecoveryCodeRecord, SmsCodeRecord, SmsRecord, State, Store, StoreError, TotpRecord,
};
use crate::credentials::assurance::Assurance;
use crate::credentials::factors::Purpose;
use crate::credentials::totp::{TotpAlgorithm, TotpParams};

/// Schema migrations; entry `i` takes the schema from version `i` to `i + 1`. Never edit a
/// released entry: add a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE consumers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    roles TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE api_keys (
    hash BLOB PRIMARY KEY,
    consumer_id TEXT NOT NULL REFERENCES consumers(id) ON DELETE CASCADE,
    prefix TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX api_keys_consumer ON api_keys(consumer_id);
CREATE TABLE totp (
    consumer_id TEXT PRIMARY KEY REFERENCES consumers(id) ON DELETE CASCADE,
    secret BLOB NOT NULL,
    algorithm TEXT NOT NULL,
    digits INTEGER NOT NULL,
    period INTEGER NOT NULL,
    confirmed INTEGER NOT NULL,
    last_step INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE recovery_codes (
    consumer_id TEXT NOT NULL REFERENCES consumers(id) ON DELETE CASCADE,
    hash BLOB NOT NULL,
    used_at INTEGER,
    PRIMARY KEY (consumer_id, hash)
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    consumer_id TEXT,
    consumer_name TEXT,
    key_prefix TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX audit_consumer_at ON audit(consumer_id, at);
CREATE INDEX audit_at ON audit(at);
"#,
    r#"
CREATE INDEX audit_consumer_name_at ON audit(consumer_name, at);
"#,
    // Issue 7: a pending TOTP enrolment lives beside the confirmed one (an abandoned
    // re-enrolment must not lock the consumer out), and the SMS factor.
    r#"
CREATE TABLE totp_pending (
    consumer_id TEXT PRIMARY KEY REFERENCES consumers(id) ON DELETE CASCADE,
    secret BLOB NOT NULL,
    algorithm TEXT NOT NULL,
    digits INTEGER NOT NULL,
    period INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
INSERT INTO totp_pending (consumer_id, secret, algorithm, digits, period, created_at)
    SELECT consumer_id, secret, algorithm, digits, period, created_at FROM totp WHERE confirmed = 0;
DELETE FROM totp WHERE confirmed = 0;
CREATE TABLE sms (
    consumer_id TEXT PRIMARY KEY REFERENCES consumers(id) ON DELETE CASCADE,
    phone BLOB,
    pending_phone BLOB,
    updated_at INTEGER NOT NULL
);
CREATE TABLE sms_codes (
    consumer_id TEXT NOT NULL REFERENCES consumers(id) ON DELETE CASCADE,
    purpose TEXT NOT NULL,
    hash BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (consumer_id, purpose)
);
"#,
    // Review of issue 7: a pending enrolment remembers the account's level when it was started
    // (`registry::assurance`) and when the number was entered. Enrolments pending from before
    // get level 0, the weakest: they can no longer be confirmed beside a confirmed factor.
    r#"
ALTER TABLE totp_pending ADD COLUMN started_with INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sms ADD COLUMN pending_with INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sms ADD COLUMN pending_at INTEGER;
UPDATE sms SET pending_at = updated_at WHERE pending_phone IS NOT NULL;
"#,
    // The failure limiter's bans and per-subject counts, so that a restart keeps them.
    r#"
CREATE TABLE bans (
    subject TEXT PRIMARY KEY,
    started INTEGER NOT NULL,
    until INTEGER NOT NULL
);
CREATE TABLE failure_counts (
    policy TEXT NOT NULL,
    subject TEXT NOT NULL,
    tat_ms INTEGER NOT NULL,
    PRIMARY KEY (policy, subject)
);
CREATE INDEX failure_counts_subject ON failure_counts(subject);
"#,
    // Each consumer's version, raised by every change to what the directory holds of it
    // (not by a key's last use or a TOTP watermark), so that nodes sharing the store can tell
    // which changes they have applied.
    r#"
ALTER TABLE consumers ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
CREATE TRIGGER consumers_changed AFTER UPDATE OF name, roles, disabled ON consumers
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.id; END;
CREATE TRIGGER api_keys_added AFTER INSERT ON api_keys
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.consumer_id; END;
CREATE TRIGGER api_keys_revoked AFTER UPDATE OF revoked_at ON api_keys
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.consumer_id; END;
CREATE TRIGGER totp_added AFTER INSERT ON totp
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.consumer_id; END;
CREATE TRIGGER totp_removed AFTER DELETE ON totp
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = OLD.consumer_id; END;
CREATE TRIGGER totp_pending_added AFTER INSERT ON totp_pending
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.consumer_id; END;
CREATE TRIGGER totp_pending_removed AFTER DELETE ON totp_pending
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = OLD.consumer_id; END;
CREATE TRIGGER recovery_codes_added AFTER INSERT ON recovery_codes
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.consumer_id; END;
CREATE TRIGGER recovery_codes_used AFTER UPDATE OF used_at ON recovery_codes
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.consumer_id; END;
CREATE TRIGGER recovery_codes_removed AFTER DELETE ON recovery_codes
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = OLD.consumer_id; END;
CREATE TRIGGER sms_added AFTER INSERT ON sms
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.consumer_id; END;
CREATE TRIGGER sms_changed AFTER UPDATE ON sms
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = NEW.consumer_id; END;
CREATE TRIGGER sms_removed AFTER DELETE ON sms
    BEGIN UPDATE consumers SET version = version + 1 WHERE id = OLD.consumer_id; END;
"#,
];

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: std::path::PathBuf,
    /// Every committed change to a consumer, for this process's subscribers (one node: the
    /// store feeds itself).
    feed: tokio::sync::broadcast::Sender<Change>,
    freshness: Arc<Freshness>,
}

/// Changes a subscriber may fall behind by before it is told to resync.
const FEED_BACKLOG: usize = 4096;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let mut conn = connect(path)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(unavailable)?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            feed: tokio::sync::broadcast::channel(FEED_BACKLOG).0,
            freshness: Freshness::always(),
        })
    }

    /// A write to `consumer_id`'s state: runs `f`, then announces the consumer's version on
    /// the change feed (whether or not `f` changed anything: a subscriber skips a version it
    /// has). Deletions say their own version (`f` returns it).
    async fn write<T, F>(&self, consumer_id: String, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let id = consumer_id.clone();
        let (value, version) = self
            .with(move |conn| {
                let value = f(conn)?;
                Ok((value, version_of(conn, &id)?))
            })
            .await?;
        if let Some(version) = version {
            self.announce(&consumer_id, version);
        }
        Ok(value)
    }

    fn announce(&self, consumer_id: &str, version: u64) {
        // No subscriber is fine: nothing holds an index then.
        let _ = self.feed.send(Change {
            consumer_id: Arc::from(consumer_id),
            version,
        });
    }

    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        blocking(&self.conn, f).await
    }
}

/// A connection to the database file as the gateway uses it (WAL, `synchronous = NORMAL`, a
/// 5 s busy timeout), for the store and for the tables that live beside its own.
pub fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn =
        Connection::open(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(unavailable)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(unavailable)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(unavailable)?;
    Ok(conn)
}

/// Runs `f` on a shared connection on tokio's blocking pool (SQLite calls block).
pub async fn blocking<T, F>(conn: &Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
{
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = conn
            .lock()
            .map_err(|_| unavailable("store lock poisoned"))?;
        f(&mut conn)
    })
    .await
    .map_err(unavailable)?
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(unavailable)?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(unavailable(format!(
            "the database has schema version {version}, newer than this stepgate knows ({}); \
             use a newer stepgate",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction().map_err(unavailable)?;
        tx.execute_batch(sql).map_err(unavailable)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )
        .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
    }
    Ok(())
}

/// Everything stored of every consumer, or of the one with id `only`.
fn read_state(conn: &Connection, only: Option<&str>) -> Result<State, StoreError> {
    let by = |column: &str| match only {
        Some(_) => format!(" WHERE {column} = ?1"),
        None => String::new(),
    };
    let params: Vec<&dyn rusqlite::ToSql> = match &only {
        Some(id) => vec![id],
        None => Vec::new(),
    };
    let mut state = State::default();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT id, name, roles, disabled, created_at, version FROM consumers{}",
            by("id")
        ))
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params.as_slice(), |row| {
            let roles: String = row.get(2)?;
            Ok(ConsumerRecord {
                id: row.get(0)?,
                name: row.get(1)?,
                roles: serde_json::from_str(&roles).unwrap_or_default(),
                disabled: row.get(3)?,
                created_at: to_u64(row.get(4)?),
                version: to_u64(row.get(5)?),
            })
        })
        .map_err(unavailable)?;
    state.consumers = rows.collect::<Result<_, _>>().map_err(unavailable)?;

    let mut stmt = conn
        .prepare(&format!("SELECT consumer_id, hash, prefix, created_at, last_used_at, revoked_at FROM api_keys{}", by("consumer_id")))
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params.as_slice(), |row| {
            Ok(KeyRecord {
                consumer_id: row.get(0)?,
                hash: hash_from(row.get(1)?)?,
                prefix: row.get(2)?,
                created_at: to_u64(row.get(3)?),
                last_used_at: row.get::<_, Option<i64>>(4)?.map(to_u64),
                revoked_at: row.get::<_, Option<i64>>(5)?.map(to_u64),
            })
        })
        .map_err(unavailable)?;
    state.keys = rows.collect::<Result<_, _>>().map_err(unavailable)?;

    let mut stmt = conn
        .prepare(&format!("SELECT consumer_id, secret, algorithm, digits, period, confirmed, last_step, created_at FROM totp{}", by("consumer_id")))
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params.as_slice(), |row| {
            let algorithm: String = row.get(2)?;
            Ok(TotpRecord {
                consumer_id: row.get(0)?,
                secret_sealed: row.get(1)?,
                params: TotpParams {
                    algorithm: TotpAlgorithm::parse(&algorithm).unwrap_or(TotpAlgorithm::Sha1),
                    digits: row.get(3)?,
                    period: to_u64(row.get(4)?),
                },
                confirmed: row.get(5)?,
                last_step: row.get::<_, Option<i64>>(6)?.map(to_u64),
                created_at: to_u64(row.get(7)?),
                started_with: Assurance::KeyOnly,
            })
        })
        .map_err(unavailable)?;
    state.totp = rows.collect::<Result<_, _>>().map_err(unavailable)?;

    let mut stmt = conn
        .prepare(&format!("SELECT consumer_id, secret, algorithm, digits, period, created_at, started_with FROM totp_pending{}", by("consumer_id")))
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params.as_slice(), |row| {
            let algorithm: String = row.get(2)?;
            Ok(TotpRecord {
                consumer_id: row.get(0)?,
                secret_sealed: row.get(1)?,
                params: TotpParams {
                    algorithm: TotpAlgorithm::parse(&algorithm).unwrap_or(TotpAlgorithm::Sha1),
                    digits: row.get(3)?,
                    period: to_u64(row.get(4)?),
                },
                confirmed: false,
                last_step: None,
                created_at: to_u64(row.get(5)?),
                started_with: Assurance::from_db(row.get(6)?),
            })
        })
        .map_err(unavailable)?;
    for row in rows {
        state.totp.push(row.map_err(unavailable)?);
    }

    let mut stmt = conn
        .prepare(&format!("SELECT consumer_id, phone, pending_phone, updated_at, pending_at, pending_with FROM sms{}", by("consumer_id")))
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params.as_slice(), |row| {
            Ok(SmsRecord {
                consumer_id: row.get(0)?,
                phone_sealed: row.get(1)?,
                pending_sealed: row.get(2)?,
                updated_at: to_u64(row.get(3)?),
                pending_at: row.get::<_, Option<i64>>(4)?.map(to_u64),
                pending_with: Assurance::from_db(row.get(5)?),
            })
        })
        .map_err(unavailable)?;
    state.sms = rows.collect::<Result<_, _>>().map_err(unavailable)?;

    let mut stmt = conn
        .prepare(&format!(
            "SELECT consumer_id, hash, used_at FROM recovery_codes{}",
            by("consumer_id")
        ))
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params.as_slice(), |row| {
            Ok(RecoveryCodeRecord {
                consumer_id: row.get(0)?,
                hash: hash_from(row.get(1)?)?,
                used_at: row.get::<_, Option<i64>>(2)?.map(to_u64),
            })
        })
        .map_err(unavailable)?;
    state.recovery_codes = rows.collect::<Result<_, _>>().map_err(unavailable)?;
    Ok(state)
}

fn version_of(conn: &Connection, consumer_id: &str) -> Result<Option<u64>, StoreError> {
    conn.query_row(
        "SELECT version FROM consumers WHERE id = ?1",
        params![consumer_id],
        |row| row.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.map(to_u64))
    .map_err(unavailable)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn hash_from(blob: Vec<u8>) -> rusqlite::Result<Hash> {
    blob.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "hash".into(), rusqlite::types::Type::Blob)
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self) -> Result<State, StoreError> {
        self.with(|conn| read_state(conn, None)).await
    }

    async fn load_consumer(&self, id: &str) -> Result<Option<ConsumerState>, StoreError> {
        let id = id.to_owned();
        let state = self.with(move |conn| read_state(conn, Some(&id))).await?;
        Ok(state.into_consumers().into_iter().next())
    }

    fn changes(&self) -> ChangeFeed {
        ChangeFeed::new(self.feed.subscribe())
    }

    /// Only this node writes the file, and its feed never goes quiet.
    fn freshness(&self) -> Arc<Freshness> {
        self.freshness.clone()
    }

    async fn insert_consumer(
        &self,
        consumer: ConsumerRecord,
        key: KeyRecord,
    ) -> Result<(), StoreError> {
        self.write(consumer.id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let roles = serde_json::to_string(&consumer.roles).map_err(unavailable)?;
            tx.execute(
                "INSERT INTO consumers (id, name, roles, disabled, created_at, version) VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                params![consumer.id, consumer.name, roles, consumer.disabled, to_i64(consumer.created_at)],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("consumer `{}`", consumer.name))
                } else {
                    unavailable(e)
                }
            })?;
            insert_key(&tx, &key)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn update_consumer(&self, consumer: ConsumerRecord) -> Result<(), StoreError> {
        self.write(consumer.id.clone(), move |conn| {
            let roles = serde_json::to_string(&consumer.roles).map_err(unavailable)?;
            conn.execute(
                "UPDATE consumers SET roles = ?2, disabled = ?3 WHERE id = ?1",
                params![consumer.id, roles, consumer.disabled],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn delete_consumer(&self, id: String) -> Result<(), StoreError> {
        let consumer_id = id.clone();
        let version = self
            .with(move |conn| {
                let tx = conn.transaction().map_err(unavailable)?;
                let version = version_of(&tx, &id)?;
                tx.execute("DELETE FROM consumers WHERE id = ?1", params![id])
                    .map_err(unavailable)?;
                tx.commit().map_err(unavailable)?;
                Ok(version)
            })
            .await?;
        if let Some(version) = version {
            self.announce(&consumer_id, version + 1);
        }
        Ok(())
    }

    async fn insert_key(&self, key: KeyRecord) -> Result<(), StoreError> {
        self.write(key.consumer_id.clone(), move |conn| insert_key(conn, &key))
            .await
    }

    async fn revoke_key(
        &self,
        consumer_id: String,
        prefix: String,
        at: u64,
    ) -> Result<bool, StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let changed = conn
                .execute(
                    "UPDATE api_keys SET revoked_at = ?3 WHERE consumer_id = ?1 AND prefix = ?2 AND revoked_at IS NULL",
                    params![consumer_id, prefix, to_i64(at)],
                )
                .map_err(unavailable)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn record_key_use(&self, uses: Vec<(Hash, u64)>) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            {
                let mut stmt = tx
                    .prepare("UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?2) WHERE hash = ?1")
                    .map_err(unavailable)?;
                for (hash, at) in &uses {
                    stmt.execute(params![hash.as_slice(), to_i64(*at)]).map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn put_pending_totp(&self, totp: TotpRecord) -> Result<(), StoreError> {
        self.write(totp.consumer_id.clone(), move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO totp_pending (consumer_id, secret, algorithm, digits, period, created_at, started_with)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    totp.consumer_id,
                    totp.secret_sealed,
                    totp.params.algorithm.as_str(),
                    totp.params.digits,
                    to_i64(totp.params.period),
                    to_i64(totp.created_at),
                    totp.started_with.to_db(),
                ],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn confirm_totp(
        &self,
        consumer_id: String,
        step: u64,
        recovery: Vec<Hash>,
        drop_pending_below: Assurance,
    ) -> Result<bool, StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            // Moved, not copied: deleting the pending row is what makes a second, concurrent
            // confirm with the same code fail.
            let changed = tx
                .execute(
                    "INSERT OR REPLACE INTO totp (consumer_id, secret, algorithm, digits, period, confirmed, last_step, created_at)
                     SELECT consumer_id, secret, algorithm, digits, period, 1, ?2, created_at
                     FROM totp_pending WHERE consumer_id = ?1",
                    params![consumer_id, to_i64(step)],
                )
                .map_err(unavailable)?;
            if changed == 0 {
                return Ok(false);
            }
            tx.execute("DELETE FROM totp_pending WHERE consumer_id = ?1", params![consumer_id])
                .map_err(unavailable)?;
            replace_codes(&tx, &consumer_id, &recovery)?;
            drop_pending_number(&tx, &consumer_id, Some(drop_pending_below), None)?;
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn delete_pending_totp(&self, consumer_id: String) -> Result<(), StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            conn.execute(
                "DELETE FROM totp_pending WHERE consumer_id = ?1",
                params![consumer_id],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn delete_totp(
        &self,
        consumer_id: String,
        drop_recovery: bool,
    ) -> Result<(), StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute(
                "DELETE FROM totp WHERE consumer_id = ?1",
                params![consumer_id],
            )
            .map_err(unavailable)?;
            tx.execute(
                "DELETE FROM totp_pending WHERE consumer_id = ?1",
                params![consumer_id],
            )
            .map_err(unavailable)?;
            if drop_recovery {
                tx.execute(
                    "DELETE FROM recovery_codes WHERE consumer_id = ?1",
                    params![consumer_id],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn put_pending_sms(
        &self,
        consumer_id: String,
        phone_sealed: Vec<u8>,
        at: u64,
        started_with: Assurance,
        code: SmsCodeRecord,
    ) -> Result<(), StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute(
                "INSERT INTO sms (consumer_id, phone, pending_phone, updated_at, pending_at, pending_with)
                 VALUES (?1, NULL, ?2, ?3, ?3, ?4)
                 ON CONFLICT (consumer_id) DO UPDATE
                 SET pending_phone = ?2, updated_at = ?3, pending_at = ?3, pending_with = ?4",
                params![consumer_id, phone_sealed, to_i64(at), started_with.to_db()],
            )
            .map_err(unavailable)?;
            put_code(&tx, &code)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn confirm_sms(
        &self,
        consumer_id: String,
        hash: Hash,
        now: u64,
        recovery: Option<Vec<Hash>>,
        drop_pending_below: Assurance,
    ) -> Result<CodeCheck, StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let check = check_code(&tx, &consumer_id, Purpose::Enrol, &hash, now)?;
            if check == CodeCheck::Accepted {
                let changed = tx
                    .execute(
                        "UPDATE sms SET phone = pending_phone, pending_phone = NULL, pending_at = NULL,
                                        pending_with = 0, updated_at = ?2
                         WHERE consumer_id = ?1 AND pending_phone IS NOT NULL",
                        params![consumer_id, to_i64(now)],
                    )
                    .map_err(unavailable)?;
                if changed == 0 {
                    // A code without a pending number: nothing to confirm (the code stays used).
                    tx.commit().map_err(unavailable)?;
                    return Ok(CodeCheck::Missing);
                }
                // Login codes texted to the old number must not outlive it.
                delete_code(&tx, &consumer_id, Purpose::Login, None)?;
                if let Some(recovery) = &recovery {
                    replace_codes(&tx, &consumer_id, recovery)?;
                }
                tx.execute(
                    "DELETE FROM totp_pending WHERE consumer_id = ?1 AND started_with < ?2",
                    params![consumer_id, drop_pending_below.to_db()],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(check)
        })
        .await
    }

    async fn drop_pending_sms(
        &self,
        consumer_id: String,
        code: Option<Hash>,
    ) -> Result<bool, StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let dropped = drop_pending_number(&tx, &consumer_id, None, code.as_ref())?;
            tx.commit().map_err(unavailable)?;
            Ok(dropped)
        })
        .await
    }

    async fn delete_sms(&self, consumer_id: String, drop_recovery: bool) -> Result<(), StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute(
                "DELETE FROM sms WHERE consumer_id = ?1",
                params![consumer_id],
            )
            .map_err(unavailable)?;
            tx.execute(
                "DELETE FROM sms_codes WHERE consumer_id = ?1",
                params![consumer_id],
            )
            .map_err(unavailable)?;
            if drop_recovery {
                tx.execute(
                    "DELETE FROM recovery_codes WHERE consumer_id = ?1",
                    params![consumer_id],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn put_sms_code(&self, code: SmsCodeRecord) -> Result<(), StoreError> {
        self.with(move |conn| put_code(conn, &code)).await
    }

    async fn use_sms_code(
        &self,
        consumer_id: String,
        purpose: Purpose,
        hash: Hash,
        now: u64,
    ) -> Result<CodeCheck, StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let check = check_code(&tx, &consumer_id, purpose, &hash, now)?;
            tx.commit().map_err(unavailable)?;
            Ok(check)
        })
        .await
    }

    async fn delete_sms_code(
        &self,
        consumer_id: String,
        purpose: Purpose,
        hash: Hash,
    ) -> Result<(), StoreError> {
        self.with(move |conn| {
            // By hash too: the text of this code may have timed out after a newer send that
            // was delivered (the provider's timeout can exceed the send interval).
            delete_code(conn, &consumer_id, purpose, Some(&hash)).map(|_| ())
        })
        .await
    }

    async fn replace_recovery_codes(
        &self,
        consumer_id: String,
        hashes: Vec<Hash>,
    ) -> Result<(), StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            replace_codes(&tx, &consumer_id, &hashes)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn advance_totp_step(&self, consumer_id: String, step: u64) -> Result<bool, StoreError> {
        self.with(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE totp SET last_step = ?2
                     WHERE consumer_id = ?1 AND confirmed = 1 AND (last_step IS NULL OR last_step < ?2)",
                    params![consumer_id, to_i64(step)],
                )
                .map_err(unavailable)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn use_recovery_code(
        &self,
        consumer_id: String,
        hash: Hash,
        at: u64,
    ) -> Result<bool, StoreError> {
        self.write(consumer_id.clone(), move |conn| {
            let changed = conn
                .execute(
                    "UPDATE recovery_codes SET used_at = ?3 WHERE consumer_id = ?1 AND hash = ?2 AND used_at IS NULL",
                    params![consumer_id, hash.as_slice(), to_i64(at)],
                )
                .map_err(unavailable)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn restore_consumer(&self, state: ConsumerState) -> Result<(), StoreError> {
        self.write(state.record.id.clone(), move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let c = &state.record;
            let owner: Option<String> = tx
                .query_row(
                    "SELECT id FROM consumers WHERE name = ?1",
                    params![c.name],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            if owner.is_some_and(|owner| owner != c.id) {
                return Err(StoreError::Conflict(format!("consumer `{}`", c.name)));
            }
            let roles = serde_json::to_string(&c.roles).map_err(unavailable)?;
            // An update, not a replace: a replace would delete the row and cascade.
            tx.execute(
                "INSERT INTO consumers (id, name, roles, disabled, created_at, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1)
                 ON CONFLICT (id) DO UPDATE SET name = ?2, roles = ?3, disabled = ?4, created_at = ?5",
                params![c.id, c.name, roles, c.disabled, to_i64(c.created_at)],
            )
            .map_err(unavailable)?;
            for table in ["api_keys", "totp", "totp_pending", "recovery_codes", "sms", "sms_codes"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE consumer_id = ?1"),
                    params![c.id],
                )
                .map_err(unavailable)?;
            }
            for key in &state.keys {
                insert_key(&tx, key)?;
            }
            for totp in &state.totp {
                if totp.confirmed {
                    tx.execute(
                        "INSERT INTO totp (consumer_id, secret, algorithm, digits, period, confirmed, last_step, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7)",
                        params![
                            c.id,
                            totp.secret_sealed,
                            totp.params.algorithm.as_str(),
                            totp.params.digits,
                            to_i64(totp.params.period),
                            totp.last_step.map(to_i64),
                            to_i64(totp.created_at),
                        ],
                    )
                } else {
                    tx.execute(
                        "INSERT INTO totp_pending (consumer_id, secret, algorithm, digits, period, created_at, started_with)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![
                            c.id,
                            totp.secret_sealed,
                            totp.params.algorithm.as_str(),
                            totp.params.digits,
                            to_i64(totp.params.period),
                            to_i64(totp.created_at),
                            totp.started_with.to_db(),
                        ],
                    )
                }
                .map_err(unavailable)?;
            }
            for code in &state.recovery_codes {
                tx.execute(
                    "INSERT INTO recovery_codes (consumer_id, hash, used_at) VALUES (?1, ?2, ?3)",
                    params![c.id, code.hash.as_slice(), code.used_at.map(to_i64)],
                )
                .map_err(unavailable)?;
            }
            if let Some(sms) = &state.sms {
                tx.execute(
                    "INSERT INTO sms (consumer_id, phone, pending_phone, updated_at, pending_at, pending_with)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        c.id,
                        sms.phone_sealed,
                        sms.pending_sealed,
                        to_i64(sms.updated_at),
                        sms.pending_at.map(to_i64),
                        sms.pending_with.to_db(),
                    ],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn rewrite_audit(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute("DELETE FROM audit", []).map_err(unavailable)?;
            insert_audit(&tx, &events)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.append_audit_batch(vec![event]).await
    }

    async fn append_audit_batch(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            insert_audit(&tx, &events)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn audit(
        &self,
        consumer: Option<ConsumerFilter>,
        since: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let (id, name) = match consumer {
            Some(ConsumerFilter::Id(id)) => (Some(id), None),
            Some(ConsumerFilter::Name(name)) => (None, Some(name)),
            None => (None, None),
        };
        self.with(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, at, kind, consumer_id, consumer_name, key_prefix, detail FROM audit
                     WHERE (?1 IS NULL OR consumer_id = ?1) AND (?2 IS NULL OR consumer_name = ?2)
                       AND at >= ?3
                     ORDER BY id DESC LIMIT ?4",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(
                    params![
                        id,
                        name,
                        to_i64(since.unwrap_or(0)),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    |row| {
                        let detail: String = row.get(6)?;
                        Ok(AuditEvent {
                            id: row.get(0)?,
                            at: to_u64(row.get(1)?),
                            kind: row.get(2)?,
                            consumer_id: row.get(3)?,
                            consumer_name: row.get(4)?,
                            key_prefix: row.get(5)?,
                            detail: serde_json::from_str(&detail)
                                .unwrap_or(serde_json::Value::Null),
                        })
                    },
                )
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    async fn get_meta(&self, key: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(move |conn| {
            conn.query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![key],
                |row| row.get(0),
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn put_meta(&self, key: &'static str, value: Vec<u8>) -> Result<(), StoreError> {
        self.with(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn load_limiter(&self, now: u64, now_ms: u64) -> Result<LimiterState, StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute("DELETE FROM bans WHERE until <= ?1", params![to_i64(now)])
                .map_err(unavailable)?;
            tx.execute(
                "DELETE FROM failure_counts WHERE tat_ms <= ?1",
                params![to_i64(now_ms)],
            )
            .map_err(unavailable)?;
            let mut state = LimiterState::default();
            {
                let mut bans = tx
                    .prepare("SELECT subject, started, until FROM bans ORDER BY subject")
                    .map_err(unavailable)?;
                let rows = bans
                    .query_map([], |row| {
                        Ok(BanRecord {
                            subject: row.get(0)?,
                            started: to_u64(row.get(1)?),
                            until: to_u64(row.get(2)?),
                        })
                    })
                    .map_err(unavailable)?;
                for row in rows {
                    state.bans.push(row.map_err(unavailable)?);
                }
                let mut counts = tx
                    .prepare(
                        "SELECT policy, subject, tat_ms FROM failure_counts ORDER BY policy, subject",
                    )
                    .map_err(unavailable)?;
                let rows = counts
                    .query_map([], |row| {
                        Ok(FailureCountRecord {
                            policy: row.get(0)?,
                            subject: row.get(1)?,
                            tat_ms: to_u64(row.get(2)?),
                        })
                    })
                    .map_err(unavailable)?;
                for row in rows {
                    state.counts.push(row.map_err(unavailable)?);
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(state)
        })
        .await
    }

    async fn save_limiter(&self, changes: Vec<LimiterChange>) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            for change in &changes {
                let done = match change {
                    LimiterChange::Ban(ban) => tx.execute(
                        "INSERT INTO bans (subject, started, until) VALUES (?1, ?2, ?3) \
                         ON CONFLICT(subject) DO UPDATE SET started = ?2, until = ?3",
                        params![ban.subject, to_i64(ban.started), to_i64(ban.until)],
                    ),
                    LimiterChange::Unban { subject, until } => tx.execute(
                        "DELETE FROM bans WHERE subject = ?1 AND until <= ?2",
                        params![subject, to_i64(*until)],
                    ),
                    LimiterChange::Count(count) => tx.execute(
                        "INSERT INTO failure_counts (policy, subject, tat_ms) VALUES (?1, ?2, ?3) \
                         ON CONFLICT(policy, subject) DO UPDATE SET tat_ms = ?3",
                        params![count.policy, count.subject, to_i64(count.tat_ms)],
                    ),
                    LimiterChange::Uncount { policy, subject } => tx.execute(
                        "DELETE FROM failure_counts WHERE policy = ?1 AND subject = ?2",
                        params![policy, subject],
                    ),
                    LimiterChange::Unlock { subject } => tx
                        .execute("DELETE FROM bans WHERE subject = ?1", params![subject])
                        .and_then(|_| {
                            tx.execute(
                                "DELETE FROM failure_counts WHERE subject = ?1",
                                params![subject],
                            )
                        }),
                };
                done.map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.with(move |conn| {
            // An open connection outlives its file being deleted: check the file is there,
            // and that a write transaction can start.
            if !path.exists() {
                return Err(unavailable("the database file is gone"));
            }
            conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
                .map_err(unavailable)
        })
        .await
    }
}

fn insert_key(conn: &Connection, key: &KeyRecord) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO api_keys (hash, consumer_id, prefix, created_at, last_used_at, revoked_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            key.hash.as_slice(),
            key.consumer_id,
            key.prefix,
            to_i64(key.created_at),
            key.last_used_at.map(to_i64),
            key.revoked_at.map(to_i64)
        ],
    )
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict("api key".into())
        } else {
            unavailable(e)
        }
    })?;
    Ok(())
}

fn insert_audit(conn: &Connection, events: &[AuditEvent]) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare(
            "INSERT INTO audit (at, kind, consumer_id, consumer_name, key_prefix, detail) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(unavailable)?;
    for event in events {
        stmt.execute(params![
            to_i64(event.at),
            event.kind,
            event.consumer_id,
            event.consumer_name,
            event.key_prefix,
            event.detail.to_string()
        ])
        .map_err(unavailable)?;
    }
    Ok(())
}

fn put_code(conn: &Connection, code: &SmsCodeRecord) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO sms_codes (consumer_id, purpose, hash, expires_at) VALUES (?1, ?2, ?3, ?4)",
        params![
            code.consumer_id,
            code.purpose.as_str(),
            code.hash.as_slice(),
            to_i64(code.expires_at)
        ],
    )
    .map_err(unavailable)?;
    Ok(())
}

/// Deletes the consumer's outstanding code for `purpose` (only while it is `hash`, when given);
/// the number of rows deleted.
fn delete_code(
    conn: &Connection,
    consumer_id: &str,
    purpose: Purpose,
    hash: Option<&Hash>,
) -> Result<usize, StoreError> {
    match hash {
        None => conn.execute(
            "DELETE FROM sms_codes WHERE consumer_id = ?1 AND purpose = ?2",
            params![consumer_id, purpose.as_str()],
        ),
        Some(hash) => conn.execute(
            "DELETE FROM sms_codes WHERE consumer_id = ?1 AND purpose = ?2 AND hash = ?3",
            params![consumer_id, purpose.as_str(), hash.as_slice()],
        ),
    }
    .map_err(unavailable)
}

/// Checks a presented code inside the caller's transaction. The row is found by consumer and
/// purpose, never by the hash, so the comparison itself is the constant-time one below. An
/// accepted or expired code is deleted: a code works once, and never after its expiry.
fn check_code(
    conn: &Connection,
    consumer_id: &str,
    purpose: Purpose,
    hash: &Hash,
    now: u64,
) -> Result<CodeCheck, StoreError> {
    let row: Option<(Vec<u8>, i64)> = conn
        .query_row(
            "SELECT hash, expires_at FROM sms_codes WHERE consumer_id = ?1 AND purpose = ?2",
            params![consumer_id, purpose.as_str()],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(unavailable)?;
    let Some((stored, expires_at)) = row else {
        return Ok(CodeCheck::Missing);
    };
    let delete = || delete_code(conn, consumer_id, purpose, None);
    if now >= to_u64(expires_at) {
        delete()?;
        return Ok(CodeCheck::Expired);
    }
    if bool::from(stored.as_slice().ct_eq(hash.as_slice())) {
        delete()?;
        Ok(CodeCheck::Accepted)
    } else {
        Ok(CodeCheck::Wrong)
    }
}

/// Drops the consumer's pending number and its verification code inside the caller's
/// transaction: with `below`, only one entered on an account weaker than that; with `code`,
/// only while that verification code is the outstanding one. A row left with no number at all
/// goes. True when a pending number was dropped.
fn drop_pending_number(
    conn: &Connection,
    consumer_id: &str,
    below: Option<Assurance>,
    code: Option<&Hash>,
) -> Result<bool, StoreError> {
    if let Some(hash) = code
        && delete_code(conn, consumer_id, Purpose::Enrol, Some(hash))? == 0
    {
        // A newer enrolment replaced that code: it is not ours to undo.
        return Ok(false);
    }
    let below = below.map_or(i64::MAX, Assurance::to_db);
    let changed = conn
        .execute(
            "UPDATE sms SET pending_phone = NULL, pending_at = NULL, pending_with = 0
             WHERE consumer_id = ?1 AND pending_phone IS NOT NULL AND pending_with < ?2",
            params![consumer_id, below],
        )
        .map_err(unavailable)?;
    if changed == 0 {
        return Ok(false);
    }
    delete_code(conn, consumer_id, Purpose::Enrol, None)?;
    conn.execute(
        "DELETE FROM sms WHERE consumer_id = ?1 AND phone IS NULL",
        params![consumer_id],
    )
    .map_err(unavailable)?;
    Ok(true)
}

fn replace_codes(conn: &Connection, consumer_id: &str, hashes: &[Hash]) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM recovery_codes WHERE consumer_id = ?1",
        params![consumer_id],
    )
    .map_err(unavailable)?;
    let mut stmt = conn
        .prepare("INSERT INTO recovery_codes (consumer_id, hash, used_at) VALUES (?1, ?2, NULL)")
        .map_err(unavailable)?;
    for hash in hashes {
        stmt.execute(params![consumer_id, hash.as_slice()])
            .map_err(unavailable)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(store: &SqliteStore, id: &str) -> impl Future<Output = ()> {
        let record = ConsumerRecord {
            id: id.into(),
            name: id.into(),
            roles: vec![],
            disabled: false,
            created_at: 1,
            version: 1,
        };
        let key = KeyRecord {
            consumer_id: id.into(),
            hash: [id.len() as u8; 32],
            prefix: "sgk_00000000".into(),
            created_at: 1,
            last_used_at: None,
            revoked_at: None,
        };
        let store = store.clone();
        async move { store.insert_consumer(record, key).await.unwrap() }
    }

    /// A database of schema version 2 with a pending enrolment opens with it as pending (moved
    /// to `totp_pending`), and a confirmed one stays confirmed.
    #[tokio::test]
    async fn migration_3_moves_pending_enrolments_beside_the_confirmed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..2] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 2).unwrap();
            tx.execute_batch(
                "INSERT INTO consumers VALUES ('c1', 'dave', '[]', 0, 1), ('c2', 'carol', '[]', 0, 1);
                 INSERT INTO totp VALUES ('c1', x'0102', 'SHA1', 6, 30, 0, NULL, 5);
                 INSERT INTO totp VALUES ('c2', x'0304', 'SHA256', 8, 60, 1, 42, 6);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let state = store.load().await.unwrap();
        let dave = state.totp.iter().find(|t| t.consumer_id == "c1").unwrap();
        assert!(!dave.confirmed);
        assert_eq!(dave.secret_sealed, vec![1, 2]);
        let carol = state.totp.iter().find(|t| t.consumer_id == "c2").unwrap();
        assert!(carol.confirmed);
        assert_eq!(carol.last_step, Some(42));
        assert_eq!(state.totp.len(), 2);
        // dave's pending enrolment confirms like any.
        assert!(
            store
                .confirm_totp("c1".into(), 7, vec![[9; 32]], Assurance::Totp)
                .await
                .unwrap()
        );
        assert!(
            !store
                .confirm_totp("c1".into(), 8, vec![], Assurance::Totp)
                .await
                .unwrap(),
            "once"
        );
    }

    /// Re-review finding 3: a database of schema version 3 opens with its pending enrolments
    /// at the weakest level (fail closed: beside dave's confirmed TOTP neither can be
    /// confirmed any more), a pending number entered when its row was last updated, and no
    /// entry time for a number that is not pending.
    #[tokio::test]
    async fn migration_4_puts_pending_enrolments_at_the_weakest_level() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..3] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 3).unwrap();
            tx.execute_batch(
                "INSERT INTO consumers VALUES ('c1', 'dave', '[]', 0, 1), ('c2', 'carol', '[]', 0, 1);
                 INSERT INTO totp VALUES ('c1', x'0102', 'SHA1', 6, 30, 1, 42, 5);
                 INSERT INTO totp_pending VALUES ('c1', x'0304', 'SHA256', 8, 60, 6);
                 INSERT INTO sms VALUES ('c1', NULL, x'0506', 7);
                 INSERT INTO sms VALUES ('c2', x'0708', NULL, 8);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert!(version >= 4, "{version}");
        let state = store.load().await.unwrap();
        let confirmed = state.totp.iter().find(|t| t.confirmed).unwrap();
        assert_eq!(
            (confirmed.consumer_id.as_str(), confirmed.last_step),
            ("c1", Some(42))
        );
        let pending = state.totp.iter().find(|t| !t.confirmed).unwrap();
        assert_eq!(pending.consumer_id, "c1");
        assert_eq!(pending.secret_sealed, vec![3, 4]);
        assert_eq!(pending.created_at, 6);
        assert_eq!(pending.started_with, Assurance::KeyOnly);
        assert_eq!(state.totp.len(), 2);

        let number = |id: &str| state.sms.iter().find(|s| s.consumer_id == id).unwrap();
        let dave = number("c1");
        assert_eq!(dave.pending_sealed, Some(vec![5, 6]));
        assert_eq!(dave.pending_at, Some(dave.updated_at));
        assert_eq!(dave.pending_at, Some(7));
        assert_eq!(dave.pending_with, Assurance::KeyOnly);
        let carol = number("c2");
        assert_eq!(carol.phone_sealed, Some(vec![7, 8]));
        assert_eq!(carol.pending_at, None);
        // Weaker than dave's account: the confirm-time check refuses both.
        let account = Assurance::of_account(true, false);
        assert!(pending.started_with < account && dave.pending_with < account);
    }

    #[tokio::test]
    async fn sms_codes_are_single_use_expire_and_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        consumer(&store, "c1").await;
        let code = |hash: u8, expires_at: u64| SmsCodeRecord {
            consumer_id: "c1".into(),
            purpose: Purpose::Login,
            hash: [hash; 32],
            expires_at,
        };
        let check = |hash: u8, purpose: Purpose, now: u64| {
            let store = store.clone();
            async move {
                store
                    .use_sms_code("c1".into(), purpose, [hash; 32], now)
                    .await
                    .unwrap()
            }
        };
        store.put_sms_code(code(1, 100)).await.unwrap();
        assert_eq!(check(2, Purpose::Login, 10).await, CodeCheck::Wrong);
        assert_eq!(check(1, Purpose::Enrol, 10).await, CodeCheck::Missing);
        assert_eq!(check(1, Purpose::Login, 10).await, CodeCheck::Accepted);
        assert_eq!(check(1, Purpose::Login, 10).await, CodeCheck::Missing);
        // A newer code replaces the outstanding one.
        store.put_sms_code(code(3, 100)).await.unwrap();
        store.put_sms_code(code(4, 100)).await.unwrap();
        assert_eq!(check(3, Purpose::Login, 10).await, CodeCheck::Wrong);
        assert_eq!(check(4, Purpose::Login, 99).await, CodeCheck::Accepted);
        // Expired at its expiry time, and then gone.
        store.put_sms_code(code(5, 100)).await.unwrap();
        assert_eq!(check(5, Purpose::Login, 100).await, CodeCheck::Expired);
        assert_eq!(check(5, Purpose::Login, 50).await, CodeCheck::Missing);
    }

    #[tokio::test]
    async fn an_sms_number_is_confirmed_only_with_its_code() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        consumer(&store, "c1").await;
        let enrol = SmsCodeRecord {
            consumer_id: "c1".into(),
            purpose: Purpose::Enrol,
            hash: [7; 32],
            expires_at: 100,
        };
        store
            .put_pending_sms("c1".into(), vec![1, 1], 10, Assurance::KeyOnly, enrol)
            .await
            .unwrap();
        let wrong = store
            .confirm_sms(
                "c1".into(),
                [8; 32],
                20,
                Some(vec![[1; 32]]),
                Assurance::Sms,
            )
            .await
            .unwrap();
        assert_eq!(wrong, CodeCheck::Wrong);
        let state = store.load().await.unwrap();
        assert_eq!(state.sms[0].phone_sealed, None);
        assert!(state.recovery_codes.is_empty());
        let right = store
            .confirm_sms(
                "c1".into(),
                [7; 32],
                20,
                Some(vec![[1; 32]]),
                Assurance::Sms,
            )
            .await
            .unwrap();
        assert_eq!(right, CodeCheck::Accepted);
        let state = store.load().await.unwrap();
        assert_eq!(state.sms[0].phone_sealed, Some(vec![1, 1]));
        assert_eq!(state.sms[0].pending_sealed, None);
        assert_eq!(state.recovery_codes.len(), 1);
        store.delete_sms("c1".into(), true).await.unwrap();
        let state = store.load().await.unwrap();
        assert!(state.sms.is_empty() && state.recovery_codes.is_empty());
    }

    fn code(purpose: Purpose, hash: u8) -> SmsCodeRecord {
        SmsCodeRecord {
            consumer_id: "c1".into(),
            purpose,
            hash: [hash; 32],
            expires_at: 100,
        }
    }

    fn pending_totp(started_with: Assurance) -> TotpRecord {
        TotpRecord {
            consumer_id: "c1".into(),
            secret_sealed: vec![1],
            params: TotpParams::default(),
            confirmed: false,
            last_step: None,
            created_at: 1,
            started_with,
        }
    }

    /// Review I5: a withdrawn code is deleted by its hash, so withdrawing one whose text timed
    /// out leaves a newer code that replaced it.
    #[tokio::test]
    async fn withdrawing_a_code_deletes_only_that_code() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        consumer(&store, "c1").await;
        store.put_sms_code(code(Purpose::Login, 1)).await.unwrap();
        store.put_sms_code(code(Purpose::Login, 2)).await.unwrap();
        store
            .delete_sms_code("c1".into(), Purpose::Login, [1; 32])
            .await
            .unwrap();
        let check = store
            .use_sms_code("c1".into(), Purpose::Login, [2; 32], 10)
            .await
            .unwrap();
        assert_eq!(check, CodeCheck::Accepted);
        store.put_sms_code(code(Purpose::Login, 3)).await.unwrap();
        store
            .delete_sms_code("c1".into(), Purpose::Login, [3; 32])
            .await
            .unwrap();
        let check = store
            .use_sms_code("c1".into(), Purpose::Login, [3; 32], 10)
            .await
            .unwrap();
        assert_eq!(check, CodeCheck::Missing);
    }

    /// Review I2 and C1: confirming a number deletes the login codes texted to the old one and
    /// the pending TOTP enrolment started below the new level, in its transaction; a pending
    /// one started at that level stays.
    #[tokio::test]
    async fn confirming_a_number_drops_old_login_codes_and_weaker_pending_enrolments() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        consumer(&store, "c1").await;
        for (started_with, stays) in [(Assurance::KeyOnly, false), (Assurance::Sms, true)] {
            store
                .put_pending_totp(pending_totp(started_with))
                .await
                .unwrap();
            store.put_sms_code(code(Purpose::Login, 5)).await.unwrap();
            store
                .put_pending_sms(
                    "c1".into(),
                    vec![2],
                    10,
                    Assurance::Sms,
                    code(Purpose::Enrol, 7),
                )
                .await
                .unwrap();
            let check = store
                .confirm_sms("c1".into(), [7; 32], 20, None, Assurance::Sms)
                .await
                .unwrap();
            assert_eq!(check, CodeCheck::Accepted);
            let old_login = store
                .use_sms_code("c1".into(), Purpose::Login, [5; 32], 20)
                .await
                .unwrap();
            assert_eq!(old_login, CodeCheck::Missing, "the old number's login code");
            let state = store.load().await.unwrap();
            assert_eq!(
                state.totp.iter().any(|t| !t.confirmed),
                stays,
                "{started_with:?}"
            );
        }
    }

    /// Review C1: confirming TOTP drops a pending number entered below TOTP level (with its
    /// verification code) in the same transaction; a row left without any number goes.
    #[tokio::test]
    async fn confirming_totp_drops_a_weaker_pending_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        consumer(&store, "c1").await;
        store
            .put_pending_sms(
                "c1".into(),
                vec![2],
                10,
                Assurance::KeyOnly,
                code(Purpose::Enrol, 7),
            )
            .await
            .unwrap();
        store
            .put_pending_totp(pending_totp(Assurance::KeyOnly))
            .await
            .unwrap();
        assert!(
            store
                .confirm_totp("c1".into(), 3, vec![[1; 32]], Assurance::Totp)
                .await
                .unwrap()
        );
        let state = store.load().await.unwrap();
        assert!(state.sms.is_empty(), "{:?}", state.sms);
        let planted = store
            .use_sms_code("c1".into(), Purpose::Enrol, [7; 32], 20)
            .await
            .unwrap();
        assert_eq!(planted, CodeCheck::Missing);
    }

    /// Review minor 7: an enrolment whose text failed is undone only while its code is the
    /// outstanding one; a newer enrolment is not touched.
    #[tokio::test]
    async fn an_unsent_enrolment_is_undone_unless_a_newer_one_replaced_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        consumer(&store, "c1").await;
        let pending = |hash: u8| {
            let store = store.clone();
            async move {
                store
                    .put_pending_sms(
                        "c1".into(),
                        vec![hash],
                        10,
                        Assurance::KeyOnly,
                        code(Purpose::Enrol, hash),
                    )
                    .await
                    .unwrap();
            }
        };
        pending(1).await;
        pending(2).await;
        assert!(
            !store
                .drop_pending_sms("c1".into(), Some([1; 32]))
                .await
                .unwrap()
        );
        assert_eq!(
            store.load().await.unwrap().sms[0].pending_sealed,
            Some(vec![2])
        );
        assert!(
            store
                .drop_pending_sms("c1".into(), Some([2; 32]))
                .await
                .unwrap()
        );
        assert!(store.load().await.unwrap().sms.is_empty());
    }
}
