//! Step-up tokens end to end (issue 4), with an injected clock: issued after a code with its
//! expiry, accepted alone within the TTL (absolute, no sliding), refused after it, with another
//! consumer's key, outside its scope, and after each kind of revocation.
use stepgate_testkit::*;

const BOTH: &str = "totp recovery_code";

/// A code on `path` earns a token; returns it.
async fn earn(t: &TwoFactor, path: &str, key: &str, e: &Enrolled) -> String {
    t.advance(30);
    let r = t.call(path, key, Some(&totp_at(&e.secret, t.now()))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r
        .header("x-step-up-token")
        .unwrap_or_else(|| panic!("no X-Step-Up-Token: {:?}", r.headers))
        .to_string();
    assert!(is_step_up_token(&token), "token shape: {token}");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_earns_a_token_that_works_alone_until_it_expires() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;

    let issued_at = t.now();
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, issued_at)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r
        .header("x-step-up-token")
        .expect("X-Step-Up-Token")
        .to_string();
    assert!(is_step_up_token(&token), "{token}");
    assert_eq!(
        r.header("x-step-up-expires"),
        Some(date_rfc3339(issued_at + 900).as_str()),
        "ttl 15m"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));

    // Alone, within the TTL, without sliding: the last second still works, then it's over.
    for advance in [1, 600, 298] {
        t.advance(advance);
        let r = t.call_token("/2fa/x", &alice.key, &token).await;
        assert_eq!(
            r.status,
            200,
            "after {}s: {}",
            t.now() - issued_at,
            r.text()
        );
        assert_eq!(
            r.header("x-step-up-token"),
            None,
            "no new token for a token"
        );
        let rec = t.last_upstream();
        assert_eq!(rec.header_all("x-stepgate-auth"), vec!["key+step_up"]);
        assert_no_credentials(&rec);
    }
    assert_eq!(t.now() - issued_at, 899);
    t.advance(1);
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    assert_otp_refused(&r, "step_up_invalid", BOTH);

    // Each code earns its own token; tokens are never reused.
    let other = earn(&t, "/2fa/x", &alice.key, &e).await;
    assert_ne!(other, token);
    assert_eq!(t.up.requests().len(), 5);

    let events = t.audit("alice").await;
    let issued: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "step_up_issued")
        .collect();
    assert_eq!(issued.len(), 2, "{events:#?}");
    assert_eq!(
        issued[1]["detail"]["expires_at"],
        date_rfc3339(issued_at + 900)
    );
    assert!(
        !serde_json::to_string(&events)
            .unwrap()
            .contains(&token[4..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_ttl_issues_no_token() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let r = t
        .call(
            "/no-tokens/x",
            &alice.key,
            Some(&totp_at(&e.secret, t.now())),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-step-up-token"), None);
    assert_eq!(r.header("x-step-up-expires"), None);
    assert_eq!(
        t.last_upstream().header_all("x-stepgate-auth"),
        vec!["key+totp"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_bound_to_its_consumer() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let bob = t.consumer("bob", &[]).await;
    let e = t.enrol("alice").await;
    t.enrol("bob").await;
    let token = earn(&t, "/2fa/x", &alice.key, &e).await;

    let r = t.call_token("/2fa/x", &bob.key, &token).await;
    assert_otp_refused(&r, "step_up_invalid", BOTH);
    // Still alice's.
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = t.audit("bob").await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "step_up_rejected" && e["detail"]["reason"] == "other_consumer"),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_scoped_token_stays_on_its_policy_a_global_one_does_not() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;

    // Scope policy: every route of the policy (`/2fa` and POST `/secure` share it), no other.
    let scoped = earn(&t, "/2fa/x", &alice.key, &e).await;
    let r = t
        .send(
            "POST",
            "/secure/x",
            &[("x-api-key", &alice.key), ("x-step-up-token", &scoped)],
        )
        .await;
    assert_eq!(r.status, 200, "same policy, other route: {}", r.text());
    for path in ["/other/x", "/global/x", "/totp-only/x"] {
        let r = t.call_token(path, &alice.key, &scoped).await;
        let methods = if path == "/totp-only/x" { "totp" } else { BOTH };
        assert_otp_refused(&r, "step_up_invalid", methods);
    }

    // Scope global (ttl 5m): everywhere a second factor is required.
    let global = earn(&t, "/global/x", &alice.key, &e).await;
    for path in ["/2fa/x", "/other/x", "/global/x", "/totp-only/x"] {
        let r = t.call_token(path, &alice.key, &global).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(
            t.last_upstream().header_all("x-stepgate-auth"),
            vec!["key+step_up"]
        );
    }
    t.advance(300);
    let r = t.call_token("/2fa/x", &alice.key, &global).await;
    assert_otp_refused(&r, "step_up_invalid", BOTH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_revoked_by_the_admin_call_key_revocation_totp_reset_and_disable() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let bob = t.consumer("bob", &[]).await;
    let e = t.enrol("alice").await;
    let eb = t.enrol("bob").await;
    let bobs = earn(&t, "/2fa/x", &bob.key, &eb).await;

    // The admin call.
    let token = earn(&t, "/2fa/x", &alice.key, &e).await;
    t.gw.ok("DELETE", "/consumers/alice/step-up-tokens", None, 204)
        .await;
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    assert_otp_refused(&r, "step_up_invalid", BOTH);

    // Revoking any of the consumer's keys (here a second one, not the one presented).
    let token = earn(&t, "/2fa/x", &alice.key, &e).await;
    let second = t.gw.ok("POST", "/consumers/alice/keys", None, 201).await;
    let prefix = second["prefix"].as_str().unwrap();
    assert_eq!(t.call_token("/2fa/x", &alice.key, &token).await.status, 200);
    t.gw.ok(
        "DELETE",
        &format!("/consumers/alice/keys/{prefix}"),
        None,
        204,
    )
    .await;
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    assert_otp_refused(&r, "step_up_invalid", BOTH);

    // Disabling (the key fails while disabled; the token stays dead after enabling).
    let token = earn(&t, "/2fa/x", &alice.key, &e).await;
    t.gw.ok(
        "PATCH",
        "/consumers/alice",
        Some(serde_json::json!({"disabled": true})),
        200,
    )
    .await;
    assert_key_refused(
        &t.call_token("/2fa/x", &alice.key, &token).await,
        "api_key_invalid",
    );
    t.gw.ok(
        "PATCH",
        "/consumers/alice",
        Some(serde_json::json!({"disabled": false})),
        200,
    )
    .await;
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    assert_otp_refused(&r, "step_up_invalid", BOTH);

    // Resetting TOTP: not enrolled now (403); after enrolling again the old token is dead.
    let token = earn(&t, "/2fa/x", &alice.key, &e).await;
    t.gw.ok("DELETE", "/consumers/alice/totp", None, 204).await;
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    r.assert_problem(403, "enrollment_required");
    let e2 = t.enrol("alice").await;
    let r = t.call_token("/2fa/x", &alice.key, &token).await;
    assert_otp_refused(&r, "step_up_invalid", BOTH);
    let fresh = earn(&t, "/2fa/x", &alice.key, &e2).await;
    assert_eq!(t.call_token("/2fa/x", &alice.key, &fresh).await.status, 200);

    // Another consumer's token was never touched.
    let r = t.call_token("/2fa/x", &bob.key, &bobs).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let events = t.audit("alice").await;
    let mut reasons: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "step_up_revoked")
        .map(|e| {
            assert_eq!(e["consumer_id"], alice.id.as_str(), "{e}");
            e["detail"]["reason"].as_str().unwrap_or("")
        })
        .collect();
    reasons.reverse();
    assert_eq!(
        reasons,
        vec!["admin", "key_revoked", "consumer_disabled", "totp_reset"],
        "{events:#?}"
    );
}
