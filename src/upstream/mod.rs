//! Upstreams: pooled connections per configured `url` (http, or https through rustls; see
//! [`pool`]), or the built-in `echo` upstream; and the request body on its way to one
//! ([`body`]).

pub mod body;
pub mod echo;
pub mod pool;

use std::fmt;

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, request};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::client_headers::strip_hop_by_hop;
pub use crate::config::HttpSettings;
use crate::config::{Target as SpecTarget, UpstreamSpec};
use crate::error::{Body, Refusal};
use body::client_refusal;
use pool::Pool;

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

pub struct HttpUpstream {
    /// As configured, for display.
    pub url: String,
    /// Path prefix of the url without trailing `/`; empty for none.
    base_path: String,
    pub settings: HttpSettings,
    pool: Pool,
}

impl Upstream {
    /// The built-in upstream of a name (echo, or one of the gateway's own endpoints).
    pub fn builtin(name: &str, target: Target) -> Self {
        Self {
            name: name.to_owned(),
            label: Arc::from(name),
            target,
            metrics: Default::default(),
        }
    }

    pub fn echo(name: &str) -> Self {
        Self::builtin(name, Target::Echo)
    }

    /// The upstream of a validated spec, with its (still empty) connection pools.
    pub fn from_spec(spec: &UpstreamSpec) -> Self {
        match &spec.target {
            SpecTarget::Echo => Self::echo(&spec.name),
            SpecTarget::Http(http) => {
                let timeout = http.settings.connect_timeout;
                let connectors = [
                    crate::tls::https_connector(http.tls.clone(), timeout, true),
                    crate::tls::https_connector(http.tls.clone(), timeout, false),
                ];
                Self::builtin(
                    &spec.name,
                    Target::Http(Box::new(HttpUpstream {
                        url: http.url.clone(),
                        base_path: http.base_path.clone(),
                        pool: Pool::new(
                            connectors,
                            http.settings.prior_knowledge,
                            http.scheme.clone(),
                            http.authority.clone(),
                            http.settings.idle_timeout,
                        ),
                        settings: http.settings.clone(),
                    })),
                )
            }
        }
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

    /// Sends the request and returns the upstream's response head with its body streaming,
    /// within the upstream's timeout from `start` (when forwarding began), kept by the client
    /// connection's `timer`. `parts.uri` holds the path and query to forward.
    pub async fn send(
        &self,
        mut parts: request::Parts,
        body: Body,
        start: Instant,
        timer: &crate::timer::Timer,
    ) -> Result<Response<Body>, Refusal> {
        parts.uri = self.uri_for(&parts.uri)?;
        let deadline = start + self.settings.timeout;
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
            let result = timer.within(deadline, self.pool.send(request, start)).await;
            let (error, unsent) = match result {
                Err(crate::timer::Elapsed) => {
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

impl HttpUpstream {
    /// Sends a WebSocket upgrade request on a connection of its own (see
    /// [`Pool::send_upgrade`]), within the upstream's `timeout` for the answer's head. The
    /// answer comes back as the upstream sent it: when it is a `101`, its connection is the
    /// tunnel's to take.
    pub async fn send_upgrade(
        &self,
        mut parts: request::Parts,
    ) -> Result<Response<hyper::body::Incoming>, Refusal> {
        parts.uri = self.uri_for(&parts.uri)?;
        let request = Request::from_parts(parts, crate::error::full_body(bytes::Bytes::new()));
        match tokio::time::timeout(self.settings.timeout, self.pool.send_upgrade(request)).await {
            Err(_elapsed) => Err(Refusal::UpstreamTimeout {
                timeout: self.settings.timeout,
            }),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(Refusal::UpstreamUnavailable {
                source: Some(Box::new(error)),
            }),
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
pub fn into_client_response(
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
