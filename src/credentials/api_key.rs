//! API keys: `sgk_` + 64 hex digits (256 random bits) + 8 hex digits of checksum (the first 4
//! bytes of SHA-256 over the rest). The prefix and checksum let secret scanners find leaked
//! keys and let the gateway refuse mistyped keys without touching the index. Only an
//! HMAC-SHA256 of a key is ever stored.

use sha2::{Digest, Sha256};

use crate::secrets::{hex, random_bytes};

pub const PREFIX: &str = "sgk_";
const BODY_HEX: usize = 64;
const CHECKSUM_HEX: usize = 8;
pub const LEN: usize = PREFIX.len() + BODY_HEX + CHECKSUM_HEX;
/// Characters of a key shown to operators: `sgk_` and 8 hex digits (32 of the 256 bits).
pub const DISPLAY_PREFIX_LEN: usize = PREFIX.len() + 8;

/// A new random key.
pub fn generate() -> String {
    let mut key = String::with_capacity(LEN);
    key.push_str(PREFIX);
    key.push_str(&hex(&random_bytes::<32>()));
    let checksum = checksum(&key);
    key.push_str(&checksum);
    key
}

fn checksum(prefix_and_body: &str) -> String {
    hex(&Sha256::digest(prefix_and_body.as_bytes())[..CHECKSUM_HEX / 2])
}

/// True when `key` has the shape of a stepgate key and its checksum holds.
pub fn well_formed(key: &str) -> bool {
    has_shape(key) && checksum(&key[..LEN - CHECKSUM_HEX]) == key[LEN - CHECKSUM_HEX..]
}

/// True when `key` looks like a stepgate key (prefix, length, lower-case hex), checksum not
/// checked. Enough in front of the index: only generated keys are in it, so a key with a bad
/// checksum is refused by the lookup anyway, and the checksum would cost as much as the HMAC.
pub fn has_shape(key: &str) -> bool {
    // `fold` with `&` rather than `all`: without the early exit the 72 digits are checked by
    // a few vector compares instead of a branch per byte (on every request with a key).
    key.len() == LEN
        && key.starts_with(PREFIX)
        && key[PREFIX.len()..].bytes().fold(true, |ok, b| {
            ok & (b.is_ascii_digit() | (b'a'..=b'f').contains(&b))
        })
}

/// The part of a key operators see and revoke by.
pub fn display_prefix(key: &str) -> &str {
    &key[..DISPLAY_PREFIX_LEN.min(key.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), LEN);
        assert!(well_formed(&a));
        assert_eq!(display_prefix(&a).len(), 12);
    }

    #[test]
    fn typos_fail_the_checksum() {
        let key = generate();
        let last = key.chars().last().unwrap();
        let typo = format!("{}{}", &key[..LEN - 1], if last == '0' { '1' } else { '0' });
        assert!(!well_formed(&typo));
        assert!(!well_formed(&key.to_uppercase()));
        assert!(!well_formed(&key[..LEN - 1]));
        assert!(!well_formed(""));
    }
}
