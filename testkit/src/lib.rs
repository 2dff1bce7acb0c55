//! What stepgate's integration tests share: the gateway started in-process, upstreams,
//! clients, and the fixtures of whole flows. A crate of its own, so it is compiled once for
//! every test binary.
//!
//! * [`write_config`] / [`start_gateway`]: write `gateway.yaml` (+ `policies/public.yaml`) into a
//!   temp dir, load it, bind the in-process gateway on an ephemeral port and spawn `run`.
//! * [`Upstream`]: a recording hyper upstream on 127.0.0.1:0.
//! * HTTP clients: [`send_http1`], [`send_h2c`], [`send_tls`], and [`raw_request`] for bytes
//!   hyper's client would refuse to send.
//! * [`GenBody`]: a streaming body that produces N bytes in chunks without allocating N bytes.
//! * [`twilio`]: a local server speaking Twilio's Messages API; [`logs`]: captured tracing
//!   output of the in-process gateway.

pub mod browser;
pub mod cluster;
pub mod gateway;
pub mod logs;
pub mod ops;
pub mod redis;
pub mod self_service;
pub mod twilio;

pub use gateway::GatewayBuilder;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Generous upper bound for any single network step in a test.
pub const STEP: Duration = Duration::from_secs(10);

pub const DEFAULT_POLICY: &str = "api_key: off\nsecond_factor: off\n";

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

pub fn empty() -> BoxBody {
    full(Bytes::new())
}

/// The `stepgate` binary cargo built for the tests: beside the test executables' `deps/`.
pub fn stepgate_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_stepgate") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable is in target/<profile>/deps");
    let bin = profile_dir.join(format!("stepgate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests through cargo, which builds it",
        bin.display()
    );
    bin
}

/// The target directory the tests run from.
pub fn target_dir() -> PathBuf {
    stepgate_bin()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("the binary is in target/<profile>")
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Replace `${name}` placeholders in a YAML template.
pub fn render(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${{{k}}}"), v);
    }
    assert!(
        !out.contains("${"),
        "unreplaced placeholder in config template:\n{out}"
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Config + gateway
// ---------------------------------------------------------------------------------------------

/// Writes `gateway.yaml` and `policies/public.yaml` into a fresh temp dir.
pub fn write_config(yaml: &str) -> tempfile::TempDir {
    write_config_with(yaml, &[("policies/public.yaml", DEFAULT_POLICY)])
}

/// Writes `gateway.yaml` plus arbitrary extra files (relative paths) into a fresh temp dir.
pub fn write_config_with(yaml: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("gateway.yaml"), yaml).expect("write gateway.yaml");
    for (rel, content) in files {
        let p = dir.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, content).expect("write file");
    }
    dir
}

pub fn config_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("gateway.yaml")
}

pub struct Gw {
    pub addr: SocketAddr,
    pub token: CancellationToken,
    pub join: Option<JoinHandle<Result<(), stepgate::Error>>>,
    pub dir: tempfile::TempDir,
}

impl Gw {
    /// Runs a bound gateway on the test's runtime.
    pub fn run(gateway: stepgate::server::Gateway, dir: tempfile::TempDir) -> Gw {
        let addr = gateway.local_addr();
        let token = gateway.shutdown_token();
        let join = tokio::spawn(gateway.run());
        Gw {
            addr,
            token,
            join: Some(join),
            dir,
        }
    }

    /// `127.0.0.1:PORT`
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    /// Cancel and wait (bounded) for `run` to return.
    pub async fn shutdown(&mut self) {
        self.token.cancel();
        if let Some(j) = self.join.take() {
            let r = tokio::time::timeout(STEP, j)
                .await
                .expect("gateway run() did not return after shutdown")
                .expect("gateway task panicked");
            r.expect("gateway run() returned an error");
        }
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// Recording upstream
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_bytes: u64,
    /// `Some(err)` if reading the request body failed part-way.
    pub body_error: Option<String>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("non-utf8 header"))
    }
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }
    /// Path and query exactly as received, e.g. `/orders/7?x=1`.
    pub fn path_and_query(&self) -> String {
        self.uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| self.uri.to_string())
    }
}

type Handler =
    Arc<dyn Fn(Recorded) -> Pin<Box<dyn Future<Output = Response<BoxBody>> + Send>> + Send + Sync>;

pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    arrived: Arc<Mutex<u64>>,
    notify: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Upstream answering `200 text/plain` with body `name` and header `x-upstream: name`.
    pub async fn named(name: &'static str) -> Upstream {
        Upstream::with(move |_r| {
            Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .header("x-upstream", name)
                .body(full(name))
                .unwrap()
        })
        .await
    }

    pub async fn with<F>(f: F) -> Upstream
    where
        F: Fn(&Recorded) -> Response<BoxBody> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        Upstream::with_async(move |r| {
            let f = f.clone();
            async move { f(&r) }
        })
        .await
    }

    pub async fn with_async<F, Fut>(f: F) -> Upstream
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<BoxBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(f(r)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Mutex::new(0u64));
        let notify = Arc::new(Notify::new());
        let (reqs2, arrived2, notify2) = (requests.clone(), arrived.clone(), notify.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let reqs = reqs2.clone();
                let arrived = arrived2.clone();
                let notify = notify2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let reqs = reqs.clone();
                        let arrived = arrived.clone();
                        let notify = notify.clone();
                        async move {
                            *arrived.lock().unwrap() += 1;
                            notify.notify_waiters();
                            let (parts, body) = req.into_parts();
                            let (n, err) = count_body(body).await;
                            let rec = Recorded {
                                method: parts.method,
                                uri: parts.uri,
                                version: parts.version,
                                headers: parts.headers,
                                body_bytes: n,
                                body_error: err,
                            };
                            reqs.lock().unwrap().push(rec.clone());
                            notify.notify_waiters();
                            Ok::<_, Infallible>(handler(rec).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            requests,
            arrived,
            notify,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Number of requests whose head reached the upstream (body possibly still streaming).
    pub fn arrived(&self) -> u64 {
        *self.arrived.lock().unwrap()
    }

    /// The single request received so far; panics if there is not exactly one.
    pub fn only_request(&self) -> Recorded {
        let r = self.requests();
        assert_eq!(
            r.len(),
            1,
            "expected exactly one upstream request, got {r:#?}"
        );
        r.into_iter().next().unwrap()
    }

    /// Waits until at least `n` request heads have arrived.
    pub async fn wait_arrived(&self, n: u64) {
        tokio::time::timeout(STEP, async {
            loop {
                let notified = self.notify.notified();
                if self.arrived() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("upstream did not receive the expected request");
    }
}

/// Counts body bytes without buffering; returns (bytes, error if the body ended abnormally).
pub async fn count_body<B>(mut body: B) -> (u64, Option<String>)
where
    B: Body + Unpin,
    B::Error: std::fmt::Display,
{
    let mut n = 0u64;
    loop {
        match body.frame().await {
            None => return (n, None),
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    n += bytes::Buf::remaining(d) as u64;
                }
            }
            Some(Err(e)) => return (n, Some(e.to_string())),
        }
    }
}

/// A TCP upstream that accepts connections and never answers (holds them open).
pub struct BlackHole {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        BlackHole { addr, task }
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// An address on which nothing listens, and nothing will while the test process runs: a
/// socket bound there and never listening (without `SO_REUSEADDR`, so no other test process
/// can bind the port) is kept open, so connecting is refused. A port bound and closed again
/// could be taken by a concurrent test's listener (it happened: a "dead" upstream answered
/// as another test's admin API).
pub async fn closed_port_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

// ---------------------------------------------------------------------------------------------
// Streaming body generator
// ---------------------------------------------------------------------------------------------

/// Produces `total` bytes in `chunk`-sized frames, all slices of one shared buffer.
pub struct GenBody {
    remaining: u64,
    chunk: Bytes,
    exact: bool,
    stall: bool,
}

impl GenBody {
    /// With `exact = true` the size hint is exact (hyper sends Content-Length); otherwise
    /// the length is unknown (HTTP/1.1 chunked).
    pub fn new(total: u64, chunk_size: usize, exact: bool) -> GenBody {
        let chunk: Vec<u8> = (0..chunk_size).map(|i| b'a' + (i % 26) as u8).collect();
        GenBody {
            remaining: total,
            chunk: Bytes::from(chunk),
            exact,
            stall: false,
        }
    }
    /// Sends `total` bytes (unknown length), then never ends: the request stays open, so a
    /// response can only be the server reacting to what it has already received.
    pub fn stalling(total: u64, chunk_size: usize) -> GenBody {
        GenBody {
            stall: true,
            ..GenBody::new(total, chunk_size, false)
        }
    }
    pub fn boxed(self) -> BoxBody {
        BodyExt::boxed(self)
    }
}

impl Body for GenBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            if self.stall {
                return Poll::Pending;
            }
            return Poll::Ready(None);
        }
        let n = (self.chunk.len() as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(0..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && !self.stall
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A fully-read response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("non-utf8 header"))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
    /// Asserts an `application/problem+json` error with the given status and code, and that
    /// `request_id` in the body equals the `X-Request-Id` response header.
    pub fn assert_problem(&self, status: u16, code: &str) -> serde_json::Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text()
        );
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.starts_with("application/problem+json"),
            "content-type {ct:?}, body {}",
            self.text()
        );
        let j = self.json();
        assert_eq!(j["type"], "about:blank", "problem: {j}");
        assert_eq!(j["status"], status, "problem: {j}");
        assert_eq!(j["code"], code, "problem: {j}");
        assert!(
            j["title"].as_str().is_some_and(|t| !t.is_empty()),
            "problem title: {j}"
        );
        assert!(j["detail"].is_string(), "problem detail: {j}");
        let rid = j["request_id"].as_str().expect("problem request_id");
        assert!(!rid.is_empty());
        assert_eq!(
            self.header("x-request-id"),
            Some(rid),
            "X-Request-Id header must equal problem request_id"
        );
        j
    }
}

pub async fn read_resp(resp: Response<Incoming>) -> Resp {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("timed out reading response body")
        .expect("error reading response body")
        .to_bytes();
    Resp {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

/// Builds an origin-form request (for HTTP/1.1) with an explicit Host header.
pub fn req(method: &str, path: &str, host: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
}

/// Sends one request on a fresh HTTP/1.1 connection; returns the streaming response.
pub async fn send_http1_stream<B>(
    addr: SocketAddr,
    req: Request<B>,
) -> Result<Response<Incoming>, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(addr).await?;
    send_http1_on(stream, req).await
}

pub async fn send_http1_on<IO, B>(io: IO, req: Request<B>) -> Result<Response<Incoming>, BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = tokio::time::timeout(STEP, sender.send_request(req))
        .await
        .map_err(|_| "timed out waiting for response head")??;
    Ok(resp)
}

/// Sends one request over HTTP/1.1 and reads the whole response.
pub async fn send_http1<B>(addr: SocketAddr, req: Request<B>) -> Resp
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let resp = send_http1_stream(addr, req)
        .await
        .expect("HTTP/1.1 request failed");
    read_resp(resp).await
}

/// GET `path` with the given Host over HTTP/1.1.
pub async fn get(addr: SocketAddr, path: &str, host: &str) -> Resp {
    send_http1(addr, req("GET", path, host).body(empty()).unwrap()).await
}

pub async fn send_h2_on<IO>(io: IO, req: Request<BoxBody>) -> Result<Response<Incoming>, BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = tokio::time::timeout(STEP, sender.send_request(req))
        .await
        .map_err(|_| "timed out waiting for response head")??;
    Ok(resp)
}

/// HTTP/2 with prior knowledge over cleartext TCP. `req` should carry an absolute URI.
pub async fn send_h2c(addr: SocketAddr, req: Request<BoxBody>) -> Resp {
    let stream = TcpStream::connect(addr).await.unwrap();
    let resp = send_h2_on(stream, req).await.expect("h2c request failed");
    read_resp(resp).await
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: rustls_pki_types::CertificateDer<'static>,
}

/// Self-signed certificate for `localhost`.
pub fn self_signed_localhost() -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    TestCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

pub fn tls_client_config(cert: &TestCert, alpn: &[&[u8]]) -> rustls::ClientConfig {
    install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

pub async fn tls_connect(
    addr: SocketAddr,
    cert: &TestCert,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(cert, alpn)));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake failed")
}

/// Connects over TLS offering `alpn`; speaks h2 or HTTP/1.1 according to the negotiated
/// protocol. Returns the negotiated ALPN and the response.
pub async fn send_tls(
    addr: SocketAddr,
    cert: &TestCert,
    alpn: &[&[u8]],
    req: Request<BoxBody>,
) -> (Option<Vec<u8>>, Resp) {
    let tls = tls_connect(addr, cert, alpn).await;
    let negotiated = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    let resp = if negotiated.as_deref() == Some(b"h2") {
        send_h2_on(tls, req)
            .await
            .expect("h2 over TLS request failed")
    } else {
        send_http1_on(tls, req)
            .await
            .expect("HTTP/1.1 over TLS request failed")
    };
    (negotiated, read_resp(resp).await)
}

// ---------------------------------------------------------------------------------------------
// Raw TCP
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}\nhead: {}",
                String::from_utf8_lossy(&self.body),
                self.head
            )
        })
    }
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "head: {}\nbody: {}",
            self.head,
            String::from_utf8_lossy(&self.body)
        );
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.starts_with("application/problem+json"),
            "content-type {ct:?}"
        );
        let j = self.json();
        assert_eq!(j["status"], status, "{j}");
        assert_eq!(j["code"], code, "{j}");
        assert_eq!(self.header("x-request-id"), j["request_id"].as_str(), "{j}");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes `bytes` verbatim to a new connection and reads one HTTP/1.x response
/// (Content-Length, chunked, or until EOF). Errors if the connection closes before a head.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Result<RawResponse, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(bytes).await.map_err(|e| e.to_string())?;
    tokio::time::timeout(STEP, read_raw_response(&mut s))
        .await
        .map_err(|_| "timed out reading raw response".to_string())?
}

pub async fn read_raw_response<S: AsyncRead + Unpin>(s: &mut S) -> Result<RawResponse, String> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = s
            .read(&mut tmp)
            .await
            .map_err(|e| format!("read error before head: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed before a response head (got {:?})",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut rest = buf[head_end + 4..].to_vec();
    let cl = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let body = if let Some(cl) = cl {
        while rest.len() < cl {
            let n = s.read(&mut tmp).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("EOF inside body".into());
            }
            rest.extend_from_slice(&tmp[..n]);
        }
        rest.truncate(cl);
        rest
    } else if chunked {
        while find(&rest, b"0\r\n\r\n").is_none() {
            let n = s.read(&mut tmp).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("EOF inside chunked body".into());
            }
            rest.extend_from_slice(&tmp[..n]);
        }
        dechunk(&rest)
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        loop {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&tmp[..n]),
            }
        }
        rest
    };
    Ok(RawResponse {
        status,
        head,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(b, b"\r\n") {
        let size_str = String::from_utf8_lossy(&b[..i]);
        let size =
            usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        b = &b[i + 2..];
        out.extend_from_slice(&b[..size.min(b.len())]);
        if b.len() < size + 2 {
            break;
        }
        b = &b[size + 2..];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------------

/// Reads a `kB` field (e.g. "VmHWM", "VmRSS") from /proc/self/status.
pub fn proc_status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            return rest.trim().trim_end_matches("kB").trim().parse().unwrap();
        }
    }
    panic!("{field} not found in /proc/self/status");
}

pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Runs the stepgate binary with `args`; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(stepgate_bin())
        .args(args)
        .output()
        .expect("spawn stepgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// Consumers, admin API, API keys, TOTP (issue 3)
// ---------------------------------------------------------------------------------------------

pub const API_KEY_POLICY: &str = "api_key: required\nsecond_factor: off\n";

/// A gateway with an admin listener, `/keyed` behind `api_key: required` and `/open` public,
/// both to `${app}`. `${admin}` is the admin listen address, `${data_dir}` the data dir.
pub const KEYED_CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "${admin}" }
data_dir: "${data_dir}"
upstreams:
  app: { url: "${app}" }
routes:
  - name: keyed
    match: { path: /keyed }
    upstream: app
    policy: api-key
  - name: open
    match: { path: /open }
    upstream: app
    policy: public
"#;

/// A gateway on [`KEYED_CONFIG`] with the admin API on an ephemeral port.
pub fn keyed_gateway(app_url: &str, data_dir: &str) -> GatewayBuilder {
    GatewayBuilder::in_dir(write_keyed_config(app_url, "127.0.0.1:0", data_dir))
}

/// Writes [`KEYED_CONFIG`] with both policies into a fresh temp dir. `data_dir` may be relative
/// (to the config's directory) or absolute (to share one data dir between gateways).
pub fn write_keyed_config(app_url: &str, admin: &str, data_dir: &str) -> tempfile::TempDir {
    write_config_with(
        &render(
            KEYED_CONFIG,
            &[("app", app_url), ("admin", admin), ("data_dir", data_dir)],
        ),
        &[
            ("policies/public.yaml", DEFAULT_POLICY),
            ("policies/api-key.yaml", API_KEY_POLICY),
        ],
    )
}

/// A running in-process gateway with its admin API.
pub struct AdminGw {
    pub gw: Gw,
    /// The admin listener's real address.
    pub admin: SocketAddr,
    /// The admin token, read from `<data_dir>/admin.token`.
    pub token: String,
    pub data_dir: PathBuf,
}

impl AdminGw {
    /// Runs a bound gateway whose configuration has an `admin` section; its token is read
    /// from the data directory.
    pub fn run(gateway: stepgate::server::Gateway, dir: tempfile::TempDir) -> AdminGw {
        let admin = gateway.admin_addr().expect(
            "the config has an `admin` section, so the gateway must bind an admin listener",
        );
        assert_ne!(admin.port(), 0, "admin_addr must report the real port");
        let data_dir = gateway.data_dir();
        let token_path = stepgate::secrets::admin_token_path(&data_dir);
        let token = std::fs::read_to_string(&token_path)
            .unwrap_or_else(|e| panic!("admin token {}: {e}", token_path.display()))
            .trim()
            .to_string();
        assert!(
            token.len() >= 16,
            "admin token too short: {} chars",
            token.len()
        );
        AdminGw {
            gw: Gw::run(gateway, dir),
            admin,
            token,
            data_dir,
        }
    }

    /// The public listener.
    pub fn addr(&self) -> SocketAddr {
        self.gw.addr
    }

    pub fn config_path(&self) -> PathBuf {
        self.gw.config_path()
    }

    /// An admin call with the right token; `body` is sent as JSON.
    pub async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Resp {
        let body = body.map(|b| b.to_string());
        admin_call(self.admin, Some(&self.token), method, path, body.as_deref()).await
    }

    /// Calls and asserts the status; returns the JSON body (`Null` for an empty body).
    pub async fn ok(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        status: u16,
    ) -> serde_json::Value {
        let r = self.call(method, path, body).await;
        assert_eq!(
            r.status.as_u16(),
            status,
            "{method} {path}: unexpected status; body: {}",
            r.text()
        );
        if r.body.is_empty() {
            serde_json::Value::Null
        } else {
            r.json()
        }
    }

    /// `POST /consumers`; returns the 201 answer.
    pub async fn add_consumer(&self, name: &str, roles: &[&str]) -> serde_json::Value {
        self.ok(
            "POST",
            "/consumers",
            Some(serde_json::json!({"name": name, "roles": roles})),
            201,
        )
        .await
    }

    /// `GET /consumers/{name}` (200).
    pub async fn view(&self, name: &str) -> serde_json::Value {
        self.ok("GET", &format!("/consumers/{name}"), None, 200)
            .await
    }

    pub async fn shutdown(&mut self) {
        self.gw.shutdown().await;
    }
}

/// One admin API call over HTTP/1.1. `token: None` sends no Authorization header.
pub async fn admin_call(
    admin: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Resp {
    let mut b = req(method, path, &admin.to_string());
    if let Some(token) = token {
        b = b.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(text) => {
            b = b.header("content-type", "application/json");
            full(text.to_string())
        }
        None => empty(),
    };
    send_http1(admin, b.body(body).unwrap()).await
}

/// Asserts an admin API error: `application/problem+json` with `type`, `title`, `status`,
/// `code` and a non-empty `detail`. Returns the problem.
pub fn assert_admin_problem(r: &Resp, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(
        r.status.as_u16(),
        status,
        "unexpected status; body: {}",
        r.text()
    );
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct:?}, body {}",
        r.text()
    );
    let j = r.json();
    assert!(j["type"].is_string(), "problem type: {j}");
    assert!(
        j["title"].as_str().is_some_and(|t| !t.is_empty()),
        "problem title: {j}"
    );
    assert_eq!(j["status"], status, "problem: {j}");
    assert_eq!(j["code"], code, "problem: {j}");
    assert!(
        j["detail"].as_str().is_some_and(|d| !d.trim().is_empty()),
        "problem detail must be a message: {j}"
    );
    j
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the stepgate binary off the async runtime with a clean environment (no
/// `STEPGATE_*` variables from the test runner) plus `env`. Returns (exit code, stdout, stderr).
pub async fn run_cli_async(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || run_cli_env(&args, &env))
        .await
        .unwrap()
}

pub fn run_cli_env<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    env: &[(String, String)],
) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(stepgate_bin());
    for var in [
        "STEPGATE_ADMIN_URL",
        "STEPGATE_ADMIN_TOKEN",
        "STEPGATE_CONFIG",
        "STEPGATE_MASTER_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args).env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn stepgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GET `path` on the public listener with extra headers.
pub async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = req("GET", path, "api.example.com");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send_http1(addr, b.body(empty()).unwrap()).await
}

/// GET `path` with `X-Api-Key: key`.
pub async fn get_keyed(addr: SocketAddr, path: &str, key: &str) -> Resp {
    get_with(addr, path, &[("x-api-key", key)]).await
}

/// Asserts a 401 key failure: the problem code and `WWW-Authenticate: ApiKey realm="stepgate"`.
pub fn assert_key_refused(r: &Resp, code: &str) {
    r.assert_problem(401, code);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"ApiKey realm="stepgate""#),
        "every 401 carries WWW-Authenticate; headers: {:?}",
        r.headers
    );
}

/// `sgk_` + 64 lower-case hex + 8 hex checksum.
pub fn is_api_key(key: &str) -> bool {
    key.len() == 76
        && key.starts_with("sgk_")
        && key[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// RFC 3339 date-time, e.g. `2025-01-02T03:04:05Z` or with an offset/fraction.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':'
        && b[16] == b':'
        && [0..4, 5..7, 8..10, 11..13, 14..16, 17..19]
            .iter()
            .all(|r| b[r.clone()].iter().all(u8::is_ascii_digit))
        && (s.ends_with('Z') || s.ends_with('z') || s[19..].contains('+') || s[19..].contains('-'))
}

/// Runs `oathtool` (the independent TOTP implementation) and returns its trimmed output.
pub fn oathtool(args: &[&str]) -> String {
    let out = std::process::Command::new("oathtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run oathtool ({e}); scripts/test installs it (Debian package oathtool)")
        });
    assert!(
        out.status.success(),
        "oathtool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The current code of a default (SHA-1, 6 digits, 30 s) TOTP secret: `oathtool --totp -b SECRET`.
pub fn totp_now(secret_base32: &str) -> String {
    oathtool(&["--totp", "-b", secret_base32])
}

/// The codes oathtool computes for the previous, current and next time steps (what a
/// verifier with ±1 step of skew accepts now).
pub fn totp_window(secret_base32: &str, algorithm: &str, digits: u8, period: u64) -> Vec<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    [now - period, now, now + period]
        .iter()
        .map(|t| {
            oathtool(&[
                &format!("--totp={algorithm}"),
                "-d",
                &digits.to_string(),
                "-s",
                &format!("{period}s"),
                "-N",
                &format!("@{t}"),
                "-b",
                secret_base32,
            ])
        })
        .collect()
}

/// A well-formed code that no verifier with ±1 step of skew can accept now.
pub fn wrong_totp(secret_base32: &str, algorithm: &str, digits: u8, period: u64) -> String {
    let window = totp_window(secret_base32, algorithm, digits, period);
    let modulus = 10u64.pow(u32::from(digits));
    let mut n: u64 = window[1].parse().unwrap();
    loop {
        n = (n + 1) % modulus;
        let candidate = format!("{n:0width$}", width = usize::from(digits));
        if !window.contains(&candidate) {
            return candidate;
        }
    }
}

/// RFC 4648 base32 decoding (upper or lower case, padding optional).
pub fn base32_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let v = match c.to_ascii_uppercase() {
            b'A'..=b'Z' => c.to_ascii_uppercase() - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            other => panic!("not base32: {:?}", other as char),
        };
        buffer = (buffer << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

/// Does `hay` contain `needle` anywhere?
pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// File mode bits (`& 0o777`).
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

// ---------------------------------------------------------------------------------------------
// The two-factor gate (issue 4): an injected clock, policies, TOTP at a chosen time
// ---------------------------------------------------------------------------------------------

/// A fixed start time for the injected clock: 2027-01-15T08:00:00Z, aligned to 30 s and 60 s.
pub const T0: u64 = 1_800_000_000;

/// `RFC 3339` of a Unix time, computed by GNU `date` (independently of the code under test).
pub fn date_rfc3339(unix: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{unix}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("run date");
    assert!(out.status.success(), "date failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Unix seconds of a date, computed by GNU `date`, e.g. `2027-01-31` (midnight UTC).
pub fn date_unix(text: &str) -> u64 {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", text, "+%s"])
        .output()
        .expect("run date");
    assert!(out.status.success(), "date failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The code oathtool computes for `secret` at Unix time `t` with the given parameters.
pub fn totp_at_with(secret: &str, algorithm: &str, digits: u8, period: u64, t: u64) -> String {
    oathtool(&[
        &format!("--totp={algorithm}"),
        "-d",
        &digits.to_string(),
        "-s",
        &format!("{period}s"),
        "-N",
        &format!("@{t}"),
        "-b",
        secret,
    ])
}

/// The default-parameter (SHA-1, 6 digits, 30 s) code of `secret` at Unix time `t`.
pub fn totp_at(secret: &str, t: u64) -> String {
    totp_at_with(secret, "SHA1", 6, 30, t)
}

/// The policies of [`TWO_FACTOR_CONFIG`], one file each.
pub const TWO_FACTOR_POLICIES: &[(&str, &str)] = &[
    ("policies/public.yaml", DEFAULT_POLICY),
    ("policies/key-only.yaml", API_KEY_POLICY),
    (
        "policies/two-factor.yaml",
        "api_key: required
second_factor: required
factors: [totp, recovery_code]
step_up: { ttl: 15m, scope: policy }
roles: { only: [], except: [] }
failures: { per_consumer: { max: 5, window: 15m }, per_ip: { max: 50, window: 15m }, ban: 15m }
rollout: { mode: enforce }
",
    ),
    (
        "policies/two-factor-other.yaml",
        "api_key: required\nsecond_factor: required\n",
    ),
    (
        "policies/two-factor-global.yaml",
        "api_key: required\nsecond_factor: required\nstep_up: { ttl: 5m, scope: global }\n",
    ),
    (
        "policies/totp-only.yaml",
        "api_key: required\nsecond_factor: required\nfactors: [totp]\n",
    ),
    (
        "policies/recovery-only.yaml",
        "api_key: required\nsecond_factor: required\nfactors: [recovery_code]\n",
    ),
    (
        "policies/no-tokens.yaml",
        "api_key: required\nsecond_factor: required\nstep_up: { ttl: 0s }\n",
    ),
    (
        "policies/admins.yaml",
        "api_key: required\nsecond_factor: required\nroles: { only: [admin] }\n",
    ),
    (
        "policies/staff.yaml",
        "api_key: required\nsecond_factor: required\nroles: { except: [contractor] }\n",
    ),
    (
        "policies/grace.yaml",
        "api_key: required\nsecond_factor: required\nrollout: { mode: enforce, grace_until: 2027-01-31 }\n",
    ),
    (
        "policies/report.yaml",
        "description: Monthly reports\napi_key: required\nsecond_factor: required\nroles: { except: [contractor] }\nrollout: { mode: report_only }\n",
    ),
    (
        "policies/strict.yaml",
        "api_key: required\nsecond_factor: required\nfailures: { per_consumer: { max: 2, window: 10m }, per_ip: { max: 3, window: 10m }, ban: 1m }\n",
    ),
    (
        "policies/burst.yaml",
        "api_key: required\nsecond_factor: required\nfailures: { per_consumer: { max: 25, window: 15m } }\n",
    ),
];

/// Routes for every policy of [`TWO_FACTOR_POLICIES`], all to `${app}`. `GET /secure` needs a
/// key only, any other method on `/secure` a key and a second factor. `${extra}` is spliced in
/// at the top level (e.g. `trusted_proxies`).
pub const TWO_FACTOR_CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
data_dir: "${data_dir}"
${extra}
upstreams:
  app: { url: "${app}" }
routes:
  - { name: secure-read, match: { path: /secure, methods: [GET, HEAD] }, upstream: app, policy: key-only }
  - { name: secure, match: { path: /secure }, upstream: app, policy: two-factor }
  - { name: twofa, match: { path: /2fa }, upstream: app, policy: two-factor }
  - { name: other, match: { path: /other }, upstream: app, policy: two-factor-other }
  - { name: global, match: { path: /global }, upstream: app, policy: two-factor-global }
  - { name: totp-only, match: { path: /totp-only }, upstream: app, policy: totp-only }
  - { name: recovery-only, match: { path: /recovery-only }, upstream: app, policy: recovery-only }
  - { name: no-tokens, match: { path: /no-tokens }, upstream: app, policy: no-tokens }
  - { name: admins, match: { path: /admins }, upstream: app, policy: admins }
  - { name: staff, match: { path: /staff }, upstream: app, policy: staff }
  - { name: grace, match: { path: /grace }, upstream: app, policy: grace }
  - { name: report, match: { path: /report }, upstream: app, policy: report }
  - { name: burst, match: { path: /burst }, upstream: app, policy: burst }
  - { name: strict, match: { path: /strict }, upstream: app, policy: strict }
  - { name: keyed, match: { path: /keyed }, upstream: app, policy: key-only }
  - { name: open, match: { path: /open }, upstream: app, policy: public }
"#;

/// A gateway.yaml template with `${app}` and `${data_dir}` (and nothing else left to fill),
/// with its policy files: what [`TwoFactor::start_custom`] runs.
#[derive(Debug, Clone)]
pub struct CustomConfig {
    pub template: String,
    pub policies: Vec<(String, String)>,
}

impl CustomConfig {
    fn write(&self, app_url: &str, data_dir: &str) -> tempfile::TempDir {
        let files: Vec<(&str, &str)> = self
            .policies
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        write_config_with(
            &render(&self.template, &[("app", app_url), ("data_dir", data_dir)]),
            &files,
        )
    }
}

/// A consumer as created through the admin API.
#[derive(Debug, Clone)]
pub struct Consumer {
    pub id: String,
    pub name: String,
    pub key: String,
    pub prefix: String,
}

/// A confirmed TOTP enrolment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub secret: String,
    pub algorithm: &'static str,
    pub digits: u8,
    pub period: u64,
    pub recovery_codes: Vec<String>,
}

/// An in-process gateway on [`TWO_FACTOR_CONFIG`] with a manual clock (starting at [`T0`]) and a
/// recording upstream.
pub struct TwoFactor {
    pub gw: AdminGw,
    pub up: Upstream,
    pub clock: Arc<stepgate::clock::ManualClock>,
    /// The data directory, outside the config's temp dir so that a restart keeps it.
    pub data: tempfile::TempDir,
    config: CustomConfig,
}

impl TwoFactor {
    pub async fn start() -> TwoFactor {
        TwoFactor::start_with("").await
    }

    /// With `extra` top-level YAML (e.g. `trusted_proxies: [127.0.0.2/32]`).
    pub async fn start_with(extra: &str) -> TwoFactor {
        let config = CustomConfig {
            template: TWO_FACTOR_CONFIG.replace("${extra}", extra),
            policies: TWO_FACTOR_POLICIES
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        TwoFactor::start_custom(config).await
    }

    /// On any configuration (see [`CustomConfig`]), with a recording upstream as `${app}`.
    pub async fn start_custom(config: CustomConfig) -> TwoFactor {
        let up = Upstream::named("app").await;
        let clock = Arc::new(stepgate::clock::ManualClock::new(T0));
        let data = tempfile::tempdir().expect("tempdir");
        let dir = config.write(&up.url(), &path_str(data.path()));
        let gw = GatewayBuilder::in_dir(dir)
            .clock(clock.clone())
            .start_admin()
            .await;
        TwoFactor {
            gw,
            up,
            clock,
            data,
            config,
        }
    }

    /// Shuts the gateway down and starts a new one on the same data directory, upstream and
    /// clock (new ports, new admin listener; the admin token is kept in the data directory).
    pub async fn restart(&mut self) {
        self.gw.shutdown().await;
        let dir = self
            .config
            .write(&self.up.url(), &path_str(self.data.path()));
        self.gw = GatewayBuilder::in_dir(dir)
            .clock(self.clock.clone())
            .start_admin()
            .await;
    }

    /// The SQLite file of the store.
    pub fn db_path(&self) -> PathBuf {
        self.data.path().join("stepgate.db")
    }

    pub fn addr(&self) -> SocketAddr {
        self.gw.addr()
    }

    pub fn now(&self) -> u64 {
        use stepgate::clock::Clock;
        self.clock.now()
    }

    pub fn advance(&self, seconds: u64) {
        self.clock.advance(seconds);
    }

    pub fn set(&self, now: u64) {
        self.clock.set(now);
    }

    /// `POST /consumers`.
    pub async fn consumer(&self, name: &str, roles: &[&str]) -> Consumer {
        let created = self.gw.add_consumer(name, roles).await;
        Consumer {
            id: created["id"].as_str().unwrap().to_string(),
            name: name.to_string(),
            key: created["api_key"].as_str().unwrap().to_string(),
            prefix: created["prefix"].as_str().unwrap().to_string(),
        }
    }

    /// A step-up token earned on `/2fa/x` with the current code; then moves the clock one
    /// period on, so that the next code is fresh.
    pub async fn earn_token(&self, key: &str, e: &Enrolled) -> String {
        let r = self
            .call("/2fa/x", key, Some(&totp_at(&e.secret, self.now())))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let token = r.header("x-step-up-token").unwrap().to_string();
        self.advance(30);
        token
    }

    /// Enrols and confirms default TOTP (SHA-1, 6 digits, 30 s) at the clock's time, then
    /// moves the clock one period on, so that the next code is fresh.
    pub async fn enrol(&self, name: &str) -> Enrolled {
        self.enrol_with(name, "SHA1", 6, 30).await
    }

    /// [`enrol`](Self::enrol) with chosen parameters.
    pub async fn enrol_with(
        &self,
        name: &str,
        algorithm: &'static str,
        digits: u8,
        period: u64,
    ) -> Enrolled {
        let begun = self
            .gw
            .ok(
                "POST",
                &format!("/consumers/{name}/totp"),
                Some(
                    serde_json::json!({"algorithm": algorithm, "digits": digits, "period": period}),
                ),
                201,
            )
            .await;
        let secret = begun["secret"].as_str().expect("secret").to_string();
        let code = totp_at_with(&secret, algorithm, digits, period, self.now());
        let confirmed = self
            .gw
            .ok(
                "POST",
                &format!("/consumers/{name}/totp/confirm"),
                Some(serde_json::json!({ "code": code })),
                200,
            )
            .await;
        let recovery_codes = confirmed["recovery_codes"]
            .as_array()
            .expect("recovery codes")
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        self.advance(period);
        Enrolled {
            secret,
            algorithm,
            digits,
            period,
            recovery_codes,
        }
    }

    /// A request from 127.0.0.1 with `headers`.
    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut b = req(method, path, "api.example.com");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        send_http1(self.addr(), b.body(empty()).unwrap()).await
    }

    /// `GET path` with a key and, when given, an `X-OTP` code.
    pub async fn call(&self, path: &str, key: &str, code: Option<&str>) -> Resp {
        match code {
            Some(code) => {
                self.send("GET", path, &[("x-api-key", key), ("x-otp", code)])
                    .await
            }
            None => self.send("GET", path, &[("x-api-key", key)]).await,
        }
    }

    /// `GET path` with a key and a step-up token.
    pub async fn call_token(&self, path: &str, key: &str, token: &str) -> Resp {
        self.send(
            "GET",
            path,
            &[("x-api-key", key), ("x-step-up-token", token)],
        )
        .await
    }

    /// A request with `headers` from the local address `from` (any of 127.0.0.0/8).
    pub async fn send_from(
        &self,
        from: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut b = req(method, path, "api.example.com");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        send_http1_from(from, self.addr(), b.body(empty()).unwrap()).await
    }

    /// `GET /audit?consumer=name` (every event, newest first).
    pub async fn audit(&self, name: &str) -> Vec<serde_json::Value> {
        let events = self
            .gw
            .ok(
                "GET",
                &format!("/audit?consumer={name}&limit=1000"),
                None,
                200,
            )
            .await;
        events["events"].as_array().expect("events").clone()
    }

    /// `GET /audit` (every event, newest first).
    pub async fn audit_all(&self) -> Vec<serde_json::Value> {
        let events = self.gw.ok("GET", "/audit?limit=1000", None, 200).await;
        events["events"].as_array().expect("events").clone()
    }

    /// The last request the upstream received.
    pub fn last_upstream(&self) -> Recorded {
        self.up
            .requests()
            .pop()
            .expect("the upstream received a request")
    }
}

/// Sends one request over HTTP/1.1 on a fresh connection from the local address `from`.
pub async fn send_http1_from<B>(from: &str, addr: SocketAddr, req: Request<B>) -> Resp
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    let local: SocketAddr = format!("{from}:0").parse().expect("a local IPv4 address");
    socket
        .bind(local)
        .unwrap_or_else(|e| panic!("bind {local}: {e}"));
    let stream = socket.connect(addr).await.expect("connect");
    let resp = send_http1_on(stream, req)
        .await
        .expect("HTTP/1.1 request failed");
    read_resp(resp).await
}

/// Asserts a 401 of the second factor: the problem code and the `OTP` challenge naming the
/// policy's `methods`.
pub fn assert_otp_refused(r: &Resp, code: &str, methods: &str) {
    r.assert_problem(401, code);
    let expected = format!(r#"OTP realm="stepgate", error="{code}", methods="{methods}""#);
    assert_eq!(
        r.header("www-authenticate"),
        Some(expected.as_str()),
        "headers: {:?}",
        r.headers
    );
}

/// Asserts a 429 `too_many_attempts` whose `Retry-After` is `retry_after` seconds.
pub fn assert_banned(r: &Resp, retry_after: u64) {
    r.assert_problem(429, "too_many_attempts");
    assert_eq!(
        r.header("retry-after"),
        Some(retry_after.to_string().as_str()),
        "Retry-After; headers: {:?}",
        r.headers
    );
}

/// Asserts that the upstream request carries no credential header.
pub fn assert_no_credentials(rec: &Recorded) {
    for h in ["x-api-key", "x-otp", "x-step-up-token"] {
        assert_eq!(rec.header(h), None, "the upstream received {h}");
    }
}

/// A well-formed (`sgk_` + 64 hex + 8 hex) key that no consumer holds.
pub fn unknown_key(n: u64) -> String {
    format!(
        "sgk_{n:064x}{:08x}",
        n.wrapping_mul(2_654_435_761) & 0xffff_ffff
    )
}

/// A well-formed 6-digit code that a ±1-step verifier does not accept at `t` (default
/// parameters), derived from oathtool's codes around `t`.
pub fn wrong_at(secret: &str, t: u64) -> String {
    let window = [
        totp_at(secret, t - 30),
        totp_at(secret, t),
        totp_at(secret, t + 30),
    ];
    let mut n: u32 = window[1].parse().unwrap();
    loop {
        n = (n + 1) % 1_000_000;
        let candidate = format!("{n:06}");
        if !window.contains(&candidate) {
            return candidate;
        }
    }
}

/// `sgt_` + 64 lower-case hex digits.
pub fn is_step_up_token(token: &str) -> bool {
    token.len() == 68
        && token.starts_with("sgt_")
        && token[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
