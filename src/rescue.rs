//! Turns every [`Refused`] from the layers below into its problem+json response, through
//! [`crate::error::problem`]. Above this layer the stack cannot fail.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::{Body, Refusal, Refused, grpc_problem, is_grpc, problem};
use crate::header_names::X_REQUEST_ID;

#[derive(Clone, Copy, Default)]
pub struct RescueLayer;

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Rescue {
            inner,
            not_ready: None,
        }
    }
}

pub struct Rescue<S> {
    inner: S,
    /// A readiness error, answered by the next `call` (this layer itself cannot fail).
    not_ready: Option<Refused>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Refused>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RescueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if let Err(refused) = ready!(self.inner.poll_ready(cx)) {
            self.not_ready = Some(refused);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let answer = Answer {
            request_id: request.headers().get(&X_REQUEST_ID).cloned(),
            grpc: is_grpc(request.headers()),
        };
        match self.not_ready.take() {
            Some(refused) => RescueFuture::Refused {
                refused: Some(refused),
                answer,
            },
            None => RescueFuture::Inner {
                inner: self.inner.call(request),
                answer,
            },
        }
    }
}

/// How a refusal is answered: with the request's id, and in gRPC's terms to a gRPC request.
pub struct Answer {
    request_id: Option<HeaderValue>,
    grpc: bool,
}

impl Answer {
    fn refuse(&self, refused: Refused) -> Response<Body> {
        if self.grpc {
            grpc_problem(refused, self.request_id.as_ref())
        } else {
            problem(refused, self.request_id.as_ref())
        }
    }
}

pin_project! {
    #[project = RescueProj]
    pub enum RescueFuture<F> {
        Inner { #[pin] inner: F, answer: Answer },
        Refused { refused: Option<Refused>, answer: Answer },
    }
}

impl<F> Future for RescueFuture<F>
where
    F: Future<Output = Result<Response<Body>, Refused>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (refused, answer) = match self.project() {
            RescueProj::Inner { inner, answer } => match ready!(inner.poll(cx)) {
                Ok(response) => return Poll::Ready(Ok(response)),
                Err(refused) => (refused, answer),
            },
            RescueProj::Refused { refused, answer } => (
                refused.take().unwrap_or_else(|| {
                    Refusal::Internal("rescue future polled after completion").into()
                }),
                answer,
            ),
        };
        Poll::Ready(Ok(answer.refuse(refused)))
    }
}
