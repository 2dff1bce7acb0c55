//! Policies (issue 4): roles `only`/`except`, a grace period before and after its date (on the
//! injected clock), `report_only` rollout, and the validation of policy files (`stepgate
//! check` and `stepgate::config::load`), every error at `file:line`.
use stepgate_testkit::*;

const BOTH: &str = "totp recovery_code";

type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_only_and_except_refuse_with_403_forbidden() {
    let t = TwoFactor::start().await;
    let root = t.consumer("root", &["admin", "ops"]).await;
    let ops = t.consumer("ops", &["ops"]).await;
    let nobody = t.consumer("nobody", &[]).await;
    let temp = t.consumer("temp", &["ops", "contractor"]).await;
    let mut codes = Vec::new();
    for name in ["root", "ops", "nobody", "temp"] {
        let e = t.enrol(name).await;
        codes.push(e);
    }
    let code = |i: usize| totp_at(&codes[i].secret, t.now());

    // only: [admin]
    let r = t.call("/admins/x", &root.key, Some(&code(0))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (who, i) in [(&ops, 1), (&nobody, 2)] {
        // Refused before the second factor: with or without a (valid) code.
        r_forbidden(&t.call("/admins/x", &who.key, None).await);
        r_forbidden(&t.call("/admins/x", &who.key, Some(&code(i))).await);
    }
    // except: [contractor]
    r_forbidden(&t.call("/staff/x", &temp.key, Some(&code(3))).await);
    r_forbidden(&t.call("/staff/x", &temp.key, None).await);
    for (who, i) in [(&ops, 1), (&nobody, 2)] {
        let r = t.call("/staff/x", &who.key, None).await;
        assert_otp_refused(&r, "otp_required", BOTH);
        let r = t.call("/staff/x", &who.key, Some(&code(i))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(t.up.requests().len(), 3);

    // A role change applies to the next request.
    t.gw.ok(
        "PATCH",
        "/consumers/temp",
        Some(serde_json::json!({"roles": ["ops"]})),
        200,
    )
    .await;
    let r = t.call("/staff/x", &temp.key, Some(&code(3))).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

fn r_forbidden(r: &Resp) {
    r.assert_problem(403, "forbidden");
    assert_eq!(r.header("www-authenticate"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_lets_unenrolled_consumers_pass_with_a_warning_until_its_date() {
    let t = TwoFactor::start().await;
    let until = date_unix("2027-01-31");
    assert!(t.now() < until, "T0 is before the grace date");
    let late = t.consumer("late", &[]).await;

    let r = t.call("/grace/x", &late.key, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let warning = r.header("x-stepgate-warning").expect("X-Stepgate-Warning");
    assert!(
        warning.contains("2027-01-31") && warning.contains("/_stepgate/"),
        "{warning}"
    );
    let rec = t.last_upstream();
    assert_eq!(rec.header_all("x-stepgate-auth"), vec!["key"]);
    assert_eq!(rec.header("x-stepgate-warning"), None);
    assert_eq!(r.header("x-step-up-token"), None);
    // A pending (unconfirmed) enrolment is not an enrolment; a code does not matter.
    t.gw.ok(
        "POST",
        "/consumers/late/totp",
        Some(serde_json::json!({})),
        201,
    )
    .await;
    let r = t.call("/grace/x", &late.key, Some("123456")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-stepgate-warning").is_some());

    // The grace period is only for the unenrolled: an enrolled consumer needs its code.
    let ready = t.consumer("ready", &[]).await;
    let e = t.enrol("ready").await;
    let r = t.call("/grace/x", &ready.key, None).await;
    assert_otp_refused(&r, "otp_required", BOTH);
    let r = t
        .call("/grace/x", &ready.key, Some(&totp_at(&e.secret, t.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-stepgate-warning"), None);

    // The last second of the grace period, then its date.
    t.set(until - 1);
    assert_eq!(t.call("/grace/x", &late.key, None).await.status, 200);
    t.set(until);
    let r = t.call("/grace/x", &late.key, None).await;
    r.assert_problem(403, "enrollment_required");
    assert_eq!(r.header("x-stepgate-warning"), None);
    assert_eq!(t.up.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_only_forwards_what_it_would_refuse_and_audits_it() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let temp = t.consumer("temp", &["contractor"]).await;
    let late = t.consumer("late", &[]).await;

    // No code, a wrong code, a bad token, a forbidden role, no enrolment: all forwarded as `key`.
    let wrong = wrong_at(&e.secret, t.now());
    // (consumer, headers, the code it would have been refused with)
    let cases: Vec<Case> = vec![
        (
            "alice",
            vec![("x-api-key", alice.key.as_str())],
            "otp_required",
        ),
        (
            "alice",
            vec![("x-api-key", alice.key.as_str()), ("x-otp", wrong.as_str())],
            "otp_invalid",
        ),
        (
            "alice",
            vec![
                ("x-api-key", alice.key.as_str()),
                ("x-step-up-token", "sgt_nope"),
            ],
            "step_up_invalid",
        ),
        ("temp", vec![("x-api-key", temp.key.as_str())], "forbidden"),
        (
            "late",
            vec![("x-api-key", late.key.as_str())],
            "enrollment_required",
        ),
    ];
    for (name, headers, code) in &cases {
        let r = t.send("GET", "/report/x", headers).await;
        assert_eq!(r.status, 200, "{code}: {}", r.text());
        assert_eq!(r.header("x-step-up-token"), None);
        let rec = t.last_upstream();
        assert_eq!(rec.header_all("x-stepgate-auth"), vec!["key"], "{code}");
        assert_no_credentials(&rec);
        let events = t.audit(name).await;
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "would_refuse" && e["detail"]["code"] == *code),
            "no would_refuse {code} for {name}: {events:#?}"
        );
    }
    // Report-only refusals do not count as failures: many wrong codes, no ban.
    for _ in 0..10 {
        let r = t.call("/report/x", &alice.key, Some(&wrong)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // A good code is proved as usual.
    let r = t
        .call("/report/x", &alice.key, Some(&totp_at(&e.secret, t.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        t.last_upstream().header_all("x-stepgate-auth"),
        vec!["key+totp"]
    );
    // API-key failures are still refused.
    assert_key_refused(
        &t.call("/report/x", &unknown_key(7), None).await,
        "api_key_invalid",
    );
    assert_key_refused(&t.send("GET", "/report/x", &[]).await, "api_key_missing");
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

const GATEWAY: &str = r#"listen: 127.0.0.1:0
upstreams:
  demo: { echo: {} }
routes:
  - name: p
    match: { path: /p }
    upstream: demo
    policy: p
"#;

const GOOD_POLICY: &str = "api_key: required
second_factor: required
factors: [totp, recovery_code]
step_up: { ttl: 15m, scope: policy }
roles: { only: [], except: [] }
failures:
  per_consumer: { max: 5, window: 15m }
  per_ip: { max: 50, window: 15m }
  ban: 15m
rollout: { mode: enforce, grace_until: 2027-01-31 }
";

fn with_policy(policy: &str) -> tempfile::TempDir {
    write_config_with(GATEWAY, &[("policies/p.yaml", policy)])
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
        + 1
}

/// The policy is refused by `stepgate::config::load` and `stepgate check`, each with an error
/// at `p.yaml:LINE:` (LINE: where `at` is) mentioning every word of `words`.
fn assert_refused(policy: &str, at: &str, words: &[&str]) {
    let dir = with_policy(policy);
    let line = line_of(policy, at);
    let marker = format!("p.yaml:{line}:");
    let matches = |text: &str| {
        text.lines()
            .any(|l| l.contains(&marker) && words.iter().all(|w| l.to_lowercase().contains(w)))
    };
    let errors = match stepgate::config::load(&config_path(&dir)) {
        Ok(_) => panic!("loaded a broken policy:\n{policy}"),
        Err(e) => e.to_string(),
    };
    assert!(
        matches(&errors),
        "no {marker} error naming {words:?}:\n{errors}\n--- policy ---\n{policy}"
    );
    let (code, out, err) = run_cli(&["check", "-c", &path_str(&config_path(&dir))]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        matches(&err),
        "stepgate check: no {marker} error naming {words:?}:\n{err}"
    );
}

#[test]
fn the_full_policy_of_the_design_loads() {
    let dir = with_policy(GOOD_POLICY);
    let snapshot = stepgate::config::load(&config_path(&dir))
        .unwrap_or_else(|e| panic!("the reference policy is refused:\n{e}"));
    let p = &snapshot.policies["p"];
    assert_eq!(p.step_up.ttl.as_secs(), 900);
    assert_eq!(p.failures.per_consumer.max.get(), 5);
    assert_eq!(p.failures.ban.as_secs(), 900);
    assert_eq!(p.rollout.grace_until, Some(date_unix("2027-01-31")));
    let (code, out, err) = run_cli(&["check", "-c", &path_str(&config_path(&dir))]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    // The minimal form takes the defaults.
    let dir = with_policy("api_key: required\nsecond_factor: required\n");
    let snapshot = stepgate::config::load(&config_path(&dir)).unwrap();
    let p = &snapshot.policies["p"];
    assert!(p.factors.totp && p.factors.recovery_code);
    assert_eq!(p.step_up.ttl.as_secs(), 900);
    assert_eq!(p.failures.per_ip.max.get(), 50);
    assert_eq!(p.rollout.grace_until, None);
}

#[test]
fn a_second_factor_needs_an_api_key() {
    assert_refused(
        "api_key: off\nsecond_factor: required\n",
        "second_factor",
        &["second_factor", "api_key"],
    );
}

#[test]
fn unknown_factors_and_sms_are_refused() {
    let policy = "api_key: required\nsecond_factor: required\nfactors: [totp, sms]\n";
    assert_refused(policy, "factors", &["sms"]);
    let policy = "api_key: required\nsecond_factor: required\nfactors: [totp, email]\n";
    assert_refused(policy, "factors", &["email"]);
    let policy = "api_key: required\nsecond_factor: required\nfactors: []\n";
    assert_refused(policy, "factors", &["factors"]);
}

#[test]
fn failure_limits_over_the_nist_ceiling_are_refused() {
    // 200 per hour.
    let policy = "api_key: required
second_factor: required
failures:
  per_consumer: { max: 200, window: 1h }
";
    assert_refused(policy, "per_consumer", &["per_consumer", "100"]);
    // 10 per 5 minutes = 120 per hour.
    let policy = "api_key: required
second_factor: required
failures:
  per_consumer: { max: 10, window: 5m }
";
    assert_refused(policy, "per_consumer", &["per_consumer"]);
    // Exactly 100 per hour is allowed.
    let dir = with_policy(
        "api_key: required\nsecond_factor: required\nfailures: { per_consumer: { max: 25, window: 15m } }\n",
    );
    assert!(stepgate::config::load(&config_path(&dir)).is_ok());
}

#[test]
fn bad_rollout_grace_and_scope_are_refused_at_their_line() {
    let base = "api_key: required\nsecond_factor: required\n";
    assert_refused(
        &format!("{base}rollout: {{ mode: yolo }}\n"),
        "rollout",
        &["rollout.mode", "yolo"],
    );
    for bad in ["2027-02-30", "tomorrow", "31.01.2027"] {
        assert_refused(
            &format!("{base}step_up: {{ ttl: 5m }}\nrollout: {{ grace_until: {bad} }}\n"),
            "grace_until",
            &["grace_until"],
        );
    }
    assert_refused(
        &format!("{base}step_up: {{ ttl: 15m, scope: everywhere }}\n"),
        "scope",
        &["step_up.scope", "everywhere"],
    );
    assert_refused(&format!("{base}step_up: {{ ttl: 15 }}\n"), "ttl", &["ttl"]);
    assert_refused(&format!("{base}second_factor_typo: x\n"), "typo", &["typo"]);
}
