//! gRPC through the whole auth stack, with a real client and server (tonic; messages are
//! prost's `StringValue`, so no code generation): h2c to the upstream (`h2c://` and
//! `http2: prior_knowledge`), `te: trailers` kept, `grpc-status` trailers end to end, streaming
//! both ways, the caller's deadline; refusals in gRPC's terms (status 16 / 7 / 8 with the
//! problem code in the message) before anything reaches the upstream.
use stepgate_testkit::*;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::codegen::BoxStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
data_dir: "${data_dir}"
upstreams:
  app:  { url: "${app}" }
  grpc: { url: "h2c://${grpc}" }
  grpc-pk: { url: "http://${grpc}", http2: prior_knowledge }
routes:
  - { name: grpc, match: { path: /test.Echo }, upstream: grpc, policy: two-factor }
  - { name: grpc-pk, match: { host: pk.example.com, path: /test.Echo }, upstream: grpc-pk, policy: key-only }
  - { name: grpc-staff, match: { host: staff.example.com, path: /test.Echo }, upstream: grpc, policy: staff }
  - { name: grpc-strict, match: { host: strict.example.com, path: /test.Echo }, upstream: grpc, policy: strict }
  - { name: twofa, match: { path: /2fa }, upstream: app, policy: two-factor }
"#;

/// `test.Echo`: `Say` answers `hello, <name>` (or the status a name asks for), `Chat` answers
/// each message as it comes, `Slow` takes 5 seconds. Records each call's headers.
#[derive(Clone, Default)]
struct Echo {
    seen: Arc<Mutex<Vec<http::HeaderMap>>>,
}

impl tower::Service<http::Request<Incoming>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        self.seen.lock().unwrap().push(request.headers().clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<String, String>::default());
            let response = match request.uri().path() {
                "/test.Echo/Say" => grpc.unary(tower::service_fn(say), request).await,
                "/test.Echo/Slow" => grpc.unary(tower::service_fn(slow), request).await,
                "/test.Echo/Chat" => grpc.streaming(tower::service_fn(chat), request).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(response)
        })
    }
}

async fn say(request: Request<String>) -> Result<Response<String>, Status> {
    match request.into_inner().as_str() {
        "missing" => Err(Status::not_found("no such greeting")),
        name => Ok(Response::new(format!("hello, {name}"))),
    }
}

async fn slow(_: Request<String>) -> Result<Response<String>, Status> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(Response::new("late".into()))
}

async fn chat(request: Request<Streaming<String>>) -> Result<Response<BoxStream<String>>, Status> {
    let answers = request
        .into_inner()
        .map(|message| message.map(|text| format!("re: {text}")));
    Ok(Response::new(Box::pin(answers)))
}

async fn start_echo() -> (String, Echo) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let echo = Echo::default();
    let service = echo.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, echo)
}

struct Setup {
    t: TwoFactor,
    echo: Echo,
}

async fn setup() -> Setup {
    let (addr, echo) = start_echo().await;
    let t = TwoFactor::start_custom(CustomConfig {
        template: CONFIG.replace("${grpc}", &addr),
        policies: TWO_FACTOR_POLICIES
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    })
    .await;
    Setup { t, echo }
}

/// A gRPC client of the gateway over h2c, sending `:authority` `host`.
async fn client(t: &TwoFactor, host: &str) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{}", t.addr()))
        .unwrap()
        .origin(format!("http://{host}").parse().unwrap())
        .connect()
        .await
        .expect("h2c connection to the gateway");
    tonic::client::Grpc::new(channel)
}

fn with_headers<T>(message: T, headers: &[(&'static str, &str)]) -> Request<T> {
    let mut request = Request::new(message);
    for (name, value) in headers {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    request
}

async fn say_call(
    grpc: &mut tonic::client::Grpc<Channel>,
    name: &str,
    headers: &[(&'static str, &str)],
) -> Result<String, Status> {
    grpc.ready().await.unwrap();
    grpc.unary(
        with_headers(name.to_owned(), headers),
        PathAndQuery::from_static("/test.Echo/Say"),
        ProstCodec::<String, String>::default(),
    )
    .await
    .map(Response::into_inner)
}

#[tokio::test]
async fn a_unary_call_passes_the_stack_with_trailers_end_to_end() {
    let s = setup().await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let code = totp_at(&e.secret, t.now());
    let mut grpc = client(t, "api.example.com").await;

    let answer = say_call(
        &mut grpc,
        "alice",
        &[("x-api-key", &alice.key), ("x-otp", &code)],
    )
    .await;
    assert_eq!(answer.unwrap(), "hello, alice");
    t.advance(30);
    let seen = s.echo.seen.lock().unwrap().clone();
    let h = &seen[0];
    assert_eq!(h.get("te").unwrap(), "trailers", "{h:?}");
    assert_eq!(h.get("x-consumer-name").unwrap(), "alice");
    assert_eq!(h.get("content-type").unwrap(), "application/grpc");
    for secret in ["x-api-key", "x-otp", "x-step-up-token"] {
        assert!(h.get(secret).is_none(), "{secret} reached the upstream");
    }

    // The upstream's own error status comes back from its trailers.
    let token = t.earn_token(&alice.key, &e).await;
    let status = say_call(
        &mut grpc,
        "missing",
        &[("x-api-key", &alice.key), ("x-step-up-token", &token)],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such greeting");
}

#[tokio::test]
async fn both_h2c_spellings_reach_the_upstream() {
    let s = setup().await;
    let t = &s.t;
    let bob = t.consumer("bob", &[]).await;
    let mut grpc = client(t, "pk.example.com").await;
    let answer = say_call(&mut grpc, "bob", &[("x-api-key", &bob.key)]).await;
    assert_eq!(answer.unwrap(), "hello, bob");
    assert_eq!(s.echo.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn refusals_are_answered_in_grpcs_terms_and_reach_nothing() {
    let s = setup().await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let carol = t.consumer("carol", &["contractor"]).await;
    t.enrol("carol").await;
    let mut grpc = client(t, "api.example.com").await;

    let status = say_call(&mut grpc, "x", &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().starts_with("api_key_missing: "),
        "{status:?}"
    );
    let status = say_call(&mut grpc, "x", &[("x-api-key", &alice.key)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().starts_with("otp_required: "), "{status:?}");
    // The challenge stays beside the status, for a client that wants to know what would do.
    assert!(
        status
            .metadata()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().contains("otp_required")),
        "{:?}",
        status.metadata()
    );
    let wrong = wrong_totp(&e.secret, "SHA1", 6, 30);
    let status = say_call(
        &mut grpc,
        "x",
        &[("x-api-key", &alice.key), ("x-otp", &wrong)],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().starts_with("otp_invalid: "), "{status:?}");

    let mut staff = client(t, "staff.example.com").await;
    let status = say_call(&mut staff, "x", &[("x-api-key", &carol.key)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().starts_with("forbidden: "), "{status:?}");

    // Two wrong codes on the strict policy are tolerated; the third starts a ban:
    // RESOURCE_EXHAUSTED with Retry-After, for the good code too.
    let bob = t.consumer("bob", &[]).await;
    let b = t.enrol("bob").await;
    let wrong = wrong_totp(&b.secret, "SHA1", 6, 30);
    let mut strict = client(t, "strict.example.com").await;
    for expected in [
        Code::Unauthenticated,
        Code::Unauthenticated,
        Code::ResourceExhausted,
    ] {
        let status = say_call(
            &mut strict,
            "x",
            &[("x-api-key", &bob.key), ("x-otp", &wrong)],
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), expected, "{status:?}");
    }
    let good = totp_at(&b.secret, t.now());
    let status = say_call(
        &mut strict,
        "x",
        &[("x-api-key", &bob.key), ("x-otp", &good)],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("too_many_attempts: "),
        "{status:?}"
    );
    assert!(status.metadata().get("retry-after").is_some());

    assert!(
        s.echo.seen.lock().unwrap().is_empty(),
        "a refused call reached the upstream"
    );

    // The access metrics count the refusals by their own status, not the 200 they went as.
    let metrics = t.gw.call("GET", "/metrics", None).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"stepgate_requests_total{route="grpc",status="401"}"#)),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_bidirectional_stream_flows_both_ways_as_it_goes() {
    let s = setup().await;
    let t = &s.t;
    let alice = t.consumer("alice", &[]).await;
    let e = t.enrol("alice").await;
    let token = t.earn_token(&alice.key, &e).await;
    let mut grpc = client(t, "api.example.com").await;

    let (tx, rx) = tokio::sync::mpsc::channel::<String>(1);
    let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|message| (message, rx))
    });
    grpc.ready().await.unwrap();
    let request = with_headers(
        outbound,
        &[("x-api-key", &alice.key), ("x-step-up-token", &token)],
    );
    tx.send("one".into()).await.unwrap();
    let response = grpc
        .streaming(
            request,
            PathAndQuery::from_static("/test.Echo/Chat"),
            ProstCodec::<String, String>::default(),
        )
        .await
        .expect("stream opened");
    let mut inbound = response.into_inner();
    // Each answer arrives while the request stream is still open: nothing waits for its end.
    for word in ["one", "two", "three"] {
        if word != "one" {
            tx.send(word.into()).await.unwrap();
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("an answer before the request stream ends")
            .unwrap()
            .unwrap();
        assert_eq!(answer, format!("re: {word}"));
    }
    drop(tx);
    assert!(
        inbound.message().await.unwrap().is_none(),
        "ends with status OK"
    );
}

#[tokio::test]
async fn the_callers_deadline_goes_upstream_and_holds() {
    let s = setup().await;
    let t = &s.t;
    let bob = t.consumer("bob", &[]).await;
    let mut grpc = client(t, "pk.example.com").await;
    grpc.ready().await.unwrap();
    let mut request = with_headers("x".to_owned(), &[("x-api-key", &bob.key)]);
    request.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = grpc
        .unary(
            request,
            PathAndQuery::from_static("/test.Echo/Slow"),
            ProstCodec::<String, String>::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the deadline did not hold"
    );
    let seen = s.echo.seen.lock().unwrap().clone();
    assert!(seen[0].get("grpc-timeout").is_some(), "{:?}", seen[0]);
}
