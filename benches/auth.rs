//! Micro-benchmarks of the auth path: route match, API-key lookup, step-up token check, TOTP
//! verification, and for a request with a valid key and step-up token the whole decision (the
//! real tower stack, with a stub where the upstream would be) and the auth decision alone (the
//! stack from routing down).
//!
//! `cargo bench --bench auth`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use std::future::Future;
use stepgate::accounts::Accounts;
use stepgate::audit::{Audit, AuditLog};
use stepgate::clock::{ManualClock, SharedClock};
use stepgate::config::{self, Scope};
use stepgate::connection::ConnInfo;
use stepgate::context::Context;
use stepgate::credentials::totp::{self, TotpParams};
use stepgate::error::{Body, Refusal, full_body};
use stepgate::limiter::LocalLimiter;
use stepgate::metrics::Metrics;
use stepgate::secrets::MasterKey;
use stepgate::stack::{self, Shared};
use stepgate::store::sqlite::SqliteStore;
use stepgate::tokens::{LocalTokens, NewToken, TokenStore};
use tower::{Service, ServiceExt};

/// The binary's allocator (src/main.rs), so that these numbers are the gateway's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: u64 = 1_800_000_000;
const CONSUMERS: usize = 10_000;
/// `BENCH_CONSUMERS=1000` shrinks the fixture for a profiler run (valgrind spends minutes
/// creating 10,000 consumers); the numbers to report are taken with the default.
fn consumers() -> usize {
    std::env::var("BENCH_CONSUMERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CONSUMERS)
        .max(ENROLLED)
}
/// Consumers with TOTP and a live step-up token (the token benchmarks cycle over them).
const ENROLLED: usize = 1_000;

struct Fixture {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    snapshot: Arc<stepgate::snapshot::Snapshot>,
    accounts: Arc<Accounts>,
    keys: Vec<String>,
    tokens: Vec<String>,
    shared: Shared,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/step-up.yaml"),
        "api_key: required\nsecond_factor: required\nstep_up: { ttl: 1h, scope: policy }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policies/public.yaml"),
        "api_key: off\nsecond_factor: off\n",
    )
    .unwrap();
    // 50 routes, the benchmarked one matched last in precedence order among its peers.
    let mut yaml =
        String::from("listen: 127.0.0.1:0\nupstreams: { demo: { echo: {} } }\nroutes:\n");
    for i in 0..49 {
        yaml.push_str(&format!(
            "  - {{ name: r{i}, match: {{ path: /service{i}/items, methods: [GET] }}, upstream: demo, policy: public }}\n"
        ));
    }
    yaml.push_str(
        "  - { name: orders, match: { path: /orders }, upstream: demo, policy: step-up }\n",
    );
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    let snapshot = Arc::new(stepgate::snapshot::Snapshot::build(
        config::load(&dir.path().join("gateway.yaml")).unwrap(),
    ));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let clock: SharedClock = Arc::new(ManualClock::new(NOW));
    let (accounts, keys) = runtime.block_on(async {
        let store: Arc<dyn stepgate::store::Store> =
            Arc::new(SqliteStore::open(&dir.path().join("bench.db")).unwrap());
        let audit = Audit::new(AuditLog::start(store.clone(), None), clock.clone());
        let tokens: Arc<dyn TokenStore> = Arc::new(LocalTokens::new());
        let accounts = Accounts::open(
            store,
            Arc::new(MasterKey::from_bytes([7; 32])),
            clock.clone(),
            audit,
            tokens,
        )
        .await
        .unwrap();
        let mut keys = Vec::with_capacity(consumers());
        for i in 0..consumers() {
            let name = format!("c{i:05}");
            let (_, key) = accounts
                .create_consumer(&name, vec!["partner".into()])
                .await
                .unwrap();
            if i < ENROLLED {
                accounts
                    .begin_totp(&name, TotpParams::default())
                    .await
                    .unwrap();
                let consumer = accounts.directory().get(&name).unwrap();
                let generator = accounts.totp_generator(&consumer).unwrap();
                let code = generator.generate(NOW).to_string();
                accounts.confirm_totp(&name, &code).await.unwrap();
            }
            keys.push(key);
        }
        (Arc::new(accounts), keys)
    });
    let policy: Arc<str> = Arc::from("step-up");
    let tokens = runtime.block_on(async {
        let mut tokens = Vec::with_capacity(ENROLLED);
        for key in &keys[..ENROLLED] {
            let entry = accounts.directory().authenticate(key).unwrap();
            let (token, _) = accounts
                .tokens()
                .issue(
                    NewToken {
                        consumer_id: &entry.consumer.shared_id,
                        policy: &policy,
                        scope: Scope::Policy,
                        ttl: Duration::from_secs(3600),
                        uses: None,
                        earned_from: std::net::Ipv4Addr::LOCALHOST.into(),
                    },
                    NOW,
                )
                .await
                .unwrap()
                .unwrap();
            tokens.push(token);
        }
        tokens
    });
    let metrics = Metrics::new();
    let approvals = Arc::new(stepgate::approvals::Approvals::new(
        Arc::new(stepgate::approvals::LocalApprovals::new()),
        accounts.audit_log().clone(),
        clock.clone(),
        metrics.clone(),
    ));
    let shared = Shared {
        accounts: accounts.clone(),
        limiter: Arc::new(LocalLimiter::new(clock)),
        metrics,
        sends: Arc::new(stepgate::sms::LocalSendBudget::new()),
        approvals,
    };
    Fixture {
        _dir: dir,
        runtime,
        snapshot,
        accounts,
        keys,
        tokens,
        shared,
    }
}

fn bench(c: &mut Criterion) {
    let f = fixture();

    c.bench_function("route match (50 routes)", |b| {
        b.iter(|| {
            black_box(
                f.snapshot
                    .routes
                    .find(None, &Method::GET, black_box("/orders/7")),
            )
        })
    });

    let mut i = 0;
    c.bench_function("api key lookup (10k consumers)", |b| {
        b.iter(|| {
            i = (i + 1) % f.keys.len();
            black_box(f.accounts.directory().authenticate(&f.keys[i]))
        })
    });

    let entries: Vec<_> = f.keys[..ENROLLED]
        .iter()
        .map(|k| f.accounts.directory().authenticate(k).unwrap())
        .collect();
    c.bench_function("step-up token check (1k live)", |b| {
        b.iter(|| {
            i = (i + 1) % ENROLLED;
            black_box(f.accounts.tokens().check_cached(
                &f.tokens[i],
                &entries[i].consumer.id,
                "step-up",
                NOW,
            ))
        })
    });

    let generator = totp::generator(&[42; 20], TotpParams::default(), "alice").unwrap();
    let code = generator.generate(NOW).to_string();
    c.bench_function("totp verify (±1 step)", |b| {
        b.iter(|| black_box(totp::verify(&generator, black_box(&code), NOW)))
    });

    let stub = tower::service_fn(|_request: Request<Empty<Bytes>>| async {
        Ok::<Response<Body>, Refusal>(Response::new(full_body("ok")))
    });
    let service = stack::build_with(f.shared.clone(), stub);
    // What the server holds per connection; per request it gives each its context.
    let config = ArcSwap::new(f.snapshot.clone());
    let conn = std::sync::Arc::new(ConnInfo::new("127.0.0.1:40000".parse().unwrap(), false));
    let request = |i: usize| {
        Request::builder()
            .method(Method::GET)
            .uri("/orders/7?x=1")
            .header("host", "api.example.com")
            .header("x-api-key", &f.keys[i])
            .header("x-step-up-token", &f.tokens[i])
            .header("user-agent", "bench")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    // Sanity: the decision really passes.
    let mut sane = request(0);
    sane.extensions_mut()
        .insert(Context::new(config.load_full(), conn.clone()));
    let response = f.runtime.block_on(service.clone().oneshot(sane)).unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The server clones the stack once per connection and hyper polls each request's future
    // inside the connection's task, so neither a clone nor a runtime entry is part of a
    // request's cost; the request itself is built outside the timed part (hyper parses it),
    // its context inside (the server's connection adds it to each request).
    // On this path nothing waits, so a single poll completes the future.
    let mut service = service.clone();
    let timed = Timed {
        request: &request,
        config: &config,
        conn: &conn,
    };
    timed.bench(
        c,
        "whole auth decision (key + step-up token, real stack)",
        &mut service,
    );
    // The same decision without the layers above routing (credentials marked sensitive,
    // request id, metrics and access log, rescue, protocol and path guards): what the issue
    // calls the auth decision, key + token + policy, through the stack's own layers.
    timed.bench(
        c,
        "auth decision (key + step-up token + policy, routing and below)",
        &mut stack::decision_with(f.shared.clone(), stub),
    );
}

/// What the decision benchmarks share: the requests (consumer `i`'s key and token) and what
/// the server's connection gives each request.
struct Timed<'a, R> {
    request: &'a R,
    config: &'a ArcSwap<stepgate::snapshot::Snapshot>,
    conn: &'a std::sync::Arc<ConnInfo>,
}

impl<R: Fn(usize) -> Request<Empty<Bytes>>> Timed<'_, R> {
    /// Times [`decide`] through `service`, cycling over the enrolled consumers; every
    /// decision must pass.
    fn bench<S>(&self, c: &mut Criterion, name: &str, service: &mut S)
    where
        S: Service<Request<Empty<Bytes>>, Response = Response<Body>>,
        S::Error: std::fmt::Debug,
    {
        let mut i = 0;
        c.bench_function(name, |b| {
            b.iter_batched(
                || {
                    i = (i + 1) % ENROLLED;
                    (self.request)(i)
                },
                |request| {
                    let response = decide(service, request, self.config, self.conn);
                    assert_eq!(response.status(), StatusCode::OK);
                    response
                },
                BatchSize::SmallInput,
            )
        });
    }
}

/// Gives the request its context as the server's connection does, then runs it through the
/// stack, polling its future once: it must be ready. Never inlined, so that a profiler
/// (`valgrind --tool=callgrind --toggle-collect='*decide*'`) can count exactly this.
#[inline(never)]
fn decide<S>(
    service: &mut S,
    mut request: Request<Empty<Bytes>>,
    config: &ArcSwap<stepgate::snapshot::Snapshot>,
    conn: &std::sync::Arc<ConnInfo>,
) -> Response<Body>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    request
        .extensions_mut()
        .insert(Context::new(config.load_full(), conn.clone()));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(service.poll_ready(&mut cx).is_ready());
    let mut future = std::pin::pin!(service.call(request));
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(Ok(response)) => response,
        std::task::Poll::Ready(Err(error)) => panic!("the decision failed: {error:?}"),
        std::task::Poll::Pending => panic!("the decision waited on something"),
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
