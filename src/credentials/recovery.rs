//! Recovery codes: 10 per consumer, 120 random bits each, shown once as four groups of six
//! base32 letters (`abcdef-ghijkl-mnopqr-stuvwx`), stored only as peppered HMAC-SHA256.

use super::base32_lower;
use crate::secrets::random_bytes;

pub const COUNT: usize = 10;

/// A new set of codes, for showing once.
pub fn generate() -> Vec<String> {
    (0..COUNT)
        .map(|_| {
            let raw = base32_lower(&random_bytes::<15>());
            raw.as_bytes()
                .chunks(6)
                .map(|c| std::str::from_utf8(c).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("-")
        })
        .collect()
}

/// The form a code is hashed in: lower case, without separators or spaces, so `ABCDEF GHIJKL`
/// and `abcdef-ghijkl` are the same code. `None` when it cannot be a recovery code.
pub fn normalize(code: &str) -> Option<String> {
    let cleaned: String = code
        .chars()
        .filter(|c| *c != '-' && *c != ' ')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let valid = cleaned.len() == 24
        && cleaned
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    valid.then_some(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_enough_entropy_and_normalise() {
        let codes = generate();
        assert_eq!(codes.len(), 10);
        let mut unique = codes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 10);
        for code in &codes {
            assert_eq!(code.len(), 27, "{code}");
            let n = normalize(code).unwrap();
            assert_eq!(n.len() * 5, 120);
            assert_eq!(normalize(&code.to_uppercase().replace('-', " ")), Some(n));
        }
        assert_eq!(normalize("123456"), None);
    }
}
