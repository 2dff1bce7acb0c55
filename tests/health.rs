//! Health end to end (issue 5): `/healthz` answers 200 as long as the process serves;
//! `/readyz` answers 200 while the store is reachable and 503 `unavailable` once the SQLite
//! database is gone; `stepgate health -c gateway.yaml` (admin address from the config, token
//! from the data directory) exits 0 when ready and 1 when not.

use std::path::{Path, PathBuf};

use stepgate_testkit::*;

async fn healthz(admin: std::net::SocketAddr) {
    let r = admin_call(admin, None, "GET", "/healthz", None).await;
    assert_eq!(r.status, 200, "/healthz: {}", r.text());
    assert_eq!(r.json()["status"], "ok");
}

async fn assert_ready(admin: std::net::SocketAddr, what: &str) {
    let r = admin_call(admin, None, "GET", "/readyz", None).await;
    assert_eq!(r.status, 200, "{what}: /readyz: {}", r.text());
    assert_eq!(r.json()["status"], "ready", "{what}");
}

async fn assert_unready(admin: std::net::SocketAddr, what: &str) {
    let r = admin_call(admin, None, "GET", "/readyz", None).await;
    let problem = assert_admin_problem(&r, 503, "unavailable");
    assert!(
        problem["detail"].as_str().unwrap().contains("store"),
        "{what}: {problem}"
    );
}

/// `stepgate health -c <config>` with a clean environment.
async fn health_cli(config: &Path) -> (i32, String, String) {
    run_cli_async(&["health", "-c", config.to_str().unwrap()], &[]).await
}

fn db_files(data: &Path) -> [PathBuf; 3] {
    [
        data.join("stepgate.db"),
        data.join("stepgate.db-wal"),
        data.join("stepgate.db-shm"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_unready_when_the_store_is_gone() {
    let app = Upstream::named("app").await;
    let data = tempfile::tempdir().unwrap();
    let mut gw = keyed_gateway(&app.url(), &path_str(data.path()))
        .fixed_admin_port()
        .start_admin()
        .await;
    let config = gw.config_path();
    let db = data.path().join("stepgate.db");
    assert!(db.exists(), "the store is {}", db.display());
    // Something in the store, so that it is in use.
    gw.add_consumer("alice", &[]).await;

    healthz(gw.admin).await;
    assert_ready(gw.admin, "at start").await;
    let (code, out, err) = health_cli(&config).await;
    assert_eq!(code, 0, "stepgate health when ready: {out} {err}");
    assert!(out.contains("ready"), "{out}");

    // The database moved away: unready; moved back: ready again.
    let aside = data.path().join("elsewhere.db");
    std::fs::rename(&db, &aside).unwrap();
    assert_unready(gw.admin, "database moved away").await;
    healthz(gw.admin).await;
    let (code, out, err) = health_cli(&config).await;
    assert_eq!(code, 1, "stepgate health when unready: {out} {err}");
    std::fs::rename(&aside, &db).unwrap();
    assert_ready(gw.admin, "database moved back").await;
    assert_eq!(health_cli(&config).await.0, 0);

    // The database deleted with its WAL and shared memory: unready, and stays so.
    for file in db_files(data.path()) {
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", file.display()),
        }
    }
    assert_unready(gw.admin, "database deleted").await;
    assert_unready(gw.admin, "database deleted, asked again").await;
    let (code, out, err) = health_cli(&config).await;
    assert_eq!(
        code, 1,
        "stepgate health with the database deleted: {out} {err}"
    );
    assert!(!out.contains("ready"), "{out}");
    // Alive all the same: the process serves.
    healthz(gw.admin).await;
    let r = get(gw.addr(), "/open", "api.example.com").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A gateway that is not running at all: the CLI cannot reach it and exits 1.
    gw.shutdown().await;
    let (code, out, err) = health_cli(&config).await;
    assert_eq!(code, 1, "stepgate health with no gateway: {out} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_need_no_token_and_other_admin_calls_do() {
    let app = Upstream::named("app").await;
    let data = tempfile::tempdir().unwrap();
    let gw = keyed_gateway(&app.url(), &path_str(data.path()))
        .start_admin()
        .await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = admin_call(gw.admin, None, "GET", path, None).await;
        assert_eq!(r.status, 200, "{path} without a token: {}", r.text());
        let r = admin_call(gw.admin, Some("wrong-token-0123456789"), "GET", path, None).await;
        assert_eq!(r.status, 200, "{path} with a wrong token: {}", r.text());
    }
    for (method, path) in [("GET", "/config"), ("POST", "/reload")] {
        let r = admin_call(gw.admin, None, method, path, None).await;
        assert_admin_problem(&r, 401, "unauthorized");
    }
    // No answer of a probe carries the admin token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = admin_call(gw.admin, None, "GET", path, None).await;
        assert!(
            !r.text().contains(&gw.token),
            "{path} shows the admin token"
        );
    }
}
