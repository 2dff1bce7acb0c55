//! The durable store, behind one port ([`Store`]): consumers, keys, factors, single-use codes,
//! the failure limiter's bans and the audit log. The request path never calls it for a known
//! API key: the directory keeps what a request needs in memory, and learns of every change
//! from the store's [`ChangeFeed`] (each write bumps its consumer's version and announces
//! it), so a write on one node reaches the directory of every node sharing the store. SQLite
//! (`sqlite`) is the embedded default and feeds itself; Redis (`redis`) is shared by several
//! nodes, and its feed can go quiet: [`Freshness`] says whether what a node holds may be
//! trusted.

mod feed;
pub mod redis;
pub mod sqlite;

use std::sync::Arc;

pub use feed::{Change, ChangeFeed, Feed, FeedEvent, Follower, Freshness, Resync};

use async_trait::async_trait;

use crate::credentials::assurance::Assurance;
use crate::credentials::totp::TotpParams;

pub type Hash = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub created_at: u64,
    /// Raised by every change to the consumer or its keys and factors (not by a key's last
    /// use or a TOTP watermark); set by the store.
    pub version: u64,
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

/// A TOTP enrolment: the confirmed one, or one pending its first code. A consumer can have
/// both at once (a re-enrolment): the confirmed secret keeps working until the new one is
/// confirmed, so an abandoned re-enrolment never locks anyone out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotpRecord {
    pub consumer_id: String,
    /// AES-256-GCM sealed secret, bound to the consumer id.
    pub secret_sealed: Vec<u8>,
    pub params: TotpParams,
    /// False for a pending enrolment.
    pub confirmed: bool,
    /// The last accepted time step: only a later one is ever accepted again.
    pub last_step: Option<u64>,
    pub created_at: u64,
    /// For a pending enrolment, the account's level when it was started: it is confirmed only
    /// while the account is not stronger than that (`credentials::assurance`). Kept, unused,
    /// once confirmed.
    pub started_with: Assurance,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryCodeRecord {
    pub consumer_id: String,
    pub hash: Hash,
    pub used_at: Option<u64>,
}

/// A consumer's SMS factor: the confirmed number and/or a new one awaiting its verification
/// code (the confirmed one keeps working meanwhile). Both AES-256-GCM sealed, bound to the
/// consumer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmsRecord {
    pub consumer_id: String,
    pub phone_sealed: Option<Vec<u8>>,
    pub pending_sealed: Option<Vec<u8>>,
    pub updated_at: u64,
    /// When the pending number was entered (it lives 15 minutes from then).
    pub pending_at: Option<u64>,
    /// The account's level when the pending number was entered, as for TOTP.
    pub pending_with: Assurance,
}

/// An outstanding SMS code: only its peppered HMAC, with an absolute expiry. One per consumer
/// and purpose: a new send replaces the outstanding one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmsCodeRecord {
    pub consumer_id: String,
    pub purpose: crate::credentials::factors::Purpose,
    pub hash: Hash,
    pub expires_at: u64,
}

/// The outcome of presenting an SMS code. A code is consumed by `Accepted` (single use) and
/// deleted when found `Expired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeCheck {
    Accepted,
    Wrong,
    Expired,
    /// No code outstanding (never sent, used, replaced, or removed with the factor).
    Missing,
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
    /// Confirmed and pending enrolments (told apart by `confirmed`).
    pub totp: Vec<TotpRecord>,
    pub recovery_codes: Vec<RecoveryCodeRecord>,
    pub sms: Vec<SmsRecord>,
}

/// A ban of the failure limiter: kept so that a restart does not lift it. `subject` is
/// `consumer:<id>` or `ip:<address>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanRecord {
    pub subject: String,
    pub started: u64,
    pub until: u64,
}

/// A failure counter of the limiter (one subject on one policy): the GCRA's theoretical
/// arrival time, in milliseconds since the Unix epoch. Once it is in the past the counter is
/// as if it had seen no failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureCountRecord {
    pub policy: String,
    pub subject: String,
    pub tat_ms: u64,
}

/// One change to the limiter's persisted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimiterChange {
    Ban(BanRecord),
    /// The ban ending at `until` is over: it goes, unless a later one replaced it.
    Unban {
        subject: String,
        until: u64,
    },
    Count(FailureCountRecord),
    /// A success (or a ban) started the count afresh.
    Uncount {
        policy: String,
        subject: String,
    },
    /// An operator's unlock: the ban and every count of the subject go.
    Unlock {
        subject: String,
    },
}

/// The limiter's persisted state, as loaded at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LimiterState {
    pub bans: Vec<BanRecord>,
    pub counts: Vec<FailureCountRecord>,
}

/// A consumer and everything of it the directory holds, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerState {
    pub record: ConsumerRecord,
    pub keys: Vec<KeyRecord>,
    /// Confirmed and pending enrolments (told apart by `confirmed`).
    pub totp: Vec<TotpRecord>,
    pub recovery_codes: Vec<RecoveryCodeRecord>,
    pub sms: Option<SmsRecord>,
}

impl State {
    /// The state grouped by consumer.
    pub fn into_consumers(self) -> Vec<ConsumerState> {
        let mut by_id: std::collections::HashMap<String, ConsumerState> = self
            .consumers
            .into_iter()
            .map(|record| {
                (
                    record.id.clone(),
                    ConsumerState {
                        record,
                        keys: Vec::new(),
                        totp: Vec::new(),
                        recovery_codes: Vec::new(),
                        sms: None,
                    },
                )
            })
            .collect();
        for key in self.keys {
            if let Some(c) = by_id.get_mut(&key.consumer_id) {
                c.keys.push(key);
            }
        }
        for totp in self.totp {
            if let Some(c) = by_id.get_mut(&totp.consumer_id) {
                c.totp.push(totp);
            }
        }
        for code in self.recovery_codes {
            if let Some(c) = by_id.get_mut(&code.consumer_id) {
                c.recovery_codes.push(code);
            }
        }
        for sms in self.sms {
            if let Some(c) = by_id.get_mut(&sms.consumer_id) {
                c.sms = Some(sms);
            }
        }
        by_id.into_values().collect()
    }
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
    /// One consumer as it is now; `None` when there is none of that id.
    async fn load_consumer(&self, id: &str) -> Result<Option<ConsumerState>, StoreError>;
    /// The changes made from now on, by any node sharing the store.
    fn changes(&self) -> ChangeFeed;
    /// How recent this node's view of the store is (see [`Freshness`]).
    fn freshness(&self) -> Arc<Freshness>;
    /// A consumer and its first key, atomically. `Conflict` when the name is taken.
    async fn insert_consumer(
        &self,
        consumer: ConsumerRecord,
        key: KeyRecord,
    ) -> Result<(), StoreError>;
    async fn update_consumer(&self, consumer: ConsumerRecord) -> Result<(), StoreError>;
    /// Removes the consumer with its keys, TOTP, SMS state and recovery codes (audit events
    /// stay).
    async fn delete_consumer(&self, id: String) -> Result<(), StoreError>;
    async fn insert_key(&self, key: KeyRecord) -> Result<(), StoreError>;
    async fn revoke_key(
        &self,
        consumer_id: String,
        prefix: String,
        at: u64,
    ) -> Result<bool, StoreError>;
    async fn record_key_use(&self, uses: Vec<(Hash, u64)>) -> Result<(), StoreError>;
    /// Stores a pending enrolment, replacing an earlier pending one. A confirmed enrolment
    /// stays in force until this one is confirmed.
    async fn put_pending_totp(&self, totp: TotpRecord) -> Result<(), StoreError>;
    /// Makes the pending enrolment the confirmed one (replacing any confirmed one) with its
    /// replay watermark at `step`, installs `recovery` codes in place of any old set, and drops
    /// a pending SMS number (with its verification code) that was started below
    /// `drop_pending_below`, all atomically. False when there is no pending enrolment (e.g. a
    /// concurrent confirm won).
    async fn confirm_totp(
        &self,
        consumer_id: String,
        step: u64,
        recovery: Vec<Hash>,
        drop_pending_below: Assurance,
    ) -> Result<bool, StoreError>;
    /// Removes the pending enrolment only (the confirmed one stays): expired or refused.
    async fn delete_pending_totp(&self, consumer_id: String) -> Result<(), StoreError>;
    /// Removes the confirmed and any pending enrolment; with `drop_recovery` also the recovery
    /// codes (when no other factor is left for them to back up).
    async fn delete_totp(&self, consumer_id: String, drop_recovery: bool)
    -> Result<(), StoreError>;
    /// Stores a new number awaiting verification, entered at `at` on an account at level
    /// `started_with`, with its verification `code` (replacing an earlier pending number and
    /// code), atomically. A confirmed number stays in force.
    async fn put_pending_sms(
        &self,
        consumer_id: String,
        phone_sealed: Vec<u8>,
        at: u64,
        started_with: Assurance,
        code: SmsCodeRecord,
    ) -> Result<(), StoreError>;
    /// Checks the verification code like [`use_sms_code`](Self::use_sms_code); when accepted,
    /// in the same transaction: the pending number becomes the confirmed one, the login codes
    /// outstanding for the old number are deleted, `recovery` codes (if given) replace any old
    /// set, and a pending TOTP enrolment started below `drop_pending_below` is dropped.
    async fn confirm_sms(
        &self,
        consumer_id: String,
        hash: Hash,
        now: u64,
        recovery: Option<Vec<Hash>>,
        drop_pending_below: Assurance,
    ) -> Result<CodeCheck, StoreError>;
    /// Drops the pending number and its verification code, atomically: with `code`, only if
    /// that verification code is still the outstanding one (its text could not be sent, and a
    /// newer enrolment must not be undone); without, unconditionally (it expired). True when
    /// something was dropped.
    async fn drop_pending_sms(
        &self,
        consumer_id: String,
        code: Option<Hash>,
    ) -> Result<bool, StoreError>;
    /// Removes the consumer's numbers and outstanding codes; with `drop_recovery` also the
    /// recovery codes.
    async fn delete_sms(&self, consumer_id: String, drop_recovery: bool) -> Result<(), StoreError>;
    /// Stores an outstanding code, replacing the consumer's earlier one of that purpose.
    async fn put_sms_code(&self, code: SmsCodeRecord) -> Result<(), StoreError>;
    /// Presents a code: compared with the stored hash in constant time, accepted at most once
    /// and only before its expiry (an expired one is deleted).
    async fn use_sms_code(
        &self,
        consumer_id: String,
        purpose: crate::credentials::factors::Purpose,
        hash: Hash,
        now: u64,
    ) -> Result<CodeCheck, StoreError>;
    /// Withdraws an outstanding code whose text could not be sent, only if it is still the one
    /// with `hash` (a newer, delivered code must stay).
    async fn delete_sms_code(
        &self,
        consumer_id: String,
        purpose: crate::credentials::factors::Purpose,
        hash: Hash,
    ) -> Result<(), StoreError>;
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
    /// Writes `state` as the whole of its consumer, keeping its id, name and records as given
    /// (what the store held of that consumer is replaced; the version is the store's own,
    /// raised and announced as by any write). For copying data between stores: `Conflict`
    /// when another consumer has the name.
    async fn restore_consumer(&self, state: ConsumerState) -> Result<(), StoreError>;
    /// Replaces the whole audit log with `events`, oldest first, atomically. For copying data
    /// between stores, when copied events must go before ones the log holds.
    async fn rewrite_audit(&self, events: Vec<AuditEvent>) -> Result<(), StoreError>;
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
    /// The failure limiter's bans still in force at `now` (Unix seconds) and its counts not yet
    /// run out at `now_ms`; those over are deleted on the way.
    async fn load_limiter(&self, now: u64, now_ms: u64) -> Result<LimiterState, StoreError>;
    /// Applies limiter changes in order (atomically where the store can: a shared store does
    /// it subject by subject).
    async fn save_limiter(&self, changes: Vec<LimiterChange>) -> Result<(), StoreError>;
    /// Cheap reachability check for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
}
