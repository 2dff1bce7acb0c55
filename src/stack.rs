//! The whole request path, assembled in one place. Read top to bottom: the order of these
//! layers is a security property, so each says why it sits where it does.

use std::convert::Infallible;

use http::HeaderName;
use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};
use tower_http::sensitive_headers::SetSensitiveHeadersLayer;

use crate::error::Body;
use crate::guard::GuardLayer;
use crate::identity::StripIdentity;
use crate::limits::ProtocolLimits;
use crate::observe::{ConfigHandle, ObserveLayer};
use crate::path::NormalizePath;
use crate::proxy::Forward;
use crate::rescue::RescueLayer;
use crate::routing::layer::RouteLayer;

/// Headers whose values are credentials.
fn sensitive_headers() -> [HeaderName; 7] {
    [
        AUTHORIZATION,
        PROXY_AUTHORIZATION,
        COOKIE,
        SET_COOKIE,
        HeaderName::from_static("x-api-key"),
        HeaderName::from_static("x-otp"),
        HeaderName::from_static("x-step-up-token"),
    ]
}

/// The service every connection serves. Cloned per connection; clones share the config handle.
pub fn build(
    config: ConfigHandle,
) -> impl Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        // First of all, mark credentials sensitive so that no Debug output anywhere below
        // (a log line, a panic message) can print them.
        .layer(SetSensitiveHeadersLayer::new(sensitive_headers()))
        // Request id and config snapshot next, so that every answer, including every
        // refusal below, is logged once with its id, route and status.
        .layer(ObserveLayer::new(config))
        // One rescue: each refusal from below becomes its problem+json response here.
        .layer(RescueLayer)
        // Cheap protocol guards before any parsing that depends on routes.
        .layer(GuardLayer(ProtocolLimits))
        // Canonicalise the path before routing, so the path routed (and later authorised) is
        // the path forwarded; ambiguous encodings are refused here.
        .layer(GuardLayer(NormalizePath))
        // Pick the route: 404 when none, route body limit on Content-Length.
        .layer(RouteLayer)
        // Client-sent identity headers go before anything could rely on them.
        .layer(GuardLayer(StripIdentity))
        // Innermost: stream to the upstream.
        .service(Forward)
}
