//! The write operations on consumers: what the admin API and the self-service endpoints
//! change, and the check of a code presented on the request path (which writes too: a code is
//! spent). Each operation writes to the store, then refreshes the directory from it, so the
//! next request sees the change; other nodes sharing the store see it through its change
//! feed. Writes are serialised per node, so that a check and the write it allows cannot
//! interleave with another operation's.
//!
//! - this file: opening the accounts (the master key checked against the store), consumers
//!   and API keys, token revocation, reading the audit log;
//! - [`factors`]: TOTP enrolment and recovery codes;
//! - [`sms`]: the SMS factor's numbers and codes;
//! - [`verify`]: a code from `X-OTP`, checked and spent;
//! - [`copy`]: everything of one store copied into another (`stepgate store copy`).

pub mod copy;
mod factors;
mod sms;
mod verify;

pub use factors::TotpConfirmed;
pub use sms::Outgoing;
pub use verify::CodeFailure;

use std::sync::Arc;

use serde_json::json;
use tokio::sync::Mutex;

use crate::audit::{Audit, AuditView};
use crate::clock::SharedClock;
use crate::credentials::api_key;
use crate::credentials::assurance::Assurance;
use crate::directory::{Consumer, Directory};
use crate::secrets::MasterKey;
use crate::store::{ConsumerFilter, ConsumerRecord, KeyRecord, Store, StoreError};
use crate::tokens::TokenStore;
use crate::views::{ConsumerView, IssuedKey};

const MASTER_CHECK_META: &str = "master_key_check";
const MASTER_CHECK_PLAINTEXT: &[u8] = b"stepgate master key check v1";

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
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
    /// (`credentials::assurance`): the account is at the level given.
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

/// Whether `store`'s data was sealed with `master`: `None` while the store has no check
/// value (nothing was ever sealed in it).
pub async fn sealed_with(
    store: &dyn Store,
    master: &MasterKey,
) -> Result<Option<bool>, StoreError> {
    Ok(store.get_meta(MASTER_CHECK_META).await?.map(|sealed| {
        master
            .decrypt(&sealed, MASTER_CHECK_META.as_bytes())
            .as_deref()
            == Some(MASTER_CHECK_PLAINTEXT)
    }))
}

/// Seals the check value of `master` into a store that has none.
async fn seal_check(store: &dyn Store, master: &MasterKey) -> Result<(), StoreError> {
    let sealed = master.encrypt(MASTER_CHECK_PLAINTEXT, MASTER_CHECK_META.as_bytes());
    store.put_meta(MASTER_CHECK_META, sealed).await
}

/// The operations, and what they need.
pub struct Accounts {
    directory: Arc<Directory>,
    store: Arc<dyn Store>,
    master: Arc<MasterKey>,
    clock: SharedClock,
    audit: Audit,
    tokens: Arc<dyn TokenStore>,
    /// One operation at a time on this node.
    writes: Mutex<()>,
}

impl Accounts {
    /// Checks the master key against the store (seals a check value on first use) and loads
    /// the directory.
    pub async fn open(
        store: Arc<dyn Store>,
        master: Arc<MasterKey>,
        clock: SharedClock,
        audit: Audit,
        tokens: Arc<dyn TokenStore>,
    ) -> Result<Self, AccountError> {
        match sealed_with(store.as_ref(), &master).await? {
            Some(true) => {}
            Some(false) => return Err(AccountError::WrongMasterKey),
            None => seal_check(store.as_ref(), &master).await?,
        }
        let directory =
            Arc::new(Directory::load(store.clone(), master.clone(), clock.clone()).await?);
        Ok(Self {
            directory,
            store,
            master,
            clock,
            audit,
            tokens,
            writes: Mutex::new(()),
        })
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    pub fn audit_log(&self) -> &Audit {
        &self.audit
    }

    pub fn tokens(&self) -> &Arc<dyn TokenStore> {
        &self.tokens
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The consumer of that name, as it is now.
    fn consumer(&self, name: &str) -> Result<Arc<Consumer>, AccountError> {
        self.directory
            .get(name)
            .ok_or_else(|| AccountError::NotFound(name.to_owned()))
    }

    /// The consumer after a write: the store's state, now in the directory.
    async fn refreshed(&self, consumer: &Consumer) -> Result<Arc<Consumer>, AccountError> {
        self.directory.refresh(&consumer.id).await?;
        self.directory
            .get(&consumer.name)
            .filter(|c| c.id == consumer.id)
            .ok_or_else(|| AccountError::NotFound(consumer.name.clone()))
    }

    /// The current state of `consumer` for a change it makes itself (self-service), under the
    /// write lock: by name and the same id (a deleted and re-created namesake is someone
    /// else), and not disabled since its key was checked.
    fn own(&self, consumer: &Consumer) -> Result<Arc<Consumer>, AccountError> {
        let current = self.consumer(&consumer.name)?;
        if current.id != consumer.id {
            return Err(AccountError::NotFound(consumer.name.clone()));
        }
        if current.disabled {
            return Err(AccountError::Disabled);
        }
        Ok(current)
    }

    /// The consumer a change is made to, as it is now: for the consumer's own change, itself,
    /// once the change is proved at its account's level (`credentials::assurance`); for the
    /// admin API (`None`), the one named.
    fn to_change(
        &self,
        name: &str,
        by_consumer: Option<(&Consumer, Assurance)>,
    ) -> Result<Arc<Consumer>, AccountError> {
        let Some((consumer, proof)) = by_consumer else {
            return self.consumer(name);
        };
        let current = self.own(consumer)?;
        let level = current.assurance();
        if proof < level {
            return Err(AccountError::Unproved(level));
        }
        Ok(current)
    }

    /// Revokes a consumer's step-up tokens, with an audit event.
    async fn revoke_tokens(
        &self,
        consumer: &Consumer,
        key_prefix: Option<&str>,
        reason: &str,
    ) -> Result<(), AccountError> {
        self.tokens.revoke_consumer(&consumer.id).await?;
        self.audit.event(
            "step_up_revoked",
            Some(consumer.who()),
            key_prefix,
            json!({"reason": reason}),
        );
        Ok(())
    }

    /// Admin `DELETE /consumers/{name}/step-up-tokens`.
    pub async fn revoke_step_up_tokens(&self, name: &str) -> Result<(), AccountError> {
        let consumer = self.consumer(name)?;
        self.revoke_tokens(&consumer, None, "admin").await
    }

    pub async fn create_consumer(
        &self,
        name: &str,
        roles: Vec<String>,
    ) -> Result<(ConsumerView, String), AccountError> {
        validate_name(name)?;
        let roles = validate_roles(roles)?;
        let _write = self.writes.lock().await;
        if self.directory.get(name).is_some() {
            return Err(AccountError::Conflict(format!(
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
                    AccountError::Conflict(format!("a consumer named `{name}` exists already"))
                }
                other => other.into(),
            })?;
        self.directory.refresh(&record.id).await?;
        let consumer = self.consumer(name)?;
        self.audit.event(
            "consumer_created",
            Some(consumer.who()),
            Some(&key_record.prefix),
            json!({"roles": consumer.roles}),
        );
        Ok((ConsumerView::of(&consumer, &self.directory, now), key))
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
        let now = self.clock.now();
        self.directory
            .all()
            .iter()
            .map(|c| ConsumerView::of(c, &self.directory, now))
            .collect()
    }

    pub fn consumer_view(&self, name: &str) -> Result<ConsumerView, AccountError> {
        let consumer = self.consumer(name)?;
        Ok(ConsumerView::of(
            &consumer,
            &self.directory,
            self.clock.now(),
        ))
    }

    pub async fn update_consumer(
        &self,
        name: &str,
        roles: Option<Vec<String>>,
        disabled: Option<bool>,
    ) -> Result<ConsumerView, AccountError> {
        let roles = roles.map(validate_roles).transpose()?;
        let _write = self.writes.lock().await;
        let old = self.consumer(name)?;
        let mut record = old.record();
        if let Some(roles) = roles {
            record.roles = roles;
        }
        if let Some(disabled) = disabled {
            record.disabled = disabled;
        }
        self.store.update_consumer(record).await?;
        let updated = self.refreshed(&old).await?;
        self.audit.event(
            "consumer_updated",
            Some(updated.who()),
            None,
            json!({"roles": updated.roles, "disabled": updated.disabled}),
        );
        if updated.disabled && !old.disabled {
            self.revoke_tokens(&old, None, "consumer_disabled").await?;
        }
        Ok(ConsumerView::of(
            &updated,
            &self.directory,
            self.clock.now(),
        ))
    }

    pub async fn delete_consumer(&self, name: &str) -> Result<(), AccountError> {
        let _write = self.writes.lock().await;
        let old = self.consumer(name)?;
        self.store.delete_consumer(old.id.clone()).await?;
        self.directory.refresh(&old.id).await?;
        self.tokens.revoke_consumer(&old.id).await?;
        self.audit
            .event("consumer_deleted", Some(old.who()), None, json!({}));
        Ok(())
    }

    pub async fn issue_key(&self, name: &str) -> Result<IssuedKey, AccountError> {
        let _write = self.writes.lock().await;
        let old = self.consumer(name)?;
        let (key, record) = self.new_key(&old.id, self.clock.now());
        self.store.insert_key(record.clone()).await?;
        self.directory.refresh(&old.id).await?;
        self.audit.event(
            "key_issued",
            Some(old.who()),
            Some(&record.prefix),
            json!({}),
        );
        Ok(IssuedKey {
            api_key: key,
            prefix: record.prefix,
        })
    }

    pub async fn revoke_key(&self, name: &str, prefix: &str) -> Result<(), AccountError> {
        let _write = self.writes.lock().await;
        let old = self.consumer(name)?;
        let now = self.clock.now();
        if !self
            .store
            .revoke_key(old.id.clone(), prefix.to_owned(), now)
            .await?
        {
            return Err(AccountError::NotFoundOther(format!(
                "`{name}` has no live key with prefix `{prefix}`"
            )));
        }
        // Refreshed before anything else, so the next request with that key fails.
        self.directory.refresh(&old.id).await?;
        self.audit
            .event("key_revoked", Some(old.who()), Some(prefix), json!({}));
        self.revoke_tokens(&old, Some(prefix), "key_revoked").await
    }

    /// Audit events, newest first; `consumer` by name (events of deleted consumers are found by
    /// the name they had).
    pub async fn audit(
        &self,
        consumer: Option<&str>,
        since: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditView>, AccountError> {
        self.audit.flush().await;
        // A live consumer by its id; a deleted one by the name it had.
        let filter = consumer.map(|name| match self.directory.get(name) {
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

fn header_safe(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

fn validate_name(name: &str) -> Result<(), AccountError> {
    // `.` and `..` would be dot segments in admin URLs.
    if header_safe(name, b"._@-") && name != "." && name != ".." {
        Ok(())
    } else {
        Err(AccountError::Invalid(
            "name must be 1-64 characters of letters, digits, `.`, `_`, `@` or `-`".into(),
        ))
    }
}

fn validate_roles(mut roles: Vec<String>) -> Result<Vec<String>, AccountError> {
    if roles.len() > 32 {
        return Err(AccountError::Invalid("at most 32 roles".into()));
    }
    if let Some(bad) = roles.iter().find(|r| !header_safe(r, b"._:-")) {
        return Err(AccountError::Invalid(format!(
            "role `{bad}` must be 1-64 characters of letters, digits, `.`, `_`, `:` or `-`"
        )));
    }
    roles.sort();
    roles.dedup();
    Ok(roles)
}
