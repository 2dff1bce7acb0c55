//! A local HTTP server speaking Twilio's Programmable Messaging wire API, for the SMS tests:
//! `POST /2010-04-01/Accounts/{AccountSid}/Messages.json` with HTTP basic auth and a form
//! body (`To`, `From` or `MessagingServiceSid`, `Body`). It checks all of that as Twilio
//! would, answers 201 with a Twilio-like message (`sid` `SM…`, `status` `queued`), and keeps
//! every message so a test can read the code out of its body. It can be told to answer a
//! Twilio error instead (e.g. 400 `{"code":21211,…}`). Requests it refuses are recorded as
//! rejections, so a test can assert there were none.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{BoxBody, full};

/// One message the fake accepted.
#[derive(Debug, Clone)]
pub struct Message {
    pub sid: String,
    pub to: String,
    pub from: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub body: String,
}

/// One request as it arrived (headers and raw body), for checking what left the gateway.
#[derive(Debug, Clone)]
pub struct Arrived {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: String,
}

#[derive(Default)]
struct State {
    messages: Vec<Message>,
    arrived: Vec<Arrived>,
    rejections: Vec<String>,
    /// Answer this (status, JSON body) instead of accepting.
    failure: Option<(u16, serde_json::Value)>,
}

pub struct FakeTwilio {
    pub addr: SocketAddr,
    pub account_sid: String,
    pub auth_token: String,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeTwilio {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex32() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl FakeTwilio {
    /// A fake account with a random SID and auth token, on 127.0.0.1:0.
    pub async fn start() -> FakeTwilio {
        let account_sid = format!("AC{}", hex32());
        let auth_token = hex32();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (sid, token, st) = (account_sid.clone(), auth_token.clone(), state.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (sid, token, st) = (sid.clone(), token.clone(), st.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (sid, token, st) = (sid.clone(), token.clone(), st.clone());
                        async move { Ok::<_, Infallible>(handle(&sid, &token, &st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeTwilio {
            addr,
            account_sid,
            auth_token,
            state,
            task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Messages accepted so far, oldest first.
    pub fn messages(&self) -> Vec<Message> {
        self.state.lock().unwrap().messages.clone()
    }

    /// Every request that arrived (accepted or not).
    pub fn arrived(&self) -> Vec<Arrived> {
        self.state.lock().unwrap().arrived.clone()
    }

    /// Why requests were refused (wrong path, auth, fields); empty when all were right.
    pub fn rejections(&self) -> Vec<String> {
        self.state.lock().unwrap().rejections.clone()
    }

    /// The last message; panics when there is none.
    pub fn last(&self) -> Message {
        self.messages().pop().expect("a message was texted")
    }

    /// The code in the last message's body.
    pub fn last_code(&self) -> String {
        code_in(&self.last().body)
    }

    /// From now on, answer `status` with `body` (a Twilio error) instead of accepting.
    pub fn fail_with(&self, status: u16, body: serde_json::Value) {
        self.state.lock().unwrap().failure = Some((status, body));
    }

    /// Accept messages again.
    pub fn succeed(&self) {
        self.state.lock().unwrap().failure = None;
    }
}

/// The six-digit code in a message body (the first run of exactly six digits).
pub fn code_in(body: &str) -> String {
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i - start == 6 {
                return body[start..i].to_string();
            }
        } else {
            i += 1;
        }
    }
    panic!("no six-digit code in the message {body:?}")
}

fn twilio_error(status: u16, code: u32, message: &str) -> Response<BoxBody> {
    let body = serde_json::json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status,
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

async fn handle(
    sid: &str,
    token: &str,
    state: &Mutex<State>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_else(|_| Bytes::new());
    let body = String::from_utf8_lossy(&body).into_owned();
    let path = parts.uri.path().to_string();
    state.lock().unwrap().arrived.push(Arrived {
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let reject = |why: String, response: Response<BoxBody>| {
        state.lock().unwrap().rejections.push(why);
        response
    };

    let expected = format!("/2010-04-01/Accounts/{sid}/Messages.json");
    if path != expected {
        return reject(
            format!("path {path}, expected {expected}"),
            twilio_error(404, 20404, "The requested resource was not found"),
        );
    }
    if parts.method != http::Method::POST {
        return reject(
            format!("method {}", parts.method),
            twilio_error(405, 20004, "Method not allowed"),
        );
    }
    let auth = parts
        .headers
        .get_all("authorization")
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_string())
        .collect::<Vec<_>>();
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{sid}:{token}"))
    );
    if auth != [want] {
        return reject(
            format!("authorization {auth:?}"),
            twilio_error(401, 20003, "Authenticate"),
        );
    }
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return reject(
            format!("content-type {content_type:?}"),
            twilio_error(400, 20001, "Unsupported content type"),
        );
    }
    let mut fields: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    fields.sort();
    let one = |name: &str| -> Result<Option<String>, String> {
        let values: Vec<&String> = fields
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect();
        match values.as_slice() {
            [] => Ok(None),
            [v] => Ok(Some((*v).clone())),
            _ => Err(format!("{name} given {} times", values.len())),
        }
    };
    let known = ["To", "From", "MessagingServiceSid", "Body"];
    if let Some((k, _)) = fields.iter().find(|(k, _)| !known.contains(&k.as_str())) {
        return reject(
            format!("unexpected field {k}"),
            twilio_error(400, 21600, "Unexpected parameter"),
        );
    }
    let (to, from, service, text) = match (
        one("To"),
        one("From"),
        one("MessagingServiceSid"),
        one("Body"),
    ) {
        (Ok(to), Ok(from), Ok(service), Ok(text)) => (to, from, service, text),
        (a, b, c, d) => {
            let why = [a.err(), b.err(), c.err(), d.err()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ");
            return reject(why, twilio_error(400, 21600, "Duplicate parameter"));
        }
    };
    let Some(to) = to.filter(|t| {
        t.starts_with('+')
            && (9..=16).contains(&t.len())
            && t[1..].bytes().all(|b| b.is_ascii_digit())
    }) else {
        return reject(
            "To missing or not E.164".into(),
            twilio_error(400, 21604, "A 'To' phone number is required."),
        );
    };
    if from.is_some() == service.is_some() {
        return reject(
            "exactly one of From or MessagingServiceSid".into(),
            twilio_error(
                400,
                21603,
                "A 'From' or 'MessagingServiceSid' parameter is required.",
            ),
        );
    }
    let Some(text) = text.filter(|b| !b.is_empty()) else {
        return reject(
            "Body missing".into(),
            twilio_error(400, 21602, "Message body is required."),
        );
    };

    let mut state = state.lock().unwrap();
    if let Some((status, body)) = state.failure.clone() {
        return Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap();
    }
    let message_sid = format!("SM{}", hex32());
    state.messages.push(Message {
        sid: message_sid.clone(),
        to: to.clone(),
        from: from.clone(),
        messaging_service_sid: service.clone(),
        body: text.clone(),
    });
    let answer = serde_json::json!({
        "account_sid": sid,
        "api_version": "2010-04-01",
        "body": text,
        "direction": "outbound-api",
        "error_code": null,
        "error_message": null,
        "from": from,
        "messaging_service_sid": service,
        "num_segments": "1",
        "sid": message_sid,
        "status": "queued",
        "to": to,
        "uri": format!("/2010-04-01/Accounts/{sid}/Messages/{message_sid}.json"),
    });
    Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .body(full(answer.to_string()))
        .unwrap()
}
