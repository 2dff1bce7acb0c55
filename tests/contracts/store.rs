//! The durable store's contract: single use and compare-and-set hold under concurrent
//! callers (on one node or many, since every caller goes through the store), multi-step
//! confirmations are atomic, and every change is announced in order on the change feed.

use std::future::Future;
use std::sync::Arc;

use stepgate::credentials::assurance::Assurance;
use stepgate::credentials::factors::Purpose;
use stepgate::credentials::totp::TotpParams;
use stepgate::store::{
    BanRecord, CodeCheck, ConsumerRecord, FailureCountRecord, FeedEvent, KeyRecord, LimiterChange,
    SmsCodeRecord, Store, TotpRecord,
};

const NOW: u64 = 1_800_000_000;
const CALLERS: usize = 50;

fn record(id: &str) -> ConsumerRecord {
    ConsumerRecord {
        id: id.into(),
        name: format!("name-{id}"),
        roles: vec!["partner".into()],
        disabled: false,
        created_at: NOW,
        version: 1,
    }
}

fn key(id: &str, n: u8) -> KeyRecord {
    KeyRecord {
        consumer_id: id.into(),
        hash: [n; 32],
        prefix: format!("sgk_{n:08x}"),
        created_at: NOW,
        last_used_at: None,
        revoked_at: None,
    }
}

fn pending_totp(id: &str) -> TotpRecord {
    TotpRecord {
        consumer_id: id.into(),
        secret_sealed: vec![1, 2, 3],
        params: TotpParams::default(),
        confirmed: false,
        last_step: None,
        created_at: NOW,
        started_with: Assurance::KeyOnly,
    }
}

async fn with_consumer<F, Fut>(make: F, id: &str) -> Arc<dyn Store>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = make().await;
    store.insert_consumer(record(id), key(id, 1)).await.unwrap();
    store
}

/// Runs `CALLERS` copies of `call` at once and counts the successes.
async fn concurrently<Fut>(call: impl Fn() -> Fut) -> usize
where
    Fut: Future<Output = bool> + Send + 'static,
{
    let tasks: Vec<_> = (0..CALLERS).map(|_| tokio::spawn(call())).collect();
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.unwrap());
    }
    wins
}

pub async fn the_watermark_moves_forward_once_under_50_concurrent_callers<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = with_consumer(make, "c1").await;
    store.put_pending_totp(pending_totp("c1")).await.unwrap();
    assert!(
        store
            .confirm_totp("c1".into(), 100, vec![[9; 32]], Assurance::Totp)
            .await
            .unwrap()
    );
    // 50 requests with the same code (step 101) at once: exactly one is accepted.
    let wins = concurrently(|| {
        let store = store.clone();
        async move { store.advance_totp_step("c1".into(), 101).await.unwrap() }
    })
    .await;
    assert_eq!(wins, 1);
    assert!(!store.advance_totp_step("c1".into(), 101).await.unwrap());
    assert!(!store.advance_totp_step("c1".into(), 100).await.unwrap());
    assert!(store.advance_totp_step("c1".into(), 102).await.unwrap());
    // Survives a reload of the state.
    let state = store.load_consumer("c1").await.unwrap().unwrap();
    let confirmed = state.totp.iter().find(|t| t.confirmed).unwrap();
    assert_eq!(confirmed.last_step, Some(102));
}

pub async fn a_recovery_code_is_used_once_under_50_concurrent_callers<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = with_consumer(make, "c1").await;
    let codes = vec![[1; 32], [2; 32], [3; 32]];
    store
        .replace_recovery_codes("c1".into(), codes)
        .await
        .unwrap();
    let wins = concurrently(|| {
        let store = store.clone();
        async move {
            store
                .use_recovery_code("c1".into(), [2; 32], NOW)
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!(wins, 1);
    assert!(
        !store
            .use_recovery_code("c1".into(), [9; 32], NOW)
            .await
            .unwrap()
    );
    let state = store.load_consumer("c1").await.unwrap().unwrap();
    let used: Vec<_> = state
        .recovery_codes
        .iter()
        .filter(|c| c.used_at.is_some())
        .collect();
    assert_eq!(used.len(), 1);
    // A new set replaces the old one: the old codes stop working.
    store
        .replace_recovery_codes("c1".into(), vec![[7; 32]])
        .await
        .unwrap();
    assert!(
        !store
            .use_recovery_code("c1".into(), [1; 32], NOW)
            .await
            .unwrap()
    );
}

pub async fn an_sms_code_is_used_once_under_50_concurrent_callers<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = with_consumer(make, "c1").await;
    let code = SmsCodeRecord {
        consumer_id: "c1".into(),
        purpose: Purpose::Login,
        hash: [5; 32],
        expires_at: NOW + 300,
    };
    store.put_sms_code(code.clone()).await.unwrap();
    let wins = concurrently(|| {
        let store = store.clone();
        async move {
            store
                .use_sms_code("c1".into(), Purpose::Login, [5; 32], NOW)
                .await
                .unwrap()
                == CodeCheck::Accepted
        }
    })
    .await;
    assert_eq!(wins, 1);
    // Wrong hash, another purpose, expiry.
    store.put_sms_code(code.clone()).await.unwrap();
    let check = |purpose, hash, at| {
        let store = store.clone();
        async move {
            store
                .use_sms_code("c1".into(), purpose, hash, at)
                .await
                .unwrap()
        }
    };
    assert_eq!(check(Purpose::Login, [6; 32], NOW).await, CodeCheck::Wrong);
    assert_eq!(
        check(Purpose::Enrol, [5; 32], NOW).await,
        CodeCheck::Missing
    );
    assert_eq!(
        check(Purpose::Login, [5; 32], NOW + 300).await,
        CodeCheck::Expired
    );
    assert_eq!(
        check(Purpose::Login, [5; 32], NOW).await,
        CodeCheck::Missing
    );
}

pub async fn a_totp_confirmation_happens_once_under_concurrent_callers<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = with_consumer(make, "c1").await;
    store.put_pending_totp(pending_totp("c1")).await.unwrap();
    let wins = concurrently(|| {
        let store = store.clone();
        async move {
            store
                .confirm_totp("c1".into(), 100, vec![[9; 32]], Assurance::Totp)
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!(wins, 1);
    let state = store.load_consumer("c1").await.unwrap().unwrap();
    assert_eq!(
        state.totp.len(),
        1,
        "the pending enrolment became the confirmed one"
    );
    assert!(state.totp[0].confirmed);
    assert_eq!(state.recovery_codes.len(), 1);
}

pub async fn an_sms_confirmation_happens_once_under_concurrent_callers<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = with_consumer(make, "c1").await;
    let code = SmsCodeRecord {
        consumer_id: "c1".into(),
        purpose: Purpose::Enrol,
        hash: [4; 32],
        expires_at: NOW + 300,
    };
    store
        .put_pending_sms("c1".into(), vec![8, 8], NOW, Assurance::KeyOnly, code)
        .await
        .unwrap();
    let wins = concurrently(|| {
        let store = store.clone();
        async move {
            store
                .confirm_sms(
                    "c1".into(),
                    [4; 32],
                    NOW,
                    Some(vec![[3; 32]]),
                    Assurance::Sms,
                )
                .await
                .unwrap()
                == CodeCheck::Accepted
        }
    })
    .await;
    assert_eq!(wins, 1);
    let state = store.load_consumer("c1").await.unwrap().unwrap();
    let sms = state.sms.unwrap();
    assert_eq!(sms.phone_sealed, Some(vec![8, 8]));
    assert_eq!(sms.pending_sealed, None);
    assert_eq!(state.recovery_codes.len(), 1);
}

pub async fn every_write_is_announced_in_order_with_a_rising_version<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = make().await;
    let mut feed = store.changes();
    store
        .insert_consumer(record("c1"), key("c1", 1))
        .await
        .unwrap();
    let mut updated = record("c1");
    updated.roles = vec!["ops".into()];
    store.update_consumer(updated).await.unwrap();
    store.insert_key(key("c1", 2)).await.unwrap();
    store
        .revoke_key("c1".into(), "sgk_00000001".into(), NOW)
        .await
        .unwrap();
    store.put_pending_totp(pending_totp("c1")).await.unwrap();
    store
        .insert_consumer(record("c2"), key("c2", 3))
        .await
        .unwrap();
    let mut versions = Vec::new();
    for _ in 0..6 {
        match feed.next().await.unwrap() {
            FeedEvent::Changed(change) => {
                versions.push((change.consumer_id.to_string(), change.version))
            }
            FeedEvent::Lost(_) => panic!("nothing was missed"),
        }
    }
    let c1: Vec<u64> = versions
        .iter()
        .filter(|(id, _)| id == "c1")
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(c1.len(), 5, "{versions:?}");
    assert!(c1.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert_eq!(versions.last().unwrap().0, "c2");
    // The state loaded now is the last version announced.
    let state = store.load_consumer("c1").await.unwrap().unwrap();
    assert_eq!(state.record.version, *c1.last().unwrap());
    assert_eq!(state.record.roles, ["ops"]);
    // A key's use and a TOTP watermark are not changes anyone must apply.
    store.record_key_use(vec![([2; 32], NOW)]).await.unwrap();
    let again = store.load_consumer("c1").await.unwrap().unwrap();
    assert_eq!(again.record.version, state.record.version);
}

pub async fn a_subscriber_that_falls_behind_is_told_to_resync<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = with_consumer(make, "c1").await;
    let mut feed = store.changes();
    // More changes than any feed holds for one subscriber, none read meanwhile.
    for i in 0..5000 {
        let mut changed = record("c1");
        changed.disabled = i % 2 == 0;
        store.update_consumer(changed).await.unwrap();
    }
    let mut lost = false;
    while let Ok(Some(event)) =
        tokio::time::timeout(std::time::Duration::from_millis(500), feed.next()).await
    {
        if matches!(event, FeedEvent::Lost(_)) {
            lost = true;
            break;
        }
    }
    assert!(lost, "the subscriber was not told it missed changes");
}

pub async fn a_deleted_consumer_is_announced_and_loads_as_none<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = with_consumer(make, "c1").await;
    let before = store
        .load_consumer("c1")
        .await
        .unwrap()
        .unwrap()
        .record
        .version;
    let mut feed = store.changes();
    store.delete_consumer("c1".into()).await.unwrap();
    match feed.next().await.unwrap() {
        FeedEvent::Changed(change) => {
            assert_eq!(&*change.consumer_id, "c1");
            assert!(change.version > before);
        }
        FeedEvent::Lost(_) => panic!("nothing was missed"),
    }
    assert!(store.load_consumer("c1").await.unwrap().is_none());
    assert!(store.load().await.unwrap().consumers.is_empty());
}

pub async fn limiter_state_round_trips_and_expired_state_is_dropped<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = make().await;
    let ban = |subject: &str, until| {
        LimiterChange::Ban(BanRecord {
            subject: subject.into(),
            started: NOW,
            until,
        })
    };
    let count = |subject: &str, tat_ms| {
        LimiterChange::Count(FailureCountRecord {
            policy: "p".into(),
            subject: subject.into(),
            tat_ms,
        })
    };
    store
        .save_limiter(vec![
            ban("consumer:a", NOW + 600),
            ban("ip:10.0.0.1", NOW + 10),
            ban("consumer:gone", NOW + 600),
            count("consumer:a", (NOW + 900) * 1000),
            count("consumer:b", (NOW + 5) * 1000),
            LimiterChange::Unlock {
                subject: "consumer:gone".into(),
            },
        ])
        .await
        .unwrap();
    let state = store
        .load_limiter(NOW + 60, (NOW + 60) * 1000)
        .await
        .unwrap();
    let bans: Vec<&str> = state.bans.iter().map(|b| b.subject.as_str()).collect();
    assert_eq!(bans, ["consumer:a"]);
    let counts: Vec<&str> = state.counts.iter().map(|c| c.subject.as_str()).collect();
    assert_eq!(counts, ["consumer:a"]);
    store
        .save_limiter(vec![
            LimiterChange::Unban {
                subject: "consumer:a".into(),
                until: NOW + 600,
            },
            LimiterChange::Uncount {
                policy: "p".into(),
                subject: "consumer:a".into(),
            },
        ])
        .await
        .unwrap();
    let state = store.load_limiter(NOW, NOW * 1000).await.unwrap();
    assert!(
        state.bans.is_empty() && state.counts.is_empty(),
        "{state:?}"
    );
}

/// `restore_consumer` writes a consumer exactly as given (every kind of record, used codes and
/// revoked keys included), replacing what was there, and announces it; a name held by another
/// consumer is a conflict.
pub async fn a_restored_consumer_reads_back_exactly<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    use stepgate::store::{ConsumerState, RecoveryCodeRecord, SmsRecord};
    let store = with_consumer(&make, "c1").await;
    store.put_pending_totp(pending_totp("c1")).await.unwrap();
    let mut feed = store.changes();
    let mut revoked = key("c1", 7);
    revoked.revoked_at = Some(NOW + 5);
    let mut used = key("c1", 8);
    used.last_used_at = Some(NOW + 9);
    let mut confirmed = pending_totp("c1");
    confirmed.confirmed = true;
    confirmed.last_step = Some(NOW / 30);
    confirmed.started_with = Assurance::KeyOnly;
    let mut pending = pending_totp("c1");
    pending.secret_sealed = vec![9, 9];
    pending.started_with = Assurance::Totp;
    let state = ConsumerState {
        record: ConsumerRecord {
            name: "renamed".into(),
            roles: vec!["ops".into(), "partner".into()],
            disabled: true,
            ..record("c1")
        },
        keys: vec![revoked, used],
        totp: vec![confirmed, pending],
        recovery_codes: vec![
            RecoveryCodeRecord {
                consumer_id: "c1".into(),
                hash: [3; 32],
                used_at: Some(NOW + 1),
            },
            RecoveryCodeRecord {
                consumer_id: "c1".into(),
                hash: [4; 32],
                used_at: None,
            },
        ],
        sms: Some(SmsRecord {
            consumer_id: "c1".into(),
            phone_sealed: Some(vec![5, 5]),
            pending_sealed: Some(vec![6]),
            updated_at: NOW + 2,
            pending_at: Some(NOW + 2),
            pending_with: Assurance::Sms,
        }),
    };
    store.restore_consumer(state.clone()).await.unwrap();
    let mut read = store.load_consumer("c1").await.unwrap().unwrap();
    assert!(read.record.version > 1, "a restore raises the version");
    // Announced (an earlier write's announcement may still be on its way first).
    loop {
        match feed.next().await.unwrap() {
            FeedEvent::Changed(change) if change.version < read.record.version => {}
            FeedEvent::Changed(change) => {
                assert_eq!(&*change.consumer_id, "c1");
                assert_eq!(change.version, read.record.version);
                break;
            }
            FeedEvent::Lost(_) => panic!("lost"),
        }
    }
    read.record.version = 1;
    read.keys.sort_by_key(|k| k.hash);
    read.totp.sort_by_key(|t| !t.confirmed);
    read.recovery_codes.sort_by_key(|c| c.hash);
    assert_eq!(read, state, "the first key is gone, the rest as given");
    // Restored again: the same (idempotent).
    store.restore_consumer(state.clone()).await.unwrap();
    assert_eq!(
        store.load().await.unwrap().consumers.len(),
        1,
        "one consumer, whatever its name was"
    );
    // The old name is free, the new one taken.
    store
        .insert_consumer(record("c2"), key("c2", 20))
        .await
        .unwrap();
    let mut taken = state.clone();
    taken.record.id = "c3".into();
    taken.keys.clear();
    taken.totp.clear();
    taken.recovery_codes.clear();
    taken.sms = None;
    assert!(matches!(
        store.restore_consumer(taken).await,
        Err(stepgate::store::StoreError::Conflict(_))
    ));
}

/// `rewrite_audit` replaces the whole log, which then reads newest first.
pub async fn a_rewritten_audit_log_reads_in_the_new_order<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    use stepgate::store::AuditEvent;
    let store = make().await;
    let event = |at: u64, kind: &str| AuditEvent {
        id: 0,
        at,
        kind: kind.into(),
        consumer_id: Some("c1".into()),
        consumer_name: Some("alice".into()),
        key_prefix: None,
        detail: serde_json::json!({"n": at}),
    };
    store.append_audit(event(NOW + 5, "old")).await.unwrap();
    store
        .rewrite_audit(vec![
            event(NOW, "a"),
            event(NOW + 1, "b"),
            event(NOW + 2, "c"),
        ])
        .await
        .unwrap();
    let kinds: Vec<String> = store
        .audit(None, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["c", "b", "a"]);
    let since = store.audit(None, Some(NOW + 1), 10).await.unwrap();
    assert_eq!(since.len(), 2);
    assert_eq!(since[0].detail, serde_json::json!({"n": NOW + 2}));
}
