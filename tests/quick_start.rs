//! README's quick start, run as written: the real `stepgate` binary on a copy of the shipped
//! `gateway.yaml` and `policies/` (only the two listen addresses rewritten to free ports), the
//! same CLI commands run in that directory with no `-c` (so the CLI finds the admin API and its
//! token from `./gateway.yaml` as it does for a reader), and the README's curl calls sent as
//! HTTP requests. Each step asserts what the README says happens.
//!
//! TOTP codes come from oathtool for the real time. `totp confirm` spends the current code (a
//! code is accepted once), so the first protected call uses the code of the *next* 30-s step,
//! which the gateway accepts at once (±1 step of clock skew): no waiting in the test.
use stepgate_testkit::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The gateway process; killed when dropped, its output kept in `log`.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command as the README shows it: the `stepgate` binary, run in `dir` (where
/// `gateway.yaml` is), with no `STEPGATE_*` variable from the test runner's environment.
fn stepgate(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepgate"));
    for var in [
        "STEPGATE_ADMIN_URL",
        "STEPGATE_ADMIN_TOKEN",
        "STEPGATE_CONFIG",
        "STEPGATE_MASTER_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args).current_dir(dir).env("NO_COLOR", "1");
    cmd
}

/// Runs a CLI command of the quick start; returns its stdout, failing on a non-zero exit.
async fn cli(dir: &Path, args: &[&str]) -> String {
    let mut cmd = stepgate(dir, args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("spawn stepgate"))
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "stepgate {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// The shipped `gateway.yaml` with `listen` and `admin.listen` on the given ports. Fails if the
/// shipped file no longer has the addresses the README talks about.
fn shipped_config(port: u16, admin: u16) -> String {
    let text = std::fs::read_to_string(repo().join("gateway.yaml")).unwrap();
    let (listen, admin_listen) = (
        "listen: 127.0.0.1:8080\n",
        "admin: { listen: 127.0.0.1:9901 }",
    );
    assert_eq!(text.matches(listen).count(), 1, "gateway.yaml: {listen}");
    assert_eq!(text.matches(admin_listen).count(), 1, "gateway.yaml");
    text.replace(listen, &format!("listen: 127.0.0.1:{port}\n"))
        .replace(
            admin_listen,
            &format!("admin: {{ listen: 127.0.0.1:{admin} }}"),
        )
}

/// `cargo run --release` in the checkout, i.e. `stepgate` with no arguments next to the
/// shipped files. Returns the process and the public address once both listeners answer.
async fn start(dir: &Path) -> (Running, SocketAddr) {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    for entry in std::fs::read_dir(repo().join("policies")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("policies").join(entry.file_name())).unwrap();
    }
    for _ in 0..5 {
        let (port, admin) = (free_port(), free_port());
        std::fs::write(dir.join("gateway.yaml"), shipped_config(port, admin)).unwrap();
        let log = dir.join("gateway.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = stepgate(dir, &[])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn stepgate");
        let mut running = Running { child, log };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        let deadline = Instant::now() + STEP;
        let up = loop {
            if running.child.try_wait().unwrap().is_some() {
                break false; // most likely a port taken meanwhile: try others
            }
            if tokio::net::TcpStream::connect(admin_addr).await.is_ok()
                && tokio::net::TcpStream::connect(addr).await.is_ok()
            {
                break true;
            }
            assert!(
                Instant::now() < deadline,
                "stepgate did not start:\n{}",
                running.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if up {
            return (running, addr);
        }
        eprintln!(
            "stepgate exited at start; retrying on other ports:\n{}",
            running.log()
        );
    }
    panic!("stepgate could not start");
}

/// The value after `label` on the line of `text` that starts with it.
fn field(text: &str, label: &str) -> String {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{text}"))
        .to_string()
}

/// What the echo upstream received: its JSON description of the forwarded request.
fn echoed(r: &Resp) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_works_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (gateway, addr) = start(dir).await;

    // stepgate health: exit 0 once the gateway is ready.
    cli(dir, &["health"]).await;

    // stepgate explain GET /secure/hello: route, policy, and what a caller must present.
    let out = cli(dir, &["explain", "GET", "/secure/hello"]).await;
    assert!(out.contains("route:     demo-2fa"), "{out}");
    assert!(out.contains("policy:    step-up"), "{out}");
    assert!(
        out.contains(
            "caller must present: an API key (X-Api-Key) and a TOTP code or a recovery code in X-OTP"
        ),
        "{out}"
    );
    assert!(out.contains("forwards:  GET /hello"), "{out}");

    // curl -s 'localhost:8080/demo/hello?x=1': public; the echo upstream describes the request.
    let r = get_with(addr, "/demo/hello?x=1", &[]).await;
    let seen = echoed(&r);
    assert_eq!(seen["path"], "/hello", "strip_prefix: {seen}");
    assert_eq!(seen["query"], "x=1", "{seen}");
    assert_eq!(seen["method"], "GET", "{seen}");

    // stepgate consumer add alice --role partner: prints alice's API key, once.
    let out = cli(dir, &["consumer", "add", "alice", "--role", "partner"]).await;
    let key = field(&out, "API key:");
    assert!(is_api_key(&key), "{out}");
    assert!(out.contains("shown only once"), "{out}");

    // curl -H "X-Api-Key: $KEY" localhost:8080/keyed/hello: the upstream sees alice, not the key.
    let r = get_with(addr, "/keyed/hello", &[("x-api-key", &key)]).await;
    let seen = echoed(&r);
    let headers = &seen["headers"];
    assert_eq!(headers["x-consumer-name"], "alice", "{seen}");
    assert_eq!(headers["x-consumer-roles"], "partner", "{seen}");
    assert_eq!(headers["x-stepgate-auth"], "key", "{seen}");
    assert!(headers["x-consumer-id"].is_string(), "{seen}");
    assert!(
        headers.get("x-api-key").is_none(),
        "the key is forwarded: {seen}"
    );

    // Without a key: 401 api_key_missing.
    let r = get_with(addr, "/keyed/hello", &[]).await;
    assert_key_refused(&r, "api_key_missing");

    // /secure before alice has a second factor: 403 enrollment_required.
    let r = get_with(addr, "/secure/hello", &[("x-api-key", &key)]).await;
    let problem = r.assert_problem(403, "enrollment_required");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .ends_with("enrol at /_stepgate/"),
        "the refusal names the security page: {problem}"
    );

    // The security page is served under /_stepgate/.
    let r = get_with(addr, "/_stepgate/", &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        r.headers
    );

    // stepgate totp enroll alice: QR code, otpauth:// URI and the secret.
    let out = cli(dir, &["totp", "enroll", "alice"]).await;
    assert!(out.contains("otpauth://totp/"), "{out}");
    let secret = field(&out, "secret:");

    // stepgate totp confirm alice $(oathtool --totp -b $SECRET): prints 10 recovery codes.
    let confirm_code = oathtool(&["--totp", "-b", &secret]);
    let out = cli(dir, &["totp", "confirm", "alice", &confirm_code]).await;
    let recovery: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.len() == 27 && l.matches('-').count() == 3)
        .collect();
    assert_eq!(recovery.len(), 10, "{out}");
    assert!(
        out.contains("the first code that works is the next one, in"),
        "confirm says when the first usable code comes: {out}"
    );

    // curl -i -H "X-Api-Key: $KEY" localhost:8080/secure/hello: 401 otp_required.
    let r = get_with(addr, "/secure/hello", &[("x-api-key", &key)]).await;
    assert_otp_refused(&r, "otp_required", "totp recovery_code");

    // The code confirm just spent is refused: a code is accepted once.
    let r = get_with(
        addr,
        "/secure/hello",
        &[("x-api-key", &key), ("x-otp", &confirm_code)],
    )
    .await;
    r.assert_problem(401, "otp_invalid");

    // The next code is the first that works: what oathtool gives after
    // `sleep $((30 - $(date +%s) % 30))`, or at once with -N "now + 30 seconds" (the gateway
    // accepts one step of clock skew).
    let next = oathtool(&["--totp", "-b", &secret, "-N", "now + 30 seconds"]);
    let r = get_with(
        addr,
        "/secure/hello",
        &[("x-api-key", &key), ("x-otp", &next)],
    )
    .await;
    let seen = echoed(&r);
    assert_eq!(seen["headers"]["x-stepgate-auth"], "key+totp", "{seen}");
    assert!(
        seen["headers"].get("x-otp").is_none(),
        "the code is forwarded: {seen}"
    );
    let token = r
        .header("x-step-up-token")
        .expect("a step-up token with the 200")
        .to_string();
    assert!(is_step_up_token(&token), "{token}");
    assert!(r.header("x-step-up-expires").is_some_and(is_rfc3339));
    assert_eq!(r.header("cache-control"), Some("no-store"));

    // curl -H "X-Api-Key: $KEY" -H "X-Step-Up-Token: sgt_…": 200 with no code.
    let r = get_with(
        addr,
        "/secure/hello",
        &[("x-api-key", &key), ("x-step-up-token", &token)],
    )
    .await;
    assert_eq!(echoed(&r)["headers"]["x-stepgate-auth"], "key+step_up");

    // A recovery code works once in place of a code.
    let code = recovery[0];
    let r = get_with(
        addr,
        "/secure/hello",
        &[("x-api-key", &key), ("x-otp", code)],
    )
    .await;
    assert_eq!(
        echoed(&r)["headers"]["x-stepgate-auth"],
        "key+recovery_code"
    );
    let r = get_with(
        addr,
        "/secure/hello",
        &[("x-api-key", &key), ("x-otp", code)],
    )
    .await;
    r.assert_problem(401, "otp_invalid");

    // The data went where the README says: the SQLite store and the two secrets under data/.
    for file in ["stepgate.db", "master.key", "admin.token"] {
        assert!(dir.join("data").join(file).exists(), "data/{file}");
    }
    assert_eq!(mode_of(&dir.join("data/master.key")), 0o600);
    assert_eq!(mode_of(&dir.join("data/admin.token")), 0o600);
    drop(gateway);
}
