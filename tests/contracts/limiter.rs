//! The attempt limiter's contract: past a policy's limit a subject is banned for the ban
//! time (checked without waiting), the end of a ban is reported once, a success resets the
//! count, an unlock lifts ban and count, and the bans in force can be listed.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use stepgate::clock::{Clock, ManualClock};
use stepgate::config::{Failures, Rate};
use stepgate::limiter::{AttemptLimiter, Recorded, Subject};

const NOW: u64 = 1_800_000_000;

fn failures(max: u32, ban: u64) -> Failures {
    let rate = Rate {
        max: NonZeroU32::new(max).unwrap(),
        window: Duration::from_secs(900),
    };
    Failures {
        per_consumer: rate,
        per_ip: rate,
        ban: Duration::from_secs(ban),
    }
}

async fn fail_times(
    limiter: &dyn AttemptLimiter,
    who: &Subject,
    times: u32,
    f: &Failures,
) -> Vec<Recorded> {
    let policy: Arc<str> = Arc::from("p");
    let mut out = Vec::new();
    for _ in 0..times {
        out.push(
            limiter
                .record(&policy, who.clone(), f.per_consumer, f)
                .await,
        );
    }
    out
}

pub async fn a_subject_is_banned_past_its_limit_until_the_ban_expires<F, Fut>(make: F)
where
    F: Fn(Arc<ManualClock>) -> Fut,
    Fut: Future<Output = Arc<dyn AttemptLimiter>>,
{
    let clock = Arc::new(ManualClock::new(NOW));
    let limiter = make(clock.clone()).await;
    let f = failures(3, 600);
    let who = Subject::Consumer(Arc::from("c1"));
    let recorded = fail_times(limiter.as_ref(), &who, 4, &f).await;
    assert_eq!(recorded[..3], [Recorded::Counted; 3]);
    assert_eq!(recorded[3], Recorded::Banned { until: NOW + 600 });
    assert_eq!(limiter.banned(&who), Ok(Some(600)));
    clock.advance(599);
    assert_eq!(limiter.banned(&who), Ok(Some(1)));
    clock.advance(1);
    assert!(limiter.banned(&who).is_err(), "the end is reported once");
    assert_eq!(limiter.banned(&who), Ok(None));
    assert_eq!(limiter.now(), clock.now());
}

pub async fn a_success_resets_the_count<F, Fut>(make: F)
where
    F: Fn(Arc<ManualClock>) -> Fut,
    Fut: Future<Output = Arc<dyn AttemptLimiter>>,
{
    let clock = Arc::new(ManualClock::new(NOW));
    let limiter = make(clock).await;
    let f = failures(3, 600);
    let who = Subject::Consumer(Arc::from("c1"));
    fail_times(limiter.as_ref(), &who, 3, &f).await;
    limiter.reset(&Arc::from("p"), who.clone()).await;
    let recorded = fail_times(limiter.as_ref(), &who, 3, &f).await;
    assert_eq!(recorded, [Recorded::Counted; 3]);
}

pub async fn an_unlock_lifts_the_ban_and_the_count<F, Fut>(make: F)
where
    F: Fn(Arc<ManualClock>) -> Fut,
    Fut: Future<Output = Arc<dyn AttemptLimiter>>,
{
    let clock = Arc::new(ManualClock::new(NOW));
    let limiter = make(clock).await;
    let f = failures(2, 600);
    let who = Subject::Consumer(Arc::from("c1"));
    fail_times(limiter.as_ref(), &who, 3, &f).await;
    assert!(matches!(limiter.banned(&who), Ok(Some(_))));
    assert!(limiter.unlock(&who).await);
    assert_eq!(limiter.banned(&who), Ok(None));
    assert!(!limiter.unlock(&who).await, "nothing left to lift");
    let recorded = fail_times(limiter.as_ref(), &who, 2, &f).await;
    assert_eq!(recorded, [Recorded::Counted; 2], "the count went too");
}

pub async fn active_bans_are_listed_newest_first<F, Fut>(make: F)
where
    F: Fn(Arc<ManualClock>) -> Fut,
    Fut: Future<Output = Arc<dyn AttemptLimiter>>,
{
    let clock = Arc::new(ManualClock::new(NOW));
    let limiter = make(clock.clone()).await;
    let f = failures(1, 600);
    let first = Subject::Consumer(Arc::from("c1"));
    let second = Subject::ip("10.0.0.1".parse().unwrap());
    fail_times(limiter.as_ref(), &first, 2, &f).await;
    clock.advance(10);
    fail_times(limiter.as_ref(), &second, 2, &f).await;
    let bans = limiter.bans().await;
    let subjects: Vec<&Subject> = bans.iter().map(|(s, _)| s).collect();
    assert_eq!(subjects, [&second, &first]);
    assert_eq!(bans[1].1.until, NOW + 600);
    clock.advance(595);
    let bans = limiter.bans().await;
    assert_eq!(bans.len(), 1, "the first ban ended: {bans:?}");
    assert!(limiter.active_bans() >= 1);
}

pub async fn consumers_and_addresses_are_counted_apart<F, Fut>(make: F)
where
    F: Fn(Arc<ManualClock>) -> Fut,
    Fut: Future<Output = Arc<dyn AttemptLimiter>>,
{
    let clock = Arc::new(ManualClock::new(NOW));
    let limiter = make(clock).await;
    let f = failures(1, 600);
    let consumer = Subject::Consumer(Arc::from("10.0.0.1"));
    let ip = Subject::ip("10.0.0.1".parse().unwrap());
    fail_times(limiter.as_ref(), &consumer, 2, &f).await;
    assert!(matches!(limiter.banned(&consumer), Ok(Some(_))));
    assert_eq!(limiter.banned(&ip), Ok(None));
    // Another policy counts on its own; the account-wide counter has its own name.
    let other: Arc<str> = Arc::from("q");
    assert_eq!(
        limiter.record(&other, ip.clone(), f.per_ip, &f).await,
        Recorded::Counted
    );
    assert_ne!(&*limiter.account_wide(), "p");
}
