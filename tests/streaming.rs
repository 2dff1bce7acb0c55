//! Large bodies are streamed through the gateway in both directions with bounded memory.
//!
//! The gateway runs in-process, so the process's own VmHWM (peak RSS) bounds the gateway's
//! memory use: if it buffered a 64 MiB body, the peak would grow by at least 64 MiB.
use stepgate_testkit::*;

use http::Response;
use http_body_util::BodyExt;

const SIZE: u64 = 64 * 1024 * 1024; // 64 MiB > 50 MB
const CHUNK: usize = 64 * 1024;
/// Allowed growth of the process peak RSS while streaming SIZE bytes.
const MAX_GROWTH_KIB: u64 = 20 * 1024;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
upstreams:
  big: { url: "${big}", timeout: 60s }
routes:
  - name: big
    match: { path: /big }
    upstream: big
    policy: public
    body_bytes: 100MiB
"#;

fn memory_report(label: &str, hwm_before: u64, rss_before: u64) -> u64 {
    let hwm_after = proc_status_kib("VmHWM");
    let rss_after = proc_status_kib("VmRSS");
    let growth = hwm_after.saturating_sub(hwm_before);
    eprintln!(
        "{label}: VmHWM {hwm_before} -> {hwm_after} KiB (+{growth}), VmRSS {rss_before} -> {rss_after} KiB"
    );
    growth
}

async fn upload(exact_length: bool) {
    let up = Upstream::with(|r| {
        Response::builder()
            .status(200)
            .body(full(format!("{}", r.body_bytes)))
            .unwrap()
    })
    .await;
    let gw = GatewayBuilder::new(&render(CONFIG, &[("big", &up.url())]))
        .start()
        .await;
    // Warm up connections/allocators with a small request first.
    let r = send_http1(
        gw.addr,
        req("POST", "/big", "h").body(full("warm")).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);

    let hwm_before = proc_status_kib("VmHWM");
    let rss_before = proc_status_kib("VmRSS");
    let r = send_http1(
        gw.addr,
        req("POST", "/big/upload", "h")
            .body(GenBody::new(SIZE, CHUNK, exact_length).boxed())
            .unwrap(),
    )
    .await;
    let growth = memory_report("upload", hwm_before, rss_before);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        SIZE.to_string(),
        "upstream must receive every byte"
    );
    let rec = up.requests().pop().unwrap();
    assert_eq!(rec.body_bytes, SIZE);
    assert_eq!(rec.body_error, None);
    if exact_length {
        assert_eq!(
            rec.header("content-length"),
            Some(SIZE.to_string().as_str())
        );
    }
    assert!(
        growth < MAX_GROWTH_KIB,
        "peak RSS grew by {growth} KiB while streaming {} KiB upstream: body is being buffered",
        SIZE / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_request_body_is_streamed_upstream() {
    upload(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_content_length_request_body_is_streamed_upstream() {
    upload(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_body_is_streamed_to_client() {
    let up = Upstream::with(|r| {
        let size = if r.uri.path() == "/big/download" {
            SIZE
        } else {
            4
        };
        Response::builder()
            .status(200)
            .header("content-type", "application/octet-stream")
            .body(GenBody::new(size, CHUNK, false).boxed())
            .unwrap()
    })
    .await;
    let gw = GatewayBuilder::new(&render(CONFIG, &[("big", &up.url())]))
        .start()
        .await;
    let r = get(gw.addr, "/big/warm", "h").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 4);

    let hwm_before = proc_status_kib("VmHWM");
    let rss_before = proc_status_kib("VmRSS");
    let resp = send_http1_stream(
        gw.addr,
        req("GET", "/big/download", "h").body(empty()).unwrap(),
    )
    .await
    .expect("request failed");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/octet-stream"
    );
    // Count bytes as they arrive, never holding more than one frame.
    let mut body = resp.into_body();
    let mut n = 0u64;
    let mut frames = 0u64;
    while let Some(f) = tokio::time::timeout(STEP, body.frame())
        .await
        .expect("stalled")
    {
        let f = f.expect("body error");
        if let Some(d) = f.data_ref() {
            n += d.len() as u64;
            frames += 1;
        }
    }
    let growth = memory_report("download", hwm_before, rss_before);
    assert_eq!(n, SIZE, "client must receive every byte");
    assert!(frames > 1, "body should arrive in many frames");
    assert!(
        growth < MAX_GROWTH_KIB,
        "peak RSS grew by {growth} KiB while streaming {} KiB to the client: body is being buffered",
        SIZE / 1024
    );
}

/// Server-sent events: each event reaches the client as the upstream sends it, while the
/// upstream's response is still open (nothing is buffered to the end, or to a size).
#[tokio::test]
async fn server_sent_events_reach_the_client_as_they_are_sent() {
    use std::sync::{Arc, Mutex};

    let (events, rx) = tokio::sync::mpsc::channel::<&'static str>(1);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let up = Upstream::with(move |_| {
        let rx = rx.lock().unwrap().take().expect("one request");
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let event = rx.recv().await?;
            Some((
                Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from(event))),
                rx,
            ))
        });
        Response::builder()
            .status(200)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(http_body_util::StreamBody::new(stream).boxed())
            .unwrap()
    })
    .await;
    let gw = GatewayBuilder::new(&render(CONFIG, &[("big", &up.url())]))
        .start()
        .await;
    let resp = send_http1_stream(
        gw.addr,
        req("GET", "/big/events", "h")
            .header("accept", "text/event-stream")
            .body(empty())
            .unwrap(),
    )
    .await
    .expect("request failed");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let mut body = resp.into_body();
    for event in ["event: tick\ndata: 1\n\n", ": heartbeat\n\n", "data: 2\n\n"] {
        // The upstream sends the next event only now, and has not finished.
        events.send(event).await.unwrap();
        let frame = tokio::time::timeout(STEP, body.frame())
            .await
            .expect("the event did not arrive while the stream was open")
            .expect("the stream ended early")
            .expect("the stream failed");
        assert_eq!(frame.data_ref().unwrap().as_ref(), event.as_bytes());
    }
    drop(events);
    let end = tokio::time::timeout(STEP, body.frame())
        .await
        .expect("no end");
    assert!(end.is_none(), "the stream ends when the upstream's does");
}
