//! Upstreams: pooled connections per configured `url` (http, or https through rustls; see
//! [`pool`]), or the built-in `echo` upstream; and the request body on its way to one
//! ([`body`]).

pub mod body;
pub mod echo;
pub mod pool;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, request};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::{Instant, timeout_at};

use body::client_refusal;
use pool::Pool;
use crate::client_headers::strip_hop_by_hop;
use crate::error::{Body, Refusal};

/// A named upstream.
pub struct Upstream {
    pub name: String,
    /// The name as a shared metric label.
    pub label: Arc<str>,
    pub target: Target,
    /// This upstream's latency metric.
    pub metrics: crate::metrics::UpstreamHandles,
}

pub enum Target {
    /// The built-in upstream that describes the request it received.
    Echo,
    /// The built-in `POST /_stepgate/step-up` endpoint: answers with the token just issued.
    StepUp,
    /// The built-in self-service page and enrolment API (answered by `selfservice`).
    SelfService,
    Http(Box<HttpUpstream>),
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Echo => write!(f, "{} (echo)", self.name),
            Target::StepUp => write!(f, "{} (built-in step-up endpoint)", self.name),
            Target::SelfService => write!(f, "{} (built-in self-service endpoints)", self.name),
            Target::Http(http) => write!(f, "{} ({})", self.name, http.url),
        }
    }
}

/// Tunables of an http(s) upstream.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub connect_timeout: Duration,
    /// Time from sending the request to the response head.
    pub timeout: Duration,
    /// Pooled connections idle this long are closed; keep it below the upstream's own
    /// keep-alive timeout so the pool never reuses a connection the upstream is closing.
    pub idle_timeout: Duration,
    /// Extra attempts after a connect failure (idempotent requests without a body only).
    pub retries: u32,
    pub ca_file: Option<PathBuf>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            retries: 1,
            ca_file: None,
        }
    }
}

pub struct HttpUpstream {
    /// As configured, for display.
    pub url: String,
    /// Path prefix of the url without trailing `/`; empty for none.
    base_path: String,
    pub settings: HttpSettings,
    pool: Pool,
}

#[derive(Debug)]
pub enum UpstreamError {
    Url(String),
    CaFile(String),
}

impl Upstream {
    pub fn echo(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            label: Arc::from(name),
            target: Target::Echo,
            metrics: Default::default(),
        }
    }

    pub fn http(name: &str, url: &str, settings: HttpSettings) -> Result<Self, UpstreamError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| UpstreamError::Url(format!("`{url}` is not a URL: {e}")))?;
        let scheme = uri
            .scheme()
            .filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS)
            .cloned()
            .ok_or_else(|| {
                UpstreamError::Url(format!("`{url}` must start with http:// or https://"))
            })?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamError::Url(format!("`{url}` has no host")))?;
        if authority.as_str().contains('@') {
            return Err(UpstreamError::Url(format!(
                "`{url}`: credentials in the URL are not supported"
            )));
        }
        if uri.query().is_some() {
            return Err(UpstreamError::Url(format!("`{url}` must not have a query")));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();

        let tls = crate::tls::client_config(settings.ca_file.as_deref())
            .map_err(UpstreamError::CaFile)?;
        let connector = crate::tls::https_connector(tls, settings.connect_timeout);
        Ok(Self {
            name: name.to_owned(),
            label: Arc::from(name),
            target: Target::Http(Box::new(HttpUpstream {
                url: url.to_owned(),
                base_path,
                pool: Pool::new(connector, scheme, authority, settings.idle_timeout),
                settings,
            })),
            metrics: Default::default(),
        })
    }
}

impl HttpUpstream {
    /// Closes this thread's idle connections that are past their time (see [`Pool::sweep`]).
    pub fn sweep_idle(&self) {
        self.pool.sweep();
    }

    fn uri_for(&self, uri: &Uri) -> Result<Uri, Refusal> {
        if self.base_path.is_empty() {
            return Ok(uri.clone());
        }
        let (path, query) = (uri.path(), uri.query());
        let mut target = String::with_capacity(
            self.base_path.len() + path.len() + 1 + query.map_or(0, str::len),
        );
        target.push_str(&self.base_path);
        target.push_str(path);
        if let Some(query) = query {
            target.push('?');
            target.push_str(query);
        }
        PathAndQuery::try_from(target)
            .map(Uri::from)
            .map_err(|_| Refusal::BadRequest("the request target cannot be forwarded"))
    }

    /// Sends the request and returns the upstream's response head with its body streaming.
    /// `parts.uri` holds the path and query to forward.
    pub async fn send(
        &self,
        mut parts: request::Parts,
        body: Body,
    ) -> Result<Response<Body>, Refusal> {
        parts.uri = self.uri_for(&parts.uri)?;
        let deadline = Instant::now() + self.settings.timeout;
        // A connect failure means the request never left, so it is safe to try again (the
        // pool hands it back untouched), but only when nothing else could go wrong twice: an
        // idempotent method with no body.
        let mut attempts_left = if is_idempotent(&parts.method) && body.is_end_stream() {
            self.settings.retries
        } else {
            0
        };
        let mut request = Request::from_parts(parts, body);
        loop {
            let result = timeout_at(deadline, self.pool.send(request)).await;
            let (error, unsent) = match result {
                Err(_elapsed) => {
                    return Err(Refusal::UpstreamTimeout {
                        timeout: self.settings.timeout,
                    });
                }
                Ok(Ok(response)) => return into_client_response(response),
                Ok(Err(failed)) => failed,
            };
            if let Some(refusal) = client_refusal(&error) {
                return Err(refusal);
            }
            match unsent {
                Some(unsent) if attempts_left > 0 => {
                    attempts_left -= 1;
                    tracing::debug!(error = %error, "upstream connect failed; retrying");
                    request = unsent;
                }
                _ => {
                    return Err(Refusal::UpstreamUnavailable {
                        source: Some(Box::new(error)),
                    });
                }
            }
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The upstream response as sent to the client: hop-by-hop headers dropped, body streamed.
/// A body error after the head (an upstream reset) propagates, so hyper aborts the client's
/// response instead of ending it cleanly. A `101 Switching Protocols` is refused: the client
/// asked for no upgrade (upgrade headers never reach the upstream), so nothing would be
/// tunnelled and the connection would die.
fn into_client_response(
    response: Response<hyper::body::Incoming>,
) -> Result<Response<Body>, Refusal> {
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(Refusal::UpstreamProtocol(
            "101 Switching Protocols to a request that did not ask to upgrade",
        ));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        body.map_err(Into::into).boxed_unsync(),
    ))
}
