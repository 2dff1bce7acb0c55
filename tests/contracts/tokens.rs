//! The token store's contract: a token works only for its consumer, within its scope and
//! before its absolute expiry; revoking a consumer ends all its tokens (and no one else's);
//! a verdict the store gives without waiting is the verdict of the full check.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use stepgate::tokens::{Scope, TokenRejection, TokenStore};

const NOW: u64 = 1_800_000_000;
const TTL: Duration = Duration::from_secs(900);

async fn issue(store: &dyn TokenStore, consumer: &str, policy: &str, scope: Scope) -> String {
    let (token, expires_at) = store
        .issue(&Arc::from(consumer), &Arc::from(policy), scope, TTL, NOW)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(expires_at, NOW + TTL.as_secs());
    assert!(token.starts_with("sgt_") && token.len() == 68, "{token}");
    token
}

pub async fn a_token_is_bound_to_its_consumer_scope_and_time<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn TokenStore>>,
{
    let store = make().await;
    let token = issue(store.as_ref(), "c1", "payments", Scope::Policy).await;
    let check = |token: String, consumer: &'static str, policy: &'static str, at: u64| {
        let store = store.clone();
        async move { store.check(&token, consumer, policy, at).await.map(|_| ()) }
    };
    assert_eq!(check(token.clone(), "c1", "payments", NOW).await, Ok(()));
    assert_eq!(
        check(token.clone(), "c1", "payments", NOW + 899).await,
        Ok(())
    );
    assert_eq!(
        check(token.clone(), "c1", "payments", NOW + 900).await,
        Err(TokenRejection::Expired)
    );
    assert_eq!(
        check(token.clone(), "c2", "payments", NOW).await,
        Err(TokenRejection::OtherConsumer)
    );
    assert_eq!(
        check(token.clone(), "c1", "admin", NOW).await,
        Err(TokenRejection::OutOfScope)
    );
    assert_eq!(
        check("sgt_00".into(), "c1", "payments", NOW).await,
        Err(TokenRejection::Malformed)
    );
    assert_eq!(
        check(format!("sgt_{}", "0".repeat(64)), "c1", "payments", NOW).await,
        Err(TokenRejection::Unknown)
    );
    let global = issue(store.as_ref(), "c1", "payments", Scope::Global).await;
    assert_eq!(check(global, "c1", "admin", NOW).await, Ok(()));
    let info = store.check(&token, "c1", "payments", NOW).await.unwrap();
    assert_eq!(&*info.consumer_id, "c1");
    assert_eq!(info.expires_at, NOW + 900);
}

pub async fn revoking_a_consumer_ends_all_its_tokens_and_only_its<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn TokenStore>>,
{
    let store = make().await;
    let a = issue(store.as_ref(), "c1", "p", Scope::Policy).await;
    let b = issue(store.as_ref(), "c1", "p", Scope::Global).await;
    let other = issue(store.as_ref(), "c2", "p", Scope::Policy).await;
    store.revoke_consumer("c1").await.unwrap();
    for token in [&a, &b] {
        assert_eq!(
            store.check(token, "c1", "p", NOW).await.map(|_| ()),
            Err(TokenRejection::Unknown)
        );
    }
    assert!(store.check(&other, "c2", "p", NOW).await.is_ok());
    // A token issued after the revocation works.
    let fresh = issue(store.as_ref(), "c1", "p", Scope::Policy).await;
    assert!(store.check(&fresh, "c1", "p", NOW).await.is_ok());
}

pub async fn expired_tokens_are_swept<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn TokenStore>>,
{
    let store = make().await;
    issue(store.as_ref(), "c1", "p", Scope::Policy).await;
    issue(store.as_ref(), "c2", "p", Scope::Policy).await;
    assert_eq!(store.held(), 2);
    assert_eq!(store.sweep(NOW + 899), 2);
    assert_eq!(store.sweep(NOW + 900), 0);
    assert_eq!(store.held(), 0);
}

pub async fn the_cached_verdict_agrees_with_the_full_check<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn TokenStore>>,
{
    let store = make().await;
    let token = issue(store.as_ref(), "c1", "p", Scope::Policy).await;
    for (consumer, policy, at) in [
        ("c1", "p", NOW),
        ("c2", "p", NOW),
        ("c1", "q", NOW),
        ("c1", "p", NOW + 900),
    ] {
        let full = store.check(&token, consumer, policy, at).await.map(|_| ());
        if let Some(cached) = store.check_cached(&token, consumer, policy, at) {
            assert_eq!(cached.map(|_| ()), full, "{consumer} {policy} {at}");
        }
    }
}
