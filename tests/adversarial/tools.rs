//! What the adversarial tests share: a gateway with host-scoped, keyed and open routes in
//! front of recording upstreams, raw HTTP/1.1 over a socket (bytes hyper's client would refuse
//! to send), HTTP/2 frames through the `h2` crate, and an upstream that misbehaves on cue.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use stepgate_testkit::*;

/// Routes: `/h` scoped to `api.example.com` (API key) and `/h` for any host (public), to
/// different upstreams; `/keyed` (API key) and `/app` (public) to the recorder; `/raw` to
/// `${raw}` (a misbehaving upstream, or the recorder when none is given).
const EDGE_CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
data_dir: "${data_dir}"
limits:
  idle_timeout: 1s
${limits}
upstreams:
  app: { url: "${app}" }
  hosted: { url: "${hosted}" }
  raw: { url: "${raw}", timeout: 2s }
routes:
  - { name: hosted, match: { host: api.example.com, path: /h }, upstream: hosted, policy: key }
  - { name: open-h, match: { path: /h }, upstream: app, policy: public }
  - { name: hosted-open, match: { host: open.example.com, path: /o }, upstream: hosted, policy: public }
  - { name: keyed, match: { path: /keyed }, upstream: app, policy: key }
  - { name: app, match: { path: /app }, upstream: app, policy: public }
  - { name: raw, match: { path: /raw }, upstream: raw, policy: public }
"#;

pub struct Edge {
    pub gw: AdminGw,
    /// Behind the public routes and `/keyed`.
    pub app: Upstream,
    /// Behind the host-scoped routes only.
    pub hosted: Upstream,
    /// A consumer's API key.
    pub key: String,
    _data: tempfile::TempDir,
}

impl Edge {
    pub async fn start() -> Edge {
        Edge::start_with("", None).await
    }

    /// With extra `limits:` lines (indented by two spaces) and the upstream of `/raw`.
    pub async fn start_with(limits: &str, raw: Option<SocketAddr>) -> Edge {
        let app = Upstream::named("app").await;
        let hosted = Upstream::named("hosted").await;
        let data = tempfile::tempdir().unwrap();
        let raw = raw.map_or_else(|| app.url(), |a| format!("http://{a}"));
        let yaml = render(
            EDGE_CONFIG,
            &[
                ("data_dir", &path_str(data.path())),
                ("limits", limits),
                ("app", &app.url()),
                ("hosted", &hosted.url()),
                ("raw", &raw),
            ],
        );
        let dir = write_config_with(
            &yaml,
            &[
                ("policies/public.yaml", DEFAULT_POLICY),
                ("policies/key.yaml", API_KEY_POLICY),
            ],
        );
        let gw = GatewayBuilder::in_dir(dir).start_admin().await;
        let created = gw.add_consumer("alice", &["partner"]).await;
        let key = created["api_key"].as_str().unwrap().to_string();
        Edge {
            gw,
            app,
            hosted,
            key,
            _data: data,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gw.addr()
    }

    /// Requests both upstreams have received.
    pub fn upstream_requests(&self) -> usize {
        self.app.requests().len() + self.hosted.requests().len()
    }

    /// Sends `head` (request line and headers, `\r\n` separated, without the blank line) and
    /// `body` verbatim on a new connection; returns the response and whether the gateway then
    /// closed the connection (within a second).
    pub async fn raw(&self, head: &str, body: &[u8]) -> (RawResponse, bool) {
        raw_exchange(self.addr(), head, body).await
    }

    /// A raw request that must be refused with 400 before any upstream sees it.
    pub async fn refused(&self, head: &str, body: &[u8]) -> RawResponse {
        let mut bytes = format!("{head}\r\n\r\n").into_bytes();
        bytes.extend_from_slice(body);
        let r = self.refused_bytes(&bytes, 400).await;
        r.assert_problem(400, "bad_request");
        r
    }

    /// A raw request (no body) that must be answered with `status` and reach no upstream.
    pub async fn refused_as(&self, head: &str, status: u16) -> RawResponse {
        self.refused_bytes(format!("{head}\r\n\r\n").as_bytes(), status)
            .await
    }

    /// Bytes sent verbatim that must be answered with `status` and reach no upstream.
    pub async fn refused_bytes(&self, bytes: &[u8], status: u16) -> RawResponse {
        let before = self.upstream_requests();
        let r = raw_request(self.addr(), bytes)
            .await
            .unwrap_or_else(|e| panic!("no response to {:?}: {e}", String::from_utf8_lossy(bytes)));
        assert_eq!(
            r.status,
            status,
            "{:?}:\n{}\n{}",
            String::from_utf8_lossy(bytes),
            r.head,
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            self.upstream_requests(),
            before,
            "an upstream received a refused request: {:?}",
            String::from_utf8_lossy(bytes)
        );
        r
    }

    /// The metrics page of the admin listener.
    pub async fn metrics(&self) -> String {
        self.gw.call("GET", "/metrics", None).await.text()
    }
}

/// The sum of the metric `name` over its lines (`name{labels} value`) that carry every one
/// of `labels` (`kind="protocol"`); 0 when there is none.
pub fn metric(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn raw_exchange(addr: SocketAddr, head: &str, body: &[u8]) -> (RawResponse, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut bytes = format!("{head}\r\n\r\n").into_bytes();
    bytes.extend_from_slice(body);
    // A refused request may be answered and closed before all of it is written.
    let _ = s.write_all(&bytes).await;
    let r = tokio::time::timeout(STEP, read_raw_response(&mut s))
        .await
        .expect("timed out reading the response")
        .unwrap_or_else(|e| panic!("no response to:\n{head}\n{e}"));
    let closed = closed_within(&mut s, Duration::from_secs(1)).await;
    (r, closed)
}

/// Whether the peer closes the connection (EOF or reset) within `window`, reading and
/// discarding anything it sends meanwhile.
pub async fn closed_within(s: &mut TcpStream, window: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// How long until the peer closes the connection, reading everything; `None` if it does not
/// within `limit`.
pub async fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    closed_within(s, limit).await.then(|| start.elapsed())
}

/// A request whose HTTP/2 form goes through the `h2` crate as a client writes it, with
/// whatever (lower-case) header names the test wants.
pub async fn h2_request(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, serde_json::Value), h2::Error> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await?;
    let mut request = http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, _) = client.send_request(request.body(()).unwrap(), true)?;
    let response = tokio::time::timeout(STEP, response)
        .await
        .expect("no HTTP/2 response")?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

/// One step of a misbehaving upstream's answer.
#[derive(Clone, Debug)]
pub enum Act {
    Send(Bytes),
    Pause(Duration),
    /// Close the connection with a reset (SO_LINGER 0).
    Reset,
    /// Keep the connection open and send nothing more.
    Hang,
}

pub fn send(text: &str) -> Act {
    Act::Send(Bytes::copy_from_slice(text.as_bytes()))
}

/// An upstream that reads each request head and answers with a script of raw bytes.
pub struct RawUpstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    pub async fn start(script: Vec<Act>) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let script = script.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    for act in script {
                        match act {
                            Act::Send(bytes) => {
                                if s.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                            Act::Pause(d) => tokio::time::sleep(d).await,
                            Act::Reset => {
                                let _ = s.set_zero_linger();
                                return;
                            }
                            Act::Hang => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                        }
                    }
                    // The script is done: keep reading until the gateway closes.
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream { addr, task, heads }
    }

    /// Request heads received so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}
