//! The front of the stack and the answer to every request: the request's id; the guards
//! before the decision (protocol limits, canonical host and path, client address, client
//! headers, routing), run here in `call` so that this layer knows the route of every answer;
//! the refusals of the guards and of the layers below rendered (as problem+json with the
//! route policy's challenge, or in gRPC's terms to a gRPC request); the security headers under
//! the self-service prefix; and one access event per request when the response head is ready
//! (target `stepgate::access`). One layer and one future for all of it (a layer each moved the
//! request and the response through six futures, and the route travelled back in the
//! response's extensions). Above this layer the stack cannot fail.
//!
//! Only method, path (never the query), route, upstream, status, problem code, duration and
//! request id are logged: no header value, so no credential, can reach the log.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::{Either, Ready};
use http::{HeaderValue, Method, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::context::Context as RequestContext;
use crate::error::{Body, ProblemCode, Refusal, Refused, grpc_problem, is_grpc, problem};
use crate::guard::Guard;
use crate::metrics::Metrics;
use crate::routing::Route;
use crate::security_headers;

pub use crate::header_names::X_REQUEST_ID;

/// The front layer, running `guards` (the checks before the decision, routing last) before
/// the layers below.
#[derive(Clone)]
pub struct ObserveLayer<G> {
    metrics: Arc<Metrics>,
    guards: G,
}

impl<G> ObserveLayer<G> {
    pub fn new(metrics: Arc<Metrics>, guards: G) -> Self {
        Self { metrics, guards }
    }
}

impl<G: Clone, S> Layer<S> for ObserveLayer<G> {
    type Service = Observe<G, S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            metrics: self.metrics.clone(),
            guards: self.guards.clone(),
            inner,
            not_ready: None,
        }
    }
}

pub struct Observe<G, S> {
    metrics: Arc<Metrics>,
    guards: G,
    inner: S,
    /// A readiness error, answered by the next `call` (this layer itself cannot fail).
    not_ready: Option<Refusal>,
}

impl<G: Clone, S: Clone> Clone for Observe<G, S> {
    fn clone(&self) -> Self {
        Self {
            metrics: self.metrics.clone(),
            guards: self.guards.clone(),
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<G, S, B> Service<Request<B>> for Observe<G, S>
where
    G: Guard<B>,
    S: Service<Request<B>, Response = Response<Body>, Error = Refusal>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if let Err(refusal) = ready!(self.inner.poll_ready(cx)) {
            self.not_ready = Some(refusal);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let start = Instant::now();
        let id = match request.headers().get(&X_REQUEST_ID) {
            Some(id) if is_sane_request_id(id) => id.clone(),
            _ => generate_request_id(),
        };
        let headers = request.headers_mut();
        // Room for what the gateway adds on the way, made once before the first: hyper sizes
        // the map for the headers it parsed, and growing it rehashes every entry. (A map at
        // its size limit grows later.)
        let _ = headers.try_reserve(crate::client_headers::ADDED_HEADERS);
        headers.insert(X_REQUEST_ID.clone(), id.clone());
        // By the raw path (refusals before routing, e.g. 404 under the prefix); the route is
        // looked at too, when the answer comes.
        let under_prefix = security_headers::under_prefix(&request);
        let method = request.method().clone();
        // A clone of the URI shares its bytes: no allocation on the request path.
        let uri = request.uri().clone();
        let checked = self.guards.check(&mut request);
        // Recorded by routing, also when a check after it refused the request; gRPC or not
        // by the client-headers pass, unless the request was refused before it.
        let (route, grpc) = match RequestContext::of(&request) {
            Ok(context) => (context.route.clone(), context.grpc),
            Err(_) => (None, None),
        };
        let answer = Answer {
            grpc: grpc.unwrap_or_else(|| is_grpc(request.headers())),
            under_prefix,
        };
        let inner = match (self.not_ready.take(), checked) {
            (None, Ok(())) => Either::Left(self.inner.call(request)),
            (Some(refusal), _) | (None, Err(refusal)) => {
                Either::Right(futures_util::future::ready(Err(refusal)))
            }
        };
        ObserveFuture {
            inner,
            metrics: self.metrics.clone(),
            start,
            method,
            uri,
            id,
            answer,
            route,
        }
    }
}

/// How a request is answered besides its response: in gRPC's terms when refused, with the
/// security headers.
struct Answer {
    grpc: bool,
    under_prefix: bool,
}

impl Answer {
    fn refuse(
        &self,
        refusal: Refusal,
        route: Option<&Arc<Route>>,
        id: &HeaderValue,
    ) -> Response<Body> {
        let refused = Refused {
            refusal,
            challenge_methods: route.map(|r| r.policy.challenge_methods.clone()),
        };
        if self.grpc {
            grpc_problem(refused, Some(id))
        } else {
            problem(refused, Some(id))
        }
    }
}

/// A client's id is kept if it is short printable ASCII, so it can be logged verbatim.
fn is_sane_request_id(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// A new request id, in UUID form: a random version-4 UUID drawn once per thread, then
/// counted up in its low 62 bits (random bits of a v4 UUID; the version and variant stay).
/// Unique (the threads' starts are 122 random bits apart), without a random draw per
/// request; not meant to be unpredictable: an id names a request, it grants nothing.
fn generate_request_id() -> HeaderValue {
    const COUNTED: u128 = (1 << 62) - 1;
    thread_local! {
        static NEXT: std::cell::Cell<u128> =
            std::cell::Cell::new(uuid::Uuid::new_v4().as_u128());
    }
    let id = NEXT.with(|next| {
        let id = next.get();
        next.set((id & !COUNTED) | (id.wrapping_add(1) & COUNTED));
        id
    });
    let mut buffer = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::from_u128(id)
        .hyphenated()
        .encode_lower(&mut buffer);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pin_project! {
    pub struct ObserveFuture<F> {
        #[pin]
        inner: Either<F, Ready<Result<Response<Body>, Refusal>>>,
        metrics: Arc<Metrics>,
        start: Instant,
        method: Method,
        uri: http::Uri,
        id: HeaderValue,
        answer: Answer,
        route: Option<Arc<Route>>,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<Body>, Refusal>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let route = this.route.as_ref();
        let mut response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(refusal) => this.answer.refuse(refusal, route, this.id),
        };
        // By the route too: a path that only its canonical form puts under the prefix.
        if this.answer.under_prefix || route.is_some_and(security_headers::builtin) {
            security_headers::add(response.headers_mut());
        }
        let problem = response.extensions().get::<ProblemCode>();
        // A refusal's own status, also when it went out in gRPC's terms (as a 200).
        let status = problem.map_or(response.status(), |p| p.status).as_u16();
        let elapsed = this.start.elapsed();
        this.metrics
            .request(route.map(|r| (&r.label, &r.metrics)), status, elapsed);
        tracing::info!(
            target: "stepgate::access",
            method = %this.method,
            path = %this.uri.path(),
            route = route.map(|r| r.name.as_str()),
            upstream = route.map(|r| r.upstream.name.as_str()),
            status,
            code = problem.map(|p| p.code),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            request_id = this.id.to_str().unwrap_or(""),
        );
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), this.id.clone());
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| generate_request_id().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 4, "{id}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }
}
