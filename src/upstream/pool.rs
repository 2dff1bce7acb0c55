//! Connections to one http(s) upstream, pooled per thread.
//!
//! Each worker thread keeps its own idle connections (see `server`), so taking one and giving
//! it back is a borrow of a thread-owned list: no lock another thread could hold, and the
//! connection's task runs on the thread whose requests use it, so a response never has to
//! wake another thread. Connections are made by hyper-rustls' connector (TCP, TLS, ALPN) and
//! driven by hyper's client connections; HTTP/2 connections are shared by concurrent requests
//! of their thread, HTTP/1.1 connections serve one request at a time.

use std::cell::RefCell;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use thread_local::ThreadLocal;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::error::{Body, BoxError};

/// Idle HTTP/1.1 connections kept per thread; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// Pooled connections tried for one request before a new one is made: each found closing
/// under the request is dropped, so this only bounds a burst of them.
const POOLED_TRIES: usize = 3;

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: the request never left, so it may be tried again.
    #[error("cannot connect to the upstream: {0}")]
    Connect(BoxError),
    /// The request was (maybe partly) sent, or the connection failed under it.
    #[error("{0}")]
    Request(#[source] hyper::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl Idle {
    /// Closed by the upstream, or idle past the timeout: to be dropped.
    fn spent(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.sender.is_closed() || now.duration_since(self.since) >= idle_timeout
    }
}

pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// The same, offering only HTTP/1.1 in ALPN: for WebSocket upgrades, which HTTP/2
    /// cannot carry as HTTP/1.1 does.
    h1_connector: HttpsConnector<HttpConnector>,
    /// HTTP/2 from the first byte on plain TCP (h2c), without negotiation.
    prior_knowledge: bool,
    scheme: Scheme,
    authority: Authority,
    /// `Host` of HTTP/1.1 requests: the upstream's authority.
    host: http::HeaderValue,
    idle_timeout: Duration,
    idle: ThreadLocal<RefCell<Vec<Idle>>>,
}

impl Pool {
    pub fn new(
        connectors: [HttpsConnector<HttpConnector>; 2],
        prior_knowledge: bool,
        scheme: Scheme,
        authority: Authority,
        idle_timeout: Duration,
    ) -> Self {
        let [connector, h1_connector] = connectors;
        // An authority is visible ASCII, so it is a valid header value.
        let host = http::HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| http::HeaderValue::from_static("invalid"));
        Self {
            connector,
            h1_connector,
            prior_knowledge,
            scheme,
            authority,
            host,
            idle_timeout,
            idle: ThreadLocal::new(),
        }
    }

    /// Sends `request` (origin-form URI) and returns the response head, its body streaming.
    /// A pooled connection that turns out to be closing before the request went out is
    /// dropped and the next one tried; only a fresh connection's failure is final. When no
    /// connection could be made the request comes back untouched, for the caller to retry.
    /// `now`: the time the caller read as the request set off (one clock read per request
    /// serves the deadline, the metrics and the pool).
    pub async fn send(
        &self,
        mut request: Request<Body>,
        now: Instant,
    ) -> Result<Response<Incoming>, (SendError, Option<Request<Body>>)> {
        for _ in 0..POOLED_TRIES {
            let Some(sender) = self.checkout(now) else {
                break;
            };
            match self.try_send(sender, request, now).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err((SendError::Request(error.into_error()), None)),
                },
            }
        }
        // Boxed: connecting (resolver, TCP, TLS, handshake) makes by far the largest future,
        // and every request would otherwise carry its space while only a few connect.
        let sender = match Box::pin(self.connect()).await {
            Ok(sender) => sender,
            Err(error) => return Err((SendError::Connect(error), Some(request))),
        };
        self.try_send(sender, request, Instant::now())
            .await
            .map_err(|error| (SendError::Request(error.into_error()), None))
    }

    async fn try_send(
        &self,
        sender: Sender,
        mut request: Request<Body>,
        now: Instant,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>> {
        match sender {
            Sender::H1(mut sender) => {
                request
                    .headers_mut()
                    .insert(header::HOST, self.host.clone());
                let response = sender.try_send_request(request);
                // Back in the pool at once: it is taken again only when `is_ready` says the
                // response (head and body) is through.
                self.put(Sender::H1(sender), now);
                response.await
            }
            Sender::H2(mut sender) => {
                // HTTP/2 names the target in `:scheme` and `:authority`, not in `Host`.
                request.headers_mut().remove(header::HOST);
                *request.uri_mut() = self.absolute(request.uri());
                sender.try_send_request(request).await
            }
        }
    }

    /// Closes this thread's connections that have been idle past the idle timeout, or that
    /// the upstream closed (each worker calls it now and then, so an idle gateway does not
    /// hold connections open until the next request).
    pub fn sweep(&self) {
        let Some(idle) = self.idle.get() else { return };
        let now = Instant::now();
        idle.borrow_mut()
            .retain(|entry| !entry.spent(now, self.idle_timeout));
    }

    /// This thread's newest usable idle connection; closed ones are dropped on the way, and
    /// so is a ready one idle past the timeout. HTTP/1.1 connections still busy with a
    /// response stay for later, their age unlooked at (only a candidate's is: one clock
    /// comparison per request, not one per pooled connection).
    fn checkout(&self, now: Instant) -> Option<Sender> {
        let mut idle = self.idle.get_or_default().borrow_mut();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let entry = &mut idle[i];
            let ready = match &entry.sender {
                Sender::H1(sender) => sender.is_ready(),
                Sender::H2(sender) => sender.is_ready(),
            };
            if entry.sender.is_closed() || (ready && entry.spent(now, self.idle_timeout)) {
                idle.swap_remove(i);
                continue;
            }
            if !ready {
                continue;
            }
            match &entry.sender {
                Sender::H2(sender) => {
                    entry.since = now;
                    return Some(Sender::H2(sender.clone()));
                }
                Sender::H1(_) => return Some(idle.swap_remove(i).sender),
            }
        }
        None
    }

    fn put(&self, sender: Sender, since: Instant) {
        let mut idle = self.idle.get_or_default().borrow_mut();
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since });
        }
    }

    /// Sends a WebSocket upgrade request on a connection of its own, HTTP/1.1 whatever the
    /// upstream offers, never pooled: if the upstream answers `101`, the connection becomes
    /// the tunnel's (through `hyper::upgrade::on` of the response).
    pub async fn send_upgrade(
        &self,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let io = Box::pin(self.h1_connector.clone().oneshot(self.root()?))
            .await
            .map_err(SendError::Connect)?;
        let (mut sender, connection) = http1::handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream upgrade connection ended with an error");
            }
        });
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        sender
            .send_request(request)
            .await
            .map_err(SendError::Request)
    }

    fn root(&self) -> Result<Uri, SendError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(e.into()))
    }

    /// A new connection on this thread: HTTP/2 when TLS negotiated it or the upstream is
    /// known to speak it (h2c), else HTTP/1.1.
    async fn connect(&self) -> Result<Sender, BoxError> {
        let io = self.connector.clone().oneshot(self.root()?).await?;
        if self.prior_knowledge || io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            drive(connection);
            self.put(Sender::H2(sender.clone()), Instant::now());
            Ok(Sender::H2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await?;
            drive(connection);
            Ok(Sender::H1(sender))
        }
    }

    fn absolute(&self, uri: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(PathAndQuery::from_static("/")));
        Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }
}

/// Runs a client connection on this thread until it ends.
fn drive(connection: impl Future<Output = Result<(), hyper::Error>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
}
