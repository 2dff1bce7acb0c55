//! Protocol limits checked before routing: request-target length (414) and header count and
//! size (431). hyper enforces looser hard limits of its own underneath (see `server`), so a
//! request that gets here is bounded already; this guard gives the precise, documented limit
//! and a problem+json answer. Body limits depend on the route and live in `routing::layer`
//! and `proxy::body`.

use http::Request;

use crate::config::Snapshot;
use crate::error::Refusal;
use crate::guard::Guard;

#[derive(Clone, Copy, Default)]
pub struct ProtocolLimits;

impl<B> Guard<B> for ProtocolLimits {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
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
