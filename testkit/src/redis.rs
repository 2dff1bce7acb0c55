//! A real `redis-server` for a test: its own process on an ephemeral port, its own data
//! directory, with the durability settings the gateway documents (AOF, fsync on every
//! write, no eviction). It can be killed with SIGKILL and restarted on its files; it is
//! killed when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateways' command timeout in tests (see [`RedisServer::store_yaml`]).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl RedisServer {
    /// Starts a server and waits until it answers.
    pub fn start() -> Self {
        let tmp = crate::target_dir().join("tmp");
        std::fs::create_dir_all(&tmp).expect("target/tmp");
        let dir = tempfile::tempdir_in(tmp).expect("a temp dir");
        let mut server = Self {
            child: None,
            port: free_port(),
            dir,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `store:` section of a gateway on this server (with a short staleness bound, so
    /// that outage tests are quick). The command timeout is not short: this server fsyncs
    /// every write, and with the whole suite writing to the same disk an fsync can take half
    /// a second; a stopped server refuses connections at once whatever the timeout.
    pub fn store_yaml(&self) -> String {
        format!(
            "store:\n  redis:\n    url: {}\n    stale_for: 1s\n    connect_timeout: 500ms\n    command_timeout: {}ms\n",
            self.url(),
            COMMAND_TIMEOUT.as_millis()
        )
    }

    /// Settings for a node on this server, with short timeouts and staleness bound (as
    /// [`store_yaml`](Self::store_yaml)).
    pub fn settings(&self) -> stepgate::config::RedisSettings {
        let mut settings = stepgate::config::RedisSettings::new(&self.url());
        settings.stale_for = Duration::from_secs(1);
        settings.connect_timeout = Duration::from_millis(500);
        settings.command_timeout = COMMAND_TIMEOUT;
        settings
    }

    fn spawn(&mut self) {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--maxmemory-policy", "noeviction", "--protected-mode", "no"])
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + crate::STEP;
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when the server answers PING with PONG.
    pub fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// SIGKILL: no shutdown, no final save; what survives is what was fsynced.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and files.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs a command with `redis-cli` (for inspecting or disturbing the server from a
    /// test); its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli is installed with redis-server");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
