//! The floor for stepgate's proxy work: a reverse proxy built from the same parts (hyper 1,
//! tokio, one single-threaded runtime per worker thread, upstream connections pooled per
//! thread) that does nothing else: no routing, no auth, no metrics, no logs. `bench/floor.sh`
//! runs it beside nginx and stepgate, so the CPU stepgate spends above it is its own.
//!
//! `cargo run --release --example bare_proxy -- LISTEN UPSTREAM [WORKERS]`

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;

use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

type Body = UnsyncBoxBody<bytes::Bytes, hyper::Error>;

thread_local! {
    static POOL: RefCell<Vec<http1::SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

/// A ready pooled connection, or a new one. Busy ones (a response still in flight) stay in
/// the pool, closed ones go: the same rule as stepgate's `proxy::pool`.
async fn connection(upstream: SocketAddr) -> Option<http1::SendRequest<Incoming>> {
    let ready = POOL.with(|p| {
        let mut pool = p.borrow_mut();
        pool.retain(|s| !s.is_closed());
        let i = pool.iter().rposition(http1::SendRequest::is_ready)?;
        Some(pool.swap_remove(i))
    });
    if ready.is_some() {
        return ready;
    }
    let stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    Some(sender)
}

async fn forward(
    mut request: Request<Incoming>,
    upstream: SocketAddr,
    host: HeaderValue,
) -> Result<Response<Body>, Infallible> {
    let bad_gateway = || {
        let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r
    };
    if let Some(target) = request.uri().path_and_query().cloned() {
        *request.uri_mut() = Uri::from(target);
    }
    request.headers_mut().insert(header::HOST, host);
    let Some(mut sender) = connection(upstream).await else {
        return Ok(bad_gateway());
    };
    let response = sender.send_request(request);
    POOL.with(|p| p.borrow_mut().push(sender));
    Ok(match response.await {
        Ok(response) => response.map(BodyExt::boxed_unsync),
        Err(_) => bad_gateway(),
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN UPSTREAM [WORKERS]";
    let listen: SocketAddr = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let upstream: SocketAddr = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let workers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let host = HeaderValue::from_str(&upstream.to_string()).expect("an address is a header value");
    let listener = std::net::TcpListener::bind(listen).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.try_clone().expect("listener");
            let host = host.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let host = host.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |request| {
                                forward(request, upstream, host.clone())
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}
