//! Consumers and their credentials: the in-memory index the request path reads (consumers by
//! API-key hash, behind an `ArcSwap`, so a lookup takes no lock and touches no disk) and the
//! operations the admin API performs, each written through to the store and then published as
//! a new index.
//!
//! SMS enrolment, login codes and removal are in [`sms`]; the proof rule of self-service
//! changes (what code a change needs, which pending enrolments may still be confirmed) is in
//! [`assurance`].

mod sms;

pub use crate::credentials::assurance::Assurance;
pub use crate::credentials::factors::Factor;
pub use sms::Outgoing;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use http::HeaderValue;
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;

use crate::audit::{AuditLog, AuditView};
use crate::auth::step_up::StepUpTokens;
use crate::clock::{SharedClock, rfc3339};
use crate::credentials::factors::Factors;
use crate::credentials::totp::{self, TotpParams};
use crate::credentials::{api_key, recovery};
use crate::secrets::{DigestMap, MasterKey};
use crate::store::{
    AuditEvent, CodeCheck, ConsumerFilter, ConsumerRecord, Hash, KeyRecord, RecoveryCodeRecord,
    SmsRecord, State, Store, StoreError, TotpRecord,
};

/// How long a pending enrolment (a TOTP secret, an SMS number) can be confirmed after it was
/// started: long enough to set up an app, short enough that an abandoned one is not picked up
/// later by whoever else saw the key.
pub const PENDING_TTL_SECS: u64 = 15 * 60;

const MASTER_CHECK_META: &str = "master_key_check";
const MASTER_CHECK_PLAINTEXT: &[u8] = b"stepgate master key check v1";

/// A consumer as the request path sees it. Immutable: a change publishes a new one.
#[derive(Debug)]
pub struct Consumer {
    pub id: String,
    /// The id again, shared (step-up tokens, limiter keys) without allocating per request.
    pub shared_id: Arc<str>,
    pub name: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub created_at: u64,
    /// The store's version of this state.
    pub version: u64,
    pub keys: Vec<KeyRecord>,
    /// The confirmed TOTP enrolment.
    pub totp: Option<TotpRecord>,
    /// A TOTP enrolment awaiting its first code; beside a confirmed one during a re-enrolment.
    pub totp_pending: Option<TotpRecord>,
    pub recovery_codes: Vec<RecoveryCodeRecord>,
    /// The SMS factor, when a number is confirmed or pending.
    pub sms: Option<SmsState>,
    /// Identity header values, computed once so the request path only clones them.
    pub headers: IdentityHeaders,
}

/// A consumer's numbers, sealed as stored, with their masked forms for display (computed once
/// when loaded, so views never decrypt).
#[derive(Debug, Clone)]
pub struct SmsState {
    pub record: SmsRecord,
    pub phone_masked: Option<String>,
    pub pending_masked: Option<String>,
}

impl SmsState {
    pub fn confirmed(&self) -> bool {
        self.record.phone_sealed.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub id: HeaderValue,
    pub name: HeaderValue,
    pub roles: HeaderValue,
}

impl Consumer {
    fn new(record: ConsumerRecord, keys: Vec<KeyRecord>, factors: FactorParts) -> Self {
        // Names and roles are validated to header-safe characters on the way in.
        let header = |s: &str| {
            HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        };
        let headers = IdentityHeaders {
            id: header(&record.id),
            name: header(&record.name),
            roles: header(&record.roles.join(",")),
        };
        Self {
            shared_id: Arc::from(record.id.as_str()),
            id: record.id,
            name: record.name,
            roles: record.roles,
            disabled: record.disabled,
            created_at: record.created_at,
            version: record.version,
            keys,
            totp: factors.totp,
            totp_pending: factors.totp_pending,
            recovery_codes: factors.recovery_codes,
            sms: factors.sms,
            headers,
        }
    }

    fn record(&self) -> ConsumerRecord {
        ConsumerRecord {
            id: self.id.clone(),
            name: self.name.clone(),
            roles: self.roles.clone(),
            disabled: self.disabled,
            created_at: self.created_at,
            version: self.version,
        }
    }

    fn with(&self, change: impl FnOnce(&mut ConsumerParts)) -> Consumer {
        let mut parts = ConsumerParts {
            record: self.record(),
            keys: self.keys.clone(),
            factors: FactorParts {
                totp: self.totp.clone(),
                totp_pending: self.totp_pending.clone(),
                recovery_codes: self.recovery_codes.clone(),
                sms: self.sms.clone(),
            },
        };
        change(&mut parts);
        Consumer::new(parts.record, parts.keys, parts.factors)
    }

    /// The confirmed TOTP enrolment, if any.
    pub fn confirmed_totp(&self) -> Option<&TotpRecord> {
        self.totp.as_ref().filter(|t| t.confirmed)
    }

    /// Is a phone number confirmed for SMS codes?
    pub fn confirmed_sms(&self) -> bool {
        self.sms.as_ref().is_some_and(SmsState::confirmed)
    }

    /// Does the consumer hold a confirmed second factor (TOTP or SMS)? Recovery codes back
    /// these up and are not one on their own.
    pub fn has_confirmed_factor(&self) -> bool {
        self.confirmed_totp().is_some() || self.confirmed_sms()
    }

    /// Is the consumer enrolled for a policy accepting `factors`: does it hold a confirmed
    /// factor the policy accepts? Recovery codes back up the factor they came with, so they
    /// count only beside one the policy would take itself: beside TOTP always (a policy that
    /// takes recovery codes and not TOTP is no weaker than TOTP), beside SMS only where the
    /// policy accepts SMS. Otherwise recovery codes made by an SMS enrolment would get an
    /// SMS-only consumer through a policy that chose to exclude SMS.
    pub fn enrolled_for(&self, factors: Factors) -> bool {
        let totp = self.confirmed_totp().is_some();
        let sms = self.confirmed_sms() && factors.sms;
        (factors.totp && totp) || sms || (factors.recovery_code && totp)
    }

    /// The pending TOTP enrolment that can still be confirmed at `now` (see
    /// [`Consumer::pending_end`]). Others are dropped at their confirmation attempt, and are
    /// shown as absent meanwhile.
    pub fn live_totp_pending(&self, now: u64) -> Option<&TotpRecord> {
        self.totp_pending.as_ref().filter(|p| {
            self.pending_end(p.created_at, p.started_with, now)
                .is_none()
        })
    }

    /// The SMS counterpart of [`Consumer::live_totp_pending`]: a number awaiting its code.
    pub fn live_sms_pending(&self, now: u64) -> Option<&SmsState> {
        self.sms.as_ref().filter(|s| {
            let r = &s.record;
            r.pending_sealed.is_some()
                && self
                    .pending_end(r.pending_at.unwrap_or(r.updated_at), r.pending_with, now)
                    .is_none()
        })
    }

    /// Why an enrolment pending since `started_at`, started at level `started_with`, can no
    /// longer be confirmed at `now`: older than [`PENDING_TTL_SECS`], or started on an account
    /// weaker than this one is now. `None`: it can.
    fn pending_end(
        &self,
        started_at: u64,
        started_with: Assurance,
        now: u64,
    ) -> Option<PendingEnd> {
        if now >= started_at.saturating_add(PENDING_TTL_SECS) {
            Some(PendingEnd::Expired)
        } else if started_with < self.assurance() {
            Some(PendingEnd::Outranked)
        } else {
            None
        }
    }

    /// The account's level: what a self-service change to its factors must be proved with.
    pub fn assurance(&self) -> Assurance {
        Assurance::of_account(self.confirmed_totp().is_some(), self.confirmed_sms())
    }

    /// Confirmed factors by name: `totp`, `sms`, `recovery_code`.
    pub fn confirmed_factors(&self) -> Vec<&'static str> {
        let mut factors = Vec::with_capacity(3);
        if self.confirmed_totp().is_some() {
            factors.push("totp");
        }
        if self.confirmed_sms() {
            factors.push("sms");
        }
        if !factors.is_empty() {
            factors.push("recovery_code");
        }
        factors
    }

    /// Unused recovery codes.
    pub fn recovery_codes_remaining(&self) -> usize {
        self.recovery_codes
            .iter()
            .filter(|r| r.used_at.is_none())
            .count()
    }
}

/// Why a pending enrolment can no longer be confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingEnd {
    Expired,
    /// Started before a stronger factor was confirmed (normally dropped at that confirmation;
    /// this holds for enrolments pending from before that rule, too).
    Outranked,
}

impl PendingEnd {
    /// The `reason` of its `enrolment_dropped` audit event.
    fn reason(self) -> &'static str {
        match self {
            PendingEnd::Expired => "expired",
            PendingEnd::Outranked => "started_before_a_factor",
        }
    }
}

struct ConsumerParts {
    record: ConsumerRecord,
    keys: Vec<KeyRecord>,
    factors: FactorParts,
}

#[derive(Default)]
struct FactorParts {
    totp: Option<TotpRecord>,
    totp_pending: Option<TotpRecord>,
    recovery_codes: Vec<RecoveryCodeRecord>,
    sms: Option<SmsState>,
}

/// A live API key in the index.
#[derive(Debug)]
pub struct KeyEntry {
    pub consumer: Arc<Consumer>,
    pub prefix: String,
    /// Who a failed attempt with this key is counted against (shared strings, made once).
    pub attempt: crate::error::Attempt,
    hash: Hash,
    /// Last use (Unix seconds), flushed to the store in batches, off the request path.
    last_used: AtomicU64,
    flushed: AtomicU64,
}

#[derive(Default, Clone)]
struct Index {
    by_hash: DigestMap<Arc<KeyEntry>>,
    by_name: HashMap<String, Arc<Consumer>>,
}

impl Index {
    fn put(&mut self, consumer: Consumer) {
        let consumer = Arc::new(consumer);
        if let Some(old) = self.by_name.remove(&consumer.name) {
            for key in &old.keys {
                self.by_hash.remove(&key.hash);
            }
        }
        for key in consumer.keys.iter().filter(|k| k.revoked_at.is_none()) {
            let used = key.last_used_at.unwrap_or(0);
            self.by_hash.insert(
                key.hash,
                Arc::new(KeyEntry {
                    consumer: consumer.clone(),
                    prefix: key.prefix.clone(),
                    attempt: crate::error::Attempt {
                        consumer_id: consumer.shared_id.clone(),
                        consumer_name: Arc::from(consumer.name.as_str()),
                        key_prefix: Arc::from(key.prefix.as_str()),
                    },
                    hash: key.hash,
                    last_used: AtomicU64::new(used),
                    flushed: AtomicU64::new(used),
                }),
            );
        }
        self.by_name.insert(consumer.name.clone(), consumer);
    }

    /// The admin view, with "last used" from the live index (the store lags by up to 30 s).
    fn view(&self, consumer: &Consumer, now: u64) -> ConsumerView {
        let mut view = ConsumerView::of(consumer, now);
        for (key, shown) in consumer.keys.iter().zip(view.keys.iter_mut()) {
            if let Some(entry) = self.by_hash.get(&key.hash) {
                let used = entry.last_used.load(Ordering::Relaxed);
                if used > key.last_used_at.unwrap_or(0) {
                    shown.last_used_at = Some(rfc3339(used));
                }
            }
        }
        view
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = self.by_name.remove(name) {
            for key in &old.keys {
                self.by_hash.remove(&key.hash);
            }
        }
    }
}

/// Why a code was refused.
#[derive(Debug)]
pub enum CodeFailure {
    /// Wrong, expired, malformed, or a factor the policy does not accept.
    Invalid,
    /// A TOTP code for a time step at or before the last one accepted.
    Replayed,
    /// The store could not be asked: fail closed.
    Store(StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no consumer named `{0}`")]
    NotFound(String),
    #[error("{0}")]
    NotFoundOther(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// A wrong, expired or already used code where one was asked for.
    #[error("the code is not valid")]
    CodeInvalid,
    /// A change to a consumer with a confirmed factor, without a code strong enough for it
    /// (`assurance`): the account is at the level given.
    #[error("a code of an existing factor is needed")]
    Unproved(Assurance),
    /// The pending enrolment a confirmation was for is gone: expired, or started on a weaker
    /// account than the consumer's now (the text says which, for the consumer).
    #[error("{0}")]
    PendingGone(&'static str),
    /// A self-service change for a consumer disabled since its key was checked.
    #[error("the consumer is disabled")]
    Disabled,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the master key does not match the one this data was sealed with; \
         set STEPGATE_MASTER_KEY (or restore master.key) to the original key"
    )]
    WrongMasterKey,
}

/// The consumer registry.
pub struct Registry {
    store: Arc<dyn Store>,
    master: MasterKey,
    clock: SharedClock,
    audit: AuditLog,
    tokens: StepUpTokens,
    index: ArcSwap<Index>,
    /// Serialises admin writes so that each publishes an index built on the previous one.
    writes: Mutex<()>,
}

impl Registry {
    /// Checks the master key against the store and loads every consumer into memory.
    pub async fn open(
        store: Arc<dyn Store>,
        master: MasterKey,
        clock: SharedClock,
        audit_sink: Option<crate::audit::Sink>,
    ) -> Result<Self, RegistryError> {
        match store.get_meta(MASTER_CHECK_META).await? {
            Some(sealed) => {
                if master
                    .decrypt(&sealed, MASTER_CHECK_META.as_bytes())
                    .as_deref()
                    != Some(MASTER_CHECK_PLAINTEXT)
                {
                    return Err(RegistryError::WrongMasterKey);
                }
            }
            None => {
                let sealed = master.encrypt(MASTER_CHECK_PLAINTEXT, MASTER_CHECK_META.as_bytes());
                store.put_meta(MASTER_CHECK_META, sealed).await?;
            }
        }
        let state = store.load().await?;
        Ok(Self {
            index: ArcSwap::from_pointee(build_index(state, &master)),
            audit: AuditLog::start(store.clone(), audit_sink),
            tokens: StepUpTokens::new(),
            store,
            master,
            clock,
            writes: Mutex::new(()),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The live key entry for a presented API key. No lock, no I/O: the request path.
    /// Unknown, revoked and disabled all answer `None`, indistinguishably.
    pub fn authenticate(&self, presented: &str) -> Option<Arc<KeyEntry>> {
        if !api_key::has_shape(presented) {
            return None;
        }
        let hash = self.master.hash_api_key(presented);
        let index = self.index.load();
        let entry = index.by_hash.get(&hash)?;
        // The map lookup already matched; this keeps the final comparison constant-time.
        if !bool::from(entry.hash.ct_eq(&hash)) || entry.consumer.disabled {
            return None;
        }
        entry.last_used.store(self.clock.now(), Ordering::Relaxed);
        Some(entry.clone())
    }

    /// Writes key uses recorded since the last flush; called periodically.
    pub async fn flush_key_use(&self) -> Result<usize, StoreError> {
        let index = self.index.load_full();
        let uses: Vec<(Hash, u64)> = index
            .by_hash
            .values()
            .filter_map(|e| {
                let used = e.last_used.load(Ordering::Relaxed);
                (used > e.flushed.swap(used, Ordering::Relaxed)).then_some((e.hash, used))
            })
            .collect();
        let n = uses.len();
        if n > 0 {
            self.store.record_key_use(uses).await?;
        }
        Ok(n)
    }

    pub fn consumer_count(&self) -> usize {
        self.index.load().by_name.len()
    }

    fn get(&self, name: &str) -> Result<Arc<Consumer>, RegistryError> {
        self.index
            .load()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))
    }

    /// The current state of `consumer` for a change it makes itself (self-service), under the
    /// write lock: by name and the same id (a deleted and re-created namesake is someone
    /// else), and not disabled since its key was checked.
    fn own(&self, consumer: &Consumer) -> Result<Arc<Consumer>, RegistryError> {
        let current = self.get(&consumer.name)?;
        if current.id != consumer.id {
            return Err(RegistryError::NotFound(consumer.name.clone()));
        }
        if current.disabled {
            return Err(RegistryError::Disabled);
        }
        Ok(current)
    }

    /// The consumer a change is made to, as it is now: for the consumer's own change, itself,
    /// once the change is proved at its account's level (`registry::assurance`); for the admin
    /// API (`None`), the one named.
    fn to_change(
        &self,
        name: &str,
        by_consumer: Option<(&Consumer, Assurance)>,
    ) -> Result<Arc<Consumer>, RegistryError> {
        let Some((consumer, proof)) = by_consumer else {
            return self.get(name);
        };
        let current = self.own(consumer)?;
        let level = current.assurance();
        if proof < level {
            return Err(RegistryError::Unproved(level));
        }
        Ok(current)
    }

    fn publish(&self, change: impl FnOnce(&mut Index)) {
        let mut index = Index::clone(&self.index.load());
        change(&mut index);
        self.index.store(Arc::new(index));
    }

    /// Records a security event about a failed attempt's consumer.
    pub fn audit_attempt(&self, kind: &str, by: &crate::error::Attempt, detail: serde_json::Value) {
        self.audit.record(AuditEvent {
            id: 0,
            at: self.clock.now(),
            kind: kind.to_owned(),
            consumer_id: Some(by.consumer_id.to_string()),
            consumer_name: Some(by.consumer_name.to_string()),
            key_prefix: Some(by.key_prefix.to_string()),
            detail,
        });
    }

    /// Records a security event (log at once, store in the background).
    pub fn audit_event(
        &self,
        kind: &str,
        consumer: Option<&Consumer>,
        key_prefix: Option<&str>,
        detail: serde_json::Value,
    ) {
        self.audit.record(AuditEvent {
            id: 0,
            at: self.clock.now(),
            kind: kind.to_owned(),
            consumer_id: consumer.map(|c| c.id.clone()),
            consumer_name: consumer.map(|c| c.name.clone()),
            key_prefix: key_prefix.map(str::to_owned),
            detail,
        });
    }

    pub fn tokens(&self) -> &StepUpTokens {
        &self.tokens
    }

    /// Revokes a consumer's step-up tokens, with an audit event.
    fn revoke_tokens(&self, consumer: &Consumer, key_prefix: Option<&str>, reason: &str) {
        self.tokens.revoke_consumer(&consumer.id);
        self.audit_event(
            "step_up_revoked",
            Some(consumer),
            key_prefix,
            json!({"reason": reason}),
        );
    }

    /// Admin `DELETE /consumers/{name}/step-up-tokens`.
    pub fn revoke_step_up_tokens(&self, name: &str) -> Result<(), RegistryError> {
        let consumer = self.get(name)?;
        self.revoke_tokens(&consumer, None, "admin");
        Ok(())
    }

    /// Checks a code from `X-OTP` for `consumer` under `policy`'s accepted factors, at `now`.
    /// TOTP codes are accepted once: the store's watermark moves forward atomically, so of
    /// several concurrent requests with one code exactly one wins, on any node sharing it.
    /// SMS login codes and recovery codes are single use in the store the same way.
    pub async fn verify_code(
        &self,
        consumer: &Consumer,
        factors: Factors,
        code: &str,
        now: u64,
    ) -> Result<Factor, CodeFailure> {
        if let Some(record) = consumer.confirmed_totp()
            && factors.totp
            && totp::is_code_shape(code, record.params.digits)
        {
            let generator = self.totp_generator(consumer).ok_or(CodeFailure::Invalid)?;
            if let Some(step) = totp::verify(&generator, code, now) {
                return match self
                    .store
                    .advance_totp_step(consumer.id.clone(), step)
                    .await
                {
                    Ok(true) => Ok(Factor::Totp),
                    Ok(false) => Err(CodeFailure::Replayed),
                    Err(error) => Err(CodeFailure::Store(error)),
                };
            }
            // Not a current TOTP code; it may still be the consumer's SMS code (both are six
            // digits), so fall through.
        }
        if factors.sms && consumer.confirmed_sms() && crate::sms::is_code_shape(code) {
            let purpose = crate::sms::Purpose::Login;
            let hash = self
                .master
                .hash_sms_code(&consumer.id, purpose.as_str(), code);
            return match self
                .store
                .use_sms_code(consumer.id.clone(), purpose, hash, now)
                .await
            {
                Ok(CodeCheck::Accepted) => Ok(Factor::Sms),
                Ok(_) => Err(CodeFailure::Invalid),
                Err(error) => Err(CodeFailure::Store(error)),
            };
        }
        if factors.recovery_code
            && let Some(normalized) = recovery::normalize(code)
        {
            let hash = self.master.hash_recovery_code(&normalized);
            return match self
                .store
                .use_recovery_code(consumer.id.clone(), hash, now)
                .await
            {
                Ok(true) => {
                    self.mark_recovery_code_used(&consumer.name, hash, now)
                        .await;
                    Ok(Factor::RecoveryCode)
                }
                Ok(false) => Err(CodeFailure::Invalid),
                Err(error) => Err(CodeFailure::Store(error)),
            };
        }
        Err(CodeFailure::Invalid)
    }

    async fn mark_recovery_code_used(&self, name: &str, hash: Hash, now: u64) {
        let _write = self.writes.lock().await;
        let Ok(old) = self.get(name) else { return };
        let updated = old.with(|p| {
            for code in p
                .factors
                .recovery_codes
                .iter_mut()
                .filter(|c| c.hash == hash)
            {
                code.used_at = Some(now);
            }
        });
        self.publish(|index| index.put(updated));
    }

    pub async fn create_consumer(
        &self,
        name: &str,
        roles: Vec<String>,
    ) -> Result<(ConsumerView, String), RegistryError> {
        validate_name(name)?;
        let roles = validate_roles(roles)?;
        let _write = self.writes.lock().await;
        if self.index.load().by_name.contains_key(name) {
            return Err(RegistryError::Conflict(format!(
                "a consumer named `{name}` exists already"
            )));
        }
        let now = self.clock.now();
        let record = ConsumerRecord {
            id: format!("c_{}", uuid::Uuid::new_v4().simple()),
            name: name.to_owned(),
            roles,
            disabled: false,
            created_at: now,
            version: 1,
        };
        let (key, key_record) = self.new_key(&record.id, now);
        self.store
            .insert_consumer(record.clone(), key_record.clone())
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => {
                    RegistryError::Conflict(format!("a consumer named `{name}` exists already"))
                }
                other => other.into(),
            })?;
        let consumer = Consumer::new(record, vec![key_record.clone()], FactorParts::default());
        let view = ConsumerView::of(&consumer, now);
        self.audit_event(
            "consumer_created",
            Some(&consumer),
            Some(&key_record.prefix),
            json!({"roles": consumer.roles}),
        );
        self.publish(|index| index.put(consumer));
        Ok((view, key))
    }

    fn new_key(&self, consumer_id: &str, now: u64) -> (String, KeyRecord) {
        let key = api_key::generate();
        let record = KeyRecord {
            consumer_id: consumer_id.to_owned(),
            hash: self.master.hash_api_key(&key),
            prefix: api_key::display_prefix(&key).to_owned(),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
        };
        (key, record)
    }

    pub fn list_consumers(&self) -> Vec<ConsumerView> {
        let (index, now) = (self.index.load(), self.clock.now());
        let mut views: Vec<ConsumerView> =
            index.by_name.values().map(|c| index.view(c, now)).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    pub fn consumer(&self, name: &str) -> Result<ConsumerView, RegistryError> {
        let index = self.index.load();
        let consumer = index
            .by_name
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        Ok(index.view(consumer, self.clock.now()))
    }

    /// Every consumer as held in memory, in name order (for reports).
    pub fn consumer_states(&self) -> Vec<Arc<Consumer>> {
        let mut all: Vec<Arc<Consumer>> = self.index.load().by_name.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The in-memory consumer, for layers that need more than a view.
    pub fn consumer_state(&self, name: &str) -> Option<Arc<Consumer>> {
        self.index.load().by_name.get(name).cloned()
    }

    pub async fn update_consumer(
        &self,
        name: &str,
        roles: Option<Vec<String>>,
        disabled: Option<bool>,
    ) -> Result<ConsumerView, RegistryError> {
        let roles = roles.map(validate_roles).transpose()?;
        let _write = self.writes.lock().await;
        let old = self.get(name)?;
        let updated = old.with(|p| {
            if let Some(roles) = roles {
                p.record.roles = roles;
            }
            if let Some(disabled) = disabled {
                p.record.disabled = disabled;
            }
        });
        self.store.update_consumer(updated.record()).await?;
        let view = ConsumerView::of(&updated, self.clock.now());
        self.audit_event(
            "consumer_updated",
            Some(&updated),
            None,
            json!({"roles": updated.roles, "disabled": updated.disabled}),
        );
        let disabled_now = updated.disabled && !old.disabled;
        self.publish(|index| index.put(updated));
        if disabled_now {
            self.revoke_tokens(&old, None, "consumer_disabled");
        }
        Ok(view)
    }

    pub async fn delete_consumer(&self, name: &str) -> Result<(), RegistryError> {
        let _write = self.writes.lock().await;
        let old = self.get(name)?;
        self.store.delete_consumer(old.id.clone()).await?;
        self.publish(|index| index.remove(name));
        self.tokens.revoke_consumer(&old.id);
        self.audit_event("consumer_deleted", Some(&old), None, json!({}));
        Ok(())
    }

    pub async fn issue_key(&self, name: &str) -> Result<IssuedKey, RegistryError> {
        let _write = self.writes.lock().await;
        let old = self.get(name)?;
        let (key, record) = self.new_key(&old.id, self.clock.now());
        self.store.insert_key(record.clone()).await?;
        let updated = old.with(|p| p.keys.push(record.clone()));
        self.audit_event(
            "key_issued",
            Some(&updated),
            Some(&record.prefix),
            json!({}),
        );
        self.publish(|index| index.put(updated));
        Ok(IssuedKey {
            api_key: key,
            prefix: record.prefix,
        })
    }

    pub async fn revoke_key(&self, name: &str, prefix: &str) -> Result<(), RegistryError> {
        let _write = self.writes.lock().await;
        let old = self.get(name)?;
        let now = self.clock.now();
        if !self
            .store
            .revoke_key(old.id.clone(), prefix.to_owned(), now)
            .await?
        {
            return Err(RegistryError::NotFoundOther(format!(
                "`{name}` has no live key with prefix `{prefix}`"
            )));
        }
        let updated = old.with(|p| {
            for key in p
                .keys
                .iter_mut()
                .filter(|k| k.prefix == prefix && k.revoked_at.is_none())
            {
                key.revoked_at = Some(now);
            }
        });
        // Published before anything else, so the next request with that key fails.
        self.publish(|index| index.put(updated));
        self.audit_event("key_revoked", Some(&old), Some(prefix), json!({}));
        self.revoke_tokens(&old, Some(prefix), "key_revoked");
        Ok(())
    }

    /// Starts (or restarts) a TOTP enrolment; it stays pending until confirmed with a code.
    /// The admin API refuses it while a confirmed enrolment exists (reset it first).
    pub async fn begin_totp(
        &self,
        name: &str,
        params: TotpParams,
    ) -> Result<totp::Enrolment, RegistryError> {
        self.start_totp(name, None, params).await
    }

    /// A consumer's own (re-)enrolment: pending beside any confirmed enrolment, which keeps
    /// working until this one is confirmed, so an abandoned re-enrolment locks no one out.
    /// `proof`: how strongly the caller proved the change; refused if that is below the
    /// account's level by now (a factor confirmed since the key was checked).
    pub async fn begin_totp_reenrolment(
        &self,
        consumer: &Consumer,
        params: TotpParams,
        proof: Assurance,
    ) -> Result<totp::Enrolment, RegistryError> {
        self.start_totp(&consumer.name, Some((consumer, proof)), params)
            .await
    }

    /// `by_consumer`: the consumer's own call (it must still be that consumer, enabled) and
    /// how strongly it was proved; `None` for the admin API. The pending enrolment records the
    /// level it was started at: the account's for the consumer's own, the highest for an
    /// operator's (only whoever the operator gave the secret to can confirm it anyway).
    async fn start_totp(
        &self,
        name: &str,
        by_consumer: Option<(&Consumer, Assurance)>,
        params: TotpParams,
    ) -> Result<totp::Enrolment, RegistryError> {
        params.validate().map_err(RegistryError::Invalid)?;
        let _write = self.writes.lock().await;
        let old = self.to_change(name, by_consumer)?;
        let started_with = match by_consumer {
            Some(_) => old.assurance(),
            None => Assurance::Totp,
        };
        if by_consumer.is_none() && old.confirmed_totp().is_some() {
            return Err(RegistryError::Conflict(format!(
                "`{name}` has a confirmed TOTP enrolment; reset it first"
            )));
        }
        let secret = totp::new_secret();
        let enrolment =
            totp::enrolment(&secret, params, &old.name).map_err(RegistryError::Invalid)?;
        let record = TotpRecord {
            consumer_id: old.id.clone(),
            secret_sealed: self.master.encrypt(&secret, old.id.as_bytes()),
            params,
            confirmed: false,
            last_step: None,
            created_at: self.clock.now(),
            started_with,
        };
        self.store.put_pending_totp(record.clone()).await?;
        let updated = old.with(|p| p.factors.totp_pending = Some(record));
        // What the change was proved with: the account's level for the consumer's own (the
        // code itself is in the `otp_accepted` event before), or the admin API.
        let proved_with = match by_consumer {
            Some(_) => started_with.as_str(),
            None => "operator",
        };
        self.audit_event("totp_enrolment_started", Some(&updated), None, json!({
            "algorithm": params.algorithm.as_str(), "digits": params.digits, "period": params.period,
            "reenrolment": updated.totp.is_some(), "proved_with": proved_with,
        }));
        self.publish(|index| index.put(updated));
        Ok(enrolment)
    }

    /// The TOTP generator of a consumer's confirmed enrolment, or of its pending one when none
    /// is confirmed.
    pub fn totp_generator(&self, consumer: &Consumer) -> Option<totp_rs::Totp> {
        let record = consumer.totp.as_ref().or(consumer.totp_pending.as_ref())?;
        self.generator_of(consumer, record)
    }

    fn generator_of(&self, consumer: &Consumer, record: &TotpRecord) -> Option<totp_rs::Totp> {
        let secret = self
            .master
            .decrypt(&record.secret_sealed, consumer.id.as_bytes())?;
        totp::generator(&secret, record.params, &consumer.name).ok()
    }

    /// Confirms the pending enrolment with a current code of it; returns the new recovery
    /// codes (shown once; any old set stops working). A confirmed enrolment it replaces stops
    /// working, and so do the step-up tokens earned before. A pending SMS number entered on
    /// a weaker account than this makes is dropped in the same transaction. `by_consumer`:
    /// the consumer's own call (it must still be that consumer, enabled); `None` for the
    /// admin API. Either way, an enrolment older than [`PENDING_TTL_SECS`], or started on a
    /// weaker account than the consumer's now, is refused and dropped.
    pub async fn confirm_totp(&self, name: &str, code: &str) -> Result<Vec<String>, RegistryError> {
        self.confirm_pending_totp(name, None, code).await
    }

    /// The consumer's own confirmation (self-service): as [`confirm_totp`](Self::confirm_totp),
    /// for the consumer of that id only, and not once it is disabled.
    pub async fn confirm_own_totp(
        &self,
        consumer: &Consumer,
        code: &str,
    ) -> Result<Vec<String>, RegistryError> {
        self.confirm_pending_totp(&consumer.name, Some(consumer), code)
            .await
    }

    async fn confirm_pending_totp(
        &self,
        name: &str,
        by_consumer: Option<&Consumer>,
        code: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let _write = self.writes.lock().await;
        let old = match by_consumer {
            Some(consumer) => self.own(consumer)?,
            None => self.get(name)?,
        };
        let pending = old.totp_pending.as_ref().ok_or_else(|| {
            RegistryError::Conflict(format!("`{name}` has no pending TOTP enrolment"))
        })?;
        let now = self.clock.now();
        if let Some(end) = old.pending_end(pending.created_at, pending.started_with, now) {
            self.drop_pending_totp(&old, end).await?;
            return Err(RegistryError::PendingGone(match end {
                PendingEnd::Expired => "the TOTP enrolment expired (15 minutes); start it again",
                PendingEnd::Outranked => {
                    "this TOTP enrolment was started before another factor was confirmed; start \
                     it again, with a code of that factor"
                }
            }));
        }
        let generator = self.generator_of(&old, pending).ok_or_else(|| {
            RegistryError::Invalid("the enrolment cannot be decrypted with this master key".into())
        })?;
        let step = totp::verify(&generator, code, now).ok_or(RegistryError::CodeInvalid)?;
        let (codes, hashes) = self.new_recovery_codes();
        if !self
            .store
            .confirm_totp(old.id.clone(), step, hashes.clone(), Assurance::Totp)
            .await?
        {
            return Err(RegistryError::CodeInvalid);
        }
        let confirmed = TotpRecord {
            confirmed: true,
            last_step: Some(step),
            ..pending.clone()
        };
        let replaced = old.totp.is_some();
        let drops_sms = old.sms.as_ref().is_some_and(|s| {
            s.record.pending_sealed.is_some() && s.record.pending_with < Assurance::Totp
        });
        let updated = old.with(|p| {
            p.factors.totp = Some(confirmed);
            p.factors.totp_pending = None;
            p.factors.recovery_codes = unused_codes(&p.record.id, &hashes);
            if drops_sms {
                sms::forget_pending(&mut p.factors.sms);
            }
        });
        self.audit_event(
            "totp_enrolled",
            Some(&updated),
            None,
            json!({"replaced": replaced}),
        );
        if drops_sms {
            self.audit_dropped(&updated, "sms", PendingEnd::Outranked);
        }
        self.publish(|index| index.put(updated));
        // A replaced secret or recovery set: tokens earned before were earned with it.
        if old.has_confirmed_factor() {
            self.revoke_tokens(
                &old,
                None,
                if replaced {
                    "totp_replaced"
                } else {
                    "factor_added"
                },
            );
        }
        Ok(codes)
    }

    /// Drops the pending TOTP enrolment (the confirmed one stays), with an audit event.
    async fn drop_pending_totp(
        &self,
        old: &Consumer,
        end: PendingEnd,
    ) -> Result<(), RegistryError> {
        self.store.delete_pending_totp(old.id.clone()).await?;
        let updated = old.with(|p| p.factors.totp_pending = None);
        self.audit_dropped(&updated, "totp", end);
        self.publish(|index| index.put(updated));
        Ok(())
    }

    /// The `enrolment_dropped` audit event of a pending `factor` (`totp`, `sms`).
    fn audit_dropped(&self, consumer: &Consumer, factor: &str, end: PendingEnd) {
        self.audit_event(
            "enrolment_dropped",
            Some(consumer),
            None,
            json!({"factor": factor, "reason": end.reason()}),
        );
    }

    /// Removes the TOTP enrolment (confirmed and pending). Recovery codes go with it unless
    /// another confirmed factor (SMS) is left for them to back up.
    pub async fn reset_totp(&self, name: &str) -> Result<(), RegistryError> {
        let _write = self.writes.lock().await;
        let old = self.get(name)?;
        if old.totp.is_none() && old.totp_pending.is_none() {
            return Err(RegistryError::NotFoundOther(format!(
                "`{name}` has no TOTP enrolment"
            )));
        }
        let drop_recovery = !old.confirmed_sms();
        self.store
            .delete_totp(old.id.clone(), drop_recovery)
            .await?;
        let updated = old.with(|p| {
            p.factors.totp = None;
            p.factors.totp_pending = None;
            if drop_recovery {
                p.factors.recovery_codes.clear();
            }
        });
        self.audit_event("totp_reset", Some(&updated), None, json!({}));
        self.publish(|index| index.put(updated));
        self.revoke_tokens(&old, None, "totp_reset");
        Ok(())
    }

    /// A fresh set of recovery codes (shown once) and their peppered hashes (stored).
    fn new_recovery_codes(&self) -> (Vec<String>, Vec<Hash>) {
        let codes = recovery::generate();
        let hashes = codes
            .iter()
            .filter_map(|c| recovery::normalize(c))
            .map(|c| self.master.hash_recovery_code(&c))
            .collect();
        (codes, hashes)
    }

    /// A new set of recovery codes; the old set stops working, and so do the step-up tokens
    /// earned before (one may have been earned with a code of the set being replaced).
    pub async fn regenerate_recovery_codes(
        &self,
        name: &str,
    ) -> Result<Vec<String>, RegistryError> {
        self.replace_recovery_codes(name, None).await
    }

    /// The consumer's own regeneration (self-service), proved at `proof`: refused below the
    /// account's level, for another consumer of that name, or once disabled.
    pub async fn regenerate_own_recovery_codes(
        &self,
        consumer: &Consumer,
        proof: Assurance,
    ) -> Result<Vec<String>, RegistryError> {
        self.replace_recovery_codes(&consumer.name, Some((consumer, proof)))
            .await
    }

    async fn replace_recovery_codes(
        &self,
        name: &str,
        by_consumer: Option<(&Consumer, Assurance)>,
    ) -> Result<Vec<String>, RegistryError> {
        let _write = self.writes.lock().await;
        let old = self.to_change(name, by_consumer)?;
        if !old.has_confirmed_factor() {
            return Err(RegistryError::Conflict(format!(
                "`{name}` has no confirmed second factor; recovery codes come with one"
            )));
        }
        let (codes, hashes) = self.new_recovery_codes();
        self.store
            .replace_recovery_codes(old.id.clone(), hashes.clone())
            .await?;
        let updated = old.with(|p| {
            p.factors.recovery_codes = unused_codes(&p.record.id, &hashes);
        });
        self.audit_event(
            "recovery_codes_regenerated",
            Some(&updated),
            None,
            json!({}),
        );
        self.publish(|index| index.put(updated));
        self.revoke_tokens(&old, None, "recovery_codes_regenerated");
        Ok(codes)
    }

    /// Audit events, newest first; `consumer` by name (events of deleted consumers are found by
    /// the name they had).
    pub async fn audit(
        &self,
        consumer: Option<&str>,
        since: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditView>, RegistryError> {
        self.audit.flush().await;
        // A live consumer by its id; a deleted one by the name it had.
        let filter = consumer.map(|name| match self.index.load().by_name.get(name) {
            Some(c) => ConsumerFilter::Id(c.id.clone()),
            None => ConsumerFilter::Name(name.to_owned()),
        });
        Ok(self
            .store
            .audit(filter, since, limit)
            .await?
            .into_iter()
            .map(AuditView::of)
            .collect())
    }
}

fn unused_codes(consumer_id: &str, hashes: &[Hash]) -> Vec<RecoveryCodeRecord> {
    hashes
        .iter()
        .map(|hash| RecoveryCodeRecord {
            consumer_id: consumer_id.to_owned(),
            hash: *hash,
            used_at: None,
        })
        .collect()
}

fn build_index(state: State, master: &MasterKey) -> Index {
    let mut keys: HashMap<String, Vec<KeyRecord>> = HashMap::new();
    for key in state.keys {
        keys.entry(key.consumer_id.clone()).or_default().push(key);
    }
    let mut factors: HashMap<String, FactorParts> = HashMap::new();
    for t in state.totp {
        let parts = factors.entry(t.consumer_id.clone()).or_default();
        if t.confirmed {
            parts.totp = Some(t);
        } else {
            parts.totp_pending = Some(t);
        }
    }
    for code in state.recovery_codes {
        factors
            .entry(code.consumer_id.clone())
            .or_default()
            .recovery_codes
            .push(code);
    }
    for record in state.sms {
        let id = record.consumer_id.clone();
        factors.entry(id).or_default().sms = Some(sms::state_of(master, record));
    }
    let mut index = Index::default();
    for record in state.consumers {
        let id = record.id.clone();
        index.put(Consumer::new(
            record,
            keys.remove(&id).unwrap_or_default(),
            factors.remove(&id).unwrap_or_default(),
        ));
    }
    index
}

fn header_safe(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

fn validate_name(name: &str) -> Result<(), RegistryError> {
    // `.` and `..` would be dot segments in admin URLs.
    if header_safe(name, b"._@-") && name != "." && name != ".." {
        Ok(())
    } else {
        Err(RegistryError::Invalid(
            "name must be 1-64 characters of letters, digits, `.`, `_`, `@` or `-`".into(),
        ))
    }
}

fn validate_roles(mut roles: Vec<String>) -> Result<Vec<String>, RegistryError> {
    if roles.len() > 32 {
        return Err(RegistryError::Invalid("at most 32 roles".into()));
    }
    if let Some(bad) = roles.iter().find(|r| !header_safe(r, b"._:-")) {
        return Err(RegistryError::Invalid(format!(
            "role `{bad}` must be 1-64 characters of letters, digits, `.`, `_`, `:` or `-`"
        )));
    }
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// A consumer as the admin API shows it. No secret, no hash, no phone number in full.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerView {
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub created_at: String,
    /// Confirmed second factors: `totp`, `sms`, `recovery_code`.
    pub factors: Vec<&'static str>,
    pub totp: Option<TotpView>,
    pub sms: Option<SmsView>,
    pub recovery_codes_remaining: usize,
    pub keys: Vec<KeyView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TotpView {
    /// `confirmed` or `pending`.
    pub status: &'static str,
    pub algorithm: &'static str,
    pub digits: u8,
    pub period: u64,
    /// A re-enrolment awaits confirmation; the confirmed enrolment works meanwhile.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reenrolment_pending: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmsView {
    /// `confirmed` or `pending`.
    pub status: &'static str,
    /// Masked (`+44•••••••123`): the confirmed number, else the pending one.
    pub phone: Option<String>,
    /// Masked; a new number awaiting its code while the confirmed one works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_phone: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    pub prefix: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl TotpView {
    /// The TOTP enrolment as shown at `now` (a pending one only while it can be confirmed).
    pub fn of(c: &Consumer, now: u64) -> Option<Self> {
        let pending = c.live_totp_pending(now);
        let (status, record) = match (&c.totp, pending) {
            (Some(confirmed), _) => ("confirmed", confirmed),
            (None, Some(pending)) => ("pending", pending),
            (None, None) => return None,
        };
        Some(Self {
            status,
            algorithm: record.params.algorithm.as_str(),
            digits: record.params.digits,
            period: record.params.period,
            reenrolment_pending: c.totp.is_some() && pending.is_some(),
        })
    }
}

impl SmsView {
    /// The SMS enrolment as shown at `now` (a pending number only while it can be confirmed).
    pub fn of(c: &Consumer, now: u64) -> Option<Self> {
        let sms = c.sms.as_ref()?;
        let pending = c.live_sms_pending(now).is_some();
        if sms.confirmed() {
            Some(Self {
                status: "confirmed",
                phone: sms.phone_masked.clone(),
                pending_phone: sms.pending_masked.clone().filter(|_| pending),
            })
        } else if pending {
            Some(Self {
                status: "pending",
                phone: sms.pending_masked.clone(),
                pending_phone: None,
            })
        } else {
            None
        }
    }
}

impl ConsumerView {
    pub fn of(c: &Consumer, now: u64) -> Self {
        Self {
            id: c.id.clone(),
            name: c.name.clone(),
            roles: c.roles.clone(),
            disabled: c.disabled,
            created_at: rfc3339(c.created_at),
            factors: c.confirmed_factors(),
            totp: TotpView::of(c, now),
            sms: SmsView::of(c, now),
            recovery_codes_remaining: c.recovery_codes_remaining(),
            keys: c
                .keys
                .iter()
                .map(|k| KeyView {
                    prefix: k.prefix.clone(),
                    created_at: rfc3339(k.created_at),
                    last_used_at: k.last_used_at.map(rfc3339),
                    revoked_at: k.revoked_at.map(rfc3339),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IssuedKey {
    pub api_key: String,
    pub prefix: String,
}
