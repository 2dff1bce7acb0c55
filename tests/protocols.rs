//! Protocols: HTTP/2 over TLS (ALPN), HTTP/1.1 over TLS, h2c with prior knowledge.
use stepgate_testkit::*;

use http::{Request, Version};

const PLAIN: &str = r#"
listen: 127.0.0.1:0
upstreams:
  app:    { url: "${app}" }
  hosted: { url: "${hosted}" }
routes:
  - name: app
    match: { path: / }
    upstream: app
    policy: public
  - name: hosted
    match: { host: api.example.com, path: /only-host }
    upstream: hosted
    policy: public
"#;

const TLS: &str = r#"
listen: 127.0.0.1:0
tls:
  cert: certs/cert.pem
  key: certs/key.pem
upstreams:
  app:    { url: "${app}" }
  hosted: { url: "${hosted}" }
routes:
  - name: app
    match: { path: / }
    upstream: app
    policy: public
  - name: hosted
    match: { host: localhost, path: /only-host }
    upstream: hosted
    policy: public
"#;

struct Setup {
    gw: Gw,
    app: Upstream,
    hosted: Upstream,
    cert: TestCert,
}

async fn setup(tls: bool) -> Setup {
    install_crypto();
    let app = Upstream::named("app").await;
    let hosted = Upstream::named("hosted").await;
    let cert = self_signed_localhost();
    let vars = [("app", app.url()), ("hosted", hosted.url())];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let gw = if tls {
        GatewayBuilder::in_dir(write_config_with(
            &render(TLS, &vars),
            &[
                ("policies/public.yaml", DEFAULT_POLICY),
                ("certs/cert.pem", &cert.cert_pem),
                ("certs/key.pem", &cert.key_pem),
            ],
        ))
        .start()
        .await
    } else {
        GatewayBuilder::new(&render(PLAIN, &vars)).start().await
    };
    Setup {
        gw,
        app,
        hosted,
        cert,
    }
}

fn abs(scheme: &str, authority: &str, path: &str) -> Request<BoxBody> {
    Request::builder()
        .method("GET")
        .uri(format!("{scheme}://{authority}{path}"))
        .body(empty())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_via_alpn() {
    let s = setup(true).await;
    let authority = format!("localhost:{}", s.gw.addr.port());
    let (alpn, r) = send_tls(
        s.gw.addr,
        &s.cert,
        &[b"h2", b"http/1.1"],
        abs("https", &authority, "/tls/path?x=1"),
    )
    .await;
    assert_eq!(
        alpn.as_deref(),
        Some(&b"h2"[..]),
        "server must select h2 via ALPN"
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.text(), "app");
    assert!(r.header("x-request-id").is_some());
    let rec = s.app.only_request();
    assert_eq!(rec.path_and_query(), "/tls/path?x=1");
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
    assert_eq!(rec.header("x-forwarded-host"), Some(authority.as_str()));
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(rec.header("host"), Some(s.app.addr.to_string().as_str()));

    // :authority is used for host routing.
    let (_, r) = send_tls(
        s.gw.addr,
        &s.cert,
        &[b"h2"],
        abs("https", &authority, "/only-host/1"),
    )
    .await;
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.text(), "hosted");
    assert_eq!(s.hosted.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_via_alpn() {
    let s = setup(true).await;
    let (alpn, r) = send_tls(
        s.gw.addr,
        &s.cert,
        &[b"http/1.1"],
        req("GET", "/tls1?y=2", "localhost").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(r.text(), "app");
    let rec = s.app.only_request();
    assert_eq!(rec.path_and_query(), "/tls1?y=2");
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
    assert_eq!(rec.header("x-forwarded-host"), Some("localhost"));

    let (_, r) = send_tls(
        s.gw.addr,
        &s.cert,
        &[b"http/1.1"],
        req("GET", "/only-host", "LOCALHOST:1234")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.text(), "hosted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_alpn_speaks_http1() {
    let s = setup(true).await;
    let (alpn, r) = send_tls(
        s.gw.addr,
        &s.cert,
        &[],
        req("GET", "/noalpn", "localhost").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(alpn, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(
        s.app.only_request().header("x-forwarded-proto"),
        Some("https")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_tls_listener_gets_no_http_response() {
    let s = setup(true).await;
    let res = raw_request(
        s.gw.addr,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    if let Ok(r) = &res {
        panic!(
            "plaintext request on TLS port must not be served, got {}",
            r.head
        );
    }
    assert!(s.app.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge() {
    let s = setup(false).await;
    let r = send_h2c(s.gw.addr, abs("http", "api.example.com", "/h2c/x?z=%20")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.text(), "app");
    let rec = s.app.only_request();
    assert_eq!(rec.path_and_query(), "/h2c/x?z=%20");
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    assert_eq!(rec.header("x-forwarded-host"), Some("api.example.com"));

    let r = send_h2c(s.gw.addr, abs("http", "API.example.com:99", "/only-host")).await;
    assert_eq!(r.text(), "hosted");
    // Without the host the host-specific route does not match.
    let r = send_h2c(s.gw.addr, abs("http", "other.example", "/only-host")).await;
    assert_eq!(r.text(), "app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_multiplexes_concurrent_streams() {
    let s = setup(false).await;
    let tcp = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let resp = sender
                .send_request(abs("http", "a.example", &format!("/stream/{i}")))
                .await
                .unwrap();
            read_resp(resp).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.version, Version::HTTP_2);
    }
    let mut paths: Vec<String> = s
        .app
        .requests()
        .iter()
        .map(|r| r.path_and_query())
        .collect();
    paths.sort();
    let mut want: Vec<String> = (0..8).map(|i| format!("/stream/{i}")).collect();
    want.sort();
    assert_eq!(paths, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_http1() {
    let s = setup(false).await;
    let r = get(s.gw.addr, "/plain", "api.example.com").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(
        s.app.only_request().header("x-forwarded-proto"),
        Some("http")
    );
}
