//! A consumer as the request path and the operations see it: immutable, built from its
//! stored state, replaced whole when the store announces a change.

use std::sync::Arc;

use http::HeaderValue;

use crate::audit::Who;
use crate::credentials::assurance::Assurance;
use crate::credentials::factors::Factors;
use crate::secrets::MasterKey;
use crate::store::{
    ConsumerRecord, ConsumerState, KeyRecord, RecoveryCodeRecord, SmsRecord, TotpRecord,
};

/// How long a pending enrolment (a TOTP secret, an SMS number) can be confirmed after it was
/// started: long enough to set up an app, short enough that an abandoned one is not picked up
/// later by whoever else saw the key.
pub const PENDING_TTL_SECS: u64 = 15 * 60;

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
    /// The consumer of a stored state; `master` opens its numbers to mask them (once, here).
    pub fn from_state(state: ConsumerState, master: &MasterKey) -> Self {
        let ConsumerState {
            record,
            keys,
            totp,
            recovery_codes,
            sms,
        } = state;
        // Names and roles are validated to header-safe characters on the way in.
        let header = |s: &str| {
            HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        };
        let headers = IdentityHeaders {
            id: header(&record.id),
            name: header(&record.name),
            roles: header(&record.roles.join(",")),
        };
        let (mut confirmed, mut pending) = (None, None);
        for t in totp {
            if t.confirmed {
                confirmed = Some(t);
            } else {
                pending = Some(t);
            }
        }
        Self {
            shared_id: Arc::from(record.id.as_str()),
            id: record.id,
            name: record.name,
            roles: record.roles,
            disabled: record.disabled,
            created_at: record.created_at,
            version: record.version,
            keys,
            totp: confirmed,
            totp_pending: pending,
            recovery_codes,
            sms: sms.map(|record| sms_state(master, record)),
            headers,
        }
    }

    /// The stored record of the consumer as it is.
    pub fn record(&self) -> ConsumerRecord {
        ConsumerRecord {
            id: self.id.clone(),
            name: self.name.clone(),
            roles: self.roles.clone(),
            disabled: self.disabled,
            created_at: self.created_at,
            version: self.version,
        }
    }

    /// The consumer as audit events name it.
    pub fn who(&self) -> Who<'_> {
        Who {
            id: &self.id,
            name: &self.name,
        }
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
    pub fn pending_end(
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
pub enum PendingEnd {
    Expired,
    /// Started before a stronger factor was confirmed (normally dropped at that confirmation;
    /// this holds for enrolments pending from before that rule, too).
    Outranked,
}

impl PendingEnd {
    /// The `reason` of its `enrolment_dropped` audit event.
    pub fn reason(self) -> &'static str {
        match self {
            PendingEnd::Expired => "expired",
            PendingEnd::Outranked => "started_before_a_factor",
        }
    }
}

/// The in-memory form of a stored SMS record: masks computed once, here.
pub fn sms_state(master: &MasterKey, record: SmsRecord) -> SmsState {
    let mask = |sealed: &Option<Vec<u8>>| {
        sealed.as_ref().map(|s| {
            crate::sms::open_phone(master, &record.consumer_id, s)
                .map_or_else(|| "(cannot be decrypted)".to_owned(), |p| p.masked())
        })
    };
    SmsState {
        phone_masked: mask(&record.phone_sealed),
        pending_masked: mask(&record.pending_sealed),
        record,
    }
}
