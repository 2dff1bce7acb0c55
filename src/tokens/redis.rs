//! Step-up tokens shared by several nodes on Redis, with a near-cache on each node.
//!
//! A token lives in Redis under its consumer's hash tag, by the digest of its text (the
//! node's cache holds it by the digest of its bits), with the token's own expiry as the key's
//! TTL; the consumer's index of tokens lets one script revoke them all and
//! announce it. Each node keeps the tokens it issued or has seen in a [`LocalTokens`] cache,
//! so the request path's common case (a known token) makes no network call; a token issued
//! on another node is fetched once. A revocation reaches every node's cache through the
//! events channel; a node whose subscription was lost forgets its whole cache, and a node
//! that is stale (see [`Freshness`]) asks Redis every time.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use async_trait::async_trait;
use redis::Script;

use super::local::{digest, info_of, mint, text_digest, verdict};
use super::{LocalTokens, NewToken, Scope, TokenInfo, TokenRejection, TokenStore};
use crate::secrets::hex;
use crate::store::redis::Redis;
use crate::store::redis::events::Notice;
use crate::store::{FeedEvent, Freshness, StoreError};

/// KEYS: token, index, uses. ARGV: digest, value, expires_at, now, uses (empty: unlimited).
/// Stores the token (and its count of uses) and indexes it (dropping the index's expired
/// entries); the index lives as long as its last token. The TTLs count from the gateway's
/// clock, which decides expiry (Redis's only collects garbage).
static ISSUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ttl = math.max(tonumber(ARGV[3]) - tonumber(ARGV[4]), 1)
redis.call('SET', KEYS[1], ARGV[2], 'EX', ttl)
if ARGV[5] ~= '' then redis.call('SET', KEYS[3], ARGV[5], 'EX', ttl) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
return 1
"#,
    )
});

/// KEYS: index. ARGV: token key prefix, consumer id, channel. Deletes every token of the
/// consumer (their keys share the index's hash tag, so they are in this script's slot) and
/// announces it.
static REVOKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for _, digest in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('DEL', ARGV[1] .. digest, ARGV[1] .. digest .. ':uses')
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], 't ' .. ARGV[2])
return 1
"#,
    )
});

/// KEYS: uses. Takes one use of a counted token: the uses left, or -1 when none (or the token
/// is gone). One script on one key, so two nodes never spend the same last use.
static SPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local left = redis.call('DECR', KEYS[1])
if left < 0 then return -1 end
return left
"#,
    )
});

pub struct RedisTokens {
    redis: Redis,
    cache: Arc<LocalTokens>,
    /// Raised by every revocation heard and every loss of the feed: a token fetched from
    /// Redis is cached only if none came while it was being fetched (it may be one of those
    /// revoked).
    revocations: Arc<AtomicU64>,
    freshness: Arc<Freshness>,
}

impl RedisTokens {
    /// The token store, following revocations from the events channel in the background.
    pub fn start(redis: Redis) -> Self {
        let cache = Arc::new(LocalTokens::new());
        let revocations = Arc::new(AtomicU64::new(0));
        let mut notices = redis.events.notices();
        let (held, counter) = (cache.clone(), revocations.clone());
        tokio::spawn(async move {
            while let Some(event) = notices.next().await {
                match event {
                    FeedEvent::Changed(Notice::TokensRevoked(consumer_id)) => {
                        counter.fetch_add(1, Ordering::AcqRel);
                        held.revoke_consumer(&consumer_id);
                    }
                    FeedEvent::Changed(_) => {}
                    FeedEvent::Lost(resync) => {
                        counter.fetch_add(1, Ordering::AcqRel);
                        held.clear();
                        drop(resync);
                    }
                }
            }
        });
        Self {
            freshness: redis.events.freshness(),
            redis,
            cache,
            revocations,
        }
    }

    async fn fetch(
        &self,
        consumer_id: &str,
        key: &[u8; 32],
    ) -> Result<Option<TokenInfo>, StoreError> {
        let value: Option<String> = redis::cmd("GET")
            .arg(self.redis.keys.token(consumer_id, &hex(key)))
            .query_async(&mut self.redis.conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(value.and_then(|value| parse(consumer_id, &value)))
    }
}

/// A token written by an earlier version (`<policy> <scope> <expires_at>`), during a rolling
/// upgrade: it knows neither when its code was presented nor from where, so it passes no
/// policy with `max_age` or `bind` (fail closed), and any other as before.
fn parse_v1(consumer_id: &str, value: &str) -> Option<TokenInfo> {
    let mut words = value.rsplitn(3, ' ');
    let expires_at = words.next()?.parse().ok()?;
    let scope = match words.next()? {
        "policy" => Scope::Policy,
        "global" => Scope::Global,
        _ => return None,
    };
    let policy = words.next()?;
    Some(TokenInfo {
        consumer_id: Arc::from(consumer_id),
        policy: Arc::from(policy),
        scope,
        expires_at,
        auth_time: 0,
        earned_from: std::net::Ipv4Addr::UNSPECIFIED.into(),
        uses: None,
    })
}

/// A token's value in Redis: `v2 <auth_time> <address> <uses|-> <scope> <expires_at>
/// <policy>` (the policy last: its name is whatever remains).
fn value_of(info: &TokenInfo, uses: Option<u32>) -> String {
    let scope = match info.scope {
        Scope::Policy => "policy",
        Scope::Global => "global",
    };
    let uses = uses.map_or_else(|| "-".to_owned(), |n| n.to_string());
    format!(
        "v2 {} {} {uses} {scope} {} {}",
        info.auth_time, info.earned_from, info.expires_at, info.policy
    )
}

fn parse(consumer_id: &str, value: &str) -> Option<TokenInfo> {
    let mut words = value.splitn(7, ' ');
    if words.next()? != "v2" {
        return parse_v1(consumer_id, value);
    }
    let auth_time = words.next()?.parse().ok()?;
    let earned_from = words.next()?.parse().ok()?;
    let uses = match words.next()? {
        "-" => None,
        // The count itself is Redis's; this copy only says the token is a counted one.
        n => Some(Arc::new(AtomicU32::new(n.parse().ok()?))),
    };
    let scope = match words.next()? {
        "policy" => Scope::Policy,
        "global" => Scope::Global,
        _ => return None,
    };
    let expires_at = words.next()?.parse().ok()?;
    let policy = words.next()?;
    Some(TokenInfo {
        consumer_id: Arc::from(consumer_id),
        policy: Arc::from(policy),
        scope,
        expires_at,
        auth_time,
        earned_from,
        uses,
    })
}

#[async_trait]
impl TokenStore for RedisTokens {
    fn check_cached(
        &self,
        token: &str,
        consumer_id: &str,
        policy: &str,
        now: u64,
    ) -> Option<Result<TokenInfo, TokenRejection>> {
        if self.freshness.is_stale() {
            return None; // the cache may hold a revoked token
        }
        match self.cache.check(token, consumer_id, policy, now) {
            Err(TokenRejection::Unknown) => None, // maybe issued on another node
            // Its uses are counted in Redis, by every node.
            Ok(info) if info.uses.is_some() => None,
            verdict => Some(verdict),
        }
    }

    async fn check(
        &self,
        token: &str,
        consumer_id: &str,
        policy: &str,
        now: u64,
    ) -> Result<TokenInfo, TokenRejection> {
        if let Some(verdict) = self.check_cached(token, consumer_id, policy, now) {
            return verdict;
        }
        let key = digest(token).ok_or(TokenRejection::Malformed)?;
        let before = self.revocations.load(Ordering::Acquire);
        let info = match self.fetch(consumer_id, &text_digest(token)).await {
            Ok(Some(info)) => info,
            Ok(None) => return Err(TokenRejection::Unknown),
            Err(error) => {
                tracing::warn!(%error, "cannot check a step-up token with Redis");
                return Err(TokenRejection::Unavailable);
            }
        };
        if self.revocations.load(Ordering::Acquire) == before && !self.freshness.is_stale() {
            self.cache.hold(key, info.clone(), now);
        }
        verdict(info, consumer_id, policy, now)
    }

    async fn issue(
        &self,
        new: NewToken<'_>,
        now: u64,
    ) -> Result<Option<(String, u64)>, StoreError> {
        let (token, key) = mint();
        let info = info_of(new, now);
        let expires_at = info.expires_at;
        let digest_hex = hex(&text_digest(&token));
        let token_key = self.redis.keys.token(new.consumer_id, &digest_hex);
        let _: i64 = ISSUE
            .key(&token_key)
            .key(self.redis.keys.tokens(new.consumer_id))
            .key(format!("{token_key}:uses"))
            .arg(&digest_hex)
            .arg(value_of(&info, new.uses))
            .arg(expires_at)
            .arg(now)
            .arg(new.uses.map_or_else(String::new, |n| n.to_string()))
            .invoke_async(&mut self.redis.conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // A full cache only means this node will fetch the token when it is presented.
        self.cache.hold(key, info, now);
        Ok(Some((token, expires_at)))
    }

    async fn spend(&self, token: &str, info: &TokenInfo) -> Result<(), TokenRejection> {
        if info.uses.is_none() {
            return Ok(());
        }
        let token_key = self
            .redis
            .keys
            .token(&info.consumer_id, &hex(&text_digest(token)));
        let left: i64 = SPEND
            .key(format!("{token_key}:uses"))
            .invoke_async(&mut self.redis.conn.clone())
            .await
            .map_err(|error| {
                tracing::warn!(%error, "cannot spend a use of a step-up token with Redis");
                TokenRejection::Unavailable
            })?;
        if left < 0 {
            Err(TokenRejection::UsedUp)
        } else {
            Ok(())
        }
    }

    async fn revoke_consumer(&self, consumer_id: &str) -> Result<(), StoreError> {
        // This node's cache first: its own requests stop at once, whatever Redis says.
        self.revocations.fetch_add(1, Ordering::AcqRel);
        self.cache.revoke_consumer(consumer_id);
        let _: i64 = REVOKE
            .key(self.redis.keys.tokens(consumer_id))
            .arg(self.redis.keys.tokens_prefix(consumer_id))
            .arg(consumer_id)
            .arg(self.redis.keys.events())
            .invoke_async(&mut self.redis.conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(())
    }

    fn sweep(&self, now: u64) -> usize {
        self.cache.sweep(now)
    }

    fn held(&self) -> u64 {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_and_earlier_ones_still_parse() {
        let info = TokenInfo {
            consumer_id: Arc::from("c1"),
            policy: Arc::from("pay ments"),
            scope: Scope::Global,
            expires_at: 1900,
            auth_time: 1000,
            earned_from: "2001:db8::7".parse().unwrap(),
            uses: None,
        };
        let back = parse("c1", &value_of(&info, Some(3))).unwrap();
        assert_eq!(
            (
                &*back.policy,
                back.scope,
                back.expires_at,
                back.auth_time,
                back.earned_from
            ),
            ("pay ments", Scope::Global, 1900, 1000, info.earned_from)
        );
        assert!(back.uses.is_some());
        assert!(parse("c1", &value_of(&info, None)).unwrap().uses.is_none());
        let old = parse("c1", "step-up policy 1900").unwrap();
        assert_eq!(
            (&*old.policy, old.expires_at, old.auth_time),
            ("step-up", 1900, 0)
        );
        assert!(old.earned_from.is_unspecified());
    }
}
