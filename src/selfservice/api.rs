//! The enrolment API under the prefix (contract: `.notes/selfservice-contract.md`). Each call
//! has the consumer's API key (checked by the key layer before this); a call that changes a
//! factor that exists also needs `X-OTP` with a code of one of the consumer's confirmed
//! factors, checked exactly as on a protected route (TOTP replay watermark, single-use SMS
//! and recovery codes) and counted by the failure limiter when wrong.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::Endpoints;
use crate::accounts::{AccountError, CodeFailure, Outgoing};
use crate::auth::api_key::single_value;
use crate::auth::failures::SecondFactorPassed;
use crate::auth::second_factor::X_OTP;
use crate::clock::rfc3339;
use crate::credentials::assurance::Assurance;
use crate::credentials::factors::Factor;
use crate::credentials::totp::{TotpAlgorithm, TotpParams};
use crate::directory::KeyEntry;
use crate::enrollment::{PolicyView, policies_for};
use crate::error::{Body, BoxError, Refusal, full_body};
use crate::sms::twilio::SendError;
use crate::sms::{self, NotNow, Phone, Purpose, Reservation, SmsSettings};
use crate::snapshot::Snapshot;
use crate::views::{SmsView, TotpView};

/// The built-in policy's name, for audit events.
const POLICY: &str = "stepgate/self-service";

/// The caller, as the API-key layer vouched for it, and the code it sent.
pub(super) struct Caller {
    pub(super) entry: Arc<KeyEntry>,
    code: Option<String>,
}

pub(super) fn caller<B>(request: &mut Request<B>) -> Result<Caller, Refusal> {
    let entry = crate::context::Context::entry_of(request)
        .cloned()
        .ok_or(Refusal::Internal("self-service API without an API key"))?;
    let code = single_value(
        request.headers(),
        &X_OTP,
        "exactly one X-OTP header of visible ASCII is allowed",
    )?
    .map(str::to_owned);
    request.headers_mut().remove(&X_OTP);
    Ok(Caller { entry, code })
}

/// What proved a change: the account's level it was proved at (`KeyOnly` when the consumer
/// has no confirmed factor, so nothing could be asked). The code that proved it is spent.
#[derive(Debug, Clone, Copy)]
pub(super) struct Proof {
    level: Assurance,
}

impl Proof {
    fn proved(&self) -> bool {
        self.level > Assurance::KeyOnly
    }
}

impl Endpoints {
    fn audit(&self, caller: &Caller, kind: &str, detail: Value) {
        self.accounts.audit_log().event(
            kind,
            Some(caller.entry.consumer.who()),
            Some(&caller.entry.prefix),
            detail,
        );
    }

    /// Proves a change to the consumer's factors (README "Self-service", the proof rule in
    /// `registry::assurance`): with a confirmed factor, `X-OTP` must carry a code of a factor
    /// as strong as the account (with TOTP confirmed: a TOTP or recovery code, never an SMS
    /// code), checked exactly as on a protected route. Without one there is nothing to ask for,
    /// unless `always` (a call that needs a confirmed factor to make sense). A wrong code is
    /// `ChangeOtpInvalid`, which the failure limiter counts.
    ///
    /// The code is spent here, before the change is made, whatever its kind: a change is never
    /// started on a proof that might still turn out unspendable (used elsewhere meanwhile, or
    /// the store failing), since undoing it could fail too.
    pub(super) async fn prove(
        &self,
        caller: &Caller,
        always: bool,
        endpoint: &str,
    ) -> Result<Proof, Refusal> {
        let consumer = &caller.entry.consumer;
        let needs = consumer.assurance();
        if needs == Assurance::KeyOnly {
            return if always {
                Err(Refusal::Conflict(
                    "this needs a confirmed second factor; enrol TOTP or SMS first",
                ))
            } else {
                Ok(Proof { level: needs })
            };
        }
        let Some(code) = caller.code.as_deref() else {
            self.metrics.factor("none", "missing");
            return Err(Refusal::ChangeOtpRequired { needs });
        };
        let invalid = || Refusal::ChangeOtpInvalid {
            by: caller.entry.attempt.clone(),
            needs,
        };
        let rejected = |kind: &str| {
            self.audit(
                caller,
                kind,
                json!({"policy": POLICY, "endpoint": endpoint}),
            );
        };
        let now = self.accounts.now();
        match self
            .accounts
            .verify_code(consumer, needs.proofs(), code, now)
            .await
        {
            Ok(factor) => {
                self.accepted(caller, factor, endpoint);
                Ok(Proof { level: needs })
            }
            Err(CodeFailure::Invalid) => {
                self.metrics.factor("code", "rejected");
                rejected("otp_rejected");
                Err(invalid())
            }
            Err(CodeFailure::Replayed) => {
                self.metrics.factor("totp", "replayed");
                rejected("otp_replayed");
                Err(invalid())
            }
            Err(CodeFailure::Store(error)) => {
                tracing::error!(%error, "self-service code check failed closed: store unavailable");
                Err(Refusal::Unavailable)
            }
        }
    }

    /// A code that proved a change, in the metrics and the audit log.
    fn accepted(&self, caller: &Caller, factor: Factor, endpoint: &str) {
        self.metrics.factor(factor.as_str(), "accepted");
        self.audit(
            caller,
            "otp_accepted",
            json!({"factor": factor.as_str(), "policy": POLICY, "endpoint": endpoint}),
        );
        if factor == Factor::RecoveryCode {
            self.audit(caller, "recovery_code_used", json!({"policy": POLICY}));
        }
    }

    /// A confirmation that failed: a wrong code is counted, audited and 401 `otp_invalid`
    /// (which the failure limiter counts); anything else maps as every accounts error does.
    fn confirm_refused(&self, caller: &Caller, endpoint: &str, error: AccountError) -> Refusal {
        if !matches!(error, AccountError::CodeInvalid) {
            return refusal(error, &caller.entry);
        }
        self.metrics.factor("code", "rejected");
        self.audit(
            caller,
            "otp_rejected",
            json!({"policy": POLICY, "endpoint": endpoint}),
        );
        Refusal::OtpInvalid {
            by: caller.entry.attempt.clone(),
        }
    }

    /// Texts `code` to `phone`. A failure is 502 `sms_failed`, never a silent success; the
    /// caller withdraws the code (nobody got it, so it must not stay guessable).
    async fn text(
        &self,
        caller: &Caller,
        settings: &SmsSettings,
        purpose: Purpose,
        outgoing: &Outgoing,
    ) -> Result<(), Refusal> {
        let masked = outgoing.phone.masked();
        let body = sms::message(purpose, &outgoing.code, settings.code_ttl);
        match settings.twilio.send(&outgoing.phone, &body).await {
            Ok(sid) => {
                self.metrics.factor("sms", "sent");
                self.audit(
                    caller,
                    "sms_sent",
                    json!({"purpose": purpose.as_str(), "phone": masked, "sid": sid}),
                );
                Ok(())
            }
            Err(error) => {
                self.metrics.factor("sms", "send_failed");
                let (twilio_status, twilio_code) = match &error {
                    SendError::Refused { status, code } => (Some(*status), *code),
                    _ => (None, None),
                };
                tracing::warn!(
                    purpose = purpose.as_str(),
                    phone = %masked,
                    twilio_status,
                    twilio_code,
                    error = %error,
                    "SMS not sent"
                );
                self.audit(
                    caller,
                    "sms_send_failed",
                    json!({
                        "purpose": purpose.as_str(), "phone": masked,
                        "twilio_status": twilio_status, "twilio_code": twilio_code,
                    }),
                );
                Err(Refusal::SmsFailed)
            }
        }
    }

    /// Reserves a send against the limits before anything is spent or made: the consumer's
    /// budget, and `destination`'s for a text to a number the consumer has not confirmed.
    async fn reserve_send(
        &self,
        caller: &Caller,
        destination: Option<&Phone>,
    ) -> Result<Reservation, Refusal> {
        let now = self.accounts.now();
        self.sends
            .reserve(&caller.entry.consumer.shared_id, destination, now)
            .await
            .map_err(|not_now| match not_now {
                NotNow::Wait(retry_after) => {
                    self.metrics.factor("sms", "send_limited");
                    Refusal::SendLimited { retry_after }
                }
                NotNow::Unavailable => Refusal::Unavailable,
            })
    }
}

/// A accounts failure as the self-service answer it means.
fn refusal(error: AccountError, entry: &Arc<KeyEntry>) -> Refusal {
    match error {
        AccountError::CodeInvalid => Refusal::OtpInvalid {
            by: entry.attempt.clone(),
        },
        // A factor was confirmed between the key check and this call: ask for its code.
        AccountError::Unproved(needs) => Refusal::ChangeOtpRequired { needs },
        AccountError::Conflict(_) => {
            Refusal::Conflict("nothing is waiting for confirmation; start the enrolment again")
        }
        AccountError::PendingGone(detail) => Refusal::Conflict(detail),
        // Disabled since its key was checked: as the key layer answers a disabled consumer.
        AccountError::Disabled => Refusal::ApiKeyInvalid,
        // Requests are validated before they reach the accounts; what is left is stored data
        // that does not open (e.g. under another master key): refuse, fail closed.
        AccountError::Invalid(detail) => {
            tracing::error!(%detail, "self-service call refused: stored data is unusable");
            Refusal::Unavailable
        }
        AccountError::NotFound(_) | AccountError::NotFoundOther(_) => {
            // The consumer was deleted (or lost the factor) since its key was checked.
            Refusal::Conflict("the account changed meanwhile; reload and try again")
        }
        AccountError::Store(error) => {
            tracing::error!(%error, "self-service call failed closed: store unavailable");
            Refusal::Unavailable
        }
        AccountError::WrongMasterKey => Refusal::Unavailable,
    }
}

pub(super) fn json_answer(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full_body(value.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An answer to a call a code of an existing factor proved: the failure limiter forgets the
/// consumer's earlier failures, as after any successful second factor.
pub(super) fn proved(
    mut response: Response<Body>,
    proof: &Proof,
    caller: &Caller,
) -> Response<Body> {
    if proof.proved() {
        response.extensions_mut().insert(SecondFactorPassed {
            consumer_id: caller.entry.consumer.shared_id.clone(),
        });
    }
    response
}

/// The body as JSON of type `T`: `None` when empty (for calls whose body is optional). Refused
/// with 400: another content type, malformed JSON, unknown or repeated fields.
async fn read_json<T, B>(request: Request<B>) -> Result<Option<T>, Refusal>
where
    T: DeserializeOwned,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let json_type = request.headers().get(header::CONTENT_TYPE).map(|v| {
        v.to_str()
            .ok()
            .and_then(|t| t.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    let limit = crate::config::SelfServiceSpec::API_BODY_BYTES;
    let bytes = Limited::new(
        request.into_body(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    )
    .collect()
    .await
    .map_err(|_| Refusal::BodyTooLarge { limit })?
    .to_bytes();
    if bytes.is_empty() {
        return Ok(None);
    }
    if json_type != Some(true) {
        return Err(Refusal::BadRequest(
            "a request body must be JSON with Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|_| {
        Refusal::BadRequest(
            "the body must be one JSON object with only the documented fields, each once",
        )
    })
}

/// For calls without a body: nothing, or an empty JSON object.
pub(super) async fn no_body<B>(request: Request<B>) -> Result<(), Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Nothing {}
    read_json::<Nothing, B>(request).await.map(|_| ())
}

/// `GET {prefix}/2fa`: the consumer's factors and the policies that ask it for one.
pub async fn status<B>(
    endpoints: &Endpoints,
    snapshot: &Snapshot,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal> {
    let caller = caller(&mut request)?;
    let consumer = &caller.entry.consumer;
    let now = endpoints.accounts.now();
    let totp = match TotpView::of(consumer, now) {
        Some(t) => json!({
            "status": t.status, "digits": t.digits, "period": t.period, "algorithm": t.algorithm,
            "reenrolment_pending": t.reenrolment_pending,
        }),
        None => json!({"status": "none"}),
    };
    let sms = match SmsView::of(consumer, now) {
        Some(s) => {
            let mut v = json!({"status": s.status, "phone": s.phone});
            if let Some(pending) = s.pending_phone {
                v["pending_phone"] = pending.into();
            }
            v
        }
        None => json!({"status": "none"}),
    };
    let policies: Vec<PolicyView> = policies_for(snapshot, consumer, now)
        .iter()
        .map(PolicyView::of)
        .collect();
    Ok(json_answer(
        StatusCode::OK,
        &json!({
            "consumer": consumer.name,
            "enrolled": consumer.has_confirmed_factor(),
            "factors": {
                "totp": totp,
                "sms": sms,
                "recovery_codes": {"remaining": consumer.recovery_codes_remaining()},
            },
            "sms_available": snapshot.sms.is_some(),
            "policies": policies,
        }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TotpRequest {
    digits: Option<u8>,
    period: Option<u64>,
    algorithm: Option<String>,
}

/// `POST {prefix}/2fa/totp`: a new secret, pending beside any confirmed one.
pub async fn begin_totp<B>(
    endpoints: &Endpoints,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let caller = caller(&mut request)?;
    // Parse before checking the code, so a malformed request does not burn a code.
    let body: TotpRequest = read_json(request).await?.unwrap_or_default();
    let defaults = TotpParams::default();
    let algorithm = match body.algorithm.as_deref() {
        None => defaults.algorithm,
        Some(text) => TotpAlgorithm::parse(text).ok_or(Refusal::BadRequest(
            "algorithm must be SHA1, SHA256 or SHA512",
        ))?,
    };
    let params = TotpParams {
        algorithm,
        digits: body.digits.unwrap_or(defaults.digits),
        period: body.period.unwrap_or(defaults.period),
    };
    params
        .validate()
        .map_err(|_| Refusal::BadRequest("digits must be 6 to 8 and period 15 to 120 seconds"))?;
    let proof = endpoints.prove(&caller, false, "totp").await?;
    let enrolment = endpoints
        .accounts
        .begin_totp_reenrolment(&caller.entry.consumer, params, proof.level)
        .await
        .map_err(|e| refusal(e, &caller.entry))?;
    Ok(proved(
        json_answer(
            StatusCode::CREATED,
            &json!({
                "secret": enrolment.secret_base32,
                "otpauth_uri": enrolment.otpauth_uri,
                "qr_svg": enrolment.qr_svg,
            }),
        ),
        &proof,
        &caller,
    ))
}

/// `POST {prefix}/2fa/totp/confirm` with `X-OTP` from the new app: the new secret becomes the
/// confirmed one; a new set of recovery codes.
pub async fn confirm_totp<B>(
    endpoints: &Endpoints,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let caller = caller(&mut request)?;
    no_body(request).await?;
    let consumer = &caller.entry.consumer;
    if consumer.totp_pending.is_none() {
        return Err(Refusal::Conflict(
            "no TOTP enrolment is waiting for confirmation; POST 2fa/totp first",
        ));
    }
    let code = caller.code.as_deref().ok_or(Refusal::OtpRequired)?;
    match endpoints.accounts.confirm_own_totp(consumer, code).await {
        Ok(confirmed) => {
            endpoints.metrics.factor("totp", "enrolled");
            Ok(json_answer(
                StatusCode::OK,
                &confirmed.answer(endpoints.accounts.now()),
            ))
        }
        Err(error) => Err(endpoints.confirm_refused(&caller, "totp/confirm", error)),
    }
}

/// `POST {prefix}/2fa/recovery-codes` with `X-OTP`: a new set; the old one stops working.
pub async fn regenerate_recovery_codes<B>(
    endpoints: &Endpoints,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let caller = caller(&mut request)?;
    no_body(request).await?;
    let proof = endpoints.prove(&caller, true, "recovery-codes").await?;
    let codes = endpoints
        .accounts
        .regenerate_own_recovery_codes(&caller.entry.consumer, proof.level)
        .await
        .map_err(|e| refusal(e, &caller.entry))?;
    Ok(proved(
        json_answer(StatusCode::CREATED, &json!({"recovery_codes": codes})),
        &proof,
        &caller,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhoneRequest {
    phone: String,
}

fn sms_settings(snapshot: &Snapshot) -> Result<Arc<SmsSettings>, Refusal> {
    snapshot.sms.clone().ok_or(Refusal::SmsNotConfigured)
}

/// `POST {prefix}/2fa/sms` `{"phone"}`: texts a verification code to the new number.
pub async fn begin_sms<B>(
    endpoints: &Endpoints,
    snapshot: &Snapshot,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let settings = sms_settings(snapshot)?;
    let caller = caller(&mut request)?;
    let body: PhoneRequest = read_json(request)
        .await?
        .ok_or(Refusal::BadRequest("the body must be {\"phone\": \"+…\"}"))?;
    let phone = Phone::parse(&body.phone).map_err(Refusal::BadRequest)?;
    let consumer = &caller.entry.consumer;
    // The number's own budget applies unless it is the consumer's confirmed number.
    let own_number = endpoints.accounts.confirmed_phone(consumer).as_ref() == Some(&phone);
    // Limits first, before the proof is spent (a 429 must cost no code). Then the proof is
    // spent, before anything is started: a refused or failed spend drops the reservation
    // (giving the send back) and leaves nothing to undo, so no texted code can confirm a
    // number without a spent proof. A text that fails afterwards costs the code, as it costs
    // a TOTP or SMS code.
    let reservation = endpoints
        .reserve_send(&caller, (!own_number).then_some(&phone))
        .await?;
    let proof = endpoints.prove(&caller, false, "sms").await?;
    let outgoing = endpoints
        .accounts
        .begin_sms(consumer, phone, settings.code_ttl, proof.level)
        .await
        .map_err(|e| refusal(e, &caller.entry))?;
    let sent = endpoints
        .text(&caller, &settings, Purpose::Enrol, &outgoing)
        .await;
    if let Err(refused) = sent {
        // Nobody received the code: withdraw it, and leave no number pending.
        endpoints
            .accounts
            .abandon_sms_enrolment(consumer, &outgoing)
            .await;
        return Err(refused);
    }
    // The text went out: it counts against the limits.
    reservation.commit();
    Ok(proved(
        json_answer(
            StatusCode::ACCEPTED,
            &json!({
                "phone": outgoing.phone.masked(),
                "expires_at": rfc3339(outgoing.expires_at),
            }),
        ),
        &proof,
        &caller,
    ))
}

/// `POST {prefix}/2fa/sms/confirm` with `X-OTP: <the texted code>`.
pub async fn confirm_sms<B>(
    endpoints: &Endpoints,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let caller = caller(&mut request)?;
    no_body(request).await?;
    let pending = caller
        .entry
        .consumer
        .sms
        .as_ref()
        .is_some_and(|s| s.record.pending_sealed.is_some());
    if !pending {
        return Err(Refusal::Conflict(
            "no phone number is waiting for confirmation; POST 2fa/sms first",
        ));
    }
    let code = caller.code.as_deref().ok_or(Refusal::OtpRequired)?;
    match endpoints
        .accounts
        .confirm_sms(&caller.entry.consumer, code)
        .await
    {
        Ok(codes) => {
            endpoints.metrics.factor("sms", "enrolled");
            let mut body = json!({"sms": "confirmed"});
            if let Some(codes) = codes {
                body["recovery_codes"] = json!(codes);
            }
            Ok(json_answer(StatusCode::OK, &body))
        }
        Err(error) => Err(endpoints.confirm_refused(&caller, "sms/confirm", error)),
    }
}

/// `DELETE {prefix}/2fa/sms` (with `X-OTP` when a factor is confirmed).
pub async fn remove_sms<B>(
    endpoints: &Endpoints,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let caller = caller(&mut request)?;
    no_body(request).await?;
    if caller.entry.consumer.sms.is_none() {
        return Err(Refusal::SmsNotEnrolled);
    }
    let proof = endpoints.prove(&caller, false, "sms").await?;
    let consumer = &caller.entry.consumer;
    endpoints
        .accounts
        .remove_sms(&consumer.name, Some((consumer, proof.level)))
        .await
        .map_err(|e| refusal(e, &caller.entry))?;
    let mut response = Response::new(full_body(""));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(proved(response, &proof, &caller))
}

/// `POST {prefix}/sms/send`: a login code to the confirmed number, replacing any outstanding
/// one. Needs only the API key (the code is the second factor it asks for).
pub async fn send_login_code<B>(
    endpoints: &Endpoints,
    snapshot: &Snapshot,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let settings = sms_settings(snapshot)?;
    let caller = caller(&mut request)?;
    no_body(request).await?;
    let consumer = &caller.entry.consumer;
    if !consumer.confirmed_sms() {
        return Err(Refusal::SmsNotEnrolled);
    }
    // Fail closed before anything is counted when the number does not open.
    if endpoints.accounts.confirmed_phone(consumer).is_none() {
        tracing::error!("the confirmed phone number does not decrypt with this master key");
        return Err(Refusal::Unavailable);
    }
    // Limits first: a refused send must not replace the outstanding code. A login code goes
    // to the consumer's own confirmed number: only the consumer's budget applies, so others
    // entering that number for their enrolments cannot block it.
    let reservation = endpoints.reserve_send(&caller, None).await?;
    let outgoing = endpoints
        .accounts
        .login_code(consumer, settings.code_ttl)
        .await
        .map_err(|e| match e {
            AccountError::NotFoundOther(_) => Refusal::SmsNotEnrolled,
            other => refusal(other, &caller.entry),
        })?;
    if let Err(refused) = endpoints
        .text(&caller, &settings, Purpose::Login, &outgoing)
        .await
    {
        endpoints
            .accounts
            .withdraw_sms_code(consumer, Purpose::Login, &outgoing)
            .await;
        return Err(refused);
    }
    reservation.commit();
    Ok(json_answer(
        StatusCode::ACCEPTED,
        &json!({"expires_at": rfc3339(outgoing.expires_at)}),
    ))
}
