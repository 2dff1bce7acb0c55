//! Limits: body size (413), URI size (414), header size/count (431), ambiguous paths (400),
//! and the header read timeout (slowloris).
use stepgate_testkit::*;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
limits:
  header_bytes: 2KiB
  header_count: 20
  uri_bytes: 1KiB
  header_read_timeout: 300ms
upstreams:
  app: { url: "${app}" }
routes:
  - name: small
    match: { path: /small }
    upstream: app
    policy: public
    body_bytes: 1KiB
  - name: app
    match: { path: / }
    upstream: app
    policy: public
"#;

async fn setup() -> (Gw, Upstream) {
    let up = Upstream::named("app").await;
    let gw = GatewayBuilder::new(&render(CONFIG, &[("app", &up.url())]))
        .start()
        .await;
    (gw, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_at_route_limit_is_accepted() {
    let (gw, up) = setup().await;
    let r = send_http1(
        gw.addr,
        req("POST", "/small", "h")
            .body(full(vec![b'x'; 1024]))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.only_request().body_bytes, 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_over_route_limit_is_413() {
    let (gw, up) = setup().await;
    let r = send_http1(
        gw.addr,
        req("POST", "/small", "h")
            .body(full(vec![b'x'; 1025]))
            .unwrap(),
    )
    .await;
    r.assert_problem(413, "too_large");
    let r = send_http1(
        gw.addr,
        req("PUT", "/small/x", "h")
            .body(full(vec![b'x'; 5000]))
            .unwrap(),
    )
    .await;
    r.assert_problem(413, "too_large");
    assert_eq!(
        up.arrived(),
        0,
        "an over-limit Content-Length must be rejected before forwarding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_over_default_limit_is_413_without_reading_body() {
    let (gw, up) = setup().await;
    // 11 MiB declared (default limit 10 MiB); no body bytes are sent at all.
    let t0 = Instant::now();
    let r = raw_request(
        gw.addr,
        b"POST /any HTTP/1.1\r\nHost: h\r\nContent-Length: 11534336\r\n\r\n",
    )
    .await
    .expect("gateway must answer 413 without waiting for the body");
    r.assert_problem(413, "too_large");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(up.arrived(), 0);
}

/// Upstream requests (if any were forwarded) never got more than the limit, and never a
/// cleanly-ended body.
fn assert_upstream_saw_no_overflow(up: &Upstream) {
    for rec in up.requests() {
        assert!(
            rec.body_bytes <= 1024,
            "upstream received {} bytes past the 1 KiB limit",
            rec.body_bytes
        );
        assert!(
            rec.body_error.is_some(),
            "upstream body must be aborted, not ended cleanly"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunked_body_over_route_limit_is_413() {
    let (gw, up) = setup().await;
    // 4 KiB in 512-byte chunks with unknown length (chunked), then the body stays open: the
    // gateway must answer 413 as soon as the 1 KiB limit is crossed, not at the end.
    let r = send_http1(
        gw.addr,
        req("POST", "/small", "h")
            .body(GenBody::stalling(4 * 1024, 512).boxed())
            .unwrap(),
    )
    .await;
    r.assert_problem(413, "too_large");
    assert_upstream_saw_no_overflow(&up);
    // Under the limit, chunked is fine.
    let r = send_http1(
        gw.addr,
        req("POST", "/small", "h")
            .body(GenBody::new(1000, 100, false).boxed())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.requests().last().unwrap().body_bytes, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_chunked_body_over_route_limit_is_413_raw() {
    let (gw, up) = setup().await;
    // The whole 64 KiB chunked body is written at once; the response must still be a 413.
    let mut raw = b"POST /small HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..64 {
        raw.extend_from_slice(b"400\r\n");
        raw.extend_from_slice(&[b'z'; 1024]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = raw_request(gw.addr, &raw)
        .await
        .expect("no response to an over-limit body");
    r.assert_problem(413, "too_large");
    assert_upstream_saw_no_overflow(&up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_uri_is_414() {
    let (gw, up) = setup().await;
    let ok_path = format!("/{}", "a".repeat(900));
    assert_eq!(get(gw.addr, &ok_path, "h").await.status, 200);
    let long_path = format!("/{}", "a".repeat(1100));
    get(gw.addr, &long_path, "h")
        .await
        .assert_problem(414, "too_large");
    let long_query = format!("/q?x={}", "b".repeat(1100));
    get(gw.addr, &long_query, "h")
        .await
        .assert_problem(414, "too_large");
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_headers_are_431() {
    let (gw, up) = setup().await;
    let ok = send_http1(
        gw.addr,
        req("GET", "/h", "h")
            .header("x-big", "v".repeat(1000))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    let r = send_http1(
        gw.addr,
        req("GET", "/h", "h")
            .header("x-big", "v".repeat(2100))
            .body(empty())
            .unwrap(),
    )
    .await;
    r.assert_problem(431, "too_large");
    // Many medium headers that add up past 2 KiB.
    let mut b = req("GET", "/h", "h");
    for i in 0..5 {
        b = b.header(format!("x-part-{i}"), "p".repeat(500));
    }
    send_http1(gw.addr, b.body(empty()).unwrap())
        .await
        .assert_problem(431, "too_large");
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_are_431() {
    let (gw, up) = setup().await;
    let mut b = req("GET", "/h", "h");
    for i in 0..10 {
        b = b.header(format!("x-h-{i}"), "1");
    }
    assert_eq!(
        send_http1(gw.addr, b.body(empty()).unwrap()).await.status,
        200
    );
    let mut b = req("GET", "/h", "h");
    for i in 0..25 {
        b = b.header(format!("x-h-{i}"), "1");
    }
    send_http1(gw.addr, b.body(empty()).unwrap())
        .await
        .assert_problem(431, "too_large");
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_400() {
    let (gw, up) = setup().await;
    let bad = [
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "/a/./b",
        "/a/../b",
        "/a/..",
        "/.",
        "/a/%2E%2E/b",
        "/a/%2e%2e/b",
        "/a/.%2E/b",
        "/a/%2E/b",
        "/a%00b",
        "/a%G1",
        "/a%4",
        "/a%",
        "/a//b",
        "//a",
    ];
    for path in bad {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let r = raw_request(gw.addr, raw.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            r.status, 400,
            "path {path:?} must be rejected; got {}",
            r.head
        );
        let j = r.json();
        assert_eq!(j["code"], "bad_request", "path {path:?}: {j}");
        assert_eq!(j["status"], 400, "path {path:?}: {j}");
    }
    assert!(
        up.requests().is_empty(),
        "ambiguous paths reached upstream: {:?}",
        up.requests()
    );

    // Look-alikes that are not ambiguous are served.
    for (path, fwd) in [
        ("/a..b/c", "/a..b/c"),
        ("/a/.hidden", "/a/.hidden"),
        ("/a/...", "/a/..."),
        ("/a/b/", "/a/b/"),
        ("/a%2Db", "/a-b"),
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let r = raw_request(gw.addr, raw.as_bytes()).await.unwrap();
        assert_eq!(r.status, 200, "path {path:?}: {}", r.head);
        assert_eq!(up.requests().last().unwrap().path_and_query(), fwd);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_by_header_read_timeout() {
    let (gw, up) = setup().await;
    let s = TcpStream::connect(gw.addr).await.unwrap();
    a_dripped_head_is_cut(s).await;
    assert!(up.requests().is_empty());
    // The gateway still serves normal clients.
    assert_eq!(get(gw.addr, "/after", "h").await.status, 200);
}

/// Starts a request head on `s` and drips one header line every 50 ms for up to 3 s, never
/// finishing it: the gateway must close the connection at the 300 ms header-read timeout,
/// with nothing or a 408 before it.
async fn a_dripped_head_is_cut(s: TcpStream) {
    let (mut rd, mut wr) = s.into_split();
    let t0 = Instant::now();
    wr.write_all(b"GET /slow HTTP/1.1\r\nHost: h\r\n")
        .await
        .unwrap();
    let dripper = tokio::spawn(async move {
        for i in 0..60 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if wr
                .write_all(format!("X-Drip-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let buf = closed_between(&mut rd, t0, 250, 2000, "header_read_timeout: 300ms").await;
    dripper.abort();
    if !buf.is_empty() {
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "unexpected response to slow client: {text}"
        );
    }
}

/// The header-read timeout holds for every head of a keep-alive connection, however long the
/// heads before it waited: waits shorter than the timeout pass, one longer is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_head_on_a_keep_alive_connection_gets_the_header_read_timeout() {
    let (gw, up) = setup().await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    for i in 0..3 {
        // Each wait is half the timeout and together they outlast it: only a deadline
        // moved on for every head lets them all through.
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(format!("GET /k{i} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let r = read_raw_response(&mut s).await.expect("a response");
        assert_eq!(r.status, 200, "request {i} on the connection");
    }
    a_dripped_head_is_cut(s).await;
    assert_eq!(up.requests().len(), 3);
}

/// `limits.idle_timeout`: a keep-alive connection that moves no byte for that long is closed
/// (between the timeout and a quarter more); one in use stays open past it. (Waiting for the
/// next request head also counts against `header_read_timeout`, made longer here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_and_busy_ones_are_not() {
    let up = Upstream::named("app").await;
    let config = CONFIG.replace(
        "  header_read_timeout: 300ms\n",
        "  header_read_timeout: 5s\n  idle_timeout: 400ms\n",
    );
    let gw = GatewayBuilder::new(&render(&config, &[("app", &up.url())]))
        .start()
        .await;
    let request = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n";
    let mut tmp = [0u8; 4096];

    // Busy: a request every 150 ms for 1.2 s, three idle timeouts, on one connection.
    let mut busy = TcpStream::connect(gw.addr).await.unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1200) {
        busy.write_all(request).await.unwrap();
        let n = busy.read(&mut tmp).await.unwrap();
        assert!(
            tmp[..n].starts_with(b"HTTP/1.1 200"),
            "the busy connection was closed after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // Idle after one request: closed by the gateway.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(request).await.unwrap();
    let n = idle.read(&mut tmp).await.unwrap();
    assert!(tmp[..n].starts_with(b"HTTP/1.1 200"));
    let t0 = Instant::now();
    let rest = closed_between(&mut idle, t0, 350, 1500, "idle_timeout: 400ms").await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// Reads until the gateway closes the connection, at most 3 s; asserts that happened between
/// `min_ms` and `max_ms` after `t0` (`what` is the limit that should close it) and returns the
/// bytes read meanwhile.
async fn closed_between(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    t0: Instant,
    min_ms: u64,
    max_ms: u64,
    what: &str,
) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 1024];
    let closed_after = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.read(&mut tmp).await {
                Ok(0) | Err(_) => return t0.elapsed(),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the connection was still open after 3 s ({what})"));
    assert!(
        closed_after >= Duration::from_millis(min_ms),
        "closed before the limit ({what}): {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_millis(max_ms),
        "closed too late ({what}): {closed_after:?}"
    );
    buf
}
