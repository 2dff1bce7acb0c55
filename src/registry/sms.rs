//! The registry's side of the SMS factor: numbers (sealed with the master key, bound to the
//! consumer), verification and login codes (only their peppered HMAC, in the store, so a
//! restart neither loses nor resurrects one), confirmation and removal. Texting is the
//! caller's (`selfservice`), which also applies the send limits.

use std::time::Duration;

use serde_json::json;

use super::{Consumer, Registry, RegistryError, SmsState, unused_codes};
use crate::secrets::MasterKey;
use crate::sms::{self, Phone, Purpose};
use crate::store::{CodeCheck, SmsCodeRecord, SmsRecord};

/// Associated data for a sealed number: the consumer id (so a ciphertext moved to another
/// consumer fails to open, like TOTP secrets) plus a label, so that a sealed TOTP secret
/// copied into the number's column cannot open as a number either.
fn phone_context(consumer_id: &str) -> Vec<u8> {
    format!("{consumer_id}/sms-phone").into_bytes()
}

fn open_phone(master: &MasterKey, consumer_id: &str, sealed: &[u8]) -> Option<Phone> {
    let plain = master.decrypt(sealed, &phone_context(consumer_id))?;
    Phone::parse(std::str::from_utf8(&plain).ok()?).ok()
}

/// The in-memory form of a stored SMS record: masks computed once, here.
pub(super) fn state_of(master: &MasterKey, record: SmsRecord) -> SmsState {
    let mask = |sealed: &Option<Vec<u8>>| {
        sealed.as_ref().map(|s| {
            open_phone(master, &record.consumer_id, s)
                .map_or_else(|| "(cannot be decrypted)".to_owned(), |p| p.masked())
        })
    };
    SmsState {
        phone_masked: mask(&record.phone_sealed),
        pending_masked: mask(&record.pending_sealed),
        record,
    }
}

/// A code to text: the code itself (never stored), the number, and when it expires.
pub struct Outgoing {
    pub code: String,
    pub phone: Phone,
    pub expires_at: u64,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("phone", &self.phone)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// The current state of `consumer`, by name and the same id (a deleted and re-created
    /// namesake is someone else).
    fn same(&self, consumer: &Consumer) -> Result<std::sync::Arc<Consumer>, RegistryError> {
        let current = self.get(&consumer.name)?;
        if current.id == consumer.id {
            Ok(current)
        } else {
            Err(RegistryError::NotFound(consumer.name.clone()))
        }
    }

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
    /// new one is confirmed. `proved`: the caller checked a code of an existing factor
    /// (refused without one if the consumer has a confirmed factor by now).
    pub async fn begin_sms(
        &self,
        consumer: &Consumer,
        phone: Phone,
        ttl: Duration,
        proved: bool,
    ) -> Result<Outgoing, RegistryError> {
        let _write = self.writes.lock().await;
        let old = self.same(consumer)?;
        if !proved && old.has_confirmed_factor() {
            return Err(RegistryError::Unproved);
        }
        let now = self.clock.now();
        let sealed = self
            .master
            .encrypt(phone.expose().as_bytes(), &phone_context(&old.id));
        let (code, record) = self.new_sms_code(&old.id, Purpose::Enrol, ttl);
        let expires_at = record.expires_at;
        self.store
            .put_pending_sms(old.id.clone(), sealed.clone(), now, record)
            .await?;
        let masked = phone.masked();
        let updated = old.with(|p| {
            let mut sms = p.factors.sms.take().unwrap_or_else(|| SmsState {
                record: SmsRecord {
                    consumer_id: p.record.id.clone(),
                    phone_sealed: None,
                    pending_sealed: None,
                    updated_at: now,
                },
                phone_masked: None,
                pending_masked: None,
            });
            sms.record.pending_sealed = Some(sealed);
            sms.record.updated_at = now;
            sms.pending_masked = Some(masked.clone());
            p.factors.sms = Some(sms);
        });
        self.audit_event(
            "sms_enrolment_started",
            Some(&updated),
            None,
            json!({"phone": masked, "replaces_confirmed": updated.confirmed_sms()}),
        );
        self.publish(|index| index.put(updated));
        Ok(Outgoing {
            code,
            phone,
            expires_at,
        })
    }

    /// Confirms the pending number with its verification code. Returns recovery codes (shown
    /// once) when this is the consumer's first confirmed factor. A confirmed number it
    /// replaces stops receiving codes, and the step-up tokens earned before are revoked.
    pub async fn confirm_sms(
        &self,
        consumer: &Consumer,
        code: &str,
    ) -> Result<Option<Vec<String>>, RegistryError> {
        let _write = self.writes.lock().await;
        let old = self.same(consumer)?;
        let has_pending = old
            .sms
            .as_ref()
            .is_some_and(|s| s.record.pending_sealed.is_some());
        if !has_pending {
            return Err(RegistryError::Conflict(
                "no phone number is waiting for confirmation; POST the number first".into(),
            ));
        }
        if !sms::is_code_shape(code) {
            return Err(RegistryError::CodeInvalid);
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
        let now = self.clock.now();
        match self
            .store
            .confirm_sms(old.id.clone(), hash, now, hashes.clone())
            .await?
        {
            CodeCheck::Accepted => {}
            CodeCheck::Wrong | CodeCheck::Expired | CodeCheck::Missing => {
                return Err(RegistryError::CodeInvalid);
            }
        }
        let replaced = old.confirmed_sms();
        let updated = old.with(|p| {
            if let Some(sms) = p.factors.sms.as_mut() {
                sms.record.phone_sealed = sms.record.pending_sealed.take();
                sms.phone_masked = sms.pending_masked.take();
                sms.record.updated_at = now;
            }
            if let Some(hashes) = &hashes {
                p.factors.recovery_codes = unused_codes(&p.record.id, hashes);
            }
        });
        let masked = updated.sms.as_ref().and_then(|s| s.phone_masked.clone());
        self.audit_event(
            "sms_enrolled",
            Some(&updated),
            None,
            json!({"phone": masked, "replaced": replaced}),
        );
        self.publish(|index| index.put(updated));
        if replaced {
            self.revoke_tokens(&old, None, "sms_replaced");
        }
        Ok(codes)
    }

    /// A login code for the consumer's confirmed number, valid for `ttl`; it replaces any
    /// outstanding login code. The caller texts it (after the send limits).
    pub async fn login_code(
        &self,
        consumer: &Consumer,
        ttl: Duration,
    ) -> Result<Outgoing, RegistryError> {
        let _write = self.writes.lock().await;
        let current = self.same(consumer)?;
        let phone = current
            .sms
            .as_ref()
            .and_then(|s| s.record.phone_sealed.as_deref())
            .ok_or_else(|| {
                RegistryError::NotFoundOther(format!(
                    "`{}` has no confirmed phone number",
                    current.name
                ))
            })
            .and_then(|sealed| {
                open_phone(&self.master, &current.id, sealed).ok_or_else(|| {
                    RegistryError::Invalid(
                        "the phone number cannot be decrypted with this master key".into(),
                    )
                })
            })?;
        let (code, record) = self.new_sms_code(&current.id, Purpose::Login, ttl);
        let expires_at = record.expires_at;
        self.store.put_sms_code(record).await?;
        Ok(Outgoing {
            code,
            phone,
            expires_at,
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

    /// Withdraws a code whose text could not be sent: a code nobody received must not stay
    /// guessable. Best effort; a failure only leaves the code to expire.
    pub async fn withdraw_sms_code(&self, consumer: &Consumer, purpose: Purpose) {
        if let Err(error) = self
            .store
            .delete_sms_code(consumer.id.clone(), purpose)
            .await
        {
            tracing::warn!(%error, "could not withdraw an unsent SMS code; it expires on its own");
        }
    }

    /// Removes the consumer's SMS factor (numbers and outstanding codes) and revokes its
    /// step-up tokens. Recovery codes go too unless a confirmed TOTP is left. `by_consumer`:
    /// the self-service call, only if the consumer of that name is still this id, and with a
    /// code proved when it has a confirmed factor; `None` for the admin API.
    pub async fn remove_sms(
        &self,
        name: &str,
        by_consumer: Option<(&str, bool)>,
    ) -> Result<(), RegistryError> {
        let _write = self.writes.lock().await;
        let old = self.get(name)?;
        if let Some((id, proved)) = by_consumer {
            if id != old.id {
                return Err(RegistryError::NotFound(name.to_owned()));
            }
            if !proved && old.has_confirmed_factor() {
                return Err(RegistryError::Unproved);
            }
        }
        if old.sms.is_none() {
            return Err(RegistryError::NotFoundOther(format!(
                "`{name}` has no SMS number"
            )));
        }
        let drop_recovery = old.confirmed_totp().is_none();
        self.store.delete_sms(old.id.clone(), drop_recovery).await?;
        let updated = old.with(|p| {
            p.factors.sms = None;
            if drop_recovery {
                p.factors.recovery_codes.clear();
            }
        });
        self.audit_event("sms_removed", Some(&updated), None, json!({}));
        self.publish(|index| index.put(updated));
        self.revoke_tokens(&old, None, "sms_removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::clock::ManualClock;
    use crate::credentials::totp::TotpParams;
    use crate::registry::{Registry, RegistryError};
    use crate::secrets::MasterKey;
    use crate::sms::Phone;
    use crate::store::sqlite::SqliteStore;

    const NOW: u64 = 1_800_000_000;

    /// A factor confirmed after the caller's key was checked (so the caller's view of the
    /// consumer has none, and no code was asked for) still needs its code: the registry checks
    /// again under its write lock.
    #[tokio::test]
    async fn a_factor_confirmed_meanwhile_still_needs_its_code() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("r.db")).unwrap());
        let clock = Arc::new(ManualClock::new(NOW));
        let registry = Registry::open(store, MasterKey::from_bytes([7; 32]), clock, None)
            .await
            .unwrap();
        registry.create_consumer("alice", vec![]).await.unwrap();
        let stale = registry.consumer_state("alice").unwrap();
        assert!(!stale.has_confirmed_factor());

        registry
            .begin_totp("alice", TotpParams::default())
            .await
            .unwrap();
        let pending = registry.consumer_state("alice").unwrap();
        let code = registry
            .totp_generator(&pending)
            .unwrap()
            .generate(NOW)
            .to_string();
        registry.confirm_totp("alice", &code).await.unwrap();

        let phone = Phone::parse("+447700900123").unwrap();
        let ttl = Duration::from_secs(300);
        assert!(matches!(
            registry
                .begin_totp_reenrolment(&stale, TotpParams::default(), false)
                .await,
            Err(RegistryError::Unproved)
        ));
        assert!(matches!(
            registry.begin_sms(&stale, phone.clone(), ttl, false).await,
            Err(RegistryError::Unproved)
        ));
        // With a code proved, both go ahead; the confirmed TOTP stays beside the new one.
        registry.begin_sms(&stale, phone, ttl, true).await.unwrap();
        registry
            .begin_totp_reenrolment(&stale, TotpParams::default(), true)
            .await
            .unwrap();
        let now = registry.consumer_state("alice").unwrap();
        assert!(now.confirmed_totp().is_some() && now.totp_pending.is_some());
        assert!(matches!(
            registry.remove_sms("alice", Some((&stale.id, false))).await,
            Err(RegistryError::Unproved)
        ));
        registry
            .remove_sms("alice", Some((&stale.id, true)))
            .await
            .unwrap();
        assert!(registry.consumer_state("alice").unwrap().sms.is_none());
    }
}
