//! The SMS send budgets shared by several nodes on Redis: each budget a sorted set of the
//! sends of the last hour (a consumer's in its own slot, a number's by its digest), checked and
//! added to by one script, so that asking every node in turn buys no extra texts.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use redis::Script;

use super::Phone;
use super::budget::{MIN_INTERVAL_SECS, NotNow, PER_HOUR, Reservation, SendBudget};
use crate::secrets::{hex, random_bytes};
use crate::store::redis::Redis;

/// KEYS: budget. ARGV: now, send id, interval, per hour. 0 and the send counted when the
/// budget allows it; else the seconds to wait.
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600)
local wait = 0
local last = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if last[2] then wait = math.max(wait, tonumber(last[2]) + tonumber(ARGV[3]) - now) end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  wait = math.max(wait, tonumber(first[2]) + 3600 - now)
end
if wait > 0 then return wait end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('EXPIRE', KEYS[1], 3600 + tonumber(ARGV[3]))
return 0
"#,
    )
});

pub struct RedisSendBudget {
    redis: Redis,
}

impl RedisSendBudget {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// Counts a send in `budget`, or says how long to wait.
    async fn take(&self, budget: &str, send: &str, now: u64) -> Result<u64, NotNow> {
        RESERVE
            .key(budget)
            .arg(now)
            .arg(send)
            .arg(MIN_INTERVAL_SECS)
            .arg(PER_HOUR)
            .invoke_async(&mut self.redis.conn.clone())
            .await
            .map_err(|error| {
                tracing::warn!(%error, "cannot check an SMS send budget in Redis; not sending");
                NotNow::Unavailable
            })
    }
}

/// Takes a send out of the budgets again.
async fn take_back(redis: &Redis, budgets: &[String], send: &str) {
    if budgets.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for budget in budgets {
        pipe.zrem(budget, send).ignore();
    }
    if let Err(error) = pipe.query_async::<()>(&mut redis.conn.clone()).await {
        tracing::warn!(%error, "cannot give back an SMS send not made; it stays counted");
    }
}

/// [`take_back`] in the background: a reservation is given back when dropped, outside any
/// async context of its own.
fn give_back(redis: Redis, budgets: Vec<String>, send: String) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move { take_back(&redis, &budgets, &send).await });
}

#[async_trait]
impl SendBudget for RedisSendBudget {
    async fn reserve(
        &self,
        consumer: &Arc<str>,
        destination: Option<&Phone>,
        now: u64,
    ) -> Result<Reservation, NotNow> {
        let send = hex(&random_bytes::<16>());
        let mut budgets = vec![self.redis.keys.sends_of_consumer(consumer)];
        if let Some(phone) = destination {
            budgets.push(self.redis.keys.sends_of_phone(&hex(&phone.limiter_key())));
        }
        // One budget after the other (they live in different slots); a refusal gives back
        // what was taken before it, before answering, so that a refused send counts nothing
        // even for the very next request.
        for (taken, budget) in budgets.iter().enumerate() {
            match self.take(budget, &send, now).await {
                Ok(0) => {}
                refused => {
                    take_back(&self.redis, &budgets[..taken], &send).await;
                    return Err(match refused {
                        Ok(wait) => NotNow::Wait(wait),
                        Err(not_now) => not_now,
                    });
                }
            }
        }
        let redis = self.redis.clone();
        Ok(Reservation::new(move || give_back(redis, budgets, send)))
    }
}
