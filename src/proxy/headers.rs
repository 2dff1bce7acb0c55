//! Header rewriting between client and upstream: hop-by-hop headers (RFC 9110 §7.6.1) and the
//! `X-Forwarded-*` set.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::observe::X_REQUEST_ID;

/// Hop-by-hop headers that are never forwarded, whatever `Connection` says.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes the hop-by-hop headers and every header a `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (standard names compare as small integers) finds which are
    // there; most messages have none, or only `Connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if present[0] && names_options(headers) {
        remove_connection_options(headers);
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(name);
    }
}

/// Whether a `Connection` header may name a header to remove: anything but the bare
/// `keep-alive` or `close` nearly every upstream response carries (splitting that into tokens
/// cost ~600 of the ~9,000 instructions forwarding a request took).
fn names_options(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|value| {
        let value = value.as_bytes();
        !value.eq_ignore_ascii_case(b"keep-alive") && !value.eq_ignore_ascii_case(b"close")
    })
}

/// Removes the headers a `Connection` header names (`Connection: close, X-Foo`); names that
/// are hop-by-hop anyway, and `close`, need no header name of their own. `X-Request-Id` is the
/// gateway's own and stays, whatever the other side names.
fn remove_connection_options(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.eq_ignore_ascii_case("close")
                && !token.eq_ignore_ascii_case(X_REQUEST_ID.as_str())
                && !HOP_BY_HOP
                    .iter()
                    .any(|h| token.eq_ignore_ascii_case(h.as_str()))
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host`. A client's `X-Forwarded-For` is replaced by the socket
/// peer, the only address the gateway can vouch for, unless the peer is a trusted proxy
/// (`extend`), whose chain is kept and the peer appended.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    extend: bool,
    tls: bool,
    host: Option<HeaderValue>,
) {
    let prior: Vec<&str> = if extend {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    let value = if prior.is_empty() {
        Some(peer.clone())
    } else {
        // IP addresses and visible ASCII from valid header values make a valid header value.
        let peer = peer.to_str().unwrap_or("unknown");
        HeaderValue::try_from(format!("{}, {peer}", prior.join(", "))).ok()
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
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
    fn connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "X-Foo, keep-alive".parse().unwrap());
        h.append(header::CONNECTION, "x-bar".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        h.insert("x-bar", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn the_request_id_stays_whatever_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "X-Request-Id, x-foo".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-request-id"]
        );
    }

    #[test]
    fn a_bare_keep_alive_or_close_removes_only_itself() {
        for value in ["keep-alive", "Keep-Alive", "close"] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, value.parse().unwrap());
            h.insert("x-kept", "1".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        }
        // A second Connection value still names its headers.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        h.append(header::CONNECTION, "x-foo".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn forwarded_headers_replace_client_values() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.insert("x-forwarded-host", "evil".parse().unwrap());
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            false,
            true,
            Some("api.test".parse().unwrap()),
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.test");
        // Behind a trusted proxy the chain is kept and the proxy appended.
        h.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("10.0.0.2"),
            true,
            false,
            None,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
    }
}
