//! `second_factor: writes`: a code on unsafe methods only, the key alone on safe ones, in one
//! policy; checked at load, and explained per method.
use stepgate_testkit::*;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
data_dir: "${data_dir}"
upstreams:
  app: { url: "${app}" }
routes:
  - { name: packages, match: { path: /packages }, upstream: app, policy: writes }
"#;

const WRITES: &str =
    "api_key: required\nsecond_factor: writes\nstep_up: { ttl: 10m, scope: policy }\n";

async fn setup() -> TwoFactor {
    TwoFactor::start_custom(CustomConfig {
        template: CONFIG.to_owned(),
        policies: vec![("policies/writes.yaml".into(), WRITES.into())],
    })
    .await
}

#[tokio::test]
async fn reads_need_the_key_and_writes_a_code_too() {
    let t = setup().await;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;

    for method in ["GET", "HEAD", "OPTIONS"] {
        let r = t
            .send(method, "/packages/left-pad", &[("x-api-key", &alice.key)])
            .await;
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        let seen = t.up.requests().pop().unwrap();
        assert_eq!(seen.header("x-stepgate-auth"), Some("key"), "{method}");
    }
    // A code sent on a read is not needed, not checked, and not forwarded.
    let r = t
        .send(
            "GET",
            "/packages/x",
            &[("x-api-key", &alice.key), ("x-otp", "000000")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(t.up.requests().pop().unwrap().header("x-otp").is_none());

    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let r = t
            .send(method, "/packages/left-pad", &[("x-api-key", &alice.key)])
            .await;
        r.assert_problem(401, "otp_required");
    }
    let code = totp_at(&e.secret, t.now());
    let r = t
        .send(
            "PUT",
            "/packages/left-pad",
            &[("x-api-key", &alice.key), ("x-otp", &code)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        t.up.requests().pop().unwrap().header("x-stepgate-auth"),
        Some("key+totp")
    );
    let token = r
        .header("x-step-up-token")
        .expect("a code earns a token")
        .to_owned();
    for method in ["POST", "PATCH", "DELETE"] {
        let r = t
            .send(
                method,
                "/packages/left-pad",
                &[("x-api-key", &alice.key), ("x-step-up-token", &token)],
            )
            .await;
        assert_eq!(r.status, 200, "{method}: {}", r.text());
    }
    // Bob has no second factor: he may read, and is told to enrol to write.
    let bob = t.consumer("bob", &[]).await;
    let r = t
        .send("GET", "/packages/x", &[("x-api-key", &bob.key)])
        .await;
    assert_eq!(r.status, 200);
    let r = t
        .send("POST", "/packages/x", &[("x-api-key", &bob.key)])
        .await;
    r.assert_problem(403, "enrollment_required");
}

#[test]
fn writes_is_checked_and_explained_per_method() {
    let dir = write_config_with(
        "listen: 127.0.0.1:0\nupstreams: { app: { echo: {} } }\nroutes:\n  - { name: p, match: { path: /p }, upstream: app, policy: writes }\n",
        &[("policies/writes.yaml", WRITES)],
    );
    let cfg = path_str(&config_path(&dir));
    let (code, out, err) = run_cli(&["explain", "GET", "/p/x", "-c", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("second_factor: writes"), "{out}");
    assert!(
        out.contains("caller must present: an API key (X-Api-Key)\n"),
        "{out}"
    );
    assert!(!out.contains("X-OTP"), "{out}");
    let (code, out, _) = run_cli(&["explain", "DELETE", "/p/x", "-c", &cfg]);
    assert_eq!(code, 0);
    assert!(out.contains("in X-OTP"), "{out}");

    for (policy, needle) in [
        (
            "api_key: writes\nsecond_factor: off\n",
            "applies to second_factor only",
        ),
        (
            "api_key: off\nsecond_factor: writes\n",
            "need `api_key: required`",
        ),
    ] {
        let dir = write_config_with(
            "listen: 127.0.0.1:0\nupstreams: { app: { echo: {} } }\nroutes:\n  - { name: p, match: { path: /p }, upstream: app, policy: writes }\n",
            &[("policies/writes.yaml", policy)],
        );
        let (code, _, err) = run_cli(&["check", "-c", &path_str(&config_path(&dir))]);
        assert_eq!(code, 1, "{policy}");
        assert!(err.contains(needle), "{policy}: {err}");
    }
}
