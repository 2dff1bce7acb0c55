//! One host, however it is spelled: the canonical host is routed, authorised and forwarded.

use crate::tools::*;
use stepgate_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailing_dot_case_or_default_port_does_not_escape_a_host_scoped_route() {
    let edge = Edge::start().await;
    for host in [
        "api.example.com",
        "api.example.com.",
        "API.example.com.",
        "API.EXAMPLE.COM:80",
        "api.example.com.:80",
        "API.example.com.:443",
    ] {
        // Without a key: the host-scoped route's policy answers, not the open route's.
        let r = edge
            .refused_as(&format!("GET /h/secret HTTP/1.1\r\nHost: {host}"), 401)
            .await;
        assert_eq!(r.json()["code"], "api_key_missing", "Host: {host}");
    }
    // With the key: the host-scoped upstream gets the canonical host.
    for (host, forwarded) in [
        ("API.example.com.", "api.example.com"),
        ("api.example.com.:80", "api.example.com"),
        ("API.example.com.:443", "api.example.com:443"),
        ("api.example.com:8443", "api.example.com:8443"),
    ] {
        let (r, _) = edge
            .raw(
                &format!(
                    "GET /h/secret HTTP/1.1\r\nHost: {host}\r\nX-Api-Key: {}",
                    edge.key
                ),
                b"",
            )
            .await;
        assert_eq!(r.status, 200, "Host: {host}: {}", r.head);
        let rec = edge.hosted.requests().pop().unwrap();
        assert_eq!(
            rec.header("x-forwarded-host"),
            Some(forwarded),
            "Host: {host}"
        );
        assert_eq!(
            rec.header("forwarded"),
            Some(format!("for=127.0.0.1;proto=http;host=\"{forwarded}\"").as_str())
        );
        assert_eq!(rec.header("x-consumer-name"), Some("alice"));
    }
    assert_eq!(edge.app.requests().len(), 0, "the open route got a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_hosts_are_refused_before_routing() {
    let edge = Edge::start().await;
    for host in [
        "api.example.com..",
        "api..example.com",
        ".api.example.com",
        "0x7f.0.0.1",
        "127.000.0.1",
        "2130706433",
        "api.example.com:99999",
        "api.example.com:80:80",
        "api.example.com:+80",
        "[::1",
        "a%2eb",
        "user@api.example.com",
        "api,example.com",
    ] {
        let r = edge
            .refused(&format!("GET /o/x HTTP/1.1\r\nHost: {host}"), b"")
            .await;
        assert!(
            r.json()["detail"].as_str().unwrap().contains("host"),
            "Host: {host}: {}",
            r.json()
        );
    }
    // Two Host headers, and non-ASCII bytes, are refused too.
    edge.refused(
        "GET /o/x HTTP/1.1\r\nHost: open.example.com\r\nHost: api.example.com",
        b"",
    )
    .await;
    edge.refused_bytes(
        b"GET /o/x HTTP/1.1\r\nHost: ex\xc3\xa4mple.com\r\n\r\n",
        400,
    )
    .await
    .assert_problem(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_targets_authority_and_the_host_header_must_agree() {
    let edge = Edge::start().await;
    // Absolute form (what a client talking to a proxy sends) naming another host than Host.
    edge.refused(
        "GET http://api.example.com/h/x HTTP/1.1\r\nHost: open.example.com",
        b"",
    )
    .await;
    edge.refused(
        "GET http://user:pw@open.example.com/o/x HTTP/1.1\r\nHost: open.example.com",
        b"",
    )
    .await;
    // Agreeing, in different spellings: routed by the authority.
    let (r, _) = edge
        .raw(
            "GET http://OPEN.example.com.:80/o/x HTTP/1.1\r\nHost: open.example.com",
            b"",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let rec = edge.hosted.only_request();
    assert_eq!(rec.header("x-forwarded-host"), Some("open.example.com"));
    assert_eq!(rec.path_and_query(), "/o/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_is_canonicalised_and_must_agree_with_host() {
    let edge = Edge::start().await;
    let (status, problem) = h2_request(edge.addr(), "GET", "http://API.example.com./h/x", &[])
        .await
        .unwrap();
    assert_eq!(status, 401, "{problem}");
    assert_eq!(problem["code"], "api_key_missing");
    let (status, problem) = h2_request(
        edge.addr(),
        "GET",
        "http://open.example.com/o/x",
        &[("host", "api.example.com")],
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{problem}");
    let (status, _) = h2_request(
        edge.addr(),
        "GET",
        "http://open.example.com./o/x",
        &[("x-api-key", &edge.key)],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let rec = edge.hosted.only_request();
    assert_eq!(rec.header("x-forwarded-host"), Some("open.example.com"));
    assert_eq!(edge.app.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_routes_by_the_same_canonical_host() {
    let edge = Edge::start().await;
    let config = path_str(&edge.gw.config_path());
    for host in ["api.example.com.", "API.example.com.:443"] {
        let (code, out, err) =
            run_cli(&["explain", "GET", "/h/secret", "--host", host, "-c", &config]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("route:     hosted"), "--host {host}: {out}");
    }
    let (code, out, _) = run_cli(&[
        "explain",
        "GET",
        "/h/secret",
        "--host",
        "api..example.com",
        "-c",
        &config,
    ]);
    assert_ne!(code, 0);
    assert!(out.contains("400 bad_request"), "{out}");
}
