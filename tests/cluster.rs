//! Several gateways, one truth: two or three real `stepgate` processes on one real
//! `redis-server` (see `stepgate_testkit::cluster`). Every security property holds across
//! the nodes: a code is accepted once wherever it is presented, a token works everywhere and
//! dies everywhere, failures are counted against one budget and bans hold on every node,
//! and what one node writes, the others serve.
//!
//! Propagation times are printed (run with `--nocapture` to see them); the assertions bound
//! them generously (a loaded test machine is not a benchmark), the numbers go in the report.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::json;
use stepgate_testkit::cluster::{Cluster, Enrolled, Node};
use stepgate_testkit::*;

/// How long a change may take to reach another node before the test fails (the target is
/// 100 ms; this bound only catches a change that does not propagate).
const PROPAGATION_BOUND: Duration = Duration::from_secs(2);

/// Polls `node` until `done(response)`; the time it took.
async fn until<F>(node: &Node, path: &str, headers: &[(&str, &str)], done: F) -> Duration
where
    F: Fn(&Resp) -> bool,
{
    let started = Instant::now();
    loop {
        let r = node.request("GET", path, headers).await;
        if done(&r) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PROPAGATION_BOUND,
            "not propagated within {PROPAGATION_BOUND:?}: last answer {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn summary(label: &str, mut times: Vec<Duration>) -> Duration {
    times.sort();
    let worst = *times.last().unwrap();
    let median = times[times.len() / 2];
    println!(
        "{label}: {} tries, median {:.1} ms, worst {:.1} ms",
        times.len(),
        median.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
    worst
}

/// `uses` concurrent requests with one credential, spread round robin over the nodes; the
/// statuses.
async fn spread(c: &Cluster, uses: usize, path: &str, key: &str, otp: &str) -> Vec<u16> {
    let requests = (0..uses).map(|i| {
        let node = c.node(i % c.nodes.len());
        async move { node.get(path, key, Some(otp)).await.status.as_u16() }
    });
    join_all(requests).await
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_accepted_on_one_node_is_refused_on_another_right_after() {
    let c = Cluster::start(2).await;
    let alice = c.enrolled("alice").await;
    let code = alice.next_code();
    let r = c.node(0).get("/secure/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    c.node(1)
        .get("/secure/x", &alice.key, Some(&code))
        .await
        .assert_problem(401, "otp_invalid");
    let recovery = &alice.recovery_codes[0];
    let r = c.node(1).get("/secure/x", &alice.key, Some(recovery)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    c.node(0)
        .get("/secure/x", &alice.key, Some(recovery))
        .await
        .assert_problem(401, "otp_invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_uses_of_one_totp_code_over_three_nodes_give_one_success() {
    let c = Cluster::start(3).await;
    let alice = c.enrolled("alice").await;
    let statuses = spread(&c, 50, "/secure/x", &alice.key, &alice.next_code()).await;
    assert_eq!(count(&statuses, 200), 1, "{statuses:?}");
    // The rest are refused: the reused code, then the ban it leads to.
    assert_eq!(
        count(&statuses, 401) + count(&statuses, 429),
        49,
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_uses_of_one_recovery_code_over_three_nodes_give_one_success() {
    let c = Cluster::start(3).await;
    let alice = c.enrolled("alice").await;
    let statuses = spread(&c, 50, "/secure/x", &alice.key, &alice.recovery_codes[3]).await;
    assert_eq!(count(&statuses, 200), 1, "{statuses:?}");
    let view = c.node(2).view_consumer("alice").await;
    assert_eq!(view["recovery_codes_remaining"], 9, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sms_code_is_accepted_once_over_three_nodes() {
    let c = Cluster::start(3).await;
    let key = c
        .node(0)
        .ok("POST", "/consumers", Some(json!({"name": "sam"})), 201)
        .await["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    // The verification code of an enrolment, presented 50 times at once over the nodes.
    let r = c
        .node(0)
        .request_json(
            "POST",
            "/_stepgate/2fa/sms",
            &[("x-api-key", &key)],
            json!({"phone": "+447700900123"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let code = c.twilio.last_code();
    let confirms = (0..50).map(|i| {
        let node = c.node(i % 3);
        let (key, code) = (key.clone(), code.clone());
        async move {
            node.request(
                "POST",
                "/_stepgate/2fa/sms/confirm",
                &[("x-api-key", &key), ("x-otp", &code)],
            )
            .await
            .status
            .as_u16()
        }
    });
    let statuses = join_all(confirms).await;
    assert_eq!(count(&statuses, 200), 1, "{statuses:?}");
    // The send budget is one for all nodes: the verification text was this consumer's text
    // of the last 30 s, whichever node is asked.
    for node in &c.nodes {
        node.request("POST", "/_stepgate/sms/send", &[("x-api-key", &key)])
            .await
            .assert_problem(429, "too_many_attempts");
    }
    assert_eq!(c.twilio.messages().len(), 1, "one text so far");
    // A login code texted by one node, used on another, then refused on a third.
    wait_for_send_interval().await;
    let r = c
        .node(1)
        .request("POST", "/_stepgate/sms/send", &[("x-api-key", &key)])
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let login = c.twilio.last_code();
    let r = c.node(2).get("/sms/x", &key, Some(&login)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    c.node(0)
        .get("/sms/x", &key, Some(&login))
        .await
        .assert_problem(401, "otp_invalid");
}

/// One text per consumer per 30 s, counted over every node.
async fn wait_for_send_interval() {
    tokio::time::sleep(Duration::from_secs(31)).await;
}

/// A step-up token for a freshly enrolled consumer, earned on `node`.
async fn token_for(node: &Node, who: &Enrolled) -> String {
    let r = node
        .get("/secure/x", &who.key, Some(&who.next_code()))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-step-up-token")
        .expect("a step-up token with the answer")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_issued_on_one_node_works_on_another_and_every_revocation_reaches_it() {
    let c = Cluster::start(2).await;
    let (a, b) = (c.node(0), c.node(1));
    let kinds = ["step-up-tokens", "key", "totp", "disable", "delete"];
    let mut all = Vec::new();
    for (k, kind) in kinds.into_iter().enumerate() {
        let mut times = Vec::new();
        for i in 0..20 {
            let who = c.enrolled(&format!("{kind}-{i}")).await;
            let token = token_for(a, &who).await;
            // Each try from its own client address (through the trusted load balancer): the
            // polling below counts as failed attempts, which would ban one address.
            let client = format!("10.0.{k}.{i}");
            let headers = [
                ("x-api-key", who.key.as_str()),
                ("x-step-up-token", token.as_str()),
                ("x-forwarded-for", client.as_str()),
            ];
            let r = b.request("GET", "/secure/x", &headers).await;
            assert_eq!(
                r.status,
                200,
                "the token works on the other node: {}",
                r.text()
            );
            let name = &who.name;
            match kind {
                "step-up-tokens" => {
                    a.ok(
                        "DELETE",
                        &format!("/consumers/{name}/step-up-tokens"),
                        None,
                        204,
                    )
                    .await
                }
                "key" => {
                    let prefix = &who.key[..12];
                    a.ok(
                        "DELETE",
                        &format!("/consumers/{name}/keys/{prefix}"),
                        None,
                        204,
                    )
                    .await
                }
                "totp" => {
                    a.ok("DELETE", &format!("/consumers/{name}/totp"), None, 204)
                        .await
                }
                "disable" => {
                    a.ok(
                        "PATCH",
                        &format!("/consumers/{name}"),
                        Some(json!({"disabled": true})),
                        200,
                    )
                    .await
                }
                _ => {
                    a.ok("DELETE", &format!("/consumers/{name}"), None, 204)
                        .await
                }
            };
            times.push(until(b, "/secure/x", &headers, |r| r.status != 200).await);
            if kind == "step-up-tokens" {
                b.request("GET", "/secure/x", &headers)
                    .await
                    .assert_problem(401, "step_up_invalid");
            }
        }
        all.extend(times.iter().copied());
        summary(
            &format!("revocation by {kind} reaches the other node"),
            times,
        );
    }
    summary("every revocation", all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_brute_force_over_three_nodes_gets_the_budget_of_one_and_its_ban_holds_everywhere() {
    let c = Cluster::start(3).await;
    let alice = c.enrolled("alice").await;
    let wrong = wrong_totp(&alice.secret, "SHA1", 6, 30);
    // Five failures allowed per consumer, spread over the nodes: the sixth starts the ban.
    for i in 0..5 {
        c.node(i % 3)
            .get("/secure/x", &alice.key, Some(&wrong))
            .await
            .assert_problem(401, "otp_invalid");
    }
    c.node(2)
        .get("/secure/x", &alice.key, Some(&wrong))
        .await
        .assert_problem(429, "too_many_attempts");
    // Every node refuses even the right code now.
    let right = alice.next_code();
    for node in &c.nodes {
        let headers = [("x-api-key", alice.key.as_str()), ("x-otp", right.as_str())];
        until(node, "/secure/x", &headers, |r| r.status == 429).await;
    }
    let bans = c.node(1).ok("GET", "/bans", None, 200).await;
    assert!(
        bans.to_string().contains(&alice.id),
        "the ban is listed on every node: {bans}"
    );
    // An unlock on one node lifts it everywhere.
    c.node(1)
        .ok("POST", "/consumers/alice/unlock", None, 204)
        .await;
    let mut times = Vec::new();
    for node in [c.node(0), c.node(2)] {
        let headers = [("x-api-key", alice.key.as_str())];
        times.push(until(node, "/keyed/x", &headers, |r| r.status == 200).await);
    }
    summary("an unlock reaches the other nodes", times);
    let r = c.node(0).get("/secure/x", &alice.key, Some(&right)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bans_survive_a_restart_of_any_node_and_of_redis() {
    let mut c = Cluster::start(2).await;
    let alice = c.enrolled("alice").await;
    let wrong = wrong_totp(&alice.secret, "SHA1", 6, 30);
    for i in 0..6 {
        c.node(i % 2)
            .get("/secure/x", &alice.key, Some(&wrong))
            .await;
    }
    let banned = |node: &Node| {
        let key = alice.key.clone();
        let node_addr = node.addr;
        async move {
            let r = send_http1(
                node_addr,
                req("GET", "/keyed/x", "api.example.com")
                    .header("x-api-key", key)
                    .body(empty())
                    .unwrap(),
            )
            .await;
            r.status.as_u16()
        }
    };
    assert_eq!(banned(c.node(1)).await, 429);
    c.nodes[1].restart().await;
    assert_eq!(
        banned(c.node(1)).await,
        429,
        "a restarted node holds the ban"
    );
    c.redis.kill();
    c.redis.restart();
    for node in &mut c.nodes {
        node.wait_ready().await;
    }
    for node in &c.nodes {
        assert_eq!(banned(node).await, 429, "the ban survived Redis's restart");
    }
    c.nodes[0].restart().await;
    assert_eq!(banned(c.node(0)).await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_write_on_one_node_is_live_on_the_other() {
    let c = Cluster::start(2).await;
    let (a, b) = (c.node(0), c.node(1));
    let mut created = Vec::new();
    let mut changed = Vec::new();
    for i in 0..20 {
        let name = format!("c{i}");
        let key = a
            .ok("POST", "/consumers", Some(json!({"name": name})), 201)
            .await["api_key"]
            .as_str()
            .unwrap()
            .to_string();
        let headers = [("x-api-key", key.as_str())];
        created.push(until(b, "/keyed/x", &headers, |r| r.status == 200).await);
        a.ok(
            "PATCH",
            &format!("/consumers/{name}"),
            Some(json!({"roles": ["ops"]})),
            200,
        )
        .await;
        changed.push(
            until(b, "/keyed/x", &headers, |r| {
                r.status == 200 && r.json()["headers"]["x-consumer-roles"] == "ops"
            })
            .await,
        );
        let second = a
            .ok("POST", &format!("/consumers/{name}/keys"), None, 201)
            .await;
        let second = second["api_key"].as_str().unwrap().to_string();
        let headers2 = [("x-api-key", second.as_str())];
        changed.push(until(b, "/keyed/x", &headers2, |r| r.status == 200).await);
        a.ok(
            "PATCH",
            &format!("/consumers/{name}"),
            Some(json!({"disabled": true})),
            200,
        )
        .await;
        changed.push(until(b, "/keyed/x", &headers, |r| r.status == 401).await);
    }
    summary("a new consumer is live on the other node", created);
    summary(
        "a role, key or disable change is live on the other node",
        changed,
    );
    assert_eq!(b.view_consumer("c0").await["roles"], json!(["ops"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_events_of_every_node_are_read_from_any_node_newest_first() {
    let c = Cluster::start(3).await;
    let alice = c.enrolled("alice").await;
    let wrong = wrong_totp(&alice.secret, "SHA1", 6, 30);
    c.node(1)
        .get("/secure/x", &alice.key, Some(&wrong))
        .await
        .assert_problem(401, "otp_invalid");
    let r = c
        .node(2)
        .get("/secure/x", &alice.key, Some(&alice.next_code()))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Audit events are written in the background: wait for both nodes' to land.
    let started = Instant::now();
    let events = loop {
        let audit = c
            .node(0)
            .ok("GET", "/audit?consumer=alice", None, 200)
            .await;
        let events = audit["events"].as_array().cloned().unwrap_or_default();
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
        if kinds.contains(&"otp_rejected") && kinds.contains(&"step_up_issued") {
            break events;
        }
        assert!(
            started.elapsed() < STEP,
            "audit events not all there: {audit}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let times: Vec<String> = events
        .iter()
        .map(|e| e["at"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut sorted = times.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(times, sorted, "newest first");
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_accepted_before_redis_is_killed_is_refused_after_it_restarts() {
    let mut c = Cluster::start(2).await;
    let alice = c.enrolled("alice").await;
    let code = alice.next_code();
    let r = c.node(0).get("/secure/x", &alice.key, Some(&code)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let recovery = alice.recovery_codes[0].clone();
    let r = c
        .node(0)
        .get("/secure/x", &alice.key, Some(&recovery))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // SIGKILL: only what was fsynced survives (appendfsync always: every acknowledged write).
    c.redis.kill();
    c.redis.restart();
    for node in &mut c.nodes {
        node.wait_ready().await;
    }
    for otp in [&code, &recovery] {
        c.node(1)
            .get("/secure/x", &alice.key, Some(otp))
            .await
            .assert_problem(401, "otp_invalid");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_redis_is_down_codes_fail_closed_and_cached_tokens_last_only_the_staleness_bound() {
    let mut c = Cluster::start(2).await;
    let alice = c.enrolled("alice").await;
    let token = token_for(c.node(0), &alice).await;
    let with_token = [
        ("x-api-key", alice.key.as_str()),
        ("x-step-up-token", token.as_str()),
    ];
    c.redis.kill();
    let down = Instant::now();
    // A code cannot be checked without Redis: refused at once, whatever the code.
    c.node(1)
        .get("/secure/x", &alice.key, Some(&alice.next_code()))
        .await
        .assert_problem(503, "unavailable");
    // The token this node holds is served until the staleness bound (1 s here)...
    let r = c.node(0).request("GET", "/secure/x", &with_token).await;
    if down.elapsed() < Duration::from_millis(800) {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // ...then refused, as is any keyed request, and the node says it is not ready.
    let polling_from = down.elapsed();
    let stale = until(c.node(0), "/secure/x", &with_token, |r| r.status == 503).await;
    println!(
        "a node stopped trusting its copies {:.0} ms after Redis went down (bound: 1 s)",
        (polling_from + stale).as_secs_f64() * 1e3
    );
    c.node(0)
        .request("GET", "/keyed/x", &[("x-api-key", alice.key.as_str())])
        .await
        .assert_problem(503, "unavailable");
    for node in &c.nodes {
        assert_eq!(node.readyz().await, Some(503));
    }
    let metrics = c.node(0).call("GET", "/metrics", None).await.text();
    assert!(metrics.contains("stepgate_store_up 0"), "{metrics}");
    assert!(metrics.contains("stepgate_store_stale 1"), "{metrics}");
    assert!(
        c.node(0).log().contains("out of touch with Redis"),
        "{}",
        c.node(0).log()
    );
    // Back: the nodes reconnect, resync, and serve again.
    c.redis.restart();
    for node in &mut c.nodes {
        node.wait_ready().await;
    }
    let r = c.node(1).request("GET", "/secure/x", &with_token).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The ACL user `docs/cluster.md` documents, exactly as written there, is all a gateway needs:
/// every kind of write (codes, confirmations, SMS, tokens, failures, bans, unlocks, deletes,
/// audit) and `store copy` both ways run as that user, and Redis logs no denied command.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_needs_only_the_commands_the_documented_acl_user_allows() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cluster.md")).unwrap();
    let acl = doc
        .lines()
        .find(|l| l.starts_with("ACL SETUSER stepgate "))
        .expect("the ACL line in docs/cluster.md");
    let c = Cluster::start(0).await;
    let args: Vec<String> = acl
        .split_whitespace()
        .map(|a| a.replace(">CHANGE-ME", ">acl-test-password"))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(c.redis.cli(&args), "OK");
    let secrets = tempfile::tempdir().unwrap();
    let password = secrets.path().join("redis.password");
    stepgate_testkit::cluster::write_private(&password, "acl-test-password");
    let store = format!(
        "store:\n  redis:\n    url: redis://stepgate@127.0.0.1:{}\n    password_file: {}\n    stale_for: 1s\n",
        c.redis.port(),
        password.display()
    );
    let node = Node::start_on(&store, &c.twilio).await;
    assert!(
        !node.log().contains("maxmemory-policy"),
        "the eviction policy could be read: {}",
        node.log()
    );

    let alice = node.enrol("alice").await;
    let token = token_for(&node, &alice).await;
    assert_eq!(
        node.get_with_token("/secure/x", &alice.key, &token)
            .await
            .status,
        200
    );
    assert_eq!(
        node.get("/secure/x", &alice.key, Some(&alice.recovery_codes[0]))
            .await
            .status,
        200
    );
    node.ok("DELETE", "/consumers/alice/step-up-tokens", None, 204)
        .await;
    node.ok("POST", "/consumers/alice/keys", None, 201).await;
    node.ok(
        "PATCH",
        "/consumers/alice",
        Some(json!({"roles": ["ops"]})),
        200,
    )
    .await;
    node.ok("POST", "/consumers/alice/recovery-codes", None, 201)
        .await;
    let wrong = wrong_totp(&alice.secret, "SHA1", 6, 30);
    for _ in 0..6 {
        node.get("/secure/x", &alice.key, Some(&wrong)).await;
    }
    assert_eq!(node.get("/keyed/x", &alice.key, None).await.status, 429);
    let bans = node.ok("GET", "/bans", None, 200).await;
    assert_eq!(bans["bans"][0]["consumer"], "alice", "{bans}");
    node.ok("POST", "/consumers/alice/unlock", None, 204).await;
    let sam = node
        .ok("POST", "/consumers", Some(json!({"name": "sam"})), 201)
        .await["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = node
        .request_json(
            "POST",
            "/_stepgate/2fa/sms",
            &[("x-api-key", &sam)],
            json!({"phone": "+447700900123"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let code = c.twilio.last_code();
    let r = node
        .request(
            "POST",
            "/_stepgate/2fa/sms/confirm",
            &[("x-api-key", &sam), ("x-otp", &code)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    node.ok("DELETE", "/consumers/alice/totp", None, 204).await;
    node.ok("DELETE", "/consumers/sam", None, 204).await;
    let audit = node.ok("GET", "/audit?limit=1000", None, 200).await;
    assert!(audit["events"].as_array().unwrap().len() > 10, "{audit}");
    assert_eq!(node.readyz().await, Some(200));

    // `store copy` out of Redis and back in, as the same user.
    let backup = secrets.path().join("backup.db");
    let url = format!("redis://stepgate@127.0.0.1:{}", c.redis.port());
    for (from, to) in [
        (url.clone(), format!("sqlite:{}", backup.display())),
        (format!("sqlite:{}", backup.display()), url.clone()),
    ] {
        let out = std::process::Command::new(stepgate_bin())
            .args([
                "store",
                "copy",
                "-c",
                "gateway.yaml",
                "--from",
                &from,
                "--to",
                &to,
            ])
            .arg("--password-file")
            .arg(&password)
            .current_dir(node.dir())
            .env("STEPGATE_MASTER_KEY", stepgate_testkit::cluster::MASTER_KEY)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(c.redis.cli(&["ACL", "LOG"]), "", "commands were denied");
    assert!(!node.log().contains("NOPERM"), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_asked_on_one_node_is_approved_on_a_second_and_used_once_on_a_third() {
    let c = Cluster::start(3).await;
    let bot = c
        .node(0)
        .ok("POST", "/consumers", Some(json!({"name": "bot"})), 201)
        .await;
    let bot_key = bot["api_key"].as_str().unwrap().to_owned();
    let oncall = c.enrolled("oncall").await;
    c.node(0)
        .ok(
            "PATCH",
            "/consumers/oncall",
            Some(json!({"roles": ["ops"]})),
            200,
        )
        .await;
    let body = json!({"version": "2.0.0"});
    let asked = c
        .node(0)
        .request_json(
            "POST",
            "/deploy/web",
            &[("x-api-key", &bot_key)],
            body.clone(),
        )
        .await;
    let id = asked.assert_problem(401, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Node 1 lists it for the approver (its roles reach every node first) and takes the decision.
    until(
        c.node(1),
        "/_stepgate/approvals",
        &[("x-api-key", &oncall.key)],
        |r| r.status == 200 && r.text().contains(&id),
    )
    .await;
    let code = oncall.next_code();
    let r = c
        .node(1)
        .request(
            "POST",
            &format!("/_stepgate/approvals/{id}/approve"),
            &[("x-api-key", &oncall.key), ("x-otp", &code)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Node 2 lets the exact repeat through once; node 0 then refuses it.
    let repeat = |node: usize| {
        let (key, id, body) = (bot_key.clone(), id.clone(), body.clone());
        let c = &c;
        async move {
            c.node(node)
                .request_json(
                    "POST",
                    "/deploy/web",
                    &[("x-api-key", &key), ("x-approval", &id)],
                    body,
                )
                .await
        }
    };
    let r = repeat(2).await;
    assert_eq!(r.status, 200, "{}", r.text());
    repeat(0).await.assert_problem(401, "approval_invalid");
    repeat(1).await.assert_problem(401, "approval_invalid");
}
