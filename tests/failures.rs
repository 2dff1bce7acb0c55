//! Upstream failures: refused connections, timeouts, resets mid-body, no retries.
use stepgate_testkit::*;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONFIG: &str = r#"
listen: 127.0.0.1:0
upstreams:
  bad: { url: "${url}", connect_timeout: 1s, timeout: 300ms }
routes:
  - name: bad
    match: { path: / }
    upstream: bad
    policy: public
"#;

async fn gateway_for(url: &str) -> Gw {
    GatewayBuilder::new(&render(CONFIG, &[("url", url)]))
        .start()
        .await
}

/// A raw TCP upstream: runs `f` on every accepted connection; counts connections.
struct RawUpstream {
    addr: SocketAddr,
    conns: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    async fn start<F, Fut>(f: F) -> RawUpstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicU64::new(0));
        let c2 = conns.clone();
        let f = Arc::new(f);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c2.fetch_add(1, Ordering::SeqCst);
                let f = f.clone();
                tokio::spawn(async move { f(s).await });
            }
        });
        RawUpstream { addr, conns, task }
    }
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn conns(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }
}

async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut tmp).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    buf
}

/// Writes `response_prefix`, waits a moment so the bytes are delivered, then resets (RST).
async fn write_then_reset(mut s: TcpStream, response_prefix: &'static [u8]) {
    read_head(&mut s).await;
    s.write_all(response_prefix).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    s.set_zero_linger().unwrap();
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_502() {
    let addr = closed_port_addr().await;
    let gw = gateway_for(&format!("http://{addr}")).await;
    let r = get(gw.addr, "/x", "h").await;
    let j = r.assert_problem(502, "upstream_unavailable");
    assert_eq!(j["status"], 502);
    let r = send_http1(
        gw.addr,
        req("POST", "/x", "h").body(full("payload")).unwrap(),
    )
    .await;
    r.assert_problem(502, "upstream_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_is_504_after_timeout() {
    let hole = BlackHole::start().await;
    let gw = gateway_for(&hole.url()).await;
    let t0 = Instant::now();
    let r = get(gw.addr, "/slow", "h").await;
    let took = t0.elapsed();
    r.assert_problem(504, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(250),
        "timed out too early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "timeout not enforced: {took:?}"
    );
}

/// The timeout holds for every request of a keep-alive connection, however its requests
/// before it went: answered, timed out, or answered after one that timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_connection_gets_its_own_timeout() {
    // Answers `GET /fast` at once, on any connection, as often as asked; never answers
    // anything else.
    let up = RawUpstream::start(|mut s| async move {
        loop {
            let head = read_head(&mut s).await;
            if head.is_empty() {
                return;
            }
            if !head.starts_with(b"GET /fast ") {
                std::future::pending::<()>().await;
            }
            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let gw = gateway_for(&up.url()).await;
    let mut conn = ops::KeepAlive::connect(gw.addr).await;
    for round in 0..2 {
        assert_eq!(conn.get("/fast", &[]).await.status, 200, "round {round}");
        let t0 = Instant::now();
        conn.get("/slow", &[])
            .await
            .assert_problem(504, "upstream_timeout");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "round {round}: the timeout took {took:?}, not ~300ms"
        );
    }
    assert_eq!(conn.get("/fast", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_answers_head_slowly_is_504() {
    // Accepts and reads the request, then waits longer than `timeout` before answering.
    let up = RawUpstream::start(|mut s| async move {
        read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
    })
    .await;
    let gw = gateway_for(&up.url()).await;
    let t0 = Instant::now();
    let r = get(gw.addr, "/slow", "h").await;
    r.assert_problem(504, "upstream_timeout");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        t0.elapsed()
    );
}

/// The client must never see a complete-looking response when the upstream dies mid-body.
async fn assert_truncated_h1(gw: &Gw) {
    match send_http1_stream(gw.addr, req("GET", "/trunc", "h").body(empty()).unwrap()).await {
        Err(e) => eprintln!("outcome: request error: {e}"),
        Ok(resp) => {
            let status = resp.status();
            eprintln!("outcome: status {status}, headers {:?}", resp.headers());
            if status == 502 {
                return;
            }
            assert_eq!(status, 200);
            let res = tokio::time::timeout(STEP, resp.into_body().collect())
                .await
                .expect("body never finished: gateway must abort the client response");
            match res {
                Err(e) => eprintln!("outcome: body error: {e}"),
                Ok(b) => panic!(
                    "client saw a complete response of {} bytes from a truncated upstream body",
                    b.to_bytes().len()
                ),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body_with_content_length_aborts_client_http1() {
    let up = RawUpstream::start(|s| {
        write_then_reset(
            s,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
    })
    .await;
    let gw = gateway_for(&up.url()).await;
    assert_truncated_h1(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body_chunked_aborts_client_http1() {
    // With an unknown length the gateway must not terminate the chunked encoding cleanly.
    let up = RawUpstream::start(|s| {
        write_then_reset(
            s,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
        )
    })
    .await;
    let gw = gateway_for(&up.url()).await;
    assert_truncated_h1(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body_aborts_client_h2() {
    let up = RawUpstream::start(|s| {
        write_then_reset(
            s,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
    })
    .await;
    let gw = gateway_for(&up.url()).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let req = Request::get("http://h/trunc").body(empty()).unwrap();
    match send_h2_on(tcp, req).await {
        Err(e) => eprintln!("outcome: h2 request error: {e}"),
        Ok(resp) => {
            eprintln!("outcome: status {}", resp.status());
            if resp.status() == 502 {
                return;
            }
            assert_eq!(resp.status(), 200);
            let res = tokio::time::timeout(STEP, resp.into_body().collect())
                .await
                .expect("h2 stream never finished");
            if let Err(e) = &res {
                eprintln!("outcome: h2 body error: {e}");
            }
            if let Ok(b) = res {
                panic!(
                    "h2 client saw a complete response of {} bytes from a truncated upstream",
                    b.to_bytes().len()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_response_is_502_without_retry() {
    // Reads the request, then resets without answering. Not a connect failure: no retry.
    let up = RawUpstream::start(|s| write_then_reset(s, b"")).await;
    let gw = gateway_for(&up.url()).await;
    let r = get(gw.addr, "/idempotent", "h").await;
    r.assert_problem(502, "upstream_unavailable");
    assert_eq!(
        up.conns(),
        1,
        "GET must not be retried after the request was sent"
    );

    let r = send_http1(
        gw.addr,
        req("POST", "/post", "h").body(full("data")).unwrap(),
    )
    .await;
    r.assert_problem(502, "upstream_unavailable");
    assert_eq!(up.conns(), 2, "POST must never be retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keeps_serving_after_upstream_failures() {
    let addr = closed_port_addr().await;
    let gw = gateway_for(&format!("http://{addr}")).await;
    for _ in 0..5 {
        get(gw.addr, "/x", "h")
            .await
            .assert_problem(502, "upstream_unavailable");
    }
    // Same connection, several requests: keep-alive survives error responses.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        sender.ready().await.unwrap();
        let resp = sender
            .send_request(req("GET", "/x", "h").body(empty()).unwrap())
            .await
            .unwrap();
        read_resp(resp)
            .await
            .assert_problem(502, "upstream_unavailable");
    }
}
