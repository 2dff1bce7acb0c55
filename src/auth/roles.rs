//! Role rules of the route's policy (`roles: { only, except }`): a consumer whose roles the
//! policy does not allow gets 403 `forbidden` (in `report_only` rollout: passes, audited).

use std::sync::Arc;

use http::Request;
use serde_json::json;

use crate::config::RolloutMode;
use crate::context::Context;
use crate::error::Refusal;
use crate::guard::Guard;
use crate::registry::Registry;

#[derive(Clone)]
pub struct RoleCheck {
    registry: Arc<Registry>,
}

impl RoleCheck {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
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
            self.registry.audit_event(
                "would_refuse",
                Some(&entry.consumer),
                Some(&entry.prefix),
                json!({"code": "forbidden", "route": route.name, "policy": policy.name}),
            );
            return Ok(());
        }
        Err(Refusal::Forbidden)
    }
}
