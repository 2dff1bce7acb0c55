//! Self-service (issue 7) over real sockets: the security page and its headers, the status
//! object, TOTP enrolment and re-enrolment (an abandoned one keeps the old secret working),
//! recovery-code regeneration, `X-OTP` required to change an existing factor, wrong codes
//! counted by the failure limiter until 429, ambiguous input refused, a disabled or moved
//! prefix. Contract: `.notes/selfservice-contract.md`.
use stepgate_testkit::self_service::*;
use stepgate_testkit::*;

use serde_json::{Value, json};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn assert_security_headers(r: &Resp) {
    assert_eq!(
        r.header("content-security-policy"),
        Some(CSP),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
}

fn asset(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/assets/security/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_every_answer_under_the_prefix_carry_the_security_headers() {
    let s = Ss::start().await;
    for (path, content_type, file) in [
        ("/", "text/html", "index.html"),
        // RFC 9239: text/javascript is the JavaScript media type (the contract's
        // application/javascript is obsolete; both satisfy nosniff).
        ("/app.js", "text/javascript", "app.js"),
        ("/app.css", "text/css", "app.css"),
    ] {
        let r = s.raw("GET", &s.p(path), &[], None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(
            r.header("content-type").unwrap().starts_with(content_type),
            "{path}: {:?}",
            r.header("content-type")
        );
        // The page under the default title; the files as embedded.
        let want = asset(file).replace("{{title}}", "stepgate");
        assert_eq!(r.text(), want, "{path} is the embedded asset");
        assert_security_headers(&r);
    }
    let r = s.raw("GET", &s.prefix, &[], None).await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("/_stepgate/"));
    assert_security_headers(&r);

    // API answers and refusals of every layer under the prefix, too.
    let alice = s.consumer("alice", &[]).await;
    let r = s.api("GET", "/2fa", &alice.key, None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_security_headers(&r);
    let r = s.raw("GET", &s.p("/2fa"), &[], None).await;
    r.assert_problem(401, "api_key_missing");
    assert_security_headers(&r);
    let r = s.raw("GET", &s.p("/nothing-here"), &[], None).await;
    r.assert_problem(404, "no_route");
    assert_security_headers(&r);
    let r = s
        .raw(
            "POST",
            &s.p("/step-up?policy=totp"),
            &[("x-api-key", &alice.key)],
            None,
        )
        .await;
    r.assert_problem(403, "enrollment_required");
    assert_security_headers(&r);
    let r = s.raw("GET", "/%5Fstepgate/", &[], None).await;
    assert_eq!(r.status, 200, "an encoded prefix is the prefix");
    assert_security_headers(&r);
    // Not elsewhere.
    let r = s.call("/keyed/x", &alice.key, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-security-policy"), None);
    // Nothing under the prefix reaches an upstream.
    assert_eq!(s.up.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_factors_and_the_policies_that_ask_for_one() {
    let s = Ss::start().await;
    let root = s.consumer("root", &["admin"]).await;
    let status = s.status(&root.key).await;
    assert_eq!(status["consumer"], "root");
    assert_eq!(status["enrolled"], false);
    assert_eq!(status["factors"]["totp"]["status"], "none");
    assert_eq!(status["factors"]["sms"]["status"], "none");
    assert_eq!(status["factors"]["recovery_codes"]["remaining"], 0);
    assert_eq!(status["sms_available"], true);
    let policies: Vec<&Value> = status["policies"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = policies
        .iter()
        .map(|p| p["policy"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["admins", "any", "grace", "sms", "totp", "totp-only"],
        "{status}"
    );
    let grace = policies.iter().find(|p| p["policy"] == "grace").unwrap();
    assert_eq!(grace["status"], "grace");
    assert_eq!(grace["grace_until"], "2027-01-31T00:00:00Z");
    assert_eq!(grace["factors"], json!(["totp", "recovery_code"]));
    let totp = policies.iter().find(|p| p["policy"] == "totp").unwrap();
    assert_eq!(totp["status"], "required");
    assert_eq!(totp["grace_until"], Value::Null);
    let any = policies.iter().find(|p| p["policy"] == "any").unwrap();
    assert_eq!(any["factors"], json!(["totp", "recovery_code", "sms"]));

    s.enrol_totp(&root.key, None).await;
    let status = s.status(&root.key).await;
    assert_eq!(status["enrolled"], true);
    assert_eq!(
        status["factors"]["totp"],
        json!({"status": "confirmed", "digits": 6, "period": 30, "algorithm": "SHA1", "reenrolment_pending": false})
    );
    assert_eq!(status["factors"]["recovery_codes"]["remaining"], 10);
    for p in status["policies"].as_array().unwrap() {
        let want = if p["policy"] == "sms" {
            "required"
        } else {
            "enrolled"
        };
        assert_eq!(p["status"], want, "{p}");
    }
    // Without a key, or with an unknown one: the key layer's answers.
    let r = s
        .raw("GET", &s.p("/2fa"), &[("x-api-key", &unknown_key(3))], None)
        .await;
    assert_key_refused(&r, "api_key_invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_enrolment_then_a_reenrolment_needs_a_code_and_an_abandoned_one_locks_no_one_out() {
    let mut s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;

    // First enrolment: no factor yet, so no code needed; pending until confirmed.
    let r = s
        .api(
            "POST",
            "/2fa/totp",
            &alice.key,
            None,
            Some(json!({"digits": 8, "period": 60, "algorithm": "SHA256"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let e = r.json();
    let first = e["secret"].as_str().unwrap().to_string();
    assert!(e["otpauth_uri"].as_str().unwrap().contains("digits=8"));
    assert!(e["qr_svg"].as_str().unwrap().contains("<svg"));
    let status = s.status(&alice.key).await;
    assert_eq!(status["factors"]["totp"]["status"], "pending");
    assert_eq!(status["factors"]["totp"]["digits"], 8);
    // Confirm: missing, wrong, then the new app's code.
    let r = s.confirm_totp(&alice.key, None).await;
    r.assert_problem(401, "otp_required");
    let r = s.confirm_totp(&alice.key, Some("12345678")).await;
    r.assert_problem(401, "otp_invalid");
    let code = totp_at_with(&first, "SHA256", 8, 60, s.now());
    let r = s.confirm_totp(&alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let old_recovery = strings(&r.json()["recovery_codes"]);
    assert_eq!(old_recovery.len(), 10);
    s.advance(60);
    let code = totp_at_with(&first, "SHA256", 8, 60, s.now());
    let r = s.call("/totp/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A re-enrolment changes an existing factor: X-OTP, checked like a route's.
    let r = s.api("POST", "/2fa/totp", &alice.key, None, None).await;
    assert_otp_refused(&r, "otp_required", "totp recovery_code");
    let r = s
        .api("POST", "/2fa/totp", &alice.key, Some(&code), None)
        .await;
    assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
    s.advance(60);
    let code = totp_at_with(&first, "SHA256", 8, 60, s.now());
    let r = s
        .api("POST", "/2fa/totp", &alice.key, Some(&code), None)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let second = r.json()["secret"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    let status = s.status(&alice.key).await;
    assert_eq!(status["factors"]["totp"]["status"], "confirmed", "{status}");
    assert_eq!(status["factors"]["totp"]["reenrolment_pending"], true);

    // Abandoned (and across a restart): the confirmed secret keeps working, the new one not.
    s.t.restart().await;
    s.advance(60);
    let r = s
        .call("/totp/x", &alice.key, Some(&totp_at(&second, s.now())))
        .await;
    assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
    let code = totp_at_with(&first, "SHA256", 8, 60, s.now());
    let r = s.call("/totp/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-step-up-token").unwrap().to_string();
    assert_eq!(
        s.call_token("/totp/x", &alice.key, &token).await.status,
        200
    );
    assert_eq!(
        s.gw.view("alice").await["totp"]["reenrolment_pending"],
        true
    );

    // Confirmed: the new secret replaces the old, with a new set of recovery codes; tokens
    // earned with the old secret go.
    let r = s
        .confirm_totp(&alice.key, Some(&totp_at(&second, s.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let new_recovery = strings(&r.json()["recovery_codes"]);
    s.advance(60);
    let r = s
        .call(
            "/totp/x",
            &alice.key,
            Some(&totp_at_with(&first, "SHA256", 8, 60, s.now())),
        )
        .await;
    assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
    let r = s
        .call("/totp/x", &alice.key, Some(&totp_at(&second, s.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.call("/totp/x", &alice.key, Some(&old_recovery[0])).await;
    assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
    let r = s.call("/totp/x", &alice.key, Some(&new_recovery[0])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.call_token("/totp/x", &alice.key, &token).await;
    assert_otp_refused(&r, "step_up_invalid", "totp recovery_code");
    let status = s.status(&alice.key).await;
    assert_eq!(status["factors"]["totp"]["digits"], 6, "{status}");
    assert_eq!(status["factors"]["totp"]["reenrolment_pending"], false);
    let events = s.audit("alice").await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "step_up_revoked" && e["detail"]["reason"] == "totp_replaced")
    );
    // Each start records what proved it (newest first): the old app's code, the key alone.
    let proved: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "totp_enrolment_started")
        .map(|e| &e["detail"]["proved_with"])
        .collect();
    assert_eq!(proved, [&json!("totp"), &json!("key_only")], "{events:#?}");
    // Nothing to confirm any more.
    let r = s.confirm_totp(&alice.key, Some("123456")).await;
    r.assert_problem(409, "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerating_recovery_codes_needs_a_confirmed_factor_and_its_code() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    let r = s
        .api("POST", "/2fa/recovery-codes", &alice.key, None, None)
        .await;
    r.assert_problem(409, "conflict");
    let e = s.enrol_totp(&alice.key, None).await;
    let r = s
        .api("POST", "/2fa/recovery-codes", &alice.key, None, None)
        .await;
    assert_otp_refused(&r, "otp_required", "totp recovery_code");
    // A recovery code is a code of an existing factor too.
    let r = s
        .api(
            "POST",
            "/2fa/recovery-codes",
            &alice.key,
            Some(&e.recovery_codes[9]),
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let fresh = strings(&r.json()["recovery_codes"]);
    assert_eq!(fresh.len(), 10);
    for old in &e.recovery_codes[..9] {
        assert!(!fresh.contains(old));
    }
    // (Three of them: five failures would start a ban.)
    for old in &e.recovery_codes[..3] {
        let r = s.call("/totp/x", &alice.key, Some(old)).await;
        assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
    }
    let r = s.call("/totp/x", &alice.key, Some(&fresh[0])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.status(&alice.key).await["factors"]["recovery_codes"]["remaining"],
        9
    );
    let events = s.audit("alice").await;
    // Newest first: the oldest acceptance is the self-service one.
    let used = events
        .iter()
        .rfind(|e| e["kind"] == "otp_accepted")
        .unwrap();
    assert_eq!(used["detail"]["factor"], "recovery_code", "{used}");
    assert_eq!(used["detail"]["policy"], "stepgate/self-service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_codes_on_self_service_calls_count_until_429_then_even_a_right_one_waits() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    let e = s.enrol_totp(&alice.key, None).await;
    let wrong = wrong_at(&e.secret, s.now());
    // The built-in policy allows 5 failures per consumer in 15 minutes.
    for i in 0..5 {
        let r = s
            .api(
                "POST",
                "/2fa/recovery-codes",
                &alice.key,
                Some(&wrong),
                None,
            )
            .await;
        assert_eq!(r.status, 401, "attempt {i}: {}", r.text());
    }
    let r = s
        .api("POST", "/2fa/totp", &alice.key, Some(&wrong), None)
        .await;
    assert_banned(&r, 900);
    assert_security_headers(&r);
    // Banned: a correct code, here or on a route, waits too.
    let right = totp_at(&e.secret, s.now());
    let r = s
        .api(
            "POST",
            "/2fa/recovery-codes",
            &alice.key,
            Some(&right),
            None,
        )
        .await;
    assert_banned(&r, 900);
    let r = s.call("/totp/x", &alice.key, Some(&right)).await;
    assert_banned(&r, 900);
    s.advance(900);
    let right = totp_at(&e.secret, s.now());
    let r = s.call("/totp/x", &alice.key, Some(&right)).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Wrong confirmation codes count as well.
    let bob = s.consumer("bob", &[]).await;
    let r = s.api("POST", "/2fa/totp", &bob.key, None, None).await;
    let secret = r.json()["secret"].as_str().unwrap().to_string();
    let wrong = wrong_at(&secret, s.now());
    for _ in 0..5 {
        let r = s.confirm_totp(&bob.key, Some(&wrong)).await;
        r.assert_problem(401, "otp_invalid");
    }
    let r = s.confirm_totp(&bob.key, Some(&wrong)).await;
    assert_banned(&r, 900);
    assert_eq!(
        s.audit("bob")
            .await
            .iter()
            .filter(|e| e["kind"] == "ban_started")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_input_is_refused_with_400() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    let key = alice.key.as_str();
    let ss = &s;
    let post =
        |rest: &'static str, headers: Vec<(&'static str, &'static str)>, body: &'static str| {
            let mut h: Vec<(&str, &str)> = vec![("x-api-key", key)];
            h.extend(headers);
            let path = ss.p(rest);
            async move {
                let mut b = req("POST", &path, "api.example.com");
                for (k, v) in h {
                    b = b.header(k, v);
                }
                send_http1(ss.addr(), b.body(full(body)).unwrap()).await
            }
        };
    let json_type = ("content-type", "application/json");
    let mut refused = 0;
    for (rest, headers, body) in [
        ("/2fa/totp", vec![json_type], "{not json"),
        (
            "/2fa/totp",
            vec![json_type],
            r#"{"digits": 6, "colour": "red"}"#,
        ),
        (
            "/2fa/totp",
            vec![json_type],
            r#"{"digits": 6, "digits": 8}"#,
        ),
        ("/2fa/totp", vec![json_type], r#"{"digits": 9}"#),
        ("/2fa/totp", vec![json_type], "[]"),
        (
            "/2fa/totp",
            vec![("content-type", "text/plain")],
            r#"{"digits": 6}"#,
        ),
        (
            "/2fa/totp",
            vec![json_type, ("x-otp", "123456"), ("x-otp", "654321")],
            "",
        ),
        ("/2fa/sms", vec![json_type], r#"{"phone": "07700 900123"}"#),
        (
            "/2fa/sms",
            vec![json_type],
            r#"{"phone": "+44 7700 900123"}"#,
        ),
        (
            "/2fa/sms",
            vec![json_type],
            r#"{"phone": "+0447700900123"}"#,
        ),
        (
            "/2fa/sms",
            vec![json_type],
            r#"{"phone": "+447700900123", "phone": "+447700900124"}"#,
        ),
        ("/2fa/sms", vec![json_type], ""),
        ("/sms/send", vec![json_type], r#"{"to": "+447700900123"}"#),
        ("/2fa/totp", vec![("x-api-key", "sgk_second")], ""),
    ] {
        let r = post(rest, headers, body).await;
        r.assert_problem(400, "bad_request");
        assert_security_headers(&r);
        assert!(
            s.twilio.arrived().is_empty(),
            "{rest} {body}: nothing was texted"
        );
        refused += 1;
    }
    // None of that created an enrolment or counted as a failure: more bad requests than the
    // built-in policy's 5 failures were refused, and a call through the same failure limiter
    // is still answered (no 429) and no ban started.
    assert!(refused > 5, "{refused}");
    let status = s.status(key).await;
    assert_eq!(status["factors"]["totp"]["status"], "none", "{status}");
    assert_eq!(status["factors"]["sms"]["status"], "none");
    let r = s.api("POST", "/2fa/totp", key, None, None).await;
    assert_eq!(r.status, 201, "{}", r.text());

    // With a factor, a malformed change carrying a wrong code is a 400 before the code is
    // looked at: neither counted nor spent, however many there are.
    let bob = s.consumer("bob", &[]).await;
    let e = s.enrol_totp(&bob.key, None).await;
    let wrong = wrong_at(&e.secret, s.now());
    for _ in 0..8 {
        let r = s
            .raw(
                "POST",
                &s.p("/2fa/totp"),
                &[("x-api-key", &bob.key), ("x-otp", &wrong)],
                Some(r#"{"digits": 9}"#.into()),
            )
            .await;
        r.assert_problem(400, "bad_request");
    }
    let r = s
        .api(
            "POST",
            "/2fa/recovery-codes",
            &bob.key,
            Some(&totp_at(&e.secret, s.now())),
            None,
        )
        .await;
    assert_eq!(r.status, 201, "not banned: {}", r.text());
    let events = s.audit_all().await;
    assert!(
        !events.iter().any(|e| e["kind"] == "ban_started"),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_self_service_is_404_but_step_up_stays() {
    let s = Ss::start_with(Options {
        self_service: "self_service: { enabled: false }".into(),
        ..Options::default()
    })
    .await;
    let alice = s.consumer("alice", &[]).await;
    for path in ["/", "/app.js", "/2fa", ""] {
        let r = s
            .raw("GET", &s.p(path), &[("x-api-key", &alice.key)], None)
            .await;
        r.assert_problem(404, "no_route");
        assert_security_headers(&r);
    }
    let r = s.api("POST", "/2fa/totp", &alice.key, None, None).await;
    r.assert_problem(404, "no_route");
    // The grace warning no longer points at a page.
    let r = s.call("/grace/x", &alice.key, None).await;
    assert_eq!(r.status, 200);
    let warning = r.header("x-stepgate-warning").unwrap();
    assert!(
        warning.contains("2027-01-31") && !warning.contains("/_stepgate"),
        "{warning}"
    );
    // Nor does the refusal once grace is over.
    let r = s.call("/totp/x", &alice.key, None).await;
    let problem = r.assert_problem(403, "enrollment_required");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .ends_with("ask your operator to enrol you"),
        "{problem}"
    );
    // Step-up is not enrolment: it stays.
    s.t.enrol("alice").await;
    let e = s.gw.view("alice").await;
    assert_eq!(e["totp"]["status"], "confirmed");
    let r = s
        .api("POST", "/step-up?policy=totp", &alice.key, None, None)
        .await;
    r.assert_problem(401, "otp_required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_prefix_moves_the_page_the_api_step_up_and_the_warning() {
    let s = Ss::start_with(Options {
        self_service: "self_service: { prefix: /account/security }".into(),
        ..Options::default()
    })
    .await;
    assert_eq!(s.prefix, "/account/security");
    let alice = s.consumer("alice", &[]).await;
    let r = s.raw("GET", "/account/security/", &[], None).await;
    assert_eq!(r.status, 200);
    assert_security_headers(&r);
    let r = s.raw("GET", "/account/security", &[], None).await;
    assert_eq!(r.header("location"), Some("/account/security/"));
    for old in ["/_stepgate/", "/_stepgate/2fa", "/_stepgate/step-up"] {
        let r = s.raw("GET", old, &[("x-api-key", &alice.key)], None).await;
        r.assert_problem(404, "no_route");
        assert_eq!(
            r.header("content-security-policy"),
            None,
            "{old} is not ours now"
        );
    }
    let e = s.enrol_totp(&alice.key, None).await;
    let code = totp_at(&e.secret, s.now());
    let r = s
        .raw(
            "POST",
            "/account/security/step-up?policy=totp",
            &[("x-api-key", &alice.key), ("x-otp", &code)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(is_step_up_token(r.json()["token"].as_str().unwrap()));
    let bob = s.consumer("bob", &[]).await;
    let r = s.call("/grace/x", &bob.key, None).await;
    let warning = r.header("x-stepgate-warning").unwrap();
    assert!(
        warning.ends_with("enrol at /account/security/"),
        "{warning}"
    );
}

#[test]
fn routes_under_the_prefix_and_bad_prefixes_are_refused_at_their_line() {
    let check = |yaml: &str, needle: &str, words: &[&str]| {
        let dir = write_config_with(yaml, &[("policies/public.yaml", DEFAULT_POLICY)]);
        let line = yaml
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap();
        let errors = stepgate::config::load(&config_path(&dir))
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{yaml}"))
            .to_string();
        let marker = format!("gateway.yaml:{line}:");
        assert!(
            errors
                .lines()
                .any(|l| l.contains(&marker) && words.iter().all(|w| l.contains(w))),
            "no {marker} error with {words:?}:\n{errors}"
        );
    };
    let base = "listen: 127.0.0.1:0\nupstreams: { demo: { echo: {} } }\n";
    check(
        &format!(
            "{base}self_service: {{ prefix: /me }}\nroutes:\n  - {{ name: x, match: {{ path: /me/x }}, upstream: demo, policy: public }}\n"
        ),
        "/me/x",
        &["reserved", "/me"],
    );
    check(
        &format!(
            "{base}routes:\n  - {{ name: x, match: {{ path: /_stepgate }}, upstream: demo, policy: public }}\n"
        ),
        "path: /_stepgate",
        &["reserved"],
    );
    for bad in ["/", "me", "/a/../b", "/a//b"] {
        check(
            &format!("{base}self_service:\n  prefix: \"{bad}\"\nroutes: []\n"),
            "prefix:",
            &["self_service.prefix"],
        );
    }
    // With the prefix moved, /_stepgate is an ordinary path again.
    let dir = write_config_with(
        &format!(
            "{base}self_service: {{ prefix: /me }}\nroutes:\n  - {{ name: x, match: {{ path: /_stepgate/x }}, upstream: demo, policy: public }}\n"
        ),
        &[("policies/public.yaml", DEFAULT_POLICY)],
    );
    assert!(stepgate::config::load(&config_path(&dir)).is_ok());
}

#[test]
fn explain_says_the_gateway_answers_under_the_prefix_itself() {
    let dir = write_config_with(
        "listen: 127.0.0.1:0\nupstreams: { demo: { echo: {} } }\nroutes:\n  - { name: all, match: { path: / }, upstream: demo, policy: public }\n",
        &[("policies/public.yaml", DEFAULT_POLICY)],
    );
    let config = path_str(&config_path(&dir));
    let (code, out, err) = run_cli(&["explain", "GET", "/_stepgate/2fa", "-c", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("enrolment API") && out.contains("nothing is forwarded"),
        "{out}"
    );
    let (code, out, _) = run_cli(&["explain", "GET", "/_stepgate/", "-c", &config]);
    assert_eq!(code, 0);
    assert!(out.contains("security page"), "{out}");
    // Everything else still goes to the catch-all route.
    let (code, out, _) = run_cli(&["explain", "GET", "/x", "-c", &config]);
    assert_eq!(code, 0);
    assert!(out.contains("route:     all"), "{out}");
}

/// Review C1: an enrolment started with only the API key while the consumer had no factor
/// (so no code could be asked for) must not be confirmable once the owner has confirmed one.
/// Otherwise whoever once saw the key plants a secret early, waits, and later confirms it
/// with their own code: new recovery codes, the owner's old ones dead, the owner's phone
/// removable with the planted app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_totp_enrolment_planted_before_any_factor_dies_when_the_owner_confirms_one() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    // Someone with alice's key only starts TOTP and keeps the secret.
    let r = s.api("POST", "/2fa/totp", &alice.key, None, None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let planted = r.json()["secret"].as_str().unwrap().to_string();
    // alice, on the page, enrols SMS and keeps her recovery codes.
    let confirmed = s.enrol_sms(&alice.key, None, PHONE).await;
    let recovery = strings(&confirmed["recovery_codes"]);

    // Her confirmation dropped the planted enrolment, in the same transaction.
    let status = s.status(&alice.key).await;
    assert_eq!(status["factors"]["totp"]["status"], "none", "{status}");
    let r = s
        .confirm_totp(&alice.key, Some(&totp_at(&planted, s.now())))
        .await;
    r.assert_problem(409, "conflict");
    // Still gone after a restart (the store dropped it, not only the index).
    let mut s = s;
    s.t.restart().await;
    let r = s
        .confirm_totp(&alice.key, Some(&totp_at(&planted, s.now())))
        .await;
    r.assert_problem(409, "conflict");
    // alice's recovery codes and number are untouched.
    let r = s.call("/any/x", &alice.key, Some(&recovery[0])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.gw.view("alice").await["sms"]["phone"], PHONE_MASKED);
    let events = s.audit("alice").await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "enrolment_dropped" && e["detail"]["factor"] == "totp"),
        "{events:#?}"
    );
}

/// Review C1: a pending TOTP enrolment lives 15 minutes (on the gateway's clock), so an
/// abandoned one cannot be picked up much later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_totp_enrolment_expires_after_15_minutes() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    let r = s.api("POST", "/2fa/totp", &alice.key, None, None).await;
    let secret = r.json()["secret"].as_str().unwrap().to_string();
    s.advance(15 * 60 - 1);
    assert_eq!(
        s.status(&alice.key).await["factors"]["totp"]["status"],
        "pending"
    );
    // Expired, it is shown as absent everywhere before anyone tries to confirm it: the page,
    // the admin view and the enrolment report would otherwise offer a dead confirmation.
    s.advance(1);
    assert_eq!(
        s.status(&alice.key).await["factors"]["totp"]["status"],
        "none"
    );
    assert_eq!(s.gw.view("alice").await["totp"], Value::Null);
    let report = s.gw.ok("GET", "/reports/enrollment", None, 200).await;
    assert!(
        report["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["pending"] == json!([])),
        "{report:#}"
    );
    let r = s
        .confirm_totp(&alice.key, Some(&totp_at(&secret, s.now())))
        .await;
    let problem = r.assert_problem(409, "conflict");
    assert!(
        problem["detail"].as_str().unwrap().contains("expired"),
        "{problem}"
    );
    assert_eq!(
        s.status(&alice.key).await["factors"]["totp"]["status"],
        "none"
    );
    // Within the lifetime it confirms as usual.
    let r = s.api("POST", "/2fa/totp", &alice.key, None, None).await;
    let secret = r.json()["secret"].as_str().unwrap().to_string();
    s.advance(14 * 60);
    let r = s
        .confirm_totp(&alice.key, Some(&totp_at(&secret, s.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Review minor 1: each policy on the status object says whether it is enforced or only
/// reported, so the page can say that a `report_only` policy lets calls through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_gives_each_policys_rollout_mode() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let r = get_keyed(t.addr(), "/_stepgate/2fa", &alice.key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let status = r.json();
    let mode = |name: &str| {
        status["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["policy"] == name)
            .unwrap_or_else(|| panic!("{name} in {status}"))["mode"]
            .clone()
    };
    assert_eq!(mode("report"), "report_only", "{status}");
    assert_eq!(mode("two-factor"), "enforce", "{status}");
    assert_eq!(mode("grace"), "enforce", "{status}");
}

/// A JSON body over the 16 KiB limit of the self-service API is 413, before anything is
/// parsed, texted or counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_over_16_kib_is_413() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    let big = format!("{{\"phone\":\"+44{}\"}}", "1".repeat(20_000));
    let r = s
        .raw(
            "POST",
            &s.p("/2fa/sms"),
            &[("x-api-key", &alice.key)],
            Some(big),
        )
        .await;
    r.assert_problem(413, "too_large");
    assert_security_headers(&r);
    assert!(s.twilio.arrived().is_empty());
    assert_eq!(
        s.status(&alice.key).await["factors"]["sms"]["status"],
        "none"
    );
}

/// One code sent at once to a self-service change and to a protected route is accepted by
/// exactly one of them (the store's compare-and-set decides), for a TOTP code and for a
/// recovery code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_code_on_a_self_service_call_and_a_protected_route_is_accepted_once() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    let e = s.enrol_totp(&alice.key, None).await;
    for round in 0..3 {
        let code = totp_at(&e.secret, s.now());
        let (change, route) = tokio::join!(
            s.api("POST", "/2fa/recovery-codes", &alice.key, Some(&code), None),
            s.call("/totp/x", &alice.key, Some(&code)),
        );
        let wins = [change.status == 201, route.status == 200];
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {round}: {} {} / {} {}",
            change.status,
            change.text(),
            route.status,
            route.text()
        );
        for r in [&change, &route] {
            if r.status != 200 && r.status != 201 {
                r.assert_problem(401, "otp_invalid");
            }
        }
        s.advance(30);
    }
    // A recovery code, on an SMS enrolment (which spends it only after the text went out).
    let code = totp_at(&e.secret, s.now());
    let fresh = strings(
        &s.api("POST", "/2fa/recovery-codes", &alice.key, Some(&code), None)
            .await
            .json()["recovery_codes"],
    );
    let (change, route) = tokio::join!(
        s.start_sms(&alice.key, Some(&fresh[0]), PHONE),
        s.call("/totp/x", &alice.key, Some(&fresh[0])),
    );
    let wins = [change.status == 202, route.status == 200];
    assert_eq!(
        wins.iter().filter(|w| **w).count(),
        1,
        "{} {} / {} {}",
        change.status,
        change.text(),
        route.status,
        route.text()
    );
    assert_eq!(
        s.status(&alice.key).await["factors"]["recovery_codes"]["remaining"],
        9
    );
}
