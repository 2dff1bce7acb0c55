//! Step-up tokens that fit the action: a policy's `max_age` (how long ago the code behind a
//! token was presented, RFC 9470's `insufficient_user_authentication`), `X-Stepgate-Auth-Time`
//! to the upstream, tokens bound to the client's address (IPv4 /32 or a prefix, IPv6 /64), and
//! tokens good for a number of uses. Real gateway, real HTTP, the injected clock.
use stepgate_testkit::*;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
data_dir: "${data_dir}"
trusted_proxies: [127.0.0.9/32]
upstreams:
  app: { url: "${app}" }
routes:
  - { name: reads, match: { path: /reads }, upstream: app, policy: reads }
  - { name: payments, match: { path: /payments }, upstream: app, policy: payments }
  - { name: bound, match: { path: /bound }, upstream: app, policy: bound }
  - { name: wide, match: { path: /wide }, upstream: app, policy: wide }
  - { name: once, match: { path: /once }, upstream: app, policy: once }
  - { name: twice, match: { path: /twice }, upstream: app, policy: twice }
"#;

fn policies() -> Vec<(String, String)> {
    [
        ("reads", "step_up: { ttl: 15m, scope: global }"),
        (
            "payments",
            "step_up: { ttl: 15m, scope: global, max_age: 2m }",
        ),
        ("bound", "step_up: { ttl: 15m, bind: client_ip }"),
        (
            "wide",
            "step_up: { ttl: 15m, bind: client_ip, bind_prefix: { ipv4: 24, ipv6: 48 } }",
        ),
        ("once", "step_up: { ttl: 15m, uses: 1 }"),
        ("twice", "step_up: { ttl: 15m, uses: 2 }"),
    ]
    .iter()
    .map(|(name, step_up)| {
        (
            format!("policies/{name}.yaml"),
            format!("api_key: required\nsecond_factor: required\n{step_up}\n"),
        )
    })
    .collect()
}

async fn setup() -> TwoFactor {
    TwoFactor::start_custom(CustomConfig {
        template: CONFIG.to_owned(),
        policies: policies(),
    })
    .await
}

/// A token earned with a fresh code on `path`, from the local address `from` (the clock then
/// moves one period on).
async fn earn(
    t: &TwoFactor,
    from: &str,
    path: &str,
    key: &str,
    e: &Enrolled,
    headers: &[(&str, &str)],
) -> String {
    let code = totp_at(&e.secret, t.now());
    let mut all = vec![("x-api-key", key), ("x-otp", code.as_str())];
    all.extend_from_slice(headers);
    let r = t.send_from(from, "GET", path, &all).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-step-up-token").expect("a token").to_owned();
    t.advance(30);
    token
}

#[tokio::test]
async fn a_token_passes_a_policy_only_while_its_code_is_recent_enough() {
    let t = setup().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let earned_at = t.now();
    let token = earn(&t, "127.0.0.1", "/reads/x", &alice.key, &e, &[]).await;
    let with_token = [
        ("x-api-key", alice.key.as_str()),
        ("x-step-up-token", &token),
    ];

    // 30 s after the code: the reads and the payments both take it; the upstream learns when
    // the code was presented.
    let r = t.send("GET", "/payments/1", &with_token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = t.up.requests().pop().unwrap();
    assert_eq!(
        seen.header("x-stepgate-auth-time"),
        Some(date_rfc3339(earned_at).as_str())
    );
    assert_eq!(seen.header("x-stepgate-auth"), Some("key+step_up"));

    // At exactly max_age (120 s) it still passes; one second later the payments ask again.
    t.set(earned_at + 120);
    assert_eq!(t.send("GET", "/payments/1", &with_token).await.status, 200);
    t.set(earned_at + 121);
    let r = t.send("GET", "/payments/1", &with_token).await;
    let problem = r.assert_problem(401, "step_up_too_old");
    assert!(
        problem["detail"].as_str().unwrap().contains("120 seconds"),
        "{problem}"
    );
    let challenge = r.header("www-authenticate").unwrap();
    assert!(
        challenge.starts_with(
            r#"OTP realm="stepgate", error="insufficient_user_authentication", max_age=120"#
        ),
        "{challenge}"
    );
    // ...while the reads, without max_age, still take the same token.
    assert_eq!(t.send("GET", "/reads/x", &with_token).await.status, 200);

    // A stale token is not a failed attempt: many of them start no ban.
    for _ in 0..10 {
        t.send("GET", "/payments/1", &with_token)
            .await
            .assert_problem(401, "step_up_too_old");
    }
    // With a code beside it, the code decides: a new token, and a new auth time.
    let now = t.now();
    let code = totp_at(&e.secret, now);
    let r = t
        .send(
            "POST",
            "/payments/1",
            &[
                ("x-api-key", &alice.key),
                ("x-step-up-token", &token),
                ("x-otp", &code),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = t.up.requests().pop().unwrap();
    assert_eq!(seen.header("x-stepgate-auth"), Some("key+totp"));
    assert_eq!(
        seen.header("x-stepgate-auth-time"),
        Some(date_rfc3339(now).as_str())
    );
    // A client cannot send its own.
    let r = t
        .send(
            "GET",
            "/reads/x",
            &[
                ("x-api-key", &alice.key),
                ("x-stepgate-auth-time", "2000-01-01T00:00:00Z"),
                ("x-step-up-token", &token),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        t.up.requests()
            .pop()
            .unwrap()
            .header("x-stepgate-auth-time"),
        Some(date_rfc3339(earned_at).as_str())
    );
}

#[tokio::test]
async fn a_bound_token_works_only_from_where_it_was_earned() {
    let t = setup().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;

    // IPv4, /32: from 127.0.0.2 only.
    let code = totp_at(&e.secret, t.now());
    let r = t
        .send_from(
            "127.0.0.2",
            "GET",
            "/bound/x",
            &[("x-api-key", &alice.key), ("x-otp", &code)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-step-up-token").unwrap().to_owned();
    t.advance(30);
    let with_token = [
        ("x-api-key", alice.key.as_str()),
        ("x-step-up-token", &token),
    ];
    assert_eq!(
        t.send_from("127.0.0.2", "GET", "/bound/x", &with_token)
            .await
            .status,
        200
    );
    t.send_from("127.0.0.3", "GET", "/bound/x", &with_token)
        .await
        .assert_problem(401, "step_up_invalid");
    let events = t.audit("alice").await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "step_up_rejected" && e["detail"]["reason"] == "other_address"),
        "{events:?}"
    );

    // IPv6 through a trusted proxy: the same /64 passes, another /64 does not.
    let token = earn(
        &t,
        "127.0.0.9",
        "/bound/x",
        &alice.key,
        &e,
        &[("x-forwarded-for", "2001:db8:1:2::10")],
    )
    .await;
    let with = |ip: &'static str| {
        let token = token.clone();
        let key = alice.key.clone();
        let t = &t;
        async move {
            t.send_from(
                "127.0.0.9",
                "GET",
                "/bound/x",
                &[
                    ("x-api-key", &key),
                    ("x-step-up-token", &token),
                    ("x-forwarded-for", ip),
                ],
            )
            .await
        }
    };
    assert_eq!(with("2001:db8:1:2::10").await.status, 200);
    assert_eq!(with("2001:db8:1:2:ffff::1").await.status, 200, "same /64");
    with("2001:db8:1:3::10")
        .await
        .assert_problem(401, "step_up_invalid");
    with("192.0.2.7")
        .await
        .assert_problem(401, "step_up_invalid");

    // A configured prefix: /24 for IPv4.
    let token = earn(
        &t,
        "127.0.0.9",
        "/wide/x",
        &alice.key,
        &e,
        &[("x-forwarded-for", "198.51.100.20")],
    )
    .await;
    for (ip, status) in [
        ("198.51.100.20", 200),
        ("198.51.100.99", 200),
        ("198.51.101.20", 401),
    ] {
        let r = t
            .send_from(
                "127.0.0.9",
                "GET",
                "/wide/x",
                &[
                    ("x-api-key", &alice.key),
                    ("x-step-up-token", &token),
                    ("x-forwarded-for", ip),
                ],
            )
            .await;
        assert_eq!(r.status, status, "{ip}: {}", r.text());
    }
}

#[tokio::test]
async fn a_counted_token_works_that_many_times_and_its_misuse_counts() {
    let t = setup().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;

    let once = earn(&t, "127.0.0.1", "/once/x", &alice.key, &e, &[]).await;
    let call = |path: &'static str, token: String| {
        let key = alice.key.clone();
        let t = &t;
        async move {
            t.send(
                "POST",
                path,
                &[("x-api-key", &key), ("x-step-up-token", &token)],
            )
            .await
        }
    };
    assert_eq!(call("/once/x", once.clone()).await.status, 200, "one use");
    call("/once/x", once.clone())
        .await
        .assert_problem(401, "step_up_invalid");

    let twice = earn(&t, "127.0.0.1", "/twice/x", &alice.key, &e, &[]).await;
    assert_eq!(call("/twice/x", twice.clone()).await.status, 200);
    assert_eq!(call("/twice/x", twice.clone()).await.status, 200);
    call("/twice/x", twice.clone())
        .await
        .assert_problem(401, "step_up_invalid");
    let events = t.audit("alice").await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "step_up_rejected" && e["detail"]["reason"] == "used_up"),
        "{events:?}"
    );
    // A used-up token is a failed attempt like any invalid one: the default budget is five
    // per policy, and this was the first on `twice`.
    for _ in 0..4 {
        call("/twice/x", twice.clone())
            .await
            .assert_problem(401, "step_up_invalid");
    }
    call("/twice/x", twice.clone())
        .await
        .assert_problem(429, "too_many_attempts");
}

#[test]
fn the_rules_are_checked_at_load() {
    for (step_up, needle) in [
        ("step_up: { bind: client_port }", "client_ip"),
        (
            "step_up: { bind: client_ip, bind_prefix: { ipv4: 40 } }",
            "between /8 and /32",
        ),
        (
            "step_up: { bind_prefix: { ipv6: 64 } }",
            "with `bind: client_ip` only",
        ),
        ("step_up: { uses: 0 }", "at least 1"),
        ("step_up: { max_age: 0s }", "greater than 0"),
        ("step_up: { max_age: soon }", "max_age"),
    ] {
        let dir = write_config_with(
            "listen: 127.0.0.1:0\nupstreams: { app: { echo: {} } }\nroutes:\n  - { name: p, match: { path: /p }, upstream: app, policy: p }\n",
            &[(
                "policies/p.yaml",
                &format!("api_key: required\nsecond_factor: required\n{step_up}\n"),
            )],
        );
        let (code, _, err) = run_cli(&["check", "-c", &path_str(&config_path(&dir))]);
        assert_eq!(code, 1, "{step_up}");
        assert!(err.contains(needle), "{step_up}: {err}");
    }
}
