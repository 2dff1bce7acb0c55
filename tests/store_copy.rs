//! `stepgate store copy`: a gateway's SQLite data moved to a real `redis-server` and back,
//! with real `stepgate` processes before and after. What was true before the copy is true
//! after it: keys work (revoked ones do not), a spent TOTP step and a used recovery code stay
//! spent, a disabled consumer stays disabled, a ban holds, the audit log reads the same; and
//! running the copy again changes nothing.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use stepgate_testkit::cluster::{MASTER_KEY, Node};
use stepgate_testkit::redis::RedisServer;
use stepgate_testkit::twilio::FakeTwilio;
use stepgate_testkit::*;

const SQLITE: &str = "store: { sqlite: { path: data/stepgate.db } }\n";

/// `stepgate store copy` in `dir` (its `gateway.yaml`) with the cluster's master key:
/// exit code, stdout, stderr.
fn copy(dir: &Path, master: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(stepgate_bin())
        .args(["store", "copy", "-c", "gateway.yaml"])
        .args(args)
        .current_dir(dir)
        .env("STEPGATE_MASTER_KEY", master)
        .env_remove("STEPGATE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The numbers of one line of the report: total, copied, already there.
fn tally(report: &str, what: &str) -> (usize, usize, usize) {
    let line = report
        .lines()
        .find(|l| l.starts_with(what))
        .unwrap_or_else(|| panic!("no `{what}` line in:\n{report}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], numbers[1], numbers[2])
}

async fn status(node: &Node, path: &str, key: &str, otp: Option<&str>) -> u16 {
    node.get(path, key, otp).await.status.as_u16()
}

fn audit_kinds(events: &serde_json::Value) -> Vec<(String, u64)> {
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["at"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_to_redis_and_back_keeps_every_guarantee() {
    let twilio = FakeTwilio::start().await;
    let redis = RedisServer::start();

    // A gateway on SQLite, used for a while.
    let mut before = Node::start_on(SQLITE, &twilio).await;
    let alice = before.enrol("alice").await;
    let spent = alice.next_code();
    while status(&before, "/secure/x", &alice.key, Some(&spent)).await != 200 {
        // The next step has not begun yet.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        status(
            &before,
            "/secure/x",
            &alice.key,
            Some(&alice.recovery_codes[0])
        )
        .await,
        200
    );
    let issued = before.ok("POST", "/consumers/alice/keys", None, 201).await;
    let second_key = issued["api_key"].as_str().unwrap().to_owned();
    let revoked_prefix = issued["prefix"].as_str().unwrap();
    before
        .ok(
            "DELETE",
            &format!("/consumers/alice/keys/{revoked_prefix}"),
            None,
            204,
        )
        .await;
    let bob = before
        .ok(
            "POST",
            "/consumers",
            Some(json!({"name": "bob", "roles": ["ops"]})),
            201,
        )
        .await["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    before
        .ok(
            "PATCH",
            "/consumers/bob",
            Some(json!({"disabled": true})),
            200,
        )
        .await;
    let mallory = before.enrol("mallory").await;
    let wrong = wrong_totp(&mallory.secret, "SHA1", 6, 30);
    for _ in 0..6 {
        before.get("/secure/x", &mallory.key, Some(&wrong)).await;
    }
    assert_eq!(status(&before, "/keyed/x", &mallory.key, None).await, 429);
    let audit_before = before.ok("GET", "/audit?limit=1000", None, 200).await;
    before.stop();

    // Copied to Redis: everything.
    let dir = before.dir().to_owned();
    let url = redis.url();
    let (code, out, err) = copy(&dir, MASTER_KEY, &["--from", "config", "--to", &url]);
    assert_eq!(code, 0, "{out}{err}");
    println!("{out}");
    assert_eq!(tally(&out, "consumers"), (3, 3, 0));
    assert_eq!(tally(&out, "bans"), (1, 1, 0));
    let (events, copied, _) = tally(&out, "audit events");
    assert_eq!(events, copied);
    assert!(events >= audit_kinds(&audit_before).len());
    assert!(out.contains("verified"), "{out}");

    // Again: nothing to do.
    let (code, out, err) = copy(&dir, MASTER_KEY, &["--from", "config", "--to", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tally(&out, "consumers"), (3, 0, 3));
    assert_eq!(tally(&out, "bans"), (1, 0, 1));
    assert_eq!(tally(&out, "audit events"), (events, 0, events));

    // A gateway on the Redis copy keeps every guarantee.
    let after = Node::start_on(&redis.store_yaml(), &twilio).await;
    assert_eq!(status(&after, "/keyed/x", &alice.key, None).await, 200);
    assert_eq!(status(&after, "/keyed/x", &second_key, None).await, 401);
    assert_eq!(status(&after, "/keyed/x", &bob, None).await, 401);
    let bob_view = after.view_consumer("bob").await;
    assert_eq!(bob_view["disabled"], true, "{bob_view}");
    assert_eq!(bob_view["roles"], json!(["ops"]), "{bob_view}");
    assert_eq!(
        status(&after, "/secure/x", &alice.key, Some(&spent)).await,
        401,
        "a spent TOTP step stays spent"
    );
    assert_eq!(
        status(
            &after,
            "/secure/x",
            &alice.key,
            Some(&alice.recovery_codes[0])
        )
        .await,
        401,
        "a used recovery code stays used"
    );
    assert_eq!(
        status(
            &after,
            "/secure/x",
            &alice.key,
            Some(&alice.recovery_codes[1])
        )
        .await,
        200
    );
    assert_eq!(status(&after, "/keyed/x", &mallory.key, None).await, 429);
    let bans = after.ok("GET", "/bans", None, 200).await;
    assert_eq!(bans["bans"][0]["consumer"], "mallory", "{bans}");
    let audit_after = after.ok("GET", "/audit?limit=1000", None, 200).await;
    let kinds_after = audit_kinds(&audit_after);
    let kinds_before = audit_kinds(&audit_before);
    assert_eq!(
        kinds_after[kinds_after.len() - kinds_before.len()..],
        kinds_before[..],
        "the copied log reads as before, newest first, under the new events"
    );
    let alice_view = after.view_consumer("alice").await;
    assert_eq!(alice_view["recovery_codes_remaining"], 8, "{alice_view}");

    // And back, into a new SQLite file, while Redis holds newer events: one log, in order.
    drop(after);
    let back = dir.join("back.db");
    let target = format!("sqlite:{}", back.display());
    let (code, out, err) = copy(&dir, MASTER_KEY, &["--from", &url, "--to", &target]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tally(&out, "consumers"), (3, 3, 0));
    let (code, out, err) = copy(&dir, MASTER_KEY, &["--from", &url, "--to", &target]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tally(&out, "consumers"), (3, 0, 3));
    let (_, copied, _) = tally(&out, "audit events");
    assert_eq!(copied, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_refuses_another_master_key_and_a_taken_name() {
    let twilio = FakeTwilio::start().await;
    let redis = RedisServer::start();
    let mut node = Node::start_on(SQLITE, &twilio).await;
    node.ok("POST", "/consumers", Some(json!({"name": "alice"})), 201)
        .await;
    node.stop();
    let dir = node.dir().to_owned();
    let url = redis.url();

    let other = "1".repeat(64);
    let (code, out, err) = copy(&dir, &other, &["--from", "config", "--to", &url]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("another master key"), "{err}");
    assert!(out.is_empty(), "nothing copied: {out}");

    // A Redis already serving another `alice` (another id): refused, nothing overwritten.
    let mut other_gateway = Node::start_on(&redis.store_yaml(), &twilio).await;
    other_gateway
        .ok("POST", "/consumers", Some(json!({"name": "alice"})), 201)
        .await;
    other_gateway.stop();
    let (code, _, err) = copy(&dir, MASTER_KEY, &["--from", "config", "--to", &url]);
    assert_eq!(code, 1);
    assert!(err.contains("another consumer named `alice`"), "{err}");

    let (code, _, err) = copy(&dir, MASTER_KEY, &["--from", "config", "--to", "mysql://x"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a store"), "{err}");
    let (code, _, err) = copy(
        &dir,
        MASTER_KEY,
        &["--from", "config", "--to", "redis://:hunter2@127.0.0.1:1"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("no password in a Redis URL"), "{err}");
    let (code, _, err) = copy(
        &dir,
        MASTER_KEY,
        &["--from", "sqlite:nope.db", "--to", &url],
    );
    assert_eq!(code, 1);
    assert!(err.contains("no such database file"), "{err}");
}
