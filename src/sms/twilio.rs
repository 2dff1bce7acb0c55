//! Twilio Programmable Messaging: `POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`
//! with HTTP basic auth (account SID and auth token) and a form body (`To`, `From` or
//! `MessagingServiceSid`, `Body`), over the same hyper-util + rustls client stack as https
//! upstreams.
//!
//! The auth token lives only in the `Authorization` header value (marked sensitive); neither
//! it, the full destination number nor the message text is ever logged. Twilio's numeric error
//! code is, so an operator can look it up.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::Phone;

/// Twilio's production API.
pub const DEFAULT_BASE_URL: &str = "https://api.twilio.com";
/// Longest answer read from Twilio (its message and error bodies are well under 4 KiB).
const MAX_ANSWER: usize = 64 * 1024;

/// Who the message is from: a number (or alphanumeric sender ID), or a messaging service that
/// picks one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    From(String),
    MessagingService(String),
}

/// Why a message was not sent. Each becomes 502 `sms_failed` for the client.
#[derive(Debug)]
pub enum SendError {
    /// Twilio answered with an error status; `code` is its numeric error code when the body
    /// had one (`{"code":21211,"message":…,"status":400}`).
    Refused { status: u16, code: Option<i64> },
    /// No answer: connection refused, TLS failure, reset.
    Unreachable(String),
    /// No complete answer within the configured timeout.
    Timeout(Duration),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Refused {
                status,
                code: Some(code),
            } => write!(f, "Twilio refused the message: HTTP {status}, error {code}"),
            SendError::Refused { status, code: None } => {
                write!(f, "Twilio refused the message: HTTP {status}")
            }
            SendError::Unreachable(why) => write!(f, "Twilio is unreachable: {why}"),
            SendError::Timeout(t) => write!(f, "Twilio did not answer within {}ms", t.as_millis()),
        }
    }
}

/// A configured Twilio account.
pub struct Twilio {
    /// The configured base URL, for display.
    base_url: String,
    account_sid: String,
    messages: Uri,
    authorization: HeaderValue,
    sender: Sender,
    timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl fmt::Debug for Twilio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Twilio")
            .field("base_url", &self.base_url)
            .field("account_sid", &self.account_sid)
            .field("sender", &self.sender)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// `AC` + 32 hex digits (account) or `MG` + 32 hex digits (messaging service).
pub fn is_sid(text: &str, prefix: &str) -> bool {
    text.len() == 34 && text.starts_with(prefix) && text[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// A sender for `From`: an E.164 number, or an alphanumeric sender ID (1–11 letters, digits
/// and spaces with at least one letter), as Twilio accepts them.
pub fn valid_from(text: &str) -> bool {
    Phone::parse(text).is_ok()
        || ((1..=11).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ')
            && text.bytes().any(|b| b.is_ascii_alphabetic()))
}

impl Twilio {
    /// `base_url` is `https://…` (or `http://` to a loopback address, for tests and local
    /// relays: the auth token must never cross a network in clear text).
    pub fn new(
        base_url: &str,
        account_sid: &str,
        auth_token: &str,
        sender: Sender,
        timeout: Duration,
    ) -> Result<Self, String> {
        let base: Uri = base_url
            .parse()
            .map_err(|e| format!("`{base_url}` is not a URL: {e}"))?;
        let authority = base
            .authority()
            .ok_or_else(|| format!("`{base_url}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{base_url}`: credentials in the URL are not supported"
            ));
        }
        if base.query().is_some() {
            return Err(format!("`{base_url}` must not have a query"));
        }
        match base.scheme_str() {
            Some("https") => {}
            Some("http") if is_loopback(authority.host()) => {}
            Some("http") => {
                return Err(format!(
                    "`{base_url}`: plain http is allowed only to a loopback address (the auth \
                     token would travel in clear text); use https"
                ));
            }
            _ => return Err(format!("`{base_url}` must start with https://")),
        }
        if !is_sid(account_sid, "AC") {
            return Err("not an account SID (AC followed by 32 hex digits)".into());
        }
        let path = base.path().trim_end_matches('/');
        let messages: Uri = format!(
            "{}://{}{path}/2010-04-01/Accounts/{account_sid}/Messages.json",
            base.scheme_str().unwrap_or("https"),
            authority.as_str()
        )
        .parse()
        .map_err(|e| format!("`{base_url}`: {e}"))?;
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{account_sid}:{auth_token}"));
        let mut authorization = HeaderValue::try_from(format!("Basic {credentials}"))
            .map_err(|_| "the auth token contains characters a header cannot carry".to_owned())?;
        authorization.set_sensitive(true);

        let tls = crate::tls::client_config(None)?;
        let connector = crate::tls::https_connector(tls, timeout, true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            base_url: base_url.to_owned(),
            account_sid: account_sid.to_owned(),
            messages,
            authorization,
            sender,
            timeout,
            client,
        })
    }

    /// Sends `body` to `to`; returns the message SID (`SM…`) Twilio assigned.
    pub async fn send(&self, to: &Phone, body: &str) -> Result<String, SendError> {
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("To", to.expose());
            match &self.sender {
                Sender::From(from) => form.append_pair("From", from),
                Sender::MessagingService(sid) => form.append_pair("MessagingServiceSid", sid),
            };
            form.append_pair("Body", body);
            form.finish()
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.messages.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| SendError::Unreachable(format!("cannot build the request: {e}")))?;

        // One deadline for connecting, the answer's head and its body.
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| SendError::Unreachable(innermost(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, SendError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| SendError::Timeout(self.timeout))??;
        let answer: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let code = answer.as_ref().and_then(|a| a["code"].as_i64());
            return Err(SendError::Refused {
                status: status.as_u16(),
                code,
            });
        }
        Ok(answer
            .as_ref()
            .and_then(|a| a["sid"].as_str())
            .unwrap_or("unknown")
            .to_owned())
    }
}

/// The innermost error of a chain (`Connection refused (os error 111)`), for the log.
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "AC0123456789abcdef0123456789abcdef";

    #[test]
    fn sids_and_senders() {
        assert!(is_sid(SID, "AC"));
        assert!(!is_sid(SID, "MG"));
        assert!(!is_sid("AC0123", "AC"));
        assert!(valid_from("+15005550006"));
        assert!(valid_from("Stepgate"));
        assert!(!valid_from("12345"));
        assert!(!valid_from("Far too long a name"));
    }

    #[test]
    fn base_urls_need_https_except_on_loopback() {
        install();
        let new = |url: &str| {
            Twilio::new(
                url,
                SID,
                "token",
                Sender::From("+15005550006".into()),
                Duration::from_secs(1),
            )
        };
        let t = new("https://api.twilio.com").unwrap();
        assert_eq!(
            t.messages.to_string(),
            format!("https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json")
        );
        assert!(new("http://127.0.0.1:9000/").is_ok());
        assert!(new("http://localhost:9000").is_ok());
        assert!(new("http://api.twilio.com").is_err());
        assert!(new("ftp://api.twilio.com").is_err());
        assert!(new("https://user:pw@api.twilio.com").is_err());
        // The token is in the header, marked sensitive, and not in Debug output.
        assert!(t.authorization.is_sensitive());
        assert!(!format!("{t:?}").contains("token"));
    }

    fn install() {
        crate::tls::install_default_provider();
    }
}
