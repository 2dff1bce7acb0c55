//! Failure counts are per policy, and over all policies a consumer gets at most NIST SP
//! 800-63B's 100 failures (a burst of 100, refilled at 100 per hour).

use std::sync::Arc;

use serde_json::json;
use stepgate::clock::ManualClock;
use stepgate_testkit::*;

const T0: u64 = 1_800_000_000;

#[tokio::test]
async fn policies_count_separately_within_an_account_wide_ceiling() {
    let policy = "api_key: required\nsecond_factor: required\n\
                  failures: { per_consumer: { max: 25, window: 15m }, per_ip: { max: 1000, window: 15m }, ban: 15m }\n";
    let mut yaml = String::from(
        "listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\nupstreams: { demo: { echo: {} } }\nroutes:\n",
    );
    let mut files = Vec::new();
    let names: Vec<String> = (1..=5).map(|i| format!("p{i}")).collect();
    for name in &names {
        yaml.push_str(&format!(
            "  - {{ name: {name}, match: {{ path: /{name} }}, upstream: demo, policy: {name} }}\n"
        ));
    }
    let paths: Vec<String> = names.iter().map(|n| format!("policies/{n}.yaml")).collect();
    for path in &paths {
        files.push((path.as_str(), policy));
    }
    let dir = write_config_with(&yaml, &files);
    let gw = GatewayBuilder::in_dir(dir)
        .clock(Arc::new(ManualClock::new(T0)))
        .start_admin()
        .await;
    let key = gw.add_consumer("alice", &[]).await["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = gw.ok("POST", "/consumers/alice/totp", None, 201).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.ok(
        "POST",
        "/consumers/alice/totp/confirm",
        Some(json!({"code": totp_at(&secret, T0)})),
        200,
    )
    .await;
    let wrong = wrong_totp(&secret, "SHA1", 6, 30);

    // 20 failures on each of the 5 policies: each policy allows 25, the account 100.
    for name in &names {
        for _ in 0..20 {
            let r = get_with(
                gw.addr(),
                &format!("/{name}/x"),
                &[("x-api-key", &key), ("x-otp", &wrong)],
            )
            .await;
            assert_eq!(r.status.as_u16(), 401, "{}", r.text());
        }
    }
    // The 101st failure of the account is over the ceiling, on any policy.
    let r = get_with(
        gw.addr(),
        "/p1/x",
        &[("x-api-key", &key), ("x-otp", &wrong)],
    )
    .await;
    assert_eq!(r.status.as_u16(), 429, "{}", r.text());
    assert_eq!(r.json()["code"], "too_many_attempts");
    // ...and the consumer is banned everywhere, even with a correct code.
    let r = get_with(
        gw.addr(),
        "/p3/x",
        &[("x-api-key", &key), ("x-otp", &totp_at(&secret, T0 + 30))],
    )
    .await;
    assert_eq!(r.status.as_u16(), 429, "{}", r.text());
}
