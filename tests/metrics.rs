//! `/metrics` end to end (issue 5): scraped from the admin listener without a token, parsed as
//! Prometheus text, and its counters moving by exactly what the requests did: requests by route
//! and status (404s with `route=""`), latency histograms, upstream errors by kind, second-factor
//! outcomes, step-up tokens, bans. No label carries a path, key, code or token.

use std::collections::BTreeSet;
use std::sync::Arc;

use stepgate_testkit::ops;
use stepgate_testkit::ops::{OpsGw, Scrape};
use stepgate_testkit::*;

const CONFIG: &str = r#"listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
upstreams:
  app: { url: "${app}" }
  dead: { url: "${dead}" }
  hole: { url: "${hole}", timeout: 300ms }
routes:
  - { name: open, match: { path: /open }, upstream: app, policy: public }
  - { name: dead, match: { path: /dead }, upstream: dead, policy: public }
  - { name: hole, match: { path: /hole }, upstream: hole, policy: public }
  - { name: keyed, match: { path: /keyed }, upstream: app, policy: key-only }
  - { name: twofa, match: { path: /2fa }, upstream: app, policy: two-factor }
"#;

const ROUTES: &[&str] = &["", "open", "dead", "hole", "keyed", "twofa"];
const UPSTREAMS: &[&str] = &["app", "dead", "hole"];

/// 2027-01-15T08:00:00Z, a multiple of 30 s.
const T0: u64 = 1_800_000_000;

struct Setup {
    g: OpsGw,
    app: Upstream,
    _hole: BlackHole,
    clock: Arc<stepgate::clock::ManualClock>,
}

impl Setup {
    async fn start() -> Setup {
        let app = Upstream::named("app").await;
        let hole = BlackHole::start().await;
        let dead = format!("http://{}", closed_port_addr().await);
        let clock = Arc::new(stepgate::clock::ManualClock::new(T0));
        let dir = write_config_with(
            &render(
                CONFIG,
                &[("app", &app.url()), ("dead", &dead), ("hole", &hole.url())],
            ),
            &[
                ("policies/public.yaml", DEFAULT_POLICY),
                ("policies/key-only.yaml", API_KEY_POLICY),
                (
                    "policies/two-factor.yaml",
                    "api_key: required\nsecond_factor: required\n",
                ),
            ],
        );
        let g = GatewayBuilder::in_dir(dir)
            .clock(clock.clone())
            .start_ops()
            .await;
        Setup {
            g,
            app,
            _hole: hole,
            clock,
        }
    }

    fn now(&self) -> u64 {
        use stepgate::clock::Clock;
        self.clock.now()
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        get_with(self.g.addr(), path, headers).await
    }

    /// Creates a consumer; returns its API key.
    async fn consumer(&self, name: &str) -> String {
        let created = self.g.gw.add_consumer(name, &[]).await;
        created["api_key"].as_str().unwrap().to_string()
    }
}

/// `after - before` of one series (absent = 0).
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.counter(name, labels) - before.counter(name, labels)
}

/// Every label of every sample comes from a small closed set; every name is ours.
fn assert_labels_bounded(s: &Scrape) {
    let closed: &[(&str, &[&str])] = &[
        ("route", ROUTES),
        ("upstream", UPSTREAMS),
        ("kind", &["connect", "timeout", "reset", "body_too_large"]),
        (
            "factor",
            &["totp", "recovery_code", "step_up", "code", "none"],
        ),
        (
            "outcome",
            &[
                "accepted",
                "rejected",
                "replayed",
                "missing",
                "not_enrolled",
                "grace",
                "would_refuse",
            ],
        ),
        ("subject", &["consumer", "ip"]),
        ("result", &["ok", "error"]),
    ];
    assert!(!s.samples.is_empty(), "no samples:\n{}", s.text);
    for sample in &s.samples {
        assert!(
            sample.name.starts_with("stepgate_"),
            "a metric without the stepgate_ prefix: {sample:?}"
        );
        for (key, value) in &sample.labels {
            match key.as_str() {
                "status" => assert!(
                    value.len() == 3 && value.bytes().all(|b| b.is_ascii_digit()),
                    "status label {value:?} in {sample:?}"
                ),
                "le" => assert!(
                    value == "+Inf" || value.parse::<f64>().is_ok(),
                    "le label {value:?} in {sample:?}"
                ),
                other => {
                    let allowed = closed
                        .iter()
                        .find(|(k, _)| *k == other)
                        .unwrap_or_else(|| panic!("unexpected label {other:?} in {sample:?}"))
                        .1;
                    assert!(
                        allowed.contains(&value.as_str()),
                        "label {other}={value:?} is not one of {allowed:?}: {sample:?}"
                    );
                }
            }
        }
    }
}

/// No secret and no request path anywhere in the text; no code in any label value.
fn assert_nothing_leaks(s: &Scrape, secrets: &[&str], paths: &[&str], codes: &[&str]) {
    for needle in secrets.iter().chain(paths) {
        assert!(
            needle.len() >= 8,
            "test bug: {needle:?} is too short to search for"
        );
        assert!(
            !s.text.contains(needle),
            "/metrics contains {needle:?}:\n{}",
            s.text
        );
    }
    // Codes are 6 digits: a float such as a latency sum may contain any 6 digits by chance,
    // so these are looked for in the names and label values only.
    for sample in &s.samples {
        for code in codes {
            assert!(
                !sample.name.contains(code) && !sample.labels.values().any(|v| v.contains(code)),
                "a code in {sample:?}"
            );
        }
    }
}

/// Histogram consistency: buckets cumulative and `+Inf` equal to `_count`.
fn assert_histogram(s: &Scrape, name: &str, label: (&str, &str)) {
    let mut buckets: Vec<(f64, f64)> = s
        .all(&format!("{name}_bucket"))
        .into_iter()
        .filter(|b| b.labels.get(label.0).map(String::as_str) == Some(label.1))
        .map(|b| {
            let le = &b.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, b.value)
        })
        .collect();
    assert!(
        buckets.len() >= 2,
        "{name}{label:?} has no buckets:\n{}",
        s.text
    );
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    for pair in buckets.windows(2) {
        assert!(
            pair[0].1 <= pair[1].1,
            "{name}{label:?} buckets not cumulative: {buckets:?}"
        );
    }
    let count = s.must(&format!("{name}_count"), &[label]);
    assert_eq!(
        buckets.last().unwrap(),
        &(f64::INFINITY, count),
        "{name}{label:?}"
    );
}

/// `stepgate_step_up_tokens_live` reaches `expected` (it is documented as approximate, so it
/// gets a bounded time to catch up; the scrape itself is the only activity meanwhile).
async fn assert_live_tokens(g: &OpsGw, expected: f64) {
    let mut last = None;
    let found = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        loop {
            let scrape = g.scrape().await;
            let live = scrape.must("stepgate_step_up_tokens_live", &[]);
            if live == expected {
                return;
            }
            last = Some(live);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "stepgate_step_up_tokens_live stayed at {last:?}, expected {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_counters_move_by_exactly_the_requests_sent() {
    let s = Setup::start().await;
    // Scraping needs no token; a wrong one is not asked for either.
    let r = admin_call(s.g.admin(), None, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    let before = s.g.scrape().await;
    assert_labels_bounded(&before);

    let mut paths = Vec::new();
    for i in 0..7 {
        let path = format!("/open/orders-7f3a9c-{i}?q=zz-query-{i}");
        let r = s.get(&path, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        paths.push(format!("orders-7f3a9c-{i}"));
        paths.push(format!("zz-query-{i}"));
    }
    for i in 0..3 {
        let path = format!("/nowhere-b81d2e-{i}");
        s.get(&path, &[]).await.assert_problem(404, "no_route");
        paths.push(format!("nowhere-b81d2e-{i}"));
    }
    for _ in 0..2 {
        assert_key_refused(&s.get("/keyed/secret-doc-55", &[]).await, "api_key_missing");
    }
    paths.push("secret-doc-55".into());
    let after = s.g.scrape().await;

    let requests = "stepgate_requests_total";
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[("route", "open"), ("status", "200")]
        ),
        7.0,
        "{}",
        after.text
    );
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[("route", ""), ("status", "404")]
        ),
        3.0,
        "{}",
        after.text
    );
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[("route", "keyed"), ("status", "401")]
        ),
        2.0,
        "{}",
        after.text
    );
    let total = |s: &Scrape| s.all(requests).iter().map(|x| x.value).sum::<f64>();
    assert_eq!(
        total(&after) - total(&before),
        12.0,
        "requests counted beyond those sent"
    );

    let duration = "stepgate_request_duration_seconds";
    assert_eq!(
        delta(
            &before,
            &after,
            &format!("{duration}_count"),
            &[("route", "open")]
        ),
        7.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            &format!("{duration}_count"),
            &[("route", "")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            &format!("{duration}_count"),
            &[("route", "keyed")]
        ),
        2.0
    );
    assert!(
        delta(
            &before,
            &after,
            &format!("{duration}_sum"),
            &[("route", "open")]
        ) > 0.0
    );
    assert_histogram(&after, duration, ("route", "open"));
    assert_histogram(&after, duration, ("route", ""));
    let upstream = "stepgate_upstream_duration_seconds";
    assert_eq!(
        delta(
            &before,
            &after,
            &format!("{upstream}_count"),
            &[("upstream", "app")]
        ),
        7.0,
        "only the forwarded requests reach the upstream"
    );
    assert_histogram(&after, upstream, ("upstream", "app"));
    assert_eq!(s.app.requests().len(), 7);

    assert_labels_bounded(&after);
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert_nothing_leaks(&after, &[&s.g.gw.token], &paths, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_counted_by_upstream_and_kind() {
    let s = Setup::start().await;
    let before = s.g.scrape().await;
    for _ in 0..3 {
        s.get("/dead/x", &[])
            .await
            .assert_problem(502, "upstream_unavailable");
    }
    for _ in 0..2 {
        s.get("/hole/x", &[])
            .await
            .assert_problem(504, "upstream_timeout");
    }
    let after = s.g.scrape().await;
    let errors = "stepgate_upstream_errors_total";
    assert_eq!(
        delta(
            &before,
            &after,
            errors,
            &[("upstream", "dead"), ("kind", "connect")]
        ),
        3.0,
        "{}",
        after.text
    );
    assert_eq!(
        delta(
            &before,
            &after,
            errors,
            &[("upstream", "hole"), ("kind", "timeout")]
        ),
        2.0,
        "{}",
        after.text
    );
    let all = |s: &Scrape| s.all(errors).iter().map(|x| x.value).sum::<f64>();
    assert_eq!(all(&after) - all(&before), 5.0, "{}", after.text);
    let requests = "stepgate_requests_total";
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[("route", "dead"), ("status", "502")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[("route", "hole"), ("status", "504")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "stepgate_upstream_duration_seconds_count",
            &[("upstream", "dead")]
        ),
        3.0
    );
    assert_labels_bounded(&after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_factor_step_up_and_ban_metrics_move_and_leak_nothing() {
    let s = Setup::start().await;
    let alice = s.consumer("alice").await;
    let bob = s.consumer("bob").await;
    let carol = s.consumer("carol").await;
    let (alice_secret, alice_recovery) = ops::enrol_totp(&s.g.gw, "alice", s.now()).await;
    let (carol_secret, carol_recovery) = ops::enrol_totp(&s.g.gw, "carol", s.now()).await;
    s.clock.advance(30);
    let mut codes: Vec<String> = Vec::new();
    let mut tokens: Vec<String> = Vec::new();
    let factor = |s: &Scrape, f: &str, o: &str| {
        s.counter(
            "stepgate_second_factor_total",
            &[("factor", f), ("outcome", o)],
        )
    };
    let issued = |s: &Scrape| s.must("stepgate_step_up_tokens_issued_total", &[]);

    // No code: otp_required, counted as none/missing.
    let s0 = s.g.scrape().await;
    let r = s.get("/2fa/a", &[("x-api-key", &alice)]).await;
    r.assert_problem(401, "otp_required");
    let s1 = s.g.scrape().await;
    assert_eq!(
        factor(&s1, "none", "missing") - factor(&s0, "none", "missing"),
        1.0,
        "{}",
        s1.text
    );

    // Not enrolled: none/not_enrolled.
    s.get("/2fa/b", &[("x-api-key", &bob)])
        .await
        .assert_problem(403, "enrollment_required");
    let s2 = s.g.scrape().await;
    assert_eq!(
        factor(&s2, "none", "not_enrolled") - factor(&s1, "none", "not_enrolled"),
        1.0
    );

    // A good code: totp/accepted and one step-up token issued and live.
    let code = totp_at(&alice_secret, s.now());
    codes.push(code.clone());
    let r = s
        .get("/2fa/c", &[("x-api-key", &alice), ("x-otp", &code)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r
        .header("x-step-up-token")
        .expect("a step-up token")
        .to_string();
    tokens.push(token.clone());
    let s3 = s.g.scrape().await;
    assert_eq!(
        factor(&s3, "totp", "accepted") - factor(&s2, "totp", "accepted"),
        1.0
    );
    assert_eq!(issued(&s3) - issued(&s2), 1.0, "{}", s3.text);

    // The token: step_up/accepted, no new token.
    let r = s
        .get(
            "/2fa/d",
            &[("x-api-key", &alice), ("x-step-up-token", &token)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s4 = s.g.scrape().await;
    assert_eq!(
        factor(&s4, "step_up", "accepted") - factor(&s3, "step_up", "accepted"),
        1.0
    );
    assert_eq!(issued(&s4), issued(&s3));

    // A forged token: step_up/rejected. The code again: totp/replayed.
    let forged = format!("sgt_{}", "0f".repeat(32));
    let r = s
        .get(
            "/2fa/e",
            &[("x-api-key", &alice), ("x-step-up-token", &forged)],
        )
        .await;
    r.assert_problem(401, "step_up_invalid");
    let r = s
        .get("/2fa/f", &[("x-api-key", &alice), ("x-otp", &code)])
        .await;
    r.assert_problem(401, "otp_invalid");
    let s5 = s.g.scrape().await;
    assert_eq!(
        factor(&s5, "step_up", "rejected") - factor(&s4, "step_up", "rejected"),
        1.0,
        "{}",
        s5.text
    );
    assert_eq!(
        factor(&s5, "totp", "replayed") - factor(&s4, "totp", "replayed"),
        1.0,
        "{}",
        s5.text
    );

    // A recovery code (carol): recovery_code/accepted and another token.
    let r = s
        .get(
            "/2fa/g",
            &[("x-api-key", &carol), ("x-otp", &carol_recovery[0])],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokens.push(r.header("x-step-up-token").expect("a token").to_string());
    let s6 = s.g.scrape().await;
    assert_eq!(
        factor(&s6, "recovery_code", "accepted") - factor(&s5, "recovery_code", "accepted"),
        1.0
    );
    assert_eq!(issued(&s6) - issued(&s5), 1.0);

    // Wrong codes until alice is banned: each one is a rejected code; one ban started.
    assert_eq!(s6.must("stepgate_bans_active", &[]), 0.0);
    let wrong = wrong_at(&alice_secret, s.now());
    codes.push(wrong.clone());
    let mut sent = 0;
    let banned = loop {
        assert!(sent < 10, "no ban after {sent} wrong codes");
        let r = s
            .get("/2fa/h", &[("x-api-key", &alice), ("x-otp", &wrong)])
            .await;
        sent += 1;
        match r.status.as_u16() {
            401 => {
                r.assert_problem(401, "otp_invalid");
            }
            429 => break r,
            other => panic!("wrong code answered {other}: {}", r.text()),
        }
    };
    banned.assert_problem(429, "too_many_attempts");
    let s7 = s.g.scrape().await;
    assert_eq!(
        factor(&s7, "code", "rejected") - factor(&s6, "code", "rejected"),
        f64::from(sent),
        "{}",
        s7.text
    );
    let bans =
        |s: &Scrape, subject| s.counter("stepgate_bans_started_total", &[("subject", subject)]);
    assert_eq!(
        bans(&s7, "consumer") - bans(&s6, "consumer"),
        1.0,
        "{}",
        s7.text
    );
    assert_eq!(bans(&s7, "ip"), bans(&s6, "ip"));
    assert_eq!(s7.must("stepgate_bans_active", &[]), 1.0);
    // Refused while banned: no further ban, no code checked.
    let r = s
        .get("/2fa/i", &[("x-api-key", &alice), ("x-otp", &wrong)])
        .await;
    r.assert_problem(429, "too_many_attempts");
    let s8 = s.g.scrape().await;
    assert_eq!(bans(&s8, "consumer"), bans(&s7, "consumer"));
    assert_eq!(
        factor(&s8, "code", "rejected"),
        factor(&s7, "code", "rejected")
    );

    // Unknown keys from one address until that address is banned: subject="ip".
    let mut unknown = Vec::new();
    let mut n = 0u64;
    loop {
        assert!(n < 100, "no IP ban after {n} unknown keys");
        let key = format!(
            "sgk_{n:064x}{:08x}",
            n.wrapping_mul(2_654_435_761) & 0xffff_ffff
        );
        let r = ops::get_from("127.0.0.2", s.g.addr(), "/keyed/k", &[("x-api-key", &key)]).await;
        unknown.push(key);
        n += 1;
        if r.status == 429 {
            break;
        }
        assert_key_refused(&r, "api_key_invalid");
    }
    let s9 = s.g.scrape().await;
    assert_eq!(bans(&s9, "ip") - bans(&s8, "ip"), 1.0, "{}", s9.text);
    assert_eq!(s9.must("stepgate_bans_active", &[]), 2.0);

    // The whole text: bounded labels, no secret, no path.
    assert_labels_bounded(&s9);
    let mut secrets: Vec<&str> = vec![
        &alice,
        &bob,
        &carol,
        &alice_secret,
        &carol_secret,
        &forged,
        &s.g.gw.token,
    ];
    secrets.extend(tokens.iter().map(String::as_str));
    secrets.extend(alice_recovery.iter().map(String::as_str));
    secrets.extend(carol_recovery.iter().map(String::as_str));
    secrets.extend(unknown.iter().map(String::as_str));
    // Key prefixes too (`sgk_` + 8 hex): they name a consumer's key.
    let prefixes: Vec<String> = [&alice, &bob, &carol]
        .iter()
        .map(|k| k[..12].to_string())
        .collect();
    secrets.extend(prefixes.iter().map(String::as_str));
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    assert_nothing_leaks(&s9, &secrets, &[], &codes);
    for name in ["alice", "bob", "carol"] {
        assert!(
            !s9.text.contains(name),
            "a consumer name in /metrics:\n{}",
            s9.text
        );
    }
    let names: BTreeSet<&str> = s9.samples.iter().map(|x| x.name.as_str()).collect();
    for expected in [
        "stepgate_requests_total",
        "stepgate_second_factor_total",
        "stepgate_bans_started_total",
        "stepgate_bans_active",
        "stepgate_step_up_tokens_issued_total",
        "stepgate_step_up_tokens_live",
        "stepgate_config_last_reload_success",
    ] {
        assert!(names.contains(expected), "no {expected}:\n{}", s9.text);
    }
    assert!(s.app.requests().len() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_up_tokens_live_counts_the_tokens_held() {
    let s = Setup::start().await;
    let alice = s.consumer("alice").await;
    let carol = s.consumer("carol").await;
    let (alice_secret, _) = ops::enrol_totp(&s.g.gw, "alice", s.now()).await;
    let (carol_secret, _) = ops::enrol_totp(&s.g.gw, "carol", s.now()).await;
    s.clock.advance(30);
    assert_eq!(
        s.g.scrape().await.must("stepgate_step_up_tokens_live", &[]),
        0.0
    );

    let code = totp_at(&alice_secret, s.now());
    let r = s
        .get("/2fa/a", &[("x-api-key", &alice), ("x-otp", &code)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-step-up-token").is_some());
    assert_live_tokens(&s.g, 1.0).await;

    let code = totp_at(&carol_secret, s.now());
    let r = s
        .get("/2fa/c", &[("x-api-key", &carol), ("x-otp", &code)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_live_tokens(&s.g, 2.0).await;

    // An operator revokes alice's tokens: one is left.
    s.g.gw
        .ok("DELETE", "/consumers/alice/step-up-tokens", None, 204)
        .await;
    assert_live_tokens(&s.g, 1.0).await;
}
