//! Over the limits: the status says which limit (414 for the request target, 431 for the
//! head), whatever the size.

use crate::tools::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_request_targets_get_414_at_every_length() {
    let edge = Edge::start().await;
    for len in [9 * 1024, 40 * 1024, 60 * 1024, 64 * 1024, 65 * 1024] {
        let path = format!("/app/{}", "a".repeat(len));
        let r = edge
            .refused_bytes(
                format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes(),
                414,
            )
            .await;
        // Up to hyper's own limit on a target (64 KiB) the answer is the gateway's problem.
        if len < 64 * 1024 {
            r.assert_problem(414, "too_large");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_heads_get_431() {
    let edge = Edge::start().await;
    let big = "x".repeat(40 * 1024);
    edge.refused_bytes(
        format!("GET /app/x HTTP/1.1\r\nHost: a.test\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        431,
    )
    .await;
    let many: String = (0..150).map(|i| format!("X-H{i}: 1\r\n")).collect();
    edge.refused_bytes(
        format!("GET /app/x HTTP/1.1\r\nHost: a.test\r\n{many}\r\n").as_bytes(),
        431,
    )
    .await;
}
