//! WebSocket tunnels on routes with `websocket: true`: RFC 6455 over HTTP/1.1 (a `GET` with
//! `Upgrade: websocket`), and RFC 8441 over HTTP/2 (an extended `CONNECT` with `:protocol
//! websocket`, one stream of a connection that goes on serving others).
//!
//! The upgrade request has been through the whole stack like any request (API key, second
//! factor or step-up token, failure limiter, roles; its credentials removed). Only then is it
//! forwarded: always as the HTTP/1.1 upgrade, on a connection of its own to the upstream, with
//! the upgrade headers the client-headers pass removed put back (for an HTTP/2 client, with a
//! `Sec-WebSocket-Key` of the gateway's: RFC 8441 has none). The upstream's `101` is relayed
//! (to an HTTP/2 client as the `200` that opens its stream), and the two sides are joined byte
//! for byte until one of these ends the tunnel:
//!
//! - either side closes (`closed`), or a connection fails (`error`);
//! - nothing moves either way for `limits.idle_timeout` (`idle`);
//! - with `on_token_expiry: close`, the step-up token the socket was opened with (presented,
//!   or earned by the code it was opened with) expires or is revoked (`token_expired`,
//!   `token_revoked`), or the token store cannot vouch for it (`store_unavailable`: fail
//!   closed): a long-lived socket does not outlive its second factor;
//! - the gateway's drain deadline passes (`shutdown`).
//!
//! The gateway reads no frame, so it ends a tunnel by closing both connections: the peers see
//! the socket end without a close frame (code 1006).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Response, StatusCode, Version, header, request};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;

use crate::accounts::Accounts;
use crate::auth::second_factor::StepUpGrant;
use crate::client_headers::strip_hop_by_hop;
use crate::config::OnTokenExpiry;
use crate::connection::{Activity, ConnInfo, Tracked};
use crate::error::{Body, Refusal, full_body};
use crate::metrics::{Metrics, TunnelEnd};
use crate::tokens::TokenRejection;
use crate::upstream::{HttpUpstream, into_client_response};

/// How often a tunnel looks at its idle time and its token; a token is checked again at most
/// this long after it expired or was revoked.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Everything a tunnel needs besides the two connections.
pub struct Tunnel<'a> {
    pub route: Arc<str>,
    pub on_token_expiry: OnTokenExpiry,
    pub idle_timeout: Duration,
    pub conn: &'a ConnInfo,
    pub accounts: &'a Arc<Accounts>,
    pub metrics: &'a Arc<Metrics>,
}

/// The two forms of a WebSocket opening handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// RFC 6455: an HTTP/1.1 `GET` with `Upgrade: websocket`, answered `101`; the connection
    /// becomes the tunnel.
    Http1,
    /// RFC 8441: an HTTP/2 extended `CONNECT`, answered `200`; its stream becomes the tunnel.
    Http2,
}

/// The form of an upgrade request that can be tunnelled at all: an HTTP/1.1 GET without a body
/// (RFC 6455 §4.1), or an HTTP/2 extended CONNECT (whose body is the tunnel).
pub fn form_of(method: &Method, version: Version, has_body: bool) -> Result<Form, Refusal> {
    match (method, version) {
        (&Method::GET, Version::HTTP_11) if !has_body => Ok(Form::Http1),
        (&Method::CONNECT, Version::HTTP_2) => Ok(Form::Http2),
        _ => Err(Refusal::BadRequest(
            "a WebSocket upgrade is an HTTP/1.1 GET without a body, or an HTTP/2 extended CONNECT",
        )),
    }
}

impl Tunnel<'_> {
    /// Forwards the upgrade request (`parts`, ready to forward) and answers with the
    /// upstream's `101`, leaving the tunnel with the connection; any other answer is passed on
    /// as it is, and the connection goes on serving HTTP.
    pub async fn open(
        self,
        mut parts: request::Parts,
        form: Form,
        client: OnUpgrade,
        grant: Option<StepUpGrant>,
        upstream: &HttpUpstream,
    ) -> Result<Response<Body>, Refusal> {
        parts.method = Method::GET;
        let headers = &mut parts.headers;
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if form == Form::Http2 {
            headers.insert(header::SEC_WEBSOCKET_KEY, websocket_key()?);
            headers
                .entry(header::SEC_WEBSOCKET_VERSION)
                .or_insert(HeaderValue::from_static("13"));
        }
        let mut answer = upstream.send_upgrade(parts).await?;
        if answer.status() != StatusCode::SWITCHING_PROTOCOLS {
            return into_client_response(answer);
        }
        let to_websocket = answer
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if !to_websocket {
            return Err(Refusal::UpstreamProtocol(
                "101 Switching Protocols to something other than the WebSocket asked for",
            ));
        }
        let upstream_side = hyper::upgrade::on(&mut answer);
        let (mut head, _) = answer.into_parts();
        strip_hop_by_hop(&mut head.headers);
        match form {
            Form::Http1 => {
                head.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                head.headers
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            }
            Form::Http2 => {
                // The accept value answers the gateway's key, not anything the client sent.
                head.status = StatusCode::OK;
                head.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
            }
        }

        let watch = match (self.on_token_expiry, grant) {
            (OnTokenExpiry::Close, Some(grant)) => Some(TokenWatch {
                grant,
                accounts: self.accounts.clone(),
            }),
            _ => None,
        };
        let open = Open::new(self.metrics.clone(), self.route);
        let idle_timeout = self.idle_timeout;
        let tunnel = Box::pin(async move {
            let reason = match tokio::try_join!(client, upstream_side) {
                Ok((client, upstream)) => {
                    join(client, upstream, idle_timeout, watch.as_ref()).await
                }
                Err(error) => {
                    tracing::debug!(%error, "WebSocket upgrade did not complete");
                    "error"
                }
            };
            open.end(reason);
        });
        match form {
            // The connection's own task runs it once hyper hands the connection over.
            Form::Http1 => self.conn.hand_over(tunnel),
            // One stream of a connection that goes on: the connection ends it if it goes.
            Form::Http2 => drop(tokio::spawn(tunnel)),
        }
        Ok(Response::from_parts(head, full_body(bytes::Bytes::new())))
    }
}

/// A fresh `Sec-WebSocket-Key` (RFC 6455 §4.1: 16 random bytes, base64).
fn websocket_key() -> Result<HeaderValue, Refusal> {
    use base64::Engine as _;
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|_| Refusal::Internal("no randomness for a key"))?;
    HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(nonce))
        .map_err(|_| Refusal::Internal("base64 is a header value"))
}

/// Copies both ways until a side closes or the watch ends the tunnel; why it ended.
async fn join(
    client: Upgraded,
    upstream: Upgraded,
    idle_timeout: Duration,
    watch: Option<&TokenWatch>,
) -> &'static str {
    // Every byte of both directions passes the client side (read from it, or written to it);
    // the tunnel watches its own (on HTTP/2 the connection's is shared by other streams).
    let activity = Arc::new(Activity::default());
    let mut client = Tracked::watching(TokioIo::new(client), activity.clone());
    let mut upstream = TokioIo::new(upstream);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let tick = WATCH_EVERY
        .min(idle_timeout / 4)
        .max(Duration::from_millis(10));
    let mut quiet = Duration::ZERO;
    loop {
        tokio::select! {
            biased;
            result = &mut copy => {
                return match result {
                    Ok(_) => "closed",
                    Err(error) => {
                        tracing::debug!(%error, "WebSocket tunnel ended with an error");
                        "error"
                    }
                };
            }
            () = tokio::time::sleep(tick) => {
                quiet = if activity.take() { Duration::ZERO } else { quiet + tick };
                if quiet >= idle_timeout {
                    return "idle";
                }
                if let Some(watch) = watch
                    && let Some(reason) = watch.ended().await
                {
                    return reason;
                }
            }
        }
    }
}

/// The step-up token a tunnel lives by (`on_token_expiry: close`).
struct TokenWatch {
    grant: StepUpGrant,
    accounts: Arc<Accounts>,
}

impl TokenWatch {
    /// Why the token no longer holds, if it does not: past its expiry by the gateway's clock,
    /// or refused by the token store (revoked with its consumer's key, factors or account,
    /// on whichever node that happened). A store that cannot answer ends the tunnel too
    /// (fail closed).
    async fn ended(&self) -> Option<&'static str> {
        let grant = &self.grant;
        let now = self.accounts.now();
        if now >= grant.expires_at {
            return Some("token_expired");
        }
        let tokens = self.accounts.tokens();
        let verdict =
            match tokens.check_cached(&grant.token, &grant.consumer_id, &grant.policy, now) {
                Some(verdict) => verdict,
                None => {
                    tokens
                        .check(&grant.token, &grant.consumer_id, &grant.policy, now)
                        .await
                }
            };
        match verdict {
            Ok(_) => None,
            Err(TokenRejection::Expired) => Some("token_expired"),
            Err(TokenRejection::Unavailable) => Some("store_unavailable"),
            Err(_) => Some("token_revoked"),
        }
    }
}

/// An open tunnel in the metrics: counted open from the `101` until it ends, however it ends
/// (dropped at the drain deadline: `shutdown`).
struct Open {
    metrics: Arc<Metrics>,
    route: Arc<str>,
    reason: &'static str,
}

impl Open {
    fn new(metrics: Arc<Metrics>, route: Arc<str>) -> Self {
        metrics.tunnels_open.inc();
        Self {
            metrics,
            route,
            reason: "shutdown",
        }
    }

    fn end(mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.tunnels_open.dec();
        self.metrics
            .tunnels_closed
            .get_or_create(&TunnelEnd {
                route: self.route.clone(),
                reason: self.reason,
            })
            .inc();
        tracing::info!(
            route = &*self.route,
            reason = self.reason,
            "WebSocket tunnel ended"
        );
    }
}
