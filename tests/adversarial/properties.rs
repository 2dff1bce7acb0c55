//! Property tests of the two canonicalisers against small reference models written from the
//! RFCs (RFC 3986 percent-decoding and dot-segment removal; host names as DNS labels): what
//! the gateway routes and authorises is what an upstream that decodes and collapses the path
//! itself would route, and the canonical forms are fixed points.

use std::sync::Arc;

use http::Method;
use proptest::prelude::*;
use stepgate::config::Policy;
use stepgate::routing::{Route, RouteTable};
use stepgate::upstream::Upstream;

// ---- paths ----------------------------------------------------------------------------------

/// Percent-decoding (RFC 3986 §2.1); `None` for an invalid escape.
fn decode(path: &str) -> Option<Vec<u8>> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// RFC 3986 §5.2.4 `remove_dot_segments`, on a decoded absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut input = path.to_owned();
    let mut output = String::new();
    while !input.is_empty() {
        if let Some(rest) = input
            .strip_prefix("../")
            .or_else(|| input.strip_prefix("./"))
        {
            input = rest.to_owned();
        } else if input.starts_with("/./") {
            input = input[2..].to_owned();
        } else if input == "/." {
            input = "/".to_owned();
        } else if input.starts_with("/../") || input == "/.." {
            input = if input == "/.." {
                "/".to_owned()
            } else {
                input[3..].to_owned()
            };
            if let Some(i) = output.rfind('/') {
                output.truncate(i);
            } else {
                output.clear();
            }
        } else if input == "." || input == ".." {
            input.clear();
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push_str(&input[..end]);
            input = input[end..].to_owned();
        }
    }
    output
}

/// What a path means to an upstream that decodes it, drops `;` parameters from dot segments
/// (Tomcat, Spring) and collapses dot segments: the path it would route by.
fn upstream_reading(path: &str) -> Option<String> {
    let decoded = String::from_utf8(decode(path)?).ok()?;
    let without_params: Vec<&str> = decoded
        .split('/')
        .map(|segment| match segment.split(';').next() {
            Some(dots @ ("." | "..")) => dots,
            _ => segment,
        })
        .collect();
    Some(remove_dot_segments(&without_params.join("/")))
}

/// The reference rule: refused when another reader could take the path another way.
fn reference_accepts(path: &str) -> bool {
    if !path.starts_with('/') || path.contains('\\') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return false;
    }
    let Some(decoded) = decode(path).and_then(|d| String::from_utf8(d).ok()) else {
        return false;
    };
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    segments.iter().enumerate().all(|(i, segment)| {
        let dots = matches!(segment.split(';').next(), Some("." | ".."));
        let empty_inside = segment.is_empty() && i + 1 < segments.len();
        !dots && !empty_inside
    })
}

fn path_piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/", "/", "/", "a", "b", "orders", ".", "..", "%2e", "%2E", "%2e%2e", ";", ";x=1", "%3B",
        "%2f", "%2F", "%5c", "\\", "%00", "%", "%4", "%41", "%61", "%25", "%20", "~", "-", "_",
        "%C3%A9", "%FF", "%7B", "?", "#",
    ])
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(path_piece(), 1..10).prop_map(|pieces| {
        // Only what can stand in a request target: `?` starts the query, `#` is never sent.
        let raw: String = pieces.concat();
        let raw = raw.split(['?', '#']).next().unwrap_or("").to_owned();
        if raw.starts_with('/') {
            raw
        } else {
            format!("/{raw}")
        }
    })
}

fn route(name: &str, path: &str) -> Route {
    Route {
        name: name.into(),
        label: Arc::from(name),
        host: None,
        path: path.into(),
        methods: None,
        upstream: Arc::new(Upstream::echo("demo")),
        policy: Arc::new(Policy::public("public")),
        strip_prefix: false,
        body_bytes: 1,
        websocket: None,
        line: 1,
        metrics: Default::default(),
    }
}

fn table() -> RouteTable {
    RouteTable::new(vec![
        route("root", "/"),
        route("a", "/a"),
        route("ab", "/a/b"),
        route("orders", "/orders"),
        route("b", "/b"),
    ])
}

fn routed(table: &RouteTable, path: &str) -> Option<String> {
    table.find(None, &Method::GET, path).map(|r| r.name.clone())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn the_canonical_path_means_to_an_upstream_what_it_meant_to_the_gateway(path in path()) {
        let canonical = stepgate::path::normalize(&path).map(|c| c.into_owned());
        prop_assert_eq!(canonical.is_ok(), reference_accepts(&path), "{:?} -> {:?}", path, canonical);
        let Ok(canonical) = canonical else { return Ok(()) };

        // A fixed point, with the same meaning as what was sent.
        prop_assert_eq!(stepgate::path::normalize(&canonical).unwrap().into_owned(), canonical.clone());
        prop_assert_eq!(decode(&canonical), decode(&path));
        // Nothing an upstream could read another way.
        let lower = canonical.to_ascii_lowercase();
        prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%00"));
        prop_assert!(!canonical.contains('\\'));
        for segment in canonical.split('/') {
            let head = segment.split(';').next().unwrap_or("");
            prop_assert!(head != "." && head != "..", "{:?}", canonical);
            prop_assert!(!head.eq_ignore_ascii_case("%2e") && !head.eq_ignore_ascii_case("%2e%2e"));
        }
        // The route the gateway picks is the route an upstream reading the path picks.
        let table = table();
        let reading = upstream_reading(&canonical).unwrap();
        prop_assert_eq!(&reading, &upstream_reading(&path).unwrap());
        prop_assert_eq!(routed(&table, &canonical), routed(&table, &reading), "{:?}", path);
    }
}

// ---- hosts ----------------------------------------------------------------------------------

/// The reference host rule: ASCII labels of letters, digits, `-`, `_`, case-folded, one
/// trailing dot dropped, a numeric-looking name only as a plain dotted quad, a port 1..=65535.
fn reference_host(raw: &str) -> Option<String> {
    let (name, port) = match raw.rsplit_once(':') {
        Some((name, "")) => (name, None),
        Some((name, port)) => (name, Some(port)),
        None => (raw, None),
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let port: u32 = port.parse().ok()?;
        if port == 0 || port > 65535 {
            return None;
        }
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 || name.contains(':') {
        return None;
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.iter().any(|l| {
        l.is_empty()
            || !l
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        return None;
    }
    if labels.last()?.starts_with(|c: char| c.is_ascii_digit()) {
        let ip: std::net::Ipv4Addr = name.parse().ok()?;
        if ip.to_string() != name {
            return None;
        }
    }
    Some(name)
}

fn host_piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "api", "API", "Example", "com", ".", ".", "-", "_", "1", "127", "0", "01", "0x7f", ":",
        ":80", ":443", ":8080", ":0", ":65536", "%2e", " ", ",", "@",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn the_canonical_host_is_the_reference_host_and_a_fixed_point(
        pieces in prop::collection::vec(host_piece(), 1..7)
    ) {
        let raw: String = pieces.concat();
        let canonical = stepgate::host::canonicalize(raw.as_bytes(), false, None);
        let reference = reference_host(&raw);
        prop_assert_eq!(canonical.is_ok(), reference.is_some(), "{:?}: {:?}", raw, canonical);
        let Ok(host) = canonical else { return Ok(()) };
        let reference = reference.unwrap_or_default();
        prop_assert_eq!(host.name(), reference.as_str());
        let again = stepgate::host::canonicalize(host.as_str().as_bytes(), false, None).unwrap();
        prop_assert_eq!(again.as_str(), host.as_str());
        let shouted = stepgate::host::canonicalize(raw.to_ascii_uppercase().as_bytes(), false, None).unwrap();
        prop_assert_eq!(shouted.as_str(), host.as_str());
        prop_assert!(!host.name().ends_with('.'));
        prop_assert!(!host.as_str().ends_with(":80"));
    }
}
