//! The audit sink end to end (issue 5): with `audit: { sink: file, path: audit.jsonl }` every
//! security event (admin operations, second-factor events) is a JSON line in the file, in the
//! order `GET /audit` reports (reversed: it is newest first), with `kind`, `at`, `consumer`, and
//! no secret; with `sink: stdout` the running binary prints them.

use std::sync::Arc;

use serde_json::{Value, json};
use stepgate_testkit::ops;
use stepgate_testkit::*;

const T0: u64 = 1_800_000_000;

const CONFIG: &str = r#"listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
audit: { sink: file, path: audit.jsonl }
upstreams:
  app: { url: "${app}" }
routes:
  - { name: twofa, match: { path: /2fa }, upstream: app, policy: two-factor }
"#;

/// Every string inside `value` except the fields that are ids.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                if k != "consumer_id" && k != "id" {
                    strings(v, out);
                }
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_sink_gets_every_event_as_a_json_line_without_secrets() {
    let app = Upstream::named("app").await;
    let clock = Arc::new(stepgate::clock::ManualClock::new(T0));
    let dir = write_config_with(
        &render(CONFIG, &[("app", &app.url())]),
        &[(
            "policies/two-factor.yaml",
            "api_key: required\nsecond_factor: required\n",
        )],
    );
    let g = GatewayBuilder::in_dir(dir)
        .clock(clock.clone())
        .start_ops()
        .await;
    let gw = &g.gw;
    let sink = g.path("audit.jsonl");

    // Admin operations.
    let created = gw.add_consumer("alice", &["staff"]).await;
    let alice_id = created["id"].as_str().unwrap().to_string();
    let key = created["api_key"].as_str().unwrap().to_string();
    let issued = gw.ok("POST", "/consumers/alice/keys", None, 201).await;
    let key2 = issued["api_key"].as_str().expect("api_key").to_string();
    let prefix2 = issued["prefix"].as_str().expect("prefix").to_string();
    gw.ok(
        "DELETE",
        &format!("/consumers/alice/keys/{prefix2}"),
        None,
        204,
    )
    .await;
    let (secret, recovery) = ops::enrol_totp(gw, "alice", T0).await;
    clock.advance(30);

    // Second-factor events.
    let wrong = wrong_at(&secret, T0 + 30);
    let r = get_with(
        g.addr(),
        "/2fa/x",
        &[("x-api-key", &key), ("x-otp", &wrong)],
    )
    .await;
    r.assert_problem(401, "otp_invalid");
    let good = totp_at(&secret, T0 + 30);
    let r = get_with(g.addr(), "/2fa/x", &[("x-api-key", &key), ("x-otp", &good)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-step-up-token").expect("token").to_string();
    let r = get_with(
        g.addr(),
        "/2fa/y",
        &[("x-api-key", &key), ("x-otp", &recovery[0])],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token2 = r.header("x-step-up-token").expect("token").to_string();

    // More admin operations.
    let regenerated = gw
        .ok("POST", "/consumers/alice/recovery-codes", None, 201)
        .await;
    let new_codes: Vec<String> = regenerated["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    gw.ok(
        "PATCH",
        "/consumers/alice",
        Some(json!({"roles": ["ops"]})),
        200,
    )
    .await;
    gw.ok("POST", "/consumers/alice/unlock", None, 204).await;
    gw.ok("DELETE", "/consumers/alice/totp", None, 204).await;
    gw.ok("DELETE", "/consumers/alice", None, 204).await;

    // `GET /audit` waits for the writer, which writes the sink before the store.
    let listed = gw.ok("GET", "/audit?limit=1000", None, 200).await;
    let listed: Vec<Value> = listed["events"].as_array().unwrap().clone();
    let text = std::fs::read_to_string(&sink)
        .unwrap_or_else(|e| panic!("the audit sink {}: {e}", sink.display()));
    assert!(text.ends_with('\n'), "the last line is complete: {text:?}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();

    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l["kind"].as_str().expect("kind"))
        .collect();
    for expected in [
        "consumer_created",
        "key_issued",
        "key_revoked",
        "totp_enrolment_started",
        "totp_enrolled",
        "otp_rejected",
        "otp_accepted",
        "step_up_issued",
        "recovery_code_used",
        "recovery_codes_regenerated",
        "consumer_updated",
        "unlocked",
        "totp_reset",
        "consumer_deleted",
    ] {
        assert!(
            kinds.contains(&expected),
            "no {expected} in the sink: {kinds:?}"
        );
    }
    let started = lines
        .iter()
        .find(|l| l["kind"] == "totp_enrolment_started")
        .unwrap();
    assert_eq!(started["detail"]["proved_with"], "operator", "{started}");
    assert_eq!(kinds.first(), Some(&"consumer_created"));
    assert_eq!(kinds.last(), Some(&"consumer_deleted"));
    // Same events as the admin API, in order.
    let listed_kinds: Vec<&str> = listed
        .iter()
        .rev()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, listed_kinds, "the sink and GET /audit disagree");

    let times = [date_rfc3339(T0), date_rfc3339(T0 + 30)];
    for (line, event) in lines.iter().zip(listed.iter().rev()) {
        let at = line["at"]
            .as_str()
            .unwrap_or_else(|| panic!("no at: {line}"));
        assert!(
            times.iter().any(|t| t == at),
            "at {at:?} is not the clock's time: {line}"
        );
        assert_eq!(line["consumer"], "alice", "{line}");
        assert_eq!(line["consumer_id"], alice_id.as_str(), "{line}");
        for field in ["kind", "at", "consumer", "key_prefix", "detail"] {
            assert_eq!(
                line[field], event[field],
                "{field}: sink {line} vs GET /audit {event}"
            );
        }
    }
    let created_line = &lines[0];
    assert_eq!(created_line["key_prefix"], key[..12], "{created_line}");

    // No secret anywhere in the file, no code in any value.
    let mut secrets: Vec<&str> = vec![&key, &key2, &secret, &token, &token2, &gw.token];
    secrets.extend(recovery.iter().map(String::as_str));
    secrets.extend(new_codes.iter().map(String::as_str));
    // The secret also as lower case and the key without its prefix (hex body).
    let lower_secret = secret.to_lowercase();
    secrets.push(&lower_secret);
    secrets.push(&key[12..]);
    for s in &secrets {
        assert!(
            !text.contains(s),
            "the audit sink holds a secret ({}…)",
            &s[..6.min(s.len())]
        );
    }
    for line in &lines {
        let mut values = Vec::new();
        strings(line, &mut values);
        for code in [&good, &wrong] {
            assert!(
                !values.iter().any(|v| v.contains(code.as_str())),
                "a code in {line}"
            );
        }
    }
}

/// `stepgate run` with `audit: { sink: stdout }`: the events are JSON lines on its stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdout_sink_prints_json_lines() {
    let app = Upstream::named("app").await;
    let data = tempfile::tempdir().unwrap();
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        let dir = write_config_with(
            &format!(
                "listen: 127.0.0.1:0\nadmin: {{ listen: \"127.0.0.1:{port}\" }}\ndata_dir: \"{}\"\naudit: {{ sink: stdout }}\nupstreams:\n  app: {{ url: \"{}\" }}\nroutes:\n  - {{ name: open, match: {{ path: /open }}, upstream: app, policy: public }}\n",
                path_str(data.path()),
                app.url()
            ),
            &[("policies/public.yaml", DEFAULT_POLICY)],
        );
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stepgate"))
            .args(["run", "-c"])
            .arg(dir.path().join("gateway.yaml"))
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let admin: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Up when the admin API answers (or gone when the port was taken meanwhile).
        let up = ops::eventually(STEP, "the admin API answers or the process exits", || {
            let exited = child.try_wait().unwrap().is_some();
            async move {
                if exited {
                    return Some(false);
                }
                tokio::net::TcpStream::connect(admin)
                    .await
                    .ok()
                    .map(|_| true)
            }
        })
        .await;
        if !up {
            let _ = child.wait();
            last = format!("exited: {:?}", child.wait());
            continue;
        }
        let token = std::fs::read_to_string(data.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let r = admin_call(
            admin,
            Some(&token),
            "POST",
            "/consumers",
            Some(r#"{"name":"dora"}"#),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let key = r.json()["api_key"].as_str().unwrap().to_string();

        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + STEP;
        let found = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                break None;
            };
            seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["kind"] == "consumer_created"
            {
                break Some(v);
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        while let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            seen.push(line);
        }
        let event = found.unwrap_or_else(|| {
            panic!(
                "no consumer_created JSON line on stdout:\n{}",
                seen.join("\n")
            )
        });
        assert_eq!(event["consumer"], "dora", "{event}");
        assert!(event["at"].as_str().is_some_and(is_rfc3339), "{event}");
        let all = seen.join("\n");
        assert!(!all.contains(&key), "the API key is on stdout");
        assert!(!all.contains(&token), "the admin token is on stdout");
        return;
    }
    panic!("could not start stepgate on a free admin port: {last}");
}
