//! Canary secrets never reach the logs (issue 4): the gateway binary runs with
//! `RUST_LOG=trace --log-format json`, a whole two-factor flow goes through it (consumer, TOTP
//! enrolment, key + code, step-up token, recovery code, wrong code, unknown key), and the
//! captured stdout and stderr contain none of the API key, TOTP secret, codes, token,
//! recovery code, admin token or master key. The binary reads the real clock, so codes are
//! computed by oathtool for the real time.
use stepgate_testkit::*;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CONFIG: &str = r#"
listen: "127.0.0.1:${port}"
admin: { listen: "127.0.0.1:${admin}" }
data_dir: data
upstreams:
  app: { url: "${app}" }
routes:
  - { name: twofa, match: { path: /2fa }, upstream: app, policy: two-factor }
  - { name: open, match: { path: /open }, upstream: app, policy: public }
"#;

struct Running {
    child: Child,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    err: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Running {
    /// Stops the gateway with SIGTERM and returns everything it wrote.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "stepgate exited with {status}");
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("stepgate did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.output()
    }

    /// Everything written to stdout, then stderr (after the process ended).
    fn output(&mut self) -> String {
        let mut all = self.out.take().unwrap().join().unwrap();
        all.extend(self.err.take().unwrap().join().unwrap());
        String::from_utf8_lossy(&all).into_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Starts the binary on free ports; returns it with the public and admin addresses.
async fn start(
    dir: &tempfile::TempDir,
    app: &str,
    env: &[(&str, &str)],
) -> (Running, std::net::SocketAddr, std::net::SocketAddr) {
    for _ in 0..5 {
        let (port, admin) = (free_port(), free_port());
        std::fs::write(
            dir.path().join("gateway.yaml"),
            render(
                CONFIG,
                &[
                    ("port", &port.to_string()),
                    ("admin", &admin.to_string()),
                    ("app", app),
                ],
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepgate"));
        for var in ["STEPGATE_ADMIN_URL", "STEPGATE_CONFIG"] {
            cmd.env_remove(var);
        }
        cmd.args(["run", "-c", &path_str(&dir.path().join("gateway.yaml"))])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "trace")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn stepgate");
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        let mut running = Running {
            child,
            out: Some(out),
            err: Some(err),
        };
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        let deadline = Instant::now() + STEP;
        let up = loop {
            if running.child.try_wait().unwrap().is_some() {
                break false; // probably a port taken meanwhile: try others
            }
            if tokio::net::TcpStream::connect(admin_addr).await.is_ok()
                && tokio::net::TcpStream::connect(addr).await.is_ok()
            {
                break true;
            }
            assert!(Instant::now() < deadline, "stepgate did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if up {
            let r = admin_call(admin_addr, None, "GET", "/healthz", None).await;
            assert_eq!(r.status, 200, "{}", r.text());
            return (running, addr, admin_addr);
        }
        let output = running.stop_after_exit();
        eprintln!("stepgate exited at start; retrying on other ports:\n{output}");
    }
    panic!("stepgate could not start");
}

impl Running {
    fn stop_after_exit(mut self) -> String {
        let _ = self.child.wait();
        self.output()
    }
}

/// Does `code` (digits) occur in `text` as a number of its own (not inside a longer number
/// nor as the fraction of a timestamp)?
fn contains_number(text: &str, code: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(code).any(|(i, _)| {
        let before = i.checked_sub(1).map(|j| bytes[j]);
        let after = bytes.get(i + code.len()).copied();
        !before.is_some_and(|b| b.is_ascii_digit() || b == b'.')
            && !after.is_some_and(|b| b.is_ascii_digit())
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_trace_level() {
    let up = Upstream::named("app").await;
    let dir = write_config_with(
        "",
        &[
            ("policies/public.yaml", DEFAULT_POLICY),
            (
                "policies/two-factor.yaml",
                "api_key: required\nsecond_factor: required\n",
            ),
        ],
    );
    let admin_token = format!("sga_canary{}", uuid::Uuid::new_v4().simple());
    let master_key = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let (gw, addr, admin) = start(
        &dir,
        &up.url(),
        &[
            ("STEPGATE_ADMIN_TOKEN", &admin_token),
            ("STEPGATE_MASTER_KEY", &master_key),
        ],
    )
    .await;
    let call = |path: &'static str, headers: Vec<(&'static str, String)>| async move {
        let mut b = req("GET", path, "api.example.com");
        for (k, v) in headers {
            b = b.header(k, v);
        }
        send_http1(addr, b.body(empty()).unwrap()).await
    };
    let admin_ok = |method: &'static str, path: String, body: Option<serde_json::Value>| {
        let admin_token = admin_token.clone();
        async move {
            let body = body.map(|b| b.to_string());
            let r = admin_call(admin, Some(&admin_token), method, &path, body.as_deref()).await;
            assert!(
                r.status.is_success(),
                "{method} {path}: {} {}",
                r.status,
                r.text()
            );
            if r.body.is_empty() {
                serde_json::Value::Null
            } else {
                r.json()
            }
        }
    };

    // Not in the last 3 s of a time step, so the codes below stay valid while they are used.
    let into_step = now() % 30;
    if into_step >= 27 {
        tokio::time::sleep(Duration::from_secs(30 - into_step)).await;
    }

    let created = admin_ok(
        "POST",
        "/consumers".into(),
        Some(serde_json::json!({"name": "alice", "roles": ["ops"]})),
    )
    .await;
    let key = created["api_key"].as_str().unwrap().to_string();
    let begun = admin_ok(
        "POST",
        "/consumers/alice/totp".into(),
        Some(serde_json::json!({})),
    )
    .await;
    let secret = begun["secret"].as_str().unwrap().to_string();
    let t = now();
    let confirm_code = totp_at(&secret, t);
    let confirmed = admin_ok(
        "POST",
        "/consumers/alice/totp/confirm".into(),
        Some(serde_json::json!({"code": confirm_code})),
    )
    .await;
    let recovery: Vec<String> = confirmed["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();

    // Key + code (the next step, within the skew), then the token alone.
    let code = totp_at(&secret, t + 30);
    let r = call(
        "/2fa/x",
        vec![("x-api-key", key.clone()), ("x-otp", code.clone())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-step-up-token").unwrap().to_string();
    let r = call(
        "/2fa/x",
        vec![
            ("x-api-key", key.clone()),
            ("x-step-up-token", token.clone()),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A recovery code, a wrong code, a replayed code, an unknown key, a key on a public route.
    let r = call(
        "/2fa/x",
        vec![("x-api-key", key.clone()), ("x-otp", recovery[0].clone())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let wrong = wrong_totp(&secret, "SHA1", 6, 30);
    let r = call(
        "/2fa/x",
        vec![("x-api-key", key.clone()), ("x-otp", wrong.clone())],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = call(
        "/2fa/x",
        vec![("x-api-key", key.clone()), ("x-otp", code.clone())],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let stranger = unknown_key(0xdead_beef);
    let r = call("/2fa/x", vec![("x-api-key", stranger.clone())]).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = call(
        "/open/x",
        vec![("x-api-key", key.clone()), ("x-otp", code.clone())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    admin_ok("GET", "/consumers/alice".into(), None).await;
    admin_ok("DELETE", "/consumers/alice/step-up-tokens".into(), None).await;
    admin_ok("GET", "/audit".into(), None).await;
    for rec in up.requests() {
        assert_no_credentials(&rec);
    }

    let logs = gw.stop();
    // The capture worked, at trace level, with the audit events in it.
    assert!(logs.contains("\"TRACE\""), "no trace-level lines captured");
    for kind in [
        "otp_accepted",
        "recovery_code_used",
        "otp_rejected",
        "otp_replayed",
        "step_up_issued",
        "step_up_revoked",
    ] {
        assert!(logs.contains(kind), "no {kind} in the logs");
    }
    assert!(logs.contains(&key[..12]), "keys are logged by their prefix");

    let recovery_plain = recovery[0].replace('-', "");
    let canaries: Vec<(&str, &str)> = vec![
        ("API key", key.as_str()),
        ("API key secret part", &key[12..]),
        ("unknown API key", &stranger[12..]),
        ("TOTP secret", secret.as_str()),
        ("step-up token", token.as_str()),
        ("step-up token secret part", &token[4..]),
        ("recovery code", recovery[0].as_str()),
        ("recovery code without dashes", recovery_plain.as_str()),
        ("admin token", admin_token.as_str()),
        ("master key", master_key.as_str()),
    ];
    let lower = logs.to_lowercase();
    for (what, canary) in canaries {
        assert!(
            !lower.contains(&canary.to_lowercase()),
            "the {what} is in the logs: {}",
            context(&logs, canary)
        );
    }
    for (what, canary) in [
        ("confirmation code", &confirm_code),
        ("code", &code),
        ("wrong code", &wrong),
    ] {
        assert!(
            !contains_number(&logs, canary),
            "the {what} {canary} is in the logs: {}",
            context(&logs, canary)
        );
    }
}

/// The log line around the first occurrence of `needle` (case-insensitive).
fn context(logs: &str, needle: &str) -> String {
    let lower = logs.to_lowercase();
    match lower.find(&needle.to_lowercase()) {
        Some(i) => {
            let start = lower[..i].rfind('\n').map_or(0, |j| j + 1);
            let end = lower[i..].find('\n').map_or(lower.len(), |j| i + j);
            lower[start..end].to_string()
        }
        None => String::new(),
    }
}
