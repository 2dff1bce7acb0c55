//! The approval store's contract: a request reads back as it was put; each change of state
//! happens once, from the state it must start from, under concurrent callers (one approval
//! passes once); the pending list holds the undecided requests only.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use futures_util::future::join_all;
use stepgate::approvals::{Approval, ApprovalStore, Stage, State};

fn request(id: &str, requester: &str) -> Approval {
    Approval {
        id: id.to_owned(),
        requester_id: requester.to_owned(),
        requester: format!("{requester} name"),
        policy: "deploy".into(),
        route: "deploy".into(),
        method: "POST".into(),
        path: "/deploy/web".into(),
        query: Some("env=prod".into()),
        digest: "ab".repeat(32),
        body_bytes: 42,
        fields: BTreeMap::from([("$.version".to_owned(), serde_json::json!("1.4.2"))]),
        approver_roles: vec!["ops".into()],
        self_approval: false,
        created_at: 1_800_000_000,
        expires_at: 1_800_000_300,
    }
}

pub async fn a_request_reads_back_and_moves_once<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn ApprovalStore>>,
{
    let store = make().await;
    let a = request("apr_1", "c1");
    store.put(&a).await.unwrap();
    assert_eq!(
        store.get("apr_1").await.unwrap(),
        Some((a.clone(), State::Pending))
    );
    assert_eq!(store.get("apr_nope").await.unwrap(), None);
    let approved = State::Approved {
        at: 1_800_000_010,
        by: "on call".into(),
    };
    assert_eq!(
        store
            .transition("apr_1", Stage::Pending, &approved)
            .await
            .unwrap(),
        Ok(())
    );
    // Decided: no second decision, and the state found is said.
    let denied = State::Denied {
        at: 1_800_000_011,
        by: "x".into(),
    };
    assert_eq!(
        store
            .transition("apr_1", Stage::Pending, &denied)
            .await
            .unwrap(),
        Err(Some(approved.clone()))
    );
    assert_eq!(store.get("apr_1").await.unwrap().unwrap().1, approved);
    let used = State::Used { at: 1_800_000_020 };
    assert_eq!(
        store
            .transition("apr_1", Stage::Approved, &used)
            .await
            .unwrap(),
        Ok(())
    );
    assert_eq!(
        store
            .transition("apr_1", Stage::Approved, &used)
            .await
            .unwrap(),
        Err(Some(used.clone()))
    );
    assert_eq!(
        store
            .transition("apr_nope", Stage::Pending, &approved)
            .await
            .unwrap(),
        Err(None)
    );
}

pub async fn one_approval_passes_once_under_concurrent_callers<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn ApprovalStore>>,
{
    let store = make().await;
    store.put(&request("apr_2", "c1")).await.unwrap();
    let approved = State::Approved {
        at: 1,
        by: "b".into(),
    };
    store
        .transition("apr_2", Stage::Pending, &approved)
        .await
        .unwrap()
        .unwrap();
    let attempts = (0..20).map(|i| {
        let store = store.clone();
        async move {
            store
                .transition("apr_2", Stage::Approved, &State::Used { at: i })
                .await
                .unwrap()
                .is_ok()
        }
    });
    let passed = join_all(attempts)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    assert_eq!(passed, 1, "one use in all");
}

pub async fn the_pending_list_holds_the_undecided_only<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn ApprovalStore>>,
{
    let store = make().await;
    for id in ["apr_a", "apr_b", "apr_c"] {
        store.put(&request(id, "c1")).await.unwrap();
    }
    store
        .transition(
            "apr_b",
            Stage::Pending,
            &State::Denied {
                at: 1,
                by: "x".into(),
            },
        )
        .await
        .unwrap()
        .unwrap();
    let mut pending: Vec<String> = store
        .pending()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    pending.sort();
    assert_eq!(pending, ["apr_a", "apr_c"]);
}
