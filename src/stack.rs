//! The whole request path, assembled in one place. Read top to bottom: the order of these
//! layers is a security property, so each says why it sits where it does.

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};

use std::sync::Arc;

use crate::accounts::Accounts;
use crate::approvals::Approvals;
use crate::auth::api_key::ApiKeyGuard;
use crate::auth::client_ip::ClientAddr;
use crate::auth::failures::{ConsumerBan, FailureLimitLayer};
use crate::auth::roles::RoleCheck;
use crate::auth::second_factor::SecondFactorLayer;
use crate::edge::{CanonicalHost, ClientHeaders, NormalizePath, ProtocolLimits};
use crate::error::{Body, Refusal};
use crate::guard::GuardLayer;
use crate::limiter::AttemptLimiter;
use crate::metrics::Metrics;
use crate::observe::ObserveLayer;
use crate::proxy::Forward;
use crate::routing::guard::RouteGuard;
use crate::selfservice::SelfServiceLayer;
use crate::sensitive::SensitiveHeadersLayer;
use crate::sms::SendBudget;

/// What the layers share; cheap to clone. The layers use the ports inside: the directory
/// and token store (through `accounts`), the attempt limiter.
#[derive(Clone)]
pub struct Shared {
    pub accounts: Arc<Accounts>,
    pub limiter: Arc<dyn AttemptLimiter>,
    pub metrics: Arc<Metrics>,
    /// The SMS send budgets (shared by every node on a shared store).
    pub sends: Arc<dyn SendBudget>,
    /// Requests for a person's approval (shared by every node on a shared store).
    pub approvals: Arc<Approvals>,
}

/// The service every connection serves: the stack in front of [`Forward`]. Cloned per
/// connection; clones share everything in [`Shared`].
pub fn build(
    shared: Shared,
) -> impl Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    let forward = Forward::new(
        shared.metrics.clone(),
        shared.accounts.clone(),
        shared.approvals.clone(),
    );
    build_with(shared, forward)
}

/// The stack in front of any innermost service (benchmarks put a stub where the upstream is).
/// Each request must arrive with its [`Context`](crate::context::Context) (the server's
/// connection puts it in); the layers refuse a request without one.
pub fn build_with<B, S>(
    shared: Shared,
    inner: S,
) -> impl Service<Request<B>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::error::BoxError>,
    S: Service<Request<B>, Response = Response<Body>, Error = Refusal> + Clone + Send + 'static,
    S::Future: Send,
{
    ServiceBuilder::new()
        // First of all, mark credentials sensitive so that no Debug output anywhere below
        // (a log line, a panic message) can print them.
        .layer(SensitiveHeadersLayer)
        // The front next: the request's id; each refusal, here or from below, made its
        // problem+json (or gRPC) response; strict CSP, nosniff, no framing on everything
        // under the self-service prefix, refusals included; every answer logged once with its
        // id, route and status. Above it the stack cannot fail. It runs the guards before the
        // decision itself, in this order, so that it knows the route of every answer:
        .layer(ObserveLayer::new(
            shared.metrics.clone(),
            (
                // Cheap protocol guards before any parsing that depends on routes.
                ProtocolLimits,
                // Canonicalise the host and the path before routing, so the host and path
                // routed (and later authorised) are the ones forwarded; ambiguous forms are
                // refused here.
                CanonicalHost,
                NormalizePath,
                // Who the client is: the socket peer, or the client a trusted proxy names.
                ClientAddr,
                // The client's headers cleaned in one pass before anything is added:
                // look-alikes of credential and identity headers refused, client identity
                // headers and hop-by-hop headers (with what `Connection` names) removed, two
                // framings refused.
                ClientHeaders,
                // Pick the route: 404 when none, the route's body limit on Content-Length.
                RouteGuard,
            ),
        ))
        .service(auth_with(shared, inner))
}

/// The auth decision, from routing down: [`build_with`]'s front layer routes, then
/// [`auth_with`] decides. Its own function so that a benchmark can time the decision itself;
/// nothing but [`build_with`] serves requests through it.
pub fn decision_with<B, S>(
    shared: Shared,
    inner: S,
) -> impl Service<Request<B>, Response = Response<Body>, Error = Refusal, Future: Send>
+ Clone
+ Send
+ 'static
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::error::BoxError>,
    S: Service<Request<B>, Response = Response<Body>, Error = Refusal> + Clone + Send + 'static,
    S::Future: Send,
{
    ServiceBuilder::new()
        .layer(GuardLayer(RouteGuard))
        .service(auth_with(shared, inner))
}

/// The auth decision once the request is routed (it continues [`build_with`], which puts the
/// front above it: credentials marked sensitive, the answer, the guards and routing).
fn auth_with<B, S>(
    shared: Shared,
    inner: S,
) -> impl Service<Request<B>, Response = Response<Body>, Error = Refusal, Future: Send>
+ Clone
+ Send
+ 'static
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::error::BoxError>,
    S: Service<Request<B>, Response = Response<Body>, Error = Refusal> + Clone + Send + 'static,
    S::Future: Send,
{
    let accounts = shared.accounts.clone();
    let directory = accounts.directory().clone();
    let audit = accounts.audit_log().clone();
    let limiter = shared.limiter.clone();
    ServiceBuilder::new()
        // The failure limiter wraps every credential check below: a banned IP is refused
        // before any credential is looked at, and every failed attempt below is counted.
        .layer(FailureLimitLayer::new(
            limiter.clone(),
            audit.clone(),
            shared.metrics.clone(),
        ))
        .layer(GuardLayer((
            // First factor: the API key (removed from the request on every route), then the
            // identity headers the upstream may trust.
            ApiKeyGuard::new(directory),
            // A banned consumer is refused as soon as its key names it, before its code.
            ConsumerBan::new(limiter, audit.clone()),
            // Roles before the second factor: a consumer who may not call at all learns
            // nothing about its code.
            RoleCheck::new(audit),
        )))
        // The self-service endpoints answer here, behind everything above (failure limiter,
        // key, ban), before the second-factor layer: they check codes per call themselves.
        .layer(SelfServiceLayer::new(
            accounts.clone(),
            shared.metrics.clone(),
            shared.sends,
            shared.approvals,
        ))
        // Second factor: step-up token or X-OTP; issues a token after a code.
        .layer(SecondFactorLayer::new(accounts, shared.metrics))
        // Innermost: stream to the upstream.
        .service(inner)
}
