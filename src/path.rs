//! Request path normalisation. Routing, authorisation and forwarding all see the
//! same canonical path, so a path cannot mean one thing to stepgate and another to the upstream.
//!
//! Canonical form: every percent-escape is decoded, then only bytes in [`ENCODE`] are re-encoded
//! (upper-case hex). Inputs whose meaning depends on who decodes them are refused instead:
//! encoded `/` or `\`, a raw `\`, `.` and `..` segments (also encoded), NUL, invalid escapes and
//! empty segments in the middle of the path.

use std::borrow::Cow;
use std::fmt;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// Bytes that stay percent-encoded in the canonical form: everything that is not allowed raw in
/// a path segment, plus `%` itself.
const ENCODE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// True for the bytes of [`ENCODE`] and non-ASCII: a path without them is canonical already
/// when its segments are fine.
fn stays_encoded(b: u8) -> bool {
    b.is_ascii_control()
        || !b.is_ascii()
        || matches!(
            b,
            b' ' | b'"'
                | b'#'
                | b'%'
                | b'<'
                | b'>'
                | b'?'
                | b'['
                | b'\\'
                | b']'
                | b'^'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
        )
}

/// Why a path was refused. Shown to the client in the 400 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EncodedSlash,
    Backslash,
    DotSegment,
    Nul,
    BadEscape,
    EmptySegment,
    NotUtf8,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "path must start with `/`",
            PathError::EncodedSlash => "path contains an encoded `/` or `\\`",
            PathError::Backslash => "path contains a `\\`",
            PathError::DotSegment => {
                "path contains a `.` or `..` segment (with or without `;` parameters)"
            }
            PathError::Nul => "path contains a NUL byte",
            PathError::BadEscape => "path contains an invalid percent-escape",
            PathError::EmptySegment => "path contains an empty segment (`//`)",
            PathError::NotUtf8 => "path decodes to invalid UTF-8",
        })
    }
}

/// Returns the canonical form of `path`, borrowing when it already is canonical (the usual case).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let needs_rewrite = path.bytes().any(stays_encoded);
    let canonical = if needs_rewrite {
        Cow::Owned(rewrite(path)?)
    } else {
        Cow::Borrowed(path)
    };
    check_segments(&canonical)?;
    Ok(canonical)
}

fn rewrite(path: &str) -> Result<String, PathError> {
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let bytes = path.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(PathError::BadEscape);
            }
            match (hex[0].to_ascii_uppercase(), hex[1].to_ascii_uppercase()) {
                (b'2', b'F') | (b'5', b'C') => return Err(PathError::EncodedSlash),
                (b'0', b'0') => return Err(PathError::Nul),
                _ => {}
            }
        }
    }
    let decoded = percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| PathError::NotUtf8)?;
    Ok(utf8_percent_encode(&decoded, ENCODE).to_string())
}

fn check_segments(path: &str) -> Result<(), PathError> {
    // A dot segment (`.`, `..`, `..;x`) starts with `/.` and an empty one is `//`: a path with
    // neither, nearly every path, needs no segment-by-segment look.
    if !path
        .as_bytes()
        .windows(2)
        .any(|pair| pair[0] == b'/' && matches!(pair[1], b'.' | b'/'))
    {
        return Ok(());
    }
    // The first item is the empty string before the leading `/`; a trailing `/` is allowed.
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "." | ".." => return Err(PathError::DotSegment),
            // `..;jsessionid=x`: Tomcat and Spring drop path parameters and read `..`.
            _ if matches!(segment.split(';').next(), Some("." | "..")) => {
                return Err(PathError::DotSegment);
            }
            "" if segments.peek().is_some() => return Err(PathError::EmptySegment),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_encoded_is_the_encode_set() {
        for b in 0..128u8 {
            let text = char::from(b).to_string();
            let encoded = utf8_percent_encode(&text, ENCODE).to_string() != text;
            assert_eq!(stays_encoded(b), encoded, "byte {b:#04x}");
        }
        assert!((128..=255).all(stays_encoded));
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for p in [
            "/",
            "/orders",
            "/orders/7",
            "/orders/",
            "/a:b@c!$&'()*+,;=-._~",
            "/a/...;x",
            "/a/;..",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(q)) if q == p),
                "{p}"
            );
        }
    }

    #[test]
    fn escapes_are_decoded_and_reencoded() {
        assert_eq!(normalize("/%6Frders").unwrap(), "/orders");
        assert_eq!(normalize("/a%3ab").unwrap(), "/a:b");
        assert_eq!(normalize("/a%20b").unwrap(), "/a%20b");
        assert_eq!(normalize("/a%2541").unwrap(), "/a%2541");
        assert_eq!(normalize("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(normalize("/a%7Bb").unwrap(), "/a%7Bb");
    }

    #[test]
    fn canonical_form_is_stable() {
        for p in ["/%6Frders", "/a%20b", "/a%2541", "/caf%c3%a9", "/x%3F%23y"] {
            let once = normalize(p).unwrap().into_owned();
            assert_eq!(normalize(&once).unwrap(), once, "{p}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases = [
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%5Cb", PathError::EncodedSlash),
            ("/a\\b", PathError::Backslash),
            ("/a/../b", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/a/..", PathError::DotSegment),
            ("/a/%2E%2E/b", PathError::DotSegment),
            ("/a/%2e", PathError::DotSegment),
            ("/pub/..;/admin", PathError::DotSegment),
            ("/pub/..;x=1/admin", PathError::DotSegment),
            ("/pub/.;/admin", PathError::DotSegment),
            ("/pub/%2e%2e;/admin", PathError::DotSegment),
            ("/pub/..;", PathError::DotSegment),
            ("/a%00", PathError::Nul),
            ("/a%G1", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%", PathError::BadEscape),
            ("/a//b", PathError::EmptySegment),
            ("//", PathError::EmptySegment),
            ("/a%FF", PathError::NotUtf8),
            ("a", PathError::NotAbsolute),
        ];
        for (path, want) in cases {
            assert_eq!(normalize(path), Err(want), "{path}");
        }
    }
}
