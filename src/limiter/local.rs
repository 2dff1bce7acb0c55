//! The failure limiter of one node: governor's GCRA per (policy, subject) in a bounded moka
//! cache, bans in another, both written to the store so that a restart keeps them.
//!
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use moka::Expiry;
use moka::sync::Cache;
use tokio::sync::mpsc;

use crate::clock::SharedClock;
use crate::config::{Failures, Rate};
use async_trait::async_trait;

use super::{AttemptLimiter, Ban, Recorded, Subject};
use crate::store::{BanRecord, FailureCountRecord, LimiterChange, LimiterState, Store};

const COUNTER_CAPACITY: u64 = 200_000;
const BAN_CAPACITY: u64 = 200_000;

/// governor reads time from the gateway's injected clock, so tests move time by hand.
#[derive(Clone)]
struct LimiterClock(SharedClock);

impl GovernorClock for LimiterClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.now_millis())
    }
}

/// governor's state for one counter (the GCRA's theoretical arrival time, in nanoseconds after
/// its limiter was made), as its own in-memory state does it, but readable and settable so
/// that the count survives a restart.
#[derive(Default)]
struct Tat(Arc<AtomicU64>);

impl StateStore for Tat {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // As governor's `InMemoryState`: 0 stands for "never measured".
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (result, next) = f((prev != 0).then(|| Nanos::from(prev)))?;
            match self.0.compare_exchange_weak(
                prev,
                u64::from(next).max(1),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

type Gcra = RateLimiter<NotKeyed, Tat, LimiterClock, NoOpMiddleware<Duration>>;

/// One subject's failures on one policy.
struct Counter {
    gcra: Gcra,
    /// The limiter's state, shared with it, to be read after each failure and kept.
    tat: Arc<AtomicU64>,
    /// When the limiter was made (ms since the epoch): its state is relative to that.
    start_ms: u64,
}

impl Counter {
    /// A counter, continuing from a kept theoretical arrival time if there is one.
    fn new(rate: Rate, clock: &SharedClock, tat_ms: Option<u64>) -> Self {
        let start_ms = clock.now_millis();
        let tat = Arc::new(AtomicU64::new(0));
        if let Some(tat_ms) = tat_ms.filter(|t| *t > start_ms) {
            tat.store(
                (tat_ms - start_ms).saturating_mul(1_000_000),
                Ordering::Release,
            );
        }
        Self {
            gcra: RateLimiter::new(quota(rate), Tat(tat.clone()), LimiterClock(clock.clone())),
            tat,
            start_ms,
        }
    }

    /// The theoretical arrival time in ms since the epoch, once the counter has seen a failure.
    fn tat_ms(&self) -> Option<u64> {
        let nanos = self.tat.load(Ordering::Acquire);
        (nanos != 0).then(|| self.start_ms + nanos.div_ceil(1_000_000))
    }
}

struct BanExpiry;

impl Expiry<Subject, Ban> for BanExpiry {
    fn expire_after_create(&self, _key: &Subject, ban: &Ban, _now: Instant) -> Option<Duration> {
        // Kept a minute past the end so that the lazy "ban ended" audit event can be written.
        Some(Duration::from_secs(
            ban.until.saturating_sub(ban.started) + 60,
        ))
    }
}

pub struct LocalLimiter {
    clock: SharedClock,
    account_wide: Arc<str>,
    counters: Cache<(Arc<str>, Subject), Arc<Counter>>,
    bans: Cache<Subject, Ban>,
    /// Bans held, per kind of subject: while a kind's count is zero no request needs a ban
    /// lookup for it. A flood of wrong codes bans consumers, and every request's IP check
    /// then stays an atomic load instead of a cache lookup.
    bans_held: Arc<BansHeld>,
    /// Counts loaded at start, taken up by the first failure of their subject on their
    /// policy (the policy's rate is known only then, and may have changed meanwhile).
    kept: Cache<(Arc<str>, Subject), u64>,
    /// Where changes go to be written to the store; `None` keeps the limiter in memory only.
    changes: Option<mpsc::UnboundedSender<LimiterChange>>,
}

/// Bans inserted minus bans removed (for whatever reason, as the cache reports them), per
/// kind. A count rises before an insert and falls only after a removal, so it is never zero
/// while a ban of its kind is in the cache.
#[derive(Default)]
struct BansHeld {
    consumers: AtomicU64,
    ips: AtomicU64,
}

impl BansHeld {
    fn of(&self, subject: &Subject) -> &AtomicU64 {
        match subject {
            Subject::Consumer(_) => &self.consumers,
            Subject::Ip(_) => &self.ips,
        }
    }
}

impl LocalLimiter {
    /// A limiter that keeps its state in memory only.
    pub fn new(clock: SharedClock) -> Self {
        let bans_held = Arc::new(BansHeld::default());
        let removed = bans_held.clone();
        Self {
            clock,
            // Not a valid policy name (file stems have no `*`), so it cannot collide with one.
            account_wide: Arc::from("*"),
            counters: Cache::builder()
                .max_capacity(COUNTER_CAPACITY)
                // An idle counter is full again after its window; dropping it loses nothing.
                .time_to_idle(Duration::from_secs(24 * 3600))
                // `unlock` clears a subject's counters by predicate.
                .support_invalidation_closures()
                .build(),
            bans: Cache::builder()
                .max_capacity(BAN_CAPACITY)
                .expire_after(BanExpiry)
                .eviction_listener(move |subject: Arc<Subject>, _, _| {
                    removed.of(&subject).fetch_sub(1, Ordering::AcqRel);
                })
                .build(),
            bans_held,
            kept: Cache::builder()
                .max_capacity(COUNTER_CAPACITY)
                .time_to_live(Duration::from_secs(24 * 3600))
                .support_invalidation_closures()
                .build(),
            changes: None,
        }
    }

    /// A limiter whose bans and consumer counts are written to `store` by the returned
    /// writer (run it in the background), after loading what the store kept from before.
    pub async fn persistent(
        clock: SharedClock,
        store: Arc<dyn Store>,
    ) -> Result<(Self, LimiterWriter), crate::store::StoreError> {
        let kept = store.load_limiter(clock.now(), clock.now_millis()).await?;
        let limiter = Self::new(clock);
        limiter.restore(kept);
        Ok(limiter.writing_to(store))
    }

    /// This limiter, its changes written to `store` by the returned writer (run it in the
    /// background).
    pub fn writing_to(mut self, store: Arc<dyn Store>) -> (Self, LimiterWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.changes = Some(tx);
        (self, LimiterWriter::new(store, rx))
    }

    /// Holds a ban made elsewhere (not written anywhere): kept unless a ban ending later is
    /// held already.
    pub fn hold_ban(&self, subject: Subject, ban: Ban) {
        if ban.until <= self.clock.now()
            || self
                .bans
                .get(&subject)
                .is_some_and(|held| held.until >= ban.until)
        {
            return;
        }
        self.bans_held.of(&subject).fetch_add(1, Ordering::AcqRel);
        self.bans.insert(subject, ban);
    }

    /// Forgets a subject's ban and counts, lifted elsewhere (not written anywhere).
    pub fn forget(&self, subject: &Subject) {
        self.bans.invalidate(subject);
        let cleared = subject.clone();
        let _ = self
            .counters
            .invalidate_entries_if(move |(_, s), _| *s == cleared);
    }

    /// Takes up bans and counts kept from before a restart.
    pub fn restore(&self, state: LimiterState) {
        let now = self.clock.now();
        let mut bans = 0;
        for ban in state.bans.iter().filter(|b| b.until > now) {
            if let Some(subject) = Subject::from_key(&ban.subject) {
                self.bans_held.of(&subject).fetch_add(1, Ordering::AcqRel);
                self.bans.insert(
                    subject,
                    Ban {
                        started: ban.started,
                        until: ban.until,
                    },
                );
                bans += 1;
            }
        }
        for count in &state.counts {
            if let Some(subject) = Subject::from_key(&count.subject) {
                self.kept
                    .insert((Arc::from(count.policy.as_str()), subject), count.tat_ms);
            }
        }
        if bans > 0 || !state.counts.is_empty() {
            tracing::info!(
                bans,
                counts = state.counts.len(),
                "failure limiter state restored"
            );
        }
    }

    fn persist(&self, change: impl FnOnce() -> LimiterChange) {
        if let Some(changes) = &self.changes {
            let _ = changes.send(change());
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The counter name for failures of a consumer over all policies.
    pub fn account_wide(&self) -> Arc<str> {
        Arc::clone(&self.account_wide)
    }

    /// Seconds until the ban on `subject` ends, or `None` when it is not banned. A ban found
    /// over is removed and reported as `Err(ban)` so the caller can audit its end once.
    pub fn banned(&self, subject: &Subject) -> Result<Option<u64>, Ban> {
        if self.bans_held.of(subject).load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        let Some(ban) = self.bans.get(subject) else {
            return Ok(None);
        };
        let now = self.clock.now();
        if now < ban.until {
            Ok(Some(ban.until - now))
        } else {
            self.bans.invalidate(subject);
            self.persist(|| LimiterChange::Unban {
                subject: subject.key(),
                until: ban.until,
            });
            Err(ban)
        }
    }

    /// Counts one failure of `subject` on a policy with `failures`.
    pub fn record(
        &self,
        policy: &Arc<str>,
        subject: Subject,
        rate: Rate,
        failures: &Failures,
    ) -> Recorded {
        let key = (policy.clone(), subject.clone());
        let counter = self.counters.get_with_by_ref(&key, || {
            let kept = self.kept.remove(&key);
            Arc::new(Counter::new(rate, &self.clock, kept))
        });
        if counter.gcra.check().is_ok() {
            // Counts of client IPs are not kept (see the module doc).
            if let (Subject::Consumer(_), Some(tat_ms)) = (&subject, counter.tat_ms()) {
                self.persist(|| {
                    LimiterChange::Count(FailureCountRecord {
                        policy: policy.to_string(),
                        subject: subject.key(),
                        tat_ms,
                    })
                });
            }
            return Recorded::Counted;
        }
        let now = self.clock.now();
        let until = now.saturating_add(failures.ban.as_secs());
        self.bans_held.of(&subject).fetch_add(1, Ordering::AcqRel);
        self.bans.insert(
            subject.clone(),
            Ban {
                started: now,
                until,
            },
        );
        // The count starts afresh after the ban.
        self.counters.invalidate(&key);
        self.persist(|| {
            LimiterChange::Ban(BanRecord {
                subject: subject.key(),
                started: now,
                until,
            })
        });
        self.persist(|| LimiterChange::Uncount {
            policy: policy.to_string(),
            subject: subject.key(),
        });
        Recorded::Banned { until }
    }

    /// A success clears a consumer's failures on that policy.
    pub fn reset(&self, policy: &Arc<str>, subject: Subject) {
        let key = (policy.clone(), subject);
        // Most successes have no failures to forget: a lookup is cheaper than an invalidation.
        if self.counters.contains_key(&key) || self.kept.contains_key(&key) {
            self.counters.invalidate(&key);
            self.kept.invalidate(&key);
            self.persist(|| LimiterChange::Uncount {
                policy: key.0.to_string(),
                subject: key.1.key(),
            });
        }
    }

    /// Lifts a ban and clears the subject's counters (admin `unlock`).
    pub fn unlock(&self, subject: &Subject) -> bool {
        let was_banned = self.bans.remove(subject).is_some();
        let cleared = subject.clone();
        let _ = self
            .counters
            .invalidate_entries_if(move |(_, s), _| *s == cleared);
        let cleared = subject.clone();
        let _ = self
            .kept
            .invalidate_entries_if(move |(_, s), _| *s == cleared);
        self.persist(|| LimiterChange::Unlock {
            subject: subject.key(),
        });
        was_banned
    }

    /// The bans in force, by subject.
    pub fn bans(&self) -> Vec<(Subject, Ban)> {
        let now = self.clock.now();
        let mut bans: Vec<(Subject, Ban)> = self
            .bans
            .iter()
            .filter(|(_, ban)| ban.until > now)
            .map(|(subject, ban)| (Subject::clone(&subject), ban))
            .collect();
        bans.sort_by_key(|(_, ban)| std::cmp::Reverse(ban.started));
        bans
    }

    /// Bans in force (approximate; for metrics).
    pub fn active_bans(&self) -> u64 {
        self.bans.run_pending_tasks();
        self.bans.entry_count()
    }
}

/// Writes the limiter's changes to the store off the request path: in order, in batches of
/// whatever has come in meanwhile, several counts of one subject coalesced into the last.
/// While the store is unavailable the changes wait (coalesced, so at most one per counter and
/// ban) and are tried again with backoff: none is lost to an outage.
pub struct LimiterWriter {
    store: Arc<dyn Store>,
    rx: mpsc::UnboundedReceiver<LimiterChange>,
    /// In order; a change superseded later is taken out (`None`).
    pending: Vec<Option<LimiterChange>>,
    /// Where each ban's and counter's pending change is.
    index: std::collections::HashMap<ChangeKey, usize>,
}

/// What a change is to: one subject's ban, or one counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ChangeKey {
    Ban(String),
    Counter(String, String),
}

impl ChangeKey {
    fn of(change: &LimiterChange) -> Option<ChangeKey> {
        Some(match change {
            LimiterChange::Ban(ban) => ChangeKey::Ban(ban.subject.clone()),
            LimiterChange::Unban { subject, .. } => ChangeKey::Ban(subject.clone()),
            LimiterChange::Count(c) => ChangeKey::Counter(c.policy.clone(), c.subject.clone()),
            LimiterChange::Uncount { policy, subject } => {
                ChangeKey::Counter(policy.clone(), subject.clone())
            }
            LimiterChange::Unlock { .. } => return None,
        })
    }

    fn subject(&self) -> &str {
        match self {
            ChangeKey::Ban(subject) | ChangeKey::Counter(_, subject) => subject,
        }
    }
}

impl LimiterWriter {
    fn new(store: Arc<dyn Store>, rx: mpsc::UnboundedReceiver<LimiterChange>) -> Self {
        Self {
            store,
            rx,
            pending: Vec::new(),
            index: std::collections::HashMap::new(),
        }
    }

    /// Adds a change, replacing the pending one it supersedes: a later state of the same ban
    /// or counter, or (an unlock) everything pending for the subject.
    fn push(&mut self, change: LimiterChange) {
        match ChangeKey::of(&change) {
            Some(key) => match self.index.get(&key) {
                Some(&at) => self.pending[at] = Some(change),
                None => {
                    self.index.insert(key, self.pending.len());
                    self.pending.push(Some(change));
                }
            },
            None => {
                if let LimiterChange::Unlock { subject } = &change {
                    let pending = &mut self.pending;
                    self.index.retain(|key, at| {
                        let moot = key.subject() == subject;
                        if moot {
                            pending[*at] = None;
                        }
                        !moot
                    });
                }
                self.pending.push(Some(change));
            }
        }
    }

    fn take_batch(&mut self) -> Vec<LimiterChange> {
        self.index.clear();
        std::mem::take(&mut self.pending)
            .into_iter()
            .flatten()
            .collect()
    }

    /// Runs until `shutdown`, then writes what is pending one last time.
    pub async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.pending.is_empty() {
                tokio::select! {
                    change = self.rx.recv() => match change {
                        Some(change) => self.push(change),
                        None => return,
                    },
                    () = shutdown.cancelled() => {}
                }
            }
            while let Ok(change) = self.rx.try_recv() {
                self.push(change);
            }
            let batch = self.take_batch();
            if batch.is_empty() {
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            match self.store.save_limiter(batch.clone()).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(error) => {
                    // Put the batch back in front of what came in meanwhile, in order.
                    let newer = self.take_batch();
                    for change in batch.into_iter().chain(newer) {
                        self.push(change);
                    }
                    if shutdown.is_cancelled() {
                        tracing::error!(%error, pending = self.pending.len(), "failure limiter state not saved at shutdown");
                        return;
                    }
                    tracing::warn!(%error, pending = self.pending.len(), "cannot save the failure limiter's state; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// `max` failures tolerated in a burst, refilled one per `window / max`: a sustained rate of
/// `max` per `window`.
fn quota(rate: Rate) -> Quota {
    let period = rate.window / rate.max.get();
    Quota::with_period(period.max(Duration::from_millis(1)))
        .unwrap_or_else(|| Quota::per_hour(rate.max))
        .allow_burst(rate.max)
}

#[async_trait]
impl AttemptLimiter for LocalLimiter {
    fn banned(&self, subject: &Subject) -> Result<Option<u64>, Ban> {
        LocalLimiter::banned(self, subject)
    }

    async fn record(
        &self,
        policy: &Arc<str>,
        subject: Subject,
        rate: Rate,
        failures: &Failures,
    ) -> Recorded {
        LocalLimiter::record(self, policy, subject, rate, failures)
    }

    async fn reset(&self, policy: &Arc<str>, subject: Subject) {
        LocalLimiter::reset(self, policy, subject);
    }

    async fn unlock(&self, subject: &Subject) -> bool {
        LocalLimiter::unlock(self, subject)
    }

    async fn bans(&self) -> Vec<(Subject, Ban)> {
        LocalLimiter::bans(self)
    }

    fn active_bans(&self) -> u64 {
        LocalLimiter::active_bans(self)
    }

    fn account_wide(&self) -> Arc<str> {
        LocalLimiter::account_wide(self)
    }

    fn now(&self) -> u64 {
        LocalLimiter::now(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::num::NonZeroU32;

    fn failures(max: u32) -> Failures {
        let rate = Rate {
            max: NonZeroU32::new(max).unwrap(),
            window: Duration::from_secs(900),
        };
        Failures {
            per_consumer: rate,
            per_ip: rate,
            ban: Duration::from_secs(600),
        }
    }

    #[test]
    fn bans_after_max_failures_until_the_ban_ends() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let limiter = LocalLimiter::new(clock.clone());
        let policy: Arc<str> = "p".into();
        let f = failures(3);
        let who = Subject::Consumer("c1".into());
        for _ in 0..3 {
            assert_eq!(
                limiter.record(&policy, who.clone(), f.per_consumer, &f),
                Recorded::Counted
            );
        }
        assert_eq!(limiter.banned(&who), Ok(None));
        assert_eq!(
            limiter.record(&policy, who.clone(), f.per_consumer, &f),
            Recorded::Banned { until: 1_000_600 }
        );
        assert_eq!(limiter.banned(&who), Ok(Some(600)));
        clock.advance(599);
        assert_eq!(limiter.banned(&who), Ok(Some(1)));
        clock.advance(1);
        assert!(limiter.banned(&who).is_err(), "ban end is reported once");
        assert_eq!(limiter.banned(&who), Ok(None));
        // Others were never affected.
        assert_eq!(limiter.banned(&Subject::Consumer("c2".into())), Ok(None));
    }

    #[test]
    fn failures_refill_over_the_window_and_reset_on_success() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let limiter = LocalLimiter::new(clock.clone());
        let policy: Arc<str> = "p".into();
        let f = failures(3);
        let who = Subject::Consumer("c1".into());
        for _ in 0..3 {
            limiter.record(&policy, who.clone(), f.per_consumer, &f);
        }
        clock.advance(300); // one failure's worth refilled (900 s / 3)
        assert_eq!(
            limiter.record(&policy, who.clone(), f.per_consumer, &f),
            Recorded::Counted
        );
        limiter.reset(&policy, who.clone());
        for _ in 0..3 {
            assert_eq!(
                limiter.record(&policy, who.clone(), f.per_consumer, &f),
                Recorded::Counted
            );
        }
    }

    #[test]
    fn a_ban_is_looked_up_only_for_its_kind_and_counted_until_it_is_removed() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let limiter = LocalLimiter::new(clock.clone());
        let policy: Arc<str> = "p".into();
        let f = failures(1);
        let held = |limiter: &LocalLimiter| {
            limiter.bans.run_pending_tasks();
            let h = &limiter.bans_held;
            (
                h.consumers.load(Ordering::Acquire),
                h.ips.load(Ordering::Acquire),
            )
        };
        let who = Subject::Consumer("c1".into());
        let ip = Subject::ip("10.0.0.1".parse().unwrap());
        limiter.record(&policy, who.clone(), f.per_consumer, &f);
        limiter.record(&policy, who.clone(), f.per_consumer, &f);
        assert_eq!(
            held(&limiter),
            (1, 0),
            "a consumer's ban leaves IP checks a load"
        );
        assert_eq!(limiter.banned(&who), Ok(Some(600)));
        assert_eq!(limiter.banned(&ip), Ok(None));
        limiter.record(&policy, ip.clone(), f.per_ip, &f);
        limiter.record(&policy, ip.clone(), f.per_ip, &f);
        assert_eq!(held(&limiter), (1, 1));
        assert_eq!(limiter.banned(&ip), Ok(Some(600)));
        assert!(limiter.unlock(&who));
        assert_eq!(held(&limiter), (0, 1));
        assert_eq!(limiter.banned(&who), Ok(None));
        clock.advance(600);
        assert!(limiter.banned(&ip).is_err(), "its end is reported once");
        assert_eq!(held(&limiter), (0, 0));
    }

    #[test]
    fn a_restored_count_goes_on_where_it_was() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let before = LocalLimiter::new(clock.clone());
        let policy: Arc<str> = "p".into();
        let f = failures(3);
        let who = Subject::Consumer("c1".into());
        for _ in 0..2 {
            before.record(&policy, who.clone(), f.per_consumer, &f);
        }
        let tat_ms = before
            .counters
            .get(&(policy.clone(), who.clone()))
            .and_then(|c| c.tat_ms())
            .unwrap();
        clock.advance(10);
        let after = LocalLimiter::new(clock.clone());
        after.restore(LimiterState {
            bans: vec![BanRecord {
                subject: "ip:10.0.0.1".into(),
                started: 1_000_000,
                until: 1_000_600,
            }],
            counts: vec![FailureCountRecord {
                policy: "p".into(),
                subject: who.key(),
                tat_ms,
            }],
        });
        assert_eq!(
            after.banned(&Subject::ip("10.0.0.1".parse().unwrap())),
            Ok(Some(590))
        );
        // Two failures were counted before: the third is tolerated, the fourth bans.
        assert_eq!(
            after.record(&policy, who.clone(), f.per_consumer, &f),
            Recorded::Counted
        );
        assert!(matches!(
            after.record(&policy, who.clone(), f.per_consumer, &f),
            Recorded::Banned { .. }
        ));
        assert_eq!(Subject::from_key(&who.key()), Some(who));
        assert_eq!(Subject::from_key("nobody"), None);
    }

    #[tokio::test]
    async fn the_writer_keeps_one_change_per_counter_and_an_unlock_clears_the_subject() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("limiter.db")).unwrap(),
        );
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut writer = LimiterWriter::new(store, rx);
        let count = |subject: &str, tat_ms| {
            LimiterChange::Count(FailureCountRecord {
                policy: "p".into(),
                subject: subject.into(),
                tat_ms,
            })
        };
        writer.push(count("consumer:a", 1));
        writer.push(count("consumer:b", 1));
        writer.push(count("consumer:a", 2));
        writer.push(LimiterChange::Unlock {
            subject: "consumer:b".into(),
        });
        writer.push(count("consumer:b", 3));
        assert_eq!(
            writer.take_batch(),
            [
                count("consumer:a", 2),
                LimiterChange::Unlock {
                    subject: "consumer:b".into()
                },
                count("consumer:b", 3),
            ]
        );
        assert!(writer.take_batch().is_empty());
    }

    #[test]
    fn ipv6_hosts_are_limited_by_their_64() {
        let a = Subject::ip("2001:db8::1".parse().unwrap());
        let b = Subject::ip("2001:db8::ffff:1".parse().unwrap());
        let c = Subject::ip("2001:db8:0:1::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            Subject::ip("::ffff:10.0.0.1".parse().unwrap()),
            Subject::ip("10.0.0.1".parse().unwrap())
        );
    }
}
