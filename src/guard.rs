//! A layer for checks that decide synchronously from the request alone: run the check in
//! `call`, then either call the inner service or answer with the refusal at once. `poll_ready`
//! only forwards, so a guard never holds capacity of the inner service.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::Request;
use tower::{Layer, Service};

use crate::error::Refusal;

/// A synchronous check that may rewrite the request or refuse it.
pub trait Guard<B> {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal>;
}

/// Guards in a tuple run in order, the first refusal ending the request: one layer for several
/// checks that sit next to each other, so the request and the futures are not moved through a
/// layer per check.
macro_rules! guard_tuple {
    ($($g:ident . $i:tt),+) => {
        impl<B, $($g: Guard<B>),+> Guard<B> for ($($g,)+) {
            fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
                $(self.$i.check(request)?;)+
                Ok(())
            }
        }
    };
}

guard_tuple!(G1.0, G2.1);
guard_tuple!(G1.0, G2.1, G3.2);
guard_tuple!(G1.0, G2.1, G3.2, G4.3);
guard_tuple!(G1.0, G2.1, G3.2, G4.3, G5.4);
guard_tuple!(G1.0, G2.1, G3.2, G4.3, G5.4, G6.5);

/// Wraps a service so that `G` runs before it.
#[derive(Clone)]
pub struct GuardLayer<G>(pub G);

impl<G: Clone, S> Layer<S> for GuardLayer<G> {
    type Service = Guarded<G, S>;
    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            guard: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Guarded<G, S> {
    guard: G,
    inner: S,
}

impl<G, S, B> Service<Request<B>> for Guarded<G, S>
where
    G: Guard<B>,
    S: Service<Request<B>>,
    S::Error: From<Refusal>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match self.guard.check(&mut request) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(refusal) => Either::Right(ready(Err(refusal.into()))),
        }
    }
}
