//! Message framing: one reading only. Two framings or an unknown coding are refused and the
//! connection closed; a client's broken chunked body is the client's 400, never the
//! upstream's 502, and never counted as an upstream error.

use crate::tools::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused_and_the_connection_closed() {
    let edge = Edge::start().await;
    for head in [
        "POST /app/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
        "POST /app/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 0",
    ] {
        let before = edge.upstream_requests();
        let (r, closed) = edge.raw(head, b"5\r\nhello\r\n0\r\n\r\n").await;
        r.assert_problem(400, "bad_request");
        assert_eq!(r.header("connection"), Some("close"));
        assert!(closed, "the connection stayed open after:\n{head}");
        assert_eq!(edge.upstream_requests(), before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_are_refused() {
    let edge = Edge::start().await;
    for te in [
        "gzip, chunked",
        "chunked, chunked",
        "Chunked\r\nTransfer-Encoding: chunked",
    ] {
        let (r, closed) = edge
            .raw(
                &format!("POST /app/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: {te}"),
                b"5\r\nhello\r\n0\r\n\r\n",
            )
            .await;
        assert_eq!(r.status, 400, "Transfer-Encoding: {te}: {}", r.head);
        assert!(closed, "{te}");
    }
    assert_eq!(edge.upstream_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_is_the_clients_400_not_an_upstream_error() {
    let edge = Edge::start().await;
    let errors = "stepgate_upstream_errors_total";
    for chunk in [
        b"5 x\r\nhello\r\n0\r\n\r\n".as_slice(),
        b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX\r\n0\r\n\r\n",
        b"zz\r\n",
    ] {
        let (r, closed) = edge
            .raw(
                "POST /app/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked",
                chunk,
            )
            .await;
        r.assert_problem(400, "bad_request");
        assert!(closed, "{:?}", String::from_utf8_lossy(chunk));
    }
    let page = edge.metrics().await;
    assert_eq!(
        metric(&page, errors, &[]),
        0.0,
        "counted as upstream errors:\n{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_extensions_and_trailers_are_read_and_the_body_forwarded_whole() {
    let edge = Edge::start().await;
    let (r, _) = edge
        .raw(
            "POST /app/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked",
            b"5;name=value\r\nhello\r\n6;x\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let rec = edge.app.only_request();
    assert_eq!(rec.body_bytes, 11);
    assert!(rec.body_error.is_none());
    assert!(
        rec.header("transfer-encoding")
            .is_none_or(|te| te == "chunked")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obsolete_line_folding_and_conflicting_lengths_are_refused() {
    let edge = Edge::start().await;
    // obs-fold: hyper refuses it while parsing (its own plain 400).
    edge.refused_bytes(
        b"GET /app/x HTTP/1.1\r\nHost: a.test\r\nX-Folded: a\r\n b\r\n\r\n",
        400,
    )
    .await;
    for lengths in [
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: 5, 6",
    ] {
        edge.refused_bytes(
            format!("POST /app/x HTTP/1.1\r\nHost: a.test\r\n{lengths}\r\n\r\nhello!").as_bytes(),
            400,
        )
        .await;
    }
}
