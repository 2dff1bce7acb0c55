//! The credential layers driven one at a time around a stub inner service (tower's
//! `service_fn`), without sockets: what each lets through, what it refuses, and what the inner
//! service gets to see. The end-to-end tests in `tests/` run the same layers in the real stack.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{HeaderMap, Request, Response};
use tower::{Layer, Service, ServiceExt, service_fn};

use super::api_key::ApiKeyGuard;
use super::failures::{ConsumerBan, FailureLimitLayer, SecondFactorPassed};
use super::roles::RoleCheck;
use super::second_factor::SecondFactorLayer;
use crate::accounts::Accounts;
use crate::audit::{Audit, AuditLog};
use crate::clock::{Clock, ManualClock};
use crate::connection::{ClientIp, ConnInfo};
use crate::context::Context;
use crate::error::{Attempt, Body, Refusal, full_body};
use crate::guard::GuardLayer;
use crate::limiter::{AttemptLimiter, LocalLimiter, Subject};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use crate::tokens::LocalTokens;

const NOW: u64 = 1_800_000_000;

const GATEWAY: &str = r#"
listen: 127.0.0.1:0
upstreams:
  demo: { echo: {} }
routes:
  - { name: open, match: { path: /open }, upstream: demo, policy: public }
  - { name: keyed, match: { path: /keyed }, upstream: demo, policy: key }
  - { name: secure, match: { path: /secure }, upstream: demo, policy: two-factor }
  - { name: ops, match: { path: /ops }, upstream: demo, policy: ops }
  - { name: watch, match: { path: /watch }, upstream: demo, policy: watch }
"#;

const POLICIES: &[(&str, &str)] = &[
    ("public", "api_key: off\nsecond_factor: off\n"),
    ("key", "api_key: required\nsecond_factor: off\n"),
    (
        "two-factor",
        "api_key: required\nsecond_factor: required\nfailures: { per_consumer: { max: 2, window: 15m }, per_ip: { max: 50, window: 15m }, ban: 10m }\n",
    ),
    (
        "ops",
        "api_key: required\nsecond_factor: off\nroles: { only: [ops] }\n",
    ),
    (
        "watch",
        "api_key: required\nsecond_factor: off\nroles: { only: [ops] }\nrollout: { mode: report_only }\n",
    ),
];

/// A configuration, accounts on a fresh SQLite store with alice (role `partner`, TOTP
/// enrolled), a local limiter and a manual clock.
struct Fixture {
    _dir: tempfile::TempDir,
    snapshot: Arc<Snapshot>,
    accounts: Arc<Accounts>,
    limiter: Arc<dyn AttemptLimiter>,
    clock: Arc<ManualClock>,
    key: String,
    secret: Vec<u8>,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), GATEWAY).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        for (name, text) in POLICIES {
            std::fs::write(dir.path().join(format!("policies/{name}.yaml")), text).unwrap();
        }
        let config = crate::config::load(&dir.path().join("gateway.yaml")).unwrap();
        let snapshot = Arc::new(Snapshot::build(config));
        let clock = Arc::new(ManualClock::new(NOW));
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("store.db")).unwrap());
        let audit = Audit::new(AuditLog::start(store.clone(), None), clock.clone());
        let accounts = Arc::new(
            Accounts::open(
                store,
                Arc::new(crate::secrets::MasterKey::from_bytes([5; 32])),
                clock.clone(),
                audit,
                Arc::new(LocalTokens::new()),
            )
            .await
            .unwrap(),
        );
        let (_, key) = accounts
            .create_consumer("alice", vec!["partner".into()])
            .await
            .unwrap();
        accounts
            .begin_totp("alice", Default::default())
            .await
            .unwrap();
        let pending = accounts.directory().get("alice").unwrap();
        let record = pending.totp_pending.clone().unwrap();
        let secret = accounts
            .master()
            .decrypt(&record.secret_sealed, pending.id.as_bytes())
            .unwrap();
        let code = accounts
            .totp_generator(&pending)
            .unwrap()
            .generate(NOW)
            .to_string();
        accounts.confirm_totp("alice", &code).await.unwrap();
        clock.advance(30);
        let limiter: Arc<dyn AttemptLimiter> = Arc::new(LocalLimiter::new(clock.clone()));
        Self {
            _dir: dir,
            snapshot,
            accounts,
            limiter,
            clock,
            key,
            secret,
        }
    }

    fn code(&self) -> String {
        let generator =
            crate::credentials::totp::generator(&self.secret, Default::default(), "alice").unwrap();
        generator.generate(self.clock.now()).to_string()
    }

    /// A request as the layers above routing leave it: its context, route and client set.
    fn request(&self, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(()).unwrap();
        let conn = Arc::new(ConnInfo::new("127.0.0.1:4000".parse().unwrap(), false));
        let mut context = Context::new(self.snapshot.clone(), conn);
        context.route = self
            .snapshot
            .routes
            .find(None, request.method(), path)
            .cloned();
        context.client = Some(ClientIp {
            ip: "127.0.0.1".parse().unwrap(),
            via_trusted_proxy: false,
        });
        request.extensions_mut().insert(context);
        request
    }

    /// A request that got past the API-key guard: its key entry in the context.
    fn keyed(&self, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut request = self.request(path, headers);
        let entry = self.accounts.directory().authenticate(&self.key).unwrap();
        Context::of_mut(&mut request).unwrap().entry = Some(entry);
        request
    }

    fn alice(&self) -> Attempt {
        self.accounts
            .directory()
            .authenticate(&self.key)
            .unwrap()
            .attempt
            .clone()
    }
}

/// What the stub inner service saw, and how often it was called.
#[derive(Clone, Default)]
struct Seen {
    calls: Arc<AtomicUsize>,
    headers: Arc<Mutex<Option<HeaderMap>>>,
}

impl Seen {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn header(&self, name: &str) -> Option<String> {
        let headers = self.headers.lock().unwrap();
        headers
            .as_ref()?
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// An inner service answering 200 (and recording the request), or with `refusal` each time.
fn stub<A>(
    seen: &Seen,
    answer: A,
) -> impl Service<Request<()>, Response = Response<Body>, Error = Refusal, Future: Send>
+ Clone
+ Send
+ use<A>
where
    A: Fn() -> Result<Response<Body>, Refusal> + Clone + Send + 'static,
{
    let seen = seen.clone();
    service_fn(move |request: Request<()>| {
        let seen = seen.clone();
        let answer = answer.clone();
        async move {
            seen.calls.fetch_add(1, Ordering::SeqCst);
            *seen.headers.lock().unwrap() = Some(request.headers().clone());
            answer()
        }
    })
}

fn ok() -> Result<Response<Body>, Refusal> {
    Ok(Response::new(full_body("ok")))
}

async fn call<S>(service: S, request: Request<()>) -> Result<Response<Body>, Refusal>
where
    S: Service<Request<()>, Response = Response<Body>, Error = Refusal>,
{
    service.oneshot(request).await
}

fn code_of(result: &Result<Response<Body>, Refusal>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(refusal) => refusal.status_code().1,
    }
}

#[tokio::test]
async fn the_api_key_guard_vouches_for_the_consumer_and_removes_the_key() {
    let f = Fixture::new().await;
    let guard = GuardLayer(ApiKeyGuard::new(f.accounts.directory().clone()));
    let seen = Seen::default();
    let service = guard.layer(stub(&seen, ok));

    let missing = call(service.clone(), f.request("/keyed", &[])).await;
    assert_eq!(code_of(&missing), "api_key_missing");
    let wrong = call(
        service.clone(),
        f.request("/keyed", &[("x-api-key", "sgk_nope")]),
    )
    .await;
    assert_eq!(code_of(&wrong), "api_key_invalid");
    let twice = call(
        service.clone(),
        f.request("/keyed", &[("x-api-key", &f.key), ("x-api-key", &f.key)]),
    )
    .await;
    assert_eq!(code_of(&twice), "bad_request");
    assert_eq!(seen.calls(), 0, "nothing refused reached the inner service");

    let good = call(
        service.clone(),
        f.request("/keyed", &[("x-api-key", &f.key)]),
    )
    .await;
    assert!(good.is_ok());
    assert_eq!(seen.header("x-consumer-name").as_deref(), Some("alice"));
    assert_eq!(seen.header("x-consumer-roles").as_deref(), Some("partner"));
    assert_eq!(seen.header("x-stepgate-auth").as_deref(), Some("key"));
    assert_eq!(seen.header("x-api-key"), None);

    // A public route takes no key, and forwards none.
    let open = call(service, f.request("/open", &[("x-api-key", &f.key)])).await;
    assert!(open.is_ok());
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(seen.header("x-consumer-name"), None);
}

#[tokio::test]
async fn the_failure_limiter_counts_failures_from_below_and_bans_before_anything_runs() {
    let f = Fixture::new().await;
    let layer = FailureLimitLayer::new(
        f.limiter.clone(),
        f.accounts.audit_log().clone(),
        Metrics::new(),
    );
    let seen = Seen::default();
    let alice = f.alice();
    let failing = layer.layer(stub(&seen, move || {
        Err(Refusal::OtpInvalid { by: alice.clone() })
    }));
    // two-factor tolerates two failures of a consumer; the third starts a ten-minute ban.
    for _ in 0..2 {
        let r = call(failing.clone(), f.request("/secure", &[])).await;
        assert_eq!(code_of(&r), "otp_invalid");
    }
    let r = call(failing.clone(), f.request("/secure", &[])).await;
    assert!(matches!(
        r,
        Err(Refusal::TooManyAttempts { retry_after: 600 })
    ));
    let consumer = Subject::Consumer(f.alice().consumer_id);
    assert_eq!(f.limiter.banned(&consumer), Ok(Some(600)));
    assert_eq!(seen.calls(), 3);

    // A banned address is refused before the inner service runs at all.
    let address = Subject::ip("127.0.0.1".parse().unwrap());
    let policy: Arc<str> = Arc::from("two-factor");
    let failures = crate::config::Failures::default();
    for _ in 0..51 {
        f.limiter
            .record(&policy, address.clone(), failures.per_ip, &failures)
            .await;
    }
    let passing = layer.layer(stub(&seen, ok));
    let r = call(passing, f.request("/open", &[])).await;
    assert_eq!(code_of(&r), "too_many_attempts");
    assert_eq!(
        seen.calls(),
        3,
        "the banned address reached the inner service"
    );
}

#[tokio::test]
async fn a_proved_second_factor_resets_the_consumers_count() {
    let f = Fixture::new().await;
    let layer = FailureLimitLayer::new(
        f.limiter.clone(),
        f.accounts.audit_log().clone(),
        Metrics::new(),
    );
    let seen = Seen::default();
    let alice = f.alice();
    let failing = layer.layer(stub(&seen, move || {
        Err(Refusal::OtpInvalid { by: alice.clone() })
    }));
    let id = f.alice().consumer_id;
    let passed = layer.layer(stub(&seen, move || {
        let mut response = Response::new(full_body("ok"));
        response.extensions_mut().insert(SecondFactorPassed {
            consumer_id: id.clone(),
        });
        Ok(response)
    }));
    for _ in 0..2 {
        call(failing.clone(), f.request("/secure", &[])).await.ok();
    }
    assert!(call(passed, f.request("/secure", &[])).await.is_ok());
    // The count started afresh: two more failures are tolerated again.
    for _ in 0..2 {
        let r = call(failing.clone(), f.request("/secure", &[])).await;
        assert_eq!(code_of(&r), "otp_invalid");
    }
}

#[tokio::test]
async fn a_banned_consumer_is_refused_by_name_before_its_code() {
    let f = Fixture::new().await;
    let guard = GuardLayer(ConsumerBan::new(
        f.limiter.clone(),
        f.accounts.audit_log().clone(),
    ));
    let seen = Seen::default();
    let service = guard.layer(stub(&seen, ok));
    assert!(call(service.clone(), f.keyed("/secure", &[])).await.is_ok());
    let policy: Arc<str> = Arc::from("two-factor");
    let failures = crate::config::Failures::default();
    let consumer = Subject::Consumer(f.alice().consumer_id);
    for _ in 0..6 {
        f.limiter
            .record(&policy, consumer.clone(), failures.per_consumer, &failures)
            .await;
    }
    let r = call(service.clone(), f.keyed("/secure", &[("x-otp", &f.code())])).await;
    assert_eq!(code_of(&r), "too_many_attempts");
    // A public route names no consumer: nothing to ban.
    assert!(call(service, f.request("/open", &[])).await.is_ok());
    assert_eq!(seen.calls(), 2);
}

#[tokio::test]
async fn roles_refuse_a_consumer_the_policy_does_not_allow_unless_reporting_only() {
    let f = Fixture::new().await;
    let guard = GuardLayer(RoleCheck::new(f.accounts.audit_log().clone()));
    let seen = Seen::default();
    let service = guard.layer(stub(&seen, ok));
    let r = call(service.clone(), f.keyed("/ops", &[])).await;
    assert_eq!(code_of(&r), "forbidden");
    assert!(call(service.clone(), f.keyed("/keyed", &[])).await.is_ok());
    // report_only: let through, audited.
    assert!(call(service, f.keyed("/watch", &[])).await.is_ok());
    assert_eq!(seen.calls(), 2);
    let events = f.accounts.audit(Some("alice"), None, 10).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == "would_refuse"),
        "{events:?}"
    );
}

#[tokio::test]
async fn the_second_factor_layer_takes_a_code_once_and_then_its_token() {
    let f = Fixture::new().await;
    let layer = SecondFactorLayer::new(f.accounts.clone(), Metrics::new());
    let seen = Seen::default();
    let service = layer.layer(stub(&seen, ok));

    let none = call(service.clone(), f.keyed("/secure", &[])).await;
    assert_eq!(code_of(&none), "otp_required");
    let wrong = call(service.clone(), f.keyed("/secure", &[("x-otp", "000000")])).await;
    assert_eq!(code_of(&wrong), "otp_invalid");
    assert!(matches!(wrong, Err(Refusal::OtpInvalid { .. })));
    assert_eq!(seen.calls(), 0);

    let code = f.code();
    let proved = call(service.clone(), f.keyed("/secure", &[("x-otp", &code)]))
        .await
        .unwrap();
    assert_eq!(seen.header("x-stepgate-auth").as_deref(), Some("key+totp"));
    assert_eq!(seen.header("x-otp"), None);
    assert!(proved.extensions().get::<SecondFactorPassed>().is_some());
    let token = proved.headers()["x-step-up-token"]
        .to_str()
        .unwrap()
        .to_owned();
    // The same code again is a replay.
    let replay = call(service.clone(), f.keyed("/secure", &[("x-otp", &code)])).await;
    assert_eq!(code_of(&replay), "otp_invalid");

    // The token stands in for a code, and is not forwarded either.
    let with_token = call(
        service.clone(),
        f.keyed("/secure", &[("x-step-up-token", &token)]),
    )
    .await
    .unwrap();
    assert!(
        with_token
            .extensions()
            .get::<SecondFactorPassed>()
            .is_none()
    );
    assert_eq!(
        seen.header("x-stepgate-auth").as_deref(),
        Some("key+step_up")
    );
    assert_eq!(seen.header("x-step-up-token"), None);
    let bad_token = call(
        service,
        f.keyed(
            "/secure",
            &[("x-step-up-token", &format!("sgt_{}", "0".repeat(64)))],
        ),
    )
    .await;
    assert_eq!(code_of(&bad_token), "step_up_invalid");
    assert_eq!(seen.calls(), 2);
}
