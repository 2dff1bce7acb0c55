//! A gateway for the self-service and SMS tests (issue 7): the two-factor harness
//! ([`TwoFactor`], manual clock at [`T0`], recording upstream, real SQLite) on a configuration
//! with SMS pointed at a [`FakeTwilio`] (auth token in an owner-only file) and routes for
//! every kind of policy:
//!
//! | path | policy | factors |
//! |---|---|---|
//! | `/totp` | `totp` | totp, recovery_code |
//! | `/totp-only` | `totp-only` | totp |
//! | `/sms` | `sms` | sms (only with SMS on) |
//! | `/any` | `any` | totp, recovery_code, sms (only with SMS on) |
//! | `/grace` | `grace` | totp, recovery_code; grace until 2027-01-31 |
//! | `/admins` | `admins` | totp, recovery_code; only role `admin` |
//! | `/keyed` | `key-only` | API key only |

use std::ops::Deref;

use serde_json::{Value, json};

use crate::twilio::FakeTwilio;
use crate::*;

pub const PHONE: &str = "+447700900123";
pub const PHONE_MASKED: &str = "+44•••••••123";
pub const FROM: &str = "+15005550006";

const TEMPLATE: &str = r#"
listen: 127.0.0.1:0
admin: { listen: "127.0.0.1:0" }
data_dir: "${data_dir}"
${sms}
${self_service}
upstreams:
  app: { url: "${app}" }
routes:
  - { name: totp, match: { path: /totp }, upstream: app, policy: totp }
  - { name: totp-only, match: { path: /totp-only }, upstream: app, policy: totp-only }
  - { name: grace, match: { path: /grace }, upstream: app, policy: grace }
  - { name: admins, match: { path: /admins }, upstream: app, policy: admins }
  - { name: keyed, match: { path: /keyed }, upstream: app, policy: key-only }
  - { name: open, match: { path: /open }, upstream: app, policy: public }
${sms_routes}
"#;

const SMS_ROUTES: &str = "  - { name: sms, match: { path: /sms }, upstream: app, policy: sms }
  - { name: any, match: { path: /any }, upstream: app, policy: any }";

/// How to start an [`Ss`].
pub struct Options {
    /// SMS configured (against a fake Twilio).
    pub sms: bool,
    /// The `self_service:` line, if any.
    pub self_service: String,
    /// `sms.twilio.timeout`.
    pub twilio_timeout: &'static str,
    /// `base_url` override (e.g. a closed port or a black hole); default: the fake.
    pub base_url: Option<String>,
    /// Send through a messaging service (`messaging_service_sid`) instead of `from`.
    pub messaging_service: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sms: true,
            self_service: String::new(),
            twilio_timeout: "5s",
            base_url: None,
            messaging_service: None,
        }
    }
}

pub struct Ss {
    pub t: TwoFactor,
    pub twilio: FakeTwilio,
    pub prefix: String,
    _secrets: tempfile::TempDir,
}

impl Deref for Ss {
    type Target = TwoFactor;
    fn deref(&self) -> &TwoFactor {
        &self.t
    }
}

/// The policy files of [`TEMPLATE`].
pub fn policies(sms: bool) -> Vec<(String, String)> {
    let mut files = vec![
        ("policies/public.yaml", DEFAULT_POLICY.to_string()),
        ("policies/key-only.yaml", API_KEY_POLICY.to_string()),
        (
            "policies/totp.yaml",
            "api_key: required\nsecond_factor: required\nfactors: [totp, recovery_code]\n".into(),
        ),
        (
            "policies/totp-only.yaml",
            "api_key: required\nsecond_factor: required\nfactors: [totp]\n".into(),
        ),
        (
            "policies/grace.yaml",
            "api_key: required\nsecond_factor: required\nfactors: [totp, recovery_code]\nrollout: { grace_until: 2027-01-31 }\n".into(),
        ),
        (
            "policies/admins.yaml",
            "api_key: required\nsecond_factor: required\nroles: { only: [admin] }\n".into(),
        ),
    ];
    if sms {
        files.push((
            "policies/sms.yaml",
            "api_key: required\nsecond_factor: required\nfactors: [sms]\n".into(),
        ));
        files.push((
            "policies/any.yaml",
            "api_key: required\nsecond_factor: required\nfactors: [totp, recovery_code, sms]\n"
                .into(),
        ));
    }
    files.into_iter().map(|(a, b)| (a.to_string(), b)).collect()
}

impl Ss {
    pub async fn start() -> Ss {
        Ss::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Ss {
        let twilio = FakeTwilio::start().await;
        let secrets = tempfile::tempdir().unwrap();
        let token_file = secrets.path().join("twilio.token");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&token_file)
                .unwrap();
            std::io::Write::write_all(&mut f, format!("{}\n", twilio.auth_token).as_bytes())
                .unwrap();
        }
        let sender = match &options.messaging_service {
            Some(sid) => format!("messaging_service_sid: {sid}"),
            None => format!("from: \"{FROM}\""),
        };
        let sms = if options.sms {
            format!(
                "sms:\n  twilio:\n    account_sid: {}\n    auth_token_file: \"{}\"\n    {sender}\n    base_url: \"{}\"\n    timeout: {}\n  code_ttl: 5m\n",
                twilio.account_sid,
                path_str(&token_file),
                options
                    .base_url
                    .clone()
                    .unwrap_or_else(|| twilio.base_url()),
                options.twilio_timeout,
            )
        } else {
            String::new()
        };
        let template = TEMPLATE
            .replace("${sms}", &sms)
            .replace("${self_service}", &options.self_service)
            .replace("${sms_routes}", if options.sms { SMS_ROUTES } else { "" });
        let t = TwoFactor::start_custom(CustomConfig {
            template,
            policies: policies(options.sms),
        })
        .await;
        let prefix = stepgate::config::load(&t.gw.config_path())
            .map(|s| s.self_service.prefix.clone())
            .unwrap();
        Ss {
            t,
            twilio,
            prefix,
            _secrets: secrets,
        }
    }

    /// `{prefix}{rest}`.
    pub fn p(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// A call under the prefix with the key, an optional `X-OTP` and an optional JSON body.
    pub async fn api(
        &self,
        method: &str,
        rest: &str,
        key: &str,
        otp: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut headers = vec![("x-api-key", key)];
        if let Some(otp) = otp {
            headers.push(("x-otp", otp));
        }
        self.raw(method, &self.p(rest), &headers, body.map(|b| b.to_string()))
            .await
    }

    /// Any request with headers and an optional JSON body (sent with its content type).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Resp {
        let mut b = req(method, path, "api.example.com");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let body = match body {
            Some(text) => {
                b = b.header("content-type", "application/json");
                full(text)
            }
            None => empty(),
        };
        send_http1(self.addr(), b.body(body).unwrap()).await
    }

    /// `GET {prefix}/2fa` (200).
    pub async fn status(&self, key: &str) -> Value {
        let r = self.api("GET", "/2fa", key, None, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// TOTP enrolled through the self-service API (with `otp` as the existing factor's code
    /// when there is one), confirmed with the current code; the clock then moves one period.
    pub async fn enrol_totp(&self, key: &str, otp: Option<&str>) -> Enrolled {
        let r = self.api("POST", "/2fa/totp", key, otp, None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let secret = r.json()["secret"].as_str().unwrap().to_string();
        let code = totp_at(&secret, self.now());
        let r = self.confirm_totp(key, Some(&code)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let recovery_codes = strings(&r.json()["recovery_codes"]);
        assert_eq!(recovery_codes.len(), 10);
        self.advance(30);
        Enrolled {
            secret,
            algorithm: "SHA1",
            digits: 6,
            period: 30,
            recovery_codes,
        }
    }

    /// `POST {prefix}/2fa/totp/confirm` with `code` in `X-OTP`.
    pub async fn confirm_totp(&self, key: &str, code: Option<&str>) -> Resp {
        self.api("POST", "/2fa/totp/confirm", key, code, None).await
    }

    /// `POST {prefix}/2fa/sms/confirm` with `code`, whatever the answer.
    pub async fn confirm_sms(&self, key: &str, code: &str) -> Resp {
        self.api("POST", "/2fa/sms/confirm", key, Some(code), None)
            .await
    }

    /// `POST {prefix}/2fa/sms` for `phone`, whatever the answer.
    pub async fn start_sms(&self, key: &str, otp: Option<&str>, phone: &str) -> Resp {
        self.api("POST", "/2fa/sms", key, otp, Some(json!({"phone": phone})))
            .await
    }

    /// `POST {prefix}/2fa/sms` for `phone`, answered 202 with one verification text sent.
    pub async fn begin_sms(&self, key: &str, otp: Option<&str>, phone: &str) -> Resp {
        let sent = self.twilio.messages().len();
        let r = self.start_sms(key, otp, phone).await;
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(self.twilio.messages().len(), sent + 1, "one text");
        r
    }

    /// SMS enrolled through the self-service API to `phone`; returns the confirm answer. The
    /// clock then moves past the send interval, so the next text is allowed.
    pub async fn enrol_sms(&self, key: &str, otp: Option<&str>, phone: &str) -> Value {
        self.begin_sms(key, otp, phone).await;
        let code = self.twilio.last_code();
        let r = self.confirm_sms(key, &code).await;
        assert_eq!(r.status, 200, "{}", r.text());
        self.advance(31);
        r.json()
    }

    /// `POST {prefix}/sms/send` (202) and the code texted.
    pub async fn login_code(&self, key: &str) -> String {
        let r = self.api("POST", "/sms/send", key, None, None).await;
        assert_eq!(r.status, 202, "{}", r.text());
        self.twilio.last_code()
    }
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}
