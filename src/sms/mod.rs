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

pub mod twilio;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;
use sha2::{Digest, Sha256};

use crate::secrets::random_bytes;

/// At most one text per this many seconds, per consumer and per destination number.
pub const MIN_INTERVAL_SECS: u64 = 30;
/// At most this many texts per hour, per consumer and per destination number.
pub const PER_HOUR: usize = 5;
/// Limiter entries kept at most per kind (consumers, numbers): bounded memory under a flood.
const LIMITER_CAPACITY: u64 = 100_000;

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
    fn limiter_key(&self) -> [u8; 32] {
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

/// Send times of one subject within the last hour, oldest first.
type History = Arc<Mutex<VecDeque<u64>>>;

/// Limits texts, at most one per [`MIN_INTERVAL_SECS`] and [`PER_HOUR`] per hour for each
/// budget, so that neither an API key nor a typed-in number can flood a phone (or run up the
/// SMS bill). Two budgets:
///
/// - **per consumer**: every text the consumer asks for (login and verification codes);
/// - **per destination**: verification texts to a number the sender has *not* confirmed
///   (an enrolment). A login code to the consumer's own confirmed number is left out, so
///   another consumer entering that number cannot use up its owner's login texts. The
///   destination budget applies the same to every enrolment text, confirmed by someone else
///   or not, so its answer tells nothing about other consumers' numbers.
///
/// Times come from the gateway's clock, so tests move time instead of sleeping. A send takes
/// a [`Reservation`] before anything is spent (the `X-OTP` proof, the provider call) and keeps
/// it only if the text went out. Entries live in bounded caches, are created only for a send
/// that is allowed (a flood of refused numbers adds none), and leave after an hour idle.
pub struct SendLimiter {
    consumers: Cache<Arc<str>, History>,
    phones: Cache<[u8; 32], History>,
}

impl Default for SendLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// A send counted against its budgets while it is attempted; dropped without
/// [`commit`](Reservation::commit) (the proof failed, the provider refused, an error on the
/// way), it is given back.
#[must_use = "a reservation is given back when dropped; commit it once the text went out"]
pub struct Reservation {
    histories: Vec<History>,
    at: u64,
    kept: bool,
}

impl Reservation {
    /// The text went out: the send stays counted.
    pub fn commit(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for history in &self.histories {
            let mut history = history.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = history.iter().rposition(|&t| t == self.at) {
                history.remove(i);
            }
        }
    }
}

impl SendLimiter {
    pub fn new() -> Self {
        Self {
            consumers: history_cache(),
            phones: history_cache(),
        }
    }

    /// Reserves a send at `now` for `consumer`, and against `destination`'s budget when given
    /// (an enrolment text to a number the consumer has not confirmed), if every budget allows
    /// it; otherwise reserves nothing and returns the seconds until a send would be allowed.
    pub fn reserve(
        &self,
        consumer: &Arc<str>,
        destination: Option<&Phone>,
        now: u64,
    ) -> Result<Reservation, u64> {
        let phone_key = destination.map(Phone::limiter_key);
        // Look before creating entries: a refused send must leave no trace in the caches.
        let existing = [
            self.consumers.get(consumer),
            phone_key.as_ref().and_then(|k| self.phones.get(k)),
        ];
        let wait = existing
            .iter()
            .flatten()
            .map(|h| wait_for(&mut h.lock().unwrap_or_else(|p| p.into_inner()), now))
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return Err(wait);
        }
        let mut histories = vec![self.consumers.get_with(consumer.clone(), History::default)];
        if let Some(key) = phone_key {
            histories.push(self.phones.get_with(key, History::default));
        }
        // Always in this order (consumer, then number), so two sends cannot deadlock; checked
        // again under the locks, since another send may have reserved meanwhile.
        let mut locked: Vec<_> = histories
            .iter()
            .map(|h| h.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let wait = locked
            .iter_mut()
            .map(|h| wait_for(h, now))
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return Err(wait);
        }
        for history in &mut locked {
            history.push_back(now);
        }
        drop(locked);
        Ok(Reservation {
            histories,
            at: now,
            kept: false,
        })
    }
}

fn history_cache<K>() -> Cache<K, History>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(LIMITER_CAPACITY)
        .time_to_idle(Duration::from_secs(3600))
        .build()
}

/// Seconds until `history` allows another send at `now` (0: allowed). Drops sends older than
/// an hour.
fn wait_for(history: &mut VecDeque<u64>, now: u64) -> u64 {
    while history.front().is_some_and(|&t| t + 3600 <= now) {
        history.pop_front();
    }
    let interval = history
        .back()
        .map_or(0, |&last| (last + MIN_INTERVAL_SECS).saturating_sub(now));
    let hourly = if history.len() >= PER_HOUR {
        history
            .front()
            .map_or(0, |&first| (first + 3600).saturating_sub(now))
    } else {
        0
    };
    interval.max(hourly)
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

    #[test]
    fn sends_are_limited_per_consumer_and_per_number() {
        let limiter = SendLimiter::new();
        let send = |who: &Arc<str>, to: Option<&Phone>, at: u64| {
            limiter.reserve(who, to, at).map(Reservation::commit)
        };
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        let one = Phone::parse("+447700900001").unwrap();
        let two = Phone::parse("+447700900002").unwrap();
        let t = 1_000_000;
        assert_eq!(send(&alice, Some(&one), t), Ok(()));
        // Same consumer, other number: the consumer's 30 s.
        assert_eq!(send(&alice, Some(&two), t + 10), Err(20));
        // Other consumer, same number: the number's 30 s.
        assert_eq!(send(&bob, Some(&one), t + 10), Err(20));
        assert_eq!(send(&bob, Some(&two), t + 10), Ok(()));
        // Five an hour.
        for i in 1..5 {
            assert_eq!(send(&alice, Some(&one), t + 30 * i), Ok(()), "{i}");
        }
        assert_eq!(send(&alice, Some(&one), t + 150), Err(3600 - 150));
        // The number's budget is spent, but a login text (no destination budget) of a
        // consumer whose own budget allows it still goes.
        let carol: Arc<str> = "carol".into();
        assert_eq!(send(&carol, None, t + 150), Ok(()));
        assert_eq!(send(&alice, Some(&one), t + 3600), Ok(()));
    }

    #[test]
    fn a_reservation_not_committed_is_given_back() {
        let limiter = SendLimiter::new();
        let alice: Arc<str> = "alice".into();
        let one = Phone::parse("+447700900001").unwrap();
        let held = limiter.reserve(&alice, Some(&one), 100).unwrap();
        // While held, it counts: a concurrent send waits.
        assert_eq!(limiter.reserve(&alice, None, 101).err(), Some(29));
        drop(held);
        limiter.reserve(&alice, Some(&one), 101).unwrap().commit();
        assert_eq!(limiter.reserve(&alice, Some(&one), 102).err(), Some(29));
    }

    #[test]
    fn refused_sends_create_no_entries() {
        let limiter = SendLimiter::new();
        let alice: Arc<str> = "alice".into();
        limiter.reserve(&alice, None, 100).unwrap().commit();
        for n in 0..50 {
            let phone = Phone::parse(&format!("+4477009{n:05}")).unwrap();
            assert!(limiter.reserve(&alice, Some(&phone), 101).is_err());
        }
        limiter.phones.run_pending_tasks();
        assert_eq!(limiter.phones.entry_count(), 0);
    }
}
