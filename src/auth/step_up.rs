//! Step-up tokens: proof of a recent second factor, so a client need not send a fresh code on
//! every call. `sgt_` + 256 random bits, kept server-side only by their SHA-256 in a bounded
//! moka cache, with an absolute expiry (no sliding), bound to one consumer and a scope.
//! Expiry is decided against the injected clock; moka's own expiry only frees the memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;
use sha2::{Digest, Sha256};

use crate::config::Scope;
use crate::secrets::{hex, random_bytes};

pub const PREFIX: &str = "sgt_";
/// Live tokens kept at most; beyond it the least useful are evicted (their holders simply
/// need a code again).
const CAPACITY: u64 = 2_000_000;

#[derive(Debug)]
pub struct TokenInfo {
    pub consumer_id: String,
    /// The policy it was earned on, for `Scope::Policy`.
    pub policy: String,
    pub scope: Scope,
    pub issued_at: u64,
    pub expires_at: u64,
    /// Seconds to live when issued; moka frees the entry after it.
    ttl: u64,
}

struct ByTtl;

impl Expiry<[u8; 32], Arc<TokenInfo>> for ByTtl {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<TokenInfo>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(value.ttl.saturating_add(1)))
    }
}

/// Why a presented token was refused (told apart in the audit log only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRejection {
    Malformed,
    Unknown,
    Expired,
    OtherConsumer,
    OutOfScope,
}

impl TokenRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRejection::Malformed => "malformed",
            TokenRejection::Unknown => "unknown_or_revoked",
            TokenRejection::Expired => "expired",
            TokenRejection::OtherConsumer => "other_consumer",
            TokenRejection::OutOfScope => "out_of_scope",
        }
    }
}

#[derive(Clone)]
pub struct StepUpTokens {
    cache: Cache<[u8; 32], Arc<TokenInfo>>,
}

impl Default for StepUpTokens {
    fn default() -> Self {
        Self::new()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl StepUpTokens {
    pub fn new() -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(CAPACITY)
                .expire_after(ByTtl)
                .support_invalidation_closures()
                .build(),
        }
    }

    /// Issues a token; returns it (shown once) with its expiry.
    pub fn issue(
        &self,
        consumer_id: &str,
        policy: &str,
        scope: Scope,
        ttl: Duration,
        now: u64,
    ) -> (String, u64) {
        let token = format!("{PREFIX}{}", hex(&random_bytes::<32>()));
        let ttl = ttl.as_secs();
        let expires_at = now.saturating_add(ttl);
        self.cache.insert(
            digest(&token),
            Arc::new(TokenInfo {
                consumer_id: consumer_id.to_owned(),
                policy: policy.to_owned(),
                scope,
                issued_at: now,
                expires_at,
                ttl,
            }),
        );
        (token, expires_at)
    }

    /// Checks a presented token for `consumer_id` on a route with `policy`, at `now`.
    pub fn check(
        &self,
        token: &str,
        consumer_id: &str,
        policy: &str,
        now: u64,
    ) -> Result<Arc<TokenInfo>, TokenRejection> {
        let well_formed = token.len() == PREFIX.len() + 64
            && token.starts_with(PREFIX)
            && token[PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            return Err(TokenRejection::Malformed);
        }
        // The key is a hash of 256 random bits: looking it up leaks nothing useful by timing.
        let info = self
            .cache
            .get(&digest(token))
            .ok_or(TokenRejection::Unknown)?;
        if now >= info.expires_at {
            return Err(TokenRejection::Expired);
        }
        if info.consumer_id != consumer_id {
            return Err(TokenRejection::OtherConsumer);
        }
        if info.scope == Scope::Policy && info.policy != policy {
            return Err(TokenRejection::OutOfScope);
        }
        Ok(info)
    }

    /// Revokes every token of a consumer (key revoked, 2FA reset, disabled, admin call).
    pub fn revoke_consumer(&self, consumer_id: &str) {
        let id = consumer_id.to_owned();
        // Only fails when invalidation closures are not enabled, which `new` does.
        let _ = self
            .cache
            .invalidate_entries_if(move |_, info| info.consumer_id == id);
    }

    /// Live tokens (approximate; for metrics).
    pub fn len(&self) -> u64 {
        // moka counts lazily; settle pending inserts and evictions first.
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_consumer_scope_and_time() {
        let tokens = StepUpTokens::new();
        let (token, expires) = tokens.issue(
            "c1",
            "step-up",
            Scope::Policy,
            Duration::from_secs(900),
            1000,
        );
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
        let (global, _) = tokens.issue(
            "c1",
            "step-up",
            Scope::Global,
            Duration::from_secs(900),
            1000,
        );
        assert!(tokens.check(&global, "c1", "admin", 1000).is_ok());
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
