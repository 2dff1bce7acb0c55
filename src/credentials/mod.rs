//! Credentials and factors as values: API key format, TOTP enrolment, recovery codes, the
//! factors by name and the assurance levels of accounts. Pure; storage and lookup live above.

pub mod api_key;
pub mod assurance;
pub mod factors;
pub mod recovery;
pub mod totp;

/// RFC 4648 base32, lower case, no padding (for recovery codes).
pub(crate) fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(super::base32_lower(b"foobar"), "mzxw6ytboi");
        assert_eq!(super::base32_lower(b"f"), "my");
        assert_eq!(super::base32_lower(b""), "");
    }
}
