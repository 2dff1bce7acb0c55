//! Who is enrolled for what: for a consumer, the policies in force that need a second factor
//! and apply to its roles, and whether it is enrolled for each, inside a grace period, or
//! past it. The security page (`GET {prefix}/2fa`) shows one consumer's; the admin report
//! (`GET /reports/enrollment`, `stepgate report enrollment`) lists everyone who is not
//! enrolled, to encourage enrolment before the deadlines.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::clock::rfc3339;
use crate::config::Config;
use crate::config::{Policy, RolloutMode};
use crate::directory::Consumer;
use crate::views::ConsumerView;

/// Where a consumer stands with one policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// Holds a confirmed factor the policy accepts.
    Enrolled,
    /// Not enrolled; passes (with a warning) until the policy's grace deadline.
    Grace,
    /// Not enrolled and no grace left: refused with 403 `enrollment_required` (under
    /// `report_only`, forwarded and audited as `would_refuse`).
    Required,
}

/// One policy as it applies to one consumer.
#[derive(Debug, Clone)]
pub struct PolicyStanding<'a> {
    pub policy: &'a Policy,
    pub standing: Standing,
}

/// The policies a consumer faces: those some route uses that require a second factor and
/// whose roles rule lets the consumer in (a consumer a policy refuses outright needs no
/// factor for it). In policy-name order.
pub fn policies_for<'a>(
    snapshot: &'a Config,
    consumer: &Consumer,
    now: u64,
) -> Vec<PolicyStanding<'a>> {
    let used: BTreeSet<&str> = snapshot
        .routes
        .iter()
        .map(|r| r.policy.name.as_str())
        .collect();
    snapshot
        .policies
        .values()
        .filter(|p| p.asks_second_factor())
        .filter(|p| used.contains(p.name.as_str()))
        .filter(|p| p.roles.allows(&consumer.roles))
        .map(|policy| PolicyStanding {
            policy,
            standing: standing(policy, consumer, now),
        })
        .collect()
}

fn standing(policy: &Policy, consumer: &Consumer, now: u64) -> Standing {
    if consumer.enrolled_for(policy.factors) {
        Standing::Enrolled
    } else if policy.rollout.grace_until.is_some_and(|until| now < until) {
        Standing::Grace
    } else {
        Standing::Required
    }
}

/// A policy on the security page.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyView {
    pub policy: String,
    /// The policy's words for consumers, when it has them.
    pub description: Option<String>,
    pub factors: Vec<&'static str>,
    pub grace_until: Option<String>,
    /// `enrolled`, `grace` or `required`.
    pub status: Standing,
    /// `enforce` or `report_only` (calls pass whatever the standing; refusals are audited).
    pub mode: &'static str,
}

impl PolicyView {
    pub fn of(p: &PolicyStanding<'_>) -> Self {
        Self {
            policy: p.policy.name.clone(),
            description: p.policy.description.clone(),
            factors: p.policy.factors.names(),
            grace_until: p.policy.rollout.grace_until.map(rfc3339),
            status: p.standing,
            mode: mode_name(p.policy.rollout.mode),
        }
    }
}

/// A rollout mode as the report and the status object spell it.
fn mode_name(mode: RolloutMode) -> &'static str {
    match mode {
        RolloutMode::Enforce => "enforce",
        RolloutMode::ReportOnly => "report_only",
    }
}

/// One line of the enrolment report: a consumer not enrolled for a policy.
#[derive(Debug, Clone, Serialize)]
pub struct ReportEntry {
    pub consumer: String,
    pub consumer_id: String,
    pub roles: Vec<String>,
    pub policy: String,
    /// Factors the policy accepts.
    pub factors: Vec<&'static str>,
    /// Factors the consumer has confirmed (none the policy accepts).
    pub enrolled_factors: Vec<&'static str>,
    /// Factors the consumer started enrolling but did not confirm.
    pub pending: Vec<&'static str>,
    /// The policy's grace deadline (RFC 3339); `null` when it has none.
    pub grace_until: Option<String>,
    /// `grace` (the deadline is ahead) or `overdue` (passed, or none: refused now).
    pub status: &'static str,
    /// `report_only` policies forward anyway; they only audit what they would refuse.
    pub mode: &'static str,
}

/// The enrolment report over `consumers` (disabled ones are left out: they cannot call).
pub fn report(
    snapshot: &Config,
    consumers: &[std::sync::Arc<Consumer>],
    now: u64,
) -> Vec<ReportEntry> {
    let mut entries = Vec::new();
    for consumer in consumers.iter().filter(|c| !c.disabled) {
        let view = ConsumerView::stored(consumer, now);
        let mut pending = Vec::new();
        if view.totp.as_ref().is_some_and(|t| t.status == "pending") {
            pending.push("totp");
        }
        if view.sms.as_ref().is_some_and(|s| s.status == "pending") {
            pending.push("sms");
        }
        for p in policies_for(snapshot, consumer, now) {
            let status = match p.standing {
                Standing::Enrolled => continue,
                Standing::Grace => "grace",
                Standing::Required => "overdue",
            };
            entries.push(ReportEntry {
                consumer: consumer.name.clone(),
                consumer_id: consumer.id.clone(),
                roles: consumer.roles.clone(),
                policy: p.policy.name.clone(),
                factors: p.policy.factors.names(),
                enrolled_factors: view.factors.clone(),
                pending: pending.clone(),
                grace_until: p.policy.rollout.grace_until.map(rfc3339),
                status,
                mode: mode_name(p.policy.rollout.mode),
            });
        }
    }
    entries.sort_by(|a, b| (&a.consumer, &a.policy).cmp(&(&b.consumer, &b.policy)));
    entries
}

/// The `X-Stepgate-Warning` of a consumer passing during a grace period: the deadline, and
/// where to enrol (the security page; an operator when self-service is off).
pub fn grace_warning(self_service: &crate::config::SelfServiceSpec, until: u64) -> String {
    let deadline = rfc3339(until);
    match self_service.page_path() {
        Some(page) => {
            format!("second factor not enrolled; required from {deadline} on; enrol at {page}")
        }
        None => format!(
            "second factor not enrolled; required from {deadline} on; ask your operator to enrol"
        ),
    }
}
