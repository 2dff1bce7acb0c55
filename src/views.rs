//! Consumers as the admin API and the CLI show them: no secret, no hash, no phone number in
//! full.

use serde::Serialize;

use crate::clock::rfc3339;
use crate::directory::{Consumer, Directory};

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
    /// The view of `c` at `now`; its keys' last use as `directory` saw it (the store lags by
    /// up to a flush).
    pub fn of(c: &Consumer, directory: &Directory, now: u64) -> Self {
        let mut view = Self::stored(c, now);
        for (key, shown) in c.keys.iter().zip(view.keys.iter_mut()) {
            if let Some(used) = directory.last_used(&key.hash)
                && used > key.last_used_at.unwrap_or(0)
            {
                shown.last_used_at = Some(rfc3339(used));
            }
        }
        view
    }

    /// The view of `c` at `now` as stored.
    pub fn stored(c: &Consumer, now: u64) -> Self {
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
