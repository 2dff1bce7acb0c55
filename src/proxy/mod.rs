//! Forwarding: the innermost service. Builds the upstream request from the authorised one
//! (canonical path after `strip_prefix`, query untouched, `X-Forwarded-*`, `X-Real-IP` and
//! `Forwarded` set) and streams it to the route's upstream.

mod approval;
pub mod headers;
pub mod tunnel;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version, header};
use http_body_util::BodyExt;
use tower::Service;

use crate::accounts::Accounts;
use crate::approvals::Approvals;
use crate::auth::second_factor::{ApprovalCheck, StepUpGrant};
use crate::context::Context as RequestContext;
use crate::error::{Body, BoxError, Refusal};
use crate::metrics::Metrics;
use crate::routing::Route;
use crate::upstream::{Target, body, echo, pool};

/// The forwarding service. Expects the request's [`RequestContext`] with its route.
#[derive(Clone)]
pub struct Forward {
    metrics: Arc<Metrics>,
    /// For WebSocket tunnels, which check their step-up token while they live.
    accounts: Arc<Accounts>,
    /// For requests on their way through a person's approval.
    approvals: Arc<Approvals>,
}

impl Forward {
    pub fn new(metrics: Arc<Metrics>, accounts: Arc<Accounts>, approvals: Arc<Approvals>) -> Self {
        Self {
            metrics,
            accounts,
            approvals,
        }
    }
}

impl<B> Service<Request<B>> for Forward
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Refusal;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Refusal>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Box::pin(forward(
            request,
            self.metrics.clone(),
            self.accounts.clone(),
            self.approvals.clone(),
        ))
    }
}

async fn forward<B>(
    mut request: Request<B>,
    metrics: Arc<Metrics>,
    accounts: Arc<Accounts>,
    approvals: Arc<Approvals>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let context = RequestContext::of(&request)?;
    let route: Arc<Route> = context
        .route
        .clone()
        .ok_or_else(|| Refusal::Internal("request reached forwarding without a route"))?;
    let conn = context.conn.clone();
    let client = context.client;
    let host = context.host.as_ref().map(|h| h.value().clone());
    let websocket = context.websocket;
    let idle_timeout = context.snapshot.limits.idle_timeout;
    // Only a policy a person's approval satisfies needs these (kept off the common path).
    let by_approval = route.policy.approval.is_some();
    let snapshot = by_approval.then(|| context.snapshot.clone());

    if let Target::StepUp = route.upstream.target {
        return step_up_answer(&request);
    }
    // A WebSocket upgrade on a route that tunnels one: the client's side of the connection
    // and the token it was opened with are taken before the request's extensions go. On
    // any other route the upgrade headers are gone and the request is forwarded as plain
    // HTTP.
    let upgrade = match (websocket, route.websocket) {
        (true, Some(on_token_expiry)) => {
            let form = tunnel::form_of(
                request.method(),
                request.version(),
                !request.body().is_end_stream(),
            )?;
            let grant = request.extensions_mut().remove::<StepUpGrant>();
            Some((
                form,
                hyper::upgrade::on(&mut request),
                grant,
                on_token_expiry,
            ))
        }
        _ => None,
    };
    let approval = if by_approval {
        request.extensions_mut().remove::<ApprovalCheck>()
    } else {
        None
    };
    let (mut parts, body) = request.into_parts();
    let routed = approval.as_ref().map(|_| approval::Target {
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
    });
    // The upstream gets its own authority as Host (the pool sets it, replacing the client's);
    // the canonical host the request was routed by goes in X-Forwarded-Host and Forwarded.
    let path = parts.uri.path();
    let forwarded = route.forward_path(path);
    let target = match (parts.uri.path_and_query(), forwarded.len() == path.len()) {
        // The usual case: the path is forwarded as it is, so its bytes are shared.
        (Some(same), true) => same.clone(),
        _ => {
            let target = match parts.uri.query() {
                Some(query) => format!("{forwarded}?{query}"),
                None => forwarded.to_owned(),
            };
            PathAndQuery::try_from(target)
                .map_err(|_| Refusal::BadRequest("the request target cannot be forwarded"))?
        }
    };
    parts.uri = Uri::from(target);

    // Hop-by-hop headers went before routing (`client_headers`), before anything was added.
    headers::set_forwarded(
        &mut parts.headers,
        &headers::ConnectionFacts {
            peer_ip: conn.peer.ip(),
            peer: &conn.peer_ip,
            forwarded: conn.forwarded_element(host.as_ref()),
            client: client.map_or(conn.peer.ip(), |c| c.ip),
            via_trusted_proxy: client.is_some_and(|c| c.via_trusted_proxy),
            tls: conn.tls,
            host: host.as_ref(),
        },
    );
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();

    let mut body: Body = body::Limited::new(body, route.body_bytes).boxed_unsync();
    if let (Some(check), Some(routed), Some(snapshot)) = (approval, routed, &snapshot) {
        // Boxed, like the tunnel and the echo below: the rare paths' futures would otherwise
        // make the one every request allocates (and moves) larger.
        body = Box::pin(approval::settle(
            &approvals,
            check,
            snapshot,
            &route.name,
            &parts,
            &routed,
            body,
        ))
        .await?;
    }
    let start = tokio::time::Instant::now();
    let result = match (&route.upstream.target, upgrade) {
        (Target::Http(http), Some((form, client_side, grant, on_token_expiry))) => {
            let tunnel = tunnel::Tunnel {
                route: route.label.clone(),
                on_token_expiry,
                idle_timeout,
                conn: &conn,
                accounts: &accounts,
                metrics: &metrics,
            };
            Box::pin(tunnel.open(parts, form, client_side, grant, http)).await
        }
        (Target::Http(http), None) => http.send(parts, body, start, &conn.upstream_timer).await,
        (Target::Echo, _) => {
            parts.headers.remove(header::HOST);
            Box::pin(echo::respond(Request::from_parts(parts, body))).await
        }
        (Target::StepUp, _) => Err(Refusal::Internal("step-up endpoint reached forwarding")),
        (Target::SelfService, _) => Err(Refusal::Internal(
            "self-service endpoint reached forwarding",
        )),
    };
    metrics.upstream(
        &route.upstream.label,
        &route.upstream.metrics,
        start.elapsed(),
    );
    let upstream = &route.upstream.label;
    if let Err(refusal) = &result {
        let kind = match refusal {
            Refusal::UpstreamTimeout { .. } => Some("timeout"),
            Refusal::BodyTooLarge { .. } => Some("body_too_large"),
            Refusal::UpstreamProtocol(_) => Some("protocol"),
            Refusal::UpstreamUnavailable { source } => Some(
                if source
                    .as_deref()
                    .and_then(|e| e.downcast_ref::<pool::SendError>())
                    .is_some_and(pool::SendError::is_connect)
                {
                    "connect"
                } else {
                    "reset"
                },
            ),
            _ => None,
        };
        if let Some(kind) = kind {
            metrics.upstream_error(upstream, kind);
        }
        // The upstream's own error goes to the log, never to the client.
        match refusal {
            Refusal::UpstreamUnavailable {
                source: Some(source),
            } => tracing::warn!(
                route = route.name.as_str(),
                upstream = route.upstream.name.as_str(),
                error = %source,
                "upstream request failed"
            ),
            Refusal::UpstreamProtocol(what) => tracing::warn!(
                route = route.name.as_str(),
                upstream = route.upstream.name.as_str(),
                what,
                "upstream answer refused"
            ),
            _ => {}
        }
    }
    result
}

/// `POST /_stepgate/step-up`: the token the second-factor layer just issued, as JSON.
fn step_up_answer<B>(request: &Request<B>) -> Result<Response<Body>, Refusal> {
    let issued = request
        .extensions()
        .get::<crate::auth::second_factor::IssuedToken>()
        .ok_or(Refusal::BadRequest(
            "a step-up token is issued for a code in X-OTP (not for another token)",
        ))?;
    let body = serde_json::json!({
        "token": issued.token,
        "expires_at": crate::clock::rfc3339(issued.expires_at),
    });
    let mut response = Response::new(crate::error::full_body(body.to_string()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}
