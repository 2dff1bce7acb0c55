//! Several gateways sharing one Redis, as an operator runs them: each node a real `stepgate`
//! process (its own data directory and admin token, the master key shared through
//! `STEPGATE_MASTER_KEY`) on one real [`RedisServer`], with SMS pointed at one
//! [`FakeTwilio`]. Nodes can be killed (SIGKILL) and restarted; they are killed when dropped.
//!
//! Routes of every node (the built-in echo upstream behind each):
//!
//! | path | policy | |
//! |---|---|---|
//! | `/keyed` | `api-key` | API key only |
//! | `/secure` | `step-up` | TOTP or recovery code, or a step-up token (policy scope) |
//! | `/sms` | `sms` | an SMS code |
//!
//! `step-up` and `sms` allow 5 failures per consumer and 50 per client address in 15
//! minutes, then ban for 15 minutes. The test runner is a trusted proxy, so a request's client
//! address can be set with `X-Forwarded-For`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::redis::RedisServer;
use crate::twilio::FakeTwilio;
use crate::*;

/// Shared by every node, as an operator would share it (a secret manager, an env file).
pub const MASTER_KEY: &str = "7d1f0b3c5a9e2d4f6b8a0c1e3f5d7b9a1c3e5f7d9b1a3c5e7f9d1b3a5c7e9f1d";

const TEMPLATE: &str = r#"
listen: "127.0.0.1:${port}"
admin: { listen: "127.0.0.1:${admin}" }
data_dir: data
trusted_proxies: [127.0.0.1/32]
${store}
sms:
  twilio:
    account_sid: ${sid}
    auth_token_file: twilio.token
    from: "+15005550006"
    base_url: "${twilio}"
  code_ttl: 5m
upstreams:
  app: { echo: {} }
routes:
  - { name: keyed, match: { path: /keyed }, upstream: app, policy: api-key }
  - { name: secure, match: { path: /secure }, upstream: app, policy: step-up }
  - { name: sms, match: { path: /sms }, upstream: app, policy: sms }
  - { name: deploy, match: { path: /deploy }, upstream: app, policy: deploy }
"#;

const FAILURES: &str = "failures:
  per_consumer: { max: 5, window: 15m }
  per_ip: { max: 50, window: 15m }
  ban: 15m
";

pub struct Cluster {
    pub redis: RedisServer,
    pub twilio: FakeTwilio,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// `n` nodes on a fresh Redis, each ready (its admin `/readyz` answered 200).
    pub async fn start(n: usize) -> Cluster {
        let redis = RedisServer::start();
        let twilio = FakeTwilio::start().await;
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(Node::start(&redis, &twilio).await);
        }
        Cluster {
            redis,
            twilio,
            nodes,
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// A consumer created on node 0 with TOTP enrolled and confirmed (see [`Node::enrol`]).
    pub async fn enrolled(&self, name: &str) -> Enrolled {
        self.node(0).enrol(name).await
    }
}

pub struct Enrolled {
    pub name: String,
    pub id: String,
    pub key: String,
    pub secret: String,
    pub recovery_codes: Vec<String>,
}

impl Enrolled {
    /// The code of the next time step: accepted once (the current one was spent confirming).
    pub fn next_code(&self) -> String {
        totp_window(&self.secret, "SHA1", 6, 30)[2].clone()
    }
}

/// One gateway process.
pub struct Node {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
}

impl Node {
    async fn start(redis: &RedisServer, twilio: &FakeTwilio) -> Node {
        Node::start_on(&redis.store_yaml(), twilio).await
    }

    /// A node on the store `store_yaml` configures (a `store:` section).
    pub async fn start_on(store_yaml: &str, twilio: &FakeTwilio) -> Node {
        let (port, admin) = (free_port(), free_port());
        let config = render(
            TEMPLATE,
            &[
                ("port", &port.to_string()),
                ("admin", &admin.to_string()),
                ("store", store_yaml),
                ("sid", &twilio.account_sid),
                ("twilio", &twilio.base_url()),
            ],
        );
        let dir = write_config_with(
            &config,
            &[
                ("policies/api-key.yaml", API_KEY_POLICY),
                (
                    "policies/step-up.yaml",
                    &format!(
                        "api_key: required\nsecond_factor: required\nfactors: [totp, recovery_code]\nstep_up: {{ ttl: 15m, scope: policy }}\n{FAILURES}"
                    ),
                ),
                (
                    "policies/deploy.yaml",
                    "api_key: required\nsecond_factor: required\nfactors: [totp, approval]\napproval: { approvers: { roles: [ops] }, ttl: 5m, show: [\"$.version\"] }\n",
                ),
                (
                    "policies/sms.yaml",
                    &format!(
                        "api_key: required\nsecond_factor: required\nfactors: [sms]\n{FAILURES}"
                    ),
                ),
            ],
        );
        write_private(&dir.path().join("twilio.token"), &twilio.auth_token);
        let mut node = Node {
            child: None,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            token: String::new(),
        };
        node.spawn().await;
        node
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// What the node logged (both streams).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(stepgate_bin());
        for var in [
            "STEPGATE_ADMIN_URL",
            "STEPGATE_ADMIN_TOKEN",
            "STEPGATE_CONFIG",
        ] {
            cmd.env_remove(var);
        }
        let child = cmd
            .args(["run", "-c", "gateway.yaml"])
            .current_dir(self.dir.path())
            .env("STEPGATE_MASTER_KEY", MASTER_KEY)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn stepgate");
        self.child = Some(child);
        self.wait_ready().await;
        let token_path = self.dir.path().join("data").join("admin.token");
        self.token = std::fs::read_to_string(&token_path)
            .unwrap_or_else(|e| panic!("{}: {e}", token_path.display()))
            .trim()
            .to_string();
    }

    /// Until the admin API's `/readyz` answers 200 (or the process dies).
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the node exited ({status}):\n{}", self.log());
            }
            if self.readyz().await == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the node did not get ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A consumer created on this node with TOTP enrolled and confirmed (with the current
    /// code): its API key, TOTP secret and recovery codes.
    pub async fn enrol(&self, name: &str) -> Enrolled {
        let a = self;
        let created = a
            .ok("POST", "/consumers", Some(json!({"name": name})), 201)
            .await;
        let key = created["api_key"].as_str().unwrap().to_string();
        let begun = a
            .ok("POST", &format!("/consumers/{name}/totp"), None, 201)
            .await;
        let secret = begun["secret"].as_str().unwrap().to_string();
        let confirmed = a
            .ok(
                "POST",
                &format!("/consumers/{name}/totp/confirm"),
                Some(json!({"code": totp_now(&secret)})),
                200,
            )
            .await;
        Enrolled {
            name: name.to_string(),
            id: created["id"].as_str().unwrap().to_string(),
            key,
            recovery_codes: confirmed["recovery_codes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect(),
            secret,
        }
    }

    /// The status of admin `GET /readyz`, or `None` when nothing answers.
    pub async fn readyz(&self) -> Option<u16> {
        let stream = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(self.admin),
        )
        .await
        .ok()?
        .ok()?;
        let request = req("GET", "/readyz", &self.admin.to_string())
            .body(empty())
            .unwrap();
        let response = tokio::time::timeout(STEP, send_http1_on(stream, request))
            .await
            .ok()?
            .ok()?;
        Some(response.status().as_u16())
    }

    /// SIGKILL: no drain, nothing flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the drain to finish.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// The node's directory (its `gateway.yaml`, `data/`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Kills the node and starts it again on the same files and ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// An admin call with the node's token; `body` is sent as JSON.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let body = body.map(|b| b.to_string());
        admin_call(self.admin, Some(&self.token), method, path, body.as_deref()).await
    }

    /// Calls and asserts the status; the JSON body (`Null` for an empty body).
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        let r = self.call(method, path, body).await;
        assert_eq!(
            r.status.as_u16(),
            status,
            "{method} {path}: unexpected status; body: {}",
            r.text()
        );
        if r.body.is_empty() {
            Value::Null
        } else {
            r.json()
        }
    }

    /// A request to the public listener with `headers`.
    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut b = req(method, path, "api.example.com");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        send_http1(self.addr, b.body(empty()).unwrap()).await
    }

    /// A request with a JSON body.
    pub async fn request_json(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> Resp {
        let mut b = req(method, path, "api.example.com").header("content-type", "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        send_http1(self.addr, b.body(full(body.to_string())).unwrap()).await
    }

    /// `GET /consumers/{name}` on the admin API (200).
    pub async fn view_consumer(&self, name: &str) -> Value {
        self.ok("GET", &format!("/consumers/{name}"), None, 200)
            .await
    }

    /// `GET path` with an API key, and `X-OTP` when given.
    pub async fn get(&self, path: &str, key: &str, otp: Option<&str>) -> Resp {
        let mut headers = vec![("x-api-key", key)];
        if let Some(otp) = otp {
            headers.push(("x-otp", otp));
        }
        self.request("GET", path, &headers).await
    }

    /// `GET path` with an API key and a step-up token.
    pub async fn get_with_token(&self, path: &str, key: &str, token: &str) -> Resp {
        self.request(
            "GET",
            path,
            &[("x-api-key", key), ("x-step-up-token", token)],
        )
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes an owner-only file (as the gateway demands of secrets).
pub fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{text}\n").as_bytes()).unwrap();
}
