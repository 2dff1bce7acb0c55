//! Persistence on a real SQLite file: a restarted gateway on the same data dir has every
//! consumer, key and factor; nothing secret is in the database in clear; a wrong master key
//! refuses to start (library and binary); the secret files are private.
use stepgate_testkit::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A data dir outside any gateway's config dir, so that successive gateways share it.
fn shared_data_dir() -> (tempfile::TempDir, String) {
    let root = tempfile::tempdir().unwrap();
    let data = path_str(&root.path().join("data"));
    (root, data)
}

/// A view without `last_used_at` (written in batches, so it may differ across a restart).
fn without_last_used(mut view: Value) -> Value {
    if let Some(keys) = view["keys"].as_array_mut() {
        for k in keys {
            k.as_object_mut().unwrap().remove("last_used_at");
        }
    }
    view
}

fn sorted_list(list: &Value) -> Vec<Value> {
    let mut consumers: Vec<Value> = list["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .cloned()
        .map(without_last_used)
        .collect();
    consumers.sort_by_key(|c| c["name"].as_str().unwrap().to_string());
    consumers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_a_restart() {
    let (_root, data) = shared_data_dir();
    let up = Upstream::named("app").await;
    let mut a = keyed_gateway(&up.url(), &data).start_admin().await;

    // alice: two keys, the first revoked; bob: disabled; carol: TOTP confirmed; dave: TOTP
    // pending (SHA-256, 8 digits); erin: deleted.
    let alice = a.add_consumer("alice", &["partner", "reader"]).await;
    let alice_key2 = a.ok("POST", "/consumers/alice/keys", None, 201).await;
    a.ok(
        "DELETE",
        &format!(
            "/consumers/alice/keys/{}",
            alice["prefix"].as_str().unwrap()
        ),
        None,
        204,
    )
    .await;
    let bob = a.add_consumer("bob", &[]).await;
    a.ok(
        "PATCH",
        "/consumers/bob",
        Some(json!({"disabled": true})),
        200,
    )
    .await;
    let carol = a.add_consumer("carol", &["ops"]).await;
    let e = a
        .ok("POST", "/consumers/carol/totp", Some(json!({})), 201)
        .await;
    let carol_secret = e["secret"].as_str().unwrap().to_string();
    a.ok(
        "POST",
        "/consumers/carol/totp/confirm",
        Some(json!({"code": totp_now(&carol_secret)})),
        200,
    )
    .await;
    a.add_consumer("dave", &[]).await;
    let e = a
        .ok(
            "POST",
            "/consumers/dave/totp",
            Some(json!({"digits": 8, "period": 30, "algorithm": "SHA256"})),
            201,
        )
        .await;
    let dave_secret = e["secret"].as_str().unwrap().to_string();
    let erin = a.add_consumer("erin", &[]).await;
    a.ok("DELETE", "/consumers/erin", None, 204).await;

    let key2 = alice_key2["api_key"].as_str().unwrap().to_string();
    assert_eq!(get_keyed(a.addr(), "/keyed/x", &key2).await.status, 200);
    let before = a.ok("GET", "/consumers", None, 200).await;
    let audit_before = a.ok("GET", "/audit", None, 200).await;
    let token_before = a.token.clone();
    a.shutdown().await;
    drop(a);

    let b = keyed_gateway(&up.url(), &data).start_admin().await;
    assert_eq!(
        b.token, token_before,
        "the admin token is kept in the data dir"
    );
    let after = b.ok("GET", "/consumers", None, 200).await;
    assert_eq!(
        sorted_list(&after),
        sorted_list(&before),
        "consumers after a restart"
    );
    assert_eq!(sorted_list(&after).len(), 4);

    // The keys behave as before the restart.
    let r = get_keyed(b.addr(), "/keyed/x", &key2).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up.requests().pop().unwrap();
    assert_eq!(rec.header("x-consumer-id"), alice["id"].as_str());
    assert_eq!(rec.header("x-consumer-roles"), Some("partner,reader"));
    for (key, why) in [
        (alice["api_key"].as_str().unwrap(), "revoked"),
        (bob["api_key"].as_str().unwrap(), "disabled"),
        (erin["api_key"].as_str().unwrap(), "deleted"),
    ] {
        let r = get_keyed(b.addr(), "/keyed/x", key).await;
        assert_eq!(r.status, 401, "{why} key after restart: {}", r.text());
    }
    let r = get_keyed(b.addr(), "/keyed/x", carol["api_key"].as_str().unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The key's last use was recorded.
    let view = b.view("alice").await;
    let used = view["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["prefix"] == alice_key2["prefix"])
        .unwrap()["last_used_at"]
        .clone();
    assert!(
        is_rfc3339(used.as_str().unwrap_or("")),
        "last_used_at of a used key: {view}"
    );

    // carol's confirmed TOTP and codes are there; dave's sealed pending secret still decrypts.
    let carol_view = b.view("carol").await;
    assert_eq!(carol_view["totp"]["status"], "confirmed");
    assert_eq!(carol_view["recovery_codes_remaining"], 10);
    b.ok("POST", "/consumers/carol/recovery-codes", None, 201)
        .await;
    let dave_view = b.view("dave").await;
    assert_eq!(dave_view["totp"]["status"], "pending");
    assert_eq!(dave_view["totp"]["digits"], 8);
    let code = oathtool(&["--totp=SHA256", "-d", "8", "-b", &dave_secret]);
    let confirmed = b
        .ok(
            "POST",
            "/consumers/dave/totp/confirm",
            Some(json!({"code": code})),
            200,
        )
        .await;
    assert_eq!(confirmed["recovery_codes"].as_array().unwrap().len(), 10);

    // The audit log survived too.
    let audit_after = b.ok("GET", "/audit", None, 200).await;
    let n_before = audit_before["events"].as_array().unwrap().len();
    let events_after = audit_after["events"].as_array().unwrap();
    assert!(events_after.len() > n_before, "{audit_after:#}");
    assert!(
        events_after.contains(&audit_before["events"][0]),
        "the newest event before the restart is still there"
    );
}

fn db_files(data_dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    [
        "stepgate.db",
        "stepgate.db-wal",
        "stepgate.db-shm",
        "stepgate.db-journal",
    ]
    .iter()
    .map(|f| data_dir.join(f))
    .filter(|p| p.exists())
    .map(|p| {
        let bytes = std::fs::read(&p).unwrap();
        (p, bytes)
    })
    .collect()
}

fn assert_no_secret(files: &[(PathBuf, Vec<u8>)], secrets: &[(String, Vec<u8>)], marker: &str) {
    let main = files
        .iter()
        .find(|(p, _)| p.ends_with("stepgate.db"))
        .expect("the SQLite file exists");
    assert!(!main.1.is_empty());
    // Positive control: the consumer's name is stored in clear, so the search does find data.
    assert!(
        files
            .iter()
            .any(|(_, b)| contains_bytes(b, marker.as_bytes())),
        "the control string {marker:?} is not in {:?}: searching the wrong files?",
        files.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (path, bytes) in files {
        for (what, needle) in secrets {
            assert!(
                !contains_bytes(bytes, needle),
                "{} contains {what} in clear",
                path.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_holds_no_key_secret_or_recovery_code_in_clear() {
    let up = Upstream::named("app").await;
    let mut gw = keyed_gateway(&up.url(), "data").start_admin().await;
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |what: String, text: &str| {
        secrets.push((format!("{what} ({text})"), text.as_bytes().to_vec()));
    };

    let marker = "persistence-marker-consumer";
    let c = gw.add_consumer(marker, &[]).await;
    let k = c["api_key"].as_str().unwrap();
    add("an API key".into(), k);
    add("the secret part of an API key".into(), &k[12..]);
    let issued = gw
        .ok("POST", &format!("/consumers/{marker}/keys"), None, 201)
        .await;
    let k2 = issued["api_key"].as_str().unwrap();
    add("an API key".into(), k2);
    add("the secret part of an API key".into(), &k2[12..]);

    // A confirmed enrolment with regenerated codes, and a pending one.
    let e = gw
        .ok(
            "POST",
            &format!("/consumers/{marker}/totp"),
            Some(json!({})),
            201,
        )
        .await;
    let secret = e["secret"].as_str().unwrap().to_string();
    let confirmed = gw
        .ok(
            "POST",
            &format!("/consumers/{marker}/totp/confirm"),
            Some(json!({"code": totp_now(&secret)})),
            200,
        )
        .await;
    let regenerated = gw
        .ok(
            "POST",
            &format!("/consumers/{marker}/recovery-codes"),
            None,
            201,
        )
        .await;
    gw.add_consumer("pending", &[]).await;
    let e2 = gw
        .ok("POST", "/consumers/pending/totp", Some(json!({})), 201)
        .await;
    let secret2 = e2["secret"].as_str().unwrap().to_string();
    let mut secret_forms = |s: &str| {
        let raw = base32_decode(s);
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        secrets.push((
            format!("a TOTP secret in base32 ({s})"),
            s.as_bytes().to_vec(),
        ));
        secrets.push((
            format!("a TOTP secret in lower-case base32 ({s})"),
            s.to_lowercase().into_bytes(),
        ));
        secrets.push((
            format!("a TOTP secret in hex ({hex})"),
            hex.clone().into_bytes(),
        ));
        secrets.push((format!("a TOTP secret as raw bytes ({hex})"), raw));
    };
    secret_forms(&secret);
    secret_forms(&secret2);
    for set in [&confirmed, &regenerated] {
        for code in set["recovery_codes"].as_array().unwrap() {
            let code = code.as_str().unwrap();
            let normalized: String = code.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
            secrets.push((
                format!("a recovery code ({code})"),
                code.as_bytes().to_vec(),
            ));
            secrets.push((
                format!("a recovery code ({normalized})"),
                normalized.to_lowercase().into_bytes(),
            ));
            secrets.push((
                format!("a recovery code ({normalized})"),
                normalized.to_uppercase().into_bytes(),
            ));
        }
    }
    // Use a key so that "last used" is written too.
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", k2).await.status, 200);

    // While running (the write-ahead log holds recent writes) and after a clean stop.
    let data_dir = gw.data_dir.clone();
    assert_no_secret(&db_files(&data_dir), &secrets, marker);
    gw.shutdown().await;
    assert_no_secret(&db_files(&data_dir), &secrets, marker);
}

/// Starts a gateway on `data`, creates a consumer, stops it; returns (config dir, master key
/// file contents, the consumer's key).
async fn seeded(up: &Upstream, data: &str) -> (AdminGw, String, String) {
    let mut gw = keyed_gateway(&up.url(), data).start_admin().await;
    let alice = gw.add_consumer("alice", &[]).await;
    let e = gw
        .ok("POST", "/consumers/alice/totp", Some(json!({})), 201)
        .await;
    assert!(e["secret"].is_string());
    gw.shutdown().await;
    let master = std::fs::read_to_string(gw.data_dir.join("master.key")).unwrap();
    (gw, master, alice["api_key"].as_str().unwrap().to_string())
}

const OTHER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_master_key_file_refuses_to_start() {
    let (_root, data) = shared_data_dir();
    let up = Upstream::named("app").await;
    let (old, master, key) = seeded(&up, &data).await;
    let master_path = old.data_dir.join("master.key");
    assert_ne!(master.trim(), OTHER_KEY);

    std::fs::write(&master_path, format!("{OTHER_KEY}\n")).unwrap();
    assert_eq!(mode_of(&master_path), 0o600);
    let snapshot = stepgate::config::load(&old.config_path()).unwrap();
    match stepgate::server::Gateway::bind(snapshot).await {
        Ok(_) => panic!("the gateway started with a different master key"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.to_lowercase().contains("master key"),
                "the error must name the master key: {text}"
            );
        }
    }

    // With the original key back, the same data dir opens and the key works.
    std::fs::write(&master_path, &master).unwrap();
    let gw = keyed_gateway(&up.url(), &data).start_admin().await;
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key).await.status, 200);
}

/// Runs `stepgate run` with `env`; returns Ok((code, stderr)) if it exits within 15 s, or
/// Err(stdout so far) after killing it once it has logged that it is listening (or 15 s).
fn run_binary(config: &Path, env: &[(&str, &str)]) -> Result<(i32, String), String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepgate"));
    for var in [
        "STEPGATE_ADMIN_URL",
        "STEPGATE_ADMIN_TOKEN",
        "STEPGATE_CONFIG",
        "STEPGATE_MASTER_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(["run", "-c", &path_str(config)])
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn stepgate");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = String::new();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = err_reader.join().unwrap();
            return Ok((status.code().unwrap_or(-1), stderr));
        }
        while let Ok(line) = rx.try_recv() {
            seen.push_str(&line);
            seen.push('\n');
        }
        if seen.contains("listening") || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(seen);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_1_naming_the_master_key_when_it_is_wrong() {
    let (_root, data) = shared_data_dir();
    let up = Upstream::named("app").await;
    let (old, master, _key) = seeded(&up, &data).await;
    let config = old.config_path();

    let c = config.clone();
    let wrong =
        tokio::task::spawn_blocking(move || run_binary(&c, &[("STEPGATE_MASTER_KEY", OTHER_KEY)]))
            .await
            .unwrap();
    match wrong {
        Err(stdout) => panic!("stepgate run started with a wrong master key; stdout:\n{stdout}"),
        Ok((code, stderr)) => {
            assert_eq!(code, 1, "stderr: {stderr}");
            assert!(
                stderr.to_lowercase().contains("master key"),
                "stderr: {stderr}"
            );
        }
    }

    // Not 64 hex digits: refused too, naming the variable.
    let c = config.clone();
    let malformed = tokio::task::spawn_blocking(move || {
        run_binary(&c, &[("STEPGATE_MASTER_KEY", "not-a-key")])
    })
    .await
    .unwrap();
    match malformed {
        Err(stdout) => {
            panic!("stepgate run started with a malformed master key; stdout:\n{stdout}")
        }
        Ok((code, stderr)) => {
            assert_eq!(code, 1, "stderr: {stderr}");
            assert!(stderr.contains("STEPGATE_MASTER_KEY"), "stderr: {stderr}");
        }
    }

    // Control: the right key in the environment starts it (killed once it listens).
    let c = config.clone();
    let right = master.trim().to_string();
    let ok =
        tokio::task::spawn_blocking(move || run_binary(&c, &[("STEPGATE_MASTER_KEY", &right)]))
            .await
            .unwrap();
    match ok {
        Err(stdout) => assert!(stdout.contains("listening"), "stdout: {stdout}"),
        Ok((code, stderr)) => panic!("the right master key did not start (exit {code}): {stderr}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_and_admin_token_files_are_private() {
    let up = Upstream::named("app").await;
    let gw = keyed_gateway(&up.url(), "data").start_admin().await;
    for file in ["master.key", "admin.token"] {
        let path = gw.data_dir.join(file);
        assert_eq!(mode_of(&path), 0o600, "{}", path.display());
    }
    let master = std::fs::read_to_string(gw.data_dir.join("master.key")).unwrap();
    let master = master.trim();
    assert_eq!(master.len(), 64, "master key file holds 64 hex digits");
    assert!(master.bytes().all(|b| b.is_ascii_hexdigit()));
    // The token in the file is the one the admin API accepts.
    let r = admin_call(gw.admin, Some(&gw.token), "GET", "/consumers", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
}
