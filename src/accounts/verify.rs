//! A code from `X-OTP`, checked and spent: the request path's one write.

use super::Accounts;
use crate::credentials::factors::{Factor, Factors};
use crate::credentials::{recovery, totp};
use crate::directory::Consumer;
use crate::store::{CodeCheck, StoreError};

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

impl Accounts {
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
                    self.mark_recovery_code_used(consumer).await;
                    Ok(Factor::RecoveryCode)
                }
                Ok(false) => Err(CodeFailure::Invalid),
                Err(error) => Err(CodeFailure::Store(error)),
            };
        }
        Err(CodeFailure::Invalid)
    }

    /// The directory's view of the consumer after one of its recovery codes was spent (it
    /// shows how many are left). Best effort: the code is spent in the store either way.
    async fn mark_recovery_code_used(&self, consumer: &Consumer) {
        let _write = self.writes.lock().await;
        if let Err(error) = self.directory.refresh(&consumer.id).await {
            tracing::warn!(%error, "could not refresh a consumer after a recovery code was used");
        }
    }
}
