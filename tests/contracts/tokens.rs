//! The token store's contract: a token works only for its consumer, within its scope and
//! before its absolute expiry; revoking a consumer ends all its tokens (and no one else's);
//! a verdict the store gives without waiting is the verdict of the full check.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use stepgate::tokens::{NewToken, Scope, TokenRejection, TokenStore};

const NOW: u64 = 1_800_000_000;
const TTL: Duration = Duration::from_secs(900);

const FROM: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7));

async fn issue(store: &dyn TokenStore, consumer: &str, policy: &str, scope: Scope) -> String {
    issue_counted(store, consumer, policy, scope, None).await
}

async fn issue_counted(
    store: &dyn TokenStore,
    consumer: &str,
    policy: &str,
    scope: Scope,
    uses: Option<u32>,
) -> String {
    let (consumer, policy) = (Arc::from(consumer), Arc::from(policy));
    let new = NewToken {
        consumer_id: &consumer,
        policy: &policy,
        scope,
        ttl: TTL,
        uses,
        earned_from: FROM,
    };
    let (token, expires_at) = store.issue(new, NOW).await.unwrap().unwrap();
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
    // What the accepting policy judges by: when the code was presented, and from where.
    assert_eq!(info.auth_time, NOW);
    assert_eq!(info.earned_from, FROM);
    assert!(info.uses.is_none());
    assert_eq!(
        store.spend(&token, &info).await,
        Ok(()),
        "an uncounted token spends nothing"
    );
}

/// A token issued for N uses works N times; the uses are spent only when asked to, and a
/// copy of the store (another node's, on a shared store) shares the count.
pub async fn a_counted_token_works_that_many_times<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn TokenStore>>,
{
    let store = make().await;
    let token = issue_counted(store.as_ref(), "c1", "p", Scope::Policy, Some(2)).await;
    // Checking spends nothing.
    for _ in 0..3 {
        let info = store.check(&token, "c1", "p", NOW).await.unwrap();
        assert!(info.uses.is_some());
    }
    // Never vouched for without the store that counts.
    if let Some(Ok(info)) = store.check_cached(&token, "c1", "p", NOW) {
        assert!(info.uses.is_some());
    }
    let info = store.check(&token, "c1", "p", NOW).await.unwrap();
    assert_eq!(store.spend(&token, &info).await, Ok(()));
    let info = store.check(&token, "c1", "p", NOW).await.unwrap();
    assert_eq!(store.spend(&token, &info).await, Ok(()));
    let info = store.check(&token, "c1", "p", NOW).await.unwrap();
    assert_eq!(
        store.spend(&token, &info).await,
        Err(TokenRejection::UsedUp)
    );
    // Revoked: no uses either.
    let other = issue_counted(store.as_ref(), "c1", "p", Scope::Policy, Some(5)).await;
    let info = store.check(&other, "c1", "p", NOW).await.unwrap();
    store.revoke_consumer("c1").await.unwrap();
    assert!(store.spend(&other, &info).await.is_err());
}

/// On a store shared by several nodes, two nodes spend from one count: a one-shot token
/// passes once in all.
pub async fn nodes_share_a_tokens_uses<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn TokenStore>>,
{
    let (a, b) = (make().await, make().await);
    let token = issue_counted(a.as_ref(), "c9", "p", Scope::Policy, Some(1)).await;
    let on_b = b.check(&token, "c9", "p", NOW).await.unwrap();
    assert_eq!(on_b.auth_time, NOW);
    assert_eq!(on_b.earned_from, FROM);
    let on_a = a.check(&token, "c9", "p", NOW).await.unwrap();
    assert_eq!(b.spend(&token, &on_b).await, Ok(()));
    assert_eq!(a.spend(&token, &on_a).await, Err(TokenRejection::UsedUp));
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
