//! Contract suites for the ports behind which the gateway's shared state lives: one set of
//! tests per port that every implementation must pass. Each suite is a set of functions over
//! a factory; `contract!` instantiates it for one backend. The one-node backends (SQLite,
//! the in-memory token store, the local limiter) run them here.

mod approvals;
mod limiter;
mod sends;
mod store;
mod tokens;

/// One `#[tokio::test]` per case of a suite, for one backend.
macro_rules! contract {
    ($backend:ident, $suite:ident, $factory:expr, [$($case:ident),+ $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    $crate::$suite::$case($factory).await;
                }
            )+
        }
    };
}

mod memory_approvals {
    use std::sync::Arc;

    use stepgate::approvals::{ApprovalStore, LocalApprovals};

    pub async fn make() -> Arc<dyn ApprovalStore> {
        Arc::new(LocalApprovals::new())
    }

    contract!(
        local,
        approvals,
        super::make,
        [
            a_request_reads_back_and_moves_once,
            one_approval_passes_once_under_concurrent_callers,
            the_pending_list_holds_the_undecided_only,
        ]
    );
}

mod sqlite_approvals {
    use std::sync::Arc;

    use stepgate::approvals::{ApprovalStore, SqliteApprovals};

    pub async fn make() -> Arc<dyn ApprovalStore> {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = SqliteApprovals::open(&dir.path().join("approvals.db")).unwrap();
        let _ = dir.keep();
        Arc::new(store)
    }

    contract!(
        sqlite,
        approvals,
        super::make,
        [
            a_request_reads_back_and_moves_once,
            one_approval_passes_once_under_concurrent_callers,
            the_pending_list_holds_the_undecided_only,
        ]
    );
}

mod sqlite_store {
    use std::sync::Arc;

    use stepgate::store::Store;
    use stepgate::store::sqlite::SqliteStore;

    /// A fresh SQLite store in cargo's scratch directory for tests (under `target/`).
    pub async fn make() -> Arc<dyn Store> {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = SqliteStore::open(&dir.path().join("contract.db")).unwrap();
        // The file outlives the test's handle on the directory: it stays under target/tmp.
        let _ = dir.keep();
        Arc::new(store)
    }

    contract!(
        sqlite,
        store,
        super::make,
        [
            the_watermark_moves_forward_once_under_50_concurrent_callers,
            a_recovery_code_is_used_once_under_50_concurrent_callers,
            an_sms_code_is_used_once_under_50_concurrent_callers,
            a_totp_confirmation_happens_once_under_concurrent_callers,
            an_sms_confirmation_happens_once_under_concurrent_callers,
            every_write_is_announced_in_order_with_a_rising_version,
            a_subscriber_that_falls_behind_is_told_to_resync,
            a_deleted_consumer_is_announced_and_loads_as_none,
            limiter_state_round_trips_and_expired_state_is_dropped,
            a_restored_consumer_reads_back_exactly,
            a_rewritten_audit_log_reads_in_the_new_order,
        ]
    );
}

mod local_tokens {
    use std::sync::Arc;

    use stepgate::tokens::{LocalTokens, TokenStore};

    pub async fn make() -> Arc<dyn TokenStore> {
        Arc::new(LocalTokens::new())
    }

    contract!(
        local,
        tokens,
        super::make,
        [
            a_token_is_bound_to_its_consumer_scope_and_time,
            revoking_a_consumer_ends_all_its_tokens_and_only_its,
            expired_tokens_are_swept,
            the_cached_verdict_agrees_with_the_full_check,
            a_counted_token_works_that_many_times,
        ]
    );
}

mod local_sends {
    use std::sync::Arc;

    use stepgate::sms::{LocalSendBudget, SendBudget};

    pub async fn make() -> Arc<dyn SendBudget> {
        Arc::new(LocalSendBudget::new())
    }

    contract!(
        local,
        sends,
        super::make,
        [
            sends_are_limited_per_consumer_and_per_number,
            a_reservation_not_committed_is_given_back,
            a_send_refused_by_the_number_is_not_counted_for_the_consumer,
        ]
    );
}

mod local_limiter {
    use std::sync::Arc;

    use stepgate::clock::ManualClock;
    use stepgate::limiter::{AttemptLimiter, LocalLimiter};

    pub async fn make(clock: Arc<ManualClock>) -> Arc<dyn AttemptLimiter> {
        Arc::new(LocalLimiter::new(clock))
    }

    contract!(
        local,
        limiter,
        super::make,
        [
            a_subject_is_banned_past_its_limit_until_the_ban_expires,
            a_success_resets_the_count,
            an_unlock_lifts_the_ban_and_the_count,
            active_bans_are_listed_newest_first,
            consumers_and_addresses_are_counted_apart,
        ]
    );
}

/// The same suites against a real `redis-server` per test (started and killed by the test).
/// `$factory(settings)` makes the suite's factory for the test's server.
macro_rules! contract_on_redis {
    ($backend:ident, $suite:ident, $factory:path, [$($case:ident),+ $(,)?]) => {
        mod $backend {
            use stepgate_testkit::redis::RedisServer;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let server = RedisServer::start();
                    $crate::$suite::$case($factory(server.settings())).await;
                    drop(server);
                }
            )+
        }
    };
}

type Made<T> = std::pin::Pin<Box<dyn std::future::Future<Output = std::sync::Arc<T>> + Send>>;

mod redis_store {
    use std::sync::Arc;

    use stepgate::config::RedisSettings;
    use stepgate::store::Store;
    use stepgate::store::redis::{Redis, RedisStore};

    pub fn make(settings: RedisSettings) -> impl Fn() -> crate::Made<dyn Store> {
        move || {
            let settings = settings.clone();
            Box::pin(async move {
                let store: Arc<dyn Store> =
                    Arc::new(RedisStore::new(Redis::connect(&settings).await.unwrap()));
                store
            })
        }
    }

    contract_on_redis!(
        redis,
        store,
        super::make,
        [
            the_watermark_moves_forward_once_under_50_concurrent_callers,
            a_recovery_code_is_used_once_under_50_concurrent_callers,
            an_sms_code_is_used_once_under_50_concurrent_callers,
            a_totp_confirmation_happens_once_under_concurrent_callers,
            an_sms_confirmation_happens_once_under_concurrent_callers,
            every_write_is_announced_in_order_with_a_rising_version,
            a_subscriber_that_falls_behind_is_told_to_resync,
            a_deleted_consumer_is_announced_and_loads_as_none,
            limiter_state_round_trips_and_expired_state_is_dropped,
            a_restored_consumer_reads_back_exactly,
            a_rewritten_audit_log_reads_in_the_new_order,
        ]
    );
}

mod redis_tokens {
    use std::sync::Arc;

    use stepgate::config::RedisSettings;
    use stepgate::store::redis::Redis;
    use stepgate::tokens::{RedisTokens, TokenStore};

    pub fn make(settings: RedisSettings) -> impl Fn() -> crate::Made<dyn TokenStore> {
        move || {
            let settings = settings.clone();
            Box::pin(async move {
                let tokens: Arc<dyn TokenStore> =
                    Arc::new(RedisTokens::start(Redis::connect(&settings).await.unwrap()));
                tokens
            })
        }
    }

    contract_on_redis!(
        redis,
        tokens,
        super::make,
        [
            a_token_is_bound_to_its_consumer_scope_and_time,
            revoking_a_consumer_ends_all_its_tokens_and_only_its,
            expired_tokens_are_swept,
            the_cached_verdict_agrees_with_the_full_check,
            a_counted_token_works_that_many_times,
            nodes_share_a_tokens_uses,
        ]
    );
}

mod redis_limiter {
    use std::sync::Arc;

    use stepgate::clock::ManualClock;
    use stepgate::config::RedisSettings;
    use stepgate::limiter::{AttemptLimiter, RedisLimiter};
    use stepgate::store::redis::{Redis, RedisStore};

    pub fn make(
        settings: RedisSettings,
    ) -> impl Fn(Arc<ManualClock>) -> crate::Made<dyn AttemptLimiter> {
        move |clock| {
            let settings = settings.clone();
            Box::pin(async move {
                let redis = Redis::connect(&settings).await.unwrap();
                let store = Arc::new(RedisStore::new(redis.clone()));
                let (limiter, writer) = RedisLimiter::start(redis, clock, store).await.unwrap();
                tokio::spawn(writer.run(tokio_util::sync::CancellationToken::new()));
                let limiter: Arc<dyn AttemptLimiter> = Arc::new(limiter);
                limiter
            })
        }
    }

    contract_on_redis!(
        redis,
        limiter,
        super::make,
        [
            a_subject_is_banned_past_its_limit_until_the_ban_expires,
            a_success_resets_the_count,
            an_unlock_lifts_the_ban_and_the_count,
            active_bans_are_listed_newest_first,
            consumers_and_addresses_are_counted_apart,
        ]
    );
}

mod redis_sends {
    use std::sync::Arc;

    use stepgate::config::RedisSettings;
    use stepgate::sms::{RedisSendBudget, SendBudget};
    use stepgate::store::redis::Redis;

    pub fn make(settings: RedisSettings) -> impl Fn() -> crate::Made<dyn SendBudget> {
        move || {
            let settings = settings.clone();
            Box::pin(async move {
                let budget: Arc<dyn SendBudget> = Arc::new(RedisSendBudget::new(
                    Redis::connect(&settings).await.unwrap(),
                ));
                budget
            })
        }
    }

    contract_on_redis!(
        redis,
        sends,
        super::make,
        [
            sends_are_limited_per_consumer_and_per_number,
            a_reservation_not_committed_is_given_back,
            a_send_refused_by_the_number_is_not_counted_for_the_consumer,
        ]
    );
}

mod redis_approvals {
    use std::sync::Arc;

    use stepgate::approvals::{ApprovalStore, RedisApprovals};
    use stepgate::config::RedisSettings;
    use stepgate::store::redis::Redis;

    pub fn make(settings: RedisSettings) -> impl Fn() -> crate::Made<dyn ApprovalStore> {
        move || {
            let settings = settings.clone();
            Box::pin(async move {
                let store: Arc<dyn ApprovalStore> = Arc::new(RedisApprovals::new(
                    Redis::connect(&settings).await.unwrap(),
                ));
                store
            })
        }
    }

    contract_on_redis!(
        redis,
        approvals,
        super::make,
        [
            a_request_reads_back_and_moves_once,
            one_approval_passes_once_under_concurrent_callers,
            the_pending_list_holds_the_undecided_only,
        ]
    );
}
