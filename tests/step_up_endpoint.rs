//! `POST /_stepgate/step-up`: trades a code for a step-up token without calling an upstream.

use std::sync::Arc;

use serde_json::json;
use stepgate::clock::ManualClock;
use stepgate_testkit::*;

const T0: u64 = 1_800_000_000;

const CONFIG: &str = "listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
upstreams: { demo: { echo: {} } }
routes:
  - { name: secure, match: { path: /secure }, upstream: demo, policy: step-up }
  - { name: other, match: { path: /other }, upstream: demo, policy: other }
";

async fn enrolled(gw: &AdminGw, name: &str) -> (String, String) {
    let created = gw.add_consumer(name, &[]).await;
    let key = created["api_key"].as_str().unwrap().to_owned();
    let secret = gw
        .ok("POST", &format!("/consumers/{name}/totp"), None, 201)
        .await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    // Confirm with the code of the previous step, so the current step's code stays fresh.
    gw.ok(
        "POST",
        &format!("/consumers/{name}/totp/confirm"),
        Some(json!({"code": totp_at(&secret, T0 - 30)})),
        200,
    )
    .await;
    (key, secret)
}

async fn post(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = req("POST", path, "gw.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send_http1(addr, b.body(empty()).unwrap()).await
}

#[tokio::test]
async fn a_code_buys_a_token_that_works_on_the_policys_routes() {
    let dir = write_config_with(
        CONFIG,
        &[
            (
                "policies/step-up.yaml",
                "api_key: required\nsecond_factor: required\nstep_up: { ttl: 10m, scope: policy }\n",
            ),
            (
                "policies/other.yaml",
                "api_key: required\nsecond_factor: required\nstep_up: { ttl: 0s }\n",
            ),
        ],
    );
    let clock = Arc::new(ManualClock::new(T0));
    let gw = GatewayBuilder::in_dir(dir)
        .clock(clock.clone())
        .start_admin()
        .await;
    let (key, secret) = enrolled(&gw, "alice").await;

    // No code: the OTP challenge, like any protected route.
    let r = post(gw.addr(), "/_stepgate/step-up", &[("x-api-key", &key)]).await;
    assert_eq!(r.status.as_u16(), 401, "{}", r.text());
    assert_eq!(r.json()["code"], "otp_required");

    // Only one policy issues tokens (`other` has ttl 0), so no ?policy= is needed.
    let code = totp_at(&secret, T0);
    let r = post(
        gw.addr(),
        "/_stepgate/step-up",
        &[("x-api-key", &key), ("x-otp", &code)],
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    assert_eq!(r.headers["cache-control"], "no-store");
    let body = r.json();
    let token = body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("sgt_") && token.len() == 68, "{token}");
    assert_eq!(body["expires_at"], date_rfc3339(T0 + 600));

    // The token works on the policy's route...
    let r = get_with(
        gw.addr(),
        "/secure/x",
        &[("x-api-key", &key), ("x-step-up-token", &token)],
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-stepgate-auth"], "key+step_up");
    // ...not on another policy's (scope: policy).
    let r = get_with(
        gw.addr(),
        "/other/x",
        &[("x-api-key", &key), ("x-step-up-token", &token)],
    )
    .await;
    assert_eq!(r.status.as_u16(), 401);
    assert_eq!(r.json()["code"], "step_up_invalid");

    // The same code again is a replay.
    let r = post(
        gw.addr(),
        "/_stepgate/step-up",
        &[("x-api-key", &key), ("x-otp", &code)],
    )
    .await;
    assert_eq!(r.status.as_u16(), 401);
    assert_eq!(r.json()["code"], "otp_invalid");

    // A token does not buy another token.
    let r = post(
        gw.addr(),
        "/_stepgate/step-up",
        &[("x-api-key", &key), ("x-step-up-token", &token)],
    )
    .await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.text());

    // Naming a policy that issues no tokens, or GET, finds nothing to do.
    let r = post(
        gw.addr(),
        "/_stepgate/step-up?policy=other",
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(r.status.as_u16(), 400);
    let r = get_with(gw.addr(), "/_stepgate/step-up", &[("x-api-key", &key)]).await;
    assert_eq!(r.status.as_u16(), 404);
}

#[test]
fn routes_may_not_claim_the_reserved_prefix() {
    let dir = write_config_with(
        "listen: 127.0.0.1:0\nupstreams: { demo: { echo: {} } }\nroutes:\n  - { name: x, match: { path: /_stepgate/x }, upstream: demo, policy: public }\n",
        &[("policies/public.yaml", DEFAULT_POLICY)],
    );
    let errors = stepgate::config::load(&config_path(&dir))
        .err()
        .expect("refused");
    assert!(errors.to_string().contains("reserved"), "{errors}");
}
