//! WebSocket through the whole auth stack, with a real client and server (tokio-tungstenite):
//! the upgrade is authorised like any request before anything reaches the upstream, then
//! tunnelled; a refused upgrade gets no `101`; a socket opened with a step-up token closes
//! when the token expires or is revoked (`on_token_expiry: close`), or stays (`keep`); an
//! idle tunnel is closed; an upgrade on a route without `websocket: true` is not honoured.
use stepgate_testkit::*;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
data_dir: "${data_dir}"
limits: { idle_timeout: ${idle}, drain_timeout: 2s }
upstreams:
  app: { url: "${app}" }
  ws:  { url: "${ws}" }
routes:
  - { name: ws, match: { path: /ws }, upstream: ws, policy: two-factor, websocket: true }
  - { name: ws-keep, match: { path: /ws-keep }, upstream: ws, policy: two-factor, websocket: true, on_token_expiry: keep }
  - { name: ws-staff, match: { path: /ws-staff }, upstream: ws, policy: staff, websocket: true }
  - { name: ws-strict, match: { path: /ws-strict }, upstream: ws, policy: strict, websocket: true }
  - { name: plain, match: { path: /plain }, upstream: app, policy: two-factor }
  - { name: twofa, match: { path: /2fa }, upstream: app, policy: two-factor }
"#;

/// A WebSocket echo server that records each handshake's headers.
struct WsServer {
    url: String,
    handshakes: Arc<Mutex<Vec<http::HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsServer {
    async fn start() -> WsServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    // The handshake callback's shape is tungstenite's (its error is a response).
                    #[allow(clippy::result_large_err)]
                    let record = |request: &WsRequest, response: WsResponse| {
                        seen.lock().unwrap().push(request.headers().clone());
                        Ok(response)
                    };
                    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, record).await
                    else {
                        return;
                    };
                    while let Some(Ok(message)) = socket.next().await {
                        if message.is_close() {
                            break;
                        }
                        if (message.is_text() || message.is_binary())
                            && socket.send(message).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        WsServer {
            url,
            handshakes,
            task,
        }
    }

    fn handshakes(&self) -> Vec<http::HeaderMap> {
        self.handshakes.lock().unwrap().clone()
    }
}

struct Setup {
    t: TwoFactor,
    ws: WsServer,
}

async fn setup(idle: &str) -> Setup {
    let ws = WsServer::start().await;
    let template = CONFIG.replace("${ws}", &ws.url).replace("${idle}", idle);
    let t = TwoFactor::start_custom(CustomConfig {
        template,
        policies: TWO_FACTOR_POLICIES
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    })
    .await;
    Setup { t, ws }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to the gateway with these headers; the `101`'s headers too.
async fn open(
    t: &TwoFactor,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Socket, http::HeaderMap), WsError> {
    let mut request = format!("ws://{}{path}", t.addr())
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (socket, response) =
        tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await?;
    Ok((socket, response.headers().clone()))
}

/// The status of a refused upgrade (tungstenite gives the response it got instead of 101).
fn refused_status(result: Result<(Socket, http::HeaderMap), WsError>) -> (u16, String) {
    match result {
        Err(WsError::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (response.status().as_u16(), body)
        }
        Err(other) => panic!("expected an HTTP answer, got {other}"),
        Ok(_) => panic!("the upgrade was not refused"),
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    message: Message,
) -> Message {
    socket.send(message).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("echo in time")
        .expect("socket open")
        .expect("a message")
}

/// Waits until the socket ends (the gateway closed it); panics if it stays up for `within`.
async fn ends_within<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    within: Duration,
) {
    let ended = tokio::time::timeout(within, async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the socket was not closed within {within:?}");
}

/// Waits (up to 5 s) for a line of the admin API's `/metrics` to start with `needle`.
async fn wait_for_metric(t: &TwoFactor, needle: &str) {
    for _ in 0..50 {
        let r = t.gw.call("GET", "/metrics", None).await;
        if r.text().lines().any(|l| l.starts_with(needle)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no metric line starts with {needle}");
}

#[tokio::test]
async fn an_authorised_upgrade_is_tunnelled_both_ways_with_its_credentials_removed() {
    let s = setup("30s").await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;

    let (mut socket, head) = open(
        t,
        "/ws/chat?room=1",
        &[("x-api-key", &alice.key), ("x-step-up-token", &token)],
    )
    .await
    .expect("upgrade");
    assert!(head.get("x-request-id").is_some(), "{head:?}");
    assert_eq!(
        echo(&mut socket, Message::text("hello")).await,
        Message::text("hello")
    );
    // A large message, in many frames of the tunnel's TCP stream.
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let back = echo(&mut socket, Message::binary(big.clone())).await;
    assert_eq!(back.into_data().as_ref(), &big[..]);
    socket.close(None).await.unwrap();
    ends_within(&mut socket, Duration::from_secs(5)).await;
    drop(socket);

    let handshakes = s.ws.handshakes();
    assert_eq!(handshakes.len(), 1);
    let h = &handshakes[0];
    for secret in ["x-api-key", "x-step-up-token", "x-otp"] {
        assert!(
            h.get(secret).is_none(),
            "{secret} reached the upstream: {h:?}"
        );
    }
    assert_eq!(h.get("x-consumer-name").unwrap(), "alice");
    assert_eq!(h.get("x-stepgate-auth").unwrap(), "key+step_up");
    assert!(h.get("sec-websocket-key").is_some());
    wait_for_metric(
        t,
        r#"stepgate_websocket_tunnels_closed_total{route="ws",reason="closed"} 1"#,
    )
    .await;
    wait_for_metric(t, "stepgate_websocket_tunnels_open 0").await;
}

#[tokio::test]
async fn refused_upgrades_get_no_101_and_reach_nothing() {
    let s = setup("30s").await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let carol = t.consumer("carol", &["contractor"]).await;
    t.enrol("carol").await;

    let (status, body) = refused_status(open(t, "/ws", &[]).await);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("api_key_missing"), "{body}");
    let (status, body) = refused_status(open(t, "/ws", &[("x-api-key", &alice.key)]).await);
    assert_eq!(status, 401);
    assert!(body.contains("otp_required"), "{body}");
    let wrong = wrong_totp(&e.secret, "SHA1", 6, 30);
    let (status, body) =
        refused_status(open(t, "/ws", &[("x-api-key", &alice.key), ("x-otp", &wrong)]).await);
    assert_eq!(status, 401);
    assert!(body.contains("otp_invalid"), "{body}");
    let (status, body) = refused_status(
        open(
            t,
            "/ws",
            &[("x-api-key", &alice.key), ("x-step-up-token", "sgt_nope")],
        )
        .await,
    );
    assert_eq!(status, 401);
    assert!(body.contains("step_up_invalid"), "{body}");
    // Roles are checked at the upgrade too.
    let (status, body) = refused_status(
        open(
            t,
            "/ws-staff",
            &[("x-api-key", &carol.key), ("x-otp", "123456")],
        )
        .await,
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        s.ws.handshakes().is_empty(),
        "a refused upgrade reached the upstream"
    );

    // Failed codes at the upgrade count like any: the strict policy tolerates two, the third
    // starts a ban.
    let bob = t.consumer("bob", &[]).await;
    let b = t.enrol("bob").await;
    let wrong = wrong_totp(&b.secret, "SHA1", 6, 30);
    for expected in [401, 401, 429] {
        let (status, _) = refused_status(
            open(
                t,
                "/ws-strict",
                &[("x-api-key", &bob.key), ("x-otp", &wrong)],
            )
            .await,
        );
        assert_eq!(status, expected);
    }
    let good = totp_at(&b.secret, t.now());
    let (status, body) = refused_status(
        open(
            t,
            "/ws-strict",
            &[("x-api-key", &bob.key), ("x-otp", &good)],
        )
        .await,
    );
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many_attempts"), "{body}");
    assert!(s.ws.handshakes().is_empty());
}

#[tokio::test]
async fn an_upgrade_opened_with_a_code_gets_its_token_in_the_101() {
    let s = setup("30s").await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let code = totp_at(&e.secret, t.now());
    let (mut socket, head) = open(t, "/ws", &[("x-api-key", &alice.key), ("x-otp", &code)])
        .await
        .expect("upgrade");
    let token = head.get("x-step-up-token").expect("a token for the code");
    assert!(token.to_str().unwrap().starts_with("sgt_"));
    assert_eq!(
        echo(&mut socket, Message::text("hi")).await,
        Message::text("hi")
    );
    assert_eq!(
        s.ws.handshakes()[0].get("x-stepgate-auth").unwrap(),
        "key+totp"
    );
    // The socket lives by that token: past its expiry (15 minutes), it is closed.
    t.advance(15 * 60 + 1);
    ends_within(&mut socket, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_socket_closes_when_its_token_expires_or_is_revoked_unless_kept() {
    let s = setup("30s").await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;
    let headers = [
        ("x-api-key", alice.key.as_str()),
        ("x-step-up-token", &token),
    ];

    let (mut closing, _) = open(t, "/ws", &headers).await.expect("upgrade");
    let (mut kept, _) = open(t, "/ws-keep", &headers).await.expect("upgrade");
    assert_eq!(
        echo(&mut closing, Message::text("a")).await,
        Message::text("a")
    );
    assert_eq!(
        echo(&mut kept, Message::text("b")).await,
        Message::text("b")
    );

    // The token was issued for 15 minutes; the gateway's clock goes past that.
    t.advance(15 * 60);
    ends_within(&mut closing, Duration::from_secs(5)).await;
    assert_eq!(
        echo(&mut kept, Message::text("c")).await,
        Message::text("c")
    );
    wait_for_metric(
        t,
        r#"stepgate_websocket_tunnels_closed_total{route="ws",reason="token_expired"} 1"#,
    )
    .await;

    // Revoked (here by the operator) before it expires: closed too.
    let token = t.earn_token(&alice.key, &e).await;
    let headers = [
        ("x-api-key", alice.key.as_str()),
        ("x-step-up-token", &token),
    ];
    let (mut socket, _) = open(t, "/ws", &headers).await.expect("upgrade");
    assert_eq!(
        echo(&mut socket, Message::text("d")).await,
        Message::text("d")
    );
    t.gw.ok("DELETE", "/consumers/alice/step-up-tokens", None, 204)
        .await;
    ends_within(&mut socket, Duration::from_secs(5)).await;
    wait_for_metric(
        t,
        r#"stepgate_websocket_tunnels_closed_total{route="ws",reason="token_revoked"} 1"#,
    )
    .await;
}

#[tokio::test]
async fn an_idle_tunnel_is_closed() {
    let s = setup("1s").await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;
    let (mut socket, _) = open(
        t,
        "/ws",
        &[("x-api-key", &alice.key), ("x-step-up-token", &token)],
    )
    .await
    .expect("upgrade");
    // Traffic keeps it open past the idle timeout...
    for i in 0..6 {
        let text = format!("ping {i}");
        assert_eq!(
            echo(&mut socket, Message::text(text.clone())).await,
            Message::text(text)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // ...silence closes it.
    ends_within(&mut socket, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_upgrade_on_another_route_is_not_honoured() {
    let s = setup("30s").await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;
    let (status, _) = refused_status(
        open(
            t,
            "/plain",
            &[("x-api-key", &alice.key), ("x-step-up-token", &token)],
        )
        .await,
    );
    // Forwarded as a plain GET: the upstream answers it, no 101.
    assert_eq!(status, 200);
    let forwarded = t.up.requests().pop().unwrap();
    assert_eq!(forwarded.uri.path(), "/plain");
    assert!(
        forwarded.header("upgrade").is_none(),
        "{:?}",
        forwarded.headers
    );
    assert!(forwarded.header("sec-websocket-key").is_some());
}

#[tokio::test]
async fn an_upgrade_that_is_not_a_get_is_refused() {
    let s = setup("30s").await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;
    let request = format!(
        "POST /ws HTTP/1.1\r\nHost: api.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-Api-Key: {}\r\nX-Step-Up-Token: {token}\r\nContent-Length: 0\r\n\r\n",
        alice.key
    );
    let r = raw_request(t.addr(), request.as_bytes()).await.unwrap();
    r.assert_problem(400, "bad_request");
    assert!(s.ws.handshakes().is_empty());
}

#[tokio::test]
async fn connect_is_refused_before_anything_reads_it() {
    let s = setup("30s").await;
    let r = raw_request(
        s.t.addr(),
        b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n",
    )
    .await
    .unwrap();
    r.assert_problem(400, "bad_request");
    assert!(r.json()["detail"].as_str().unwrap().contains("CONNECT"));
    assert!(s.t.up.requests().is_empty() && s.ws.handshakes().is_empty());
}

#[tokio::test]
async fn an_open_tunnel_is_cut_at_the_drain_deadline() {
    let mut s = setup("30s").await;
    let alice = s.t.consumer("alice", &[]).await;
    let e = s.t.enrol("alice").await;
    let token = s.t.earn_token(&alice.key, &e).await;
    let (mut socket, _) = open(
        &s.t,
        "/ws",
        &[("x-api-key", &alice.key), ("x-step-up-token", &token)],
    )
    .await
    .expect("upgrade");
    assert_eq!(
        echo(&mut socket, Message::text("x")).await,
        Message::text("x")
    );
    // The drain waits for the tunnel up to its deadline (2 s here), then cuts it.
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), s.t.gw.shutdown())
        .await
        .expect("the shutdown finished");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    ends_within(&mut socket, Duration::from_secs(5)).await;
}

type H2Sender = hyper::client::conn::http2::SendRequest<BoxBody>;

/// An HTTP/2 connection to the gateway (h2c), once the gateway's SETTINGS (which allow the
/// extended CONNECT) have arrived.
async fn h2_connection(t: &TwoFactor) -> H2Sender {
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let warm = http::Request::get("http://api.example.com/nowhere")
        .body(empty())
        .unwrap();
    sender.send_request(warm).await.unwrap();
    sender
}

type H2Socket = WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// RFC 8441: a WebSocket on one stream of the connection (extended CONNECT); the refusal's
/// status and body when it is not answered 200.
async fn open_h2(
    sender: &mut H2Sender,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<H2Socket, (u16, String)> {
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://api.example.com{path}"))
        .header("sec-websocket-version", "13");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut request = request.body(empty()).unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = sender.send_request(request).await.unwrap();
    if response.status() != 200 {
        let status = response.status().as_u16();
        return Err((status, read_resp(response).await.text()));
    }
    let stream = hyper::upgrade::on(&mut response).await.unwrap();
    Ok(WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(stream),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await)
}

#[tokio::test]
async fn a_websocket_over_http2_is_one_stream_authorised_and_tunnelled_alike() {
    let s = setup("30s").await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;
    let mut h2 = h2_connection(t).await;

    let Err((status, body)) = open_h2(&mut h2, "/ws", &[]).await else {
        panic!("an upgrade without a key was not refused");
    };
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("api_key_missing"), "{body}");
    assert!(s.ws.handshakes().is_empty());

    let mut socket = open_h2(
        &mut h2,
        "/ws",
        &[("x-api-key", &alice.key), ("x-step-up-token", &token)],
    )
    .await
    .expect("the extended CONNECT is answered 200");
    assert_eq!(
        echo(&mut socket, Message::text("over h2")).await,
        Message::text("over h2")
    );
    let big: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let back = echo(&mut socket, Message::binary(big.clone())).await;
    assert_eq!(back.into_data().as_ref(), &big[..]);
    // The upstream got an HTTP/1.1 upgrade with a key of the gateway's, and no credentials.
    let h = &s.ws.handshakes()[0];
    assert!(h.get("sec-websocket-key").is_some(), "{h:?}");
    assert_eq!(h.get("x-consumer-name").unwrap(), "alice");
    for secret in ["x-api-key", "x-step-up-token"] {
        assert!(h.get(secret).is_none(), "{secret} reached the upstream");
    }
    // The connection goes on serving other streams meanwhile.
    let other = http::Request::get("http://api.example.com/plain/x")
        .header("x-api-key", &alice.key)
        .header("x-step-up-token", &token)
        .body(empty())
        .unwrap();
    assert_eq!(h2.send_request(other).await.unwrap().status(), 200);
    assert_eq!(
        echo(&mut socket, Message::text("still")).await,
        Message::text("still")
    );

    // And the stream lives by its token like any tunnel.
    t.advance(15 * 60);
    ends_within(&mut socket, Duration::from_secs(5)).await;
    wait_for_metric(
        t,
        r#"stepgate_websocket_tunnels_closed_total{route="ws",reason="token_expired"} 1"#,
    )
    .await;
}
