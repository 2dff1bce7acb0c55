//! Graceful shutdown: in-flight requests complete, new connections are refused, run() returns.
use stepgate_testkit::*;

use std::time::{Duration, Instant};

use http::Response;
use tokio::net::TcpStream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
limits:
  drain_timeout: 5s
upstreams:
  slow: { url: "${slow}", timeout: 10s }
routes:
  - name: slow
    match: { path: / }
    upstream: slow
    policy: public
"#;

async fn slow_upstream(delay: Duration) -> Upstream {
    Upstream::with_async(move |_r| async move {
        tokio::time::sleep(delay).await;
        Response::builder().status(200).body(full("done")).unwrap()
    })
    .await
}

async fn connection_refused_within(addr: std::net::SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_request_completes_after_cancel() {
    let up = slow_upstream(Duration::from_millis(500)).await;
    let mut gw = GatewayBuilder::new(&render(CONFIG, &[("slow", &up.url())]))
        .start()
        .await;
    let addr = gw.addr;
    let in_flight = tokio::spawn(async move {
        send_http1(addr, req("GET", "/slow", "h").body(empty()).unwrap()).await
    });
    up.wait_arrived(1).await;
    let cancelled_at = Instant::now();
    gw.token.cancel();

    // While draining, the listener is closed: new connections are refused.
    assert!(
        connection_refused_within(addr, Duration::from_millis(300)).await,
        "new connections still accepted after cancel()"
    );
    assert!(
        !in_flight.is_finished(),
        "in-flight request finished too early"
    );

    let r = tokio::time::timeout(STEP, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "done");

    // run() returns once the in-flight request is done, well before drain_timeout (5s).
    let join = gw.join.take().unwrap();
    let res = tokio::time::timeout(Duration::from_secs(3), join)
        .await
        .expect("run() did not return after draining")
        .expect("gateway task panicked");
    assert!(
        res.is_ok(),
        "run() returned an error: {:?}",
        res.err().map(|e| e.to_string())
    );
    assert!(cancelled_at.elapsed() < Duration::from_secs(3));

    // And stays closed.
    let e = TcpStream::connect(addr)
        .await
        .expect_err("connection accepted after shutdown");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shutdown_returns_promptly() {
    let up = Upstream::named("x").await;
    let mut gw = GatewayBuilder::new(&render(CONFIG, &[("slow", &up.url())]))
        .start()
        .await;
    // An idle keep-alive connection must not hold shutdown up until drain_timeout.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn_task = tokio::spawn(conn);
    let resp = sender
        .send_request(req("GET", "/idle", "h").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(read_resp(resp).await.status, 200);

    let t0 = Instant::now();
    gw.token.cancel();
    let join = gw.join.take().unwrap();
    let res = tokio::time::timeout(Duration::from_secs(3), join)
        .await
        .expect("run() waited for an idle keep-alive connection")
        .unwrap();
    assert!(res.is_ok());
    assert!(t0.elapsed() < Duration::from_secs(3));
    // The idle connection was closed by the gateway.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn_task)
        .await
        .expect("idle client connection not closed by shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_shutdown() {
    let config = r#"
listen: 127.0.0.1:0
limits:
  drain_timeout: 300ms
upstreams:
  slow: { url: "${slow}", timeout: 30s }
routes:
  - name: slow
    match: { path: / }
    upstream: slow
    policy: public
"#;
    let up = slow_upstream(Duration::from_secs(20)).await;
    let mut gw = GatewayBuilder::new(&render(config, &[("slow", &up.url())]))
        .start()
        .await;
    let addr = gw.addr;
    let in_flight = tokio::spawn(async move {
        send_http1_stream(addr, req("GET", "/stuck", "h").body(empty()).unwrap()).await
    });
    up.wait_arrived(1).await;
    let t0 = Instant::now();
    gw.token.cancel();
    let join = gw.join.take().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(3), join)
        .await
        .expect("run() must return after drain_timeout even with a stuck request")
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "returned before drain_timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "drain took {took:?}");
    in_flight.abort();
}
