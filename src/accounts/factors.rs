//! TOTP enrolment (pending until its first code, beside any confirmed one) and recovery codes
//! (a new set with each confirmation or regeneration; the old set stops working).

use serde_json::json;

use super::{AccountError, Accounts};
use crate::clock::rfc3339;
use crate::credentials::assurance::Assurance;
use crate::credentials::recovery;
use crate::credentials::totp::{self, TotpParams};
use crate::directory::{Consumer, PendingEnd};
use crate::store::{Hash, TotpRecord};

/// A confirmed TOTP enrolment.
pub struct TotpConfirmed {
    /// Shown once.
    pub recovery_codes: Vec<String>,
    /// When the first code that works begins (Unix seconds): the confirming code spent its
    /// time step, so the next step's code is the first one accepted.
    pub next_code_at: u64,
}

impl TotpConfirmed {
    /// The answer of the admin API and of the enrolment API.
    pub fn answer(&self, now: u64) -> serde_json::Value {
        json!({
            "recovery_codes": self.recovery_codes,
            "next_code_at": rfc3339(self.next_code_at),
            "next_code_in": self.next_code_at.saturating_sub(now),
        })
    }
}

impl Accounts {
    /// Starts (or restarts) a TOTP enrolment; it stays pending until confirmed with a code.
    /// The admin API refuses it while a confirmed enrolment exists (reset it first).
    pub async fn begin_totp(
        &self,
        name: &str,
        params: TotpParams,
    ) -> Result<totp::Enrolment, AccountError> {
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
    ) -> Result<totp::Enrolment, AccountError> {
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
    ) -> Result<totp::Enrolment, AccountError> {
        params.validate().map_err(AccountError::Invalid)?;
        let _write = self.writes.lock().await;
        let old = self.to_change(name, by_consumer)?;
        let started_with = match by_consumer {
            Some(_) => old.assurance(),
            None => Assurance::Totp,
        };
        if by_consumer.is_none() && old.confirmed_totp().is_some() {
            return Err(AccountError::Conflict(format!(
                "`{name}` has a confirmed TOTP enrolment; reset it first"
            )));
        }
        let secret = totp::new_secret();
        let enrolment =
            totp::enrolment(&secret, params, &old.name).map_err(AccountError::Invalid)?;
        let record = TotpRecord {
            consumer_id: old.id.clone(),
            secret_sealed: self.master.encrypt(&secret, old.id.as_bytes()),
            params,
            confirmed: false,
            last_step: None,
            created_at: self.clock.now(),
            started_with,
        };
        self.store.put_pending_totp(record).await?;
        let updated = self.refreshed(&old).await?;
        // What the change was proved with: the account's level for the consumer's own (the
        // code itself is in the `otp_accepted` event before), or the admin API.
        let proved_with = match by_consumer {
            Some(_) => started_with.as_str(),
            None => "operator",
        };
        self.audit.event("totp_enrolment_started", Some(updated.who()), None, json!({
            "algorithm": params.algorithm.as_str(), "digits": params.digits, "period": params.period,
            "reenrolment": updated.totp.is_some(), "proved_with": proved_with,
        }));
        Ok(enrolment)
    }

    /// The TOTP generator of a consumer's confirmed enrolment, or of its pending one when none
    /// is confirmed.
    pub fn totp_generator(&self, consumer: &Consumer) -> Option<totp_rs::Totp> {
        let record = consumer.totp.as_ref().or(consumer.totp_pending.as_ref())?;
        self.generator_of(consumer, record)
    }

    pub(super) fn generator_of(
        &self,
        consumer: &Consumer,
        record: &TotpRecord,
    ) -> Option<totp_rs::Totp> {
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
    pub async fn confirm_totp(
        &self,
        name: &str,
        code: &str,
    ) -> Result<TotpConfirmed, AccountError> {
        self.confirm_pending_totp(name, None, code).await
    }

    /// The consumer's own confirmation (self-service): as [`confirm_totp`](Self::confirm_totp),
    /// for the consumer of that id only, and not once it is disabled.
    pub async fn confirm_own_totp(
        &self,
        consumer: &Consumer,
        code: &str,
    ) -> Result<TotpConfirmed, AccountError> {
        self.confirm_pending_totp(&consumer.name, Some(consumer), code)
            .await
    }

    async fn confirm_pending_totp(
        &self,
        name: &str,
        by_consumer: Option<&Consumer>,
        code: &str,
    ) -> Result<TotpConfirmed, AccountError> {
        let _write = self.writes.lock().await;
        let old = match by_consumer {
            Some(consumer) => self.own(consumer)?,
            None => self.consumer(name)?,
        };
        let pending = old.totp_pending.as_ref().ok_or_else(|| {
            AccountError::Conflict(format!("`{name}` has no pending TOTP enrolment"))
        })?;
        let now = self.clock.now();
        if let Some(end) = old.pending_end(pending.created_at, pending.started_with, now) {
            self.drop_pending_totp(&old, end).await?;
            return Err(AccountError::PendingGone(match end {
                PendingEnd::Expired => "the TOTP enrolment expired (15 minutes); start it again",
                PendingEnd::Outranked => {
                    "this TOTP enrolment was started before another factor was confirmed; start \
                     it again, with a code of that factor"
                }
            }));
        }
        let generator = self.generator_of(&old, pending).ok_or_else(|| {
            AccountError::Invalid("the enrolment cannot be decrypted with this master key".into())
        })?;
        let step = totp::verify(&generator, code, now).ok_or(AccountError::CodeInvalid)?;
        let next_code_at = (step + 1).saturating_mul(pending.params.period);
        let (codes, hashes) = self.new_recovery_codes();
        if !self
            .store
            .confirm_totp(old.id.clone(), step, hashes.clone(), Assurance::Totp)
            .await?
        {
            return Err(AccountError::CodeInvalid);
        }
        let replaced = old.totp.is_some();
        let drops_sms = old.sms.as_ref().is_some_and(|s| {
            s.record.pending_sealed.is_some() && s.record.pending_with < Assurance::Totp
        });
        let updated = self.refreshed(&old).await?;
        self.audit.event(
            "totp_enrolled",
            Some(updated.who()),
            None,
            json!({"replaced": replaced}),
        );
        if drops_sms {
            self.audit_dropped(&updated, "sms", PendingEnd::Outranked);
        }
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
            )
            .await?;
        }
        Ok(TotpConfirmed {
            recovery_codes: codes,
            next_code_at,
        })
    }

    /// Drops the pending TOTP enrolment (the confirmed one stays), with an audit event.
    async fn drop_pending_totp(&self, old: &Consumer, end: PendingEnd) -> Result<(), AccountError> {
        self.store.delete_pending_totp(old.id.clone()).await?;
        self.directory.refresh(&old.id).await?;
        self.audit_dropped(old, "totp", end);
        Ok(())
    }

    /// The `enrolment_dropped` audit event of a pending `factor` (`totp`, `sms`).
    pub(super) fn audit_dropped(&self, consumer: &Consumer, factor: &str, end: PendingEnd) {
        self.audit.event(
            "enrolment_dropped",
            Some(consumer.who()),
            None,
            json!({"factor": factor, "reason": end.reason()}),
        );
    }

    /// Removes the TOTP enrolment (confirmed and pending). Recovery codes go with it unless
    /// another confirmed factor (SMS) is left for them to back up.
    pub async fn reset_totp(&self, name: &str) -> Result<(), AccountError> {
        let _write = self.writes.lock().await;
        let old = self.consumer(name)?;
        if old.totp.is_none() && old.totp_pending.is_none() {
            return Err(AccountError::NotFoundOther(format!(
                "`{name}` has no TOTP enrolment"
            )));
        }
        let drop_recovery = !old.confirmed_sms();
        self.store
            .delete_totp(old.id.clone(), drop_recovery)
            .await?;
        self.directory.refresh(&old.id).await?;
        self.audit
            .event("totp_reset", Some(old.who()), None, json!({}));
        self.revoke_tokens(&old, None, "totp_reset").await
    }

    /// A fresh set of recovery codes (shown once) and their peppered hashes (stored).
    pub(super) fn new_recovery_codes(&self) -> (Vec<String>, Vec<Hash>) {
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
    pub async fn regenerate_recovery_codes(&self, name: &str) -> Result<Vec<String>, AccountError> {
        self.replace_recovery_codes(name, None).await
    }

    /// The consumer's own regeneration (self-service), proved at `proof`: refused below the
    /// account's level, for another consumer of that name, or once disabled.
    pub async fn regenerate_own_recovery_codes(
        &self,
        consumer: &Consumer,
        proof: Assurance,
    ) -> Result<Vec<String>, AccountError> {
        self.replace_recovery_codes(&consumer.name, Some((consumer, proof)))
            .await
    }

    async fn replace_recovery_codes(
        &self,
        name: &str,
        by_consumer: Option<(&Consumer, Assurance)>,
    ) -> Result<Vec<String>, AccountError> {
        let _write = self.writes.lock().await;
        let old = self.to_change(name, by_consumer)?;
        if !old.has_confirmed_factor() {
            return Err(AccountError::Conflict(format!(
                "`{name}` has no confirmed second factor; recovery codes come with one"
            )));
        }
        let (codes, hashes) = self.new_recovery_codes();
        self.store
            .replace_recovery_codes(old.id.clone(), hashes)
            .await?;
        self.directory.refresh(&old.id).await?;
        self.audit.event(
            "recovery_codes_regenerated",
            Some(old.who()),
            None,
            json!({}),
        );
        self.revoke_tokens(&old, None, "recovery_codes_regenerated")
            .await?;
        Ok(codes)
    }
}
