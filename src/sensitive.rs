//! Marks credential headers sensitive, on requests and responses, so that no `Debug` output
//! anywhere (a log line, a panic message) prints their values.
//!
//! tower-http's `SetSensitiveHeaders` does the same with one map lookup (hash and probe, and a
//! capacity check) per name per message: fourteen for the seven names here. One pass over the
//! few headers a message has, matching each name's text (a length switch, then at most one
//! comparison), costs a fraction of that.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::HeaderMap;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Is `name` (lower-case, as `http` stores it) a header whose values are credentials?
pub fn is_credential(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "proxy-authorization"
            | "cookie"
            | "set-cookie"
            | "x-api-key"
            | "x-otp"
            | "x-step-up-token"
    )
}

fn mark(headers: &mut HeaderMap) {
    for (name, value) in headers.iter_mut() {
        let name = name.as_str();
        // A look-alike (`X_Api_Key`) is refused later, but its value is a credential too.
        // Only a name as long as a credential's can be one.
        if is_credential(name)
            || (matches!(name.len(), 5 | 6 | 9 | 10 | 13 | 15 | 19)
                && name.as_bytes().contains(&b'_')
                && is_credential(&crate::header_names::cgi_spelling(name)))
        {
            value.set_sensitive(true);
        }
    }
}

#[derive(Clone, Copy, Default)]
pub struct SensitiveHeadersLayer;

impl<S> Layer<S> for SensitiveHeadersLayer {
    type Service = SensitiveHeaders<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SensitiveHeaders { inner }
    }
}

#[derive(Clone)]
pub struct SensitiveHeaders<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for SensitiveHeaders<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = SensitiveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        mark(request.headers_mut());
        SensitiveFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    pub struct SensitiveFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, R, E> Future for SensitiveFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = ready!(self.project().inner.poll(cx))?;
        mark(response.headers_mut());
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_headers_are_marked_and_others_are_not() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "sgk_secret".parse().unwrap());
        headers.append("x-otp", "123456".parse().unwrap());
        headers.append("x-otp", "654321".parse().unwrap());
        headers.insert("authorization", "Bearer t".parse().unwrap());
        headers.insert("x-step-up-token", "sgt_t".parse().unwrap());
        headers.insert("x-other", "visible".parse().unwrap());
        mark(&mut headers);
        for (name, value) in &headers {
            assert_eq!(value.is_sensitive(), name != "x-other", "{name}");
        }
        assert!(!format!("{headers:?}").contains("secret"));
    }

    #[test]
    fn the_credential_names_are_the_gateways_own() {
        use crate::auth::api_key::X_API_KEY;
        use crate::auth::second_factor::{X_OTP, X_STEP_UP_TOKEN};
        use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
        for name in [
            &AUTHORIZATION,
            &PROXY_AUTHORIZATION,
            &COOKIE,
            &SET_COOKIE,
            &X_API_KEY,
            &X_OTP,
            &X_STEP_UP_TOKEN,
        ] {
            assert!(is_credential(name.as_str()), "{name}");
        }
        assert!(!is_credential("x-api-keys"));
    }
}
