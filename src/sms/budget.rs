//! The SMS send budgets: at most one text per [`MIN_INTERVAL_SECS`] and [`PER_HOUR`] per hour,
//! per consumer and per destination number, so that neither an API key nor a typed-in number
//! can flood a phone or run up the bill. The [`SendBudget`] port, and the budget of one node
//! ([`LocalSendBudget`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use moka::sync::Cache;

use super::Phone;

/// At most one text per this many seconds, per consumer and per destination number.
pub const MIN_INTERVAL_SECS: u64 = 30;
/// At most this many texts per hour, per consumer and per destination number.
pub const PER_HOUR: usize = 5;
/// Limiter entries kept at most per kind (consumers, numbers): bounded memory under a flood.
const LIMITER_CAPACITY: u64 = 100_000;

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
pub struct LocalSendBudget {
    consumers: Cache<Arc<str>, History>,
    phones: Cache<[u8; 32], History>,
}

impl Default for LocalSendBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// A send counted against its budgets while it is attempted; dropped without
/// [`commit`](Reservation::commit) (the proof failed, the provider refused, an error on the
/// way), it is given back.
#[must_use = "a reservation is given back when dropped; commit it once the text went out"]
pub struct Reservation {
    give_back: Option<Box<dyn FnOnce() + Send>>,
}

impl Reservation {
    /// A reservation that `give_back` undoes unless it is committed.
    pub fn new(give_back: impl FnOnce() + Send + 'static) -> Self {
        Self {
            give_back: Some(Box::new(give_back)),
        }
    }

    /// The text went out: the send stays counted.
    pub fn commit(mut self) {
        self.give_back = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(give_back) = self.give_back.take() {
            give_back();
        }
    }
}

/// Why a send was not reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotNow {
    /// A budget is spent: seconds until a send would be allowed.
    Wait(u64),
    /// The shared budget could not be asked (fail closed: nothing is sent).
    Unavailable,
}

/// The send budgets, kept by one node ([`LocalSendBudget`]) or shared by several
/// ([`RedisSendBudget`](super::RedisSendBudget)), so that texts are limited however many
/// nodes are asked.
#[async_trait]
pub trait SendBudget: Send + Sync + 'static {
    /// Reserves a send at `now` for `consumer`, and against `destination`'s budget when given
    /// (an enrolment text to a number the consumer has not confirmed), if every budget allows
    /// it; otherwise reserves nothing.
    async fn reserve(
        &self,
        consumer: &Arc<str>,
        destination: Option<&Phone>,
        now: u64,
    ) -> Result<Reservation, NotNow>;
}

#[async_trait]
impl SendBudget for LocalSendBudget {
    async fn reserve(
        &self,
        consumer: &Arc<str>,
        destination: Option<&Phone>,
        now: u64,
    ) -> Result<Reservation, NotNow> {
        LocalSendBudget::reserve(self, consumer, destination, now).map_err(NotNow::Wait)
    }
}

impl LocalSendBudget {
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
        Ok(Reservation::new(move || {
            for history in &histories {
                let mut history = history.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(i) = history.iter().rposition(|&t| t == now) {
                    history.remove(i);
                }
            }
        }))
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

    // The budget's behaviour is the port's contract (tests/contracts/sends.rs); here, what
    // only the local one must do.
    #[test]
    fn refused_sends_create_no_entries() {
        let limiter = LocalSendBudget::new();
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
