//! The request's host, canonicalised once before routing: the host routed is the host
//! authorised and the host the upstream is told about (`X-Forwarded-Host`), so that
//! `API.example.com.:443` cannot reach an upstream past a route scoped to `api.example.com`.
//!
//! Canonical form: lower case, one trailing dot removed, the scheme's default port removed
//! (80 in clear text, 443 over TLS), IPv6 literals in their RFC 5952 text. Anything a
//! resolver or an upstream might read another way is refused with 400 instead of guessed at:
//! non-ASCII (IDNA is not done here: send the `xn--` form), empty labels, characters outside
//! letters, digits, `-` and `_`, numeric-looking names that are not a plain dotted quad
//! (`0x7f.1`, `127.000.0.1`), credentials in the authority, and a `Host` header that
//! disagrees with the request target's authority.

use std::fmt;
use std::net::Ipv6Addr;

use http::{HeaderValue, Request, header};

/// Longest host name accepted (DNS: 253 characters without the trailing dot).
const MAX_NAME: usize = 253;

/// A canonical host, `name[:port]`, as a header value (the `X-Forwarded-Host` of the
/// request), and where its name ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    value: HeaderValue,
    name_len: usize,
}

impl Host {
    /// The host name (or IP address, IPv6 without brackets) without port: what routes match.
    pub fn name(&self) -> &str {
        // Canonical hosts are ASCII by construction.
        std::str::from_utf8(self.name_bytes()).unwrap_or("")
    }

    /// [`name`](Self::name) as bytes (lower case), for matching without a UTF-8 check.
    pub fn name_bytes(&self) -> &[u8] {
        let name = &self.value.as_bytes()[..self.name_len];
        let name = name.strip_prefix(b"[").unwrap_or(name);
        name.strip_suffix(b"]").unwrap_or(name)
    }

    /// `name[:port]`, the port only when it is not the scheme's default.
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }

    /// Whether a port other than the scheme's default was given.
    pub fn has_port(&self) -> bool {
        self.name_len < self.value.len()
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.value.as_bytes()).unwrap_or("")
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a host was refused; shown to the client in the 400 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    NotAscii,
    Empty,
    BadCharacter,
    EmptyLabel,
    TooLong,
    BadPort,
    BadIpLiteral,
    NumericName,
    UserInfo,
    Several,
    Conflict,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostError::NotAscii => "the host is not ASCII (send internationalised names as xn--)",
            HostError::Empty => "the host is empty",
            HostError::BadCharacter => {
                "the host has a character other than letters, digits, `-`, `_` and `.`"
            }
            HostError::EmptyLabel => "the host has an empty label (`..`, or a leading `.`)",
            HostError::TooLong => "the host name is longer than 253 characters",
            HostError::BadPort => "the host's port is not a number from 1 to 65535",
            HostError::BadIpLiteral => "the host's IP literal is not a valid IPv6 address",
            HostError::NumericName => {
                "the host looks numeric but is not a plain IPv4 address (a.b.c.d, no leading zeros)"
            }
            HostError::UserInfo => "the request target's authority must not carry credentials",
            HostError::Several => "more than one Host header",
            HostError::Conflict => "the Host header does not match the request target's authority",
        })
    }
}

/// Canonicalises `host` (`name[:port]`, as in a `Host` header or a URI authority) for a
/// connection that is TLS or not. `original`, the header value `raw` came from, is reused
/// when `raw` is canonical already (the usual case: no allocation then).
pub fn canonicalize(
    raw: &[u8],
    tls: bool,
    original: Option<&HeaderValue>,
) -> Result<Host, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    // One pass for what the split needs to know: ASCII only, no credentials, where the
    // port's `:` is.
    let mut colons = 0usize;
    let mut last_colon = 0;
    for (i, &b) in raw.iter().enumerate() {
        match b {
            b':' => {
                colons += 1;
                last_colon = i;
            }
            b'@' => return Err(HostError::UserInfo),
            0x80.. => return Err(HostError::NotAscii),
            _ => {}
        }
    }
    let (name, port_text) = if raw[0] == b'[' {
        split_port(raw)?
    } else {
        match colons {
            0 => (raw, None),
            1 if last_colon + 1 == raw.len() => (&raw[..last_colon], None),
            1 => (&raw[..last_colon], Some(&raw[last_colon + 1..])),
            _ => return Err(HostError::BadIpLiteral),
        }
    };
    let port = match port_text {
        None => None,
        Some(p) => Some(parse_port(p)?),
    };
    let default_port = if tls { 443 } else { 80 };
    let kept_port = port.filter(|p| *p != default_port);

    if let Some(literal) = name.strip_prefix(b"[") {
        let literal = literal.strip_suffix(b"]").ok_or(HostError::BadIpLiteral)?;
        let text = std::str::from_utf8(literal).map_err(|_| HostError::BadIpLiteral)?;
        let ip: Ipv6Addr = text.parse().map_err(|_| HostError::BadIpLiteral)?;
        return Ok(rebuilt(&format!("[{ip}]"), kept_port));
    }
    let trimmed = name.strip_suffix(b".").unwrap_or(name);
    let shape = check_name(trimmed)?;
    // Canonical as sent: nothing to fold, drop or renumber, so the header value is reused.
    let canonical = trimmed.len() == name.len()
        && !shape.upper
        && port == kept_port
        && port_text.is_none_or(|p| p.first() != Some(&b'0'))
        && raw.last() != Some(&b':');
    if canonical {
        let value = match original {
            Some(original) => original.clone(),
            None => HeaderValue::from_bytes(raw).map_err(|_| HostError::BadCharacter)?,
        };
        return Ok(Host {
            value,
            name_len: name.len(),
        });
    }
    Ok(rebuilt(&trimmed.to_ascii_lowercase_string(), kept_port))
}

/// A host rebuilt from its canonical name and the port to keep.
fn rebuilt(name: &str, port: Option<u16>) -> Host {
    let text = match port {
        Some(port) => format!("{name}:{port}"),
        None => name.to_owned(),
    };
    // Letters, digits, `-`, `_`, `.`, `:`, `[` and `]` only: a valid header value.
    Host {
        value: HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("invalid")),
        name_len: name.len(),
    }
}

trait LowercaseString {
    fn to_ascii_lowercase_string(&self) -> String;
}

impl LowercaseString for [u8] {
    fn to_ascii_lowercase_string(&self) -> String {
        self.iter()
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect()
    }
}

/// An IPv6 literal (`[...]`) and the digits after it. An empty port (`host:`) is allowed by
/// RFC 3986 and means none.
fn split_port(raw: &[u8]) -> Result<(&[u8], Option<&[u8]>), HostError> {
    let end = raw
        .iter()
        .position(|b| *b == b']')
        .ok_or(HostError::BadIpLiteral)?;
    let (literal, rest) = raw.split_at(end + 1);
    match rest {
        [] | [b':'] => Ok((literal, None)),
        [b':', port @ ..] => Ok((literal, Some(port))),
        _ => Err(HostError::BadIpLiteral),
    }
}

fn parse_port(port: &[u8]) -> Result<u16, HostError> {
    if port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
        return Err(HostError::BadPort);
    }
    let value = port.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(HostError::BadPort)
}

/// What one pass over a name found.
struct Shape {
    upper: bool,
}

/// A DNS-style name (already without its trailing dot): labels of letters, digits, `-` and
/// `_`. A name whose last label starts with a digit is read as an IPv4 address by URL parsers
/// and many resolvers, so it must be one, written plainly (`a.b.c.d`, each 0 to 255 without
/// leading zeros). One pass over the bytes: this runs on every request.
fn check_name(name: &[u8]) -> Result<Shape, HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(HostError::TooLong);
    }
    let mut upper = false;
    // The current label: its length, whether all digits, its value as a number (capped),
    // whether it starts with `0`; and for a dotted quad, how many labels were plain octets.
    let (mut len, mut digits, mut value, mut zero_first) = (0usize, true, 0u32, false);
    let (mut labels, mut octets) = (0usize, 0usize);
    let mut end_label = |len: usize, digits: bool, value: u32, zero_first: bool| {
        labels += 1;
        if digits && value <= 255 && !(zero_first && len > 1) {
            octets += 1;
        }
    };
    for &b in name {
        match b {
            b'.' => {
                if len == 0 {
                    return Err(HostError::EmptyLabel);
                }
                end_label(len, digits, value, zero_first);
                (len, digits, value, zero_first) = (0, true, 0, false);
                continue;
            }
            b'0'..=b'9' => {
                if len == 0 {
                    zero_first = b == b'0';
                }
                value = (value * 10 + u32::from(b - b'0')).min(1000);
            }
            b'a'..=b'z' | b'-' | b'_' => digits = false,
            b'A'..=b'Z' => {
                digits = false;
                upper = true;
            }
            _ => return Err(HostError::BadCharacter),
        }
        len += 1;
    }
    if len == 0 {
        return Err(HostError::EmptyLabel);
    }
    let first_of_last = name[name.len() - len];
    end_label(len, digits, value, zero_first);
    if first_of_last.is_ascii_digit() && !(labels == 4 && octets == 4) {
        return Err(HostError::NumericName);
    }
    Ok(Shape { upper })
}

/// The request's canonical host: the request target's authority (HTTP/2 `:authority`, or an
/// absolute-form HTTP/1.1 target) and the `Host` header must agree when both are present;
/// `None` when neither is (HTTP/1.0). Two `Host` headers are ambiguous and refused.
pub fn of_request<B>(request: &Request<B>, tls: bool) -> Result<Option<Host>, HostError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Several);
    }
    let from_header = match header {
        Some(value) if !value.is_empty() => Some(canonicalize(value.as_bytes(), tls, Some(value))?),
        _ => None,
    };
    let Some(authority) = request.uri().authority() else {
        return Ok(from_header);
    };
    let from_target = canonicalize(authority.as_str().as_bytes(), tls, None)?;
    match from_header {
        Some(header) if header != from_target => Err(HostError::Conflict),
        // The header's value is reused when it is the same.
        Some(header) => Ok(Some(header)),
        None => Ok(Some(from_target)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(raw: &str, tls: bool) -> Result<String, HostError> {
        canonicalize(raw.as_bytes(), tls, None).map(|h| h.to_string())
    }

    fn name(raw: &str) -> String {
        canonicalize(raw.as_bytes(), false, None)
            .unwrap()
            .name()
            .to_owned()
    }

    #[test]
    fn case_trailing_dot_and_default_port_are_canonicalised() {
        assert_eq!(canon("api.example.com", false).unwrap(), "api.example.com");
        assert_eq!(canon("api.example.com.", false).unwrap(), "api.example.com");
        assert_eq!(
            canon("API.example.com.:443", true).unwrap(),
            "api.example.com"
        );
        assert_eq!(
            canon("API.example.com.:443", false).unwrap(),
            "api.example.com:443"
        );
        assert_eq!(
            canon("api.example.com:80", false).unwrap(),
            "api.example.com"
        );
        assert_eq!(canon("localhost:8080", false).unwrap(), "localhost:8080");
        assert_eq!(canon("localhost:", false).unwrap(), "localhost");
        assert_eq!(canon("[::1]:8080", false).unwrap(), "[::1]:8080");
        assert_eq!(canon("[0:0::1]", false).unwrap(), "[::1]");
        assert_eq!(
            canon("[::FFFF:10.0.0.1]", false).unwrap(),
            "[::ffff:10.0.0.1]"
        );
        assert_eq!(canon("10.0.0.1:8080", false).unwrap(), "10.0.0.1:8080");
        assert_eq!(
            canon("my_host.internal", false).unwrap(),
            "my_host.internal"
        );
        assert_eq!(name("API.example.com.:8443"), "api.example.com");
        assert_eq!(name("[::1]:1"), "::1");
    }

    #[test]
    fn ambiguous_hosts_are_refused() {
        let cases = [
            ("api.example.com..", HostError::EmptyLabel),
            ("api..example.com", HostError::EmptyLabel),
            (".api.example.com", HostError::EmptyLabel),
            (".", HostError::Empty),
            ("", HostError::Empty),
            ("exämple.com", HostError::NotAscii),
            ("a b", HostError::BadCharacter),
            ("a%2eb", HostError::BadCharacter),
            ("a,b", HostError::BadCharacter),
            ("user@host", HostError::UserInfo),
            ("host:0", HostError::BadPort),
            ("host:65536", HostError::BadPort),
            ("host:+80", HostError::BadPort),
            ("host:8o", HostError::BadPort),
            ("::1", HostError::BadIpLiteral),
            ("[::1", HostError::BadIpLiteral),
            ("[::g]", HostError::BadIpLiteral),
            ("[::1]x", HostError::BadIpLiteral),
            ("0x7f.0.0.1", HostError::NumericName),
            ("127.000.0.1", HostError::NumericName),
            ("127.1", HostError::NumericName),
            ("2130706433", HostError::NumericName),
            ("1.2.3.4.5", HostError::NumericName),
        ];
        for (raw, want) in cases {
            assert_eq!(canon(raw, false), Err(want), "{raw:?}");
        }
        assert_eq!(canon(&"a".repeat(254), false), Err(HostError::TooLong));
    }

    #[test]
    fn a_canonical_header_value_is_reused() {
        let original = HeaderValue::from_static("api.example.com");
        let host = canonicalize(original.as_bytes(), false, Some(&original)).unwrap();
        assert_eq!(host.value(), &original);
    }

    fn request(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_target_authority_and_the_host_header_must_agree() {
        let of = |uri, hosts: &[&str]| of_request(&request(uri, hosts), false);
        assert_eq!(of("/", &[]).unwrap(), None);
        assert_eq!(of("/", &[""]).unwrap(), None);
        assert_eq!(of("/", &["A.test."]).unwrap().unwrap().as_str(), "a.test");
        assert_eq!(
            of("http://a.test/x", &[]).unwrap().unwrap().as_str(),
            "a.test"
        );
        assert_eq!(
            of("http://a.test:80/x", &["A.TEST."])
                .unwrap()
                .unwrap()
                .as_str(),
            "a.test"
        );
        assert_eq!(of("http://a.test/x", &["b.test"]), Err(HostError::Conflict));
        assert_eq!(of("/", &["a.test", "a.test"]), Err(HostError::Several));
        assert_eq!(of("http://u@a.test/x", &[]), Err(HostError::UserInfo));
    }
}
