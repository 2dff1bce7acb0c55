//! The `sms` section: Twilio account, auth token (from the environment or an owner-only file,
//! never from the YAML), sender, base URL, timeout and code lifetime.

use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::Loader;
use crate::config::raw;
use crate::config::units::parse_duration;
use crate::sms::SmsSettings;
use crate::sms::twilio::{self, Sender, Twilio};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CODE_TTL: Duration = Duration::from_secs(5 * 60);
/// NIST SP 800-63B §5.1.3.2: an out-of-band secret should be valid for at most 10 minutes.
const MAX_CODE_TTL: Duration = Duration::from_secs(10 * 60);

impl Loader<'_> {
    pub(super) fn sms(&mut self, raw: &Spanned<raw::Sms>) -> Option<Arc<SmsSettings>> {
        let Some(spec) = &raw.value.twilio else {
            self.at(
                &raw.referenced,
                "sms: name a provider: `sms: { twilio: { account_sid, auth_token_env, from } }`",
            );
            return None;
        };
        let code_ttl = match &raw.value.code_ttl {
            None => DEFAULT_CODE_TTL,
            Some(ttl) => match parse_duration(&ttl.value.0) {
                Ok(d) if (Duration::from_secs(60)..=MAX_CODE_TTL).contains(&d) => d,
                Ok(_) => {
                    self.at(
                        &ttl.referenced,
                        "sms.code_ttl: must be between 1m and 10m (NIST SP 800-63B allows at \
                         most 10 minutes for a texted code)",
                    );
                    DEFAULT_CODE_TTL
                }
                Err(message) => {
                    self.at(&ttl.referenced, format!("sms.code_ttl: {message}"));
                    DEFAULT_CODE_TTL
                }
            },
        };
        let twilio = self.twilio(spec)?;
        Some(Arc::new(SmsSettings { twilio, code_ttl }))
    }

    fn twilio(&mut self, spec: &Spanned<raw::Twilio>) -> Option<Twilio> {
        let t = &spec.value;
        let mut ok = true;
        let sid = &t.account_sid;
        if !twilio::is_sid(&sid.value, "AC") {
            self.at(
                &sid.referenced,
                format!(
                    "sms.twilio.account_sid: `{}` is not a Twilio account SID (AC followed by \
                     32 hex digits)",
                    sid.value
                ),
            );
            ok = false;
        }
        let token = self.auth_token(spec);
        let sender = match (&t.from, &t.messaging_service_sid) {
            (Some(from), None) => {
                if twilio::valid_from(&from.value) {
                    Some(Sender::From(from.value.clone()))
                } else {
                    self.at(
                        &from.referenced,
                        format!(
                            "sms.twilio.from: `{}` is neither an E.164 number (+ and 8 to 15 \
                             digits) nor an alphanumeric sender ID (1 to 11 letters and digits)",
                            from.value
                        ),
                    );
                    None
                }
            }
            (None, Some(service)) => {
                if twilio::is_sid(&service.value, "MG") {
                    Some(Sender::MessagingService(service.value.clone()))
                } else {
                    self.at(
                        &service.referenced,
                        format!(
                            "sms.twilio.messaging_service_sid: `{}` is not a messaging service \
                             SID (MG followed by 32 hex digits)",
                            service.value
                        ),
                    );
                    None
                }
            }
            _ => {
                self.at(
                    &spec.referenced,
                    "sms.twilio: needs exactly one of `from` or `messaging_service_sid`",
                );
                None
            }
        };
        let timeout = match &t.timeout {
            None => DEFAULT_TIMEOUT,
            Some(v) => match parse_duration(&v.value.0) {
                Ok(d) if !d.is_zero() && d <= Duration::from_secs(60) => d,
                Ok(_) => {
                    self.at(
                        &v.referenced,
                        "sms.twilio.timeout: must be between 1ms and 60s",
                    );
                    DEFAULT_TIMEOUT
                }
                Err(message) => {
                    self.at(&v.referenced, format!("sms.twilio.timeout: {message}"));
                    DEFAULT_TIMEOUT
                }
            },
        };
        let base_url = t
            .base_url
            .as_ref()
            .map_or(twilio::DEFAULT_BASE_URL, |b| b.value.as_str());
        let (token, sender) = (token?, sender?);
        if !ok {
            return None;
        }
        match Twilio::new(base_url, &sid.value, &token, sender, timeout) {
            Ok(client) => Some(client),
            Err(message) => {
                let location = t
                    .base_url
                    .as_ref()
                    .map_or(spec.referenced, |b| b.referenced);
                self.at(&location, format!("sms.twilio.base_url: {message}"));
                None
            }
        }
    }

    /// The auth token from exactly one of `auth_token_env` or `auth_token_file`. A file must be
    /// readable by its owner only, like the admin token and master key.
    fn auth_token(&mut self, spec: &Spanned<raw::Twilio>) -> Option<String> {
        let t = &spec.value;
        let token = match (&t.auth_token_env, &t.auth_token_file) {
            (Some(var), None) => match std::env::var(&var.value) {
                Ok(value) if !value.trim().is_empty() => value.trim().to_owned(),
                _ => {
                    self.at(
                        &var.referenced,
                        format!(
                            "sms.twilio.auth_token_env: the environment variable `{}` is not \
                             set (or empty)",
                            var.value
                        ),
                    );
                    return None;
                }
            },
            (None, Some(file)) => {
                let path = self.base.join(&file.value);
                // A rotated token is a new configuration version.
                self.hash_file(&path);
                match crate::secrets::read_private(&path) {
                    Ok(token) => token,
                    Err(message) => {
                        self.at(
                            &file.referenced,
                            format!("sms.twilio.auth_token_file: {message}"),
                        );
                        return None;
                    }
                }
            }
            _ => {
                self.at(
                    &spec.referenced,
                    "sms.twilio: needs exactly one of `auth_token_env` or `auth_token_file` \
                     (the token itself never goes into gateway.yaml)",
                );
                return None;
            }
        };
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            let location = t
                .auth_token_env
                .as_ref()
                .or(t.auth_token_file.as_ref())
                .map_or(spec.referenced, |v| v.referenced);
            self.at(
                &location,
                "sms.twilio: the auth token must be visible ASCII without spaces",
            );
            return None;
        }
        Some(token)
    }
}
