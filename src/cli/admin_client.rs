//! A small HTTP/1.1 client for the admin API (plain http only: the admin listener is meant for
//! loopback or a private network). One call, one JSON answer; errors are classified so the
//! operator is told whether nothing answered, the token was refused or the request was wrong.
//! The admin token is sent as a sensitive header and never appears in any message.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything but RFC 3986 unreserved characters (and `@`, which a path segment allows).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

/// One path segment, percent-encoded (names and prefixes go into URLs).
pub fn segment(text: &str) -> String {
    // `.` and `..` would be dot segments; encode them so they stay names.
    if text == "." || text == ".." {
        return text.replace('.', "%2E");
    }
    utf8_percent_encode(text, SEGMENT).to_string()
}

/// A query-string value, percent-encoded.
pub fn query_value(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

/// The admin API at one base URL with one bearer token.
pub struct AdminClient {
    base: String,
    authorization: HeaderValue,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A successful answer (2xx).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Result<serde_json::Value, CallError> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            CallError::Other(format!(
                "the admin API answered {} with a body that is not JSON ({e})",
                self.status
            ))
        })
    }
}

#[derive(Debug)]
pub enum CallError {
    /// Nothing answered at the address (refused, timed out, unreachable...).
    Unreachable {
        url: String,
        reason: String,
    },
    /// The admin API answered with an error status.
    Problem {
        status: StatusCode,
        code: Option<String>,
        detail: String,
        /// The response body as received (problem+json), for `--json`.
        body: Bytes,
    },
    Other(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Unreachable { url, reason } => write!(
                f,
                "cannot reach the admin API at {url} ({reason}); is \"stepgate run\" running \
                 with an \"admin:\" section in gateway.yaml?"
            ),
            CallError::Problem {
                status,
                code,
                detail,
                ..
            } => {
                let reason = status.canonical_reason().unwrap_or("");
                match code {
                    Some(code) => write!(f, "{detail} ({} {reason}, {code})", status.as_u16())?,
                    None => write!(f, "{detail} ({} {reason})", status.as_u16())?,
                }
                if *status == StatusCode::UNAUTHORIZED {
                    write!(
                        f,
                        "\nthe admin token was refused: pass the gateway's token with \
                         --admin-token or STEPGATE_ADMIN_TOKEN, or run this where the \
                         gateway's data dir (admin.token) is readable"
                    )?;
                }
                Ok(())
            }
            CallError::Other(message) => f.write_str(message),
        }
    }
}

impl AdminClient {
    /// `url` is `http://host:port` (a scheme-less `host:port` is taken as http), optionally
    /// with a path prefix.
    pub fn new(url: &str, token: &str) -> Result<Self, String> {
        let base = normalize_base(url)?;
        let mut authorization = HeaderValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| "the admin token contains characters a header cannot carry".to_string())?;
        authorization.set_sensitive(true);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        Ok(Self {
            base,
            authorization,
            client,
        })
    }

    /// `method path` with an optional JSON body. 2xx answers come back as [`Answer`]; anything
    /// else is a [`CallError`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, CallError> {
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e| CallError::Other(format!("bad admin API URL {}{path}: {e}", self.base)))?;
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(ACCEPT, "application/json");
        let payload = match body {
            Some(value) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                Bytes::from(value.to_string())
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(payload))
            .map_err(|e| CallError::Other(format!("cannot build the request: {e}")))?;

        let exchange = async {
            let response = self.client.request(request).await.map_err(|error| {
                if error.is_connect() {
                    CallError::Unreachable {
                        url: self.base.clone(),
                        reason: root_cause(&error),
                    }
                } else {
                    CallError::Other(format!(
                        "the admin API at {} did not answer properly ({})",
                        self.base,
                        root_cause(&error)
                    ))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|error| {
                CallError::Other(format!(
                    "the admin API at {} broke off its answer ({})",
                    self.base,
                    root_cause(&error)
                ))
            })?;
            Ok::<_, CallError>((parts.status, body.to_bytes()))
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| CallError::Unreachable {
                url: self.base.clone(),
                reason: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
            })??;

        if status.is_success() {
            return Ok(Answer { status, body });
        }
        Err(problem(status, body))
    }
}

fn problem(status: StatusCode, body: Bytes) -> CallError {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|p| p.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let detail = field("detail")
        .filter(|d| !d.is_empty())
        .or_else(|| field("title"))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            if text.is_empty() {
                "the admin API refused the request".to_owned()
            } else {
                text.chars().take(300).collect()
            }
        });
    CallError::Problem {
        status,
        code: field("code"),
        detail,
        body,
    }
}

fn normalize_base(url: &str) -> Result<String, String> {
    let url = url.trim();
    let with_scheme = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|e| format!("admin URL `{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "admin URL `{url}`: only plain http is supported (the admin API listens on \
                 loopback or a private network; tunnel it, e.g. over ssh, to reach it remotely)"
            ));
        }
        Some(other) => return Err(format!("admin URL `{url}`: unsupported scheme `{other}`")),
        None => return Err(format!("admin URL `{url}` has no scheme")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("admin URL `{url}` has no host"));
    };
    if uri.query().is_some() {
        return Err(format!("admin URL `{url}` must not have a query"));
    }
    let path = uri.path().trim_end_matches('/');
    Ok(format!("http://{authority}{path}"))
}

/// The innermost error of a chain, worded for people (`connection refused`, `timed out`).
fn root_cause(error: &(dyn StdError + 'static)) -> String {
    let mut current: &(dyn StdError + 'static) = error;
    let mut io_kind = None;
    loop {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        match current.source() {
            Some(next) => current = next,
            None => break,
        }
    }
    use std::io::ErrorKind::*;
    match io_kind {
        Some(ConnectionRefused) => "connection refused".into(),
        Some(TimedOut) => "connection timed out".into(),
        Some(ConnectionReset) => "connection reset".into(),
        Some(ConnectionAborted) => "connection aborted".into(),
        Some(HostUnreachable) => "host unreachable".into(),
        Some(NetworkUnreachable) => "network unreachable".into(),
        Some(AddrNotAvailable) => "address not available".into(),
        _ => current.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised() {
        assert_eq!(
            normalize_base("http://127.0.0.1:9901/").unwrap(),
            "http://127.0.0.1:9901"
        );
        assert_eq!(
            normalize_base("127.0.0.1:9901").unwrap(),
            "http://127.0.0.1:9901"
        );
        assert_eq!(
            normalize_base("http://admin.internal:80/stepgate/").unwrap(),
            "http://admin.internal:80/stepgate"
        );
        assert!(normalize_base("https://127.0.0.1:9901").is_err());
        assert!(normalize_base("ftp://x").is_err());
        assert!(normalize_base("http://x/?a=b").is_err());
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("alice@example.com"), "alice@example.com");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("sgk_0123abcd"), "sgk_0123abcd");
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }

    #[test]
    fn problems_name_detail_status_and_code() {
        let body = Bytes::from_static(
            br#"{"type":"about:blank","title":"Not Found","status":404,"code":"not_found","detail":"no consumer named `bob`"}"#,
        );
        let text = problem(StatusCode::NOT_FOUND, body).to_string();
        assert_eq!(text, "no consumer named `bob` (404 Not Found, not_found)");
        let text = problem(StatusCode::BAD_GATEWAY, Bytes::from_static(b"oops")).to_string();
        assert_eq!(text, "oops (502 Bad Gateway)");
    }
}
