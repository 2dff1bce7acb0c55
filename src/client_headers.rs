//! The client's headers, cleaned in one pass before routing, so that nothing the gateway adds
//! later can be removed or impersonated by the client:
//!
//! - a header whose name reads, with `_` as `-`, as a credential, identity or connection-fact
//!   header (`X_Consumer_Name`, `X_Api_Key`) is refused: CGI-style upstreams cannot tell it
//!   from the real one. Other names with `_` follow `limits.headers_with_underscores`
//!   (`drop`, as nginx does by default; `reject`; `allow`);
//! - client copies of the identity headers (`X-Consumer-*`, `X-Stepgate-*`) are removed, and
//!   `Forwarded` and `X-Real-IP` too unless a trusted proxy sent them (forwarding sets them
//!   like `X-Forwarded-*`);
//! - hop-by-hop headers, and the headers `Connection` names, are removed *now*, before the
//!   gateway adds its own: a `Connection` option naming a credential or identity header is
//!   refused rather than obeyed. Two survive in a form: `TE: trailers` (it only says the client
//!   takes trailers, which the gateway passes end to end, and gRPC servers insist on it), and
//!   a WebSocket upgrade, reported to the caller for the routes that tunnel one;
//! - a message framed two ways (`Content-Length` with `Transfer-Encoding`), or with a transfer
//!   coding other than `chunked`, is refused and its connection closed (RFC 9112 §6.3 would
//!   let a server pick one reading; a gateway in front of unknown upstreams must not).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::error::Refusal;
use crate::header_names::{cgi_spelling, is_gateway_credential, is_identity, is_protected};

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded whatever `Connection` says.
pub static HOP_BY_HOP: [HeaderName; 9] = [
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
const CONNECTION: usize = 0;
const TE: usize = 5;
const TRANSFER_ENCODING: usize = 7;
const UPGRADE: usize = 8;

/// The position of a hop-by-hop header in [`HOP_BY_HOP`]: one string match (a switch on the
/// length, then one comparison), not a comparison with each of the nine.
fn hop_by_hop(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// Headers the gateway may add to a request before forwarding: `X-Request-Id`, three
/// `X-Consumer-*`, `X-Stepgate-Auth` and `-Auth-Time`, three `X-Forwarded-*`, `X-Real-IP`,
/// `Forwarded` and `Host`.
pub const ADDED_HEADERS: usize = 12;

/// `limits.headers_with_underscores`: what becomes of request headers named with `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underscores {
    /// Removed before forwarding (nginx's default, `underscores_in_headers off`).
    Drop,
    /// Refused with 400.
    Reject,
    /// Forwarded as sent.
    Allow,
}

/// Which of the gateway's credential headers a request carries, found by the cleaning pass so
/// that the layers after it look up only the ones that are there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials(u8);

impl Credentials {
    /// Not looked at (a request that did not pass the cleaning): every one may be there.
    pub const UNKNOWN: Credentials = Credentials(u8::MAX);
    const OTP: u8 = 1;
    const STEP_UP_TOKEN: u8 = 2;
    const APPROVAL: u8 = 4;

    pub fn otp(self) -> bool {
        self.0 & Self::OTP != 0
    }
    pub fn step_up_token(self) -> bool {
        self.0 & Self::STEP_UP_TOKEN != 0
    }
    pub fn approval(self) -> bool {
        self.0 & Self::APPROVAL != 0
    }

    fn of(name: &str) -> u8 {
        match name {
            "x-otp" => Self::OTP,
            "x-step-up-token" => Self::STEP_UP_TOKEN,
            "x-approval" => Self::APPROVAL,
            _ => 0,
        }
    }
}

/// What the cleaning pass found.
#[derive(Debug, Clone, Copy)]
pub struct Cleaned {
    /// The client asked to upgrade the connection to WebSocket (`Upgrade: websocket` named by
    /// `Connection`); both headers are gone either way.
    pub websocket: bool,
    pub credentials: Credentials,
    /// The request carried `Transfer-Encoding` (gone now: the body's framing is hyper's).
    pub chunked: bool,
    /// The request carries `Content-Length` (for the route's body limit to read).
    pub content_length: bool,
    /// A gRPC request (`Content-Type: application/grpc…`): its refusals go in gRPC's terms.
    pub grpc: bool,
}

/// The pass itself (see the module doc). `trusted_peer`: the peer is a trusted proxy, whose
/// `Forwarded` and `X-Real-IP` are kept for forwarding to extend or replace.
pub fn clean(
    headers: &mut HeaderMap,
    underscores: Underscores,
    trusted_peer: bool,
) -> Result<Cleaned, Refusal> {
    let mut hop_by_hop_here = [false; HOP_BY_HOP.len()];
    let mut credentials = 0;
    let (mut content_length, mut content_type) = (false, false);
    // Collected only when there is something to remove: the common request has nothing.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        // Standard names compare as numbers.
        content_length |= name == header::CONTENT_LENGTH;
        content_type |= name == header::CONTENT_TYPE;
        let text = name.as_str();
        if let Some(i) = hop_by_hop(text) {
            hop_by_hop_here[i] = true;
            continue;
        }
        if text.as_bytes().contains(&b'_') {
            if is_protected(&cgi_spelling(text)) {
                return Err(Refusal::LookAlikeHeader(name.clone()));
            }
            match underscores {
                Underscores::Drop => doomed.push(name.clone()),
                Underscores::Reject => return Err(Refusal::UnderscoreHeader(name.clone())),
                Underscores::Allow => {}
            }
        } else if is_identity(text) || (!trusted_peer && matches!(text, "forwarded" | "x-real-ip"))
        {
            doomed.push(name.clone());
        } else {
            credentials |= Credentials::of(text);
        }
    }
    if hop_by_hop_here[TRANSFER_ENCODING] {
        check_framing(headers)?;
    }
    if hop_by_hop_here[CONNECTION] && names_options(headers) {
        connection_options(headers, &mut doomed)?;
    }
    let websocket = hop_by_hop_here[UPGRADE] && asks_for_websocket(headers);
    if hop_by_hop_here[TE] && only_trailers(headers) {
        hop_by_hop_here[TE] = false;
    }
    for name in doomed {
        headers.remove(name);
    }
    for (name, _) in HOP_BY_HOP
        .iter()
        .zip(hop_by_hop_here)
        .filter(|(_, here)| *here)
    {
        headers.remove(name);
    }
    Ok(Cleaned {
        websocket,
        credentials: Credentials(credentials),
        chunked: hop_by_hop_here[TRANSFER_ENCODING],
        content_length,
        grpc: content_type && crate::error::is_grpc(headers),
    })
}

/// `Upgrade` offers `websocket` (RFC 6455 §4.1) and `Connection` names `upgrade`: an upgrade
/// the sender meant (RFC 9110 §7.8).
fn asks_for_websocket(headers: &HeaderMap) -> bool {
    let offers = tokens(headers, &header::UPGRADE).any(|t| t.eq_ignore_ascii_case(b"websocket"));
    offers && tokens(headers, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case(b"upgrade"))
}

/// `TE` says nothing but `trailers`: no transfer coding is asked of anyone.
fn only_trailers(headers: &HeaderMap) -> bool {
    let mut all = tokens(headers, &header::TE);
    matches!((all.next(), all.next()), (Some(t), None) if t.eq_ignore_ascii_case(b"trailers"))
}

/// The comma-separated tokens of every field of a name, trimmed, empty ones skipped.
fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// One framing only, and only `chunked` as a transfer coding (hyper has decoded it; any other
/// coding would reach the upstream still applied, with nothing saying so).
fn check_framing(headers: &HeaderMap) -> Result<(), Refusal> {
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(Refusal::BadFraming(
            "Content-Length and Transfer-Encoding together are ambiguous",
        ));
    }
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    match (codings.next(), codings.next()) {
        (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(Refusal::BadFraming(
            "only `Transfer-Encoding: chunked` is accepted",
        )),
    }
}

/// Whether a `Connection` header may name a header to remove: anything but the bare
/// `keep-alive` or `close` nearly every message carries (splitting those into tokens is
/// measurable on every request).
pub fn names_options(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(is_option_list)
}

/// A `Connection` value other than a bare `keep-alive` or `close`.
fn is_option_list(value: &HeaderValue) -> bool {
    let value = value.as_bytes();
    !value.eq_ignore_ascii_case(b"keep-alive") && !value.eq_ignore_ascii_case(b"close")
}

/// Adds the headers a client's `Connection` names to `doomed`; refuses an option naming a
/// credential or identity header in any spelling (obeying it would let the client delete
/// what the gateway vouches for, or slip a credential past its checks).
fn connection_options(headers: &HeaderMap, doomed: &mut Vec<HeaderName>) -> Result<(), Refusal> {
    for option in headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|o| !o.is_empty())
    {
        let Ok(name) = HeaderName::from_bytes(option) else {
            return Err(Refusal::BadRequest(
                "a Connection option is not a header name",
            ));
        };
        let spelled = cgi_spelling(name.as_str());
        if is_identity(&spelled) || is_gateway_credential(&spelled) {
            return Err(Refusal::ConnectionNamesProtected(name));
        }
        // `X-Request-Id` is the gateway's own by now (the client's was kept only if sane).
        if !option.eq_ignore_ascii_case(b"close")
            && !HOP_BY_HOP.contains(&name)
            && name != crate::header_names::X_REQUEST_ID
        {
            doomed.push(name);
        }
    }
    Ok(())
}

/// Removes a message's hop-by-hop headers and the ones its `Connection` names, refusing
/// nothing: for upstream responses, which the gateway passes on rather than judges.
/// `X-Request-Id` is the gateway's own and stays, whatever the upstream names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP.len()];
    // `Connection` values read in the same pass (nearly always a bare `keep-alive`).
    let mut options = false;
    for (name, value) in headers.iter() {
        if let Some(i) = hop_by_hop(name.as_str()) {
            present[i] = true;
            options |= i == CONNECTION && is_option_list(value);
        }
    }
    if options {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .filter(|name| {
                *name != crate::header_names::X_REQUEST_ID
                    && name.as_str() != "close"
                    && !HOP_BY_HOP.contains(name)
            })
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    fn bad(result: Result<Cleaned, Refusal>) -> String {
        match result {
            Err(refusal) => {
                assert_eq!(refusal.status_code().0, 400, "{refusal}");
                refusal.to_string()
            }
            Ok(_) => panic!("not refused"),
        }
    }

    #[test]
    fn underscore_look_alikes_of_protected_headers_are_refused_in_every_mode() {
        for name in [
            "x_consumer_name",
            "X_Consumer_Roles",
            "x_stepgate_auth",
            "x_api_key",
            "x-api_key",
            "x_otp",
            "x_step_up_token",
            "x_forwarded_for",
            "x_real_ip",
            "x_request_id",
        ] {
            for mode in [Underscores::Drop, Underscores::Reject, Underscores::Allow] {
                let mut h = map(&[(name, "admin")]);
                let detail = bad(clean(&mut h, mode, false));
                assert!(detail.contains(&name.to_ascii_lowercase()), "{detail}");
            }
        }
    }

    #[test]
    fn other_underscore_headers_follow_the_setting() {
        let mut h = map(&[("x_trace", "1"), ("accept", "*/*")]);
        clean(&mut h, Underscores::Drop, false).unwrap();
        assert_eq!(names(&h), ["accept"]);
        let mut h = map(&[("x_trace", "1")]);
        clean(&mut h, Underscores::Allow, false).unwrap();
        assert_eq!(names(&h), ["x_trace"]);
        let mut h = map(&[("x_trace", "1")]);
        bad(clean(&mut h, Underscores::Reject, false));
    }

    #[test]
    fn identity_and_untrusted_connection_facts_are_removed() {
        let pairs = [
            ("x-consumer-name", "admin"),
            ("x-stepgate-auth", "key+totp"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-kept", "1"),
        ];
        let mut h = map(&pairs);
        clean(&mut h, Underscores::Drop, false).unwrap();
        assert_eq!(names(&h), ["x-kept"]);
        // A trusted proxy's Forwarded and X-Real-IP stay for forwarding to extend.
        let mut h = map(&pairs);
        clean(&mut h, Underscores::Drop, true).unwrap();
        assert_eq!(names(&h), ["forwarded", "x-kept", "x-real-ip"]);
    }

    #[test]
    fn connection_options_are_removed_before_anything_is_added_and_protected_ones_refused() {
        let mut h = map(&[
            ("connection", "close, X-Foo"),
            ("connection", "x-bar, keep-alive"),
            ("x-foo", "1"),
            ("x-bar", "1"),
            ("te", "gzip"),
            ("x-kept", "1"),
        ]);
        clean(&mut h, Underscores::Drop, false).unwrap();
        assert_eq!(names(&h), ["x-kept"]);
        for option in [
            "X-Consumer-Id",
            "x-consumer-name",
            "X-Stepgate-Auth",
            "X-Api-Key",
            "x-otp",
            "X-Step-Up-Token",
            "X_Consumer_Name",
        ] {
            let mut h = map(&[("connection", &format!("close, {option}"))]);
            let detail = bad(clean(&mut h, Underscores::Drop, false));
            assert!(detail.contains("Connection"), "{detail}");
        }
        let mut h = map(&[("connection", "close, bad header")]);
        bad(clean(&mut h, Underscores::Drop, false));
    }

    #[test]
    fn the_credential_headers_present_are_reported() {
        let mut h = map(&[
            ("x-otp", "123456"),
            ("x-approval", "apr_1"),
            ("accept", "*/*"),
        ]);
        let found = clean(&mut h, Underscores::Drop, false).unwrap().credentials;
        assert!(found.otp() && found.approval() && !found.step_up_token());
        let mut h = map(&[("x-step-up-token", "sgt_x")]);
        let found = clean(&mut h, Underscores::Drop, false).unwrap().credentials;
        assert!(!found.otp() && !found.approval() && found.step_up_token());
        let unknown = Credentials::UNKNOWN;
        assert!(unknown.otp() && unknown.approval() && unknown.step_up_token());
    }

    #[test]
    fn te_trailers_stays_and_any_other_te_goes() {
        let mut h = map(&[("te", "Trailers"), ("connection", "te")]);
        clean(&mut h, Underscores::Drop, false).unwrap();
        assert_eq!(names(&h), ["te"]);
        for te in ["trailers, deflate", "gzip", "trailers;q=0.5"] {
            let mut h = map(&[("te", te)]);
            clean(&mut h, Underscores::Drop, false).unwrap();
            assert!(h.is_empty(), "{te}");
        }
    }

    #[test]
    fn a_websocket_upgrade_is_reported_and_its_headers_removed() {
        for (upgrade, connection, asked) in [
            ("websocket", "Upgrade", true),
            ("WebSocket", "keep-alive, upgrade", true),
            ("h2c", "Upgrade, HTTP2-Settings", false),
            ("websocket", "keep-alive", false),
        ] {
            let mut h = map(&[("upgrade", upgrade), ("connection", connection)]);
            h.insert(
                "sec-websocket-key",
                "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
            );
            let got = clean(&mut h, Underscores::Drop, false).unwrap().websocket;
            assert_eq!(got, asked, "{upgrade} / {connection}");
            assert!(!h.contains_key("upgrade") && !h.contains_key("connection"));
            assert!(
                h.contains_key("sec-websocket-key"),
                "end-to-end headers stay"
            );
        }
    }

    #[test]
    fn a_message_framed_two_ways_or_with_another_coding_is_refused() {
        let mut h = map(&[("transfer-encoding", "chunked"), ("content-length", "5")]);
        bad(clean(&mut h, Underscores::Drop, false));
        for te in ["gzip, chunked", "chunked, chunked", "identity", ""] {
            let mut h = map(&[("transfer-encoding", te)]);
            bad(clean(&mut h, Underscores::Drop, false));
        }
        let mut h = map(&[("transfer-encoding", "Chunked")]);
        clean(&mut h, Underscores::Drop, false).unwrap();
        assert!(h.is_empty());
    }

    #[test]
    fn the_hop_by_hop_match_is_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name.as_str()), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop("x-keep-alive"), None);
    }

    #[test]
    fn responses_lose_hop_by_hop_headers_but_keep_the_request_id() {
        let mut h = map(&[
            ("connection", "X-Request-Id, x-foo"),
            ("x-request-id", "abc"),
            ("x-foo", "1"),
            ("keep-alive", "timeout=5"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-request-id"]);
        for value in ["keep-alive", "Keep-Alive", "close"] {
            let mut h = map(&[("connection", value), ("x-kept", "1")]);
            strip_hop_by_hop(&mut h);
            assert_eq!(names(&h), ["x-kept"]);
        }
    }
}
