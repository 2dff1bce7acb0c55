//! Admin API routes (DESIGN.md §6): request parsing, accounts calls, JSON answers.

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{Admin, problem};
use crate::accounts::AccountError;
use crate::clock::parse_rfc3339;
use crate::credentials::totp::{TotpAlgorithm, TotpParams};
use crate::error::{Body, full_body};
use crate::reload::Outcome;

const MAX_BODY: usize = 64 * 1024;

pub async fn route(admin: &Admin, request: Request<Incoming>) -> Response<Body> {
    match dispatch(admin, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// Why a call failed, mapped to one status and code each.
enum Failure {
    BadRequest(String),
    NotFound(String),
    Forbidden(String),
    Conflict(String),
    Unavailable(String),
    Accounts(AccountError),
}

impl From<AccountError> for Failure {
    fn from(e: AccountError) -> Self {
        Failure::Accounts(e)
    }
}

impl Failure {
    fn into_response(self) -> Response<Body> {
        let (status, code, detail) = match self {
            Failure::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad_request", d),
            Failure::NotFound(d) => (StatusCode::NOT_FOUND, "not_found", d),
            Failure::Forbidden(d) => (StatusCode::FORBIDDEN, "forbidden", d),
            Failure::Conflict(d) => (StatusCode::CONFLICT, "conflict", d),
            Failure::Unavailable(d) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", d),
            Failure::Accounts(e) => {
                let detail = e.to_string();
                match e {
                    AccountError::NotFound(_) | AccountError::NotFoundOther(_) => {
                        (StatusCode::NOT_FOUND, "not_found", detail)
                    }
                    // An expired pending enrolment, or one started on a weaker account.
                    AccountError::Conflict(_)
                    | AccountError::PendingGone(_)
                    | AccountError::Disabled => (StatusCode::CONFLICT, "conflict", detail),
                    AccountError::Invalid(_)
                    | AccountError::CodeInvalid
                    | AccountError::Unproved(_) => (StatusCode::BAD_REQUEST, "bad_request", detail),
                    AccountError::Store(_) | AccountError::WrongMasterKey => {
                        tracing::error!(error = %detail, "admin call failed in the store");
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "unavailable",
                            "the store is unavailable".to_owned(),
                        )
                    }
                }
            }
        };
        problem(status, code, &detail)
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full_body(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

fn no_content() -> Response<Body> {
    let mut response = Response::new(full_body(""));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// The answer to a reload: the configuration in force, and whether this reload changed it.
fn reloaded(status: &crate::reload::Status, changed: bool) -> Response<Body> {
    let mut answer = to_value(status);
    answer["changed"] = json!(changed);
    json_response(StatusCode::OK, &answer)
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

async fn read_json<T: DeserializeOwned>(
    request: Request<Incoming>,
    empty_ok: bool,
) -> Result<T, Failure> {
    let bytes = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            Failure::BadRequest(format!("the body must be JSON of at most {MAX_BODY} bytes"))
        })?
        .to_bytes();
    let bytes: &[u8] = if bytes.is_empty() && empty_ok {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| Failure::BadRequest(format!("malformed JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConsumer {
    name: String,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerPatch {
    roles: Option<Vec<String>>,
    disabled: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TotpRequest {
    digits: Option<u8>,
    period: Option<u64>,
    algorithm: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Code {
    code: String,
}

async fn dispatch(admin: &Admin, request: Request<Incoming>) -> Result<Response<Body>, Failure> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let segments: Vec<String> = path
        .split('/')
        .skip(1)
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let accounts = &admin.accounts;

    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        (&Method::GET, ["readyz"]) => {
            let store = accounts.store();
            match store.ping().await {
                Err(e) => Err(Failure::Unavailable(format!("store: {e}"))),
                Ok(()) if store.freshness().is_stale() => Err(Failure::Unavailable(
                    "store: out of touch with its announcements (a revocation could be missed); \
                     resyncing"
                        .into(),
                )),
                Ok(()) => Ok(json_response(StatusCode::OK, &json!({"status": "ready"}))),
            }
        }
        (&Method::GET, ["metrics"]) => {
            admin
                .metrics
                .bans_active
                .set(i64::try_from(admin.limiter.active_bans()).unwrap_or(i64::MAX));
            admin
                .metrics
                .step_up_live
                .set(i64::try_from(accounts.tokens().held()).unwrap_or(i64::MAX));
            let store = accounts.store();
            admin
                .metrics
                .store_up
                .set(i64::from(store.ping().await.is_ok()));
            admin
                .metrics
                .store_stale
                .set(i64::from(store.freshness().is_stale()));
            let mut response = Response::new(full_body(admin.metrics.encode()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
        (&Method::GET, ["config"]) => Ok(json_response(
            StatusCode::OK,
            &to_value(&admin.reloader.status()),
        )),
        (&Method::POST, ["reload"]) => match admin.reloader.reload("admin").await {
            Outcome::Applied(status) => Ok(reloaded(&status, true)),
            Outcome::Unchanged(status) => Ok(reloaded(&status, false)),
            Outcome::Rejected(errors) => {
                let lines: Vec<String> = errors.errors().iter().map(ToString::to_string).collect();
                let mut response = problem(
                    StatusCode::BAD_REQUEST,
                    "invalid_config",
                    "the new configuration is invalid; the previous one keeps serving",
                );
                let body = json!({
                    "type": "about:blank",
                    "title": "Bad Request",
                    "status": 400,
                    "code": "invalid_config",
                    "detail": "the new configuration is invalid; the previous one keeps serving",
                    "errors": lines,
                });
                *response.body_mut() = full_body(body.to_string());
                Ok(response)
            }
        },
        (&Method::POST, ["consumers"]) => {
            let body: NewConsumer = read_json(request, false).await?;
            let (view, api_key) = accounts.create_consumer(&body.name, body.roles).await?;
            let prefix = view.keys.first().map(|k| k.prefix.clone());
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"id": view.id, "name": view.name, "roles": view.roles, "api_key": api_key, "prefix": prefix}),
            ))
        }
        (&Method::GET, ["consumers"]) => Ok(json_response(
            StatusCode::OK,
            &json!({"consumers": to_value(&accounts.list_consumers())}),
        )),
        (&Method::GET, ["consumers", name]) => Ok(json_response(
            StatusCode::OK,
            &to_value(&accounts.consumer_view(name)?),
        )),
        (&Method::PATCH, ["consumers", name]) => {
            let name = (*name).to_owned();
            let patch: ConsumerPatch = read_json(request, false).await?;
            let view = accounts
                .update_consumer(&name, patch.roles, patch.disabled)
                .await?;
            Ok(json_response(StatusCode::OK, &to_value(&view)))
        }
        (&Method::DELETE, ["consumers", name]) => {
            accounts.delete_consumer(name).await?;
            Ok(no_content())
        }
        (&Method::POST, ["consumers", name, "keys"]) => {
            let issued = accounts.issue_key(name).await?;
            Ok(json_response(StatusCode::CREATED, &to_value(&issued)))
        }
        (&Method::DELETE, ["consumers", name, "keys", prefix]) => {
            accounts.revoke_key(name, prefix).await?;
            Ok(no_content())
        }
        (&Method::POST, ["consumers", name, "totp"]) => {
            let name = (*name).to_owned();
            let body: TotpRequest = read_json(request, true).await?;
            let defaults = TotpParams::default();
            let algorithm = match body.algorithm.as_deref() {
                None => defaults.algorithm,
                Some(text) => TotpAlgorithm::parse(text).ok_or_else(|| {
                    Failure::BadRequest("algorithm must be SHA1, SHA256 or SHA512".into())
                })?,
            };
            let params = TotpParams {
                algorithm,
                digits: body.digits.unwrap_or(defaults.digits),
                period: body.period.unwrap_or(defaults.period),
            };
            let enrolment = accounts.begin_totp(&name, params).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({
                    "secret": enrolment.secret_base32,
                    "otpauth_uri": enrolment.otpauth_uri,
                    "qr_svg": enrolment.qr_svg,
                }),
            ))
        }
        (&Method::POST, ["consumers", name, "totp", "confirm"]) => {
            let name = (*name).to_owned();
            let body: Code = read_json(request, false).await?;
            let confirmed = accounts.confirm_totp(&name, body.code.trim()).await?;
            Ok(json_response(
                StatusCode::OK,
                &confirmed.answer(accounts.now()),
            ))
        }
        (&Method::DELETE, ["consumers", name, "totp"]) => {
            accounts.reset_totp(name).await?;
            Ok(no_content())
        }
        (&Method::DELETE, ["consumers", name, "sms"]) => {
            accounts.remove_sms(name, None).await?;
            Ok(no_content())
        }
        (&Method::GET, ["reports", "enrollment"]) => {
            let snapshot = admin.config.load_full();
            let now = accounts.now();
            let entries = crate::enrollment::report(&snapshot, &accounts.directory().all(), now);
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "generated_at": crate::clock::rfc3339(now),
                    "entries": to_value(&entries),
                }),
            ))
        }
        (&Method::POST, ["consumers", name, "recovery-codes"]) => {
            let codes = accounts.regenerate_recovery_codes(name).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"recovery_codes": codes}),
            ))
        }
        (&Method::POST, ["consumers", name, "unlock"]) => {
            let view = accounts.consumer_view(name)?;
            let subject = crate::limiter::Subject::Consumer(view.id.as_str().into());
            let was_banned = admin.limiter.unlock(&subject).await;
            if let Some(consumer) = accounts.directory().get(name) {
                accounts.audit_log().event(
                    "unlocked",
                    Some(consumer.who()),
                    None,
                    json!({"was_banned": was_banned}),
                );
            }
            Ok(no_content())
        }
        (&Method::GET, ["bans"]) => {
            let directory = accounts.directory();
            let bans: Vec<serde_json::Value> = admin
                .limiter
                .bans()
                .await
                .into_iter()
                .map(|(subject, ban)| {
                    let (kind, value, consumer) = match &subject {
                        crate::limiter::Subject::Consumer(id) => {
                            ("consumer", id.to_string(), directory.name_of(id))
                        }
                        crate::limiter::Subject::Ip(ip) => ("ip", ip.to_string(), None),
                    };
                    json!({
                        "kind": kind,
                        "subject": value,
                        "consumer": consumer,
                        "started": crate::clock::rfc3339(ban.started),
                        "until": crate::clock::rfc3339(ban.until),
                    })
                })
                .collect();
            Ok(json_response(StatusCode::OK, &json!({"bans": bans})))
        }
        (&Method::GET, ["approvals"]) => {
            let pending = admin
                .approvals
                .pending_for(None)
                .await
                .map_err(|e| Failure::Unavailable(e.to_string()))?;
            let pending: Vec<Value> = pending
                .iter()
                .map(|a| crate::approvals::view(a, &crate::approvals::State::Pending))
                .collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"approvals": pending}),
            ))
        }
        (&Method::POST, ["approvals", id, decision @ ("approve" | "deny")]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Decision {
                approver: String,
                #[serde(default)]
                code: Option<String>,
            }
            let approve = *decision == "approve";
            let body: Decision = read_json(request, false).await?;
            let approver = accounts
                .directory()
                .get(&body.approver)
                .ok_or_else(|| Failure::NotFound(format!("no consumer `{}`", body.approver)))?;
            // An approval is the approver's own: their code, checked like any (a denial
            // needs none: it lets nothing through).
            if approve {
                let needs = approver.assurance();
                if needs == crate::credentials::assurance::Assurance::KeyOnly {
                    return Err(Failure::Conflict(format!(
                        "`{}` has no second factor to approve with",
                        approver.name
                    )));
                }
                let code = body.code.as_deref().ok_or_else(|| {
                    Failure::BadRequest("approving needs the approver's `code`".into())
                })?;
                if accounts
                    .verify_code(&approver, needs.proofs(), code, accounts.now())
                    .await
                    .is_err()
                {
                    accounts.audit_log().event(
                        "otp_rejected",
                        Some(approver.who()),
                        None,
                        json!({"endpoint": "admin approvals"}),
                    );
                    return Err(Failure::BadRequest(
                        "the approver's code is not valid".into(),
                    ));
                }
            }
            let who = crate::approvals::Approver {
                id: &approver.id,
                name: &approver.name,
                roles: &approver.roles,
            };
            let approval = admin
                .approvals
                .decide(id, who, approve)
                .await
                .map_err(|e| match e {
                    crate::approvals::DecideError::NotFound => Failure::NotFound(e.to_string()),
                    crate::approvals::DecideError::Decided(_) => Failure::Conflict(e.to_string()),
                    crate::approvals::DecideError::Unavailable => {
                        Failure::Unavailable(e.to_string())
                    }
                    _ => Failure::Forbidden(e.to_string()),
                })?;
            let mut answer = crate::approvals::view(&approval, &crate::approvals::State::Pending);
            answer["state"] = json!(if approve { "approved" } else { "denied" });
            Ok(json_response(StatusCode::OK, &answer))
        }
        (&Method::DELETE, ["consumers", name, "step-up-tokens"]) => {
            accounts.revoke_step_up_tokens(name).await?;
            Ok(no_content())
        }
        (&Method::GET, ["audit"]) => {
            let mut consumer = None;
            let mut since = None;
            let mut limit = 100usize;
            for (key, value) in query_pairs(request.uri().query()) {
                match key.as_str() {
                    "consumer" if !value.is_empty() => consumer = Some(value),
                    "since" if !value.is_empty() => {
                        since = Some(
                            value
                                .parse::<u64>()
                                .ok()
                                .or_else(|| parse_rfc3339(&value))
                                .ok_or_else(|| {
                                    Failure::BadRequest(
                                        "since must be RFC 3339 or Unix seconds".into(),
                                    )
                                })?,
                        );
                    }
                    "limit" => {
                        limit = value
                            .parse::<usize>()
                            .ok()
                            .filter(|l| (1..=1000).contains(l))
                            .ok_or_else(|| Failure::BadRequest("limit must be 1 to 1000".into()))?;
                    }
                    _ => {}
                }
            }
            let events = accounts.audit(consumer.as_deref(), since, limit).await?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"events": to_value(&events)}),
            ))
        }
        _ => Err(Failure::NotFound(format!(
            "no admin endpoint {method} {path}"
        ))),
    }
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}
