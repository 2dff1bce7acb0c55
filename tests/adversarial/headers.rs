//! Header names: look-alikes of what the gateway reads or vouches for are refused in every
//! spelling; other names with `_` follow `limits.headers_with_underscores`; the client's own
//! identity and connection facts never reach an upstream.

use crate::tools::*;
use stepgate_testkit::*;

/// CGI, WSGI, PHP and Rack upstreams read these as `HTTP_X_CONSUMER_NAME` and so on: the same
/// variables as the gateway's own headers.
const LOOK_ALIKES: &[(&str, &str)] = &[
    ("X_Consumer_Name", "admin"),
    ("X_Consumer_Roles", "admin"),
    ("X_Consumer_Id", "c_admin"),
    ("X_Stepgate_Auth", "key+totp"),
    ("x-consumer_name", "admin"),
    ("X_Api_Key", "sgk_stolen"),
    ("X_OTP", "123456"),
    ("X_Step_Up_Token", "sgt_x"),
    ("X_Forwarded_For", "10.0.0.1"),
    ("X_Real_IP", "10.0.0.1"),
    ("X_Request_Id", "mine"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alikes_of_identity_and_credential_headers_are_refused() {
    for mode in ["drop", "reject", "allow"] {
        let edge = Edge::start_with(&format!("  headers_with_underscores: {mode}"), None).await;
        for (name, value) in LOOK_ALIKES {
            for path in ["/app/x", "/keyed/x"] {
                let r = edge
                    .refused(
                        &format!(
                            "GET {path} HTTP/1.1\r\nHost: a.test\r\nX-Api-Key: {}\r\n{name}: {value}",
                            edge.key
                        ),
                        b"",
                    )
                    .await;
                let detail = r.json()["detail"].as_str().unwrap().to_owned();
                assert!(
                    detail.contains(&name.to_ascii_lowercase()),
                    "{mode}, {name}: {detail}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alikes_are_refused_over_http2_too() {
    let edge = Edge::start().await;
    for (name, value) in LOOK_ALIKES {
        let (status, problem) = h2_request(
            edge.addr(),
            "GET",
            "http://a.test/keyed/x",
            &[
                ("x-api-key", &edge.key),
                (&name.to_ascii_lowercase(), value),
            ],
        )
        .await
        .unwrap();
        assert_eq!(status, 400, "{name}: {problem}");
        assert_eq!(problem["code"], "bad_request");
    }
    assert_eq!(edge.upstream_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_underscore_headers_are_dropped_by_default_refused_or_allowed() {
    let head = "GET /app/x HTTP/1.1\r\nHost: a.test\r\nX_Trace: 1\r\nX-Kept: 1";
    let edge = Edge::start().await;
    let (r, _) = edge.raw(head, b"").await;
    assert_eq!(r.status, 200);
    let rec = edge.app.only_request();
    assert!(rec.header("x_trace").is_none(), "{:?}", rec.headers);
    assert_eq!(rec.header("x-kept"), Some("1"));

    let edge = Edge::start_with("  headers_with_underscores: reject", None).await;
    let r = edge.refused(head, b"").await;
    assert!(r.json()["detail"].as_str().unwrap().contains("x_trace"));

    let edge = Edge::start_with("  headers_with_underscores: allow", None).await;
    let (r, _) = edge.raw(head, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(edge.app.only_request().header("x_trace"), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_identity_and_connection_facts_are_replaced() {
    let edge = Edge::start().await;
    let head = format!(
        "GET /keyed/x HTTP/1.1\r\nHost: a.test\r\nX-Api-Key: {}\r\n\
         X-Consumer-Name: admin\r\nX-Consumer-Roles: admin\r\nX-Consumer-Extra: 1\r\n\
         X-Stepgate-Auth: key+totp\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: evil\r\n\
         X-Forwarded-Proto: https\r\nX-Real-IP: 10.0.0.1\r\nForwarded: for=10.0.0.1;host=evil",
        edge.key
    );
    let (r, _) = edge.raw(&head, b"").await;
    assert_eq!(r.status, 200, "{}", r.head);
    let rec = edge.app.only_request();
    assert_eq!(rec.header_all("x-consumer-name"), ["alice"]);
    assert_eq!(rec.header_all("x-consumer-roles"), ["partner"]);
    assert!(rec.header("x-consumer-extra").is_none());
    assert_eq!(rec.header_all("x-stepgate-auth"), ["key"]);
    assert_eq!(rec.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(rec.header_all("x-forwarded-host"), ["a.test"]);
    assert_eq!(rec.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(rec.header_all("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(
        rec.header_all("forwarded"),
        ["for=127.0.0.1;proto=http;host=\"a.test\""]
    );
    assert_no_credentials(&rec);
}
