//! The built-in `echo` upstream: answers 200 with a JSON description of the request exactly as
//! an upstream would receive it (method, path, query, headers, body size), so a newcomer can
//! watch the gateway work with no backend of their own. The body is counted as it streams,
//! never held.

use std::collections::BTreeMap;

use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::error::{Body, Refusal, full_body};

pub async fn respond(request: Request<Body>) -> Result<Response<Body>, Refusal> {
    let (parts, mut body) = request.into_parts();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(error) => {
                return Err(super::body::client_refusal(error.as_ref()).unwrap_or(Refusal::BadBody));
            }
        }
    }

    let mut headers: BTreeMap<&str, Value> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned());
        match headers.get_mut(name.as_str()) {
            None => {
                headers.insert(name.as_str(), value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
        }
    }
    let description = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut response = Response::new(full_body(description.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
