//! Trace logging written into the watched configuration directory must not feed the file
//! watcher: each line written once raised a file event, which logged more lines (some 70 MB
//! in 2 s, idle).

use std::process::{Command, Stdio};
use std::time::Duration;

use stepgate_testkit::*;

#[test]
fn trace_logs_written_beside_the_config_do_not_feed_the_watcher() {
    let dir = write_config(
        "listen: 127.0.0.1:0\nupstreams:\n  demo: { echo: {} }\nroutes:\n  - { name: demo, match: { path: /demo }, upstream: demo, policy: public }\n",
    );
    let log = dir.path().join("gateway.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stepgate"))
        .args(["run", "-c"])
        .arg(dir.path().join("gateway.yaml"))
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let size = std::fs::metadata(&log).unwrap().len();
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("listening") || text.contains("registry loaded"),
        "the gateway did not start:\n{}",
        &text[..text.len().min(2000)]
    );
    assert!(
        !text.contains("file change"),
        "a reload was triggered by the log file"
    );
    assert!(size < 1_000_000, "{size} bytes of log in 3 s while idle");
}
