//! The `self_service` section and the built-in policies of the gateway's own endpoints under
//! its prefix: the security page (no credentials) and the enrolment API (an API key; codes
//! are checked per call by `selfservice`).

use std::path::PathBuf;
use std::sync::Arc;

use serde_saphyr::Spanned;

use super::Loader;
use crate::config::{Factors, Policy, Requirement, SelfServiceSpec, StepUp, raw};

impl Loader<'_> {
    pub(super) fn self_service(
        &mut self,
        raw: Option<&Spanned<raw::SelfService>>,
        sms: bool,
    ) -> SelfServiceSpec {
        let mut prefix = SelfServiceSpec::DEFAULT_PREFIX.to_owned();
        let mut enabled = true;
        let mut title = "stepgate".to_owned();
        if let Some(raw) = raw {
            if let Some(t) = &raw.value.title {
                match super::words_for_people(&t.value, 80) {
                    Ok(text) => title = text,
                    Err(message) => {
                        self.at(&t.referenced, format!("self_service.title: {message}"))
                    }
                }
            }
            if let Some(p) = &raw.value.prefix {
                match check_prefix(&p.value) {
                    Ok(canonical) => prefix = canonical,
                    Err(message) => self.at(
                        &p.referenced,
                        format!("self_service.prefix: `{}` {message}", p.value),
                    ),
                }
            }
            if let Some(e) = &raw.value.enabled {
                enabled = e.value;
            }
        }
        SelfServiceSpec {
            step_up_path: format!("{prefix}/step-up"),
            prefix,
            enabled,
            title,
            page_policy: Arc::new(builtin_policy(
                "stepgate/self-service-page",
                Requirement::Off,
                sms,
            )),
            api_policy: Arc::new(builtin_policy(
                "stepgate/self-service",
                Requirement::Required,
                sms,
            )),
        }
    }
}

/// A prefix must be a canonical absolute path of whole segments, not `/` itself, without a
/// trailing `/`.
fn check_prefix(value: &str) -> Result<String, &'static str> {
    if !value.starts_with('/') || value == "/" {
        return Err("must be a path below `/`, such as /_stepgate");
    }
    let trimmed = value.trim_end_matches('/');
    match crate::path::normalize(trimmed) {
        Ok(canonical) if canonical == trimmed && !trimmed.is_empty() => Ok(trimmed.to_owned()),
        _ => Err("must be a plain path (no `.` segments, `//`, escapes or special characters)"),
    }
}

/// The built-in policy of the self-service routes. Its name holds a `/`, which no policy file
/// stem can, so its failure counters never mix with a configured policy's. The failure
/// settings are the defaults (5 per consumer, 50 per IP in 15 minutes, then a 15-minute ban),
/// inside NIST SP 800-63B's ceiling. No step-up tokens: `{prefix}/step-up` is for those.
fn builtin_policy(name: &str, api_key: Requirement, sms: bool) -> Policy {
    let factors = Factors {
        totp: true,
        recovery_code: true,
        sms,
    };
    Policy {
        file: PathBuf::from("(built-in)"),
        api_key,
        // Codes are checked by the endpoints themselves: some calls need one only when a
        // factor exists, confirmations check the new factor's code.
        second_factor: Requirement::Off,
        factors,
        step_up: StepUp {
            ttl: std::time::Duration::ZERO,
            ..Policy::public(name).step_up
        },
        challenge_methods: Arc::from(factors.names().join(" ")),
        // Everything else (roles, failures, rollout) as a policy that asks for nothing.
        ..Policy::public(name)
    }
}

#[cfg(test)]
mod tests {
    use super::check_prefix;

    #[test]
    fn prefixes_are_plain_paths() {
        assert_eq!(check_prefix("/_stepgate").unwrap(), "/_stepgate");
        assert_eq!(check_prefix("/me/security/").unwrap(), "/me/security");
        for bad in ["", "/", "me", "/a//b", "/a/../b", "/a%2Fb", "/a b", "//"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
