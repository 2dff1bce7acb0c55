//! The routing layer: picks the route for a request (404 when none), applies the route's body
//! limit to a declared `Content-Length`, and hands the route to the layers below as a request
//! extension. Refusals from below come back tagged with the route for the access log.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Method, Request, Response, header};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::Route;
use crate::context::Context as RequestContext;
use crate::error::{Refusal, Refused};
use crate::snapshot::Snapshot;

#[derive(Clone, Copy, Default)]
pub struct RouteLayer;

impl<S> Layer<S> for RouteLayer {
    type Service = Routed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Routed { inner }
    }
}

#[derive(Clone)]
pub struct Routed<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for Routed<S>
where
    S: Service<Request<B>, Response = Response<R>, Error = Refusal>,
{
    type Response = Response<R>;
    type Error = Refused;
    type Future = RoutedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Refused::from)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let route = match select(&request) {
            Ok(route) => route,
            Err(refused) => {
                return RoutedFuture::Refused {
                    refused: Some(refused),
                };
            }
        };
        match RequestContext::of_mut(&mut request) {
            Ok(context) => context.route = Some(route.clone()),
            Err(refusal) => {
                return RoutedFuture::Refused {
                    refused: Some(refusal.into()),
                };
            }
        }
        RoutedFuture::Inner {
            future: self.inner.call(request),
            route: Some(route),
        }
    }
}

/// A refusal on `route`, with what the answer needs of it: the policy's OTP challenge, and
/// the route itself for the access log.
fn refused_on(route: Arc<Route>, refusal: Refusal) -> Refused {
    let mut refused = Refused::from(refusal);
    refused.challenge_methods = Some(route.policy.challenge_methods.clone());
    refused.extensions.insert(route);
    refused
}

fn select<B>(request: &Request<B>) -> Result<Arc<Route>, Refused> {
    let context = RequestContext::of(request)?;
    let snapshot = &context.snapshot;
    let host = context.host.as_ref().map(crate::host::Host::name_bytes);
    let path = request.uri().path();
    // An HTTP/2 WebSocket (extended CONNECT) is routed as the GET upgrade it stands for, so
    // that one route (and its `methods`) serves both forms.
    let method = if context.websocket && request.method() == Method::CONNECT {
        &Method::GET
    } else {
        request.method()
    };
    // The gateway's own endpoints first: validation keeps routes out of the prefix, and a
    // catch-all route must not swallow the security page.
    let route = match snapshot.self_service.strip(path) {
        Some("/step-up") => step_up_route(snapshot, request)?,
        Some(rest) => self_service_route(snapshot, rest)?,
        None => snapshot
            .routes
            .find(host, method, path)
            .ok_or_else(|| Refusal::NoRoute)?,
    };
    if let Some(length) = content_length(request.headers())?
        && length > route.body_bytes
    {
        return Err(refused_on(
            route.clone(),
            Refusal::BodyTooLarge {
                limit: route.body_bytes,
            },
        ));
    }
    Ok(route.clone())
}

/// The synthetic route for a path under the self-service prefix (`rest` is what follows the
/// prefix): the page and its assets, or the enrolment API. Which call it is, and its method,
/// is `selfservice`'s to check. Nothing here when self-service is disabled.
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

pin_project! {
    #[project = RoutedProj]
    pub enum RoutedFuture<F> {
        Inner { #[pin] future: F, route: Option<Arc<Route>> },
        Refused { refused: Option<Refused> },
    }
}

impl<F, R> Future for RoutedFuture<F>
where
    F: Future<Output = Result<Response<R>, Refusal>>,
{
    type Output = Result<Response<R>, Refused>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RoutedProj::Inner { future, route } => Poll::Ready(match ready!(future.poll(cx)) {
                Ok(mut response) => {
                    if let Some(route) = route.take() {
                        response.extensions_mut().insert(route);
                    }
                    Ok(response)
                }
                Err(refusal) => Err(match route.take() {
                    Some(route) => refused_on(route, refusal),
                    None => refusal.into(),
                }),
            }),
            RoutedProj::Refused { refused } => {
                Poll::Ready(Err(refused.take().unwrap_or_else(|| {
                    Refusal::Internal("routing future polled after completion").into()
                })))
            }
        }
    }
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
