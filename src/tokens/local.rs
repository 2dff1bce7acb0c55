//! The token store of one node: tokens in memory.
//!
//! Storage is a sharded hash map rather than a moka cache: a moka entry with its own expiry
//! costs about 450 bytes, so a million live tokens would not fit the memory budget; here an
//! entry is about 100 bytes. A lookup takes one shard's read lock (never a global one);
//! expired entries are swept periodically, and the total is capped.

use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use async_trait::async_trait;

use super::{NewToken, PREFIX, Scope, TokenInfo, TokenRejection, TokenStore};
use crate::secrets::{DigestMap, hex, random_bytes};
use crate::store::StoreError;
/// Live tokens kept at most; beyond it the least useful are evicted (their holders simply
/// need a code again).
const CAPACITY: usize = 2_000_000;

const SHARDS: usize = 64;

type Shard = RwLock<DigestMap<TokenInfo>>;

#[derive(Clone)]
pub struct LocalTokens {
    shards: Arc<[Shard]>,
}

impl Default for LocalTokens {
    fn default() -> Self {
        Self::new()
    }
}

/// The key a token is held by in memory: SHA-256 over its 256 random bits, or `None` when it
/// is not `sgt_` and 64 lowercase hex digits. Hashing the 32 bytes rather than the 68 of the
/// text is one SHA-256 block instead of two, on every request that carries a token. (A
/// shared store names tokens by [`text_digest`].)
pub(super) fn digest(token: &str) -> Option<[u8; 32]> {
    let secret = token
        .strip_prefix(PREFIX)
        .and_then(crate::secrets::unhex_lower::<32>)?;
    Some(Sha256::digest(secret).into())
}

/// SHA-256 over a token's text: the name a shared store keeps it by (as every version has,
/// so tokens stay valid across a rolling upgrade).
pub(super) fn text_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new token and the key it is held by.
pub(super) fn mint() -> (String, [u8; 32]) {
    let secret = random_bytes::<32>();
    let token = format!("{PREFIX}{}", hex(&secret));
    (token, Sha256::digest(secret).into())
}

/// What is kept of a token issued `now`.
pub(super) fn info_of(new: NewToken<'_>, now: u64) -> TokenInfo {
    TokenInfo {
        consumer_id: new.consumer_id.clone(),
        policy: new.policy.clone(),
        scope: new.scope,
        expires_at: now.saturating_add(new.ttl.as_secs()),
        auth_time: now,
        earned_from: new.earned_from,
        uses: new
            .uses
            .map(|n| Arc::new(std::sync::atomic::AtomicU32::new(n))),
    }
}

/// The verdict on a known token for `consumer_id` on a route of `policy` at `now`.
pub(super) fn verdict(
    info: TokenInfo,
    consumer_id: &str,
    policy: &str,
    now: u64,
) -> Result<TokenInfo, TokenRejection> {
    if now >= info.expires_at {
        return Err(TokenRejection::Expired);
    }
    if *info.consumer_id != *consumer_id {
        return Err(TokenRejection::OtherConsumer);
    }
    if info.scope == Scope::Policy && *info.policy != *policy {
        return Err(TokenRejection::OutOfScope);
    }
    Ok(info)
}

fn read(shard: &Shard) -> std::sync::RwLockReadGuard<'_, DigestMap<TokenInfo>> {
    // A panic while holding the lock cannot leave a map half-updated in a way that matters
    // here (inserts and removals are single operations), so poisoning is ignored.
    shard.read().unwrap_or_else(|p| p.into_inner())
}

fn write(shard: &Shard) -> std::sync::RwLockWriteGuard<'_, DigestMap<TokenInfo>> {
    shard.write().unwrap_or_else(|p| p.into_inner())
}

impl LocalTokens {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(DigestMap::default()))
                .collect(),
        }
    }

    fn shard(&self, digest: &[u8; 32]) -> &Shard {
        &self.shards[usize::from(digest[0]) % SHARDS]
    }

    /// Issues a token; returns it (shown once) with its expiry, or `None` when the store is
    /// full of live tokens (the caller proved its code; it just gets no token this time).
    pub fn issue(&self, new: NewToken<'_>, now: u64) -> Option<(String, u64)> {
        let (token, key) = mint();
        let info = info_of(new, now);
        let expires_at = info.expires_at;
        if !self.hold(key, info, now) {
            tracing::warn!("step-up token store full; a code was accepted without issuing a token");
            return None;
        }
        Some((token, expires_at))
    }

    /// Keeps a token by its digest; false when full of live tokens.
    pub fn hold(&self, key: [u8; 32], info: TokenInfo, now: u64) -> bool {
        let mut shard = write(self.shard(&key));
        if shard.len() >= CAPACITY / SHARDS {
            shard.retain(|_, info| info.expires_at > now);
            if shard.len() >= CAPACITY / SHARDS {
                return false;
            }
        }
        shard.insert(key, info);
        true
    }

    /// Checks a presented token for `consumer_id` on a route with `policy`, at `now`.
    pub fn check(
        &self,
        token: &str,
        consumer_id: &str,
        policy: &str,
        now: u64,
    ) -> Result<TokenInfo, TokenRejection> {
        // The key is a hash of 256 random bits: looking it up leaks nothing useful by timing.
        let key = digest(token).ok_or(TokenRejection::Malformed)?;
        let info = read(self.shard(&key))
            .get(&key)
            .cloned()
            .ok_or(TokenRejection::Unknown)?;
        verdict(info, consumer_id, policy, now)
    }

    /// Forgets every token (a cache that may have missed revocations).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            write(shard).clear();
        }
    }

    /// Revokes every token of a consumer (key revoked, 2FA reset, disabled, admin call).
    pub fn revoke_consumer(&self, consumer_id: &str) {
        for shard in self.shards.iter() {
            write(shard).retain(|_, info| *info.consumer_id != *consumer_id);
        }
    }

    /// Drops expired tokens; returns how many are left.
    pub fn sweep(&self, now: u64) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = write(shard);
                shard.retain(|_, info| info.expires_at > now);
                shard.len()
            })
            .sum()
    }

    /// Tokens held (expired ones until the next sweep).
    pub fn len(&self) -> u64 {
        self.shards.iter().map(|s| read(s).len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl TokenStore for LocalTokens {
    fn check_cached(
        &self,
        token: &str,
        consumer_id: &str,
        policy: &str,
        now: u64,
    ) -> Option<Result<TokenInfo, TokenRejection>> {
        // Every token of this node is here: the verdict is always known.
        Some(LocalTokens::check(self, token, consumer_id, policy, now))
    }

    async fn check(
        &self,
        token: &str,
        consumer_id: &str,
        policy: &str,
        now: u64,
    ) -> Result<TokenInfo, TokenRejection> {
        LocalTokens::check(self, token, consumer_id, policy, now)
    }

    async fn issue(
        &self,
        new: NewToken<'_>,
        now: u64,
    ) -> Result<Option<(String, u64)>, StoreError> {
        Ok(LocalTokens::issue(self, new, now))
    }

    async fn spend(&self, token: &str, info: &TokenInfo) -> Result<(), TokenRejection> {
        if info.uses.is_none() {
            return Ok(());
        }
        // Every use of this node's tokens comes here; the count is the held entry's, looked
        // up again so that a token revoked since its check has no use left.
        let key = digest(token).ok_or(TokenRejection::Malformed)?;
        match read(self.shard(&key)).get(&key) {
            None => Err(TokenRejection::Unknown),
            Some(held) if held.take_use() => Ok(()),
            Some(_) => Err(TokenRejection::UsedUp),
        }
    }

    async fn revoke_consumer(&self, consumer_id: &str) -> Result<(), StoreError> {
        LocalTokens::revoke_consumer(self, consumer_id);
        Ok(())
    }

    fn sweep(&self, now: u64) -> usize {
        LocalTokens::sweep(self, now)
    }

    fn held(&self) -> u64 {
        LocalTokens::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn new<'a>(
        consumer_id: &'a Arc<str>,
        policy: &'a Arc<str>,
        scope: Scope,
        ttl: Duration,
    ) -> NewToken<'a> {
        NewToken {
            consumer_id,
            policy,
            scope,
            ttl,
            uses: None,
            earned_from: std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }

    #[test]
    fn tokens_are_bound_to_consumer_scope_and_time() {
        let tokens = LocalTokens::new();
        let (c1, policy): (Arc<str>, Arc<str>) = ("c1".into(), "step-up".into());
        let (token, expires) = tokens
            .issue(
                new(&c1, &policy, Scope::Policy, Duration::from_secs(900)),
                1000,
            )
            .unwrap();
        assert_eq!(expires, 1900);
        assert!(token.starts_with("sgt_") && token.len() == 68);
        assert!(tokens.check(&token, "c1", "step-up", 1899).is_ok());
        assert_eq!(
            tokens.check(&token, "c1", "step-up", 1900).unwrap_err(),
            TokenRejection::Expired
        );
        assert_eq!(
            tokens.check(&token, "c2", "step-up", 1000).unwrap_err(),
            TokenRejection::OtherConsumer
        );
        assert_eq!(
            tokens.check(&token, "c1", "admin", 1000).unwrap_err(),
            TokenRejection::OutOfScope
        );
        assert_eq!(
            tokens.check("sgt_00", "c1", "step-up", 1000).unwrap_err(),
            TokenRejection::Malformed
        );
        let (global, _) = tokens
            .issue(
                new(&c1, &policy, Scope::Global, Duration::from_secs(900)),
                1000,
            )
            .unwrap();
        assert!(tokens.check(&global, "c1", "admin", 1000).is_ok());
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.sweep(1900), 0, "both expired at 1900");
        let (token, _) = tokens
            .issue(
                new(&c1, &policy, Scope::Policy, Duration::from_secs(900)),
                1000,
            )
            .unwrap();
        let (global, _) = tokens
            .issue(
                new(&c1, &policy, Scope::Global, Duration::from_secs(900)),
                1000,
            )
            .unwrap();
        tokens.revoke_consumer("c1");
        assert_eq!(
            tokens.check(&token, "c1", "step-up", 1000).unwrap_err(),
            TokenRejection::Unknown
        );
        assert_eq!(
            tokens.check(&global, "c1", "admin", 1000).unwrap_err(),
            TokenRejection::Unknown
        );
    }
}
