//! Routing, as a guard: picks the route for a request (404 when none), applies the route's
//! body limit to a declared `Content-Length`, and records the route in the request's context
//! for the layers below, and for the outermost layer, which runs the guards before routing and
//! this one itself so that it knows the route of every answer (logs, metrics, challenges).

use std::sync::Arc;

use http::{HeaderMap, Method, Request, header};

use super::Route;
use crate::context::Context as RequestContext;
use crate::error::Refusal;
use crate::guard::Guard;
use crate::snapshot::Snapshot;

#[derive(Clone, Copy, Default)]
pub struct RouteGuard;

impl<B> Guard<B> for RouteGuard {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let route = select(request)?.clone();
        let body_bytes = route.body_bytes;
        let context = RequestContext::of_mut(request)?;
        context.route = Some(route);
        let declared = context.content_length;
        // After the route is recorded: a refusal for the body is logged under its route.
        if declared
            && let Some(length) = content_length(request.headers())?
            && length > body_bytes
        {
            return Err(Refusal::BodyTooLarge { limit: body_bytes });
        }
        Ok(())
    }
}

fn select<B>(request: &Request<B>) -> Result<&Arc<Route>, Refusal> {
    let context = RequestContext::of(request)?;
    let snapshot = &context.snapshot;
    let host = context.host.as_ref().map(crate::host::Host::name_bytes);
    let path = request.uri().path();
    let method = if context.websocket && request.method() == Method::CONNECT {
        &Method::GET
    } else {
        request.method()
    };
    match snapshot.self_service.strip(path) {
        Some("/step-up") => step_up_route(snapshot, request),
        Some(rest) => self_service_route(snapshot, rest),
        None => snapshot
            .routes
            .find(host, method, path)
            .ok_or_else(|| Refusal::NoRoute),
    }
}

fn self_service_route<'a>(snapshot: &'a Snapshot, rest: &str) -> Result<&'a Arc<Route>, Refusal> {
    let service = &snapshot.self_service;
    if !service.enabled {
        return Err(Refusal::NoRoute);
    }
    match rest {
        "" | "/" | "/app.js" | "/app.css" => Ok(&service.page_route),
        "/2fa" | "/sms/send" | "/approvals" => Ok(&service.api_route),
        _ if rest.starts_with("/approvals/") => Ok(&service.api_route),
        _ if rest.starts_with("/2fa/") => Ok(&service.api_route),
        _ => Err(Refusal::NoRoute),
    }
}

/// `POST {prefix}/step-up[?policy=NAME]`: the policy's synthetic route. The policy may be left
/// out when only one policy issues step-up tokens.
fn step_up_route<'a, B>(
    snapshot: &'a Snapshot,
    request: &Request<B>,
) -> Result<&'a Arc<Route>, Refusal> {
    if request.method() != http::Method::POST {
        return Err(Refusal::NoRoute);
    }
    let wanted = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("policy=")));
    match wanted {
        Some(name) => snapshot.step_up_routes.get(name).ok_or(Refusal::BadRequest(
            "no policy of that name issues step-up tokens",
        )),
        None if snapshot.step_up_routes.len() == 1 => snapshot
            .step_up_routes
            .values()
            .next()
            .ok_or(Refusal::NoRoute),
        None if snapshot.step_up_routes.is_empty() => Err(Refusal::NoRoute),
        None => Err(Refusal::BadRequest(
            "several policies issue step-up tokens: name one with ?policy=NAME",
        )),
    }
}

/// The declared body length; several differing or malformed values are refused (request
/// smuggling hides in exactly this ambiguity).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Refusal> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let parsed = value
            .to_str()
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| Refusal::BadRequest("malformed Content-Length"))?;
        if length.is_some_and(|l| l != parsed) {
            return Err(Refusal::BadRequest("conflicting Content-Length headers"));
        }
        length = Some(parsed);
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_must_be_unambiguous() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h).unwrap(), None);
        h.append(header::CONTENT_LENGTH, "10".parse().unwrap());
        assert_eq!(content_length(&h).unwrap(), Some(10));
        h.append(header::CONTENT_LENGTH, "10".parse().unwrap());
        assert_eq!(content_length(&h).unwrap(), Some(10));
        h.append(header::CONTENT_LENGTH, "11".parse().unwrap());
        assert!(content_length(&h).is_err());
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, "+1".parse().unwrap());
        assert!(content_length(&h).is_err());
    }
}
