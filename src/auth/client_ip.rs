//! Who the client is, network-wise: the socket peer, or, when the peer is one of the
//! configured `trusted_proxies`, the right-most address in `X-Forwarded-For` that is not a
//! trusted proxy itself (the left part of the header is whatever the client wrote).

use std::net::IpAddr;

use http::Request;

use crate::context::Context;
use crate::error::Refusal;
use crate::guard::Guard;
use crate::header_names::X_FORWARDED_FOR;

pub use crate::connection::ClientIp;

#[derive(Clone, Copy, Default)]
pub struct ClientAddr;

impl<B> Guard<B> for ClientAddr {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let context = Context::of(request)?;
        let peer = context.conn.peer.ip();
        let trusted = &context.snapshot.trusted_proxies;
        let client = if trusted.iter().any(|net| net.contains(&peer)) {
            ClientIp {
                ip: from_forwarded_for(request.headers(), trusted).unwrap_or(peer),
                via_trusted_proxy: true,
            }
        } else {
            ClientIp {
                ip: peer,
                via_trusted_proxy: false,
            }
        };
        Context::of_mut(request)?.client = Some(client);
        Ok(())
    }
}

fn from_forwarded_for(headers: &http::HeaderMap, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    // Right to left over all the header lines, as one comma-separated list.
    for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        for hop in value.to_str().ok()?.rsplit(',') {
            let ip: IpAddr = hop.trim().parse().ok()?;
            if !trusted.iter().any(|net| net.contains(&ip)) {
                return Some(ip);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.7, 10.0.0.2".parse().unwrap(),
        );
        assert_eq!(
            from_forwarded_for(&h, &trusted),
            Some("203.0.113.7".parse().unwrap())
        );
        h.insert("x-forwarded-for", "garbage, 10.0.0.2".parse().unwrap());
        assert_eq!(from_forwarded_for(&h, &trusted), None);
        h.insert("x-forwarded-for", "10.0.0.3".parse().unwrap());
        assert_eq!(from_forwarded_for(&h, &trusted), None);
    }
}
