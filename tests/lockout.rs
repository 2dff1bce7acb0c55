//! The failure limiter end to end (issue 4), with an injected clock: a consumer banned after
//! its policy's failures (then even the correct code or a valid token gets 429 until the ban
//! ends or an operator unlocks it), a fresh code (not a token) resetting the count, a per-IP
//! ban across many unknown keys, and `X-Forwarded-For` believed only from trusted proxies.
use stepgate_testkit::*;

const BOTH: &str = "totp recovery_code";

/// Five wrong codes are tolerated (401); the sixth starts a 15-minute ban (429).
async fn get_banned(t: &TwoFactor, who: &Consumer, e: &Enrolled) {
    let wrong = wrong_at(&e.secret, t.now());
    for i in 0..5 {
        let r = t.call("/2fa/x", &who.key, Some(&wrong)).await;
        assert_eq!(r.status, 401, "wrong code #{}: {}", i + 1, r.text());
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    let r = t.call("/2fa/x", &who.key, Some(&wrong)).await;
    assert_banned(&r, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_correct_code_gets_429_until_the_ban_ends() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;
    get_banned(&t, &alice, &e).await;

    // Banned: the correct code, a valid token, a key-only route, another 2FA policy: all 429,
    // counting down.
    let code = totp_at(&e.secret, t.now());
    assert_banned(&t.call("/2fa/x", &alice.key, Some(&code)).await, 900);
    assert_banned(&t.call_token("/2fa/x", &alice.key, &token).await, 900);
    t.advance(100);
    assert_banned(&t.call("/keyed/x", &alice.key, None).await, 800);
    assert_banned(&t.call("/other/x", &alice.key, Some(&code)).await, 800);
    t.advance(799);
    assert_banned(&t.call("/2fa/x", &alice.key, Some(&code)).await, 1);
    // Nobody else is affected, not even from the same address.
    let bob = t.consumer("bob", &[]).await;
    assert_eq!(t.call("/keyed/x", &bob.key, None).await.status, 200);
    assert_eq!(t.up.requests().len(), 2);

    // The ban is over: the current code works (the one refused during the ban was never
    // checked, so it is not spent either).
    t.advance(1);
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, t.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = t.audit("alice").await;
    let started: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "ban_started")
        .collect();
    assert_eq!(started.len(), 1, "{events:#?}");
    assert_eq!(started[0]["detail"]["until"], date_rfc3339(T0 + 60 + 900));
    assert_eq!(
        events.iter().filter(|e| e["kind"] == "ban_ended").count(),
        1,
        "{events:#?}"
    );
    // The count started afresh with the ban: five more wrong codes are tolerated.
    t.advance(30);
    get_banned(&t, &alice, &e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_unlock_lifts_the_ban_early() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    get_banned(&t, &alice, &e).await;
    let code = totp_at(&e.secret, t.now());
    assert_banned(&t.call("/2fa/x", &alice.key, Some(&code)).await, 900);

    t.gw.ok("POST", "/consumers/alice/unlock", None, 204).await;
    let r = t.call("/2fa/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = t.audit("alice").await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "unlocked" && e["detail"]["was_banned"] == true),
        "{events:#?}"
    );
    // Unlocking also cleared the count.
    t.advance(30);
    get_banned(&t, &alice, &e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlock_also_clears_a_count_below_the_limit() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let wrong = wrong_at(&e.secret, t.now());
    for _ in 0..4 {
        let r = t.call("/2fa/x", &alice.key, Some(&wrong)).await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    // README: `POST /consumers/{name}/unlock` "lifts a ban and clears failure counts".
    t.gw.ok("POST", "/consumers/alice/unlock", None, 204).await;
    for i in 0..5 {
        let r = t.call("/2fa/x", &alice.key, Some(&wrong)).await;
        assert_eq!(
            r.status,
            401,
            "wrong code #{} after the unlock: {}",
            i + 1,
            r.text()
        );
    }
    assert_banned(&t.call("/2fa/x", &alice.key, Some(&wrong)).await, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_resets_the_consumers_count() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let wrong = wrong_at(&e.secret, t.now());
    for _ in 0..4 {
        let r = t.call("/2fa/x", &alice.key, Some(&wrong)).await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, t.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for i in 0..5 {
        let r = t.call("/2fa/x", &alice.key, Some(&wrong)).await;
        assert_eq!(r.status, 401, "wrong code #{} after the success", i + 1);
    }
    assert_banned(&t.call("/2fa/x", &alice.key, Some(&wrong)).await, 900);
}

/// Only a fresh code resets the count. A client busy with its step-up token must not keep
/// wiping the failures of someone guessing codes with its stolen key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_token_does_not_reset_the_count() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;
    let wrong = wrong_at(&e.secret, t.now());
    for round in 0..5 {
        let r = t.call("/2fa/x", &alice.key, Some(&wrong)).await;
        assert_eq!(r.status, 401, "wrong code #{}", round + 1);
        let r = t.call_token("/2fa/x", &alice.key, &token).await;
        assert_eq!(r.status, 200, "the token after wrong code #{}", round + 1);
    }
    assert_banned(&t.call("/2fa/x", &alice.key, Some(&wrong)).await, 900);
    assert_banned(&t.call_token("/2fa/x", &alice.key, &token).await, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tokens_count_like_failed_codes() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    t.enrol("alice").await;
    for i in 0..5 {
        let token = format!("sgt_{i:064x}");
        let r = t.call_token("/2fa/x", &alice.key, &token).await;
        assert_otp_refused(&r, "step_up_invalid", BOTH);
    }
    let r = t
        .call_token("/2fa/x", &alice.key, &format!("sgt_{:064x}", 99))
        .await;
    assert_banned(&r, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_unknown_keys_from_one_address_ban_that_address_only() {
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let from = "127.0.0.2";
    // 50 unknown keys, well-formed or not, are tolerated from one address...
    for i in 0..50u64 {
        let key = if i % 2 == 0 {
            unknown_key(i)
        } else {
            format!("garbage-{i}")
        };
        let r = t
            .send_from(from, "GET", "/2fa/x", &[("x-api-key", &key)])
            .await;
        assert_key_refused(&r, "api_key_invalid");
    }
    // ... the 51st starts a ban of that address.
    let r = t
        .send_from(from, "GET", "/2fa/x", &[("x-api-key", &unknown_key(1000))])
        .await;
    assert_banned(&r, 900);
    let code = totp_at(&e.secret, t.now());
    let good = [("x-api-key", alice.key.as_str()), ("x-otp", code.as_str())];
    for path in ["/2fa/x", "/keyed/x", "/open/x"] {
        let r = t.send_from(from, "GET", path, &good).await;
        assert_banned(&r, 900);
    }
    // The consumer itself is not banned: from another address, its code works.
    let r = t.send_from("127.0.0.3", "GET", "/2fa/x", &good).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(t.up.requests().len(), 1);

    t.advance(900);
    let r = t.send_from(from, "GET", "/keyed/x", &good[..1]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = t.audit_all().await;
    for kind in ["ban_started", "ban_ended"] {
        let event = events
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}: {events:#?}"));
        assert!(
            event["detail"]["subject"]
                .as_str()
                .is_some_and(|s| s.contains("127.0.0.2")),
            "{event}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_from_an_untrusted_peer_is_ignored_and_replaced() {
    let t = TwoFactor::start_with("trusted_proxies: [10.0.0.0/8]").await;
    let alice = t.consumer("alice", &[]).await;
    let r = t
        .send_from(
            "127.0.0.2",
            "GET",
            "/keyed/x",
            &[
                ("x-api-key", &alice.key),
                ("x-forwarded-for", "203.0.113.7, 10.0.0.1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        t.last_upstream().header_all("x-forwarded-for"),
        vec!["127.0.0.2"],
        "replaced by the socket peer"
    );

    // A different X-Forwarded-For on every attempt does not escape the per-IP count.
    for i in 0..50u64 {
        let xff = format!("198.51.100.{i}");
        let r = t
            .send_from(
                "127.0.0.2",
                "GET",
                "/2fa/x",
                &[("x-api-key", &unknown_key(i)), ("x-forwarded-for", &xff)],
            )
            .await;
        assert_key_refused(&r, "api_key_invalid");
    }
    let r = t
        .send_from(
            "127.0.0.2",
            "GET",
            "/2fa/x",
            &[
                ("x-api-key", &unknown_key(50)),
                ("x-forwarded-for", "192.0.2.1"),
            ],
        )
        .await;
    assert_banned(&r, 900);
    let r = t
        .send_from(
            "127.0.0.2",
            "GET",
            "/keyed/x",
            &[("x-api-key", &alice.key), ("x-forwarded-for", "192.0.2.2")],
        )
        .await;
    assert_banned(&r, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_names_its_clients_and_each_is_counted_on_its_own() {
    let t = TwoFactor::start_with("trusted_proxies: [127.0.0.2/32]").await;
    let alice = t.consumer("alice", &[]).await;
    let proxy = "127.0.0.2";

    let r = t
        .send_from(
            proxy,
            "GET",
            "/keyed/x",
            &[
                ("x-api-key", &alice.key),
                ("x-forwarded-for", "203.0.113.7"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        t.last_upstream().header_all("x-forwarded-for"),
        vec!["203.0.113.7, 127.0.0.2"],
        "the chain is kept and the proxy appended"
    );

    // 51 failures from client A through the proxy ban A...
    for i in 0..50u64 {
        let r = t
            .send_from(
                proxy,
                "GET",
                "/2fa/x",
                &[
                    ("x-api-key", &unknown_key(i)),
                    ("x-forwarded-for", "6.6.6.6, 203.0.113.1"),
                ],
            )
            .await;
        assert_key_refused(&r, "api_key_invalid");
    }
    let a = [
        ("x-api-key", unknown_key(99)),
        ("x-forwarded-for", "203.0.113.1".to_string()),
    ];
    let a: Vec<(&str, &str)> = a.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_banned(&t.send_from(proxy, "GET", "/2fa/x", &a).await, 900);
    let good_a = [
        ("x-api-key", alice.key.as_str()),
        ("x-forwarded-for", "203.0.113.1"),
    ];
    assert_banned(&t.send_from(proxy, "GET", "/keyed/x", &good_a).await, 900);
    // ... while client B behind the same proxy, and the proxy's own requests, pass.
    let good_b = [
        ("x-api-key", alice.key.as_str()),
        ("x-forwarded-for", "203.0.113.2"),
    ];
    let r = t.send_from(proxy, "GET", "/keyed/x", &good_b).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        t.last_upstream().header_all("x-forwarded-for"),
        vec!["203.0.113.2, 127.0.0.2"]
    );
    let r = t
        .send_from(proxy, "GET", "/keyed/x", &[("x-api-key", &alice.key)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The banned client cannot escape by prepending another address: the right-most
    // untrusted entry is the client.
    let spoof = [
        ("x-api-key", alice.key.as_str()),
        ("x-forwarded-for", "203.0.113.9, 203.0.113.1"),
    ];
    assert_banned(&t.send_from(proxy, "GET", "/keyed/x", &spoof).await, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policys_own_limits_refill_and_ban_time_apply() {
    // `strict`: 2 failures per consumer in 10m (one back every 5m), 3 per IP, ban 1m.
    let t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let wrong = wrong_at(&e.secret, t.now());
    for _ in 0..2 {
        let r = t.call("/strict/x", &alice.key, Some(&wrong)).await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    // One failure's worth comes back after 5 minutes, not before.
    t.advance(299);
    let wrong = wrong_at(&e.secret, t.now());
    t.advance(1);
    let r = t.call("/strict/x", &alice.key, Some(&wrong)).await;
    assert_otp_refused(&r, "otp_invalid", BOTH);
    assert_banned(&t.call("/strict/x", &alice.key, Some(&wrong)).await, 60);
    t.advance(60);
    let r = t
        .call("/strict/x", &alice.key, Some(&totp_at(&e.secret, t.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Per IP: 3 unknown keys tolerated, the 4th bans the address for 1m.
    for i in 0..3 {
        let r = t
            .send_from(
                "127.0.0.4",
                "GET",
                "/strict/x",
                &[("x-api-key", &unknown_key(i))],
            )
            .await;
        assert_key_refused(&r, "api_key_invalid");
    }
    let r = t
        .send_from(
            "127.0.0.4",
            "GET",
            "/strict/x",
            &[("x-api-key", &unknown_key(3))],
        )
        .await;
    assert_banned(&r, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_and_a_count_survive_a_restart() {
    let mut t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let bob = t.consumer("bob", &[]).await;
    let e = t.enrol("alice").await;
    let eb = t.enrol("bob").await;
    get_banned(&t, &alice, &e).await;
    // Bob is three wrong codes into his five.
    let wrong = wrong_at(&eb.secret, t.now());
    for _ in 0..3 {
        let r = t.call("/2fa/x", &bob.key, Some(&wrong)).await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    t.advance(60);
    t.restart().await;

    // Alice is still banned, for what is left of it; the correct code does not get in.
    let code = totp_at(&e.secret, t.now());
    assert_banned(&t.call("/2fa/x", &alice.key, Some(&code)).await, 840);
    // Bob's count went on where it was: two more wrong codes, and the third bans him.
    let wrong = wrong_at(&eb.secret, t.now());
    for _ in 0..2 {
        let r = t.call("/2fa/x", &bob.key, Some(&wrong)).await;
        assert_otp_refused(&r, "otp_invalid", BOTH);
    }
    assert_banned(&t.call("/2fa/x", &bob.key, Some(&wrong)).await, 900);

    // An unlock is kept too: after another restart Alice is not banned again.
    t.gw.ok("POST", "/consumers/alice/unlock", None, 204).await;
    t.restart().await;
    let r = t
        .call("/2fa/x", &alice.key, Some(&totp_at(&e.secret, t.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // And a ban over while the gateway was down is over after it.
    t.advance(900);
    t.restart().await;
    assert_eq!(t.call("/keyed/x", &bob.key, None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_ban_survives_a_restart() {
    let mut t = TwoFactor::start().await;
    let alice = t.consumer("alice", &[]).await;
    let from = "127.0.0.2";
    for i in 0..51u64 {
        let r = t
            .send_from(from, "GET", "/keyed/x", &[("x-api-key", &unknown_key(i))])
            .await;
        assert_eq!(r.status, if i < 50 { 401 } else { 429 }, "{}", r.text());
    }
    t.restart().await;
    let r = t
        .send_from(from, "GET", "/keyed/x", &[("x-api-key", &alice.key)])
        .await;
    assert_banned(&r, 900);
    let r = t
        .send_from("127.0.0.3", "GET", "/keyed/x", &[("x-api-key", &alice.key)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
