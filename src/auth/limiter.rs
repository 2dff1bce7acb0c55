//! The failure limiter (DESIGN.md §4). Failed attempts are counted per consumer and per
//! client IP with governor's GCRA, per policy; a subject that goes over its policy's limit is
//! banned for the policy's ban time, and every request from it is then answered 429 before
//! any credential is looked at, so a correct code during a ban still gets 429.
//!
//! Memory is bounded: counters and bans live in moka caches with a fixed capacity, and only
//! subjects the gateway can vouch for become keys: consumer ids (known consumers only, since
//! an unknown key counts against the IP) and client IPs (IPv6 by /64, because a single host
//! commonly holds a whole /64).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use moka::Expiry;
use moka::sync::Cache;

use crate::clock::SharedClock;
use crate::config::{Failures, Rate};

const COUNTER_CAPACITY: u64 = 200_000;
const BAN_CAPACITY: u64 = 200_000;

/// Who failed: a known consumer, or a client address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Consumer(Arc<str>),
    Ip(IpAddr),
}

impl Subject {
    /// The limiter key for a client address: the address, or its /64 for IPv6.
    pub fn ip(ip: IpAddr) -> Self {
        Subject::Ip(match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let mut segments = v6.segments();
                    segments[4..].fill(0);
                    IpAddr::V6(segments.into())
                }
            },
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Subject::Consumer(id) => format!("consumer {id}"),
            Subject::Ip(ip) => format!("ip {ip}"),
        }
    }
}

/// governor reads time from the gateway's injected clock, so tests move time by hand.
#[derive(Clone)]
struct LimiterClock(SharedClock);

impl GovernorClock for LimiterClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.now_millis())
    }
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, LimiterClock, NoOpMiddleware<Duration>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ban {
    pub started: u64,
    pub until: u64,
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

/// Outcome of recording a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Counted,
    /// This failure went over the limit: a ban started, lasting until the given time.
    Banned {
        until: u64,
    },
}

pub struct FailureLimiter {
    clock: SharedClock,
    account_wide: Arc<str>,
    counters: Cache<(Arc<str>, Subject), Arc<Gcra>>,
    bans: Cache<Subject, Ban>,
    /// Bans held, per kind of subject: while a kind's count is zero no request needs a ban
    /// lookup for it. A flood of wrong codes bans consumers, and every request's IP check
    /// then stays an atomic load instead of a cache lookup.
    bans_held: Arc<BansHeld>,
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

impl FailureLimiter {
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
        let clock = LimiterClock(self.clock.clone());
        let limiter = self
            .counters
            .get_with((policy.clone(), subject.clone()), || {
                Arc::new(RateLimiter::direct_with_clock(quota(rate), clock))
            });
        if limiter.check().is_ok() {
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
        self.counters.invalidate(&(policy.clone(), subject));
        Recorded::Banned { until }
    }

    /// A success clears a consumer's failures on that policy.
    pub fn reset(&self, policy: &Arc<str>, subject: Subject) {
        let key = (policy.clone(), subject);
        // Most successes have no failures to forget: a lookup is cheaper than an invalidation.
        if self.counters.contains_key(&key) {
            self.counters.invalidate(&key);
        }
    }

    /// Lifts a ban and clears the subject's counters (admin `unlock`).
    pub fn unlock(&self, subject: &Subject) -> bool {
        let subject = subject.clone();
        let was_banned = self.bans.remove(&subject).is_some();
        let _ = self
            .counters
            .invalidate_entries_if(move |(_, s), _| *s == subject);
        was_banned
    }

    /// Bans in force (approximate; for metrics).
    pub fn active_bans(&self) -> u64 {
        self.bans.run_pending_tasks();
        self.bans.entry_count()
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
        let limiter = FailureLimiter::new(clock.clone());
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
        let limiter = FailureLimiter::new(clock.clone());
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
        let limiter = FailureLimiter::new(clock.clone());
        let policy: Arc<str> = "p".into();
        let f = failures(1);
        let held = |limiter: &FailureLimiter| {
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
