//! The guards before routing, in the order the stack runs them: protocol limits, the
//! canonical host and path, the client's address, and the client's headers cleaned. Each
//! reads the request's context and refuses with 400 (or 414/431) before any route, key or
//! code is looked at; the rules themselves are pure functions in [`crate::host`],
//! [`crate::path`] and [`crate::client_headers`].
//!
//! Protocol limits: request-target length (414) and header count and size (431). hyper
//! enforces looser hard limits of its own underneath (see `server`), so a request that gets
//! here is bounded already; this guard gives the precise, documented limit and a
//! problem+json answer. Body limits depend on the route and live in `routing::layer` and the
//! upstream body.

use std::borrow::Cow;

use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, header};

use crate::client_headers;
use crate::context::Context;
use crate::error::Refusal;
use crate::guard::Guard;
use crate::host::{canonicalize, of_request};
use crate::path::normalize;
use crate::snapshot::Snapshot;

#[derive(Clone, Copy, Default)]
pub struct ProtocolLimits;

impl<B> Guard<B> for ProtocolLimits {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        // A reverse proxy tunnels nothing on CONNECT (hyper would hand over the connection
        // after any 2xx answer to one): refused before anything reads it, but for HTTP/2's
        // extended CONNECT of a WebSocket (RFC 8441), the HTTP/2 form of the upgrade.
        if request.method() == http::Method::CONNECT {
            match request.extensions().get::<hyper::ext::Protocol>() {
                Some(protocol) if protocol.as_str().eq_ignore_ascii_case("websocket") => {
                    Context::of_mut(request)?.websocket = true;
                }
                Some(_) => {
                    return Err(Refusal::BadRequest(
                        "an extended CONNECT is served for `:protocol websocket` only",
                    ));
                }
                None => {
                    return Err(Refusal::BadRequest(
                        "CONNECT is not served: this gateway is a reverse proxy, not a forward proxy",
                    ));
                }
            }
        }
        let snapshot = Snapshot::of(request)?;
        let limits = &snapshot.limits;
        let uri = request.uri();
        let target_len = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len());
        if target_len > limits.uri_bytes {
            return Err(Refusal::UriTooLong {
                limit: limits.uri_bytes,
            });
        }
        let headers = request.headers();
        if headers.len() > limits.header_count {
            return Err(Refusal::HeadersTooLarge {
                limit: limits.header_count,
                unit: "fields",
            });
        }
        let bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if bytes > limits.header_bytes {
            return Err(Refusal::HeadersTooLarge {
                limit: limits.header_bytes,
                unit: "bytes",
            });
        }
        Ok(())
    }
}

/// The guard: refuses an ambiguous host, and records the canonical one in the request's
/// context for routing and forwarding.
#[derive(Clone, Copy, Default)]
pub struct CanonicalHost;

impl<B> Guard<B> for CanonicalHost {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let conn = &Context::of(request)?.conn;
        // The usual request: one Host header and no authority in the target. Its
        // canonical form is the connection's last one when the bytes are the same.
        let host = match (request.uri().authority(), single_host(request)) {
            (None, Some(value)) if !value.is_empty() => Some(
                conn.canonical_host(value.as_bytes(), || {
                    canonicalize(value.as_bytes(), conn.tls, Some(value))
                })
                .map_err(Refusal::BadHost)?,
            ),
            _ => of_request(request, conn.tls).map_err(Refusal::BadHost)?,
        };
        Context::of_mut(request)?.host = host;
        Ok(())
    }
}

/// The one `Host` header, when there is exactly one.
fn single_host<B>(request: &Request<B>) -> Option<&HeaderValue> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let first = hosts.next()?;
    hosts.next().is_none().then_some(first)
}

/// Guard that refuses ambiguous paths and rewrites the request URI to the canonical path, so
/// every later layer and the upstream see the path that was routed and authorised.
#[derive(Clone, Copy, Default)]
pub struct NormalizePath;

impl<B> Guard<B> for NormalizePath {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let canonical = match normalize(request.uri().path()) {
            Ok(Cow::Borrowed(_)) => return Ok(()),
            Ok(Cow::Owned(canonical)) => canonical,
            Err(error) => return Err(Refusal::BadPath(error)),
        };
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{canonical}?{query}"),
            None => canonical,
        };
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = Some(
            PathAndQuery::try_from(path_and_query)
                .map_err(|_| Refusal::BadRequest("the request target is malformed"))?,
        );
        *request.uri_mut() = Uri::from_parts(parts)
            .map_err(|_| Refusal::BadRequest("the request target is malformed"))?;
        Ok(())
    }
}

#[derive(Clone, Copy, Default)]
pub struct ClientHeaders;

impl<B> Guard<B> for ClientHeaders {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let context = Context::of(request)?;
        let underscores = context.snapshot.limits.headers_with_underscores;
        let trusted_peer = context.client.is_some_and(|c| c.via_trusted_proxy);
        let cleaned = client_headers::clean(request.headers_mut(), underscores, trusted_peer)?;
        let context = Context::of_mut(request)?;
        // hyper read a head with both framings as chunked and dropped the length; the
        // connection's I/O kept the head's bytes.
        if context
            .conn
            .activity
            .head_had_content_length(cleaned.chunked)
        {
            return Err(Refusal::BadFraming(
                "Content-Length and Transfer-Encoding together are ambiguous",
            ));
        }
        context.websocket |= cleaned.websocket;
        context.credentials = cleaned.credentials;
        context.content_length = cleaned.content_length;
        context.grpc = Some(cleaned.grpc);
        Ok(())
    }
}
