//! The admin API over a real socket, on a real SQLite file in a temp dir: authentication, every
//! call of DESIGN.md §6 (consumers, keys, TOTP, recovery codes, audit, health) and every bad
//! input (malformed JSON, invalid fields, unknown consumers, duplicates). TOTP codes come from
//! `oathtool`, never from the code under test.
use stepgate_testkit::*;

use serde_json::{Value, json};

async fn setup() -> (AdminGw, Upstream) {
    let up = Upstream::named("app").await;
    let gw = keyed_gateway(&up.url(), "data").start_admin().await;
    (gw, up)
}

fn names(list: &Value) -> Vec<String> {
    list["consumers"]
        .as_array()
        .unwrap_or_else(|| panic!("no consumers array: {list}"))
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// Normalised recovery code: lower case, no dashes or spaces.
fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '-' && *c != ' ')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// 10 distinct codes of ≥ 112 bits: 24 base32 characters once dashes are removed.
fn assert_recovery_codes(body: &Value) -> Vec<String> {
    let codes: Vec<String> = body["recovery_codes"]
        .as_array()
        .unwrap_or_else(|| panic!("no recovery_codes array: {body}"))
        .iter()
        .map(|c| c.as_str().expect("recovery code is a string").to_string())
        .collect();
    assert_eq!(codes.len(), 10, "{body}");
    let mut distinct: Vec<String> = codes.iter().map(|c| normalize_code(c)).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        10,
        "recovery codes must be distinct: {codes:?}"
    );
    for code in &codes {
        let n = normalize_code(code);
        assert!(
            n.len() >= 24
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)),
            "recovery code {code:?} is not ≥ 24 base32 characters (≥ 112 bits)"
        );
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_need_no_token() {
    let (gw, _up) = setup().await;
    let r = admin_call(gw.admin, None, "GET", "/healthz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    let r = admin_call(gw.admin, None, "GET", "/readyz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_right_bearer_token() {
    let (gw, _up) = setup().await;
    let wrong = "sga_0000000000000000000000000000000000000000000000000000000000000000";
    let body = r#"{"name":"mallory","roles":[]}"#;
    for (method, path, body) in [
        ("GET", "/consumers", None),
        ("POST", "/consumers", Some(body)),
        ("GET", "/consumers/mallory", None),
        ("DELETE", "/consumers/mallory", None),
        ("POST", "/consumers/mallory/keys", None),
        ("POST", "/consumers/mallory/totp", Some("{}")),
        ("GET", "/audit", None),
        ("GET", "/nope", None),
    ] {
        // Missing.
        let r = admin_call(gw.admin, None, method, path, body).await;
        assert_admin_problem(&r, 401, "unauthorized");
        // Wrong token, and the right token under another scheme or with extra text.
        for token in [wrong, &format!("{}x", gw.token)] {
            let r = admin_call(gw.admin, Some(token), method, path, body).await;
            let p = assert_admin_problem(&r, 401, "unauthorized");
            assert!(
                !p.to_string().contains(token),
                "the presented token is echoed: {p}"
            );
        }
        let mut b = req(method, path, &gw.admin.to_string())
            .header("authorization", format!("Basic {}", gw.token));
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        let r = send_http1(gw.admin, b.body(full(body.unwrap_or(""))).unwrap()).await;
        assert_admin_problem(&r, 401, "unauthorized");
    }
    // Nothing was created by the refused POSTs; the right token works.
    let list = gw.ok("GET", "/consumers", None, 200).await;
    assert_eq!(names(&list), Vec::<String>::new());
    let r = admin_call(gw.admin, Some(&gw.token), "POST", "/consumers", Some(body)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let list = gw.ok("GET", "/consumers", None, 200).await;
    assert_eq!(names(&list), vec!["mallory"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_and_show_consumers() {
    let (gw, _up) = setup().await;
    let created = gw.add_consumer("alice", &["partner", "reader"]).await;
    let key = created["api_key"].as_str().expect("api_key").to_string();
    assert!(is_api_key(&key), "key shape: {key}");
    let prefix = created["prefix"].as_str().expect("prefix").to_string();
    assert_eq!(prefix, key[..12], "prefix is sgk_ + 8 hex of the key");
    assert_eq!(created["name"], "alice");
    assert_eq!(created["roles"], json!(["partner", "reader"]));
    let id = created["id"].as_str().expect("id").to_string();
    assert!(!id.is_empty());

    let bob = gw.add_consumer("bob", &[]).await;
    assert_ne!(bob["id"], created["id"]);
    assert_ne!(bob["api_key"], created["api_key"]);
    assert_eq!(bob["roles"], json!([]));

    let list = gw.call("GET", "/consumers", None).await;
    assert_eq!(list.status, 200);
    assert!(
        list.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{:?}",
        list.headers
    );
    assert!(!list.text().contains(&key), "a listing never shows a key");
    let list = list.json();
    let mut listed = names(&list);
    listed.sort();
    assert_eq!(listed, vec!["alice", "bob"]);

    let view = gw.view("alice").await;
    let in_list = list["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "alice")
        .unwrap()
        .clone();
    assert_eq!(in_list, view, "list and show give the same view");
    assert_eq!(view["id"], id.as_str());
    assert_eq!(view["name"], "alice");
    assert_eq!(view["roles"], json!(["partner", "reader"]));
    assert_eq!(view["disabled"], false);
    assert!(is_rfc3339(view["created_at"].as_str().unwrap()), "{view}");
    assert_eq!(view["factors"], json!([]));
    assert_eq!(view["totp"], Value::Null);
    assert_eq!(view["recovery_codes_remaining"], 0);
    let keys = view["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{view}");
    assert_eq!(keys[0]["prefix"], prefix.as_str());
    assert!(
        is_rfc3339(keys[0]["created_at"].as_str().unwrap()),
        "{view}"
    );
    assert!(keys[0].get("last_used_at").is_some(), "{view}");
    assert_eq!(keys[0]["revoked_at"], Value::Null);
    assert!(
        !view.to_string().contains(&key[12..]),
        "a view never shows a key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_invalid_fields_are_400_with_a_message() {
    let (gw, _up) = setup().await;
    gw.add_consumer("alice", &[]).await;
    let t = Some(gw.token.as_str());
    for (method, path, body) in [
        ("POST", "/consumers", r#"{"name": "x""#),
        ("POST", "/consumers", "not json"),
        ("POST", "/consumers", ""),
        ("POST", "/consumers", "[]"),
        ("POST", "/consumers", r#"{"roles": []}"#),
        ("POST", "/consumers", r#"{"name": 7}"#),
        ("POST", "/consumers", r#"{"name": "x", "roles": "admin"}"#),
        ("POST", "/consumers", r#"{"name": "has space"}"#),
        ("POST", "/consumers", r#"{"name": ""}"#),
        ("POST", "/consumers", r#"{"name": "x", "roles": ["a,b"]}"#),
        ("PATCH", "/consumers/alice", "{"),
        ("PATCH", "/consumers/alice", r#"{"disabled": "yes"}"#),
        ("PATCH", "/consumers/alice", r#"{"roles": ["bad role"]}"#),
        ("POST", "/consumers/alice/totp", "{digits: 6}"),
        ("POST", "/consumers/alice/totp", r#"{"digits": 5}"#),
        ("POST", "/consumers/alice/totp", r#"{"digits": 9}"#),
        ("POST", "/consumers/alice/totp", r#"{"period": 5}"#),
        ("POST", "/consumers/alice/totp", r#"{"algorithm": "MD5"}"#),
        ("POST", "/consumers/alice/totp/confirm", "{"),
    ] {
        let r = admin_call(gw.admin, t, method, path, Some(body)).await;
        let p = assert_admin_problem(&r, 400, "bad_request");
        println!("{method} {path} {body:?} -> {}", p["detail"]);
    }
    // Nothing was created or changed by the refused calls.
    let list = gw.ok("GET", "/consumers", None, 200).await;
    assert_eq!(names(&list), vec!["alice"]);
    let view = gw.view("alice").await;
    assert_eq!(view["disabled"], false);
    assert_eq!(view["roles"], json!([]));
    assert_eq!(view["totp"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_consumers_keys_and_paths_are_404() {
    let (gw, _up) = setup().await;
    let alice = gw.add_consumer("alice", &[]).await;
    for (method, path, body) in [
        ("GET", "/consumers/nobody", None),
        (
            "PATCH",
            "/consumers/nobody",
            Some(json!({"disabled": true})),
        ),
        ("DELETE", "/consumers/nobody", None),
        ("POST", "/consumers/nobody/keys", None),
        (
            "DELETE",
            &format!(
                "/consumers/nobody/keys/{}",
                alice["prefix"].as_str().unwrap()
            ),
            None,
        ),
        ("POST", "/consumers/nobody/totp", Some(json!({}))),
        (
            "POST",
            "/consumers/nobody/totp/confirm",
            Some(json!({"code": "123456"})),
        ),
        ("DELETE", "/consumers/nobody/totp", None),
        ("POST", "/consumers/nobody/recovery-codes", None),
        ("DELETE", "/consumers/alice/keys/sgk_00000000", None),
        ("GET", "/nope", None),
        ("GET", "/consumers/alice/nope", None),
    ] {
        let r = gw.call(method, path, body).await;
        assert_admin_problem(&r, 404, "not_found");
    }
    // alice's key was not revoked through another consumer's path.
    let view = gw.view("alice").await;
    assert_eq!(view["keys"][0]["revoked_at"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_name_is_409() {
    let (gw, _up) = setup().await;
    let first = gw.add_consumer("alice", &["a"]).await;
    let r = gw
        .call(
            "POST",
            "/consumers",
            Some(json!({"name": "alice", "roles": ["b"]})),
        )
        .await;
    assert_admin_problem(&r, 409, "conflict");
    let view = gw.view("alice").await;
    assert_eq!(view["id"], first["id"], "the first alice is untouched");
    assert_eq!(view["roles"], json!(["a"]));
    assert_eq!(view["keys"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_changes_roles_and_disabled() {
    let (gw, _up) = setup().await;
    gw.add_consumer("alice", &["a"]).await;

    let v = gw
        .ok(
            "PATCH",
            "/consumers/alice",
            Some(json!({"roles": ["ops", "partner"]})),
            200,
        )
        .await;
    assert_eq!(v["roles"], json!(["ops", "partner"]));
    assert_eq!(v["disabled"], false);
    assert_eq!(gw.view("alice").await["roles"], json!(["ops", "partner"]));

    let v = gw
        .ok(
            "PATCH",
            "/consumers/alice",
            Some(json!({"disabled": true})),
            200,
        )
        .await;
    assert_eq!(v["disabled"], true);
    assert_eq!(
        v["roles"],
        json!(["ops", "partner"]),
        "roles kept when absent"
    );
    assert_eq!(gw.view("alice").await["disabled"], true);

    let v = gw
        .ok(
            "PATCH",
            "/consumers/alice",
            Some(json!({"disabled": false, "roles": []})),
            200,
        )
        .await;
    assert_eq!(v["disabled"], false);
    assert_eq!(v["roles"], json!([]));
    assert_eq!(gw.view("alice").await, v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_consumer() {
    let (gw, _up) = setup().await;
    let first = gw.add_consumer("alice", &[]).await;
    gw.add_consumer("bob", &[]).await;
    let r = gw.call("DELETE", "/consumers/alice", None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_admin_problem(
        &gw.call("GET", "/consumers/alice", None).await,
        404,
        "not_found",
    );
    assert_eq!(
        names(&gw.ok("GET", "/consumers", None, 200).await),
        vec!["bob"]
    );
    // Deleting again is 404; the name can be used again, by a new consumer.
    assert_admin_problem(
        &gw.call("DELETE", "/consumers/alice", None).await,
        404,
        "not_found",
    );
    let again = gw.add_consumer("alice", &[]).await;
    assert_ne!(again["id"], first["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_issued_and_revoked() {
    let (gw, _up) = setup().await;
    let created = gw.add_consumer("alice", &[]).await;
    let first_prefix = created["prefix"].as_str().unwrap().to_string();

    let issued = gw.ok("POST", "/consumers/alice/keys", None, 201).await;
    let key2 = issued["api_key"].as_str().unwrap().to_string();
    assert!(is_api_key(&key2), "{key2}");
    assert_ne!(key2, created["api_key"].as_str().unwrap());
    let prefix2 = issued["prefix"].as_str().unwrap().to_string();
    assert_eq!(prefix2, key2[..12]);

    let view = gw.view("alice").await;
    let keys = view["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{view}");
    let mut prefixes: Vec<&str> = keys.iter().map(|k| k["prefix"].as_str().unwrap()).collect();
    prefixes.sort();
    let mut expected = vec![first_prefix.as_str(), prefix2.as_str()];
    expected.sort();
    assert_eq!(prefixes, expected);
    assert!(keys.iter().all(|k| k["revoked_at"].is_null()), "{view}");

    let r = gw
        .call(
            "DELETE",
            &format!("/consumers/alice/keys/{first_prefix}"),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let view = gw.view("alice").await;
    for k in view["keys"].as_array().unwrap() {
        let revoked = &k["revoked_at"];
        if k["prefix"] == first_prefix.as_str() {
            assert!(
                is_rfc3339(revoked.as_str().unwrap_or("")),
                "revoked_at: {view}"
            );
        } else {
            assert!(revoked.is_null(), "only the named key is revoked: {view}");
        }
    }
    // Revoking it again: there is no live key with that prefix any more.
    let r = gw
        .call(
            "DELETE",
            &format!("/consumers/alice/keys/{first_prefix}"),
            None,
        )
        .await;
    assert_admin_problem(&r, 404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_enrolment_confirmation_recovery_codes_and_reset() {
    let (gw, _up) = setup().await;
    gw.add_consumer("alice", &[]).await;

    // Without an enrolment: nothing to confirm, no recovery codes.
    let r = gw
        .call(
            "POST",
            "/consumers/alice/totp/confirm",
            Some(json!({"code": "123456"})),
        )
        .await;
    assert_admin_problem(&r, 409, "conflict");
    let r = gw
        .call("POST", "/consumers/alice/recovery-codes", None)
        .await;
    assert_admin_problem(&r, 409, "conflict");

    let e = gw
        .ok("POST", "/consumers/alice/totp", Some(json!({})), 201)
        .await;
    let secret = e["secret"].as_str().expect("secret").to_string();
    assert_eq!(base32_decode(&secret).len(), 20, "160-bit secret: {secret}");
    let uri = e["otpauth_uri"].as_str().expect("otpauth_uri");
    assert!(uri.starts_with("otpauth://totp/"), "{uri}");
    assert!(
        uri.contains("stepgate") && uri.contains("alice"),
        "issuer and account: {uri}"
    );
    assert!(uri.contains("issuer=stepgate"), "{uri}");
    assert!(uri.contains(&format!("secret={secret}")), "{uri}");
    let svg = e["qr_svg"].as_str().expect("qr_svg");
    assert!(
        svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg:.200}"
    );

    // Pending: shown, but not a factor yet; no recovery codes yet.
    let view = gw.view("alice").await;
    assert_eq!(view["totp"]["status"], "pending", "{view}");
    assert_eq!(view["totp"]["algorithm"], "SHA1");
    assert_eq!(view["totp"]["digits"], 6);
    assert_eq!(view["totp"]["period"], 30);
    assert_eq!(view["factors"], json!([]));
    let r = gw
        .call("POST", "/consumers/alice/recovery-codes", None)
        .await;
    assert_admin_problem(&r, 409, "conflict");
    assert!(
        !view.to_string().contains(&secret),
        "a view never shows the secret"
    );

    // Wrong codes are refused and leave the enrolment pending.
    for code in [
        wrong_totp(&secret, "SHA1", 6, 30),
        "abcdef".into(),
        "１２３４５６".into(),
        "".into(),
    ] {
        let r = gw
            .call(
                "POST",
                "/consumers/alice/totp/confirm",
                Some(json!({"code": code})),
            )
            .await;
        assert_admin_problem(&r, 400, "bad_request");
    }
    assert_eq!(gw.view("alice").await["totp"]["status"], "pending");

    let code = totp_now(&secret);
    let confirmed = gw
        .ok(
            "POST",
            "/consumers/alice/totp/confirm",
            Some(json!({"code": code})),
            200,
        )
        .await;
    let codes = assert_recovery_codes(&confirmed);
    // The current code spent its step: the first one that works begins with the next step,
    // at most one period away.
    let next_in = confirmed["next_code_in"].as_u64().expect("next_code_in");
    assert!(next_in <= 30, "{confirmed}");
    let next_at = confirmed["next_code_at"].as_str().expect("next_code_at");
    assert!(
        next_at.ends_with(":00Z") || next_at.ends_with(":30Z"),
        "a step boundary: {next_at}"
    );
    let view = gw.view("alice").await;
    assert_eq!(view["totp"]["status"], "confirmed", "{view}");
    assert_eq!(view["factors"], json!(["totp", "recovery_code"]));
    assert_eq!(view["recovery_codes_remaining"], 10);
    for c in &codes {
        assert!(!view.to_string().contains(&normalize_code(c)));
    }

    // Confirmed: confirming again or enrolling again is a conflict.
    let r = gw
        .call(
            "POST",
            "/consumers/alice/totp/confirm",
            Some(json!({"code": totp_now(&secret)})),
        )
        .await;
    assert_admin_problem(&r, 409, "conflict");
    let r = gw
        .call("POST", "/consumers/alice/totp", Some(json!({})))
        .await;
    assert_admin_problem(&r, 409, "conflict");

    // Regenerate: a new, different set.
    let again = gw
        .ok("POST", "/consumers/alice/recovery-codes", None, 201)
        .await;
    let new_codes = assert_recovery_codes(&again);
    for c in &new_codes {
        assert!(
            !codes
                .iter()
                .any(|old| normalize_code(old) == normalize_code(c)),
            "regenerated code {c} was in the old set"
        );
    }
    assert_eq!(gw.view("alice").await["recovery_codes_remaining"], 10);

    // Reset: no factor, no codes; recovery codes need a confirmed TOTP again.
    let r = gw.call("DELETE", "/consumers/alice/totp", None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let view = gw.view("alice").await;
    assert_eq!(view["totp"], Value::Null, "{view}");
    assert_eq!(view["factors"], json!([]));
    assert_eq!(view["recovery_codes_remaining"], 0);
    let r = gw
        .call("POST", "/consumers/alice/recovery-codes", None)
        .await;
    assert_admin_problem(&r, 409, "conflict");

    // And a fresh enrolment works after a reset, with a new secret.
    let e2 = gw
        .ok("POST", "/consumers/alice/totp", Some(json!({})), 201)
        .await;
    assert_ne!(e2["secret"], e["secret"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_with_custom_parameters() {
    let (gw, _up) = setup().await;
    gw.add_consumer("carol", &[]).await;
    let e = gw
        .ok(
            "POST",
            "/consumers/carol/totp",
            Some(json!({"digits": 8, "period": 60, "algorithm": "SHA256"})),
            201,
        )
        .await;
    let secret = e["secret"].as_str().unwrap().to_string();
    let uri = e["otpauth_uri"].as_str().unwrap();
    for part in ["digits=8", "period=60", "algorithm=SHA256"] {
        assert!(uri.contains(part), "{part} in {uri}");
    }
    let view = gw.view("carol").await;
    assert_eq!(view["totp"]["algorithm"], "SHA256", "{view}");
    assert_eq!(view["totp"]["digits"], 8);
    assert_eq!(view["totp"]["period"], 60);

    // A default-parameter code (SHA-1, 6 digits) is not the code for these parameters.
    let r = gw
        .call(
            "POST",
            "/consumers/carol/totp/confirm",
            Some(json!({"code": totp_now(&secret)})),
        )
        .await;
    assert_admin_problem(&r, 400, "bad_request");
    let code = oathtool(&["--totp=SHA256", "-d", "8", "-s", "60s", "-b", &secret]);
    assert_eq!(code.len(), 8);
    let confirmed = gw
        .ok(
            "POST",
            "/consumers/carol/totp/confirm",
            Some(json!({"code": code})),
            200,
        )
        .await;
    assert_recovery_codes(&confirmed);
    assert_eq!(gw.view("carol").await["totp"]["status"], "confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lists_events_newest_first_without_secrets() {
    let (gw, _up) = setup().await;
    let alice = gw.add_consumer("alice", &["partner"]).await;
    let bob = gw.add_consumer("bob", &[]).await;
    let issued = gw.ok("POST", "/consumers/alice/keys", None, 201).await;
    gw.ok(
        "PATCH",
        "/consumers/bob",
        Some(json!({"disabled": true})),
        200,
    )
    .await;
    let e = gw
        .ok("POST", "/consumers/alice/totp", Some(json!({})), 201)
        .await;
    let secret = e["secret"].as_str().unwrap().to_string();
    let confirmed = gw
        .ok(
            "POST",
            "/consumers/alice/totp/confirm",
            Some(json!({"code": totp_now(&secret)})),
            200,
        )
        .await;
    let regenerated = gw
        .ok("POST", "/consumers/alice/recovery-codes", None, 201)
        .await;
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

    let r = gw.call("GET", "/audit", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let mut secrets: Vec<String> = vec![
        alice["api_key"].as_str().unwrap().into(),
        bob["api_key"].as_str().unwrap().into(),
        issued["api_key"].as_str().unwrap().into(),
        secret.clone(),
        secret.to_lowercase(),
    ];
    for set in [&confirmed, &regenerated] {
        for c in set["recovery_codes"].as_array().unwrap() {
            secrets.push(c.as_str().unwrap().into());
            secrets.push(normalize_code(c.as_str().unwrap()));
        }
    }
    for s in &secrets {
        assert!(
            !text.contains(s.as_str()),
            "audit shows a secret ({s}): {text}"
        );
        // Not even the secret part of a key after its public prefix.
        if s.starts_with("sgk_") {
            assert!(
                !text.contains(&s[12..]),
                "audit shows a key's secret part: {text}"
            );
        }
    }

    let all = r.json();
    let events = all["events"].as_array().expect("events array");
    assert!(events.len() >= 8, "one event per change at least: {all:#}");
    for e in events {
        for field in [
            "id",
            "at",
            "kind",
            "consumer_id",
            "consumer",
            "key_prefix",
            "detail",
        ] {
            assert!(e.get(field).is_some(), "event without {field}: {e}");
        }
        assert!(is_rfc3339(e["at"].as_str().unwrap()), "{e}");
    }
    // Newest first: ids strictly decreasing, times never increasing.
    for pair in events.windows(2) {
        assert!(
            pair[0]["id"].as_i64().unwrap() > pair[1]["id"].as_i64().unwrap(),
            "not newest first: {} then {}",
            pair[0],
            pair[1]
        );
        assert!(pair[0]["at"].as_str().unwrap() >= pair[1]["at"].as_str().unwrap());
    }
    // The latest thing done was the revocation; the first was alice's creation.
    assert_eq!(events[0]["consumer"], "alice");
    let newest_about_key = events
        .iter()
        .find(|e| e["key_prefix"] == alice["prefix"])
        .expect("events name the key by its prefix");
    assert!(
        newest_about_key["kind"]
            .as_str()
            .unwrap()
            .contains("revoke"),
        "the newest event about alice's first key is its revocation: {newest_about_key}"
    );
    let last = events.last().unwrap();
    assert!(last["kind"].as_str().unwrap().contains("created"), "{last}");
    assert_eq!(last["consumer"], "alice", "{last}");
    assert_eq!(last["consumer_id"], alice["id"]);
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let mut distinct = kinds.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() >= 6,
        "every kind of change is its own event: {kinds:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["key_prefix"] == issued["prefix"] && e["consumer"] == "alice"),
        "the issued key is audited by its prefix: {all:#}"
    );

    // Filter by consumer: exactly that consumer's events from the full list, in order.
    let ids_of = |events: &[Value]| -> Vec<i64> {
        events.iter().map(|e| e["id"].as_i64().unwrap()).collect()
    };
    for (name, consumer, must) in [
        ("bob", &bob, &["consumer_created", "consumer_updated"][..]),
        (
            "alice",
            &alice,
            &[
                "consumer_created",
                "key_issued",
                "key_revoked",
                "totp_enrolled",
            ][..],
        ),
    ] {
        let only = gw
            .ok("GET", &format!("/audit?consumer={name}"), None, 200)
            .await;
        let filtered = only["events"].as_array().unwrap();
        let expected: Vec<Value> = events
            .iter()
            .filter(|e| e["consumer"] == name)
            .cloned()
            .collect();
        assert_eq!(ids_of(filtered), ids_of(&expected), "{name}: {only:#}");
        assert!(
            filtered.iter().all(|e| e["consumer_id"] == consumer["id"]),
            "{only:#}"
        );
        for kind in must {
            assert!(
                filtered.iter().any(|e| e["kind"] == *kind),
                "{name} lacks {kind}: {only:#}"
            );
        }
    }
    let none = gw.ok("GET", "/audit?consumer=nobody", None, 200).await;
    assert_eq!(none["events"], json!([]));

    // limit and since.
    let two = gw.ok("GET", "/audit?limit=2", None, 200).await;
    let two = two["events"].as_array().unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(two[0], events[0]);
    assert_eq!(two[1], events[1]);
    let future = gw.ok("GET", "/audit?since=4102444800", None, 200).await;
    assert_eq!(
        future["events"],
        json!([]),
        "nothing after 2100-01-01 (unix seconds)"
    );
    let future = gw
        .ok("GET", "/audit?since=2100-01-01T00:00:00Z", None, 200)
        .await;
    assert_eq!(
        future["events"],
        json!([]),
        "nothing after 2100-01-01 (RFC 3339)"
    );
    let past = gw
        .ok("GET", "/audit?since=2000-01-01T00:00:00Z", None, 200)
        .await;
    assert_eq!(past["events"].as_array().unwrap().len(), events.len());
    let past = gw
        .ok("GET", "/audit?since=946684800&consumer=bob", None, 200)
        .await;
    let bob_events = events.iter().filter(|e| e["consumer"] == "bob").count();
    assert!(bob_events >= 2);
    assert_eq!(past["events"].as_array().unwrap().len(), bob_events);

    // Bad query values are refused, not ignored.
    for q in ["/audit?since=yesterday", "/audit?limit=abc"] {
        assert_admin_problem(&gw.call("GET", q, None).await, 400, "bad_request");
    }
}
