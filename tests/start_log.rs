//! What `stepgate run` says when it starts on a fresh data directory: where it listens, where
//! its admin API is and with which token file, where the security page is, and which secret
//! files it generated, by path, never their contents.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stepgate_testkit::*;

#[test]
fn the_start_log_names_listeners_the_admin_api_and_the_files_it_generated() {
    let (port, admin) = (free_port(), free_port());
    let dir = write_config(&format!(
        "listen: 127.0.0.1:{port}\nadmin: {{ listen: 127.0.0.1:{admin} }}\ndata_dir: data\n\
         upstreams:\n  app: {{ echo: {{}} }}\nroutes:\n  - {{ name: keyed, match: {{ path: /keyed }}, upstream: app, policy: api-key }}\n"
    ));
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/api-key.yaml"), API_KEY_POLICY).unwrap();
    let log = dir.path().join("run.log");
    let mut cmd = Command::new(stepgate_bin());
    for var in [
        "STEPGATE_MASTER_KEY",
        "STEPGATE_ADMIN_TOKEN",
        "STEPGATE_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .args(["run", "-c", "gateway.yaml"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("security page") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let data = dir.path().join("data");
    let expect = [
        format!("stepgate listening on http://127.0.0.1:{port}"),
        format!("admin API on http://127.0.0.1:{admin}"),
        "(bearer token: data/admin.token or STEPGATE_ADMIN_TOKEN)".to_owned(),
        format!("security page for consumers: http://127.0.0.1:{port}/_stepgate/"),
        "generated the master key".to_owned(),
        "generated the admin token".to_owned(),
        "path=data/master.key".to_owned(),
        "path=data/admin.token".to_owned(),
    ];
    for line in &expect {
        assert!(
            text.contains(line.as_str()),
            "`{line}` missing from:\n{text}"
        );
    }
    for secret in ["master.key", "admin.token"] {
        let value = std::fs::read_to_string(data.join(secret)).unwrap();
        assert!(
            !text.contains(value.trim()),
            "the log shows {secret}'s contents"
        );
    }
}
