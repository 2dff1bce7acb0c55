//! Approval by a person, bound to the exact request: a deploy bot with a key and no code asks,
//! an on-call engineer approves with their own code, the bot's exact repeat passes once. Real
//! gateway, real HTTP, the injected clock, a local webhook receiver that checks the signature.
use stepgate_testkit::*;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, KeyInit, Mac};
use http::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::Sha256;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
data_dir: "${data_dir}"
approvals: { max_pending: 3, notify: { url: "${hook}", secret_file: "${secret}" } }
upstreams:
  app: { url: "${app}" }
routes:
  - { name: deploy, match: { path: /deploy }, upstream: app, policy: deploy }
  - { name: selfish, match: { path: /selfish }, upstream: app, policy: selfish }
  - { name: twofa, match: { path: /2fa }, upstream: app, policy: two-factor }
"#;

const DEPLOY: &str = "api_key: required\nsecond_factor: required\nfactors: [totp, approval]\n\
approval: { approvers: { roles: [ops] }, self: false, ttl: 5m, show: [\"$.version\", \"$.env\"] }\n";
const SELFISH: &str = "api_key: required\nsecond_factor: required\nfactors: [totp, approval]\n\
approval: { approvers: { roles: [ops] }, self: true }\n";
const SECRET: &str = "a-webhook-key-of-thirty-two-char";

/// What the webhook received: (timestamp, signature, body). It answers the first call 503, so
/// that the gateway has to try again.
type Hooks = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

async fn webhook() -> (String, Hooks) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let hooks: Hooks = Arc::default();
    let seen = hooks.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let header = |name: &str| {
                                request
                                    .headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let (timestamp, signature) = (
                                header("x-stepgate-timestamp"),
                                header("x-stepgate-signature"),
                            );
                            let body = http_body_util::BodyExt::collect(request.into_body())
                                .await
                                .unwrap()
                                .to_bytes()
                                .to_vec();
                            let mut seen = seen.lock().unwrap();
                            seen.push((timestamp, signature, body));
                            let status = if seen.len() == 1 { 503 } else { 200 };
                            Ok::<_, Infallible>(
                                Response::builder().status(status).body(empty()).unwrap(),
                            )
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, hooks)
}

struct Setup {
    t: TwoFactor,
    hooks: Hooks,
    _secret_dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let (hook, hooks) = webhook().await;
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("hook.key");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let template = CONFIG
        .replace("${hook}", &hook)
        .replace("${secret}", &path_str(&secret));
    let mut policies: Vec<(String, String)> = TWO_FACTOR_POLICIES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    policies.push(("policies/deploy.yaml".into(), DEPLOY.into()));
    policies.push(("policies/selfish.yaml".into(), SELFISH.into()));
    let t = TwoFactor::start_custom(CustomConfig { template, policies }).await;
    Setup {
        t,
        hooks,
        _secret_dir: secret_dir,
    }
}

const BODY: &str = r#"{"version":"1.4.2","env":"prod","token":"s3cr3t-do-not-show"}"#;

/// `POST path` with a JSON body and headers.
async fn post(t: &TwoFactor, path: &str, body: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = req("POST", path, "api.example.com").header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send_http1(t.addr(), b.body(full(body.to_owned())).unwrap()).await
}

/// A self-service call under the prefix, as a consumer.
async fn own(t: &TwoFactor, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    t.send(method, &format!("/_stepgate{path}"), headers).await
}

/// An approver's decision on the security page's API, with their code.
async fn decide(t: &TwoFactor, id: &str, verb: &str, key: &str, code: &str) -> Resp {
    own(
        t,
        "POST",
        &format!("/approvals/{id}/{verb}"),
        &[("x-api-key", key), ("x-otp", code)],
    )
    .await
}

/// The requester's repeat of `BODY` on `path` with `X-Approval: id`.
async fn repeat(t: &TwoFactor, path: &str, key: &str, id: &str) -> Resp {
    post(t, path, BODY, &[("x-api-key", key), ("x-approval", id)]).await
}

#[tokio::test]
async fn a_bot_asks_a_person_approves_with_their_code_and_the_exact_repeat_passes_once() {
    let s = setup().await;
    let t = &s.t;
    let bot = t.consumer("deploy-bot", &["ci"]).await;
    let oncall = t.consumer("oncall", &["ops"]).await;
    let e = t.enrol("oncall").await;

    // The bot has a key and no code: refused with the id, nothing forwarded.
    let r = post(t, "/deploy/web", BODY, &[("x-api-key", &bot.key)]).await;
    let asked = r.assert_problem(401, "approval_required");
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("apr_"), "{asked}");
    assert_eq!(asked["status_url"], format!("/_stepgate/approvals/{id}"));
    assert_eq!(asked["approval_url"], format!("/_stepgate/#approval={id}"));
    assert!(r.header("www-authenticate").unwrap().contains("approval"));
    assert!(t.up.requests().is_empty(), "nothing reaches the upstream");

    // The webhook hears of it, signed, with the shown fields and nothing secret; refused once
    // (503), it is told again after a backoff.
    let mut hooks = Vec::new();
    for _ in 0..50 {
        hooks = s.hooks.lock().unwrap().clone();
        if hooks.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(hooks.len(), 2, "one refused call, one taken");
    assert_eq!(hooks[0].2, hooks[1].2, "the same summary again");
    let (timestamp, signature, body) = hooks[1].clone();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(signature, format!("sha256={expected}"));
    let text = String::from_utf8(body).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(summary["id"], id.as_str());
    assert_eq!(summary["requester"], "deploy-bot");
    assert_eq!(summary["fields"]["$.version"], "1.4.2");
    assert!(
        !text.contains("s3cr3t") && !text.contains(&bot.key),
        "{text}"
    );

    // The bot waits for the decision (long poll) while the approver decides.
    let waiting = {
        let (addr, key, id) = (t.addr(), bot.key.clone(), id.clone());
        tokio::spawn(async move {
            get_with(
                addr,
                &format!("/_stepgate/approvals/{id}?wait=30"),
                &[("x-api-key", &key)],
            )
            .await
        })
    };
    // The approver sees the request, its shown fields and not the rest of the body.
    let r = own(t, "GET", "/approvals", &[("x-api-key", &oncall.key)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json();
    let pending = &list["approvals"][0];
    assert_eq!(pending["id"], id.as_str());
    assert_eq!(pending["fields"]["$.env"], "prod");
    assert!(!r.text().contains("s3cr3t"), "{}", r.text());
    // Approving needs the approver's own code.
    let r = own(
        t,
        "POST",
        &format!("/approvals/{id}/approve"),
        &[("x-api-key", &oncall.key)],
    )
    .await;
    r.assert_problem(401, "otp_required");
    let code = totp_at(&e.secret, t.now());
    let r = decide(t, &id, "approve", &oncall.key, &code).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "approved");
    let polled = waiting.await.unwrap();
    assert_eq!(polled.status, 200, "{}", polled.text());
    assert_eq!(polled.json()["state"], "approved");
    assert_eq!(polled.json()["decided_by"], "oncall");

    // The exact repeat passes, once.
    let r = repeat(t, "/deploy/web", &bot.key, &id).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = t.up.only_request();
    assert_eq!(seen.body_bytes, BODY.len() as u64);
    assert_eq!(seen.header("x-stepgate-auth"), Some("key+approval"));
    assert_eq!(seen.header("x-consumer-name"), Some("deploy-bot"));
    assert!(seen.header("x-approval").is_none() && seen.header("x-api-key").is_none());
    let r = repeat(t, "/deploy/web", &bot.key, &id).await;
    r.assert_problem(401, "approval_invalid");
    assert_eq!(t.up.requests().len(), 1);

    let kinds: Vec<String> = t
        .audit("deploy-bot")
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    for kind in ["approval_requested", "approval_used", "approval_reused"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} not in {kinds:?}");
    }
    assert!(
        t.audit("oncall")
            .await
            .iter()
            .any(|e| e["kind"] == "approval_approved")
    );
    let metrics = t.gw.call("GET", "/metrics", None).await.text();
    for outcome in ["requested", "approved", "used", "reused"] {
        assert!(
            metrics.contains(&format!(
                "stepgate_approvals_total{{outcome=\"{outcome}\"}} 1"
            )),
            "{outcome}: {metrics}"
        );
    }
}

#[tokio::test]
async fn one_changed_byte_is_refused_and_spends_the_approval() {
    let s = setup().await;
    let t = &s.t;
    let bot = t.consumer("deploy-bot", &["ci"]).await;
    let oncall = t.consumer("oncall", &["ops"]).await;
    let e = t.enrol("oncall").await;
    let id = post(t, "/deploy/web", BODY, &[("x-api-key", &bot.key)])
        .await
        .json()["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = totp_at(&e.secret, t.now());
    let r = decide(t, &id, "approve", &oncall.key, &code).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let changed = BODY.replace("1.4.2", "1.4.3");
    let r = post(
        t,
        "/deploy/web",
        &changed,
        &[("x-api-key", &bot.key), ("x-approval", &id)],
    )
    .await;
    r.assert_problem(401, "approval_mismatch");
    // The path and the query count as much as the body.
    let r = repeat(t, "/deploy/web", &bot.key, &id).await;
    r.assert_problem(401, "approval_invalid");
    assert!(t.up.requests().is_empty());
    assert!(
        t.audit("deploy-bot")
            .await
            .iter()
            .any(|e| e["kind"] == "approval_mismatched")
    );
}

#[tokio::test]
async fn who_may_approve_and_when() {
    let s = setup().await;
    let t = &s.t;
    let bot = t.consumer("deploy-bot", &["ci"]).await;
    let dev = t.consumer("dev", &["developers"]).await;
    let d = t.enrol("dev").await;
    let oncall = t.consumer("oncall", &["ops"]).await;
    let e = t.enrol("oncall").await;
    let ask = |path: &'static str, key: String| async move {
        post(t, path, BODY, &[("x-api-key", &key)]).await.json()["approval_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // An approver without the role: refused, and the request does not show in their list.
    let id = ask("/deploy/a", bot.key.clone()).await;
    let list = own(t, "GET", "/approvals", &[("x-api-key", &dev.key)])
        .await
        .json();
    assert!(list["approvals"].as_array().unwrap().is_empty(), "{list}");
    let code = totp_at(&d.secret, t.now());
    decide(t, &id, "approve", &dev.key, &code)
        .await
        .assert_problem(403, "forbidden");

    // The requester may not approve their own request under `self: false`...
    let mine = ask("/deploy/b", oncall.key.clone()).await;
    let code = totp_at(&e.secret, t.now());
    let r = decide(t, &mine, "approve", &oncall.key, &code).await;
    let problem = r.assert_problem(403, "forbidden");
    assert!(
        problem["detail"].as_str().unwrap().contains("own request"),
        "{problem}"
    );
    // ...and may under `self: true`.
    t.advance(30);
    let selfish = ask("/selfish/x", oncall.key.clone()).await;
    let code = totp_at(&e.secret, t.now());
    let r = decide(t, &selfish, "approve", &oncall.key, &code).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Denied: the repeat is refused as such.
    t.advance(30);
    let code = totp_at(&e.secret, t.now());
    let r = decide(t, &id, "deny", &oncall.key, &code).await;
    assert_eq!(r.status, 200, "{}", r.text());
    repeat(t, "/deploy/a", &bot.key, &id)
        .await
        .assert_problem(403, "approval_denied");

    // Still pending: the repeat says so; past its ttl it is gone for everyone.
    let late = ask("/deploy/c", bot.key.clone()).await;
    repeat(t, "/deploy/c", &bot.key, &late)
        .await
        .assert_problem(401, "approval_pending");
    t.advance(5 * 60);
    t.advance(30);
    let code = totp_at(&e.secret, t.now());
    decide(t, &late, "approve", &oncall.key, &code)
        .await
        .assert_problem(404, "approval_unknown");
    repeat(t, "/deploy/c", &bot.key, &late)
        .await
        .assert_problem(401, "approval_invalid");
    // Another consumer's id is as good as none.
    let other = ask("/deploy/d", bot.key.clone()).await;
    repeat(t, "/deploy/d", &dev.key, &other)
        .await
        .assert_problem(401, "approval_invalid");
    own(
        t,
        "GET",
        &format!("/approvals/{other}"),
        &[("x-api-key", &dev.key)],
    )
    .await
    .assert_problem(404, "approval_unknown");
    assert!(t.up.requests().is_empty());
}

#[tokio::test]
async fn requests_for_approval_are_limited_per_consumer() {
    let s = setup().await;
    let t = &s.t;
    let bot = t.consumer("deploy-bot", &["ci"]).await;
    for i in 0..3 {
        let r = post(t, &format!("/deploy/{i}"), BODY, &[("x-api-key", &bot.key)]).await;
        r.assert_problem(401, "approval_required");
    }
    let r = post(t, "/deploy/3", BODY, &[("x-api-key", &bot.key)]).await;
    r.assert_problem(429, "too_many_approvals");
    assert!(r.header("retry-after").is_some());
}

#[tokio::test]
async fn operators_decide_through_the_admin_api_and_the_cli() {
    let s = setup().await;
    let t = &s.t;
    let bot = t.consumer("deploy-bot", &["ci"]).await;
    t.consumer("oncall", &["ops"]).await;
    let e = t.enrol("oncall").await;
    let id = post(t, "/deploy/web", BODY, &[("x-api-key", &bot.key)])
        .await
        .json()["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let list = t.gw.ok("GET", "/approvals", None, 200).await;
    assert_eq!(list["approvals"][0]["id"], id.as_str());
    // Without the approver's code: refused.
    let r =
        t.gw.call(
            "POST",
            &format!("/approvals/{id}/approve"),
            Some(serde_json::json!({"approver": "oncall", "code": "000000"})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let url = format!("http://{}", t.gw.admin);
    let admin = [
        "--admin-url",
        url.as_str(),
        "--admin-token",
        t.gw.token.as_str(),
    ];
    let (code, out, err) =
        run_cli_async(&[&["approvals", "list"][..], &admin[..]].concat(), &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&id) && out.contains("version=\"1.4.2\""),
        "{out}"
    );
    let totp = totp_at(&e.secret, t.now());
    let approve = [
        "approvals",
        "approve",
        &id,
        "--as",
        "oncall",
        "--code",
        &totp,
    ];
    let (code, out, err) = run_cli_async(&[&approve[..], &admin[..]].concat(), &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let r = repeat(t, "/deploy/web", &bot.key, &id).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn approval_policies_are_checked_at_load() {
    for (policy, needle) in [
        (
            "factors: [totp, approval]\n",
            "needs an `approval:` section",
        ),
        (
            "approval: { approvers: { roles: [ops] } }\n",
            "applies when `factors` lists `approval`",
        ),
        (
            "factors: [approval]\napproval: { approvers: { roles: [] } }\n",
            "at least one role",
        ),
        (
            "factors: [approval]\napproval: { approvers: { roles: [ops] }, show: [\"amount\"] }\n",
            "starts with `$.`",
        ),
        (
            "factors: [approval]\napproval: { approvers: { roles: [ops] }, ttl: 25h }\n",
            "at most 24h",
        ),
    ] {
        let dir = write_config_with(
            "listen: 127.0.0.1:0\nupstreams: { app: { echo: {} } }\nroutes:\n  - { name: p, match: { path: /p }, upstream: app, policy: p }\n",
            &[(
                "policies/p.yaml",
                &format!("api_key: required\nsecond_factor: required\n{policy}"),
            )],
        );
        let (code, _, err) = run_cli(&["check", "-c", &path_str(&config_path(&dir))]);
        assert_eq!(code, 1, "{policy}");
        assert!(err.contains(needle), "{policy}: {err}");
    }
}

/// The whole approval in a real headless Chromium: the on-call engineer signs in on the
/// security page with their key, sees the bot's request and its shown fields (and not the
/// rest of the body), approves with their own code; the bot's repeat then passes once.
#[tokio::test]
async fn an_approver_approves_on_the_security_page_in_chromium() {
    use stepgate_testkit::browser::Browser;
    let s = setup().await;
    let t = &s.t;
    let bot = t.consumer("deploy-bot", &["ci"]).await;
    let oncall = t.consumer("oncall", &["ops"]).await;
    let e = t.enrol("oncall").await;
    let asked = post(t, "/deploy/web", BODY, &[("x-api-key", &bot.key)]).await;
    let id = asked.assert_problem(401, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let b = Browser::start(1024, 900).await;
    b.goto(&format!("http://{}/_stepgate/", t.addr())).await;
    b.until(
        "app.js to run",
        "return !document.getElementById('key-section').hidden;",
    )
    .await;
    b.type_into("#api-key", &oncall.key).await;
    b.click("#load").await;
    let shown = b
        .until(
            "the request waiting for approval",
            "const li = document.querySelector('#approval-list li');
             return !document.getElementById('approvals').hidden && li && li.textContent;",
        )
        .await;
    let shown = shown.as_str().unwrap().to_owned();
    for expected in [
        "POST /deploy/web",
        "deploy-bot",
        "version",
        "1.4.2",
        "env",
        "prod",
    ] {
        assert!(shown.contains(expected), "{expected} not in {shown}");
    }
    assert!(
        !shown.contains("s3cr3t"),
        "a field the policy does not show: {shown}"
    );
    b.click("#approval-list li button").await;
    b.until(
        "the decision form",
        "return !document.getElementById('approval-form').hidden;",
    )
    .await;
    b.type_into("#approval-otp", &totp_at(&e.secret, t.now()))
        .await;
    b.click("#approval-approve").await;
    let said = b
        .until(
            "the approval to be confirmed",
            "const m = document.getElementById('message');
             return m.dataset.kind === 'ok' && m.textContent.startsWith('Approved') && m.textContent;",
        )
        .await;
    assert!(said.as_str().unwrap().contains("once"), "{said}");
    b.until(
        "the list to empty",
        "return document.getElementById('approvals').hidden;",
    )
    .await;

    let r = repeat(t, "/deploy/web", &bot.key, &id).await;
    assert_eq!(r.status, 200, "{}", r.text());
    repeat(t, "/deploy/web", &bot.key, &id)
        .await
        .assert_problem(401, "approval_invalid");
}

/// On one node the requests live in the SQLite database: a restart loses neither a pending
/// request nor a granted approval, and a spent one stays spent.
#[tokio::test]
async fn requests_and_approvals_survive_a_restart() {
    let mut s = setup().await;
    let bot = s.t.consumer("deploy-bot", &["ci"]).await;
    let oncall = s.t.consumer("oncall", &["ops"]).await;
    let e = s.t.enrol("oncall").await;
    let id = post(&s.t, "/deploy/web", BODY, &[("x-api-key", &bot.key)])
        .await
        .json()["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.t.restart().await;
    let code = totp_at(&e.secret, s.t.now());
    let r = decide(&s.t, &id, "approve", &oncall.key, &code).await;
    assert_eq!(r.status, 200, "{}", r.text());
    s.t.restart().await;
    let r = repeat(&s.t, "/deploy/web", &bot.key, &id).await;
    assert_eq!(r.status, 200, "{}", r.text());
    s.t.restart().await;
    repeat(&s.t, "/deploy/web", &bot.key, &id)
        .await
        .assert_problem(401, "approval_invalid");
}

/// Under `rollout: { mode: report_only }` nobody is asked for an approval yet: the call is
/// forwarded and the refusal it would have met is audited.
#[tokio::test]
async fn report_only_asks_for_no_approval_and_audits_it() {
    let t = TwoFactor::start_custom(CustomConfig {
        template: "listen: 127.0.0.1:0\nadmin: { listen: \"127.0.0.1:0\" }\ndata_dir: \"${data_dir}\"\nupstreams:\n  app: { url: \"${app}\" }\nroutes:\n  - { name: deploy, match: { path: /deploy }, upstream: app, policy: trial }\n".into(),
        policies: vec![(
            "policies/trial.yaml".into(),
            format!("{DEPLOY}rollout: {{ mode: report_only }}\n"),
        )],
    })
    .await;
    let bot = t.consumer("deploy-bot", &["ci"]).await;
    let r = post(&t, "/deploy/web", BODY, &[("x-api-key", &bot.key)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(t.up.only_request().header("x-stepgate-auth"), Some("key"));
    assert!(
        t.audit("deploy-bot")
            .await
            .iter()
            .any(|e| e["kind"] == "would_refuse" && e["detail"]["code"] == "approval_required")
    );
}
