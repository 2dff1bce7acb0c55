//! The second factor end to end (issue 4), over real sockets, on a real SQLite file, with an
//! injected clock: codes come from `oathtool` for the clock's time, never from stepgate.
//! Required vs off policies, per-method routes, replay (also across a restart and under 20
//! concurrent uses), ±1 step of skew, malformed codes, recovery codes, the factors a policy
//! accepts, `WWW-Authenticate` challenges, what the upstream sees, audit events and failing
//! closed when the store cannot be written.
use stepgate_testkit::*;

use std::sync::Arc;

use serde_json::Value;

const BOTH: &str = "totp recovery_code";

/// Asserts the last upstream request: how the caller authenticated, who it is, and no
/// credential header.
fn assert_forwarded(t: &TwoFactor, auth: &str, who: &Consumer) -> Recorded {
    let rec = t.last_upstream();
    assert_eq!(rec.header_all("x-stepgate-auth"), vec![auth], "{rec:#?}");
    assert_eq!(rec.header_all("x-consumer-id"), vec![who.id.as_str()]);
    assert_eq!(rec.header_all("x-consumer-name"), vec![who.name.as_str()]);
    assert_no_credentials(&rec);
    rec
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_route_needs_key_and_code_an_off_route_only_its_key() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &["partner", "reader"]).await;
    let e = t.enrol("alice").await;

    // Second factor required: no key, then a key alone.
    let r = t.send("GET", "/2fa/x", &[]).await;
    assert_key_refused(&r, "api_key_missing");
    let r = t.call("/2fa/x", &unknown_key(1), None).await;
    assert_key_refused(&r, "api_key_invalid");
    let r = t.call("/2fa/x", &alice.key, None).await;
    assert_otp_refused(&r, "otp_required", BOTH);
    assert_eq!(t.up.arrived(), 0, "refusals never reach the upstream");

    // Key + code.
    let code = totp_at(&e.secret, t.now());
    let r = t.call("/2fa/orders?q=1", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "app");
    let rec = assert_forwarded(&t, "key+totp", &alice);
    assert_eq!(rec.header_all("x-consumer-roles"), vec!["partner,reader"]);
    assert_eq!(rec.path_and_query(), "/2fa/orders?q=1");

    // Second factor off: the key alone.
    let r = t.call("/keyed/x", &alice.key, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key", &alice);
    // Public: nothing.
    let r = t.send("GET", "/open/x", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(t.last_upstream().header("x-stepgate-auth"), None);

    // A consumer without a confirmed second factor (and no grace period): 403.
    let bob = t.consumer("bob", &[]).await;
    let r = t.call("/2fa/x", &bob.key, None).await;
    r.assert_problem(403, "enrollment_required");
    t.gw.ok(
        "POST",
        "/consumers/bob/totp",
        Some(serde_json::json!({})),
        201,
    )
    .await;
    let r = t.call("/2fa/x", &bob.key, Some("123456")).await;
    r.assert_problem(403, "enrollment_required");
    assert_eq!(t.up.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_method_routes_get_needs_the_key_post_the_key_and_a_code() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;

    let r = t
        .send("GET", "/secure/orders", &[("x-api-key", &alice.key)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key", &alice);
    assert_eq!(r.header("x-step-up-token"), None);

    let r = t
        .send("POST", "/secure/orders", &[("x-api-key", &alice.key)])
        .await;
    assert_otp_refused(&r, "otp_required", BOTH);

    // The fresh code sent on the key-only GET is ignored (not consumed) and stripped...
    let code = totp_at(&e.secret, t.now());
    let r = t
        .send(
            "GET",
            "/secure/orders",
            &[
                ("x-api-key", &alice.key),
                ("x-otp", &code),
                ("x-step-up-token", "sgt_forged"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key", &alice);
    assert_eq!(r.header("x-step-up-token"), None, "no token without a code");
    // ... so it still works on the POST, which needs it.
    let r = t
        .send(
            "POST",
            "/secure/orders",
            &[("x-api-key", &alice.key), ("x-otp", &code)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = assert_forwarded(&t, "key+totp", &alice);
    assert_eq!(rec.method, "POST");
    assert_eq!(t.up.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_otp_on_a_route_that_needs_none_is_ignored_and_stripped() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    t.enrol("alice").await;
    // Garbage, malformed and duplicated values do not matter where no second factor is needed.
    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        ("/keyed/x", vec![("x-otp", "not a code")]),
        ("/keyed/x", vec![("x-otp", "123456"), ("x-otp", "654321")]),
        (
            "/secure/x",
            vec![("x-step-up-token", "garbage"), ("x-otp", "1")],
        ),
        (
            "/open/x",
            vec![("x-otp", "123456"), ("x-step-up-token", "sgt_x")],
        ),
    ];
    for (path, extra) in cases {
        let mut headers = extra.clone();
        if path != "/open/x" {
            headers.push(("x-api-key", &alice.key));
        }
        let r = t.send("GET", path, &headers).await;
        assert_eq!(r.status, 200, "{path} {extra:?}: {}", r.text());
        let rec = t.last_upstream();
        assert_no_credentials(&rec);
        if path != "/open/x" {
            assert_eq!(rec.header("x-stepgate-auth"), Some("key"));
        }
    }
    assert_eq!(t.up.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_is_accepted_once_and_never_an_older_step() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let t1 = t.now();

    // The code used to confirm the enrolment (the previous step) is spent already.
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, t1 - 30)))
        .await;
    assert_otp_refused(&r, "otp_invalid", BOTH);

    let code = totp_at(&e.secret, t1);
    assert_eq!(t.call("/2fa/x", &alice.key, Some(&code)).await.status, 200);
    let r = t.call("/2fa/x", &alice.key, Some(&code)).await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    // Also on another route and policy, and later within the window.
    let r = t.call("/other/x", &alice.key, Some(&code)).await;
    assert_otp_refused(&r, "otp_invalid", BOTH);

    // A newer step accepted first (t2 + 30), then the older, unused step t2: refused.
    t.advance(30);
    let t2 = t.now();
    let newer = totp_at(&e.secret, t2 + 30);
    let older = totp_at(&e.secret, t2);
    assert_ne!(newer, older);
    assert_eq!(t.call("/2fa/x", &alice.key, Some(&newer)).await.status, 200);
    let r = t.call("/2fa/x", &alice.key, Some(&older)).await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    assert_eq!(t.up.requests().len(), 2);

    let events = t.audit("alice").await;
    assert_eq!(count(&events, "otp_accepted"), 2, "{events:#?}");
    assert_eq!(count(&events, "otp_replayed"), 4, "{events:#?}");
    assert_eq!(count(&events, "otp_rejected"), 0, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_protection_survives_a_restart() {
    let mut t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let code = totp_at(&e.secret, t.now());
    let r = t.call("/2fa/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-step-up-token").unwrap().to_string();

    t.restart().await;
    let r = t.call("/2fa/x", &alice.key, Some(&code)).await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    // The previous step too; and a restart forgets step-up tokens.
    let r = t
        .call(
            "/2fa/x",
            &alice.key,
            Some(&totp_at(&e.secret, t.now() - 30)),
        )
        .await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    assert_otp_refused(&r, "step_up_invalid", BOTH);
    // The next step works.
    let r = t
        .call(
            "/2fa/x",
            &alice.key,
            Some(&totp_at(&e.secret, t.now() + 30)),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(t.up.requests().len(), 2);
}

/// Sends `n` requests with `key` and `code` to `path` on `n` connections, all at once.
async fn concurrently(t: &TwoFactor, n: usize, path: &str, key: &str, code: &str) -> Vec<Resp> {
    // Connect all first, then send together.
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let request = req("GET", path, "api.example.com")
            .header("x-api-key", key)
            .header("x-otp", code)
            .body(empty())
            .unwrap();
        let (addr, barrier) = (t.addr(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            barrier.wait().await;
            read_resp(send_http1_on(stream, request).await.unwrap()).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// Exactly one 200; every other answer is 401 `otp_invalid`.
fn assert_one_success(answers: &[Resp]) {
    let ok = answers.iter().filter(|r| r.status == 200).count();
    for r in answers.iter().filter(|r| r.status != 200) {
        assert_otp_refused(r, "otp_invalid", BOTH);
    }
    assert_eq!(ok, 1, "successes among {} concurrent uses", answers.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_with_one_code_give_exactly_one_success() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    // `/burst` tolerates 25 failures per consumer, so the 19 refusals stay 401 (not a ban).
    let code = totp_at(&e.secret, t.now());
    let answers = concurrently(&t, 20, "/burst/x", &alice.key, &code).await;
    assert_one_success(&answers);
    assert_eq!(t.up.requests().len(), 1);
    let events = t.audit("alice").await;
    assert_eq!(count(&events, "otp_accepted"), 1);
    assert_eq!(count(&events, "otp_replayed"), 19);

    // The same for one recovery code. The first round's 19 failures may all have been counted
    // after its success reset the count, so clear it: the rounds are independent.
    t.gw.ok("POST", "/consumers/alice/unlock", None, 204).await;
    let answers = concurrently(&t, 20, "/burst/x", &alice.key, &e.recovery_codes[0]).await;
    assert_one_success(&answers);
    assert_eq!(t.up.requests().len(), 2);
    assert_eq!(t.gw.view("alice").await["recovery_codes_remaining"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_step_of_skew_is_accepted_two_are_not() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let start = t.now(); // step s1; s0 was used to confirm

    // +1 step (s2).
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, start + 30)))
        .await;
    assert_eq!(r.status, 200, "+30 s: {}", r.text());
    // -1 step: at s4, the code of s3 (fresh, after s2).
    t.set(start + 90);
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, start + 60)))
        .await;
    assert_eq!(r.status, 200, "-30 s: {}", r.text());
    // ±2 steps: at s10, the codes of s8 and s12, both fresh, are refused...
    t.set(start + 270);
    for offset in [-60i64, 60] {
        let at = t.now().checked_add_signed(offset).unwrap();
        let r = t
            .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, at)))
            .await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    // ... while the current code (s10) works.
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, t.now())))
        .await;
    assert_eq!(r.status, 200, "now: {}", r.text());
    let events = t.audit("alice").await;
    assert_eq!(count(&events, "otp_rejected"), 2, "{events:#?}");
    assert_eq!(count(&events, "otp_replayed"), 0, "{events:#?}");
    assert_eq!(t.up.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_codes_are_refused_and_burn_nothing() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let code = totp_at(&e.secret, t.now());

    // Wrong length (5, 7, 9 digits, built from the right code) and non-digits: 401.
    for bad in [
        code[..5].to_string(),
        format!("{code}0"),
        format!("{code}000"),
        format!("{}a", &code[..5]),
        format!("{code},{code}"),
    ] {
        let r = t.call("/2fa/x", &alice.key, Some(&bad)).await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    // A space or a tab inside, two headers, fullwidth digits: 400 (never one valid value).
    for sep in [" ", "\t"] {
        let spaced = format!("{}{sep}{}", &code[..3], &code[3..]);
        let r = t.call("/2fa/x", &alice.key, Some(&spaced)).await;
        r.assert_problem(400, "bad_request");
    }
    let r = t
        .send(
            "GET",
            "/2fa/x",
            &[
                ("x-api-key", &alice.key),
                ("x-otp", &code),
                ("x-otp", &code),
            ],
        )
        .await;
    r.assert_problem(400, "bad_request");
    let mut raw = format!(
        "GET /2fa/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\nX-Api-Key: {}\r\nX-OTP: ",
        alice.key
    )
    .into_bytes();
    let fullwidth: String = code
        .chars()
        .map(|c| char::from_u32(0xFF10 + c.to_digit(10).unwrap()).unwrap())
        .collect();
    raw.extend_from_slice(fullwidth.as_bytes());
    raw.extend_from_slice(b"\r\n\r\n");
    let r = raw_request(t.addr(), &raw).await.expect("a response");
    r.assert_problem(400, "bad_request");
    assert_eq!(t.up.arrived(), 0);

    // None of that spent the code.
    let r = t.call("/2fa/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eight_digit_sha256_enrolment_takes_its_own_codes_only() {
    let t = TwoFactor::start().await;
    let carol = t.consumer("carol", &[]).await;
    let e = t.enrol_with("carol", "SHA256", 8, 60).await;
    let code = totp_at_with(&e.secret, "SHA256", 8, 60, t.now());
    assert_eq!(code.len(), 8);
    // Its last six digits (what a 6-digit verifier would compute), seven digits, and the
    // default-parameter code of the same secret: all refused.
    for bad in [
        code[2..].to_string(),
        code[1..].to_string(),
        totp_at(&e.secret, t.now()),
    ] {
        let r = t.call("/2fa/x", &carol.key, Some(&bad)).await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    let r = t.call("/2fa/x", &carol.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key+totp", &carol);
    // ±1 step is one 60 s period here.
    let next = totp_at_with(&e.secret, "SHA256", 8, 60, t.now() + 60);
    assert_eq!(t.call("/2fa/x", &carol.key, Some(&next)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_codes_work_once_each_until_regenerated() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let codes = &e.recovery_codes;
    assert_eq!(codes.len(), 10);

    let r = t.call("/2fa/x", &alice.key, Some(&codes[0])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(is_step_up_token(r.header("x-step-up-token").unwrap_or("")));
    assert_forwarded(&t, "key+recovery_code", &alice);
    let r = t.call("/2fa/x", &alice.key, Some(&codes[0])).await;
    assert_otp_refused(&r, "otp_invalid", BOTH);

    // Case and dashes are ignored.
    let loud = codes[1].to_uppercase().replace('-', "");
    let r = t.call("/2fa/x", &alice.key, Some(&loud)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = t.call("/2fa/x", &alice.key, Some(&codes[1])).await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    assert_eq!(t.gw.view("alice").await["recovery_codes_remaining"], 8);

    let events = t.audit("alice").await;
    let used: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "recovery_code_used")
        .collect();
    assert_eq!(used.len(), 2, "{events:#?}");
    for event in used {
        assert_eq!(event["consumer_id"], alice.id.as_str());
        assert_eq!(event["key_prefix"], alice.prefix.as_str());
    }

    // A new set: the rest of the old one stops working.
    let fresh =
        t.gw.ok("POST", "/consumers/alice/recovery-codes", None, 201)
            .await;
    let fresh: Vec<String> = fresh["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let r = t.call("/2fa/x", &alice.key, Some(&codes[2])).await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    let r = t.call("/2fa/x", &alice.key, Some(&fresh[0])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(t.up.requests().len(), 3);
    // TOTP is unaffected.
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, t.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_accepts_only_its_factors_and_names_them_in_the_challenge() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let code = totp_at(&e.secret, t.now());

    let r = t.call("/totp-only/x", &alice.key, None).await;
    assert_otp_refused(&r, "otp_required", "totp");
    let r = t.call("/recovery-only/x", &alice.key, None).await;
    assert_otp_refused(&r, "otp_required", "recovery_code");

    // The wrong kind of code is refused, and not spent.
    let r = t
        .call("/totp-only/x", &alice.key, Some(&e.recovery_codes[0]))
        .await;
    assert_otp_refused(&r, "otp_invalid", "totp");
    let r = t.call("/recovery-only/x", &alice.key, Some(&code)).await;
    assert_otp_refused(&r, "otp_invalid", "recovery_code");
    assert_eq!(t.up.arrived(), 0);

    let r = t.call("/totp-only/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key+totp", &alice);
    let r = t
        .call("/recovery-only/x", &alice.key, Some(&e.recovery_codes[0]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key+recovery_code", &alice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_401_carries_its_challenge() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;

    assert_key_refused(&t.send("GET", "/2fa/x", &[]).await, "api_key_missing");
    assert_key_refused(
        &t.call("/2fa/x", "sgk_nonsense", Some("123456")).await,
        "api_key_invalid",
    );
    assert_otp_refused(
        &t.call("/2fa/x", &alice.key, None).await,
        "otp_required",
        BOTH,
    );
    assert_otp_refused(
        &t.call("/2fa/x", &alice.key, Some(&wrong_at(&e.secret, t.now())))
            .await,
        "otp_invalid",
        BOTH,
    );
    let unknown = format!("sgt_{}", "0".repeat(64));
    for token in [unknown.as_str(), "sgt_short", "nonsense"] {
        let r = t.call_token("/2fa/x", &alice.key, token).await;
        assert_otp_refused(&r, "step_up_invalid", BOTH);
    }
    let r = t.call_token("/totp-only/x", &alice.key, &unknown).await;
    assert_otp_refused(&r, "step_up_invalid", "totp");
    // A bad token with a good code falls back to the code.
    let r = t
        .send(
            "GET",
            "/2fa/x",
            &[
                ("x-api-key", &alice.key),
                ("x-step-up-token", &unknown),
                ("x-otp", &totp_at(&e.secret, t.now())),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key+totp", &alice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_the_identity_and_how_never_a_credential() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &["ops"]).await;
    let e = t.enrol("alice").await;
    let forged = [
        ("x-consumer-id", "c_forged"),
        ("x-consumer-name", "mallory"),
        ("x-consumer-roles", "admin"),
        ("x-stepgate-auth", "key+totp"),
    ];
    let code = totp_at(&e.secret, t.now());
    let mut headers = vec![("x-api-key", alice.key.as_str()), ("x-otp", code.as_str())];
    headers.extend(forged);
    let r = t.send("GET", "/2fa/x", &headers).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-step-up-token").unwrap().to_string();
    let rec = assert_forwarded(&t, "key+totp", &alice);
    assert_eq!(rec.header_all("x-consumer-roles"), vec!["ops"]);

    let mut headers = vec![
        ("x-api-key", alice.key.as_str()),
        ("x-step-up-token", token.as_str()),
    ];
    headers.extend(forged);
    let r = t.send("GET", "/2fa/x", &headers).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key+step_up", &alice);
    let r = t
        .call("/2fa/x", &alice.key, Some(&e.recovery_codes[3]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key+recovery_code", &alice);

    // No header value anywhere carries a secret.
    let secrets = [
        &alice.key[12..],
        &e.secret,
        &code,
        &token[4..],
        &e.recovery_codes[3],
    ];
    for rec in t.up.requests() {
        for (name, value) in &rec.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            for secret in secrets {
                assert!(!value.contains(secret), "{name}: {value}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_name_consumer_and_key_and_never_a_secret() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;

    let code = totp_at(&e.secret, t.now());
    let r = t.call("/2fa/x", &alice.key, Some(&code)).await; // otp_accepted, step_up_issued
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-step-up-token").unwrap().to_string();
    t.call("/2fa/x", &alice.key, Some(&code)).await; // otp_replayed
    let wrong = wrong_at(&e.secret, t.now());
    t.call("/2fa/x", &alice.key, Some(&wrong)).await; // otp_rejected
    let r = t
        .call("/2fa/x", &alice.key, Some(&e.recovery_codes[0]))
        .await; // recovery_code_used
    assert_eq!(r.status, 200, "{}", r.text());
    t.gw.ok("DELETE", "/consumers/alice/step-up-tokens", None, 204)
        .await; // step_up_revoked
    for _ in 0..6 {
        t.call("/2fa/x", &alice.key, Some(&wrong)).await; // ... ban_started
    }
    t.advance(900);
    let later = totp_at(&e.secret, t.now());
    let r = t.call("/2fa/x", &alice.key, Some(&later)).await; // ban_ended
    assert_eq!(r.status, 200, "{}", r.text());

    let events = t.audit("alice").await;
    for kind in [
        "otp_accepted",
        "otp_rejected",
        "otp_replayed",
        "recovery_code_used",
        "step_up_issued",
        "ban_started",
        "ban_ended",
    ] {
        let found: Vec<&Value> = events.iter().filter(|e| e["kind"] == kind).collect();
        assert!(!found.is_empty(), "no {kind} event in {events:#?}");
        for event in found {
            assert_eq!(event["consumer_id"], alice.id.as_str(), "{event}");
            assert_eq!(event["consumer"], "alice", "{event}");
            assert_eq!(event["key_prefix"], alice.prefix.as_str(), "{event}");
            assert!(is_rfc3339(event["at"].as_str().unwrap()), "{event}");
        }
    }
    let revoked: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "step_up_revoked")
        .collect();
    assert_eq!(revoked.len(), 1, "{events:#?}");
    assert_eq!(revoked[0]["consumer_id"], alice.id.as_str());
    let accepted: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "otp_accepted")
        .map(|e| e["detail"]["factor"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        accepted,
        vec!["totp", "recovery_code", "totp"],
        "newest first"
    );

    let text = serde_json::to_string(&t.audit_all().await).unwrap();
    for secret in [
        &alice.key[12..],
        &e.secret,
        &code,
        &wrong,
        &later,
        &token[4..],
        &e.recovery_codes[0],
        &e.recovery_codes[0].replace('-', ""),
        &t.gw.token,
    ] {
        assert!(
            !text.contains(secret),
            "the audit log shows {secret}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_fails_closed_with_503() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;

    // Another connection to the same SQLite file makes every write of a code fail.
    let db = rusqlite::Connection::open(t.db_path()).unwrap();
    db.execute_batch(
        "CREATE TRIGGER down_totp BEFORE UPDATE ON totp BEGIN SELECT RAISE(ABORT, 'down'); END;
         CREATE TRIGGER down_codes BEFORE UPDATE ON recovery_codes BEGIN SELECT RAISE(ABORT, 'down'); END;",
    )
    .unwrap();
    let code = totp_at(&e.secret, t.now());
    let r = t.call("/2fa/x", &alice.key, Some(&code)).await;
    r.assert_problem(503, "unavailable");
    let r = t
        .call("/2fa/x", &alice.key, Some(&e.recovery_codes[0]))
        .await;
    r.assert_problem(503, "unavailable");
    // Tokens live in memory and keep working; key-only routes need no store either.
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(t.call("/keyed/x", &alice.key, None).await.status, 200);

    // Back up: neither the code nor the recovery code was spent.
    db.execute_batch("DROP TRIGGER down_totp; DROP TRIGGER down_codes;")
        .unwrap();
    let r = t.call("/2fa/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = t
        .call("/2fa/x", &alice.key, Some(&e.recovery_codes[0]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_factor_works_the_same_over_http2() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let h2 = |headers: Vec<(&'static str, String)>| {
        let mut b = http::Request::builder()
            .method("GET")
            .uri(format!("http://{}/2fa/x", t.addr()));
        for (k, v) in headers {
            b = b.header(k, v);
        }
        send_h2c(t.addr(), b.body(empty()).unwrap())
    };
    let r = h2(vec![("x-api-key", alice.key.clone())]).await;
    assert_otp_refused(&r, "otp_required", BOTH);
    let code = totp_at(&e.secret, t.now());
    let r = h2(vec![
        ("x-api-key", alice.key.clone()),
        ("x-otp", code.clone()),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, http::Version::HTTP_2);
    let token = r.header("x-step-up-token").unwrap().to_string();
    assert_forwarded(&t, "key+totp", &alice);
    let r = h2(vec![
        ("x-api-key", alice.key.clone()),
        ("x-otp", code.clone()),
    ])
    .await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    let r = h2(vec![
        ("x-api-key", alice.key.clone()),
        ("x-step-up-token", token),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key+step_up", &alice);
    let r = h2(vec![
        ("x-api-key", alice.key.clone()),
        ("x-otp", code.clone()),
        ("x-otp", code),
    ])
    .await;
    r.assert_problem(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_consumers_code_is_never_consulted() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let bob = t.consumer("bob", &[]).await;
    let ea = t.enrol("alice").await;
    let eb = t.enrol("bob").await;
    let now = t.now();
    let bobs = totp_at(&eb.secret, now);
    let alices_window = [now - 30, now, now + 30].map(|at| totp_at(&ea.secret, at));
    if !alices_window.contains(&bobs) {
        let r = t.call("/2fa/x", &alice.key, Some(&bobs)).await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    let r = t
        .call("/2fa/x", &alice.key, Some(&eb.recovery_codes[0]))
        .await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    // Neither was spent for bob.
    let r = t.call("/2fa/x", &bob.key, Some(&bobs)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forwarded(&t, "key+totp", &bob);
    let r = t
        .call("/2fa/x", &bob.key, Some(&eb.recovery_codes[0]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
