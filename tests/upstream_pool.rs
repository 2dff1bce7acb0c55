//! Upstream connections (src/proxy/pool.rs): kept and reused per worker thread, HTTP/2 by
//! ALPN to https upstreams (one multiplexed connection per worker), HTTP/1.1 otherwise, and
//! a connection the upstream closes is never reused.
use stepgate_testkit::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// An upstream that counts the connections it accepted and tells each response's HTTP
/// version; over TLS when given a certificate (offering `alpn`), and answering with
/// `Connection: close` when `close` is set.
struct Counting {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Counting {
    async fn start(tls: Option<(&TestCert, &[&[u8]])>, close: bool) -> Counting {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let acceptor = tls.map(|(cert, alpn)| {
            install_crypto();
            let certs = vec![cert.der.clone()];
            let key: rustls_pki_types::PrivateKeyDer<'static> =
                rustls_pki_types::pem::PemObject::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
            let mut config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<Incoming>| async move {
                            let mut response = Response::builder()
                                .header("x-version", format!("{:?}", req.version()));
                            if close && req.version() == Version::HTTP_11 {
                                response = response.header("connection", "close");
                            }
                            Ok::<_, Infallible>(response.body(full("ok")).unwrap())
                        });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Counting {
            addr,
            connections,
            task,
        }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

const PUBLIC: &str = "api_key: off\nsecond_factor: off\n";

fn config(url: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nlimits: {{ workers: 2 }}\nupstreams:\n  app: {{ url: \"{url}\"{extra} }}\nroutes:\n  - {{ name: app, match: {{ path: / }}, upstream: app, policy: public }}\n"
    )
}

/// A gateway with `workers` workers in front of `up` over https (as `localhost`), trusting
/// the CA certificate `ca_pem`.
async fn https_gateway(up: &Counting, ca_pem: &str, workers: usize) -> Gw {
    let config = config(
        &format!("https://localhost:{}", up.addr.port()),
        ", ca_file: ca.pem",
    )
    .replace("workers: 2", &format!("workers: {workers}"));
    let dir = write_config_with(
        &config,
        &[("ca.pem", ca_pem), ("policies/public.yaml", PUBLIC)],
    );
    GatewayBuilder::in_dir(dir).start().await
}

/// One client connection, `n` requests one after another: every answer 200, and the version
/// the upstream saw.
async fn sequential(gw: &Gw, n: usize) -> Vec<String> {
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut versions = Vec::new();
    for i in 0..n {
        let req = req("GET", &format!("/r{i}"), "gw.test")
            .body(empty())
            .unwrap();
        send.ready().await.unwrap();
        let resp = read_resp(send.send_request(req).await.unwrap()).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        versions.push(resp.header("x-version").unwrap_or_default().to_owned());
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_upstream_connection() {
    let up = Counting::start(None, false).await;
    let gw = GatewayBuilder::new(&config(&format!("http://{}", up.addr), ""))
        .start()
        .await;
    let versions = sequential(&gw, 20).await;
    assert!(versions.iter().all(|v| v == "HTTP/1.1"), "{versions:?}");
    // One client connection lives on one worker, whose pool keeps the connection it made.
    assert_eq!(up.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_open_what_they_need_then_reuse_it() {
    let up = Counting::start(None, false).await;
    let gw = GatewayBuilder::new(&config(&format!("http://{}", up.addr), ""))
        .start()
        .await;
    let round = || async {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let addr = gw.addr;
                tokio::spawn(async move {
                    for i in 0..5 {
                        let r = send_http1(
                            addr,
                            req("GET", &format!("/c{i}"), "gw.test")
                                .body(empty())
                                .unwrap(),
                        )
                        .await;
                        assert_eq!(r.status, 200, "{}", r.text());
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
    };
    // Each worker keeps its own connections, so at most 8 (the most in flight) on each of
    // the two, however the 80 client connections of two rounds land on them.
    round().await;
    round().await;
    let opened = up.connections();
    assert!(
        (1..=16).contains(&opened),
        "80 requests, at most 8 at a time, took {opened} upstream connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closes_is_not_reused() {
    let up = Counting::start(None, true).await;
    let gw = GatewayBuilder::new(&config(&format!("http://{}", up.addr), ""))
        .start()
        .await;
    sequential(&gw, 10).await;
    assert_eq!(
        up.connections(),
        10,
        "each `Connection: close` answer ends its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_speak_http2_when_offered_and_multiplex_it() {
    let cert = self_signed_localhost();
    let up = Counting::start(Some((&cert, &[b"h2", b"http/1.1"])), false).await;
    // One worker: pools are per worker, and which worker accepts a client connection is the
    // kernel's choice, so with two a later burst could be the first one a worker sees.
    let gw = https_gateway(&up, &cert.cert_pem, 1).await;
    let versions = sequential(&gw, 5).await;
    assert!(versions.iter().all(|v| v == "HTTP/2.0"), "{versions:?}");
    let burst = || async {
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let addr = gw.addr;
                tokio::spawn(async move {
                    let r = send_http1(
                        addr,
                        req("GET", &format!("/m{i}"), "gw.test")
                            .body(empty())
                            .unwrap(),
                    )
                    .await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert_eq!(r.header("x-version"), Some("HTTP/2.0"));
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
    };
    // A cold burst may open several connections on a worker that had none (whether the
    // upstream speaks HTTP/2 is only known once one is up); after it, HTTP/2 connections are
    // shared by concurrent requests and are never busy, so later bursts open none.
    burst().await;
    let warm = up.connections();
    for _ in 0..3 {
        burst().await;
    }
    assert_eq!(
        up.connections(),
        warm,
        "later bursts reused the HTTP/2 connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_offering_only_http1_get_http1() {
    let cert = self_signed_localhost();
    let up = Counting::start(Some((&cert, &[b"http/1.1"])), false).await;
    let gw = https_gateway(&up, &cert.cert_pem, 2).await;
    let versions = sequential(&gw, 5).await;
    assert!(versions.iter().all(|v| v == "HTTP/1.1"), "{versions:?}");
    assert_eq!(up.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_an_untrusted_certificate_is_502() {
    let cert = self_signed_localhost();
    let other = self_signed_localhost();
    let up = Counting::start(Some((&cert, &[b"h2", b"http/1.1"])), false).await;
    let gw = https_gateway(&up, &other.cert_pem, 2).await;
    let r = get(gw.addr, "/x", "gw.test").await;
    r.assert_problem(502, "upstream_unavailable");
}
