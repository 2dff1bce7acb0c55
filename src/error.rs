//! Refusals. [`Refusal`] is every way the gateway can decline a request, one variant per
//! condition, carrying plain data only (this module is a leaf: the layers that refuse depend
//! on it, not the other way round); [`problem`] is the one place that turns them into HTTP
//! (RFC 9457 problem+json with a stable `code`). Start-up and CLI failures are
//! [`crate::startup::Error`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::credentials::assurance::Assurance;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway sends.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Wraps bytes as a [`Body`].
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Why the gateway declined a request. The `Display` text is the problem's `detail`: it is
/// shown to clients, so it never contains a secret or an upstream's internal error.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("the request path is ambiguous: {0}")]
    BadPath(crate::path::PathError),
    #[error("the request's host is ambiguous: {0}")]
    BadHost(crate::host::HostError),
    /// A header name that reads, with `_` as `-`, as a credential or identity header.
    #[error(
        "the header `{0}` is read as `{spelled}` by many upstreams; credential and identity \
         header names must be spelled with `-`",
        spelled = crate::header_names::cgi_spelling(.0.as_str())
    )]
    LookAlikeHeader(http::HeaderName),
    /// Another header name with `_`, under `limits.headers_with_underscores: reject`.
    #[error("header names with `_` are not accepted here (`{0}`)")]
    UnderscoreHeader(http::HeaderName),
    #[error("a Connection option may not name `{0}`, a header the gateway reads or sets")]
    ConnectionNamesProtected(http::HeaderName),
    /// The message's framing is ambiguous: answered with 400 and the connection closed.
    #[error("{0}")]
    BadFraming(&'static str),
    /// The client's body broke off or was malformed (a bad chunk): answered with 400 and the
    /// connection closed; not the upstream's fault.
    #[error("the request body is malformed or was cut off")]
    BadBody,
    #[error("no route matches this request")]
    NoRoute,
    #[error("this route needs an API key in the X-Api-Key header")]
    ApiKeyMissing,
    #[error("the API key is not valid")]
    ApiKeyInvalid,
    #[error("this route needs a second factor: send X-OTP or X-Step-Up-Token")]
    OtpRequired,
    #[error("the one-time code is not valid")]
    OtpInvalid { by: Attempt },
    #[error("the step-up token is not valid")]
    StepUpInvalid { by: Attempt },
    /// A valid token whose code is older than the route policy's `step_up.max_age` (seconds):
    /// not a failed attempt, just not fresh enough here.
    #[error(
        "this route needs a second factor presented within the last {max_age} seconds; the \
         step-up token's is older: send X-OTP"
    )]
    StepUpTooOld { max_age: u64 },
    /// `page`: where the consumer enrols (the security page's path), `None` when
    /// self-service is off.
    #[error("this route needs a second factor and none is enrolled; {}", match page {
        Some(page) => format!("enrol at {page}"),
        None => "ask your operator to enrol you".to_owned(),
    })]
    EnrollmentRequired { page: Option<Arc<str>> },
    #[error("this consumer's role may not call this route")]
    Forbidden,
    /// A request a person must approve: nothing was forwarded; its id, the page where it is
    /// approved and the URL its requester polls (answered with them as members).
    #[error(
        "this request needs a person's approval: repeat it unchanged with X-Approval once it is approved"
    )]
    ApprovalRequired {
        id: String,
        page: String,
        status: String,
        expires_at: u64,
    },
    #[error("the request is still waiting for its approval")]
    ApprovalPending { expires_at: u64 },
    #[error("the request was denied")]
    ApprovalDenied,
    /// The repeat differs from the approved request (a changed byte): the approval is spent.
    #[error("this request is not the one that was approved; ask for a new approval")]
    ApprovalMismatch { by: Attempt },
    /// Unknown, another consumer's, expired or already used.
    #[error("the approval is unknown, expired or already used")]
    ApprovalInvalid { by: Attempt },
    #[error("too many requests waiting for approval; try again in {retry_after} seconds")]
    TooManyApprovals { retry_after: u64 },
    /// A request for approval that does not exist (or is not the caller's to see).
    #[error("no such request for approval")]
    UnknownApproval,
    /// An approver who may not decide this request (`{0}` says why).
    #[error("{0}")]
    NotApprover(&'static str),
    #[error("too many failed attempts; try again in {retry_after} seconds")]
    TooManyAttempts { retry_after: u64 },
    /// Self-service: the SMS send limits (not failed attempts: nothing is counted or banned).
    #[error(
        "too many text messages for this account or number in a short time; try again in \
         {retry_after} seconds"
    )]
    SendLimited { retry_after: u64 },
    /// Self-service: a change to a factor needs `X-OTP` with a code as strong as the account
    /// (`registry::assurance`); 401 `otp_required`, its challenge naming what would do.
    #[error("this change needs X-OTP with {}", .needs.wanted())]
    ChangeOtpRequired { needs: Assurance },
    /// Self-service: the code does not prove the change (wrong, used, or of a weaker factor
    /// than the account's); 401 `otp_invalid`, counted like any wrong code.
    #[error("the code is not valid for this change, which needs {}", .needs.wanted())]
    ChangeOtpInvalid { by: Attempt, needs: Assurance },
    #[error("a dependency is unavailable; the request was refused to stay safe")]
    Unavailable,
    /// Self-service: the request does not fit the consumer's current state.
    #[error("{0}")]
    Conflict(&'static str),
    /// Self-service: an SMS call for a consumer without a confirmed number.
    #[error("no phone number is enrolled for SMS codes")]
    SmsNotEnrolled,
    /// Self-service: an SMS call on a gateway without SMS configured.
    #[error("SMS is not configured on this gateway")]
    SmsNotConfigured,
    /// The SMS provider did not take the message (its error is in the log, not here).
    #[error("the SMS could not be sent; try again later or use another factor")]
    SmsFailed,
    #[error("the request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request target exceeds the limit of {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("the request headers exceed the limit of {limit} {unit}")]
    HeadersTooLarge { limit: usize, unit: &'static str },
    #[error("the upstream is unavailable")]
    UpstreamUnavailable { source: Option<BoxError> },
    /// The upstream answered something that cannot be passed on (a `101` nobody asked for).
    #[error("the upstream's answer could not be passed on")]
    UpstreamProtocol(&'static str),
    #[error("the upstream did not answer within {}ms", timeout.as_millis())]
    UpstreamTimeout { timeout: Duration },
    /// A bug: the stack was assembled wrongly. Logged, answered with 500.
    #[error("internal error")]
    Internal(&'static str),
}

impl Refusal {
    /// Status and stable `code`.
    pub fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            Refusal::BadRequest(_)
            | Refusal::BadPath(_)
            | Refusal::BadHost(_)
            | Refusal::LookAlikeHeader(_)
            | Refusal::UnderscoreHeader(_)
            | Refusal::ConnectionNamesProtected(_)
            | Refusal::BadFraming(_)
            | Refusal::BadBody => (StatusCode::BAD_REQUEST, "bad_request"),
            Refusal::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            Refusal::ApiKeyMissing => (StatusCode::UNAUTHORIZED, "api_key_missing"),
            Refusal::ApiKeyInvalid => (StatusCode::UNAUTHORIZED, "api_key_invalid"),
            Refusal::OtpRequired | Refusal::ChangeOtpRequired { .. } => {
                (StatusCode::UNAUTHORIZED, "otp_required")
            }
            Refusal::OtpInvalid { .. } | Refusal::ChangeOtpInvalid { .. } => {
                (StatusCode::UNAUTHORIZED, "otp_invalid")
            }
            Refusal::StepUpInvalid { .. } => (StatusCode::UNAUTHORIZED, "step_up_invalid"),
            Refusal::StepUpTooOld { .. } => (StatusCode::UNAUTHORIZED, "step_up_too_old"),
            Refusal::EnrollmentRequired { .. } => (StatusCode::FORBIDDEN, "enrollment_required"),
            Refusal::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            Refusal::ApprovalRequired { .. } => (StatusCode::UNAUTHORIZED, "approval_required"),
            Refusal::ApprovalPending { .. } => (StatusCode::UNAUTHORIZED, "approval_pending"),
            Refusal::ApprovalDenied => (StatusCode::FORBIDDEN, "approval_denied"),
            Refusal::ApprovalMismatch { .. } => (StatusCode::UNAUTHORIZED, "approval_mismatch"),
            Refusal::ApprovalInvalid { .. } => (StatusCode::UNAUTHORIZED, "approval_invalid"),
            Refusal::TooManyApprovals { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_approvals")
            }
            Refusal::UnknownApproval => (StatusCode::NOT_FOUND, "approval_unknown"),
            Refusal::NotApprover(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Refusal::TooManyAttempts { .. } | Refusal::SendLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts")
            }
            Refusal::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Refusal::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Refusal::SmsNotEnrolled => (StatusCode::CONFLICT, "sms_not_enrolled"),
            Refusal::SmsNotConfigured => (StatusCode::NOT_FOUND, "sms_not_configured"),
            Refusal::SmsFailed => (StatusCode::BAD_GATEWAY, "sms_failed"),
            Refusal::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Refusal::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, "too_large"),
            Refusal::HeadersTooLarge { .. } => {
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "too_large")
            }
            Refusal::UpstreamUnavailable { .. } | Refusal::UpstreamProtocol(_) => {
                (StatusCode::BAD_GATEWAY, "upstream_unavailable")
            }
            Refusal::UpstreamTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Refusal::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl Refusal {
    /// The `WWW-Authenticate` challenge that goes with a 401; the OTP one names the factors
    /// the route's policy accepts (`route_methods`).
    fn challenge(&self, route_methods: Option<&str>) -> Option<HeaderValue> {
        let challenge = |error: &str, methods: &str| {
            HeaderValue::from_str(&format!(
                r#"OTP realm="stepgate", error="{error}", methods="{methods}""#
            ))
            .ok()
        };
        let otp = |error: &str| {
            let methods = route_methods.unwrap_or("totp recovery_code");
            challenge(error, methods)
        };
        match self {
            Refusal::ApiKeyMissing | Refusal::ApiKeyInvalid => {
                Some(HeaderValue::from_static(r#"ApiKey realm="stepgate""#))
            }
            Refusal::OtpRequired => otp("otp_required"),
            Refusal::ApprovalRequired { .. } => otp("approval_required"),
            Refusal::OtpInvalid { .. } => otp("otp_invalid"),
            Refusal::StepUpInvalid { .. } => otp("step_up_invalid"),
            // RFC 9470's vocabulary: the authentication is too old for this resource.
            Refusal::StepUpTooOld { max_age } => HeaderValue::from_str(&format!(
                r#"OTP realm="stepgate", error="insufficient_user_authentication", max_age={max_age}, methods="{}""#,
                route_methods.unwrap_or("totp recovery_code")
            ))
            .ok(),
            // A change names the factors that prove it on this account, not the route's.
            Refusal::ChangeOtpRequired { needs } => {
                challenge("otp_required", needs.challenge_methods())
            }
            Refusal::ChangeOtpInvalid { needs, .. } => {
                challenge("otp_invalid", needs.challenge_methods())
            }
            _ => None,
        }
    }

    /// A failed credential attempt the failure limiter counts: `Some(None)` for one that
    /// identifies no consumer (an unknown key), `Some(Some(by))` for a wrong code or token.
    pub fn failed_attempt(&self) -> Option<Option<&Attempt>> {
        match self {
            Refusal::ApiKeyInvalid => Some(None),
            Refusal::OtpInvalid { by }
            | Refusal::StepUpInvalid { by }
            | Refusal::ApprovalMismatch { by }
            | Refusal::ApprovalInvalid { by }
            | Refusal::ChangeOtpInvalid { by, .. } => Some(Some(by)),
            _ => None,
        }
    }
}

/// Who made a failed attempt with a valid key: what the failure limiter counts it against
/// and audits it as.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub consumer_id: Arc<str>,
    pub consumer_name: Arc<str>,
    pub key_prefix: Arc<str>,
}

/// A refusal with what the outermost layer knows of the request: the OTP challenge of the
/// route's policy.
#[derive(Debug)]
pub struct Refused {
    pub refusal: Refusal,
    /// `methods="…"` of the route policy's `WWW-Authenticate: OTP` challenge.
    pub challenge_methods: Option<Arc<str>>,
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Self {
            refusal,
            challenge_methods: None,
        }
    }
}

/// Marks a response the gateway generated itself, with its problem `code` and the HTTP status
/// it stands for (the response's own, except for a gRPC refusal: see [`grpc_problem`]).
#[derive(Debug, Clone, Copy)]
pub struct ProblemCode {
    pub code: &'static str,
    pub status: StatusCode,
}

/// The one rescue: a refusal as an `application/problem+json` response.
pub fn problem(refused: Refused, request_id: Option<&HeaderValue>) -> Response<Body> {
    let Refused {
        refusal,
        challenge_methods,
    } = refused;
    let (status, code) = refusal.status_code();
    if let Refusal::Internal(what) = &refusal {
        tracing::error!(what, "internal error");
    }
    let mut response = problem_response(
        status,
        code,
        &refusal.to_string(),
        request_id.and_then(|v| v.to_str().ok()),
    );
    if let Refusal::ApprovalRequired {
        id,
        page,
        status: status_url,
        expires_at,
    } = &refusal
    {
        // Members beside the problem's own (RFC 9457 §3.2), so a client needs no parsing of
        // the detail: the id to repeat with, and where to look.
        let mut body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "code": code,
            "detail": refusal.to_string(),
            "approval_id": id,
            "approval_url": page,
            "status_url": status_url,
            "expires_at": crate::clock::rfc3339(*expires_at),
        });
        if let (Some(id), serde_json::Value::Object(map)) =
            (request_id.and_then(|v| v.to_str().ok()), &mut body)
        {
            map.insert("request_id".into(), id.into());
        }
        *response.body_mut() = full_body(body.to_string());
    }
    if let Some(challenge) = refusal.challenge(challenge_methods.as_deref()) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
    }
    if let Refusal::TooManyAttempts { retry_after }
    | Refusal::SendLimited { retry_after }
    | Refusal::TooManyApprovals { retry_after } = refusal
    {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
    }
    if let Refusal::BadFraming(_) | Refusal::BadBody = refusal {
        // The rest of the connection's bytes cannot be framed: nothing more is read from it.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// An `application/problem+json` response (also used by the admin API).
pub fn problem_response(
    status: StatusCode,
    code: &'static str,
    detail: &str,
    request_id: Option<&str>,
) -> Response<Body> {
    // Serialised from a struct, not built as a `serde_json::Value` tree: refusals are what a
    // flood gets, so they should cost as little as an answer can. Members in name order.
    #[derive(serde::Serialize)]
    struct Problem<'a> {
        code: &'a str,
        detail: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
        status: u16,
        title: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
    }
    let mut body = Vec::with_capacity(256);
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(
        &mut body,
        &Problem {
            code,
            detail,
            request_id,
            status: status.as_u16(),
            title: status.canonical_reason().unwrap_or("Error"),
            kind: "about:blank",
        },
    );
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
        .extensions_mut()
        .insert(ProblemCode { code, status });
    response
}

/// Whether a request is gRPC (or gRPC-Web), whose clients read refusals only in gRPC's terms.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A refusal of a gRPC request, in gRPC's terms: a "Trailers-Only" answer (HTTP 200 whose
/// head carries `grpc-status` and `grpc-message` and ends the stream), which is all a gRPC
/// client reads. `grpc-message` is the problem code, a colon and the detail; the headers that
/// help (`WWW-Authenticate`, `Retry-After`, `X-Request-Id`) stay.
pub fn grpc_problem(refused: Refused, request_id: Option<&HeaderValue>) -> Response<Body> {
    let detail = refused.refusal.to_string();
    let mut response = problem(refused, request_id);
    let (code, status) = response
        .extensions()
        .get::<ProblemCode>()
        .map_or(("internal", StatusCode::INTERNAL_SERVER_ERROR), |p| {
            (p.code, p.status)
        });
    let message = format!("{code}: {detail}");
    let message = percent_encoding::utf8_percent_encode(&message, GRPC_MESSAGE).to_string();
    *response.status_mut() = StatusCode::OK;
    *response.body_mut() = full_body(Bytes::new());
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(grpc_status(status, code)));
    if let Ok(message) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", message);
    }
    response
}

/// `grpc-message` is percent-encoded: everything but printable ASCII, and `%` itself.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// The gRPC status code of a refusal (the codes of grpc/doc/statuscodes.md).
fn grpc_status(status: StatusCode, code: &str) -> u16 {
    match (status.as_u16(), code) {
        (401, _) => 16,                  // UNAUTHENTICATED
        (403, _) => 7,                   // PERMISSION_DENIED
        (429 | 413 | 414 | 431, _) => 8, // RESOURCE_EXHAUSTED
        (404, "no_route") => 12,         // UNIMPLEMENTED: no such method here
        (404 | 409, _) => 9,             // FAILED_PRECONDITION
        (400, _) => 3,                   // INVALID_ARGUMENT
        (502 | 503, _) => 14,            // UNAVAILABLE
        (504, _) => 4,                   // DEADLINE_EXCEEDED
        _ => 13,                         // INTERNAL
    }
}
