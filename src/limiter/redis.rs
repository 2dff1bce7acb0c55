//! The failure limiter shared by several nodes on Redis.
//!
//! Failures are counted in Redis, one script per subject, so a brute force spread over every
//! node gets the budget of one. Bans are checked on the request path without a network call:
//! each node holds every ban in force in a local [`LocalLimiter`] (its shield), as they are
//! announced on the events channel, loaded at start and reloaded whenever the subscription
//! was lost. While Redis cannot be reached, the shield counts this node's failures and bans
//! on its own (so brute force is still stopped), and what it decided is written to Redis once
//! it is back.

use std::sync::Arc;

use async_trait::async_trait;

use super::{AttemptLimiter, Ban, LimiterWriter, LocalLimiter, Recorded, Subject};
use crate::clock::SharedClock;
use crate::config::{Failures, Rate};
use crate::store::redis::Redis;
use crate::store::redis::events::Notice;
use crate::store::redis::limiter::{Counted, Gcra};
use crate::store::{BanRecord, FeedEvent, Store, StoreError};

pub struct RedisLimiter {
    redis: Redis,
    shield: Arc<LocalLimiter>,
    clock: SharedClock,
}

/// governor's parameters for `rate`, in milliseconds (see [`Gcra`]).
fn gcra(rate: Rate) -> Gcra {
    let window_ms = u64::try_from(rate.window.as_millis()).unwrap_or(u64::MAX);
    let max = u64::from(rate.max.get());
    let emission_ms = (window_ms / max).max(1);
    Gcra {
        emission_ms,
        tolerance_ms: emission_ms.saturating_mul(max - 1),
    }
}

fn hold(shield: &LocalLimiter, bans: Vec<BanRecord>) {
    for ban in bans {
        if let Some(subject) = Subject::from_key(&ban.subject) {
            shield.hold_ban(
                subject,
                Ban {
                    started: ban.started,
                    until: ban.until,
                },
            );
        }
    }
}

impl RedisLimiter {
    /// Loads the bans in force and follows the events channel for new ones. `store` (the
    /// Redis store) receives what the shield decides while Redis is away, through the
    /// returned writer (run it in the background).
    pub async fn start(
        redis: Redis,
        clock: SharedClock,
        store: Arc<dyn Store>,
    ) -> Result<(Self, LimiterWriter), StoreError> {
        let (shield, writer) = LocalLimiter::new(clock.clone()).writing_to(store);
        let shield = Arc::new(shield);
        // Subscribed before loading, so that no ban announced meanwhile is missed.
        let mut notices = redis.events.notices();
        hold(&shield, redis.bans(clock.now()).await?);
        let (held, from) = (shield.clone(), redis.clone());
        let now = clock.clone();
        tokio::spawn(async move {
            let mut owed = None;
            loop {
                let event = tokio::select! {
                    event = notices.next() => event,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)), if owed.is_some() => {
                        Some(FeedEvent::Lost(crate::store::Resync::default()))
                    }
                };
                match event {
                    None => return,
                    Some(FeedEvent::Changed(Notice::Banned {
                        subject,
                        started,
                        until,
                    })) => {
                        if let Some(subject) = Subject::from_key(&subject) {
                            held.hold_ban(subject, Ban { started, until });
                        }
                    }
                    Some(FeedEvent::Changed(Notice::Unlocked(subject))) => {
                        if let Some(subject) = Subject::from_key(&subject) {
                            held.forget(&subject);
                        }
                    }
                    Some(FeedEvent::Changed(Notice::TokensRevoked(_))) => {}
                    Some(FeedEvent::Lost(resync)) => {
                        owed.get_or_insert(resync);
                        match from.bans(now.now()).await {
                            Ok(bans) => {
                                hold(&held, bans);
                                owed = None;
                            }
                            Err(error) => {
                                tracing::warn!(%error, "cannot reload the bans from Redis; retrying");
                            }
                        }
                    }
                }
            }
        });
        Ok((
            Self {
                redis,
                shield,
                clock,
            },
            writer,
        ))
    }
}

#[async_trait]
impl AttemptLimiter for RedisLimiter {
    fn banned(&self, subject: &Subject) -> Result<Option<u64>, Ban> {
        self.shield.banned(subject)
    }

    async fn record(
        &self,
        policy: &Arc<str>,
        subject: Subject,
        rate: Rate,
        failures: &Failures,
    ) -> Recorded {
        let counted = self
            .redis
            .count_failure(
                &subject.key(),
                policy,
                gcra(rate),
                self.clock.now_millis(),
                failures.ban.as_secs(),
            )
            .await;
        let ban = |ban: &BanRecord| Ban {
            started: ban.started,
            until: ban.until,
        };
        match counted {
            Ok(Counted::Counted) => Recorded::Counted,
            Ok(Counted::Banned(made)) => {
                self.shield.hold_ban(subject, ban(&made));
                Recorded::Banned { until: made.until }
            }
            // Announced already; counted here as what it is, a failure during a ban.
            Ok(Counted::BannedBefore(made)) => {
                self.shield.hold_ban(subject, ban(&made));
                Recorded::Counted
            }
            Err(error) => {
                tracing::warn!(%error, "cannot count a failure in Redis; counting on this node");
                self.shield.record(policy, subject, rate, failures)
            }
        }
    }

    async fn reset(&self, policy: &Arc<str>, subject: Subject) {
        if let Err(error) = self.redis.uncount(&subject.key(), policy).await {
            tracing::warn!(%error, "cannot clear a failure count in Redis");
        }
        self.shield.reset(policy, subject);
    }

    async fn unlock(&self, subject: &Subject) -> bool {
        match self.redis.unlock(&subject.key(), self.clock.now()).await {
            Ok(ban) => {
                let here = self.shield.banned(subject).is_ok_and(|b| b.is_some());
                self.shield.forget(subject);
                ban.is_some() || here
            }
            Err(error) => {
                // The shield writes the unlock to Redis once it is back.
                tracing::warn!(%error, "cannot unlock in Redis; unlocked here, and there once it is back");
                self.shield.unlock(subject)
            }
        }
    }

    async fn bans(&self) -> Vec<(Subject, Ban)> {
        match self.redis.bans(self.clock.now()).await {
            Ok(bans) => {
                let mut bans: Vec<(Subject, Ban)> = bans
                    .into_iter()
                    .filter_map(|b| {
                        Some((
                            Subject::from_key(&b.subject)?,
                            Ban {
                                started: b.started,
                                until: b.until,
                            },
                        ))
                    })
                    .collect();
                bans.sort_by_key(|(_, ban)| std::cmp::Reverse(ban.started));
                bans
            }
            Err(error) => {
                tracing::warn!(%error, "cannot list the bans in Redis; listing this node's");
                self.shield.bans()
            }
        }
    }

    fn active_bans(&self) -> u64 {
        self.shield.active_bans()
    }

    fn account_wide(&self) -> Arc<str> {
        self.shield.account_wide()
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::Duration;

    #[test]
    fn the_shared_count_has_governors_parameters() {
        let rate = Rate {
            max: NonZeroU32::new(5).unwrap(),
            window: Duration::from_secs(900),
        };
        let g = gcra(rate);
        assert_eq!((g.emission_ms, g.tolerance_ms), (180_000, 720_000));
    }
}
