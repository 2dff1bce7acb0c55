//! The SMS factor (DESIGN.md §3): phone numbers, login and verification codes, send limits,
//! and the Twilio client ([`twilio`]). Off unless `gateway.yaml` has an `sms` section.
//!
//! NIST SP 800-63B treats SMS (the PSTN) as a *restricted* authenticator: numbers can be
//! ported or redirected and messages intercepted. It is offered for consumers who have no
//! authenticator app, never turned on by default, and a policy opts in by listing `sms`.
//!
//! What never happens here: a phone number is never logged or shown in full (only
//! [`Phone::masked`]), a code is never stored (only its peppered HMAC, see
//! `MasterKey::hash_sms_code`), and a failed send is never treated as sent.

mod budget;
mod redis_budget;
pub mod twilio;

pub use budget::{LocalSendBudget, MIN_INTERVAL_SECS, NotNow, PER_HOUR, Reservation, SendBudget};
pub use redis_budget::RedisSendBudget;

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::secrets::random_bytes;

/// The SMS configuration of a snapshot: the provider client and how long a code lives.
pub struct SmsSettings {
    pub twilio: twilio::Twilio,
    /// Absolute lifetime of a code from its send (5 minutes by default).
    pub code_ttl: Duration,
}

impl std::fmt::Debug for SmsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds the auth token: show where it sends, nothing more.
        f.debug_struct("SmsSettings")
            .field("twilio", &self.twilio)
            .field("code_ttl", &self.code_ttl)
            .finish()
    }
}

pub use crate::credentials::factors::Purpose;

/// Associated data for a sealed number: the consumer id (so a ciphertext moved to another
/// consumer fails to open, like TOTP secrets) plus a label, so that a sealed TOTP secret
/// copied into the number's column cannot open as a number either.
pub fn phone_context(consumer_id: &str) -> Vec<u8> {
    format!("{consumer_id}/sms-phone").into_bytes()
}

/// A consumer's sealed number, opened.
pub fn open_phone(
    master: &crate::secrets::MasterKey,
    consumer_id: &str,
    sealed: &[u8],
) -> Option<Phone> {
    let plain = master.decrypt(sealed, &phone_context(consumer_id))?;
    Phone::parse(std::str::from_utf8(&plain).ok()?).ok()
}

/// An E.164 phone number: `+`, a country code that does not start with 0, 8 to 15 digits in
/// all. Anything else (spaces, dashes, national formats) is refused rather than guessed at.
#[derive(Clone, PartialEq, Eq)]
pub struct Phone(String);

impl std::fmt::Debug for Phone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Debug output ends up in logs: never the whole number.
        write!(f, "Phone({})", self.masked())
    }
}

impl Phone {
    pub fn parse(text: &str) -> Result<Phone, &'static str> {
        const MESSAGE: &str =
            "phone must be an E.164 number: `+` and 8 to 15 digits, e.g. +447700900123";
        let digits = text.strip_prefix('+').ok_or(MESSAGE)?;
        let valid = (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if valid {
            Ok(Phone(text.to_owned()))
        } else {
            Err(MESSAGE)
        }
    }

    /// The number, for the provider only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `+44•••••••123`: the first two digits (the country, roughly) and the last three (two for
    /// short numbers), so a consumer recognises the number and a reader learns little.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }

    /// Key of the per-destination send limit (a digest, so the limiter holds no numbers).
    pub(crate) fn limiter_key(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

fn mask(number: &str) -> String {
    let digits = number.trim_start_matches('+');
    let tail = if digits.len() >= 10 { 3 } else { 2 };
    let head = 2.min(digits.len());
    let hidden = digits.len().saturating_sub(head + tail);
    if hidden == 0 {
        return "+•••".to_owned();
    }
    format!(
        "+{}{}{}",
        &digits[..head],
        "•".repeat(hidden),
        &digits[digits.len() - tail..]
    )
}

/// A fresh 6-digit code, uniform over 000000–999999 from the OS CSPRNG. Values of the random
/// u32 at or above the largest multiple of 10^6 are drawn again, so no code is likelier than
/// another (a plain `% 1_000_000` would favour the low ones).
pub fn new_code() -> String {
    const RANGE: u32 = 1_000_000;
    // 4_294_000_000: every n below it maps onto 0..RANGE exactly 4294 times.
    const LIMIT: u32 = u32::MAX - (u32::MAX % RANGE);
    loop {
        let n = u32::from_le_bytes(random_bytes::<4>());
        if n < LIMIT {
            return format!("{:06}", n % RANGE);
        }
    }
}

/// Is `code` shaped like an SMS code (exactly six ASCII digits)?
pub fn is_code_shape(code: &str) -> bool {
    code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())
}

/// The message texted to the consumer. It says what the code is for and that it must not be
/// shared; it holds nothing else about the account.
pub fn message(purpose: Purpose, code: &str, ttl: Duration) -> String {
    let minutes = ttl.as_secs().div_ceil(60);
    match purpose {
        Purpose::Login => format!(
            "Your stepgate login code is {code}. It expires in {minutes} min. Do not share it."
        ),
        Purpose::Enrol => format!(
            "Your stepgate verification code is {code}. It expires in {minutes} min. If you did \
             not ask for it, ignore this message."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_e164_only() {
        for good in [
            "+447700900123",
            "+12025550123",
            "+49301234",
            "+123456789012345",
        ] {
            assert!(Phone::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "447700900123",
            "+44 7700 900123",
            "+44-7700-900123",
            "+0447700900",
            "+1234567",
            "+1234567890123456",
            "+４４７７００９００１２３",
            "",
            "+",
        ] {
            assert!(Phone::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_are_masked() {
        let phone = Phone::parse("+447700900123").unwrap();
        assert_eq!(phone.masked(), "+44•••••••123");
        assert_eq!(format!("{phone:?}"), "Phone(+44•••••••123)");
        assert_eq!(Phone::parse("+49301234").unwrap().masked(), "+49••••34");
    }

    #[test]
    fn codes_are_six_digits_and_vary() {
        let codes: Vec<String> = (0..200).map(|_| new_code()).collect();
        assert!(codes.iter().all(|c| is_code_shape(c)), "{codes:?}");
        let mut unique = codes.clone();
        unique.sort();
        unique.dedup();
        assert!(unique.len() > 190, "{} distinct of 200", unique.len());
        assert!(!is_code_shape("12345") && !is_code_shape("１２３４５６"));
    }
}
