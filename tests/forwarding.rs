//! Forwarding: hop-by-hop headers, X-Forwarded-*, X-Request-Id, query and path handling,
//! and the built-in echo upstream.
use stepgate_testkit::*;

use http::Response;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
upstreams:
  app:  { url: "${app}" }
  demo: { echo: {} }
routes:
  - name: app
    match: { path: / }
    upstream: app
    policy: public
  - name: echo
    match: { path: /echo }
    upstream: demo
    policy: public
"#;

async fn setup_with(up: Upstream) -> (Gw, Upstream) {
    let gw = GatewayBuilder::new(&render(CONFIG, &[("app", &up.url())]))
        .start()
        .await;
    (gw, up)
}

async fn setup() -> (Gw, Upstream) {
    setup_with(Upstream::named("app").await).await
}

const REQUEST_HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "x-foo",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_removed() {
    let (gw, up) = setup().await;
    // Raw bytes so that exactly these headers go on the wire.
    let raw = "GET /hop HTTP/1.1\r\n\
               Host: api.example.com\r\n\
               Connection: keep-alive, X-Foo, x-bar, X-Request-Id\r\n\
               Keep-Alive: timeout=5\r\n\
               Proxy-Connection: keep-alive\r\n\
               Proxy-Authenticate: Basic\r\n\
               Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
               TE: deflate\r\n\
               Trailer: X-Checksum\r\n\
               X-Foo: secret-foo\r\n\
               X-Bar: secret-bar\r\n\
               X-Keep: kept\r\n\
               Authorization: Bearer end-to-end\r\n\
               \r\n";
    let r = raw_request(gw.addr, raw.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    let rec = up.only_request();
    for h in REQUEST_HOP_BY_HOP.iter().chain(["x-bar"].iter()) {
        assert!(
            rec.headers.get(*h).is_none(),
            "hop-by-hop header {h} reached upstream: {:?}",
            rec.headers
        );
    }
    assert_eq!(rec.header("x-keep"), Some("kept"));
    assert_eq!(rec.header("authorization"), Some("Bearer end-to-end"));
    // The gateway's request id is not the client's to strip.
    assert!(
        rec.header("x-request-id").is_some_and(is_uuid),
        "{:?}",
        rec.headers
    );

    // Control: sent straight to the upstream, the recorder does see every one of them.
    let r = raw_request(up.addr, raw.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200);
    let direct = up.requests().pop().unwrap();
    for h in REQUEST_HOP_BY_HOP
        .iter()
        .chain(["x-bar"].iter())
        .filter(|h| **h != "upgrade")
    {
        assert!(
            direct.headers.get(*h).is_some(),
            "control: {h} not recorded"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_and_transfer_encoding_not_forwarded_as_is() {
    let (gw, up) = setup().await;
    // A chunked request body: the upstream must get the same bytes, without an Upgrade header.
    let raw = "POST /te HTTP/1.1\r\n\
               Host: api.example.com\r\n\
               Connection: Upgrade\r\n\
               Upgrade: websocket\r\n\
               Transfer-Encoding: chunked\r\n\
               \r\n\
               5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let r = raw_request(gw.addr, raw.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    let rec = up.only_request();
    assert_eq!(rec.body_bytes, 11);
    assert!(rec.headers.get("upgrade").is_none(), "{:?}", rec.headers);
    assert!(rec.headers.get("connection").is_none(), "{:?}", rec.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    let up = Upstream::with(|_| {
        Response::builder()
            .status(200)
            .header("connection", "X-Resp-Secret")
            .header("x-resp-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic realm=x")
            .header("proxy-connection", "keep-alive")
            .header("trailer", "X-Checksum")
            .header("x-normal", "yes")
            .body(full("body"))
            .unwrap()
    })
    .await;
    let (gw, up) = setup_with(up).await;
    // Control: straight from the upstream, the client does see every one of them.
    let direct = get(up.addr, "/resp", "api.example.com").await;
    for h in [
        "x-resp-secret",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
        "connection",
    ] {
        assert!(
            direct.headers.get(h).is_some(),
            "control: upstream did not send {h}"
        );
    }
    let r = get(gw.addr, "/resp", "api.example.com").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "body");
    assert_eq!(r.header("x-normal"), Some("yes"));
    for h in [
        "x-resp-secret",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
    ] {
        assert!(
            r.headers.get(h).is_none(),
            "{h} leaked to client: {:?}",
            r.headers
        );
    }
    if let Some(c) = r.header("connection") {
        assert!(
            !c.to_ascii_lowercase().contains("x-resp-secret"),
            "connection: {c}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_headers_are_set_and_client_values_replaced() {
    let (gw, up) = setup().await;
    let r = send_http1(
        gw.addr,
        req("GET", "/xf", "api.example.com:8443")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let rec = up.only_request();
    assert_eq!(
        rec.header_all("x-forwarded-for"),
        vec!["127.0.0.1".to_string()]
    );
    assert_eq!(
        rec.header_all("x-forwarded-proto"),
        vec!["http".to_string()]
    );
    assert_eq!(
        rec.header_all("x-forwarded-host"),
        vec!["api.example.com:8443".to_string()]
    );
    // Host sent upstream is the upstream's own authority.
    assert_eq!(rec.header_all("host"), vec![up.addr.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_generated_when_absent() {
    let (gw, up) = setup().await;
    let r = get(gw.addr, "/rid", "api.example.com").await;
    assert_eq!(r.status, 200);
    let resp_id = r
        .header("x-request-id")
        .expect("response X-Request-Id")
        .to_string();
    assert!(
        is_uuid(&resp_id),
        "generated id should be a UUID: {resp_id:?}"
    );
    let rec = up.only_request();
    assert_eq!(rec.header_all("x-request-id"), vec![resp_id.clone()]);
    // Each request gets its own id.
    let r2 = get(gw.addr, "/rid", "api.example.com").await;
    assert_ne!(r2.header("x-request-id"), Some(resp_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sane_request_id_is_propagated() {
    let (gw, up) = setup().await;
    let id = "client-Req_42.abc:XYZ~!";
    let r = send_http1(
        gw.addr,
        req("GET", "/rid", "api.example.com")
            .header("x-request-id", id)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some(id));
    assert_eq!(
        up.only_request().header_all("x-request-id"),
        vec![id.to_string()]
    );

    // Exactly 128 visible chars is still sane.
    let id128 = "a".repeat(128);
    let r = send_http1(
        gw.addr,
        req("GET", "/rid", "api.example.com")
            .header("x-request-id", id128.as_str())
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some(id128.as_str()));
    assert_eq!(
        up.requests()[1].header("x-request-id"),
        Some(id128.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insane_request_id_is_replaced() {
    let (gw, up) = setup().await;
    let long = "b".repeat(129);
    let cases = [long.as_str(), "has space", "tab\there", ""];
    for (i, bad) in cases.iter().enumerate() {
        let r = send_http1(
            gw.addr,
            req("GET", "/rid", "api.example.com")
                .header("x-request-id", *bad)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        let got = r.header("x-request-id").unwrap().to_string();
        assert!(
            is_uuid(&got),
            "bad id {bad:?} must be replaced by a UUID, got {got:?}"
        );
        assert_eq!(up.requests()[i].header_all("x-request-id"), vec![got]);
    }
    // Non-ASCII (obs-text) bytes via raw TCP.
    let raw =
        b"GET /rid HTTP/1.1\r\nHost: a\r\nX-Request-Id: caf\xc3\xa9\r\nConnection: close\r\n\r\n";
    let r = raw_request(gw.addr, raw).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    let got = r.header("x-request-id").unwrap();
    assert!(is_uuid(got), "non-ASCII id must be replaced, got {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_string_forwarded_byte_for_byte() {
    let (gw, up) = setup().await;
    let queries = [
        "b=2&a=1&a=%20x&empty=&flag",
        "enc=%2F%2f%5C+plus%2B&u=%e2%82%ac&raw=a/b?c",
        "x=%41%6F&semi=;&dup=1&dup=1",
    ];
    for q in queries {
        let r = get(gw.addr, &format!("/q/path?{q}"), "api.example.com").await;
        assert_eq!(r.status, 200, "query {q}: {}", r.text());
    }
    let got: Vec<String> = up.requests().iter().map(|r| r.path_and_query()).collect();
    let want: Vec<String> = queries.iter().map(|q| format!("/q/path?{q}")).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoding_canonicalised() {
    let (gw, up) = setup().await;
    let cases = [
        ("/%6Frders", "/orders"),
        ("/%6frders/%37", "/orders/7"),
        ("/a%20b", "/a%20b"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/%41%42C", "/ABC"),
        ("/x?keep=%6F", "/x?keep=%6F"),
    ];
    for (sent, _) in cases {
        let r = get(gw.addr, sent, "api.example.com").await;
        assert_eq!(r.status, 200, "{sent}: {}", r.text());
    }
    let got: Vec<String> = up.requests().iter().map(|r| r.path_and_query()).collect();
    let want: Vec<String> = cases.iter().map(|(_, w)| w.to_string()).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_decoded_path_is_used_for_routing() {
    let (gw, up) = setup().await;
    // /%65cho == /echo: must route to the echo upstream, not the catch-all.
    let r = get(gw.addr, "/%65cho/x", "api.example.com").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["path"], "/echo/x", "{j}");
    assert!(up.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_upstream_describes_request() {
    let (gw, up) = setup().await;
    let r = send_http1(
        gw.addr,
        req("POST", "/echo/thing?y=1&z=%20", "api.example.com")
            .header("x-single", "one")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .header("content-type", "text/plain")
            .body(full("hello"))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{:?}",
        r.headers
    );
    assert!(r.header("x-request-id").is_some());
    let j = r.json();
    assert_eq!(j["method"], "POST", "{j}");
    assert_eq!(j["path"], "/echo/thing", "{j}");
    assert_eq!(j["query"], "y=1&z=%20", "{j}");
    assert_eq!(j["body_bytes"], 5, "{j}");
    assert_eq!(j["headers"]["x-single"], "one", "{j}");
    assert_eq!(
        j["headers"]["x-multi"],
        serde_json::json!(["a", "b"]),
        "{j}"
    );
    assert_eq!(j["headers"]["content-type"], "text/plain", "{j}");
    assert!(up.requests().is_empty());

    let r = get(gw.addr, "/echo", "api.example.com").await;
    let j = r.json();
    assert_eq!(j["method"], "GET", "{j}");
    assert_eq!(j["path"], "/echo", "{j}");
    assert_eq!(j["body_bytes"], 0, "{j}");
}
