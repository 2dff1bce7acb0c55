//! Role rules of the route's policy (`roles: { only, except }`): a consumer whose roles the
//! policy does not allow gets 403 `forbidden` (in `report_only` rollout: passes, audited).

use http::Request;
use serde_json::json;

use crate::audit::Audit;
use crate::config::RolloutMode;
use crate::context::Context;
use crate::error::Refusal;
use crate::guard::Guard;

#[derive(Clone)]
pub struct RoleCheck {
    audit: Audit,
}

impl RoleCheck {
    pub fn new(audit: Audit) -> Self {
        Self { audit }
    }
}

impl<B> Guard<B> for RoleCheck {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let (Some(route), Some(entry)) = (Context::route_of(request), Context::entry_of(request))
        else {
            return Ok(());
        };
        let policy = &route.policy;
        if policy.roles.allows(&entry.consumer.roles) {
            return Ok(());
        }
        if policy.rollout.mode == RolloutMode::ReportOnly {
            self.audit.event(
                "would_refuse",
                Some(entry.consumer.who()),
                Some(&entry.prefix),
                json!({"code": "forbidden", "route": route.name, "policy": policy.name}),
            );
            return Ok(());
        }
        Err(Refusal::Forbidden)
    }
}
