//! The second factor (DESIGN.md §3): on a route whose policy requires one, a valid step-up
//! token, else a code in `X-OTP` (TOTP with the consumer's parameters, or a recovery code).
//! A code earns a step-up token when the policy's `step_up.ttl` is not zero. Both headers are
//! removed before forwarding on every route, so no upstream ever sees them.
//!
//! Consumers without a confirmed factor pass during the policy's grace period (with an
//! `X-Stepgate-Warning`), and get 403 `enrollment_required` after it. Under `report_only`
//! rollout every refusal of this layer is audited and the request forwarded instead.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::{CACHE_CONTROL, HeaderValue};
use http::{Request, Response};
use serde_json::json;
use tower::{Layer, Service};

use super::api_key::{X_STEPGATE_AUTH, single_value};
use super::failures::SecondFactorPassed;
use crate::accounts::{Accounts, CodeFailure};
use crate::client_headers::Credentials;
use crate::clock::rfc3339;
use crate::config::{Policy, RolloutMode};
use crate::context::Context as RequestContext;
use crate::directory::KeyEntry;
use crate::error::{Body, Refusal};
use crate::metrics::Metrics;
use crate::tokens::{NewToken, TokenInfo, TokenRejection};

pub use crate::header_names::{
    X_APPROVAL, X_OTP, X_STEP_UP_EXPIRES, X_STEP_UP_TOKEN, X_STEPGATE_AUTH_TIME, X_STEPGATE_WARNING,
};

#[derive(Clone)]
pub struct SecondFactorLayer {
    accounts: Arc<Accounts>,
    metrics: Arc<Metrics>,
}

impl SecondFactorLayer {
    pub fn new(accounts: Arc<Accounts>, metrics: Arc<Metrics>) -> Self {
        Self { accounts, metrics }
    }
}

impl<S> Layer<S> for SecondFactorLayer {
    type Service = SecondFactor<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SecondFactor {
            accounts: self.accounts.clone(),
            metrics: self.metrics.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct SecondFactor<S> {
    accounts: Arc<Accounts>,
    metrics: Arc<Metrics>,
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Refusal>> + Send>>;

impl<S, B> Service<Request<B>> for SecondFactor<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Refusal> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Refusal;
    type Future = Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let (route, entry, facts) = match RequestContext::of(&request) {
            Ok(context) => (
                context.route.clone(),
                context.entry.clone(),
                Facts {
                    websocket: context.websocket,
                    client: context.client.map_or(context.conn.peer.ip(), |c| c.ip),
                    credentials: context.credentials,
                },
            ),
            Err(_) => (
                None,
                None,
                Facts {
                    websocket: false,
                    client: IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
                    credentials: Credentials::UNKNOWN,
                },
            ),
        };
        let Facts {
            websocket,
            client,
            credentials,
        } = facts;
        let (route, entry) = match (route, entry) {
            (Some(route), Some(entry)) if route.policy.second_factor_for(request.method()) => {
                (route, entry)
            }
            _ => {
                // No second factor on this route: codes and tokens are ignored, and dropped
                // (those the request carries: looking up an absent one costs a hash).
                let headers = request.headers_mut();
                if credentials.otp() {
                    headers.remove(&X_OTP);
                }
                if credentials.step_up_token() {
                    headers.remove(&X_STEP_UP_TOKEN);
                }
                if credentials.approval() {
                    headers.remove(&X_APPROVAL);
                }
                return Either::Left(self.inner.call(request));
            }
        };
        // The common case, a valid step-up token, is decided here without waiting for
        // anything; everything else (codes, refusals, grace) takes the full path below. A
        // token does not reset the consumer's failure count (no `SecondFactorPassed`): it was
        // earned with a code earlier, and a client reusing it many times a second would
        // otherwise keep wiping the count of someone guessing codes with a stolen key.
        if valid_step_up(
            &self.accounts,
            &self.metrics,
            &route.policy,
            &entry,
            facts,
            &mut request,
        ) {
            return Either::Left(self.inner.call(request));
        }
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let accounts = self.accounts.clone();
        let metrics = self.metrics.clone();
        Either::Right(Box::pin(async move {
            let decision = decide(
                &accounts,
                &metrics,
                &route.policy,
                &entry,
                client,
                &mut request,
            )
            .await?;
            let (auth, auth_time) = match &decision {
                Decision::Token { auth_time, .. } => ("key+step_up", Some(*auth_time)),
                Decision::Proved { method, .. } => (*method, Some(accounts.now())),
                Decision::Unproved { .. } => ("key", None),
                Decision::Approval { .. } => ("key+approval", None),
            };
            if let Decision::Approval { claim } = &decision {
                // Settled by forwarding, which reads the body the approval is bound to.
                request.extensions_mut().insert(ApprovalCheck {
                    claim: claim.clone(),
                    rule: route.policy.clone(),
                    requester: entry.attempt.clone(),
                });
            }
            if let Some(auth_time) = auth_time {
                request
                    .headers_mut()
                    .insert(X_STEPGATE_AUTH_TIME.clone(), auth_time_header(auth_time));
            }
            if websocket {
                let token = match &decision {
                    Decision::Token {
                        token, expires_at, ..
                    }
                    | Decision::Proved {
                        token: Some((token, expires_at)),
                        ..
                    } => Some((token.clone(), *expires_at)),
                    _ => None,
                };
                if let Some((token, expires_at)) = token {
                    request.extensions_mut().insert(StepUpGrant {
                        token,
                        consumer_id: entry.consumer.shared_id.clone(),
                        policy: route.policy.shared_name.clone(),
                        expires_at,
                    });
                }
            }
            request
                .headers_mut()
                .insert(X_STEPGATE_AUTH.clone(), HeaderValue::from_static(auth));
            if let Decision::Proved {
                token: Some((token, expires_at)),
                ..
            } = &decision
            {
                request.extensions_mut().insert(IssuedToken {
                    token: token.clone(),
                    expires_at: *expires_at,
                });
            }
            let mut response = inner.call(request).await?;
            match decision {
                Decision::Proved { token, .. } => {
                    response.extensions_mut().insert(SecondFactorPassed {
                        consumer_id: entry.consumer.shared_id.clone(),
                    });
                    if let Some((token, expires_at)) = token {
                        let headers = response.headers_mut();
                        if let (Ok(token), Ok(expires)) = (
                            HeaderValue::from_str(&token),
                            HeaderValue::from_str(&rfc3339(expires_at)),
                        ) {
                            let mut token = token;
                            token.set_sensitive(true);
                            headers.insert(X_STEP_UP_TOKEN.clone(), token);
                            headers.insert(X_STEP_UP_EXPIRES.clone(), expires);
                            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                        }
                    }
                }
                Decision::Unproved {
                    warning: Some(warning),
                } => {
                    response
                        .headers_mut()
                        .insert(X_STEPGATE_WARNING.clone(), warning);
                }
                Decision::Token { .. }
                | Decision::Unproved { warning: None }
                | Decision::Approval { .. } => {}
            }
            Ok(response)
        }))
    }
}

/// True, with the request made ready to forward, when the request carries a valid step-up
/// token for an enrolled consumer, unambiguously: what [`decide`] would conclude, without the
/// boxed future it needs for codes. False leaves the request untouched for [`decide`].
fn valid_step_up<B>(
    accounts: &Accounts,
    metrics: &Metrics,
    policy: &Policy,
    entry: &KeyEntry,
    facts: Facts,
    request: &mut Request<B>,
) -> bool {
    let Facts {
        websocket,
        client,
        credentials,
    } = facts;
    // An X-Approval beside a token: the long way removes it before forwarding.
    if !credentials.step_up_token() || credentials.approval() {
        return false;
    }
    let headers = request.headers();
    let Ok(Some(token)) = single_value(headers, &X_STEP_UP_TOKEN, "") else {
        return false;
    };
    // A malformed or repeated X-OTP is a 400 even beside a good token: leave that to decide.
    let has_code = credentials.otp() && {
        let Ok(code) = single_value(headers, &X_OTP, "") else {
            return false;
        };
        code.is_some()
    };
    if !entry.consumer.enrolled_for(policy.factors) {
        return false;
    }
    let consumer = &entry.consumer;
    // Only a verdict this node has at hand: anything else goes the long way.
    let now = accounts.now();
    let Some(Ok(info)) = accounts
        .tokens()
        .check_cached(token, &consumer.id, &policy.name, now)
    else {
        return false;
    };
    // Counted in uses, too old or from elsewhere for this policy: the long way spends the
    // use, or says why not.
    if info.uses.is_some() || fits(policy, &info, client, now).is_err() {
        return false;
    }
    if websocket {
        let grant = StepUpGrant {
            token: token.to_owned(),
            consumer_id: consumer.shared_id.clone(),
            policy: policy.shared_name.clone(),
            expires_at: info.expires_at,
        };
        request.extensions_mut().insert(grant);
    }
    metrics.factor("step_up", "accepted");
    let headers = request.headers_mut();
    if has_code {
        headers.remove(&X_OTP);
    }
    headers.remove(&X_STEP_UP_TOKEN);
    headers.insert(
        X_STEPGATE_AUTH.clone(),
        HeaderValue::from_static("key+step_up"),
    );
    headers.insert(
        X_STEPGATE_AUTH_TIME.clone(),
        auth_time_header(info.auth_time),
    );
    true
}

/// What the request's context says that the second factor needs.
#[derive(Clone, Copy)]
struct Facts {
    /// A WebSocket upgrade: its tunnel lives by the token it passed with.
    websocket: bool,
    client: IpAddr,
    /// The credential headers present.
    credentials: Credentials,
}

/// Whether a token the store accepted does for this policy, from this client, now: its code
/// recent enough (`step_up.max_age`), and presented from where it was earned (`bind`).
fn fits(policy: &Policy, info: &TokenInfo, client: IpAddr, now: u64) -> Result<(), TokenRejection> {
    if let Some(max_age) = policy.step_up.max_age
        && now.saturating_sub(info.auth_time) > max_age.as_secs()
    {
        return Err(TokenRejection::TooOld);
    }
    match policy.step_up.bind {
        Some(bind) if !bind.holds(info.earned_from, client) => Err(TokenRejection::OtherAddress),
        _ => Ok(()),
    }
}

/// `X-Stepgate-Auth-Time` of a time, formatted once per thread for a run of requests with the
/// same one (a token's requests).
fn auth_time_header(time: u64) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u64, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((at, value)) = last.as_ref()
            && *at == time
        {
            return value.clone();
        }
        let value = HeaderValue::from_str(&rfc3339(time))
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        *last = Some((time, value.clone()));
        value
    })
}

/// The step-up token a WebSocket upgrade passed with, presented or just earned by its code:
/// the tunnel it opens lives no longer than the token (`on_token_expiry: close`), so it is
/// kept for upgrade requests only. Never printed.
#[derive(Clone)]
pub struct StepUpGrant {
    pub token: String,
    pub consumer_id: Arc<str>,
    /// The route's policy, which the token is checked against again while the tunnel lives.
    pub policy: Arc<str>,
    pub expires_at: u64,
}

impl std::fmt::Debug for StepUpGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepUpGrant")
            .field("consumer_id", &self.consumer_id)
            .field("policy", &self.policy)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A request on its way through a person's approval (see [`crate::approvals`]), settled by
/// forwarding once the body it is bound to has been read.
#[derive(Clone)]
pub struct ApprovalCheck {
    /// `X-Approval`: the approved request this one repeats; `None`: ask for an approval.
    pub claim: Option<String>,
    /// The route's policy (its `approval` rule).
    pub rule: Arc<Policy>,
    pub requester: crate::error::Attempt,
}

/// A step-up token issued for this request (read by the built-in step-up endpoint).
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: u64,
}

enum Decision {
    /// A valid step-up token, and when it expires: a second factor proved earlier (the
    /// failure count stays).
    Token {
        token: String,
        expires_at: u64,
        /// When the token's code was presented.
        auth_time: u64,
    },
    /// A code proved a second factor; `token` is a newly issued step-up token.
    Proved {
        method: &'static str,
        token: Option<(String, u64)>,
    },
    /// Passed without one: grace period (with a warning) or report-only rollout.
    Unproved { warning: Option<HeaderValue> },
    /// No code, on a policy a person's approval satisfies: the repeat of an approved request
    /// (`claim`, its id), or a request to be approved. Forwarding settles it.
    Approval { claim: Option<String> },
}

async fn decide<B>(
    accounts: &Accounts,
    metrics: &Metrics,
    policy: &Policy,
    entry: &Arc<KeyEntry>,
    client: IpAddr,
    request: &mut Request<B>,
) -> Result<Decision, Refusal> {
    let headers = request.headers_mut();
    let token = single_value(
        headers,
        &X_STEP_UP_TOKEN,
        "exactly one X-Step-Up-Token header of visible ASCII is allowed",
    )?
    .map(str::to_owned);
    let code = single_value(
        headers,
        &X_OTP,
        "exactly one X-OTP header of visible ASCII is allowed",
    )?
    .map(str::to_owned);
    let approval = single_value(
        headers,
        &X_APPROVAL,
        "exactly one X-Approval header of visible ASCII is allowed",
    )?
    .map(str::to_owned);
    headers.remove(&X_OTP);
    headers.remove(&X_STEP_UP_TOKEN);
    headers.remove(&X_APPROVAL);

    let consumer = &entry.consumer;
    let now = accounts.now();
    let audit = |kind: &str, detail: serde_json::Value| {
        accounts
            .audit_log()
            .event(kind, Some(consumer.who()), Some(&entry.prefix), detail);
    };

    // A person's approval stands in for the caller's code: a caller without a factor of its
    // own (a deploy bot) needs none.
    let by_approval = policy.approval.is_some() && code.is_none();
    let outcome = if !consumer.enrolled_for(policy.factors) && !by_approval {
        match policy.rollout.grace_until {
            Some(until) if now < until => {
                metrics.factor("none", "grace");
                let warning = match crate::snapshot::Snapshot::of(request) {
                    Ok(snapshot) => crate::enrollment::grace_warning(&snapshot.self_service, until),
                    Err(_) => String::new(),
                };
                return Ok(Decision::Unproved {
                    warning: HeaderValue::from_str(&warning).ok(),
                });
            }
            _ => {
                metrics.factor("none", "not_enrolled");
                let page = crate::snapshot::Snapshot::of(request)
                    .ok()
                    .and_then(|snapshot| snapshot.self_service.page_path())
                    .map(Arc::from);
                Err(Refusal::EnrollmentRequired { page })
            }
        }
    } else {
        let presented = Presented {
            token: token.as_deref(),
            code: code.as_deref(),
            approval: approval.as_deref(),
            client,
        };
        prove(accounts, metrics, policy, entry, presented, now).await
    };

    let report_only = policy.rollout.mode == RolloutMode::ReportOnly;
    match outcome {
        // Under report_only a request for approval is not asked for: it would refuse the call.
        Ok(Decision::Approval { claim: None }) if report_only => {
            metrics.factor("none", "would_refuse");
            audit(
                "would_refuse",
                json!({"code": "approval_required", "policy": policy.name}),
            );
            Ok(Decision::Unproved { warning: None })
        }
        Ok(decision) => Ok(decision),
        Err(
            refusal @ (Refusal::OtpRequired
            | Refusal::OtpInvalid { .. }
            | Refusal::StepUpInvalid { .. }
            | Refusal::EnrollmentRequired { .. }),
        ) if report_only => {
            let (_, code) = refusal.status_code();
            metrics.factor("none", "would_refuse");
            audit("would_refuse", json!({"code": code, "policy": policy.name}));
            Ok(Decision::Unproved { warning: None })
        }
        Err(refusal) => Err(refusal),
    }
}

/// What a request presents for its second factor, and from where.
struct Presented<'a> {
    token: Option<&'a str>,
    code: Option<&'a str>,
    /// `X-Approval`: the id of an approved request this one repeats.
    approval: Option<&'a str>,
    client: IpAddr,
}

async fn prove(
    accounts: &Accounts,
    metrics: &Metrics,
    policy: &Policy,
    entry: &Arc<KeyEntry>,
    presented: Presented<'_>,
    now: u64,
) -> Result<Decision, Refusal> {
    let Presented {
        token,
        code,
        approval,
        client,
    } = presented;
    let consumer = &entry.consumer;
    let audit = |kind: &str, detail: serde_json::Value| {
        accounts
            .audit_log()
            .event(kind, Some(consumer.who()), Some(&entry.prefix), detail);
    };
    if let Some(token) = token {
        let tokens = accounts.tokens();
        // The store's verdict, then this policy's (age, address), then a use spent: a token
        // refused here keeps its uses.
        let verdict = match tokens.check(token, &consumer.id, &policy.name, now).await {
            Ok(info) => match fits(policy, &info, client, now) {
                Ok(()) => tokens.spend(token, &info).await.map(|()| info),
                Err(unfit) => Err(unfit),
            },
            Err(rejection) => Err(rejection),
        };
        match verdict {
            Ok(info) => {
                metrics.factor("step_up", "accepted");
                return Ok(Decision::Token {
                    token: token.to_owned(),
                    expires_at: info.expires_at,
                    auth_time: info.auth_time,
                });
            }
            Err(TokenRejection::TooOld) => {
                metrics.factor("step_up", "too_old");
                audit(
                    "step_up_rejected",
                    json!({"reason": "too_old", "policy": policy.name}),
                );
                // Not a failed attempt: the token is good, just not fresh enough here; a code
                // beside it decides.
                if code.is_none() {
                    let max_age = policy.step_up.max_age.map_or(0, |m| m.as_secs());
                    return Err(Refusal::StepUpTooOld { max_age });
                }
            }
            Err(TokenRejection::Unavailable) => {
                // Fail closed, and not as the caller's failure: the token may be good.
                tracing::error!("step-up token check failed closed: token store unavailable");
                return Err(Refusal::Unavailable);
            }
            Err(rejection) => {
                metrics.factor("step_up", "rejected");
                audit(
                    "step_up_rejected",
                    json!({"reason": rejection.as_str(), "policy": policy.name}),
                );
                if code.is_none() {
                    return Err(Refusal::StepUpInvalid {
                        by: entry.attempt.clone(),
                    });
                }
            }
        }
    }
    let Some(code) = code else {
        if policy.approval.is_some() {
            return Ok(Decision::Approval {
                claim: approval.map(str::to_owned),
            });
        }
        metrics.factor("none", "missing");
        return Err(Refusal::OtpRequired);
    };
    match accounts
        .verify_code(consumer, policy.factors, code, now)
        .await
    {
        Ok(factor) => {
            metrics.factor(factor.as_str(), "accepted");
            audit(
                "otp_accepted",
                json!({"factor": factor.as_str(), "policy": policy.name}),
            );
            if factor == crate::credentials::factors::Factor::RecoveryCode {
                audit("recovery_code_used", json!({"policy": policy.name}));
            }
            let token = if policy.step_up.ttl.is_zero() {
                None
            } else {
                let issued = accounts
                    .tokens()
                    .issue(
                        NewToken {
                            consumer_id: &consumer.shared_id,
                            policy: &policy.shared_name,
                            scope: policy.step_up.scope,
                            ttl: policy.step_up.ttl,
                            uses: policy.step_up.uses,
                            earned_from: client,
                        },
                        now,
                    )
                    .await
                    .unwrap_or_else(|error| {
                        // The code was good: the request goes on, just without a token.
                        tracing::warn!(%error, "a code was accepted but no step-up token could be issued");
                        None
                    });
                if let Some((_, expires_at)) = &issued {
                    metrics.step_up_issued.inc();
                    audit(
                        "step_up_issued",
                        json!({"expires_at": rfc3339(*expires_at), "policy": policy.name}),
                    );
                }
                issued
            };
            Ok(Decision::Proved {
                method: factor.auth_method(),
                token,
            })
        }
        Err(CodeFailure::Invalid) => {
            metrics.factor("code", "rejected");
            audit("otp_rejected", json!({"policy": policy.name}));
            Err(Refusal::OtpInvalid {
                by: entry.attempt.clone(),
            })
        }
        Err(CodeFailure::Replayed) => {
            metrics.factor("totp", "replayed");
            audit("otp_replayed", json!({"policy": policy.name}));
            Err(Refusal::OtpInvalid {
                by: entry.attempt.clone(),
            })
        }
        Err(CodeFailure::Store(error)) => {
            tracing::error!(%error, "second factor check failed closed: store unavailable");
            Err(Refusal::Unavailable)
        }
    }
}
