//! Upstreams that misbehave at every phase: the client gets a clear answer, or its
//! connection closed, within the configured times; never a connection held forever.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::tools::*;
use stepgate_testkit::*;

async fn edge_before(script: Vec<Act>) -> (Edge, RawUpstream) {
    let up = RawUpstream::start(script).await;
    let edge = Edge::start_with("", Some(up.addr)).await;
    (edge, up)
}

const GET_RAW: &[u8] = b"GET /raw/x HTTP/1.1\r\nHost: a.test\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_stalled_mid_way_closes_the_http1_client_connection_at_the_idle_timeout() {
    let (edge, up) = edge_before(vec![
        send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
        Act::Hang,
    ])
    .await;
    let mut s = TcpStream::connect(edge.addr()).await.unwrap();
    s.write_all(GET_RAW).await.unwrap();
    // idle_timeout is 1 s: closed after between 1 and 1.5 s of silence, however the response
    // stands. Before, the connection stayed open for as long as anyone cared to wait.
    let closed = time_to_close(&mut s, Duration::from_secs(5)).await;
    let closed = closed.expect("the client connection was still open after 5 s");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );
    assert_eq!(up.heads().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_or_stalls_in_its_head_is_a_504() {
    for script in [
        vec![Act::Hang],
        vec![send("HTTP/1.1 200 OK\r\nContent-Le"), Act::Hang],
    ] {
        let (edge, _up) = edge_before(script).await;
        let r = raw_request(edge.addr(), GET_RAW).await.unwrap();
        r.assert_problem(504, "upstream_timeout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_head_is_a_502_and_during_the_body_cuts_the_response() {
    let (edge, _up) = edge_before(vec![Act::Reset]).await;
    let r = raw_request(edge.addr(), GET_RAW).await.unwrap();
    r.assert_problem(502, "upstream_unavailable");

    let (edge, _up) = edge_before(vec![
        send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
        Act::Pause(Duration::from_millis(100)),
        Act::Reset,
    ])
    .await;
    // The head went out; the body cannot be completed: the response is cut, never ended as
    // if whole.
    let error = raw_request(edge.addr(), GET_RAW).await.unwrap_err();
    assert!(error.contains("EOF inside body"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_for_101_is_a_502_and_informational_answers_are_passed_over() {
    let (edge, up) = edge_before(vec![send(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )])
    .await;
    let (r, _) = edge.raw("GET /raw/x HTTP/1.1\r\nHost: a.test", b"").await;
    r.assert_problem(502, "upstream_unavailable");
    assert!(!up.heads()[0].to_ascii_lowercase().contains("upgrade"));
    assert_eq!(
        metric(
            &edge.metrics().await,
            "stepgate_upstream_errors_total",
            &["upstream=\"raw\"", "kind=\"protocol\""]
        ),
        1.0
    );

    let (edge, _up) = edge_before(vec![send(
        "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
         HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )])
    .await;
    let r = raw_request(edge.addr(), GET_RAW).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.body, b"ok");
}
