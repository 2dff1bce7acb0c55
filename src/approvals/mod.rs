//! Approval by a person, bound to the exact request (four-eyes).
//!
//! On a policy whose `factors` list `approval`, a caller with a key and no code (a deploy bot)
//! is refused with `approval_required` and an id; nothing is forwarded. The gateway keeps a
//! SHA-256 digest of the request (method, canonical path, query, body) and only the body
//! fields the policy's `show` names, never the body. A consumer with an allowed role (not the
//! requester, unless `self: true`) approves it with their own code, on the security page, the
//! CLI or the admin API, or denies it. The caller repeats the exact request with
//! `X-Approval: <id>`: it passes once if its digest matches; any other byte is
//! `approval_mismatch`, and the approval is spent either way.
//!
//! The requests live behind the [`ApprovalStore`] port: in a table of the gateway's SQLite
//! database ([`sqlite`], one node; kept across restarts), in memory ([`local`], for tests and
//! benchmarks), or in Redis with the rest of the shared state ([`redis`]), so that a request
//! made on one node is approved on a second and used on a third. State changes are single atomic steps
//! (pending → approved | denied, approved → used | mismatched): one approval passes once.

pub mod local;
mod notify;
pub mod redis;
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::{Audit, Who};
use crate::clock::{SharedClock, rfc3339};
use crate::config::{ApprovalRule, ApprovalSettings};
use crate::error::{Attempt, Refusal};
use crate::metrics::Metrics;
use crate::store::StoreError;

pub use local::LocalApprovals;
pub use redis::RedisApprovals;
pub use sqlite::SqliteApprovals;

/// A request waiting for, or past, its decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Approval {
    pub id: String,
    pub requester_id: String,
    pub requester: String,
    pub policy: String,
    pub route: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// SHA-256 (hex) of method, path, query and body: what an approval is bound to.
    pub digest: String,
    pub body_bytes: u64,
    /// The body fields the policy shows approvers (by their path), when the body is JSON.
    pub fields: BTreeMap<String, Value>,
    /// Roles of whom may approve, and whether the requester may: the policy's when asked.
    pub approver_roles: Vec<String>,
    pub self_approval: bool,
    pub created_at: u64,
    pub expires_at: u64,
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Pending,
    Approved {
        at: u64,
        by: String,
    },
    Denied {
        at: u64,
        by: String,
    },
    /// The approved request passed (once).
    Used {
        at: u64,
    },
    /// A request unlike the approved one presented its id: the approval is spent.
    Mismatched {
        at: u64,
    },
    /// Nobody decided it in time.
    Expired {
        at: u64,
    },
}

/// The kinds of [`State`] a transition starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Pending,
    Approved,
}

impl Stage {
    fn prefix(self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::Approved => "approved ",
        }
    }
}

impl State {
    /// One line, as stored: `pending`, `approved <at> <by>`, `denied <at> <by>`, `used <at>`,
    /// `mismatched <at>` (the approver's name last: it is whatever remains).
    pub fn encode(&self) -> String {
        match self {
            State::Pending => "pending".to_owned(),
            State::Approved { at, by } => format!("approved {at} {by}"),
            State::Denied { at, by } => format!("denied {at} {by}"),
            State::Used { at } => format!("used {at}"),
            State::Mismatched { at } => format!("mismatched {at}"),
            State::Expired { at } => format!("expired {at}"),
        }
    }

    pub fn decode(text: &str) -> Option<State> {
        let mut words = text.splitn(3, ' ');
        let kind = words.next()?;
        if kind == "pending" {
            return Some(State::Pending);
        }
        let at = words.next()?.parse().ok()?;
        Some(match kind {
            "approved" => State::Approved {
                at,
                by: words.next()?.to_owned(),
            },
            "denied" => State::Denied {
                at,
                by: words.next()?.to_owned(),
            },
            "used" => State::Used { at },
            "mismatched" => State::Mismatched { at },
            "expired" => State::Expired { at },
            _ => return None,
        })
    }

    fn starts_from(&self, from: Stage) -> bool {
        self.encode().starts_with(from.prefix())
    }

    /// The name of the state, for answers and the audit log.
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved { .. } => "approved",
            State::Denied { .. } => "denied",
            State::Used { .. } => "used",
            State::Mismatched { .. } => "mismatched",
            State::Expired { .. } => "expired",
        }
    }
}

/// Keeps requests for approval and moves them between states atomically.
#[async_trait]
pub trait ApprovalStore: Send + Sync + 'static {
    /// Keeps a new, pending request until a while after it expires.
    async fn put(&self, approval: &Approval) -> Result<(), StoreError>;

    async fn get(&self, id: &str) -> Result<Option<(Approval, State)>, StoreError>;

    /// Moves `id` from a state of kind `from` to `to`, as one step: `Ok(Ok(()))` when it
    /// moved, `Ok(Err(found))` with the state it was in otherwise (`None`: no such request).
    async fn transition(
        &self,
        id: &str,
        from: Stage,
        to: &State,
    ) -> Result<Result<(), Option<State>>, StoreError>;

    /// The requests still pending (expired ones may be among them: callers check the time).
    async fn pending(&self) -> Result<Vec<Approval>, StoreError>;
}

/// Who decides: an approver as the directory knows them.
pub struct Approver<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub roles: &'a [String],
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecideError {
    #[error("no such request for approval, or it has expired")]
    NotFound,
    #[error("this request was already {0}")]
    Decided(&'static str),
    #[error("approving this request needs one of the roles: {0}")]
    NotAllowed(String),
    #[error("the requester may not approve their own request")]
    OwnRequest,
    #[error("the store is unavailable")]
    Unavailable,
}

/// The operations on requests for approval, with their audit events and metrics.
pub struct Approvals {
    store: Arc<dyn ApprovalStore>,
    audit: Audit,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

/// A request for approval, as it arrived.
pub struct Ask<'a> {
    pub requester: &'a Attempt,
    pub policy: &'a str,
    pub route: &'a str,
    pub rule: &'a ApprovalRule,
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
}

/// How long a decided or spent request is kept after it expires (for its status and the
/// audit of a late repeat).
const KEPT_AFTER_EXPIRY: u64 = 3600;
/// The long poll of a request's status waits at most this long.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

impl Approvals {
    pub fn new(
        store: Arc<dyn ApprovalStore>,
        audit: Audit,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            audit,
            clock,
            metrics,
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    fn unavailable(error: StoreError) -> Refusal {
        tracing::error!(%error, "approval store unavailable: refused");
        Refusal::Unavailable
    }

    fn audit(&self, kind: &str, who: Who<'_>, approval: &Approval, extra: Value) {
        let mut detail = json!({
            "approval_id": approval.id,
            "policy": approval.policy,
            "route": approval.route,
            "method": approval.method,
            "path": approval.path,
        });
        if let (Value::Object(detail), Value::Object(extra)) = (&mut detail, extra) {
            detail.extend(extra);
        }
        self.audit.event(kind, Some(who), None, detail);
    }

    /// Records a request for approval (refused when its requester already has
    /// `max_pending` waiting), and tells the webhook.
    pub async fn request(
        &self,
        ask: Ask<'_>,
        settings: &ApprovalSettings,
        approval_url: impl FnOnce(&str) -> String,
    ) -> Result<Approval, Refusal> {
        let now = self.now();
        let waiting: Vec<Approval> = self
            .store
            .pending()
            .await
            .map_err(Self::unavailable)?
            .into_iter()
            .filter(|a| a.requester_id == *ask.requester.consumer_id && a.expires_at > now)
            .collect();
        if waiting.len() >= settings.max_pending as usize {
            self.metrics.approval("limited");
            let retry_after = waiting
                .iter()
                .map(|a| a.expires_at.saturating_sub(now))
                .min()
                .unwrap_or(1);
            return Err(Refusal::TooManyApprovals { retry_after });
        }
        let fields = shown_fields(ask.body, &ask.rule.show);
        let approval = Approval {
            id: format!(
                "apr_{}",
                crate::secrets::hex(&crate::secrets::random_bytes::<16>())
            ),
            requester_id: ask.requester.consumer_id.to_string(),
            requester: ask.requester.consumer_name.to_string(),
            policy: ask.policy.to_owned(),
            route: ask.route.to_owned(),
            method: ask.method.to_owned(),
            path: ask.path.to_owned(),
            query: ask.query.map(str::to_owned),
            digest: digest(ask.method, ask.path, ask.query, ask.body),
            body_bytes: ask.body.len() as u64,
            fields,
            approver_roles: ask.rule.roles.clone(),
            self_approval: ask.rule.self_approval,
            created_at: now,
            expires_at: now.saturating_add(ask.rule.ttl.as_secs()),
        };
        self.store.put(&approval).await.map_err(Self::unavailable)?;
        self.metrics.approval("requested");
        let who = Who {
            id: &approval.requester_id,
            name: &approval.requester,
        };
        self.audit(
            "approval_requested",
            who,
            &approval,
            json!({"expires_at": rfc3339(approval.expires_at)}),
        );
        if let Some(notify) = &settings.notify {
            notify::announce(notify.clone(), &approval, approval_url(&approval.id));
        }
        Ok(approval)
    }

    /// The repeat of an approved request, with its id: passes once when its digest is the
    /// approved one's, and returns the approver's name.
    pub async fn claim(
        &self,
        id: &str,
        requester: &Attempt,
        digest_of_repeat: &str,
    ) -> Result<String, Refusal> {
        let now = self.now();
        let invalid = || Refusal::ApprovalInvalid {
            by: requester.clone(),
        };
        let Some((approval, state)) = self.store.get(id).await.map_err(Self::unavailable)? else {
            self.metrics.approval("unknown");
            return Err(invalid());
        };
        let who = Who {
            id: &requester.consumer_id,
            name: &requester.consumer_name,
        };
        // Another consumer's id is as good as none (and says nothing of it).
        if approval.requester_id != *requester.consumer_id {
            self.metrics.approval("unknown");
            return Err(invalid());
        }
        if now >= approval.expires_at && matches!(state, State::Pending | State::Approved { .. }) {
            let from = if state == State::Pending {
                Stage::Pending
            } else {
                Stage::Approved
            };
            let to = State::Expired { at: now };
            // Once, whoever gets there first (the housekeeping sweep, or another node).
            if self
                .store
                .transition(id, from, &to)
                .await
                .map_err(Self::unavailable)?
                .is_ok()
            {
                self.metrics.approval("expired");
                self.audit(
                    "approval_expired",
                    who,
                    &approval,
                    json!({"state": state.name()}),
                );
            }
            return Err(invalid());
        }
        match state {
            State::Pending => Err(Refusal::ApprovalPending {
                expires_at: approval.expires_at,
            }),
            State::Denied { by, .. } => {
                self.audit("approval_refused", who, &approval, json!({"denied_by": by}));
                Err(Refusal::ApprovalDenied)
            }
            State::Expired { .. } => {
                self.metrics.approval("reused");
                Err(invalid())
            }
            State::Used { .. } | State::Mismatched { .. } => {
                self.metrics.approval("reused");
                self.audit("approval_reused", who, &approval, json!({}));
                Err(invalid())
            }
            State::Approved { by, .. } => {
                let matches: bool = digest_of_repeat
                    .as_bytes()
                    .ct_eq(approval.digest.as_bytes())
                    .into();
                let to = if matches {
                    State::Used { at: now }
                } else {
                    State::Mismatched { at: now }
                };
                match self
                    .store
                    .transition(id, Stage::Approved, &to)
                    .await
                    .map_err(Self::unavailable)?
                {
                    Ok(()) if matches => {
                        self.metrics.approval("used");
                        self.audit("approval_used", who, &approval, json!({"approved_by": by}));
                        Ok(by)
                    }
                    Ok(()) => {
                        self.metrics.approval("mismatched");
                        self.audit(
                            "approval_mismatched",
                            who,
                            &approval,
                            json!({"approved_by": by}),
                        );
                        Err(Refusal::ApprovalMismatch {
                            by: requester.clone(),
                        })
                    }
                    // Spent meanwhile (the same id twice at once): only one passes.
                    Err(_) => {
                        self.metrics.approval("reused");
                        Err(invalid())
                    }
                }
            }
        }
    }

    /// Marks the pending requests past their time as expired, once each (on a shared store,
    /// whichever node gets there first), with their audit event: run now and then.
    pub async fn expire(&self) -> Result<(), StoreError> {
        let now = self.now();
        for approval in self.store.pending().await? {
            if approval.expires_at > now {
                continue;
            }
            let to = State::Expired { at: now };
            if self
                .store
                .transition(&approval.id, Stage::Pending, &to)
                .await?
                .is_ok()
            {
                self.metrics.approval("expired");
                let who = Who {
                    id: &approval.requester_id,
                    name: &approval.requester,
                };
                self.audit(
                    "approval_expired",
                    who,
                    &approval,
                    json!({"state": "pending"}),
                );
            }
        }
        Ok(())
    }

    /// An approver's decision on a pending request (their code was checked by the caller).
    pub async fn decide(
        &self,
        id: &str,
        approver: Approver<'_>,
        approve: bool,
    ) -> Result<Approval, DecideError> {
        let now = self.now();
        let (approval, state) = self
            .store
            .get(id)
            .await
            .map_err(|_| DecideError::Unavailable)?
            .ok_or(DecideError::NotFound)?;
        if now >= approval.expires_at {
            return Err(DecideError::NotFound);
        }
        if state != State::Pending {
            return Err(DecideError::Decided(state.name()));
        }
        may_decide(&approval, &approver)?;
        let to = if approve {
            State::Approved {
                at: now,
                by: approver.name.to_owned(),
            }
        } else {
            State::Denied {
                at: now,
                by: approver.name.to_owned(),
            }
        };
        match self
            .store
            .transition(id, Stage::Pending, &to)
            .await
            .map_err(|_| DecideError::Unavailable)?
        {
            Ok(()) => {}
            Err(found) => {
                return Err(found.map_or(DecideError::NotFound, |s| DecideError::Decided(s.name())));
            }
        }
        let outcome = if approve { "approved" } else { "denied" };
        self.metrics.approval(outcome);
        let who = Who {
            id: approver.id,
            name: approver.name,
        };
        self.audit(
            &format!("approval_{outcome}"),
            who,
            &approval,
            json!({"requester": approval.requester}),
        );
        Ok(approval)
    }

    /// The pending requests `approver` may decide (all of them for `None`: the operator).
    pub async fn pending_for(
        &self,
        approver: Option<&Approver<'_>>,
    ) -> Result<Vec<Approval>, StoreError> {
        let now = self.now();
        let mut pending: Vec<Approval> = self
            .store
            .pending()
            .await?
            .into_iter()
            .filter(|a| a.expires_at > now)
            .filter(|a| approver.is_none_or(|approver| may_decide(a, approver).is_ok()))
            .collect();
        pending.sort_by_key(|a| a.created_at);
        Ok(pending)
    }

    /// A request and its state, for its requester; with `wait`, as soon as it is decided (or
    /// expires), at most `wait` later.
    pub async fn status(
        &self,
        id: &str,
        requester_id: &str,
        wait: Duration,
    ) -> Result<Option<(Approval, State)>, StoreError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let found = self.store.get(id).await?;
            let Some((approval, state)) = found else {
                return Ok(None);
            };
            if approval.requester_id != requester_id {
                return Ok(None);
            }
            let settled = state != State::Pending || self.now() >= approval.expires_at;
            if settled || tokio::time::Instant::now() >= deadline {
                return Ok(Some((approval, state)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Whether `approver` may decide `approval`: an allowed role, and not the requester unless
/// the policy lets them.
fn may_decide(approval: &Approval, approver: &Approver<'_>) -> Result<(), DecideError> {
    if approver.id == approval.requester_id && !approval.self_approval {
        return Err(DecideError::OwnRequest);
    }
    if !approver
        .roles
        .iter()
        .any(|role| approval.approver_roles.contains(role))
    {
        return Err(DecideError::NotAllowed(approval.approver_roles.join(", ")));
    }
    Ok(())
}

/// The digest an approval is bound to: SHA-256 over the method, the canonical path, the query
/// and the body, each length-prefixed (no two requests share one by moving bytes between
/// parts).
pub fn digest(method: &str, path: &str, query: Option<&str>, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [
        method.as_bytes(),
        path.as_bytes(),
        query.map_or(&b"\xff"[..], str::as_bytes),
        body,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    crate::secrets::hex(&hasher.finalize())
}

/// The `show` fields of a JSON body; nothing for a body that is not JSON.
fn shown_fields(body: &[u8], show: &[String]) -> BTreeMap<String, Value> {
    let Ok(document) = serde_json::from_slice::<Value>(body) else {
        return BTreeMap::new();
    };
    show.iter()
        .filter_map(|path| {
            let value = crate::json_path::select(&document, path)?;
            // A scalar, or a short rendering: an approver reads it, and it is kept.
            let value = match value {
                Value::Object(_) | Value::Array(_) => {
                    let text = value.to_string();
                    Value::String(text.chars().take(200).collect())
                }
                Value::String(s) => Value::String(s.chars().take(200).collect()),
                other => other.clone(),
            };
            Some((path.clone(), value))
        })
        .collect()
}

/// The view of a request for its requester and approvers (never its digest's input).
pub fn view(approval: &Approval, state: &State) -> Value {
    let mut v = json!({
        "id": approval.id,
        "state": state.name(),
        "requester": approval.requester,
        "policy": approval.policy,
        "route": approval.route,
        "method": approval.method,
        "path": approval.path,
        "query": approval.query,
        "body_bytes": approval.body_bytes,
        "request_sha256": approval.digest,
        "fields": approval.fields,
        "created_at": rfc3339(approval.created_at),
        "expires_at": rfc3339(approval.expires_at),
    });
    if let (State::Approved { by, at } | State::Denied { by, at }, Value::Object(map)) =
        (state, &mut v)
    {
        map.insert("decided_by".into(), json!(by));
        map.insert("decided_at".into(), json!(rfc3339(*at)));
    }
    v
}

/// How long a store keeps a request: its ttl, then a while for its status and late repeats.
pub fn keep_for(approval: &Approval) -> u64 {
    approval
        .expires_at
        .saturating_sub(approval.created_at)
        .saturating_add(KEPT_AFTER_EXPIRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_moves_with_every_part() {
        let base = digest("POST", "/deploy", Some("env=prod"), b"{\"v\":1}");
        for other in [
            digest("PUT", "/deploy", Some("env=prod"), b"{\"v\":1}"),
            digest("POST", "/deploy2", Some("env=prod"), b"{\"v\":1}"),
            digest("POST", "/deploy", Some("env=dev"), b"{\"v\":1}"),
            digest("POST", "/deploy", None, b"{\"v\":1}"),
            digest("POST", "/deploy", Some(""), b"{\"v\":1}"),
            digest("POST", "/deploy", Some("env=prod"), b"{\"v\":2}"),
            digest("POST", "/deploy", Some("env=prod{\"v\":1}"), b""),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(
            base,
            digest("POST", "/deploy", Some("env=prod"), b"{\"v\":1}")
        );
    }

    #[test]
    fn states_read_back() {
        for state in [
            State::Pending,
            State::Approved {
                at: 5,
                by: "bob smith".into(),
            },
            State::Denied {
                at: 6,
                by: "carol".into(),
            },
            State::Used { at: 7 },
            State::Mismatched { at: 8 },
            State::Expired { at: 9 },
        ] {
            assert_eq!(State::decode(&state.encode()), Some(state));
        }
    }

    #[test]
    fn only_the_shown_fields_are_kept() {
        let body = br#"{"amount": 120, "payee": {"iban": "DE89"}, "secret": "x"}"#;
        let fields = shown_fields(
            body,
            &["$.amount".into(), "$.payee.iban".into(), "$.nope".into()],
        );
        assert_eq!(fields.len(), 2);
        assert_eq!(fields["$.amount"], json!(120));
        assert!(shown_fields(b"not json", &["$.amount".into()]).is_empty());
    }
}
