//! Persistence behind one narrow interface. The request path never calls the store for a
//! known API key: `registry` keeps everything a request needs in memory and writes through
//! here. SQLite (`sqlite`) is the embedded default; a shared store for several nodes
//! implements the same trait.

pub mod sqlite;

use async_trait::async_trait;

use crate::credentials::totp::TotpParams;

pub type Hash = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub consumer_id: String,
    /// HMAC-SHA256 of the key under the API-key pepper.
    pub hash: Hash,
    /// `sgk_` and the first 8 hex digits, for display and revocation.
    pub prefix: String,
    pub created_at: u64,
    pub last_used_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotpRecord {
    pub consumer_id: String,
    /// AES-256-GCM sealed secret, bound to the consumer id.
    pub secret_sealed: Vec<u8>,
    pub params: TotpParams,
    pub confirmed: bool,
    /// The last accepted time step: only a later one is ever accepted again.
    pub last_step: Option<u64>,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryCodeRecord {
    pub consumer_id: String,
    pub hash: Hash,
    pub used_at: Option<u64>,
}

/// A security event. `detail` is a JSON object and never holds a secret.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// Assigned by the store; 0 for a new event.
    pub id: i64,
    pub at: u64,
    pub kind: String,
    pub consumer_id: Option<String>,
    pub consumer_name: Option<String>,
    pub key_prefix: Option<String>,
    pub detail: serde_json::Value,
}

/// Whose audit events to read: by id, or by the name a (possibly deleted) consumer had.
#[derive(Debug, Clone)]
pub enum ConsumerFilter {
    Id(String),
    Name(String),
}

/// Everything needed to build the in-memory index at start.
#[derive(Debug, Default)]
pub struct State {
    pub consumers: Vec<ConsumerRecord>,
    pub keys: Vec<KeyRecord>,
    pub totp: Vec<TotpRecord>,
    pub recovery_codes: Vec<RecoveryCodeRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn load(&self) -> Result<State, StoreError>;
    /// A consumer and its first key, atomically. `Conflict` when the name is taken.
    async fn insert_consumer(
        &self,
        consumer: ConsumerRecord,
        key: KeyRecord,
    ) -> Result<(), StoreError>;
    async fn update_consumer(&self, consumer: ConsumerRecord) -> Result<(), StoreError>;
    /// Removes the consumer with its keys, TOTP and recovery codes (audit events stay).
    async fn delete_consumer(&self, id: String) -> Result<(), StoreError>;
    async fn insert_key(&self, key: KeyRecord) -> Result<(), StoreError>;
    async fn revoke_key(
        &self,
        consumer_id: String,
        prefix: String,
        at: u64,
    ) -> Result<bool, StoreError>;
    async fn record_key_use(&self, uses: Vec<(Hash, u64)>) -> Result<(), StoreError>;
    /// Replaces any enrolment (pending or confirmed) and drops its recovery codes.
    async fn put_totp(&self, totp: TotpRecord) -> Result<(), StoreError>;
    /// Confirms a pending enrolment at `step` and installs `recovery` codes, atomically.
    /// False when there is no pending enrolment or `step` is not after the watermark.
    async fn confirm_totp(
        &self,
        consumer_id: String,
        step: u64,
        recovery: Vec<Hash>,
    ) -> Result<bool, StoreError>;
    async fn delete_totp(&self, consumer_id: String) -> Result<(), StoreError>;
    async fn replace_recovery_codes(
        &self,
        consumer_id: String,
        hashes: Vec<Hash>,
    ) -> Result<(), StoreError>;
    /// Compare-and-set of the replay watermark: true (and stored) only if `step` is later
    /// than the stored step.
    async fn advance_totp_step(&self, consumer_id: String, step: u64) -> Result<bool, StoreError>;
    /// Marks an unused recovery code used; false when unknown or used already.
    async fn use_recovery_code(
        &self,
        consumer_id: String,
        hash: Hash,
        at: u64,
    ) -> Result<bool, StoreError>;
    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError>;
    /// Several events at once (one transaction where the store has them).
    async fn append_audit_batch(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        for event in events {
            self.append_audit(event).await?;
        }
        Ok(())
    }
    /// Newest first, optionally only one consumer's events.
    async fn audit(
        &self,
        consumer: Option<ConsumerFilter>,
        since: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    async fn get_meta(&self, key: &'static str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn put_meta(&self, key: &'static str, value: Vec<u8>) -> Result<(), StoreError>;
    /// Cheap reachability check for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
}
