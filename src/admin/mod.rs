//! The admin API: its own listener (loopback by default), JSON, `Authorization: Bearer`.
//! `/healthz` and `/readyz` answer without a token so that probes need no secret.

mod routes;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounts::Accounts;
use crate::error::{Body, problem_response};
use crate::secrets::AdminToken;
use crate::snapshot::ConfigHandle;

/// What the admin handlers work on.
pub struct Admin {
    pub accounts: Arc<Accounts>,
    pub approvals: Arc<crate::approvals::Approvals>,
    pub limiter: Arc<dyn crate::limiter::AttemptLimiter>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub reloader: Arc<crate::reload::Reloader>,
    pub token: AdminToken,
    pub config: ConfigHandle,
}

/// Serves the admin API until `shutdown` is cancelled; in-flight calls finish first.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, request).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "admin connection ended with an error");
                    }
                }
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn handle(admin: &Admin, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    // Probes and scrapers need no secret; these answers hold none.
    let open = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !open && !authorized(admin, &request) {
        let mut response = problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API needs `Authorization: Bearer <token>` with the admin token",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(r#"Bearer realm="stepgate-admin""#),
        );
        return response;
    }
    routes::route(admin, request).await
}

fn authorized<B>(admin: &Admin, request: &Request<B>) -> bool {
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| admin.token.matches(token.trim()))
}

pub(crate) fn problem(status: StatusCode, code: &'static str, detail: &str) -> Response<Body> {
    problem_response(status, code, detail, None)
}
