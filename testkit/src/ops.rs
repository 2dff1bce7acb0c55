//! Helpers for the operations tests (reload, metrics, health, audit sink).
//!
//! * [`OpsGw`]: a gateway with the handles `run` would keep to itself (see
//!   [`GatewayBuilder::start_ops`](crate::GatewayBuilder::start_ops)).
//! * [`Scrape`]: `/metrics` fetched and parsed as Prometheus text.
//! * [`eventually`]: polls with a bounded deadline (for the debounced file watcher).
//! * [`write_atomic`], [`write_in_place`]: the ways editors and deploy tools save files.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::*;
use serde_json::Value;

use stepgate::metrics::Metrics;
use stepgate::reload::Reloader;

/// How long the file watcher (200 ms debounce) may take to apply a change.
pub const WATCH_DEADLINE: Duration = Duration::from_secs(5);

/// An in-process gateway with its admin API and the handles `run` would otherwise swallow.
pub struct OpsGw {
    pub gw: AdminGw,
    pub reloader: Arc<Reloader>,
    pub metrics: Arc<Metrics>,
    pub accounts: Arc<stepgate::accounts::Accounts>,
}

impl OpsGw {
    pub fn addr(&self) -> SocketAddr {
        self.gw.addr()
    }

    pub fn admin(&self) -> SocketAddr {
        self.gw.admin
    }

    /// The config directory (where `gateway.yaml` is).
    pub fn dir(&self) -> &Path {
        self.gw.gw.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir().join(rel)
    }

    /// `GET /config` (200).
    pub async fn status(&self) -> Value {
        self.gw.ok("GET", "/config", None, 200).await
    }

    /// The version in force, from `GET /config`.
    pub async fn version(&self) -> String {
        let status = self.status().await;
        status["version"]
            .as_str()
            .unwrap_or_else(|| panic!("GET /config has no version: {status}"))
            .to_string()
    }

    /// `POST /reload`, with the response.
    pub async fn post_reload(&self) -> Resp {
        self.gw.call("POST", "/reload", None).await
    }

    /// `/metrics` scraped and parsed (no token: scrapers need none).
    pub async fn scrape(&self) -> Scrape {
        scrape(self.gw.admin).await
    }

    /// Waits (bounded) until `GET /config` shows a version other than `old` and no error.
    pub async fn wait_version_change(&self, old: &str, what: &str) -> Value {
        eventually(WATCH_DEADLINE, what, || async {
            let status = self.status().await;
            (status["version"] != old && status["last_error"].is_null()).then_some(status)
        })
        .await
    }

    /// Waits (bounded) until `GET /config` shows a `last_error` one of whose lines contains
    /// `needle`.
    pub async fn wait_last_error(&self, needle: &str, what: &str) -> Value {
        eventually(WATCH_DEADLINE, what, || async {
            let status = self.status().await;
            let hit = status["last_error"].as_array().is_some_and(|lines| {
                lines
                    .iter()
                    .any(|l| l.as_str().unwrap_or("").contains(needle))
            });
            hit.then_some(status)
        })
        .await
    }
}

/// Polls `probe` every 25 ms until it returns `Some`, panicking after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        if tokio::time::Instant::now() >= end {
            panic!("not within {deadline:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Writes `path` the way most deploy tools and many editors do: a temporary file in the same
/// directory (a name the policy loader ignores), then `rename` over the target.
pub fn write_atomic(path: &Path, content: &str) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Overwrites `path` in place (same inode: truncate, then write).
pub fn write_in_place(path: &Path, content: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(content.as_bytes()).unwrap();
    file.sync_all().unwrap();
}

/// The 1-based line of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> u64 {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in:\n{text}")) as u64
        + 1
}

/// Splits a `file:line:column: message` config error. Panics (with the line) when it is not
/// in that form or names another file.
pub fn split_config_error(line: &str, file: &Path) -> (u64, u64, String) {
    let prefix = format!("{}:", file.display());
    let rest = line.strip_prefix(&prefix).unwrap_or_else(|| {
        panic!("config error {line:?} does not start with `{prefix}` (file:line:column: message)")
    });
    let mut parts = rest.splitn(3, ':');
    let (l, c, m) = (parts.next(), parts.next(), parts.next());
    let parse = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
    match (parse(l), parse(c), m) {
        (Some(l), Some(c), Some(m)) if l >= 1 && c >= 1 && m.starts_with(' ') && m.len() > 1 => {
            (l, c, m[1..].to_string())
        }
        _ => panic!(
            "config error {line:?} is not `file:line:column: message` (line and column from 1)"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One `/metrics` answer: the text and its parsed samples.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// The sample with exactly these labels, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let hits: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted)
            .collect();
        assert!(
            hits.len() <= 1,
            "{name}{labels:?} appears twice:\n{}",
            self.text
        );
        hits.first().map(|s| s.value)
    }

    /// A counter's value; a series not yet created counts as 0.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// A value that must be present.
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// Every sample of a metric name.
    pub fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

/// `GET /metrics` on the admin listener, without a token; asserts 200 and a text content type.
pub async fn scrape(admin: SocketAddr) -> Scrape {
    let r = admin_call(admin, None, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    let text = r.text();
    let samples = parse_prometheus(&text);
    Scrape { text, samples }
}

/// Parses the Prometheus / OpenMetrics text format: `# …` lines are skipped, every other line
/// must be `name{label="value",…} value` (labels optional). Panics on a malformed line.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples
            .push(parse_sample(line).unwrap_or_else(|e| panic!("bad metrics line {line:?}: {e}")));
    }
    samples
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let consumed: usize;
        loop {
            // label name
            let start = match chars.peek() {
                Some(&(i, '}')) => {
                    consumed = i + 1;
                    break;
                }
                Some(&(i, _)) => i,
                None => return Err("unterminated labels".into()),
            };
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let eq = eq.ok_or("label without =")?;
            let key = inner[start..eq].to_string();
            if !matches!(chars.next(), Some((_, '"'))) {
                return Err(format!("label {key} value not quoted"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("dangling escape".into()),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err("unterminated label value".into());
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => {
                    consumed = i + 1;
                    break;
                }
                other => return Err(format!("unexpected {other:?} after a label")),
            }
        }
        rest = &inner[consumed..];
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// `GET path` (Host `api.example.com`) with headers, on a fresh connection from the local
/// address `from` (any of 127.0.0.0/8).
pub async fn get_from(from: &str, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(local).unwrap();
    let stream = socket.connect(addr).await.expect("connect");
    let mut b = req("GET", path, "api.example.com");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = send_http1_on(stream, b.body(empty()).unwrap())
        .await
        .expect("HTTP/1.1 request failed");
    read_resp(resp).await
}

/// A keep-alive HTTP/1.1 connection: several requests, one after the other, on one socket.
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<BoxBody>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP/1.1 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        KeepAlive { sender }
    }

    /// `GET path` with headers on this connection; `Err` when the connection failed.
    pub async fn try_get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Resp, String> {
        tokio::time::timeout(STEP, self.sender.ready())
            .await
            .map_err(|_| "connection not ready in time".to_string())?
            .map_err(|e| format!("connection closed: {e}"))?;
        let mut b = req("GET", path, "api.example.com");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = tokio::time::timeout(STEP, self.sender.send_request(b.body(empty()).unwrap()))
            .await
            .map_err(|_| "timed out waiting for a response head".to_string())?
            .map_err(|e| format!("request failed: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(STEP, http_body_util::BodyExt::collect(body))
            .await
            .map_err(|_| "timed out reading the body".to_string())?
            .map_err(|e| format!("body failed: {e}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.try_get(path, headers)
            .await
            .unwrap_or_else(|e| panic!("keep-alive GET {path}: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// TOTP
// ---------------------------------------------------------------------------------------------

/// Enrols default TOTP for `name` through the admin API at the clock's time `now` and confirms
/// it; returns (secret, recovery codes).
pub async fn enrol_totp(gw: &AdminGw, name: &str, now: u64) -> (String, Vec<String>) {
    let begun = gw
        .ok("POST", &format!("/consumers/{name}/totp"), None, 201)
        .await;
    let secret = begun["secret"].as_str().expect("secret").to_string();
    let confirmed = gw
        .ok(
            "POST",
            &format!("/consumers/{name}/totp/confirm"),
            Some(serde_json::json!({ "code": totp_at(&secret, now) })),
            200,
        )
        .await;
    let codes = confirmed["recovery_codes"]
        .as_array()
        .expect("recovery codes")
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    (secret, codes)
}
