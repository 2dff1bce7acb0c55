//! The security headers every answer under the self-service prefix carries: the page, API
//! answers, and refusals from any layer (a 401 for a missing key, a 429 from the failure
//! limiter, a 404 for an unknown path there): a strict Content-Security-Policy (only the
//! gateway's own script and style, no inline code, no framing, no form posts elsewhere),
//! `nosniff`, no referrer, no framing. The outermost layer adds them to the response, whatever
//! made it ([`crate::observe`]).

use std::sync::Arc;

use http::Request;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::routing::Route;
use crate::snapshot::Snapshot;
use crate::upstream::Target;

pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

static X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");
static X_FRAME_OPTIONS: HeaderName = HeaderName::from_static("x-frame-options");

/// The request's raw path is under the prefix (so a refusal before routing gets the headers).
pub fn under_prefix<B>(request: &Request<B>) -> bool {
    Snapshot::of(request).is_ok_and(|s| s.self_service.strip(request.uri().path()).is_some())
}

/// The route answered is one of the gateway's own (a path only its canonical form puts under
/// the prefix).
pub fn builtin(route: &Arc<Route>) -> bool {
    matches!(route.upstream.target, Target::SelfService | Target::StepUp)
}

pub fn add(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        X_CONTENT_TYPE_OPTIONS.clone(),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(X_FRAME_OPTIONS.clone(), HeaderValue::from_static("DENY"));
}
