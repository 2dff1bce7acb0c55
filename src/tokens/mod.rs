//! Step-up tokens: proof of a recent second factor, so a client need not send a fresh code on
//! every call. `sgt_` + 256 random bits, kept server-side only by their SHA-256, with an
//! absolute expiry (no sliding), bound to one consumer and a scope. A token remembers when the
//! code behind it was presented and from which address (the accepting policy's `max_age` and
//! `bind` read them), and may be good for a number of uses only.
//!
//! The [`TokenStore`] port: a node checks a token it knows synchronously and without
//! allocating (the request path's common case); a store shared by several nodes may not know
//! every token locally, and says so, and the full check may then ask its backend. The local
//! implementation ([`LocalTokens`]) knows every token of its node.

mod local;
pub mod redis;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
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
    /// When the code behind the token was presented (unix seconds).
    pub auth_time: u64,
    /// The client address the token was earned from.
    pub earned_from: IpAddr,
    /// Uses left, for a token issued under `uses: N` (every copy of a held entry shares the
    /// count); `None`: as many as its lifetime allows.
    pub uses: Option<Arc<AtomicU32>>,
}

impl TokenInfo {
    /// Takes one use of this copy's count: false when none is left. Only a count every use
    /// goes through (the one node's store) is the truth; a shared store spends in its backend.
    pub fn take_use(&self) -> bool {
        self.uses.as_ref().is_none_or(|left| {
            left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        })
    }
}

/// What a token is issued with (besides its time).
#[derive(Debug, Clone, Copy)]
pub struct NewToken<'a> {
    pub consumer_id: &'a Arc<str>,
    pub policy: &'a Arc<str>,
    pub scope: Scope,
    pub ttl: Duration,
    /// `uses: N` of the issuing policy.
    pub uses: Option<u32>,
    /// The client address presenting the code.
    pub earned_from: IpAddr,
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
    /// A token issued for a number of uses has none left.
    UsedUp,
    /// Valid, but its code is older than the route policy's `step_up.max_age`.
    TooOld,
    /// Valid, but presented from another network than it was earned from (`bind`).
    OtherAddress,
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
            TokenRejection::UsedUp => "used_up",
            TokenRejection::TooOld => "too_old",
            TokenRejection::OtherAddress => "other_address",
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

    /// Issues a token whose code was presented `now`: it (shown once) and its expiry, or
    /// `None` when no more can be held (the caller proved its code; it just gets no token
    /// this time).
    async fn issue(&self, new: NewToken<'_>, now: u64)
    -> Result<Option<(String, u64)>, StoreError>;

    /// Spends one use of a token `check` accepted, when it was issued for a number of uses
    /// (`info.uses`); `UsedUp` when none is left, on whichever node they went. Tokens without
    /// a count pass at once. [`check_cached`](Self::check_cached) never vouches for a counted
    /// token on a store shared by several nodes.
    async fn spend(&self, token: &str, info: &TokenInfo) -> Result<(), TokenRejection>;

    /// Revokes every token of a consumer (key revoked, 2FA reset, disabled, admin call), on
    /// every node that shares the store.
    async fn revoke_consumer(&self, consumer_id: &str) -> Result<(), StoreError>;

    /// Drops expired tokens held here; returns how many are left.
    fn sweep(&self, now: u64) -> usize;

    /// Tokens held here (expired ones until the next sweep).
    fn held(&self) -> u64;
}
