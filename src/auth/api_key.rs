//! The first factor: the `X-Api-Key` header against the directory.
//!
//! The key is removed from the request on every route, so no upstream ever receives it. On a
//! route whose policy needs a key, exactly one well-formed header must be present; the
//! consumer it belongs to is then vouched for to the upstream with identity headers (the
//! client's own copies were removed by `identity`).

use std::sync::Arc;

use http::Request;
use http::header::{Entry, HeaderMap, HeaderName, HeaderValue};

use crate::config::Requirement;
use crate::context::Context;
use crate::directory::Directory;
use crate::error::Refusal;
use crate::guard::Guard;

pub use crate::header_names::{
    X_API_KEY, X_CONSUMER_ID, X_CONSUMER_NAME, X_CONSUMER_ROLES, X_STEPGATE_AUTH,
};

/// Longest header value considered; real keys are 76 bytes.
const MAX_KEY_BYTES: usize = 256;

#[derive(Clone)]
pub struct ApiKeyGuard {
    directory: Arc<Directory>,
}

impl ApiKeyGuard {
    pub fn new(directory: Arc<Directory>) -> Self {
        Self { directory }
    }
}

/// The single value of `name`: `Ok(None)` when absent; 400 when repeated or not a plain token
/// of visible ASCII (such input is ambiguous, so it is refused rather than guessed at).
pub fn single_value<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    what: &'static str,
) -> Result<Option<&'a str>, Refusal> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Refusal::BadRequest(what));
    }
    visible(value, what).map(Some)
}

/// The one value of `name`, removed in the same lookup (owned, to be checked with
/// [`visible`]): `Ok(None)` when absent, 400 when repeated.
pub fn take_single(
    headers: &mut HeaderMap,
    name: &HeaderName,
    what: &'static str,
) -> Result<Option<HeaderValue>, Refusal> {
    let Entry::Occupied(entry) = headers.entry(name) else {
        return Ok(None);
    };
    let mut values = entry.remove_entry_mult().1;
    let value = values.next();
    if values.next().is_some() {
        return Err(Refusal::BadRequest(what));
    }
    Ok(value)
}

/// A credential's value as text: visible ASCII, 1 to 256 bytes, else 400.
pub fn visible<'a>(value: &'a HeaderValue, what: &'static str) -> Result<&'a str, Refusal> {
    let bytes = value.as_bytes();
    // `fold` with `&` rather than `all`: without the early exit the check compiles to a few
    // vector compares instead of a branch per byte (keys and tokens are 68 to 76 bytes).
    let graphic = bytes.iter().fold(true, |ok, b| ok & b.is_ascii_graphic());
    if bytes.is_empty() || bytes.len() > MAX_KEY_BYTES || !graphic {
        return Err(Refusal::BadRequest(what));
    }
    // Visible ASCII is valid UTF-8; `from_utf8` checks it a word at a time, where
    // `HeaderValue::to_str` would walk the bytes once more one by one.
    std::str::from_utf8(bytes).map_err(|_| Refusal::BadRequest(what))
}

impl<B> Guard<B> for ApiKeyGuard {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let policy = &Context::route_of(request)
            .ok_or_else(|| Refusal::Internal("API-key check before routing"))?
            .policy;
        let factor_required = policy.second_factor_for(request.method());
        if policy.api_key != Requirement::Required {
            request.headers_mut().remove(&X_API_KEY);
            return Ok(());
        }
        const WHAT: &str = "exactly one X-Api-Key header of visible ASCII is allowed";
        let headers = request.headers_mut();
        let presented = take_single(headers, &X_API_KEY, WHAT)?.ok_or(Refusal::ApiKeyMissing)?;
        let presented = visible(&presented, WHAT)?;
        // A node out of touch with a shared store may hold a key revoked elsewhere.
        if !self.directory.is_current() {
            return Err(Refusal::Unavailable);
        }
        let entry = self
            .directory
            .authenticate(presented)
            .ok_or(Refusal::ApiKeyInvalid)?;
        let identity = &entry.consumer.headers;
        headers.insert(X_CONSUMER_ID.clone(), identity.id.clone());
        headers.insert(X_CONSUMER_NAME.clone(), identity.name.clone());
        headers.insert(X_CONSUMER_ROLES.clone(), identity.roles.clone());
        // With a second factor required, that layer says how the request was authorised.
        if !factor_required {
            headers.insert(X_STEPGATE_AUTH.clone(), HeaderValue::from_static("key"));
        }
        Context::of_mut(request)?.entry = Some(entry);
        Ok(())
    }
}
