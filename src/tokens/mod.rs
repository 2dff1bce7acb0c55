//! Step-up tokens: proof of a recent second factor, so a client need not send a fresh code on
//! every call. `sgt_` + 256 random bits, kept server-side only by their SHA-256, with an
//! absolute expiry (no sliding), bound to one consumer and a scope.
//!
//! The [`TokenStore`] port: a node checks a token it knows synchronously and without
//! allocating (the request path's common case); a store shared by several nodes may not know
//! every token locally, and says so, and the full check may then ask its backend. The local
//! implementation ([`LocalTokens`]) knows every token of its node.

mod local;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use local::LocalTokens;
pub use redis::RedisTokens;

use crate::store::StoreError;

pub const PREFIX: &str = "sgt_";

/// Where a token is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Valid on every route whose policy is this one.
    Policy,
    /// Valid on every route that accepts step-up tokens.
    Global,
}

/// What the gateway keeps per token: shared strings and numbers, no allocation of its own
/// (a million live tokens must fit comfortably in memory).
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub consumer_id: Arc<str>,
    /// The policy it was earned on, for `Scope::Policy`.
    pub policy: Arc<str>,
    pub scope: Scope,
    pub expires_at: u64,
}

/// Why a presented token was refused (told apart in the audit log only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRejection {
    Malformed,
    Unknown,
    Expired,
    OtherConsumer,
    OutOfScope,
    /// The shared backend could not be asked: the token is refused (fail closed).
    Unavailable,
}

impl TokenRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRejection::Malformed => "malformed",
            TokenRejection::Unknown => "unknown_or_revoked",
            TokenRejection::Expired => "expired",
            TokenRejection::OtherConsumer => "other_consumer",
            TokenRejection::OutOfScope => "out_of_scope",
            TokenRejection::Unavailable => "store_unavailable",
        }
    }
}

/// Issues, checks and revokes step-up tokens.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// The verdict on `token` for `consumer_id` on a route of `policy` at `now`, from what
    /// this node holds, without waiting or allocating: `None` when only the backend can
    /// tell.
    fn check_cached(
        &self,
        token: &str,
        consumer_id: &str,
        policy: &str,
        now: u64,
    ) -> Option<Result<TokenInfo, TokenRejection>>;

    /// The full check: the cached verdict, or the backend's.
    async fn check(
        &self,
        token: &str,
        consumer_id: &str,
        policy: &str,
        now: u64,
    ) -> Result<TokenInfo, TokenRejection>;

    /// Issues a token: it (shown once) and its expiry, or `None` when no more can be held
    /// (the caller proved its code; it just gets no token this time).
    async fn issue(
        &self,
        consumer_id: &Arc<str>,
        policy: &Arc<str>,
        scope: Scope,
        ttl: Duration,
        now: u64,
    ) -> Result<Option<(String, u64)>, StoreError>;

    /// Revokes every token of a consumer (key revoked, 2FA reset, disabled, admin call), on
    /// every node that shares the store.
    async fn revoke_consumer(&self, consumer_id: &str) -> Result<(), StoreError>;

    /// Drops expired tokens held here; returns how many are left.
    fn sweep(&self, now: u64) -> usize;

    /// Tokens held here (expired ones until the next sweep).
    fn held(&self) -> u64;
}
