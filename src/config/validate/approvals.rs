//! `approvals:` in `gateway.yaml` (the webhook and the pending limit) and a policy's
//! `approval:` section.

use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::Loader;
use crate::config::{ApprovalRule, ApprovalSettings, NotifySettings, raw};

/// A request waits at most this long for its decision.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Body fields an approver is shown, at most.
const MAX_SHOWN: usize = 16;

impl Loader<'_> {
    pub(super) fn approvals(&mut self, raw: Option<&Spanned<raw::Approvals>>) -> ApprovalSettings {
        let mut settings = ApprovalSettings::default();
        let Some(raw) = raw else { return settings };
        if let Some(max) = &raw.value.max_pending {
            if (1..=100).contains(&max.value) {
                settings.max_pending = max.value;
            } else {
                self.at(
                    &max.referenced,
                    format!(
                        "approvals.max_pending: {} is not between 1 and 100",
                        max.value
                    ),
                );
            }
        }
        settings.notify = raw.value.notify.as_ref().and_then(|n| self.notify(n));
        settings
    }

    fn notify(&mut self, spec: &Spanned<raw::Notify>) -> Option<Arc<NotifySettings>> {
        let n = &spec.value;
        let url: http::Uri = match n.url.value.parse() {
            Ok(url) => url,
            Err(e) => {
                self.at(
                    &n.url.referenced,
                    format!("approvals.notify.url: `{}` is not a URL: {e}", n.url.value),
                );
                return None;
            }
        };
        let loopback = url.host().is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        match url.scheme_str() {
            Some("https") => {}
            Some("http") if loopback => {}
            _ => {
                self.at(
                    &n.url.referenced,
                    "approvals.notify.url: must be https:// (http:// only to loopback, for a local relay)",
                );
                return None;
            }
        }
        let path = self.base.join(&n.secret_file.value);
        self.hash_file(&path);
        let secret = match crate::secrets::read_private(&path) {
            Ok(secret) if secret.len() >= 16 => secret,
            Ok(_) => {
                self.at(
                    &n.secret_file.referenced,
                    "approvals.notify.secret_file: the key must be at least 16 characters",
                );
                return None;
            }
            Err(message) => {
                self.at(
                    &n.secret_file.referenced,
                    format!("approvals.notify.secret_file: {message}"),
                );
                return None;
            }
        };
        let tls = match crate::tls::client_config(None) {
            Ok(tls) => tls,
            Err(message) => {
                self.at(&spec.referenced, format!("approvals.notify: {message}"));
                return None;
            }
        };
        Some(Arc::new(NotifySettings {
            url,
            secret: secret.into_bytes(),
            tls,
        }))
    }
}

/// A policy's `approval:`, checked; errors go to `at`.
pub(super) fn rule(
    raw: &Spanned<raw::Approval>,
    duration: &mut dyn FnMut(&Spanned<raw::Scalar>) -> Duration,
    at: &mut dyn FnMut(&serde_saphyr::Location, String),
) -> ApprovalRule {
    let a = &raw.value;
    let roles: Vec<String> = a
        .approvers
        .value
        .roles
        .iter()
        .map(|r| r.value.clone())
        .collect();
    if roles.is_empty() {
        at(
            &a.approvers.referenced,
            "approval.approvers.roles: name at least one role whose consumers may approve".into(),
        );
    }
    let ttl = a.ttl.as_ref().map_or(Duration::from_secs(300), |t| {
        let ttl = duration(t);
        if ttl > MAX_TTL {
            at(&t.referenced, "approval.ttl: at most 24h".into());
        }
        ttl
    });
    if a.show.len() > MAX_SHOWN {
        at(
            &raw.referenced,
            format!("approval.show: at most {MAX_SHOWN} fields"),
        );
    }
    let show = a
        .show
        .iter()
        .filter_map(|path| match crate::json_path::parse(&path.value) {
            Ok(_) => Some(path.value.clone()),
            Err(message) => {
                at(
                    &path.referenced,
                    format!("approval.show: `{}`: {message}", path.value),
                );
                None
            }
        })
        .collect();
    ApprovalRule {
        roles,
        self_approval: a.self_approval.as_ref().is_some_and(|s| s.value),
        ttl,
        show,
    }
}
