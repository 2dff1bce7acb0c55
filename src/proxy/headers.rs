//! The facts about the connection an upstream is told: `X-Forwarded-*`, `X-Real-IP` and
//! `Forwarded`. (Hop-by-hop headers are removed from requests before routing, by
//! `client_headers`, and from responses by `client_headers::strip_hop_by_hop`.)

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub use crate::header_names::{
    FORWARDED, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP,
};

/// What the gateway vouches for about the connection a request came on.
pub struct ConnectionFacts<'a> {
    /// The socket peer's address, and as a header value.
    pub peer_ip: IpAddr,
    pub peer: &'a HeaderValue,
    /// This gateway's `Forwarded` element for the request.
    pub forwarded: HeaderValue,
    /// The client's address: the peer, or the client a trusted proxy names.
    pub client: IpAddr,
    /// The peer is a trusted proxy: its `X-Forwarded-For` and `Forwarded` are extended, not
    /// replaced.
    pub via_trusted_proxy: bool,
    pub tls: bool,
    /// The request's canonical host.
    pub host: Option<&'a HeaderValue>,
}

/// Sets `X-Forwarded-For/-Proto/-Host`, `X-Real-IP` and `Forwarded` (RFC 7239). A client's
/// copies were removed before routing (`client_headers`) unless the peer is a trusted proxy,
/// whose `X-Forwarded-For` and `Forwarded` chains are kept and the peer appended. The host is
/// the canonical one the request was routed by.
pub fn set_forwarded(headers: &mut HeaderMap, facts: &ConnectionFacts<'_>) {
    let proto = if facts.tls { "https" } else { "http" };
    let chained = |headers: &HeaderMap, name: &HeaderName, own: &str| -> Option<HeaderValue> {
        let prior: Vec<&str> = if facts.via_trusted_proxy {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        } else {
            Vec::new()
        };
        let value = if prior.is_empty() {
            own.to_owned()
        } else {
            format!("{}, {own}", prior.join(", "))
        };
        // IP addresses, tokens and visible ASCII from valid header values make a valid value.
        HeaderValue::try_from(value).ok()
    };
    let xff = if facts.via_trusted_proxy {
        chained(
            headers,
            &X_FORWARDED_FOR,
            facts.peer.to_str().unwrap_or("unknown"),
        )
    } else {
        Some(facts.peer.clone())
    };
    if let Some(value) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    let forwarded = if facts.via_trusted_proxy {
        chained(
            headers,
            &FORWARDED,
            facts.forwarded.to_str().unwrap_or("for=unknown"),
        )
    } else {
        Some(facts.forwarded.clone())
    };
    if let Some(value) = forwarded {
        headers.insert(FORWARDED.clone(), value);
    }
    let real_ip = if facts.client == facts.peer_ip {
        Some(facts.peer.clone())
    } else {
        HeaderValue::try_from(facts.client.to_string()).ok()
    };
    if let Some(value) = real_ip {
        headers.insert(X_REAL_IP.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match facts.host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_replace_client_values() {
        let peer = HeaderValue::from_static("127.0.0.1");
        let host = HeaderValue::from_static("api.test:8443");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.insert("x-forwarded-host", "evil".parse().unwrap());
        let facts = ConnectionFacts {
            peer_ip: "127.0.0.1".parse().unwrap(),
            peer: &peer,
            forwarded: HeaderValue::from_static(
                r#"for=127.0.0.1;proto=https;host="api.test:8443""#,
            ),
            client: "127.0.0.1".parse().unwrap(),
            via_trusted_proxy: false,
            tls: true,
            host: Some(&host),
        };
        set_forwarded(&mut h, &facts);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.test:8443");
        assert_eq!(h["x-real-ip"], "127.0.0.1");
        assert_eq!(
            h["forwarded"],
            r#"for=127.0.0.1;proto=https;host="api.test:8443""#
        );
        // Behind a trusted proxy the chains are kept and the proxy appended; X-Real-IP is the
        // client the proxy names.
        let proxy = HeaderValue::from_static("10.0.0.2");
        h.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        h.insert("forwarded", "for=203.0.113.7".parse().unwrap());
        let facts = ConnectionFacts {
            peer_ip: "10.0.0.2".parse().unwrap(),
            peer: &proxy,
            forwarded: HeaderValue::from_static("for=10.0.0.2;proto=http"),
            client: "203.0.113.7".parse().unwrap(),
            via_trusted_proxy: true,
            tls: false,
            host: None,
        };
        set_forwarded(&mut h, &facts);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.2");
        assert_eq!(h["forwarded"], "for=203.0.113.7, for=10.0.0.2;proto=http");
        assert_eq!(h["x-real-ip"], "203.0.113.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-host"));
    }
}
