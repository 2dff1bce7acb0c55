//! Settling a request on its way through a person's approval, at forwarding: the body is read
//! (within the route's limit) because the approval is bound to it. A request for approval is
//! recorded and refused (nothing is forwarded); the repeat of an approved one passes once if
//! its digest matches, and its body goes on to the upstream as it was read.

use bytes::Bytes;
use http::request;
use http_body_util::BodyExt;

use crate::approvals::{Approvals, Ask, digest};
use crate::auth::second_factor::ApprovalCheck;
use crate::error::{Body, Refusal, full_body};
use crate::snapshot::Snapshot;
use crate::upstream::body::client_refusal;

/// The request's target as routed and authorised (before `strip_prefix`).
pub struct Target {
    pub path: String,
    pub query: Option<String>,
}

pub async fn settle(
    approvals: &Approvals,
    check: ApprovalCheck,
    snapshot: &Snapshot,
    route: &str,
    parts: &request::Parts,
    target: &Target,
    body: Body,
) -> Result<Body, Refusal> {
    let bytes: Bytes = body
        .collect()
        .await
        .map_err(|error| client_refusal(error.as_ref()).unwrap_or(Refusal::BadBody))?
        .to_bytes();
    let method = parts.method.as_str();
    let query = target.query.as_deref();
    let Some(rule) = check.rule.approval.as_ref() else {
        return Err(Refusal::Internal(
            "an approval check on a policy without approval",
        ));
    };
    match &check.claim {
        Some(id) => {
            let repeat = digest(method, &target.path, query, &bytes);
            approvals.claim(id, &check.requester, &repeat).await?;
            Ok(full_body(bytes))
        }
        None => {
            let prefix = snapshot.self_service.prefix.clone();
            let ask = Ask {
                requester: &check.requester,
                policy: &check.rule.name,
                route,
                rule,
                method,
                path: &target.path,
                query,
                body: &bytes,
            };
            let page_prefix = prefix.clone();
            let approval = approvals
                .request(ask, &snapshot.approvals, move |id| {
                    format!("{page_prefix}/#approval={id}")
                })
                .await?;
            Err(Refusal::ApprovalRequired {
                page: format!("{prefix}/#approval={}", approval.id),
                status: format!("{prefix}/approvals/{}", approval.id),
                expires_at: approval.expires_at,
                id: approval.id,
            })
        }
    }
}
