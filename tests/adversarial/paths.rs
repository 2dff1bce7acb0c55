//! Dot segments in every disguise, path parameters (`..;`) included: Tomcat and Spring drop
//! the parameters and read `..`.

use crate::tools::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_with_path_parameters_are_refused() {
    let edge = Edge::start().await;
    for path in [
        "/app/..;/admin",
        "/app/..;jsessionid=1/admin",
        "/app/.;/x",
        "/app/%2e%2e;/admin",
        "/app/%2E;x/y",
        "/app/..;",
    ] {
        let r = edge
            .refused(&format!("GET {path} HTTP/1.1\r\nHost: a.test"), b"")
            .await;
        assert!(
            r.json()["detail"].as_str().unwrap().contains("segment"),
            "{path}: {}",
            r.json()
        );
    }
    // Parameters on ordinary segments are data, forwarded as sent.
    let (r, _) = edge
        .raw("GET /app/a;b/...;c HTTP/1.1\r\nHost: a.test", b"")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(edge.app.only_request().path_and_query(), "/app/a;b/...;c");
}
