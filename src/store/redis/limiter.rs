//! The failure limiter's shared state on Redis: one subject's counters in one hash
//! (`{s:<subject>}:failures`, policy → the GCRA's theoretical arrival time in ms, expiring
//! when the last one runs out), its ban in one key (`{s:<subject>}:ban`, `started until`,
//! expiring a minute after the end), and an index of bans for listing (`bans`, a sorted set
//! by end; an entry whose ban key is gone is skipped, and entries are dropped once their
//! end has passed, so lifting a ban never touches another slot).
//!
//! Every time that decides anything comes from the gateway's clock (the nodes' clocks must
//! agree, as for TOTP); Redis's TTLs only collect garbage, so each is at least as long as what
//! it keeps can matter. Counting is one script per subject, so a brute force spread over every node
//! counts against one budget; a ban is announced on the events channel for every node's
//! local shield.

use redis::Script;
use std::sync::LazyLock;

use super::{Redis, unavailable};
use crate::store::{BanRecord, FailureCountRecord, StoreError};

/// The GCRA of one counter, in milliseconds: one failure is forgiven every `emission_ms`, and
/// up to `tolerance_ms / emission_ms + 1` may come at once (governor's parameters).
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    pub emission_ms: u64,
    pub tolerance_ms: u64,
}

/// What counting one failure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counted {
    Counted,
    /// This failure started a ban.
    Banned(BanRecord),
    /// The subject was banned already (by another node, not yet heard of here).
    BannedBefore(BanRecord),
}

/// KEYS: failures, ban. ARGV: policy, now_ms, emission_ms, tolerance_ms, now_s, ban_s,
/// subject, channel. Returns {0} counted, {1, started, until} banned before, {2, started,
/// until} banned now.
static COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ban = redis.call('GET', KEYS[2])
if ban then
  local started, till = string.match(ban, '^(%d+) (%d+)$')
  if started and tonumber(till) > tonumber(ARGV[5]) then
    return {1, tonumber(started), tonumber(till)}
  end
end
local now = tonumber(ARGV[2])
local tat = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or ARGV[2])
if now < tat - tonumber(ARGV[4]) then
  local started = tonumber(ARGV[5])
  local till = started + tonumber(ARGV[6])
  redis.call('SET', KEYS[2], ARGV[5] .. ' ' .. till, 'EX', tonumber(ARGV[6]) + 60)
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[8], 'b ' .. ARGV[7] .. ' ' .. ARGV[5] .. ' ' .. till)
  return {2, started, till}
end
local nxt = math.max(tat, now) + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', nxt))
if redis.call('PTTL', KEYS[1]) < nxt - now then redis.call('PEXPIRE', KEYS[1], nxt - now) end
return {0}
"#,
    )
});

/// KEYS: ban. ARGV: subject, started, until, channel. Puts a ban unless a longer one is in
/// force; announces it. 1 when put.
static BAN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ban = redis.call('GET', KEYS[1])
if ban then
  local _, till = string.match(ban, '^(%d+) (%d+)$')
  if till and tonumber(till) >= tonumber(ARGV[3]) then return 0 end
end
local kept = math.max(tonumber(ARGV[3]) - tonumber(ARGV[2]), 0) + 60
redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. ARGV[3], 'EX', kept)
redis.call('PUBLISH', ARGV[4], 'b ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return 1
"#,
    )
});

/// KEYS: ban. ARGV: until. Deletes the ban if it ends by `until` (not one that replaced it).
static UNBAN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ban = redis.call('GET', KEYS[1])
if not ban then return 0 end
local _, till = string.match(ban, '^(%d+) (%d+)$')
if till and tonumber(till) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#,
    )
});

/// KEYS: failures. ARGV: policy, tat_ms. Keeps the later of the stored and given times; the
/// hash is kept at least a day (as a node keeps an idle counter), its counts' own ends being
/// checked against the gateway's clock.
static PUT_COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= old then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < 86400000 then redis.call('PEXPIRE', KEYS[1], 86400000) end
return 1
"#,
    )
});

/// KEYS: ban, failures. ARGV: subject, channel. Lifts the ban and every count; announces it.
/// Returns the ban that was there, or false.
static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ban = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[2], 'u ' .. ARGV[1])
return ban
"#,
    )
});

fn ban_of(subject: &str, value: &str) -> Option<BanRecord> {
    let (started, until) = value.split_once(' ')?;
    Some(BanRecord {
        subject: subject.to_owned(),
        started: started.parse().ok()?,
        until: until.parse().ok()?,
    })
}

impl Redis {
    /// Counts one failure of `subject` (its store key) on `policy`, banning it for `ban_secs`
    /// when this one is over the limit.
    pub async fn count_failure(
        &self,
        subject: &str,
        policy: &str,
        gcra: Gcra,
        now_ms: u64,
        ban_secs: u64,
    ) -> Result<Counted, StoreError> {
        let now = now_ms / 1000;
        let answer: Vec<u64> = COUNT
            .key(self.keys.failures(subject))
            .key(self.keys.ban(subject))
            .arg(policy)
            .arg(now_ms)
            .arg(gcra.emission_ms)
            .arg(gcra.tolerance_ms)
            .arg(now)
            .arg(ban_secs)
            .arg(subject)
            .arg(self.keys.events())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let ban = |started: u64, until: u64| BanRecord {
            subject: subject.to_owned(),
            started,
            until,
        };
        Ok(match answer.as_slice() {
            [2, started, until] => {
                let ban = ban(*started, *until);
                self.index_ban(&ban).await?;
                Counted::Banned(ban)
            }
            [1, started, until] => Counted::BannedBefore(ban(*started, *until)),
            _ => Counted::Counted,
        })
    }

    async fn index_ban(&self, ban: &BanRecord) -> Result<(), StoreError> {
        redis::cmd("ZADD")
            .arg(self.keys.bans())
            .arg("GT")
            .arg(ban.until)
            .arg(&ban.subject)
            .query_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Puts a ban made elsewhere (a node's own while Redis was away, or a migration).
    pub async fn put_ban(&self, ban: &BanRecord) -> Result<(), StoreError> {
        let _: i64 = BAN
            .key(self.keys.ban(&ban.subject))
            .arg(&ban.subject)
            .arg(ban.started)
            .arg(ban.until)
            .arg(self.keys.events())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        self.index_ban(ban).await
    }

    /// The ban ending at `until` is over (it expires by itself a minute later; this is for a
    /// migration's or a test's sake).
    pub async fn unban(&self, subject: &str, until: u64) -> Result<(), StoreError> {
        let _: i64 = UNBAN
            .key(self.keys.ban(subject))
            .arg(until)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn put_count(&self, count: &FailureCountRecord) -> Result<(), StoreError> {
        let _: i64 = PUT_COUNT
            .key(self.keys.failures(&count.subject))
            .arg(&count.policy)
            .arg(count.tat_ms)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// A success starts the subject's count on `policy` afresh.
    pub async fn uncount(&self, subject: &str, policy: &str) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("HDEL")
            .arg(self.keys.failures(subject))
            .arg(policy)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Lifts the subject's ban and clears its counts, on every node; the ban that was in
    /// force at `now`, if any.
    pub async fn unlock(&self, subject: &str, now: u64) -> Result<Option<BanRecord>, StoreError> {
        let ban: Option<String> = UNLOCK
            .key(self.keys.ban(subject))
            .key(self.keys.failures(subject))
            .arg(subject)
            .arg(self.keys.events())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(ban
            .and_then(|value| ban_of(subject, &value))
            .filter(|ban| ban.until > now))
    }

    /// The bans in force at `now`; the index's entries for those over are dropped on the way.
    pub async fn bans(&self, now: u64) -> Result<Vec<BanRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.bans())
            .arg("-inf")
            .arg(now)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let subjects: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.bans())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if subjects.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for subject in &subjects {
            pipe.get(self.keys.ban(subject));
        }
        let values: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(subjects
            .iter()
            .zip(values)
            .filter_map(|(subject, value)| ban_of(subject, &value?))
            .filter(|ban| ban.until > now)
            .collect())
    }

    /// Every failure count not run out at `now_ms`, deleting those that have (a scan: for a
    /// migration, not the request path).
    pub async fn counts(&self, now_ms: u64) -> Result<Vec<FailureCountRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let pattern = self.keys.failures("*");
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            keys.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut counts = Vec::new();
        for key in keys {
            let Some(subject) = self.keys.subject_of_failures(&key) else {
                continue;
            };
            let fields: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for (policy, tat_ms) in fields {
                if tat_ms > now_ms {
                    counts.push(FailureCountRecord {
                        policy,
                        subject: subject.clone(),
                        tat_ms,
                    });
                } else {
                    // Run out: as if it had seen no failure.
                    let _: i64 = redis::cmd("HDEL")
                        .arg(&key)
                        .arg(&policy)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                }
            }
        }
        Ok(counts)
    }
}
