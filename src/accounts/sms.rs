//! The SMS factor's operations: numbers (sealed with the master key, bound to the consumer),
//! verification and login codes (only their peppered HMAC, in the store, so a restart neither
//! loses nor resurrects one), confirmation and removal. Texting is the caller's
//! (`selfservice`), which also applies the send limits.

use std::time::Duration;

use serde_json::json;

use super::{AccountError, Accounts};
use crate::credentials::assurance::Assurance;
use crate::directory::{Consumer, PendingEnd};
use crate::sms::{self, Phone, Purpose, open_phone, phone_context};
use crate::store::{CodeCheck, Hash, SmsCodeRecord};

/// A code to text: the code itself (never stored), the number, when it expires, and the hash
/// it is stored under (to withdraw exactly this code if its text fails).
pub struct Outgoing {
    pub code: String,
    pub phone: Phone,
    pub expires_at: u64,
    pub hash: Hash,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("phone", &self.phone)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Accounts {
    fn new_sms_code(
        &self,
        consumer_id: &str,
        purpose: Purpose,
        ttl: Duration,
    ) -> (String, SmsCodeRecord) {
        let code = sms::new_code();
        let record = SmsCodeRecord {
            consumer_id: consumer_id.to_owned(),
            purpose,
            hash: self
                .master
                .hash_sms_code(consumer_id, purpose.as_str(), &code),
            expires_at: self.clock.now().saturating_add(ttl.as_secs()),
        };
        (code, record)
    }

    /// Starts (or restarts) SMS enrolment: `phone` is stored pending, with a verification code
    /// valid for `ttl`, to be texted by the caller. A confirmed number keeps working until the
    /// new one is confirmed. `proof`: how strongly the caller proved the change (refused below
    /// the account's level by now); the pending number records that level.
    pub async fn begin_sms(
        &self,
        consumer: &Consumer,
        phone: Phone,
        ttl: Duration,
        proof: Assurance,
    ) -> Result<Outgoing, AccountError> {
        let _write = self.writes.lock().await;
        let old = self.to_change(&consumer.name, Some((consumer, proof)))?;
        let level = old.assurance();
        let now = self.clock.now();
        let sealed = self
            .master
            .encrypt(phone.expose().as_bytes(), &phone_context(&old.id));
        let (code, record) = self.new_sms_code(&old.id, Purpose::Enrol, ttl);
        let (expires_at, hash) = (record.expires_at, record.hash);
        self.store
            .put_pending_sms(old.id.clone(), sealed, now, level, record)
            .await?;
        let masked = phone.masked();
        let updated = self.refreshed(&old).await?;
        self.audit.event(
            "sms_enrolment_started",
            Some(updated.who()),
            None,
            json!({
                "phone": masked, "replaces_confirmed": updated.confirmed_sms(),
                "proved_with": level.as_str(),
            }),
        );
        Ok(Outgoing {
            code,
            phone,
            expires_at,
            hash,
        })
    }

    /// Confirms the pending number with its verification code. Returns recovery codes (shown
    /// once) when this is the consumer's first confirmed factor. A confirmed number it
    /// replaces stops receiving codes, its outstanding login codes die, and the step-up tokens
    /// earned before are revoked. A pending TOTP enrolment started on a weaker account than
    /// this makes is dropped in the same transaction. A number that can no longer be confirmed
    /// (`Consumer::pending_end`: pending too long, or entered on a weaker account than the
    /// consumer's now) is refused and dropped.
    pub async fn confirm_sms(
        &self,
        consumer: &Consumer,
        code: &str,
    ) -> Result<Option<Vec<String>>, AccountError> {
        let _write = self.writes.lock().await;
        let old = self.own(consumer)?;
        let Some(pending) = old
            .sms
            .as_ref()
            .map(|s| &s.record)
            .filter(|r| r.pending_sealed.is_some())
        else {
            return Err(AccountError::Conflict(
                "no phone number is waiting for confirmation; POST the number first".into(),
            ));
        };
        let now = self.clock.now();
        let entered = pending.pending_at.unwrap_or(pending.updated_at);
        if let Some(end) = old.pending_end(entered, pending.pending_with, now) {
            self.drop_pending_sms(&old, end).await?;
            return Err(AccountError::PendingGone(match end {
                PendingEnd::Expired => {
                    "the number waited too long for its code (15 minutes); enter it again"
                }
                PendingEnd::Outranked => {
                    "this number was entered before another factor was confirmed; enter it \
                     again, with a code of that factor"
                }
            }));
        }
        if !sms::is_code_shape(code) {
            return Err(AccountError::CodeInvalid);
        }
        let purpose = Purpose::Enrol;
        let hash = self.master.hash_sms_code(&old.id, purpose.as_str(), code);
        let first = !old.has_confirmed_factor();
        let (codes, hashes) = if first {
            let (codes, hashes) = self.new_recovery_codes();
            (Some(codes), Some(hashes))
        } else {
            (None, None)
        };
        // The level the account has once this number is confirmed.
        let level = Assurance::of_account(old.confirmed_totp().is_some(), true);
        match self
            .store
            .confirm_sms(old.id.clone(), hash, now, hashes.clone(), level)
            .await?
        {
            CodeCheck::Accepted => {}
            CodeCheck::Wrong | CodeCheck::Expired | CodeCheck::Missing => {
                return Err(AccountError::CodeInvalid);
            }
        }
        let replaced = old.confirmed_sms();
        let drops_totp = old
            .totp_pending
            .as_ref()
            .is_some_and(|t| t.started_with < level);
        let updated = self.refreshed(&old).await?;
        let masked = updated.sms.as_ref().and_then(|s| s.phone_masked.clone());
        self.audit.event(
            "sms_enrolled",
            Some(updated.who()),
            None,
            json!({"phone": masked, "replaced": replaced}),
        );
        if drops_totp {
            self.audit_dropped(&updated, "totp", PendingEnd::Outranked);
        }
        if replaced {
            self.revoke_tokens(&old, None, "sms_replaced").await?;
        }
        Ok(codes)
    }

    /// Drops the pending number (the confirmed one stays), with an audit event.
    async fn drop_pending_sms(&self, old: &Consumer, end: PendingEnd) -> Result<(), AccountError> {
        self.store.drop_pending_sms(old.id.clone(), None).await?;
        self.directory.refresh(&old.id).await?;
        self.audit_dropped(old, "sms", end);
        Ok(())
    }

    /// A login code for the consumer's confirmed number, valid for `ttl`; it replaces any
    /// outstanding login code. The caller texts it (after the send limits).
    pub async fn login_code(
        &self,
        consumer: &Consumer,
        ttl: Duration,
    ) -> Result<Outgoing, AccountError> {
        let _write = self.writes.lock().await;
        let current = self.own(consumer)?;
        let phone = current
            .sms
            .as_ref()
            .and_then(|s| s.record.phone_sealed.as_deref())
            .ok_or_else(|| {
                AccountError::NotFoundOther(format!(
                    "`{}` has no confirmed phone number",
                    current.name
                ))
            })
            .and_then(|sealed| {
                open_phone(&self.master, &current.id, sealed).ok_or_else(|| {
                    AccountError::Invalid(
                        "the phone number cannot be decrypted with this master key".into(),
                    )
                })
            })?;
        let (code, record) = self.new_sms_code(&current.id, Purpose::Login, ttl);
        let (expires_at, hash) = (record.expires_at, record.hash);
        self.store.put_sms_code(record).await?;
        Ok(Outgoing {
            code,
            phone,
            expires_at,
            hash,
        })
    }

    /// The confirmed number of `consumer` (decrypted), for the send limits and the text.
    pub fn confirmed_phone(&self, consumer: &Consumer) -> Option<Phone> {
        let sealed = consumer.sms.as_ref()?.record.phone_sealed.as_deref()?;
        open_phone(&self.master, &consumer.id, sealed)
    }

    /// The pending number of `consumer`, for texting its verification code.
    pub fn pending_phone(&self, consumer: &Consumer) -> Option<Phone> {
        let sealed = consumer.sms.as_ref()?.record.pending_sealed.as_deref()?;
        open_phone(&self.master, &consumer.id, sealed)
    }

    /// Withdraws the login code of `sent` whose text could not be sent: a code nobody received
    /// must not stay guessable. Only that code (by its hash): a newer one, sent meanwhile and
    /// delivered, stays. Best effort; a failure only leaves the code to expire.
    pub async fn withdraw_sms_code(&self, consumer: &Consumer, purpose: Purpose, sent: &Outgoing) {
        if let Err(error) = self
            .store
            .delete_sms_code(consumer.id.clone(), purpose, sent.hash)
            .await
        {
            tracing::warn!(%error, "could not withdraw an unsent SMS code; it expires on its own");
        }
    }

    /// Undoes an SMS enrolment whose verification text could not be sent: its code is withdrawn
    /// and the number no longer shows as pending, unless a newer enrolment replaced it
    /// meanwhile. Best effort, like [`withdraw_sms_code`](Self::withdraw_sms_code): a failure
    /// leaves a pending number whose code nobody received (its proof was spent before it was
    /// started), to expire on its own. Nothing relies on this undo to stay secure.
    pub async fn abandon_sms_enrolment(&self, consumer: &Consumer, sent: &Outgoing) {
        let _write = self.writes.lock().await;
        match self
            .store
            .drop_pending_sms(consumer.id.clone(), Some(sent.hash))
            .await
        {
            Ok(true) => {
                if let Err(error) = self.directory.refresh(&consumer.id).await {
                    tracing::warn!(%error, "could not refresh a consumer after undoing its enrolment");
                }
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "could not undo an unsent SMS enrolment; its code expires on its own");
            }
        }
    }

    /// Removes the consumer's SMS factor (numbers and outstanding codes) and revokes its
    /// step-up tokens. Recovery codes go too unless a confirmed TOTP is left. `by_consumer`:
    /// the self-service call, only if the consumer of that name is still this one and enabled,
    /// and proved at the account's level; `None` for the admin API.
    pub async fn remove_sms(
        &self,
        name: &str,
        by_consumer: Option<(&Consumer, Assurance)>,
    ) -> Result<(), AccountError> {
        let _write = self.writes.lock().await;
        let old = self.to_change(name, by_consumer)?;
        if old.sms.is_none() {
            return Err(AccountError::NotFoundOther(format!(
                "`{name}` has no SMS number"
            )));
        }
        let drop_recovery = old.confirmed_totp().is_none();
        self.store.delete_sms(old.id.clone(), drop_recovery).await?;
        self.directory.refresh(&old.id).await?;
        self.audit
            .event("sms_removed", Some(old.who()), None, json!({}));
        self.revoke_tokens(&old, None, "sms_removed").await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::accounts::{AccountError, Accounts};
    use crate::audit::{Audit, AuditLog};
    use crate::clock::ManualClock;
    use crate::credentials::assurance::Assurance;
    use crate::credentials::factors::Factors;
    use crate::credentials::totp::TotpParams;
    use crate::secrets::MasterKey;
    use crate::sms::{Phone, Purpose};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{CodeCheck, SmsCodeRecord, Store, TotpRecord};
    use crate::tokens::LocalTokens;

    const NOW: u64 = 1_800_000_000;
    const TTL: Duration = Duration::from_secs(300);

    async fn registry(dir: &tempfile::TempDir) -> (Accounts, Arc<ManualClock>) {
        let store = Arc::new(SqliteStore::open(&dir.path().join("r.db")).unwrap());
        let clock = Arc::new(ManualClock::new(NOW));
        (open(store, &clock).await, clock)
    }

    async fn open(store: Arc<dyn Store>, clock: &Arc<ManualClock>) -> Accounts {
        let audit = Audit::new(AuditLog::start(store.clone(), None), clock.clone());
        Accounts::open(
            store,
            Arc::new(MasterKey::from_bytes([7; 32])),
            clock.clone(),
            audit,
            Arc::new(LocalTokens::new()),
        )
        .await
        .unwrap()
    }

    /// The accounts a restart would open on the same store (what start-up loads).
    async fn reopen(registry: Accounts, clock: &Arc<ManualClock>) -> Accounts {
        let store = registry.store().clone();
        drop(registry);
        open(store, clock).await
    }

    /// alice with a confirmed TOTP enrolment (by the admin path).
    async fn with_totp(registry: &Accounts) {
        registry.create_consumer("alice", vec![]).await.unwrap();
        enrol_totp(registry).await;
    }

    async fn enrol_totp(registry: &Accounts) {
        registry
            .begin_totp("alice", TotpParams::default())
            .await
            .unwrap();
        let pending = registry.directory().get("alice").unwrap();
        let code = registry
            .totp_generator(&pending)
            .unwrap()
            .generate(registry.now())
            .to_string();
        registry.confirm_totp("alice", &code).await.unwrap();
    }

    /// A factor confirmed after the caller's key was checked (so the caller's view of the
    /// consumer has none, and no code was asked for) still needs its code: the operation checks
    /// again under its write lock, against the account's level by then.
    #[tokio::test]
    async fn a_factor_confirmed_meanwhile_still_needs_its_code() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, _) = registry(&dir).await;
        registry.create_consumer("alice", vec![]).await.unwrap();
        let stale = registry.directory().get("alice").unwrap();
        assert_eq!(stale.assurance(), Assurance::KeyOnly);
        enrol_totp(&registry).await;
        let now = registry.directory().get("alice").unwrap();
        assert_eq!(now.assurance(), Assurance::Totp);

        let phone = Phone::parse("+447700900123").unwrap();
        for weak in [Assurance::KeyOnly, Assurance::Sms] {
            assert!(matches!(
                registry
                    .begin_totp_reenrolment(&stale, TotpParams::default(), weak)
                    .await,
                Err(AccountError::Unproved(Assurance::Totp))
            ));
            assert!(matches!(
                registry.begin_sms(&stale, phone.clone(), TTL, weak).await,
                Err(AccountError::Unproved(Assurance::Totp))
            ));
            assert!(matches!(
                registry.regenerate_own_recovery_codes(&stale, weak).await,
                Err(AccountError::Unproved(Assurance::Totp))
            ));
        }
        // Proved at the account's level, both go ahead; the confirmed TOTP stays beside.
        registry
            .begin_sms(&stale, phone, TTL, Assurance::Totp)
            .await
            .unwrap();
        registry
            .begin_totp_reenrolment(&stale, TotpParams::default(), Assurance::Totp)
            .await
            .unwrap();
        let now = registry.directory().get("alice").unwrap();
        assert!(now.confirmed_totp().is_some() && now.totp_pending.is_some());
        assert!(matches!(
            registry
                .remove_sms("alice", Some((&stale, Assurance::Sms)))
                .await,
            Err(AccountError::Unproved(_))
        ));
        registry
            .remove_sms("alice", Some((&stale, Assurance::Totp)))
            .await
            .unwrap();
        assert!(registry.directory().get("alice").unwrap().sms.is_none());
    }

    /// Withdrawing a code whose text failed (a provider timeout can outlast the
    /// send interval) deletes that code only, not a newer one that was delivered meanwhile.
    #[tokio::test]
    async fn withdrawing_an_unsent_code_leaves_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, clock) = registry(&dir).await;
        registry.create_consumer("bob", vec![]).await.unwrap();
        let bob = registry.directory().get("bob").unwrap();
        let phone = Phone::parse("+447700900123").unwrap();
        let enrol = registry
            .begin_sms(&bob, phone, TTL, Assurance::KeyOnly)
            .await
            .unwrap();
        let bob = registry.directory().get("bob").unwrap();
        registry.confirm_sms(&bob, &enrol.code).await.unwrap();
        let bob = registry.directory().get("bob").unwrap();

        let slow = registry.login_code(&bob, TTL).await.unwrap();
        clock.advance(31);
        let newer = registry.login_code(&bob, TTL).await.unwrap();
        registry
            .withdraw_sms_code(&bob, Purpose::Login, &slow)
            .await;
        let factors = Factors {
            totp: false,
            recovery_code: false,
            sms: true,
        };
        let accepted = registry
            .verify_code(&bob, factors, &newer.code, registry.now())
            .await;
        assert!(
            accepted.is_ok(),
            "the newer code was withdrawn: {accepted:?}"
        );
    }

    /// Defence in depth: a pending enrolment started on a weaker account than the
    /// consumer's now, say one stored before the rule existed, is refused and dropped at
    /// confirmation, even with its own valid code.
    #[tokio::test]
    async fn a_pending_enrolment_started_on_a_weaker_account_is_not_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, clock) = registry(&dir).await;
        with_totp(&registry).await;
        let alice = registry.directory().get("alice").unwrap();
        // A pending secret as the old schema left it: started with the key alone.
        registry
            .begin_totp_reenrolment(&alice, TotpParams::default(), Assurance::Totp)
            .await
            .unwrap();
        let planted = TotpRecord {
            started_with: Assurance::KeyOnly,
            ..registry
                .directory()
                .get("alice")
                .unwrap()
                .totp_pending
                .clone()
                .unwrap()
        };
        registry.store().put_pending_totp(planted).await.unwrap();
        let registry = reopen(registry, &clock).await;
        let alice = registry.directory().get("alice").unwrap();
        clock.advance(30);
        let pending = alice.totp_pending.clone().unwrap();
        let code = registry
            .generator_of(&alice, &pending)
            .unwrap()
            .generate(registry.now())
            .to_string();
        assert!(matches!(
            registry.confirm_own_totp(&alice, &code).await,
            Err(AccountError::PendingGone(_))
        ));
        let alice = registry.directory().get("alice").unwrap();
        assert!(alice.totp_pending.is_none() && alice.confirmed_totp().is_some());
        assert!(registry.store().load().await.unwrap().totp.len() == 1);
    }

    /// The SMS twin of the test above: a pending number entered on a
    /// weaker account than the consumer's now (key only, beside a confirmed TOTP) is refused
    /// and dropped at confirmation, even with its own valid code.
    #[tokio::test]
    async fn a_pending_number_entered_on_a_weaker_account_is_not_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, clock) = registry(&dir).await;
        with_totp(&registry).await;
        let alice = registry.directory().get("alice").unwrap();
        let phone = Phone::parse("+447700900123").unwrap();
        let sent = registry
            .begin_sms(&alice, phone, TTL, Assurance::Totp)
            .await
            .unwrap();
        // The same number and code as the old schema left them: entered with the key alone.
        let alice = registry.directory().get("alice").unwrap();
        let record = alice.sms.as_ref().unwrap().record.clone();
        let code = SmsCodeRecord {
            consumer_id: alice.id.clone(),
            purpose: Purpose::Enrol,
            hash: sent.hash,
            expires_at: sent.expires_at,
        };
        registry
            .store()
            .put_pending_sms(
                alice.id.clone(),
                record.pending_sealed.unwrap(),
                registry.now(),
                Assurance::KeyOnly,
                code,
            )
            .await
            .unwrap();
        let registry = reopen(registry, &clock).await;
        let alice = registry.directory().get("alice").unwrap();
        assert_eq!(
            alice.sms.as_ref().unwrap().record.pending_with,
            Assurance::KeyOnly
        );
        clock.advance(30);
        assert!(matches!(
            registry.confirm_sms(&alice, &sent.code).await,
            Err(AccountError::PendingGone(_))
        ));
        let alice = registry.directory().get("alice").unwrap();
        assert!(alice.sms.is_none() && alice.confirmed_totp().is_some());
        assert!(registry.store().load().await.unwrap().sms.is_empty());
        // Its code went with it.
        let planted = registry
            .store()
            .use_sms_code(alice.id.clone(), Purpose::Enrol, sent.hash, registry.now())
            .await
            .unwrap();
        assert_eq!(planted, CodeCheck::Missing);
    }

    /// A consumer disabled after its key was checked changes nothing.
    #[tokio::test]
    async fn self_service_writes_refuse_a_consumer_disabled_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, _) = registry(&dir).await;
        with_totp(&registry).await;
        let stale = registry.directory().get("alice").unwrap();
        registry
            .update_consumer("alice", None, Some(true))
            .await
            .unwrap();
        let phone = Phone::parse("+447700900123").unwrap();
        let proof = Assurance::Totp;
        assert!(matches!(
            registry
                .begin_totp_reenrolment(&stale, TotpParams::default(), proof)
                .await,
            Err(AccountError::Disabled)
        ));
        assert!(matches!(
            registry.begin_sms(&stale, phone, TTL, proof).await,
            Err(AccountError::Disabled)
        ));
        assert!(matches!(
            registry.regenerate_own_recovery_codes(&stale, proof).await,
            Err(AccountError::Disabled)
        ));
        assert!(matches!(
            registry.confirm_own_totp(&stale, "123456").await,
            Err(AccountError::Disabled)
        ));
        assert!(matches!(
            registry.login_code(&stale, TTL).await,
            Err(AccountError::Disabled)
        ));
        assert!(matches!(
            registry.remove_sms("alice", Some((&stale, proof))).await,
            Err(AccountError::Disabled)
        ));
    }
}
