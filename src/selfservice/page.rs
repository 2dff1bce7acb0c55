//! The security page (`GET {prefix}/`, `app.js`, `app.css`), compiled into the binary from
//! `assets/security/` so there is nothing to deploy or to tamper with on disk (its answers get
//! the [`crate::security_headers`], like everything under the prefix).

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::error::{Body, full_body};

const INDEX_HTML: &str = include_str!("../../assets/security/index.html");
const APP_JS: &str = include_str!("../../assets/security/app.js");
const APP_CSS: &str = include_str!("../../assets/security/app.css");

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
