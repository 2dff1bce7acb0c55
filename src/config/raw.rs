//! serde structs that mirror the YAML files one to one. No logic lives here: `validate` turns
//! them into a [`super::Snapshot`]. `Spanned` fields keep their `line:column` so a value that
//! parses but makes no sense can be pointed at.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_saphyr::Spanned;

/// A scalar read as text whatever its YAML type (`30s`, `4096`), so that durations and sizes get
/// our own error messages rather than serde's "invalid type".
#[derive(Debug, Clone)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or a string such as 30s or 10MiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    pub listen: Spanned<String>,
    #[serde(default)]
    pub tls: Option<Tls>,
    #[serde(default)]
    pub policies_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub data_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub admin: Option<Admin>,
    #[serde(default)]
    pub store: Option<StoreSpec>,
    #[serde(default)]
    pub audit: Option<Audit>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub self_service: Option<Spanned<SelfService>>,
    #[serde(default)]
    pub sms: Option<Spanned<Sms>>,
    #[serde(default)]
    pub approvals: Option<Spanned<Approvals>>,
    pub upstreams: BTreeMap<String, Spanned<Upstream>>,
    pub routes: Vec<Spanned<Route>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: Spanned<String>,
}

/// `self_service: { prefix, enabled }`: the consumers' own security page and enrolment API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfService {
    pub prefix: Option<Spanned<String>>,
    pub enabled: Option<Spanned<bool>>,
    /// The gateway's name on the security page (the operator's, e.g. "Acme API").
    pub title: Option<Spanned<String>>,
}

/// `approvals: { notify: {...}, max_pending }`: how requests for approval are announced.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approvals {
    pub notify: Option<Spanned<Notify>>,
    pub max_pending: Option<Spanned<u32>>,
}

/// A webhook told of each request for approval, signed with the key in `secret_file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    pub url: Spanned<String>,
    pub secret_file: Spanned<String>,
}

/// A policy's `approval:`: who may approve a request in place of the caller's own code.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub approvers: Spanned<Approvers>,
    #[serde(rename = "self", default)]
    pub self_approval: Option<Spanned<bool>>,
    pub ttl: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub show: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approvers {
    pub roles: Vec<Spanned<String>>,
}

/// `sms: { twilio: {...}, code_ttl }`: the SMS factor; absent means off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sms {
    pub twilio: Option<Spanned<Twilio>>,
    pub code_ttl: Option<Spanned<Scalar>>,
}

/// Twilio Programmable Messaging. The auth token is never written in this file: it comes from
/// an environment variable or a file readable by the owner only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Twilio {
    pub account_sid: Spanned<String>,
    pub auth_token_env: Option<Spanned<String>>,
    pub auth_token_file: Option<Spanned<String>>,
    pub from: Option<Spanned<String>>,
    pub messaging_service_sid: Option<Spanned<String>>,
    pub base_url: Option<Spanned<String>>,
    pub timeout: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// `stdout` or `file`.
    pub sink: Spanned<String>,
    pub path: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    pub sqlite: Option<Sqlite>,
    pub redis: Option<Spanned<Redis>>,
}

/// `store: { redis: {...} }`: several nodes sharing one Redis. The password is never written
/// here: it comes from an environment variable or an owner-only file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    pub url: Spanned<String>,
    pub key_prefix: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<Scalar>>,
    pub command_timeout: Option<Spanned<Scalar>>,
    pub stale_for: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sqlite {
    pub path: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub header_bytes: Option<Spanned<Scalar>>,
    pub header_count: Option<Spanned<Scalar>>,
    pub uri_bytes: Option<Spanned<Scalar>>,
    pub body_bytes: Option<Spanned<Scalar>>,
    pub header_read_timeout: Option<Spanned<Scalar>>,
    pub idle_timeout: Option<Spanned<Scalar>>,
    pub max_connections: Option<Spanned<Scalar>>,
    pub workers: Option<Spanned<Scalar>>,
    pub drain_timeout: Option<Spanned<Scalar>>,
    pub headers_with_underscores: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub url: Option<Spanned<String>>,
    pub echo: Option<Echo>,
    pub connect_timeout: Option<Spanned<Scalar>>,
    pub timeout: Option<Spanned<Scalar>>,
    pub idle_timeout: Option<Spanned<Scalar>>,
    pub retries: Option<Spanned<u32>>,
    pub ca_file: Option<Spanned<String>>,
    /// `prior_knowledge`: HTTP/2 from the first byte over plain TCP (h2c), as most gRPC
    /// servers without TLS expect.
    pub http2: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Echo {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: Spanned<String>,
    #[serde(rename = "match")]
    pub matcher: Match,
    pub upstream: Spanned<String>,
    pub policy: Spanned<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub body_bytes: Option<Spanned<Scalar>>,
    /// WebSocket upgrades are tunnelled on this route (refused everywhere else).
    pub websocket: Option<Spanned<bool>>,
    /// What becomes of a tunnel when the step-up token it was opened with expires: `close`
    /// (the default) or `keep`.
    pub on_token_expiry: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub host: Option<Spanned<String>>,
    pub path: Spanned<String>,
    pub methods: Option<Vec<Spanned<String>>>,
}

/// `policies/<name>.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What the policy protects, in words for consumers (shown on the security page).
    #[serde(default)]
    pub description: Option<Spanned<String>>,
    pub api_key: Spanned<Requirement>,
    pub second_factor: Spanned<Requirement>,
    #[serde(default)]
    pub factors: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub step_up: Option<StepUp>,
    #[serde(default)]
    pub roles: Option<Roles>,
    #[serde(default)]
    pub failures: Option<Failures>,
    #[serde(default)]
    pub rollout: Option<Rollout>,
    #[serde(default)]
    pub approval: Option<Spanned<Approval>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepUp {
    pub ttl: Option<Spanned<Scalar>>,
    pub scope: Option<Spanned<String>>,
    /// A token passes this policy only if its code was presented at most this long ago.
    pub max_age: Option<Spanned<Scalar>>,
    /// `client_ip`: a token passes only from the address (prefix) it was earned from.
    pub bind: Option<Spanned<String>>,
    pub bind_prefix: Option<BindPrefix>,
    /// Tokens this policy issues work this many times.
    pub uses: Option<Spanned<u32>>,
}

/// The prefix lengths `bind: client_ip` compares addresses by.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindPrefix {
    pub ipv4: Option<Spanned<u8>>,
    pub ipv6: Option<Spanned<u8>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    #[serde(default)]
    pub only: Vec<String>,
    #[serde(default)]
    pub except: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failures {
    pub per_consumer: Option<Rate>,
    pub per_ip: Option<Rate>,
    pub ban: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub max: Spanned<u32>,
    pub window: Spanned<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub mode: Option<Spanned<String>>,
    pub grace_until: Option<Spanned<Scalar>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requirement {
    Required,
    /// `second_factor` only: a code on unsafe methods (POST, PUT, PATCH, DELETE…), the key
    /// alone on the safe ones (GET, HEAD, OPTIONS, TRACE).
    Writes,
    Off,
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Requirement::Required => "required",
            Requirement::Writes => "writes",
            Requirement::Off => "off",
        })
    }
}
