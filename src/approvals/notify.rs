//! The webhook told of each request for approval (a chat or pager relay): a JSON summary,
//! signed with HMAC-SHA256 over `<timestamp>.<body>` in `X-Stepgate-Signature: sha256=<hex>`
//! beside `X-Stepgate-Timestamp`, retried with backoff until it is taken (2xx) or four tries
//! failed. Nothing secret is in it: the request's shown fields and digest, never its body or
//! any credential.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::Sha256;

use super::{Approval, State, view};
use crate::config::NotifySettings;

/// Tries, and the wait before the second (doubling after each).
const TRIES: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_secs(5);

/// The signature of a body sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length, so this never falls back.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "sha256={}",
        crate::secrets::hex(&mac.finalize().into_bytes())
    )
}

/// Announces a request in the background; the request's own answer does not wait for it.
pub fn announce(settings: Arc<NotifySettings>, approval: &Approval, approval_url: String) {
    let mut summary = view(approval, &State::Pending);
    if let serde_json::Value::Object(map) = &mut summary {
        map.insert("event".into(), "approval_requested".into());
        map.insert("approval_url".into(), approval_url.into());
    }
    let body = Bytes::from(summary.to_string());
    let id = approval.id.clone();
    tokio::spawn(async move {
        let connector = crate::tls::https_connector(settings.tls.clone(), TIMEOUT, true);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=TRIES {
            let timestamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let request = Request::builder()
                .method(Method::POST)
                .uri(settings.url.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .header("x-stepgate-timestamp", timestamp)
                .header(
                    "x-stepgate-signature",
                    signature(&settings.secret, timestamp, &body),
                )
                .body(Full::new(body.clone()));
            let Ok(request) = request else { return };
            let outcome = tokio::time::timeout(TIMEOUT, async {
                let response = client.request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                // Drained so that the connection could be reused; its content is not ours.
                let _ = response.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("answered {status}"))
                }
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match outcome {
                Ok(()) => return,
                Err(error) if attempt < TRIES => {
                    tracing::warn!(approval_id = id.as_str(), attempt, %error, "approval webhook failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(error) => {
                    tracing::error!(approval_id = id.as_str(), %error, "approval webhook failed; giving up");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 does not cover this framing; a fixed vector guards against a change.
        let a = signature(b"0123456789abcdef", 1_800_000_000, b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64);
        assert_ne!(a, signature(b"0123456789abcdef", 1_800_000_001, b"{}"));
        assert_ne!(a, signature(b"0123456789abcdeg", 1_800_000_000, b"{}"));
    }
}
