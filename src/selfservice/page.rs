//! The security page (`GET {prefix}/`, `app.js`, `app.css`), compiled into the binary from
//! `assets/security/` so there is nothing to deploy or to tamper with on disk, and the
//! security headers every answer under the prefix carries: a strict Content-Security-Policy
//! (only the gateway's own script and style, no inline code, no framing, no form posts
//! elsewhere), `nosniff`, no referrer, no framing.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::{Body, full_body};
use crate::routing::Route;
use crate::snapshot::Snapshot;
use crate::upstream::Target;

const INDEX_HTML: &str = include_str!("../../assets/security/index.html");
const APP_JS: &str = include_str!("../../assets/security/app.js");
const APP_CSS: &str = include_str!("../../assets/security/app.css");

pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

#[derive(Debug, Clone, Copy)]
pub enum Asset {
    Script,
    Style,
}

/// The page itself, under the operator's name for the gateway (`self_service.title`).
pub fn index(title: &str) -> Response<Body> {
    let page = INDEX_HTML.replace("{{title}}", &html_escaped(title));
    with_type("text/html; charset=utf-8", full_body(page))
}

/// `text` as HTML text content.
fn html_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One of the page's files. `no-cache`: a browser revalidates, so a new gateway version's page
/// is picked up at once.
pub fn asset(which: Asset) -> Response<Body> {
    let (content_type, text) = match which {
        Asset::Script => ("text/javascript; charset=utf-8", APP_JS),
        Asset::Style => ("text/css; charset=utf-8", APP_CSS),
    };
    with_type(content_type, full_body(text))
}

fn with_type(content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET {prefix}` → `{prefix}/`, so that the page's relative links resolve under the prefix.
pub fn redirect(prefix: &str) -> Response<Body> {
    let mut response = Response::new(full_body(""));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = HeaderValue::from_str(&format!("{prefix}/")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Adds the security headers to every response under the self-service prefix: the page, API
/// answers, and refusals from any layer (a 401 for a missing key, a 429 from the failure
/// limiter, a 404 for an unknown path there). It sits above the rescue layer so that it sees
/// refusals as the responses they become.
#[derive(Clone, Copy, Default)]
pub struct SecurityHeadersLayer;

impl<S> Layer<S> for SecurityHeadersLayer {
    type Service = SecurityHeaders<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SecurityHeaders { inner }
    }
}

#[derive(Clone)]
pub struct SecurityHeaders<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for SecurityHeaders<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = SecurityHeadersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // By the raw path (refusals before routing, e.g. 404 under the prefix)...
        let under_prefix = Snapshot::of(&request)
            .is_ok_and(|s| s.self_service.strip(request.uri().path()).is_some());
        SecurityHeadersFuture {
            inner: self.inner.call(request),
            under_prefix,
        }
    }
}

pin_project! {
    pub struct SecurityHeadersFuture<F> {
        #[pin]
        inner: F,
        under_prefix: bool,
    }
}

impl<F, R, E> Future for SecurityHeadersFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<R>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        // ...and by the route (a path that only its canonical form puts under the prefix).
        let builtin = response
            .extensions()
            .get::<Arc<Route>>()
            .is_some_and(|r| matches!(r.upstream.target, Target::SelfService | Target::StepUp));
        if *this.under_prefix || builtin {
            add_security_headers(response.headers_mut());
        }
        Poll::Ready(Ok(response))
    }
}

static X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");
static X_FRAME_OPTIONS: HeaderName = HeaderName::from_static("x-frame-options");

fn add_security_headers(headers: &mut http::HeaderMap) {
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
