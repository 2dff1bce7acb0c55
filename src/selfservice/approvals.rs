//! The requests for approval, for their approvers and requesters, under the prefix:
//!
//! - `GET {prefix}/approvals`: the pending requests the caller may decide (its roles, and not
//!   its own unless the policy allows it);
//! - `POST {prefix}/approvals/{id}/approve` and `…/deny`: a decision, with `X-OTP` of the
//!   approver's own strongest factor (a wrong code counts like any);
//! - `GET {prefix}/approvals/{id}[?wait=SECONDS]`: a request's state, for its requester; with
//!   `wait` (at most 30), answered as soon as it is decided.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::Endpoints;
use super::api::{caller, json_answer, no_body, proved};
use crate::approvals::{Approver, DecideError, MAX_WAIT, view};
use crate::error::{Body, BoxError, Refusal};

fn approver(entry: &crate::directory::KeyEntry) -> Approver<'_> {
    Approver {
        id: &entry.consumer.id,
        name: &entry.consumer.name,
        roles: &entry.consumer.roles,
    }
}

fn unavailable(error: crate::store::StoreError) -> Refusal {
    tracing::error!(%error, "approval store unavailable");
    Refusal::Unavailable
}

/// `GET {prefix}/approvals`.
pub async fn list<B>(
    endpoints: &Endpoints,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal> {
    let caller = caller(&mut request)?;
    let pending = endpoints
        .approvals
        .pending_for(Some(&approver(&caller.entry)))
        .await
        .map_err(unavailable)?;
    let pending: Vec<_> = pending
        .iter()
        .map(|a| view(a, &crate::approvals::State::Pending))
        .collect();
    Ok(json_answer(
        StatusCode::OK,
        &json!({ "approvals": pending }),
    ))
}

/// `{prefix}/approvals/{id}` and its decisions.
pub async fn one<B>(
    endpoints: &Endpoints,
    method: &Method,
    rest: &str,
    mut request: Request<B>,
) -> Result<Response<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut parts = rest.split('/');
    let (id, action) = (parts.next().unwrap_or(""), parts.next());
    if id.is_empty() || parts.next().is_some() {
        return Err(Refusal::NoRoute);
    }
    match (method, action) {
        (&Method::GET, None) => {
            let caller = caller(&mut request)?;
            let wait = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("wait=")))
                .map(|w| {
                    w.parse::<u64>().map_err(|_| {
                        Refusal::BadRequest("`wait` is a number of seconds (at most 30)")
                    })
                })
                .transpose()?
                .map_or(Duration::ZERO, |w| Duration::from_secs(w).min(MAX_WAIT));
            let (approval, state) = endpoints
                .approvals
                .status(id, &caller.entry.consumer.id, wait)
                .await
                .map_err(unavailable)?
                .ok_or(Refusal::UnknownApproval)?;
            Ok(json_answer(StatusCode::OK, &view(&approval, &state)))
        }
        (&Method::POST, Some(decision @ ("approve" | "deny"))) => {
            let caller = caller(&mut request)?;
            no_body(request).await?;
            // The approver's own code, as for a change to their factors: a stolen key alone
            // approves nothing.
            let proof = endpoints
                .prove(&caller, true, &format!("approvals/{decision}"))
                .await?;
            let approve = decision == "approve";
            let approval = endpoints
                .approvals
                .decide(id, approver(&caller.entry), approve)
                .await
                .map_err(decide_refusal)?;
            let state = if approve { "approved" } else { "denied" };
            let mut answer = view(&approval, &crate::approvals::State::Pending);
            answer["state"] = json!(state);
            Ok(proved(
                json_answer(StatusCode::OK, &answer),
                &proof,
                &caller,
            ))
        }
        _ => Err(Refusal::NoRoute),
    }
}

pub fn decide_refusal(error: DecideError) -> Refusal {
    match error {
        DecideError::NotFound => Refusal::UnknownApproval,
        DecideError::Decided(_) => Refusal::Conflict("this request was already decided"),
        DecideError::NotAllowed(_) => {
            Refusal::NotApprover("approving this request needs one of its approver roles")
        }
        DecideError::OwnRequest => {
            Refusal::NotApprover("the requester may not approve their own request")
        }
        DecideError::Unavailable => Refusal::Unavailable,
    }
}
