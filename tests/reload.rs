//! Hot reload end to end (issue 5): reloads under continuous load lose no request; a tightened
//! policy, a new route and a removed route apply from the next request; a broken file leaves the
//! old configuration serving and the failure visible in the admin API and metrics; the file
//! watcher follows in-place writes, renames and Kubernetes-style symlink swaps; TLS certificates
//! are reloaded (a bad one keeps the old); SIGHUP reloads the running binary.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use stepgate::reload::Outcome;
use stepgate_testkit::ops;
use stepgate_testkit::ops::OpsGw;
use stepgate_testkit::*;
use tokio_util::sync::CancellationToken;

const OPEN: &str = "api_key: off\nsecond_factor: off\n";
const KEYED: &str = "api_key: required\nsecond_factor: off\n";

/// `gateway.yaml` with an admin API, upstream `app` and the given routes
/// `(name, path, upstream, policy)`, one key per line so that errors have distinct lines.
fn gateway_yaml(app: &str, routes: &[(&str, &str, &str, &str)]) -> String {
    let mut out = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstreams:\n  app: {{ url: \"{app}\" }}\nroutes:\n"
    );
    for (name, path, upstream, policy) in routes {
        out.push_str(&format!(
            "  - name: {name}\n    match: {{ path: {path} }}\n    upstream: {upstream}\n    policy: {policy}\n"
        ));
    }
    out
}

fn status_of(value: &Value) -> (String, Option<Vec<String>>) {
    let version = value["version"]
        .as_str()
        .unwrap_or_else(|| panic!("no version in {value}"))
        .to_string();
    let errors = value["last_error"].as_array().map(|lines| {
        lines
            .iter()
            .map(|l| {
                l.as_str()
                    .expect("last_error lines are strings")
                    .to_string()
            })
            .collect()
    });
    (version, errors)
}

/// The version and config errors of a `POST /reload` answer: 200 with the status, or 400
/// `invalid_config` with `errors`.
fn reload_answer(r: &Resp) -> Result<String, Vec<String>> {
    match r.status.as_u16() {
        200 => {
            let j = r.json();
            assert!(
                j["last_error"].is_null(),
                "a 200 reload has no last_error: {j}"
            );
            Ok(j["version"].as_str().expect("version").to_string())
        }
        400 => {
            let j = assert_admin_problem(r, 400, "invalid_config");
            let errors: Vec<String> = j["errors"]
                .as_array()
                .unwrap_or_else(|| panic!("400 invalid_config without an errors array: {j}"))
                .iter()
                .map(|e| e.as_str().expect("errors are strings").to_string())
                .collect();
            assert!(!errors.is_empty(), "an empty errors array: {j}");
            Err(errors)
        }
        other => panic!("POST /reload answered {other}: {}", r.text()),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Reloads under continuous load
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, who: &str, result: Result<(u16, String), String>) {
        match result {
            Ok((200, body)) if body == "app" => {
                self.ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok((status, body)) => self
                .failures
                .lock()
                .unwrap()
                .push(format!("{who}: {status} {body}")),
            Err(e) => self.failures.lock().unwrap().push(format!("{who}: {e}")),
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }
}

/// Sends `GET /load` in a loop until `stop`: on one keep-alive HTTP/1.1 connection, on a new
/// connection each time, and as streams of one h2c connection.
fn spawn_load(
    addr: std::net::SocketAddr,
    tally: Arc<Tally>,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // Keep-alive HTTP/1.1: the connection must survive every reload.
    {
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = ops::KeepAlive::connect(addr).await;
            while !stop.is_cancelled() {
                let r = conn.try_get("/load", &[]).await;
                let failed = r.is_err();
                tally.record("keep-alive", r.map(|r| (r.status.as_u16(), r.text())));
                if failed {
                    conn = ops::KeepAlive::connect(addr).await;
                }
            }
        }));
    }
    // A new connection per request, two at a time.
    for n in 0..2 {
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let result = async {
                    let request = req("GET", "/load", "api.example.com")
                        .body(empty())
                        .unwrap();
                    let resp = send_http1_stream(addr, request)
                        .await
                        .map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let body = tokio::time::timeout(STEP, resp.into_body().collect())
                        .await
                        .map_err(|_| "body timed out".to_string())?
                        .map_err(|e| e.to_string())?
                        .to_bytes();
                    Ok((status, String::from_utf8_lossy(&body).into_owned()))
                }
                .await;
                tally.record(&format!("new-connection-{n}"), result);
            }
        }));
    }
    // h2c with prior knowledge: one connection, one stream after another.
    {
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .expect("h2c handshake");
            tokio::spawn(async move {
                let _ = conn.await;
            });
            while !stop.is_cancelled() {
                let request = Request::builder()
                    .uri("http://api.example.com/load")
                    .body(empty())
                    .unwrap();
                let result = async {
                    let resp = tokio::time::timeout(STEP, sender.send_request(request))
                        .await
                        .map_err(|_| "h2 head timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let body = tokio::time::timeout(STEP, resp.into_body().collect())
                        .await
                        .map_err(|_| "body timed out".to_string())?
                        .map_err(|e| e.to_string())?
                        .to_bytes();
                    Ok((status, String::from_utf8_lossy(&body).into_owned()))
                }
                .await;
                let failed = result.is_err();
                tally.record("h2c", result);
                if failed {
                    return;
                }
            }
        }));
    }
    tasks
}

#[derive(Clone, Copy, Debug)]
enum Trigger {
    File,
    Post,
    Reloader,
}

#[derive(Debug)]
enum Change {
    /// A valid gateway.yaml with marker route `/m{n}`.
    Gateway(usize),
    /// A valid `policies/p.yaml` (still public) with a ban of `n + 1` minutes.
    Policy(usize),
    /// An invalid file: (file relative to the config dir, content).
    Broken(&'static str, String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_continuous_load_fail_no_request() {
    let app = Upstream::named("app").await;
    let url = app.url();
    let gateway_with = |marker: usize| {
        gateway_yaml(
            &url,
            &[
                ("load", "/load", "app", "p"),
                (&format!("m{marker}"), &format!("/m{marker}"), "app", "open"),
            ],
        )
    };
    let policy_with = |n: usize| format!("{OPEN}failures: {{ ban: {}m }}\n", n + 1);
    let dir = write_config_with(
        &gateway_with(100),
        &[
            ("policies/p.yaml", &policy_with(100)),
            ("policies/open.yaml", OPEN),
        ],
    );
    let g = GatewayBuilder::in_dir(dir).start_ops().await;

    let valid_gw = gateway_with(0);
    let bad_yaml = "listen: 127.0.0.1:0\nupstreams:\n  app: { url: \"http://x\" }\n routes: []\n";
    let truncated = valid_gw[..valid_gw.find("/m0").unwrap()].to_string();
    let dangling_upstream = valid_gw.replace(
        "upstream: app\n    policy: open",
        "upstream: ghost\n    policy: open",
    );
    let dangling_policy = valid_gw.replace("policy: open", "policy: phantom");
    assert_ne!(dangling_upstream, valid_gw);
    assert_ne!(dangling_policy, valid_gw);
    use Change::*;
    use Trigger::*;
    let steps: Vec<(Trigger, Change)> = vec![
        (File, Gateway(0)),
        (Post, Policy(1)),
        (Reloader, Broken("gateway.yaml", bad_yaml.to_string())),
        (File, Gateway(3)),
        (Post, Broken("gateway.yaml", dangling_upstream.clone())),
        (Reloader, Gateway(5)),
        (
            File,
            Broken(
                "policies/p.yaml",
                "api_key: off\nsecond_factor: [off\n".into(),
            ),
        ),
        (Post, Policy(7)),
        (Reloader, Gateway(8)),
        (File, Broken("gateway.yaml", String::new())),
        (Post, Gateway(10)),
        (Reloader, Broken("gateway.yaml", truncated)),
        (File, Gateway(12)),
        (Post, Broken("gateway.yaml", dangling_policy)),
        (Reloader, Gateway(14)),
        (Post, Broken("policies/p.yaml", String::new())),
        (File, Policy(16)),
        (Reloader, Policy(17)),
        (File, Broken("gateway.yaml", dangling_upstream)),
        (Post, Gateway(19)),
    ];
    assert_eq!(steps.len(), 20);
    let valid_steps = steps
        .iter()
        .filter(|(_, c)| !matches!(c, Broken(..)))
        .count() as f64;

    let before = g.scrape().await;
    let tally = Arc::new(Tally::default());
    let stop = CancellationToken::new();
    let tasks = spawn_load(g.addr(), tally.clone(), stop.clone());

    // Traffic flows before the first reload.
    let wait_traffic = |from: u64, what: String| {
        let tally = tally.clone();
        async move {
            ops::eventually(STEP, &what, || {
                let tally = tally.clone();
                async move { (tally.ok() >= from + 25).then_some(()) }
            })
            .await
        }
    };
    wait_traffic(0, "load before the first reload".into()).await;

    let mut versions = vec![g.version().await];
    let mut intervals = Vec::new();
    let mut during = Vec::new();
    for (i, (trigger, change)) in steps.into_iter().enumerate() {
        let at_start = tally.ok();
        let previous = versions.last().unwrap().clone();
        let (file, content, broken) = match &change {
            Gateway(n) => ("gateway.yaml", gateway_with(*n), false),
            Policy(n) => ("policies/p.yaml", policy_with(*n), false),
            Broken(file, content) => (*file, content.clone(), true),
        };
        ops::write_atomic(&g.path(file), &content);
        let what = format!("step {i}: {trigger:?} {change:?}");
        let version = match trigger {
            File => {
                if broken {
                    let file_name = Path::new(file).file_name().unwrap().to_str().unwrap();
                    let status = g.wait_last_error(file_name, &what).await;
                    status["version"].as_str().unwrap().to_string()
                } else {
                    let status = g.wait_version_change(&previous, &what).await;
                    status["version"].as_str().unwrap().to_string()
                }
            }
            Post => match reload_answer(&g.post_reload().await) {
                Ok(version) => {
                    assert!(!broken, "{what}: an invalid config was accepted");
                    version
                }
                Err(errors) => {
                    assert!(broken, "{what}: a valid config was refused: {errors:#?}");
                    previous.clone()
                }
            },
            Reloader => match g.reloader.reload("test").await {
                // The watcher may have applied the file first: then it is unchanged.
                Outcome::Applied(status) | Outcome::Unchanged(status) => {
                    assert!(!broken, "{what}: an invalid config was accepted");
                    status.version
                }
                Outcome::Rejected(errors) => {
                    assert!(broken, "{what}: a valid config was refused: {errors}");
                    previous.clone()
                }
            },
        };
        let (shown, last_error) = status_of(&g.status().await);
        if broken {
            assert_eq!(
                shown, previous,
                "{what}: the version changed on a rejected reload"
            );
            assert!(
                last_error.is_some(),
                "{what}: GET /config shows no last_error"
            );
        } else {
            assert_ne!(version, previous, "{what}: the version did not change");
            assert_eq!(shown, version, "{what}: GET /config shows another version");
            assert_eq!(last_error, None, "{what}");
        }
        versions.push(shown);
        if let Gateway(n) = change {
            let r = get(g.addr(), &format!("/m{n}"), "api.example.com").await;
            assert_eq!(r.status, 200, "{what}: the new route /m{n}: {}", r.text());
            let old = get(g.addr(), "/m100", "api.example.com").await;
            assert_eq!(
                old.status, 404,
                "{what}: the replaced route /m100 still answers"
            );
        }
        // Requests answered while this reload was being made...
        let confirmed = tally.ok();
        during.push(confirmed - at_start);
        // ... and under its outcome, before the next one.
        wait_traffic(confirmed, format!("load after {what}")).await;
        intervals.push(tally.ok() - confirmed);
    }
    stop.cancel();
    for task in tasks {
        tokio::time::timeout(STEP, task)
            .await
            .expect("a load task did not stop")
            .expect("a load task panicked");
    }

    let failures = tally.failures.lock().unwrap().clone();
    eprintln!(
        "load: {} answered, {} failed; answered during each reload {during:?}; after each {intervals:?}",
        tally.ok(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during reloads, e.g. {:#?}",
        failures.len(),
        tally.ok() + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(
        intervals.iter().all(|&n| n > 0),
        "an interval without a successful request: {intervals:?}"
    );
    assert!(tally.ok() >= 20 * 25, "only {} requests", tally.ok());
    // The file-triggered reloads take at least the watcher's debounce: traffic ran meanwhile.
    assert!(
        during.iter().filter(|&&n| n > 0).count() >= 7,
        "requests answered while reloads were made: {during:?}"
    );
    // Every valid reload made a version of its own.
    let mut distinct: Vec<&String> = versions.iter().collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len() as f64,
        valid_steps + 1.0,
        "versions over the steps: {versions:?}"
    );
    let after = g.scrape().await;
    let ok = |s: &ops::Scrape| s.counter("stepgate_config_reloads_total", &[("result", "ok")]);
    let err = |s: &ops::Scrape| s.counter("stepgate_config_reloads_total", &[("result", "error")]);
    assert_eq!(ok(&after) - ok(&before), valid_steps, "{}", after.text);
    assert!(err(&after) - err(&before) >= 8.0, "{}", after.text);
    assert_eq!(after.must("stepgate_config_last_reload_success", &[]), 1.0);
    // The load route's requests were all counted as 200s of route `load`.
    let counted = after.counter(
        "stepgate_requests_total",
        &[("route", "load"), ("status", "200")],
    );
    assert_eq!(counted, tally.ok() as f64, "requests counted vs answered");
}

// ---------------------------------------------------------------------------------------------
// 2. A tightened policy, a new route, a removed route: from the next request
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tightened_policy_and_changed_routes_apply_from_the_next_request() {
    let app = Upstream::named("app").await;
    let before_routes = [("p", "/p", "app", "p"), ("gone", "/gone", "app", "open")];
    let after_routes = [("p", "/p", "app", "p"), ("new", "/new", "app", "open")];
    let dir = write_config_with(
        &gateway_yaml(&app.url(), &before_routes),
        &[("policies/p.yaml", OPEN), ("policies/open.yaml", OPEN)],
    );
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let alice = g.gw.add_consumer("alice", &[]).await;
    let key = alice["api_key"].as_str().unwrap().to_string();

    // A keep-alive connection opened under the old configuration.
    let mut conn = ops::KeepAlive::connect(g.addr()).await;
    assert_eq!(conn.get("/p", &[]).await.status, 200);
    assert_eq!(get(g.addr(), "/gone", "api.example.com").await.status, 200);
    get(g.addr(), "/new", "api.example.com")
        .await
        .assert_problem(404, "no_route");
    let v1 = g.version().await;

    // Tighten p, add /new, remove /gone; POST /reload.
    std::fs::write(g.path("policies/p.yaml"), KEYED).unwrap();
    std::fs::write(
        g.path("gateway.yaml"),
        gateway_yaml(&app.url(), &after_routes),
    )
    .unwrap();
    let v2 = reload_answer(&g.post_reload().await).expect("the new config is valid");
    assert_ne!(v2, v1);

    // The very next request, on the connection opened before the reload.
    assert_key_refused(&conn.get("/p", &[]).await, "api_key_missing");
    assert_key_refused(
        &get(g.addr(), "/p", "api.example.com").await,
        "api_key_missing",
    );
    let r = get_keyed(g.addr(), "/p", &key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = conn.get("/new", &[]).await;
    assert_eq!(r.status, 200, "the added route: {}", r.text());
    assert_eq!(app.requests().last().unwrap().path_and_query(), "/new");
    conn.get("/gone", &[]).await.assert_problem(404, "no_route");
    get(g.addr(), "/gone", "api.example.com")
        .await
        .assert_problem(404, "no_route");

    // Loosened again through the reloader itself: the next request passes without a key.
    std::fs::write(g.path("policies/p.yaml"), OPEN).unwrap();
    let v3 = match g.reloader.reload("test").await {
        Outcome::Applied(status) | Outcome::Unchanged(status) => status.version,
        Outcome::Rejected(errors) => panic!("refused: {errors}"),
    };
    assert_ne!(v3, v2);
    assert_eq!(conn.get("/p", &[]).await.status, 200);

    // Tightened by the file watcher alone: once the version moves, no key means 401.
    ops::write_atomic(&g.path("policies/p.yaml"), KEYED);
    g.wait_version_change(&v3, "the watcher applies the tightened policy")
        .await;
    assert_key_refused(&conn.get("/p", &[]).await, "api_key_missing");
    let r = conn.get("/p", &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_the_snapshot_it_started_with() {
    // The upstream holds the first request until released.
    let release = Arc::new(tokio::sync::Notify::new());
    let hold = release.clone();
    let slow = Upstream::with_async(move |_r| {
        let hold = hold.clone();
        async move {
            hold.notified().await;
            http::Response::builder()
                .status(200)
                .body(full("slow"))
                .unwrap()
        }
    })
    .await;
    let other = Upstream::named("other").await;
    let yaml = |upstream: &str| {
        format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstreams:\n  app: {{ url: \"{}\" }}\n  other: {{ url: \"{}\" }}\nroutes:\n  - name: r\n    match: {{ path: /r }}\n    upstream: {upstream}\n    policy: open\n",
            slow.url(),
            other.url()
        )
    };
    let dir = write_config_with(&yaml("app"), &[("policies/open.yaml", OPEN)]);
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let addr = g.addr();
    let in_flight = tokio::spawn(async move { get(addr, "/r", "api.example.com").await });
    slow.wait_arrived(1).await;

    std::fs::write(g.path("gateway.yaml"), yaml("other")).unwrap();
    reload_answer(&g.post_reload().await).expect("valid");
    // New requests go to the new upstream at once...
    let r = get(addr, "/r", "api.example.com").await;
    assert_eq!(r.text(), "other");
    // ... while the one in flight completes on the old one.
    release.notify_one();
    let r = tokio::time::timeout(STEP, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "slow");
}

// ---------------------------------------------------------------------------------------------
// 3. A broken file leaves the old configuration serving
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_old_config_and_shows_the_failure() {
    let app = Upstream::named("app").await;
    let good = gateway_yaml(
        &app.url(),
        &[
            ("open", "/open", "app", "p"),
            ("keyed", "/keyed", "app", "k"),
        ],
    );
    let with_new = |upstream: &str, policy: &str| {
        gateway_yaml(
            &app.url(),
            &[
                ("open", "/open", "app", "p"),
                ("keyed", "/keyed", "app", "k"),
                ("new", "/new", upstream, policy),
            ],
        )
    };
    let dir = write_config_with(
        &good,
        &[("policies/p.yaml", OPEN), ("policies/k.yaml", KEYED)],
    );
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let gateway_file = g.path("gateway.yaml");
    let p_file = g.path("policies/p.yaml");
    let k_file = g.path("policies/k.yaml");
    let v0 = g.version().await;

    let dangling_upstream = with_new("ghost", "p");
    let dangling_policy = with_new("app", "phantom");
    let full_new = with_new("app", "p");
    let cut = full_new.rfind("match: { path: /ne").unwrap() + "match: { path: /ne".len();
    let truncated = full_new[..cut].to_string();
    // (name, file, broken content, the line an error must point at, a word it must mention)
    let cases: Vec<(&str, &Path, String, Option<u64>, &str)> = vec![
        (
            "bad YAML",
            &gateway_file,
            "listen: 127.0.0.1:0\nupstreams:\n  app: { url: \"http://x\" }\n routes: []\n".into(),
            None,
            "",
        ),
        ("truncated", &gateway_file, truncated, None, ""),
        ("empty", &gateway_file, String::new(), None, ""),
        (
            "dangling upstream",
            &gateway_file,
            dangling_upstream.clone(),
            Some(ops::line_of(&dangling_upstream, "upstream: ghost")),
            "ghost",
        ),
        (
            "dangling policy",
            &gateway_file,
            dangling_policy.clone(),
            Some(ops::line_of(&dangling_policy, "policy: phantom")),
            "phantom",
        ),
        (
            "policy with bad YAML",
            &k_file,
            "api_key: required\nsecond_factor: [off\n".into(),
            Some(2),
            "",
        ),
        ("empty policy", &p_file, String::new(), None, ""),
        (
            "policy with an unknown field",
            &p_file,
            format!("{OPEN}bogus: 1\n"),
            Some(3),
            "bogus",
        ),
    ];

    for (name, file, content, line, word) in cases {
        let original = std::fs::read_to_string(file).unwrap();
        let before = g.scrape().await;
        std::fs::write(file, &content).unwrap();

        let errors = reload_answer(&g.post_reload().await)
            .expect_err(&format!("{name}: the broken file was accepted"));
        let config_files = [gateway_file.as_path(), p_file.as_path(), k_file.as_path()];
        let mut at_fault = Vec::new();
        for e in &errors {
            let owner = config_files
                .iter()
                .find(|f| e.starts_with(&format!("{}:", f.display())))
                .unwrap_or_else(|| panic!("{name}: error {e:?} names no config file"));
            let (l, _c, message) = ops::split_config_error(e, owner);
            if *owner == file {
                at_fault.push((l, message));
            }
        }
        assert!(
            !at_fault.is_empty(),
            "{name}: no error points into {}: {errors:#?}",
            file.display()
        );
        if let Some(line) = line {
            assert!(
                at_fault.iter().any(|(l, m)| *l == line && m.contains(word)),
                "{name}: no error at line {line} mentioning {word:?}: {errors:#?}"
            );
        }

        // The admin API shows the failure and the version still in force.
        let (version, last_error) = status_of(&g.status().await);
        assert_eq!(version, v0, "{name}: the version changed");
        assert_eq!(last_error.as_ref(), Some(&errors), "{name}: last_error");

        // The old configuration keeps serving, unchanged.
        let r = get(g.addr(), "/open", "api.example.com").await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_key_refused(
            &get(g.addr(), "/keyed", "api.example.com").await,
            "api_key_missing",
        );
        get(g.addr(), "/new", "api.example.com")
            .await
            .assert_problem(404, "no_route");

        // And the metrics count it.
        let after = g.scrape().await;
        let count = |s: &ops::Scrape, result| {
            s.counter("stepgate_config_reloads_total", &[("result", result)])
        };
        assert!(
            count(&after, "error") > count(&before, "error"),
            "{name}: reload errors not counted:\n{}",
            after.text
        );
        assert_eq!(count(&after, "ok"), count(&before, "ok"), "{name}");
        assert_eq!(
            after.must("stepgate_config_last_reload_success", &[]),
            0.0,
            "{name}"
        );

        // Fixed: back to success, error cleared, same version (nothing changed).
        std::fs::write(file, &original).unwrap();
        let fixed = reload_answer(&g.post_reload().await)
            .unwrap_or_else(|e| panic!("{name}: the restored file is refused: {e:#?}"));
        assert_eq!(fixed, v0, "{name}");
        let (version, last_error) = status_of(&g.status().await);
        assert_eq!(
            (version.as_str(), last_error),
            (v0.as_str(), None),
            "{name}"
        );
        let fixed_scrape = g.scrape().await;
        assert_eq!(
            fixed_scrape.must("stepgate_config_last_reload_success", &[]),
            1.0,
            "{name}"
        );
    }

    // A real change after the failures is applied and counted as ok.
    let before = g.scrape().await;
    std::fs::write(&gateway_file, &full_new).unwrap();
    let v1 = reload_answer(&g.post_reload().await).expect("valid");
    assert_ne!(v1, v0);
    assert_eq!(get(g.addr(), "/new", "api.example.com").await.status, 200);
    let after = g.scrape().await;
    assert_eq!(
        after.counter("stepgate_config_reloads_total", &[("result", "ok")])
            - before.counter("stepgate_config_reloads_total", &[("result", "ok")]),
        1.0,
        "{}",
        after.text
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The file watcher
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_follows_in_place_writes_renames_and_editor_saves() {
    let app = Upstream::named("app").await;
    let routes = |n: usize| {
        gateway_yaml(
            &app.url(),
            &[
                ("p", "/p", "app", "p"),
                ("w", &format!("/w{n}"), "app", "open"),
            ],
        )
    };
    let dir = write_config_with(
        &routes(0),
        &[("policies/p.yaml", OPEN), ("policies/open.yaml", OPEN)],
    );
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let gateway_file = g.path("gateway.yaml");
    let mut version = g.version().await;
    assert_eq!(get(g.addr(), "/w0", "api.example.com").await.status, 200);

    // 1. Written in place (same inode).
    ops::write_in_place(&gateway_file, &routes(1));
    version = g.wait_version_change(&version, "in-place write").await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(get(g.addr(), "/w1", "api.example.com").await.status, 200);

    // 2. Written to a temporary file and renamed over.
    ops::write_atomic(&gateway_file, &routes(2));
    version = g.wait_version_change(&version, "atomic rename").await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(get(g.addr(), "/w2", "api.example.com").await.status, 200);

    // 3. An editor that moves the original to a backup and writes a new file.
    std::fs::rename(&gateway_file, g.path("gateway.yaml~")).unwrap();
    std::fs::write(&gateway_file, routes(3)).unwrap();
    version = g
        .wait_version_change(&version, "backup-and-write save")
        .await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(get(g.addr(), "/w3", "api.example.com").await.status, 200);

    // 4. A policy renamed into place in the policies directory.
    ops::write_atomic(&g.path("policies/p.yaml"), KEYED);
    version = g.wait_version_change(&version, "policy renamed over").await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_key_refused(
        &get(g.addr(), "/p", "api.example.com").await,
        "api_key_missing",
    );

    // 5. A policy edited in place.
    ops::write_in_place(&g.path("policies/p.yaml"), OPEN);
    version = g
        .wait_version_change(&version, "policy written in place")
        .await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(get(g.addr(), "/p", "api.example.com").await.status, 200);

    // 6. A broken save is seen and refused; the old config keeps serving.
    ops::write_in_place(&gateway_file, "listen: [\n");
    g.wait_last_error("gateway.yaml", "the watcher reports a broken save")
        .await;
    assert_eq!(g.version().await, version);
    assert_eq!(get(g.addr(), "/w3", "api.example.com").await.status, 200);
    ops::write_in_place(&gateway_file, &routes(6));
    g.wait_version_change(&version, "fixed after a broken save")
        .await;
    assert_eq!(get(g.addr(), "/w6", "api.example.com").await.status, 200);
}

/// Kubernetes mounts a ConfigMap as `file -> ..data/file`, `..data -> ..<timestamp>` and
/// updates it by writing a new `..<timestamp>` directory, pointing a new symlink at it and
/// renaming that symlink over `..data`.
fn k8s_mount(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let target = dir.join(version);
    std::fs::create_dir_all(&target).unwrap();
    for (name, content) in files {
        std::fs::write(target.join(name), content).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_follows_a_kubernetes_symlink_swap() {
    let app = Upstream::named("app").await;
    let routes = |n: usize| {
        gateway_yaml(
            &app.url(),
            &[
                ("p", "/p", "app", "p"),
                ("k", &format!("/k{n}"), "app", "p"),
            ],
        )
    };
    // The config dir and the policies dir are two ConfigMap mounts.
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    k8s_mount(dir.path(), "..v1", &[("gateway.yaml", &routes(1))]);
    k8s_mount(&policies, "..v1", &[("p.yaml", OPEN)]);
    assert!(
        std::fs::symlink_metadata(dir.path().join("gateway.yaml"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let mut version = g.version().await;
    assert_eq!(get(g.addr(), "/k1", "api.example.com").await.status, 200);

    // Swap the config mount to ..v2, and delete ..v1 as the kubelet does.
    k8s_mount(g.dir(), "..v2", &[("gateway.yaml", &routes(2))]);
    std::fs::remove_dir_all(g.path("..v1")).unwrap();
    version = g
        .wait_version_change(&version, "config ..data swapped to ..v2")
        .await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(get(g.addr(), "/k2", "api.example.com").await.status, 200);
    get(g.addr(), "/k1", "api.example.com")
        .await
        .assert_problem(404, "no_route");

    // Swap the policies mount: the tightened policy applies.
    k8s_mount(&g.path("policies"), "..v2", &[("p.yaml", KEYED)]);
    std::fs::remove_dir_all(g.path("policies/..v1")).unwrap();
    version = g
        .wait_version_change(&version, "policies ..data swapped to ..v2")
        .await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_key_refused(
        &get(g.addr(), "/k2", "api.example.com").await,
        "api_key_missing",
    );

    // And again: a watch must survive the swap it reported.
    k8s_mount(g.dir(), "..v3", &[("gateway.yaml", &routes(3))]);
    std::fs::remove_dir_all(g.path("..v2")).unwrap();
    version = g
        .wait_version_change(&version, "config ..data swapped to ..v3")
        .await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_key_refused(
        &get(g.addr(), "/k3", "api.example.com").await,
        "api_key_missing",
    );
    k8s_mount(&g.path("policies"), "..v3", &[("p.yaml", OPEN)]);
    std::fs::remove_dir_all(g.path("policies/..v2")).unwrap();
    g.wait_version_change(&version, "policies ..data swapped to ..v3")
        .await;
    assert_eq!(get(g.addr(), "/k3", "api.example.com").await.status, 200);
}

// ---------------------------------------------------------------------------------------------
// 5. TLS certificates
// ---------------------------------------------------------------------------------------------

/// Valid PEM around bytes that are no certificate.
const CORRUPT_CERT: &str =
    "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";

const TLS_YAML: &str = r#"listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
tls:
  cert: certs/cert.pem
  key: certs/key.pem
upstreams:
  app: { url: "${app}" }
routes:
  - name: open
    match: { path: /open }
    upstream: app
    policy: open
"#;

/// A TLS handshake trusting every certificate in `trusted`; returns the certificate the server
/// presented and the connection.
async fn handshake(
    addr: std::net::SocketAddr,
    trusted: &[&TestCert],
) -> (
    rustls_pki_types::CertificateDer<'static>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.der.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake failed");
    let presented = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
    (presented.into_owned(), tls)
}

/// A new TLS connection: asserts the server presents `expected` and answers `GET /open`.
async fn assert_serves_cert(g: &OpsGw, all: &[&TestCert], expected: &TestCert, what: &str) {
    let (presented, tls) = handshake(g.addr(), all).await;
    assert!(
        presented == expected.der,
        "{what}: the server presented another certificate"
    );
    let r = send_http1_on(tls, req("GET", "/open", "localhost").body(empty()).unwrap())
        .await
        .expect("request over TLS");
    let r = read_resp(r).await;
    assert_eq!(r.status, 200, "{what}: {}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificates_are_reloaded_and_a_bad_one_keeps_the_old() {
    let app = Upstream::named("app").await;
    let a = self_signed_localhost();
    let b = self_signed_localhost();
    let all = [&a, &b];
    let dir = write_config_with(
        &render(TLS_YAML, &[("app", &app.url())]),
        &[
            ("policies/open.yaml", OPEN),
            ("certs/cert.pem", &a.cert_pem),
            ("certs/key.pem", &a.key_pem),
        ],
    );
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let yaml = std::fs::read_to_string(g.path("gateway.yaml")).unwrap();
    assert_serves_cert(&g, &all, &a, "at start").await;
    // A connection made under cert A, kept open across the reloads.
    let (_, old_tls) = handshake(g.addr(), &all).await;
    let (mut old_conn, conn) =
        hyper::client::conn::http1::handshake::<_, BoxBody>(TokioIo::new(old_tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let v0 = g.version().await;

    // Rotate to B (same file names, so the YAML is unchanged) and reload.
    ops::write_atomic(&g.path("certs/key.pem"), &b.key_pem);
    ops::write_atomic(&g.path("certs/cert.pem"), &b.cert_pem);
    let v1 = reload_answer(&g.post_reload().await).expect("certificate B is valid");
    assert_ne!(v1, v0, "a rotated certificate is a new version");
    assert_serves_cert(&g, &all, &b, "after rotating to B").await;
    // Clients that only trust A now fail: B is really what new connections get.
    let only_a = tls_client_config(&a, &[b"http/1.1"]);
    let tcp = tokio::net::TcpStream::connect(g.addr()).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(only_a))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await;
    assert!(
        refused.is_err(),
        "a client trusting only A still got a certificate it trusts"
    );
    // The connection made under A still works.
    let r = old_conn
        .send_request(req("GET", "/open", "localhost").body(empty()).unwrap())
        .await
        .expect("the old TLS connection survives the reload");
    assert_eq!(r.status(), 200);

    // A corrupt certificate: refused (pointing into the TLS section), B stays.
    std::fs::write(g.path("certs/cert.pem"), CORRUPT_CERT).unwrap();
    let errors = reload_answer(&g.post_reload().await).expect_err("a corrupt certificate");
    let tls_lines = [
        ops::line_of(&yaml, "cert: certs/cert.pem"),
        ops::line_of(&yaml, "key: certs/key.pem"),
    ];
    assert!(
        errors.iter().any(|e| {
            let (l, _, m) = ops::split_config_error(e, &g.path("gateway.yaml"));
            tls_lines.contains(&l) && m.starts_with("tls.")
        }),
        "no tls error on lines {tls_lines:?}: {errors:#?}"
    );
    assert_eq!(g.version().await, v1);
    assert_serves_cert(&g, &all, &b, "after a corrupt certificate").await;

    // Garbage that is not even PEM, and a key that does not fit the certificate.
    std::fs::write(g.path("certs/cert.pem"), "garbage\n").unwrap();
    reload_answer(&g.post_reload().await).expect_err("a certificate file without a certificate");
    assert_serves_cert(&g, &all, &b, "after a certificate file without PEM").await;
    std::fs::write(g.path("certs/cert.pem"), &a.cert_pem).unwrap();
    let errors = reload_answer(&g.post_reload().await).expect_err("cert A with key B");
    let key_line = ops::line_of(&yaml, "key: certs/key.pem");
    assert!(
        errors.iter().any(|e| {
            let (l, _, m) = ops::split_config_error(e, &g.path("gateway.yaml"));
            l == key_line && m.starts_with("tls.key")
        }),
        "no tls.key error on line {key_line}: {errors:#?}"
    );
    assert_serves_cert(&g, &all, &b, "after a mismatched key").await;
    assert_eq!(g.version().await, v1);
    let scrape = g.scrape().await;
    assert_eq!(scrape.must("stepgate_config_last_reload_success", &[]), 0.0);
}

/// A corrupt certificate is reported as `tls.cert` on the `cert:` line (the file to fix), not
/// as a key that does not fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_certificate_is_reported_on_the_cert_line() {
    let app = Upstream::named("app").await;
    let a = self_signed_localhost();
    let dir = write_config_with(
        &render(TLS_YAML, &[("app", &app.url())]),
        &[
            ("policies/open.yaml", OPEN),
            ("certs/cert.pem", &a.cert_pem),
            ("certs/key.pem", &a.key_pem),
        ],
    );
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let yaml = std::fs::read_to_string(g.path("gateway.yaml")).unwrap();
    std::fs::write(g.path("certs/cert.pem"), CORRUPT_CERT).unwrap();
    let errors = reload_answer(&g.post_reload().await).expect_err("a corrupt certificate");
    let cert_line = ops::line_of(&yaml, "cert: certs/cert.pem");
    assert!(
        errors.iter().any(|e| {
            let (l, _, m) = ops::split_config_error(e, &g.path("gateway.yaml"));
            l == cert_line && m.starts_with("tls.cert")
        }),
        "no tls.cert error on line {cert_line}: {errors:#?}"
    );
    assert_serves_cert(&g, &[&a], &a, "after a corrupt certificate").await;
}

/// "TLS certificate files are reloaded the same way": a certificate rotated on disk (in its own
/// directory, as a mounted secret would be) is picked up without an explicit reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_picked_up_by_the_watcher() {
    let app = Upstream::named("app").await;
    let a = self_signed_localhost();
    let b = self_signed_localhost();
    let dir = write_config_with(
        &render(TLS_YAML, &[("app", &app.url())]),
        &[
            ("policies/open.yaml", OPEN),
            ("certs/cert.pem", &a.cert_pem),
            ("certs/key.pem", &a.key_pem),
        ],
    );
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let v0 = g.version().await;
    ops::write_atomic(&g.path("certs/key.pem"), &b.key_pem);
    ops::write_atomic(&g.path("certs/cert.pem"), &b.cert_pem);
    g.wait_version_change(
        &v0,
        "the watcher reloads rotated certificate files in certs/",
    )
    .await;
    assert_serves_cert(&g, &[&a, &b], &b, "after the watcher's reload").await;
}

// ---------------------------------------------------------------------------------------------
// SIGHUP (the binary)
// ---------------------------------------------------------------------------------------------

/// A `stepgate run` child whose stdout (JSON logs) is read line by line.
struct Child {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Child {
    fn spawn(config: &Path) -> Child {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stepgate"))
            .args(["run", "-c"])
            .arg(config)
            .args(["--log-format", "json"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn stepgate run");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Child {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a JSON log line matching `pred`.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = std::time::Instant::now() + STEP;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && pred(&v)
                    {
                        return v;
                    }
                }
                Err(_) => panic!("no log line {what}; seen:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary() {
    let app = Upstream::named("app").await;
    let yaml = |n: usize| {
        format!(
            "listen: 127.0.0.1:0\nupstreams:\n  app: {{ url: \"{}\" }}\nroutes:\n  - name: s\n    match: {{ path: /s{n} }}\n    upstream: app\n    policy: open\n",
            app.url()
        )
    };
    let dir = write_config_with(&yaml(1), &[("policies/open.yaml", OPEN)]);
    let config = dir.path().join("gateway.yaml");
    let mut child = Child::spawn(&config);
    let listening = child.wait_line("`stepgate listening`", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stepgate listening"))
    });
    let addr: std::net::SocketAddr = listening["address"]
        .as_str()
        .expect("address field")
        .parse()
        .unwrap();
    assert_eq!(get(addr, "/s1", "api.example.com").await.status, 200);

    // A broken file and SIGHUP: the SIGHUP reload itself reports the rejection.
    std::fs::write(&config, "listen: [\n").unwrap();
    child.signal("HUP");
    child.wait_line("rejecting the config on SIGHUP", |v| {
        v["trigger"] == "SIGHUP"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("configuration rejected"))
    });
    assert_eq!(get(addr, "/s1", "api.example.com").await.status, 200);

    // Fixed, with a new route, and SIGHUP again.
    std::fs::write(&config, yaml(2)).unwrap();
    child.signal("HUP");
    child.wait_line("applying the config", |v| {
        v["message"].as_str() == Some("configuration applied")
    });
    assert_eq!(get(addr, "/s2", "api.example.com").await.status, 200);
    get(addr, "/s1", "api.example.com")
        .await
        .assert_problem(404, "no_route");

    // A new listen address needs a restart: the rest applies, the log says so, and the
    // gateway keeps serving on the address it has.
    let moved = yaml(3).replace(
        "listen: 127.0.0.1:0",
        &format!("listen: 127.0.0.1:{}", free_port()),
    );
    assert_ne!(moved, yaml(3));
    std::fs::write(&config, moved).unwrap();
    child.signal("HUP");
    child.wait_line("a restart warning naming `listen`", |v| {
        v["field"] == "listen" && v["message"].as_str().is_some_and(|m| m.contains("restart"))
    });
    child.wait_line("applying the config with the new listen address", |v| {
        v["message"].as_str() == Some("configuration applied")
    });
    assert_eq!(get(addr, "/s3", "api.example.com").await.status, 200);

    // Still alive after the signals, and SIGTERM ends it cleanly.
    child.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let mut child = child;
        let status = child.child.wait();
        (status, child)
    })
    .await
    .unwrap()
    .0
    .unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

/// A reload that moves `policies_dir` is applied (it is not a restart-only setting), so the
/// watcher must then follow the new directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_follows_a_policies_dir_changed_by_reload() {
    let app = Upstream::named("app").await;
    let base = gateway_yaml(&app.url(), &[("p", "/p", "app", "p")]);
    let dir = write_config_with(&base, &[("policies/p.yaml", OPEN), ("rules/p.yaml", OPEN)]);
    let g = GatewayBuilder::in_dir(dir).start_ops().await;
    let v0 = g.version().await;
    ops::write_atomic(
        &g.path("gateway.yaml"),
        &format!("policies_dir: rules\n{base}"),
    );
    let v1 = g
        .wait_version_change(&v0, "the watcher applies policies_dir: rules")
        .await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(get(g.addr(), "/p", "api.example.com").await.status, 200);
    // Let the watcher go quiet (5 debounce periods), so that no reload still pending from the
    // gateway.yaml change can pick up the next edit by chance.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(g.version().await, v1);

    // Tighten the policy in the new directory: the watcher applies it.
    ops::write_atomic(&g.path("rules/p.yaml"), KEYED);
    g.wait_version_change(&v1, "the watcher sees a change in the new policies_dir")
        .await;
    assert_key_refused(
        &get(g.addr(), "/p", "api.example.com").await,
        "api_key_missing",
    );
}
