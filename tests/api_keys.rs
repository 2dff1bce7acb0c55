//! The first factor end to end: consumers created through the admin API (and through the CLI
//! binary) call an `api_key: required` route over real sockets; the recording upstream sees the
//! consumer's identity and never its key. Missing, invalid, duplicate and malformed keys,
//! revocation with rotation, disabled consumers, public routes and forged identity headers.
use stepgate_testkit::*;

use serde_json::{Value, json};

const IDENTITY: [&str; 4] = [
    "x-consumer-id",
    "x-consumer-name",
    "x-consumer-roles",
    "x-stepgate-auth",
];

async fn setup() -> (AdminGw, Upstream) {
    let up = Upstream::named("app").await;
    let gw = keyed_gateway(&up.url(), "data").start_admin().await;
    (gw, up)
}

/// Asserts the last upstream request carried exactly the identity of `consumer` (a creation
/// answer or a view) and no key.
fn assert_identity(up: &Upstream, consumer: &Value, keys: &[&str]) {
    let rec = up
        .requests()
        .pop()
        .expect("the upstream received the request");
    assert_eq!(
        rec.header_all("x-consumer-id"),
        vec![consumer["id"].as_str().unwrap()]
    );
    assert_eq!(
        rec.header_all("x-consumer-name"),
        vec![consumer["name"].as_str().unwrap()]
    );
    let roles: Vec<&str> = consumer["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let sent = rec.header_all("x-consumer-roles");
    if roles.is_empty() {
        // No roles: an empty header or none at all.
        assert!(
            sent.is_empty() || sent == vec![String::new()],
            "roles: {sent:?}"
        );
    } else {
        assert_eq!(sent, vec![roles.join(",")]);
    }
    assert_eq!(rec.header_all("x-stepgate-auth"), vec!["key"]);
    assert_eq!(rec.header("x-api-key"), None, "the key is never forwarded");
    for (name, value) in &rec.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        for key in keys {
            assert!(
                !value.contains(&key[12..]),
                "{name} carries the key: {value}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_from_the_admin_api_reaches_the_upstream_as_an_identity() {
    let (gw, up) = setup().await;
    let alice = gw.add_consumer("alice", &["partner", "reader"]).await;
    let key = alice["api_key"].as_str().unwrap();

    let r = get_keyed(gw.addr(), "/keyed/orders/7?x=1", key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "app");
    assert_identity(&up, &alice, &[key]);
    assert_eq!(up.only_request().path_and_query(), "/keyed/orders/7?x=1");

    // A consumer without roles.
    let bob = gw.add_consumer("bob", &[]).await;
    let r = get_keyed(gw.addr(), "/keyed", bob["api_key"].as_str().unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_identity(&up, &bob, &[bob["api_key"].as_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_added_with_the_cli_calls_the_keyed_route() {
    let up = Upstream::named("app").await;
    let gw = keyed_gateway(&up.url(), "data")
        .fixed_admin_port()
        .start_admin()
        .await;
    let config = path_str(&gw.config_path());
    let (code, stdout, stderr) = run_cli_async(
        &[
            "consumer", "add", "carol", "--role", "ops", "--role", "billing", "-c", &config,
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let created: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("--json output is not JSON ({e}): {stdout}"));
    let key = created["api_key"]
        .as_str()
        .expect("api_key in --json output");
    assert!(is_api_key(key));
    assert!(!stdout.contains(&gw.token) && !stderr.contains(&gw.token));

    let r = get_keyed(gw.addr(), "/keyed/x", key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let view = gw.view("carol").await;
    assert_eq!(view["id"], created["id"]);
    assert_eq!(view["roles"], json!(["billing", "ops"]));
    assert_identity(&up, &view, &[key]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_is_401_api_key_missing() {
    let (gw, up) = setup().await;
    gw.add_consumer("alice", &[]).await;
    let r = get_with(gw.addr(), "/keyed/x", &[]).await;
    assert_key_refused(&r, "api_key_missing");
    // The key is looked for in X-Api-Key only.
    let r = get_with(gw.addr(), "/keyed/x", &[("authorization", "Bearer sgk_x")]).await;
    assert_key_refused(&r, "api_key_missing");
    assert_eq!(
        up.arrived(),
        0,
        "a refused request never reaches the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_wrong_and_garbage_keys_are_401_api_key_invalid() {
    let (gw, up) = setup().await;
    let alice = gw.add_consumer("alice", &[]).await;
    let key = alice["api_key"].as_str().unwrap().to_string();
    // Same shape, other checksum; checksum fixed but other bits; another consumer's gone key.
    let mut flipped = key.clone().into_bytes();
    flipped[40] = if flipped[40] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    let unknown = stepgate::credentials::api_key::generate();
    let deleted = gw.add_consumer("gone", &[]).await;
    gw.ok("DELETE", "/consumers/gone", None, 204).await;
    for bad in [
        unknown.as_str(),
        flipped.as_str(),
        &key[..75],
        &key.to_uppercase(),
        deleted["api_key"].as_str().unwrap(),
        "hello",
        "sgk_",
        "Bearer",
    ] {
        let r = get_keyed(gw.addr(), "/keyed/x", bad).await;
        assert_key_refused(&r, "api_key_invalid");
    }
    assert_eq!(up.arrived(), 0);
    // The real key still works.
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_malformed_keys_are_400() {
    let (gw, up) = setup().await;
    let alice = gw.add_consumer("alice", &[]).await;
    let key = alice["api_key"].as_str().unwrap().to_string();
    let host = gw.addr().to_string();

    // Twice the same valid key, and two different ones.
    for second in [key.as_str(), "hello"] {
        let r = send_http1(
            gw.addr(),
            req("GET", "/keyed/x", &host)
                .header("x-api-key", key.as_str())
                .header("x-api-key", second)
                .body(empty())
                .unwrap(),
        )
        .await;
        r.assert_problem(400, "bad_request");
    }
    // Over 256 bytes; a space inside; non-ASCII bytes (sent raw, hyper's client refuses them).
    let long = format!("{key}{}", "a".repeat(300));
    let r = get_keyed(gw.addr(), "/keyed/x", &long).await;
    r.assert_problem(400, "bad_request");
    let r = get_keyed(
        gw.addr(),
        "/keyed/x",
        &format!("{} {}", &key[..40], &key[40..]),
    )
    .await;
    r.assert_problem(400, "bad_request");
    let mut raw =
        format!("GET /keyed/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nX-Api-Key: ")
            .into_bytes();
    raw.extend_from_slice(&key.as_bytes()[..70]);
    raw.extend_from_slice(&[0xc3, 0xa9, 0xff]);
    raw.extend_from_slice(b"\r\n\r\n");
    let r = raw_request(gw.addr(), &raw).await.expect("a response");
    r.assert_problem(400, "bad_request");
    assert_eq!(up.arrived(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_fails_on_the_next_request_while_a_rotated_key_works() {
    let (gw, up) = setup().await;
    let alice = gw.add_consumer("alice", &["partner"]).await;
    let old = alice["api_key"].as_str().unwrap().to_string();
    let issued = gw.ok("POST", "/consumers/alice/keys", None, 201).await;
    let new = issued["api_key"].as_str().unwrap().to_string();

    // Both live keys work and name the same consumer.
    for key in [&old, &new] {
        let r = get_keyed(gw.addr(), "/keyed/x", key).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_identity(&up, &alice, &[&old, &new]);
    }

    gw.ok(
        "DELETE",
        &format!(
            "/consumers/alice/keys/{}",
            alice["prefix"].as_str().unwrap()
        ),
        None,
        204,
    )
    .await;
    let r = get_keyed(gw.addr(), "/keyed/x", &old).await;
    assert_key_refused(&r, "api_key_invalid");
    let r = get_keyed(gw.addr(), "/keyed/x", &new).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_identity(&up, &alice, &[&old, &new]);
    assert_eq!(up.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_consumer_is_refused_until_enabled_again() {
    let (gw, up) = setup().await;
    let alice = gw.add_consumer("alice", &[]).await;
    let key = alice["api_key"].as_str().unwrap().to_string();
    let issued = gw.ok("POST", "/consumers/alice/keys", None, 201).await;
    let key2 = issued["api_key"].as_str().unwrap().to_string();
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key).await.status, 200);

    gw.ok(
        "PATCH",
        "/consumers/alice",
        Some(json!({"disabled": true})),
        200,
    )
    .await;
    for k in [&key, &key2] {
        let r = get_keyed(gw.addr(), "/keyed/x", k).await;
        assert_key_refused(&r, "api_key_invalid");
    }
    assert_eq!(up.requests().len(), 1);

    gw.ok(
        "PATCH",
        "/consumers/alice",
        Some(json!({"disabled": false})),
        200,
    )
    .await;
    for k in [&key, &key2] {
        let r = get_keyed(gw.addr(), "/keyed/x", k).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.requests().len(), 3);

    // A role change shows in the next request's identity.
    gw.ok(
        "PATCH",
        "/consumers/alice",
        Some(json!({"roles": ["auditor"]})),
        200,
    )
    .await;
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key).await.status, 200);
    assert_eq!(
        up.requests().pop().unwrap().header_all("x-consumer-roles"),
        vec!["auditor"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_route_needs_no_key_and_never_forwards_one() {
    let (gw, up) = setup().await;
    let alice = gw.add_consumer("alice", &[]).await;
    let key = alice["api_key"].as_str().unwrap();

    let r = get_with(gw.addr(), "/open/x", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up.requests().pop().unwrap();
    for h in IDENTITY {
        assert_eq!(rec.header(h), None, "{h} on a public route without a key");
    }

    for presented in [key, "garbage"] {
        let r = get_with(
            gw.addr(),
            "/open/x",
            &[
                ("x-api-key", presented),
                ("x-consumer-id", "c_forged"),
                ("x-consumer-name", "mallory"),
                ("x-consumer-roles", "admin"),
                ("x-stepgate-auth", "key+totp"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let rec = up.requests().pop().unwrap();
        assert_eq!(
            rec.header("x-api-key"),
            None,
            "X-Api-Key stripped on a public route"
        );
        assert!(
            !rec.header_all("x-consumer-id")
                .contains(&"c_forged".to_string()),
            "client-sent X-Consumer-Id forwarded"
        );
        assert!(
            !rec.header_all("x-consumer-name")
                .contains(&"mallory".to_string())
        );
        assert!(
            !rec.header_all("x-consumer-roles")
                .contains(&"admin".to_string())
        );
        assert!(
            !rec.header_all("x-stepgate-auth")
                .contains(&"key+totp".to_string())
        );
        for (name, value) in &rec.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(&key[12..]),
                "{name} carries the key"
            );
        }
    }
    assert_eq!(up.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_identity_headers_are_replaced_on_a_keyed_route() {
    let (gw, up) = setup().await;
    let alice = gw.add_consumer("alice", &["partner"]).await;
    let key = alice["api_key"].as_str().unwrap();
    let r = get_with(
        gw.addr(),
        "/keyed/x",
        &[
            ("x-api-key", key),
            ("x-consumer-id", "c_forged"),
            ("x-consumer-id", "c_forged2"),
            ("x-consumer-name", "mallory"),
            ("x-consumer-roles", "admin"),
            ("x-stepgate-auth", "key+totp"),
            ("x-stepgate-warning", "forged"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_identity(&up, &alice, &[key]);
    assert_eq!(
        up.requests().pop().unwrap().header("x-stepgate-warning"),
        None
    );

    // Forged identity without a key does not get through either.
    let r = get_with(
        gw.addr(),
        "/keyed/x",
        &[("x-consumer-id", alice["id"].as_str().unwrap())],
    )
    .await;
    assert_key_refused(&r, "api_key_missing");
    assert_eq!(up.requests().len(), 1);
}
