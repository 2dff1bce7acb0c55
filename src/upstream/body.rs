//! Request body limit for streamed bodies (chunked HTTP/1.1, HTTP/2 without a length): the
//! declared `Content-Length` is checked before forwarding, this catches the rest as it streams.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::BoxError;

/// The error a [`Limited`] body fails with; found again in the upstream client's error chain to
/// answer 413 rather than 502.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyLimitExceeded {
    pub limit: u64,
}

/// An error of the client's own body (a malformed chunk, a connection cut mid-body), wrapped
/// so that it is found again in the upstream client's error chain and answered as the
/// client's fault (400), not the upstream's (502).
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] pub BoxError);

pin_project! {
    pub struct Limited<B> {
        #[pin]
        inner: B,
        remaining: u64,
        limit: u64,
    }
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        Self {
            inner,
            remaining: limit,
            limit,
        }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = match ready!(this.inner.poll_frame(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(ClientBodyError(e.into()))))),
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > *this.remaining {
                *this.remaining = 0;
                return Poll::Ready(Some(Err(Box::new(BodyLimitExceeded {
                    limit: *this.limit,
                }))));
            }
            *this.remaining -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Finds a [`BodyLimitExceeded`] anywhere in an error's source chain.
pub fn limit_exceeded(error: &(dyn std::error::Error + 'static)) -> Option<u64> {
    find::<BodyLimitExceeded>(error).map(|e| e.limit)
}

/// Whether the client's own body failed somewhere in an error's source chain.
pub fn client_body_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    find::<ClientBodyError>(error).is_some()
}

/// The refusal for a request body that failed while being sent upstream, if it was the
/// client's doing (over the limit, malformed or cut off).
pub fn client_refusal(error: &(dyn std::error::Error + 'static)) -> Option<crate::error::Refusal> {
    if let Some(limit) = limit_exceeded(error) {
        return Some(crate::error::Refusal::BodyTooLarge { limit });
    }
    client_body_failed(error).then_some(crate::error::Refusal::BadBody)
}

fn find<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn passes_bodies_within_the_limit() {
        let body = Limited::new(Full::new(Bytes::from_static(b"12345")), 5);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "12345");
    }

    #[tokio::test]
    async fn fails_bodies_over_the_limit() {
        let body = Limited::new(Full::new(Bytes::from_static(b"123456")), 5);
        let error = body.collect().await.unwrap_err();
        assert_eq!(limit_exceeded(error.as_ref()), Some(5));
    }
}
