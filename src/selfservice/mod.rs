//! Self-service (DESIGN.md §6, issue 7): under the configured prefix (`/_stepgate` by default)
//! the gateway answers itself, for a consumer's own second factors:
//!
//! - [`page`]: the security page and its assets (no credentials); every answer under the
//!   prefix carries the [`crate::security_headers`];
//! - [`api`]: the enrolment API (TOTP, recovery codes, SMS, login texts), authenticated by the
//!   consumer's API key, with `X-OTP` to change a factor that exists.
//!
//! The endpoints are synthetic routes, so they pass through the whole stack before this
//! layer: path checks, the failure limiter (a banned IP or consumer gets 429 before anything
//! here runs, and every wrong code here counts), the API key, the consumer ban and roles.
//! They are answered here, just before the second-factor layer, because their codes are not
//! a route policy's: some calls need one only when a factor exists, and a confirmation checks
//! the code of the factor being added. Nothing under the prefix is ever forwarded.

pub mod api;
pub mod approvals;
pub mod page;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::accounts::Accounts;
use crate::approvals::Approvals;
use crate::error::{Body, BoxError, Refusal};
use crate::metrics::Metrics;
use crate::sms::SendBudget;
use crate::upstream::Target;

/// What the endpoints share: the accounts, metrics and the SMS send limits (which must outlive
/// configuration reloads, so they live here rather than in a snapshot).
pub struct Endpoints {
    pub accounts: Arc<Accounts>,
    pub metrics: Arc<Metrics>,
    pub sends: Arc<dyn SendBudget>,
    pub approvals: Arc<Approvals>,
}

#[derive(Clone)]
pub struct SelfServiceLayer {
    endpoints: Arc<Endpoints>,
}

impl SelfServiceLayer {
    pub fn new(
        accounts: Arc<Accounts>,
        metrics: Arc<Metrics>,
        sends: Arc<dyn SendBudget>,
        approvals: Arc<Approvals>,
    ) -> Self {
        Self {
            endpoints: Arc::new(Endpoints {
                accounts,
                metrics,
                sends,
                approvals,
            }),
        }
    }
}

impl<S> Layer<S> for SelfServiceLayer {
    type Service = SelfService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SelfService {
            endpoints: self.endpoints.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct SelfService<S> {
    endpoints: Arc<Endpoints>,
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Refusal>> + Send>>;

impl<S, B> Service<Request<B>> for SelfService<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Refusal>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Refusal;
    type Future = Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let ours = crate::context::Context::route_of(&request)
            .is_some_and(|r| matches!(r.upstream.target, Target::SelfService));
        if !ours {
            return Either::Left(self.inner.call(request));
        }
        let endpoints = self.endpoints.clone();
        Either::Right(Box::pin(async move { dispatch(&endpoints, request).await }))
    }
}

/// One call under the prefix, by path and method. Unknown combinations are 404 `no_route`,
/// like any path no route takes.
async fn dispatch<B>(endpoints: &Endpoints, request: Request<B>) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let snapshot = crate::snapshot::Snapshot::of(&request)?.clone();
    let rest = snapshot
        .self_service
        .strip(request.uri().path())
        .ok_or(Refusal::NoRoute)?
        .to_owned();
    let method = request.method().clone();
    use http::Method;
    match (&method, rest.as_str()) {
        (&Method::GET | &Method::HEAD, "") => Ok(page::redirect(&snapshot.self_service.prefix)),
        (&Method::GET | &Method::HEAD, "/") => Ok(page::index(&snapshot.self_service.title)),
        (&Method::GET | &Method::HEAD, "/app.js") => Ok(page::asset(page::Asset::Script)),
        (&Method::GET | &Method::HEAD, "/app.css") => Ok(page::asset(page::Asset::Style)),
        (&Method::GET, "/2fa") => api::status(endpoints, &snapshot, request).await,
        (&Method::POST, "/2fa/totp") => api::begin_totp(endpoints, request).await,
        (&Method::POST, "/2fa/totp/confirm") => api::confirm_totp(endpoints, request).await,
        (&Method::POST, "/2fa/recovery-codes") => {
            api::regenerate_recovery_codes(endpoints, request).await
        }
        (&Method::POST, "/2fa/sms") => api::begin_sms(endpoints, &snapshot, request).await,
        (&Method::POST, "/2fa/sms/confirm") => api::confirm_sms(endpoints, request).await,
        (&Method::DELETE, "/2fa/sms") => api::remove_sms(endpoints, request).await,
        (&Method::POST, "/sms/send") => api::send_login_code(endpoints, &snapshot, request).await,
        (&Method::GET, "/approvals") => approvals::list(endpoints, request).await,
        (_, rest) if rest.starts_with("/approvals/") => {
            let rest = rest.trim_start_matches("/approvals/").to_owned();
            approvals::one(endpoints, &method, &rest, request).await
        }
        _ => Err(Refusal::NoRoute),
    }
}
