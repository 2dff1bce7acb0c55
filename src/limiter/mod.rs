//! The failure limiter. Failed attempts are counted per consumer and per
//! client IP with governor's GCRA, per policy; a subject that goes over its policy's limit is
//! banned for the policy's ban time, and every request from it is then answered 429 before
//! any credential is looked at, so a correct code during a ban still gets 429.
//!
//! Memory is bounded: counters and bans live in moka caches with a fixed capacity, and only
//! subjects the gateway can vouch for become keys: consumer ids (known consumers only, since
//! an unknown key counts against the IP) and client IPs (IPv6 by /64, because a single host
//! commonly holds a whole /64).
//!
//! A restart must not reset an attacker's budget: every ban, and every consumer's count, is
//! written to the store (in the background, batched, retried while the store is away: see
//! [`LimiterWriter`]) and loaded again at start ([`LocalLimiter::restore`]). Counts of
//! client IPs are not kept (an address flood would write a row per address); IP bans are.
//!
//! The [`AttemptLimiter`] port: the ban check is the request path's and answers from what the
//! node holds, without waiting (a limiter shared by several nodes keeps its bans there too,
//! as they are made anywhere); counting a failure, resetting, unlocking and listing may ask a
//! shared backend. [`LocalLimiter`] is the one-node implementation.

mod local;
pub mod redis;

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;

pub use local::{LimiterWriter, LocalLimiter};
pub use redis::RedisLimiter;

use crate::config::{Failures, Rate};

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

    /// The subject as the store keeps it: `consumer:<id>` or `ip:<address>`.
    pub fn key(&self) -> String {
        match self {
            Subject::Consumer(id) => format!("consumer:{id}"),
            Subject::Ip(ip) => format!("ip:{ip}"),
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        if let Some(id) = key.strip_prefix("consumer:") {
            return Some(Subject::Consumer(Arc::from(id)));
        }
        key.strip_prefix("ip:")?.parse().ok().map(Subject::Ip)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ban {
    pub started: u64,
    pub until: u64,
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

/// Counts failed attempts and holds bans.
#[async_trait]
pub trait AttemptLimiter: Send + Sync + 'static {
    /// Seconds until the ban on `subject` ends, or `None` when it is not banned, from what
    /// this node holds (no waiting). A ban found over is reported once as `Err(ban)`, so the
    /// caller can audit its end.
    fn banned(&self, subject: &Subject) -> Result<Option<u64>, Ban>;

    /// Counts one failure of `subject` on a policy (`rate` of it, `failures` its settings).
    async fn record(
        &self,
        policy: &Arc<str>,
        subject: Subject,
        rate: Rate,
        failures: &Failures,
    ) -> Recorded;

    /// A success clears the subject's failures on that policy.
    async fn reset(&self, policy: &Arc<str>, subject: Subject);

    /// Lifts a ban and clears the subject's counts; true when it was banned.
    async fn unlock(&self, subject: &Subject) -> bool;

    /// The bans in force, newest first.
    async fn bans(&self) -> Vec<(Subject, Ban)>;

    /// Bans in force, approximately (for metrics).
    fn active_bans(&self) -> u64;

    /// The counter name for failures of a consumer over all policies.
    fn account_wide(&self) -> Arc<str>;

    fn now(&self) -> u64;
}
