//! Removes client-sent copies of the identity headers the gateway itself sets for upstreams
//! (`X-Consumer-*`, `X-Stepgate-*`): an upstream must be able to trust them, so a client can
//! never supply them.

use http::Request;

use crate::error::Refusal;
use crate::guard::Guard;

#[derive(Clone, Copy, Default)]
pub struct StripIdentity;

/// Is `name` (lower-case, as `http` stores it) one of the gateway's identity headers?
pub fn is_identity_header(name: &str) -> bool {
    name.starts_with("x-consumer-") || name.starts_with("x-stepgate-")
}

/// Headers the gateway may add before forwarding: three `X-Consumer-*`, `X-Stepgate-Auth`, and
/// three `X-Forwarded-*`.
const ADDED_HEADERS: usize = 7;

impl<B> Guard<B> for StripIdentity {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let headers = request.headers_mut();
        // Room for what the gateway adds, made once: hyper sizes the map for the headers it
        // parsed, and growing it rehashes every entry, up to twice per request otherwise. A
        // map at its size limit simply grows later.
        let _ = headers.try_reserve(ADDED_HEADERS);
        // Collecting only when there is something to remove keeps the common case allocation-free.
        if headers.keys().any(|n| is_identity_header(n.as_str())) {
            let doomed: Vec<_> = headers
                .keys()
                .filter(|n| is_identity_header(n.as_str()))
                .cloned()
                .collect();
            for name in doomed {
                headers.remove(name);
            }
        }
        Ok(())
    }
}
