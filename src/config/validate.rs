//! Turns the raw YAML structs into a [`Snapshot`], collecting every error with its location
//! instead of stopping at the first, so `stepgate check` shows an operator everything at once.
//! The `sms` and `self_service` sections are in their own files.

mod approvals;
mod redis;
mod self_service;
mod sms;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::de::DeserializeOwned;
use serde_saphyr::{Location, Spanned};
use sha2::{Digest, Sha256};

use super::raw::{self, Requirement, Scalar};
use super::units::{parse_duration, parse_size};
use super::{
    Bind, Config, ConfigError, ConfigErrors, Factors, Failures, HttpSettings, HttpSpec, Limits,
    OnTokenExpiry, Policy, Rate, Roles, Rollout, RolloutMode, RouteSpec, Scope, SelfServiceSpec,
    StepUp, StoreSettings, Target, Underscores, UpstreamSpec,
};
use crate::path;
use crate::tls;
use std::num::NonZeroU32;

/// More worker threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

/// Reads and validates `gateway.yaml` at `path` and the policies it points at.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let mut errors = Errors::default();
    let snapshot = Loader {
        file: path,
        base: path.parent().unwrap_or(Path::new(".")),
        errors: &mut errors,
        digest: Sha256::new(),
        extra_files: Vec::new(),
        broken_upstreams: BTreeSet::new(),
        broken_policies: BTreeSet::new(),
    }
    .load();
    match snapshot {
        Some(snapshot) if errors.0.is_empty() => Ok(snapshot),
        _ => Err(ConfigErrors(errors.0)),
    }
}

#[derive(Default)]
struct Errors(Vec<ConfigError>);

struct Loader<'a> {
    file: &'a Path,
    base: &'a Path,
    errors: &'a mut Errors,
    /// Over every file read, in order: the snapshot's version.
    digest: Sha256,
    extra_files: Vec<PathBuf>,
    /// Upstreams and policies that are defined but have errors of their own (reported where
    /// they are): a route naming one is not told again that it is unknown.
    broken_upstreams: BTreeSet<String>,
    broken_policies: BTreeSet<String>,
}

impl Loader<'_> {
    fn at(&mut self, location: &Location, message: impl Into<String>) {
        self.errors.0.push(ConfigError::new(
            self.file,
            location.line(),
            location.column(),
            message,
        ));
    }

    fn load(&mut self) -> Option<Config> {
        let raw: raw::Gateway = match self.parse_file(self.file) {
            Ok(raw) => raw,
            Err(error) => {
                self.errors.0.push(error);
                return None;
            }
        };

        let policies_dir = self.base.join(
            raw.policies_dir
                .as_ref()
                .map_or("policies", |d| d.value.as_str()),
        );
        // SMS first: whether policies may list `sms` depends on it. A broken `sms` section
        // still counts as present, so its own errors are not repeated for every policy.
        let sms = raw.sms.as_ref().and_then(|s| self.sms(s));
        let approvals = self.approvals(raw.approvals.as_ref());
        let policies = self.policies(raw.policies_dir.as_ref(), raw.sms.is_some());
        let self_service = self.self_service(raw.self_service.as_ref(), sms.is_some());
        let listen = self.address("listen", &raw.listen);
        let admin = raw
            .admin
            .as_ref()
            .map(|admin| self.address("admin.listen", &admin.listen));
        let audit_sink =
            raw.audit
                .as_ref()
                .and_then(|audit| match (audit.sink.value.as_str(), &audit.path) {
                    ("stdout", None) => Some(crate::audit::Sink::Stdout),
                    ("file", Some(path)) => {
                        Some(crate::audit::Sink::File(self.base.join(&path.value)))
                    }
                    ("file", None) => {
                        self.at(&audit.sink.referenced, "audit: `sink: file` needs a `path`");
                        None
                    }
                    ("stdout", Some(path)) => {
                        self.at(&path.referenced, "audit.path: only with `sink: file`");
                        None
                    }
                    (other, _) => {
                        self.at(
                            &audit.sink.referenced,
                            format!("audit.sink: `{other}` is not `stdout` or `file`"),
                        );
                        None
                    }
                });
        let trusted_proxies = raw
            .trusted_proxies
            .iter()
            .filter_map(|p| {
                let parsed = p
                    .value
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| p.value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                if parsed.is_err() {
                    self.at(
                        &p.referenced,
                        format!(
                            "trusted_proxies: `{}` is not an IP address or CIDR block",
                            p.value
                        ),
                    );
                }
                parsed.ok()
            })
            .collect();
        let data_dir = self
            .base
            .join(raw.data_dir.as_ref().map_or("data", |d| d.value.as_str()));
        let default_store = StoreSettings::Sqlite {
            path: data_dir.join("stepgate.db"),
        };
        let store = match raw.store.as_ref().map(|s| (&s.sqlite, &s.redis)) {
            Some((Some(sqlite), None)) => StoreSettings::Sqlite {
                path: self.base.join(&sqlite.path.value),
            },
            Some((None, Some(redis))) => self.redis(redis).unwrap_or(default_store),
            Some((Some(_), Some(redis))) => {
                self.at(
                    &redis.referenced,
                    "store: name one backend, `sqlite` or `redis`, not both",
                );
                default_store
            }
            Some((None, None)) => {
                self.errors.0.push(ConfigError::new(
                    self.file,
                    0,
                    0,
                    "store: name a backend, e.g. `store: { sqlite: { path: data/stepgate.db } }`",
                ));
                default_store
            }
            None => default_store,
        };
        let tls = raw.tls.as_ref().and_then(|t| self.tls(t));
        let limits = self.limits(&raw.limits);
        let upstreams: BTreeMap<String, UpstreamSpec> = raw
            .upstreams
            .iter()
            .filter_map(|(name, spec)| match self.upstream(name, spec) {
                Some(upstream) => Some((name.clone(), upstream)),
                None => {
                    self.broken_upstreams.insert(name.clone());
                    None
                }
            })
            .collect();
        let routes = self.routes(&raw.routes, &upstreams, &policies, &limits, &self_service);

        let digest = std::mem::replace(&mut self.digest, Sha256::new()).finalize();
        Some(Config {
            version: crate::secrets::hex(&digest[..6]),
            extra_files: std::mem::take(&mut self.extra_files),
            policies_dir,
            source: self.file.to_path_buf(),
            listen: listen?,
            tls,
            limits,
            admin: match admin {
                Some(addr) => Some(addr?),
                None => None,
            },
            data_dir,
            store,
            trusted_proxies,
            audit_sink,
            upstreams,
            policies,
            routes,
            self_service,
            sms,
            approvals,
        })
    }

    fn address(&mut self, field: &str, listen: &Spanned<String>) -> Option<SocketAddr> {
        match listen.value.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.at(
                    &listen.referenced,
                    format!(
                        "{field}: `{}` is not an address:port such as 127.0.0.1:8080",
                        listen.value
                    ),
                );
                None
            }
        }
    }

    fn tls(&mut self, spec: &raw::Tls) -> Option<Arc<rustls::ServerConfig>> {
        let cert = self.base.join(&spec.cert.value);
        let key = self.base.join(&spec.key.value);
        // A rotated certificate is a new version even when the YAML is unchanged.
        self.hash_file(&cert);
        self.hash_file(&key);
        match tls::server_config(&cert, &key) {
            Ok(config) => Some(config),
            Err(tls::TlsFileError::Cert(message)) => {
                self.at(&spec.cert.referenced, format!("tls.cert: {message}"));
                None
            }
            Err(tls::TlsFileError::Key(message)) => {
                self.at(&spec.key.referenced, format!("tls.key: {message}"));
                None
            }
        }
    }

    fn limits(&mut self, raw: &raw::Limits) -> Limits {
        let d = Limits::default();
        let mut workers = self.size_or("limits.workers", &raw.workers, d.workers);
        if let Some(value) = &raw.workers
            && workers > MAX_WORKERS
        {
            self.at(
                &value.referenced,
                format!("limits.workers: {workers} is more than {MAX_WORKERS} threads"),
            );
            workers = d.workers;
        }
        Limits {
            header_bytes: self.size_or("limits.header_bytes", &raw.header_bytes, d.header_bytes),
            header_count: self.size_or("limits.header_count", &raw.header_count, d.header_count),
            uri_bytes: self.size_or("limits.uri_bytes", &raw.uri_bytes, d.uri_bytes),
            body_bytes: self.size_or("limits.body_bytes", &raw.body_bytes, d.body_bytes),
            header_read_timeout: self.duration_or(
                "limits.header_read_timeout",
                &raw.header_read_timeout,
                d.header_read_timeout,
            ),
            idle_timeout: self.duration_or(
                "limits.idle_timeout",
                &raw.idle_timeout,
                d.idle_timeout,
            ),
            max_connections: self.size_or(
                "limits.max_connections",
                &raw.max_connections,
                d.max_connections,
            ),
            workers,
            drain_timeout: self.duration_or(
                "limits.drain_timeout",
                &raw.drain_timeout,
                d.drain_timeout,
            ),
            headers_with_underscores: match &raw.headers_with_underscores {
                None => d.headers_with_underscores,
                Some(value) => match value.value.as_str() {
                    "drop" => Underscores::Drop,
                    "reject" => Underscores::Reject,
                    "allow" => Underscores::Allow,
                    other => {
                        self.at(
                            &value.referenced,
                            format!(
                                "limits.headers_with_underscores: `{other}` is not drop, reject \
                                 or allow"
                            ),
                        );
                        d.headers_with_underscores
                    }
                },
            },
        }
    }

    /// A positive size, or `default` when absent. An invalid value is reported and the default
    /// used so that validation can go on to find further errors.
    fn size_or<T: TryFrom<u64> + Copy>(
        &mut self,
        field: &str,
        value: &Option<Spanned<Scalar>>,
        default: T,
    ) -> T {
        let Some(value) = value else { return default };
        match parse_size(&value.value.0) {
            Ok(0) => self.at(
                &value.referenced,
                format!("{field}: must be greater than 0"),
            ),
            Ok(n) => match T::try_from(n) {
                Ok(n) => return n,
                Err(_) => self.at(&value.referenced, format!("{field}: {n} is too large")),
            },
            Err(message) => self.at(&value.referenced, format!("{field}: {message}")),
        }
        default
    }

    fn duration_or(
        &mut self,
        field: &str,
        value: &Option<Spanned<Scalar>>,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match parse_duration(&value.value.0) {
            Ok(d) if d.is_zero() => self.at(
                &value.referenced,
                format!("{field}: must be greater than 0"),
            ),
            Ok(d) => return d,
            Err(message) => self.at(&value.referenced, format!("{field}: {message}")),
        }
        default
    }

    fn upstream(&mut self, name: &str, spec: &Spanned<raw::Upstream>) -> Option<UpstreamSpec> {
        let raw = &spec.value;
        let field = format!("upstreams.{name}");
        match (&raw.url, &raw.echo) {
            (Some(_), Some(_)) | (None, None) => {
                self.at(
                    &spec.referenced,
                    format!("{field}: needs exactly one of `url` or `echo`"),
                );
                None
            }
            (None, Some(_)) => {
                let http_only = [
                    (
                        "connect_timeout",
                        raw.connect_timeout.as_ref().map(|s| &s.referenced),
                    ),
                    ("timeout", raw.timeout.as_ref().map(|s| &s.referenced)),
                    (
                        "idle_timeout",
                        raw.idle_timeout.as_ref().map(|s| &s.referenced),
                    ),
                    ("ca_file", raw.ca_file.as_ref().map(|s| &s.referenced)),
                    ("retries", raw.retries.as_ref().map(|s| &s.referenced)),
                    ("http2", raw.http2.as_ref().map(|s| &s.referenced)),
                ];
                for (key, location) in http_only {
                    if let Some(location) = location {
                        self.at(
                            location,
                            format!("{field}.{key}: only applies to `url` upstreams"),
                        );
                    }
                }
                Some(UpstreamSpec {
                    name: name.to_owned(),
                    target: Target::Echo,
                })
            }
            (Some(url), None) => {
                let d = HttpSettings::default();
                let mut settings = HttpSettings {
                    connect_timeout: self.duration_or(
                        &format!("{field}.connect_timeout"),
                        &raw.connect_timeout,
                        d.connect_timeout,
                    ),
                    timeout: self.duration_or(&format!("{field}.timeout"), &raw.timeout, d.timeout),
                    idle_timeout: self.duration_or(
                        &format!("{field}.idle_timeout"),
                        &raw.idle_timeout,
                        d.idle_timeout,
                    ),
                    retries: raw.retries.as_ref().map_or(d.retries, |r| r.value),
                    ca_file: raw.ca_file.as_ref().map(|f| {
                        let path = self.base.join(&f.value);
                        self.hash_file(&path);
                        path
                    }),
                    prior_knowledge: false,
                };
                let parsed = match parse_url(&url.value) {
                    Ok(parsed) => parsed,
                    Err(message) => {
                        self.at(&url.referenced, format!("{field}.url: {message}"));
                        return None;
                    }
                };
                let (scheme, authority, base_path, h2c) = parsed;
                settings.prior_knowledge = h2c;
                if let Some(http2) = &raw.http2 {
                    match http2.value.as_str() {
                        "prior_knowledge" if scheme == http::uri::Scheme::HTTPS => self.at(
                            &http2.referenced,
                            format!(
                                "{field}.http2: over https, HTTP/2 is negotiated (ALPN) whenever the upstream offers it; `prior_knowledge` is for http:// upstreams"
                            ),
                        ),
                        "prior_knowledge" => settings.prior_knowledge = true,
                        other => self.at(
                            &http2.referenced,
                            format!(
                                "{field}.http2: `{other}` is not a mode: the one mode is `prior_knowledge` (HTTP/2 from the first byte, no TLS); leave it out to speak HTTP/1.1 to http:// upstreams"
                            ),
                        ),
                    }
                }
                let tls = match tls::client_config(settings.ca_file.as_deref()) {
                    Ok(tls) => tls,
                    Err(message) => {
                        let location = raw
                            .ca_file
                            .as_ref()
                            .map_or(spec.referenced, |f| f.referenced);
                        self.at(&location, format!("{field}.ca_file: {message}"));
                        return None;
                    }
                };
                Some(UpstreamSpec {
                    name: name.to_owned(),
                    target: Target::Http(Box::new(HttpSpec {
                        url: url.value.clone(),
                        scheme,
                        authority,
                        base_path,
                        settings,
                        tls,
                    })),
                })
            }
        }
    }

    fn policies(
        &mut self,
        dir: Option<&Spanned<String>>,
        sms_configured: bool,
    ) -> BTreeMap<String, Arc<Policy>> {
        let path = self.base.join(dir.map_or("policies", |d| d.value.as_str()));
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(error) => {
                let message = format!("policies_dir: cannot read {}: {error}", path.display());
                match dir {
                    Some(dir) => self.at(&dir.referenced, message),
                    None => self
                        .errors
                        .0
                        .push(ConfigError::new(self.file, 0, 0, message)),
                }
                return BTreeMap::new();
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect();
        files.sort();

        let mut policies = BTreeMap::new();
        for file in files {
            let Some(name) = file.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            if policies.contains_key(&name) {
                self.errors.0.push(ConfigError::new(
                    &file,
                    0,
                    0,
                    format!("a second file defines policy `{name}`"),
                ));
                continue;
            }
            match self.policy(&file, name.clone(), sms_configured) {
                Some(policy) => {
                    policies.insert(name, Arc::new(policy));
                }
                None => {
                    self.broken_policies.insert(name);
                }
            }
        }
        policies
    }

    fn policy(&mut self, file: &Path, name: String, sms_configured: bool) -> Option<Policy> {
        let raw: raw::Policy = match self.parse_file(file) {
            Ok(raw) => raw,
            Err(error) => {
                self.errors.0.push(error);
                return None;
            }
        };
        if raw.api_key.value == Requirement::Writes {
            self.errors.0.push(ConfigError::new(
                file,
                raw.api_key.referenced.line(),
                raw.api_key.referenced.column(),
                "api_key: `writes` applies to second_factor only; api_key is `required` or `off`",
            ));
        }
        if raw.second_factor.value != Requirement::Off && raw.api_key.value == Requirement::Off {
            self.errors.0.push(ConfigError::new(
                file,
                raw.second_factor.referenced.line(),
                raw.second_factor.referenced.column(),
                "second_factor: `required` and `writes` need `api_key: required` (the code is checked against the key's consumer)",
            ));
        }
        let mut e = PolicyErrors {
            file,
            errors: Vec::new(),
        };

        let mut approval_listed = None;
        let factors = match &raw.factors {
            None => Factors {
                totp: true,
                recovery_code: true,
                sms: false,
            },
            Some(list) => {
                let mut factors = Factors {
                    totp: false,
                    recovery_code: false,
                    sms: false,
                };
                for factor in &list.value {
                    match factor.value.as_str() {
                        "approval" => approval_listed = Some(factor.referenced),
                        "totp" => factors.totp = true,
                        "recovery_code" => factors.recovery_code = true,
                        "sms" if sms_configured => factors.sms = true,
                        "sms" => e.at(
                            &factor.referenced,
                            "factors: `sms` needs SMS configured in gateway.yaml \
                             (`sms: { twilio: { ... } }`); it is off by default"
                                .into(),
                        ),
                        other => e.at(
                            &factor.referenced,
                            format!(
                                "factors: unknown factor `{other}` (use totp, recovery_code, sms, approval)"
                            ),
                        ),
                    }
                }
                if factors.names().is_empty()
                    && approval_listed.is_none()
                    && raw.second_factor.value != Requirement::Off
                {
                    e.at(
                        &list.referenced,
                        "factors: a policy that requires a second factor must accept at least one"
                            .into(),
                    );
                }
                factors
            }
        };

        let raw_step_up = raw.step_up.as_ref();
        let ttl = e.duration(
            "step_up.ttl",
            raw_step_up.and_then(|s| s.ttl.as_ref()),
            Duration::from_secs(15 * 60),
            true,
        );
        let failures_raw = raw.failures.as_ref();
        let defaults = Failures::default();
        let per_consumer = e.rate(
            "failures.per_consumer",
            failures_raw.and_then(|f| f.per_consumer.as_ref()),
            defaults.per_consumer,
        );
        let per_ip = e.rate(
            "failures.per_ip",
            failures_raw.and_then(|f| f.per_ip.as_ref()),
            defaults.per_ip,
        );
        let ban = e.duration(
            "failures.ban",
            failures_raw.and_then(|f| f.ban.as_ref()),
            defaults.ban,
            false,
        );
        // NIST SP 800-63B §5.2.2 and OWASP ASVS: at most 100 failed attempts per account.
        let per_hour =
            f64::from(per_consumer.max.get()) * 3600.0 / per_consumer.window.as_secs_f64().max(1.0);
        if let Some(r) = failures_raw.and_then(|f| f.per_consumer.as_ref())
            && per_hour > 100.0
        {
            e.at(
                &r.max.referenced,
                format!(
                    "failures.per_consumer: allows {per_hour:.0} failures per hour; \
                     NIST SP 800-63B and OWASP ASVS allow at most 100"
                ),
            );
        }

        let scope = match raw_step_up.and_then(|s| s.scope.as_ref()) {
            None => Scope::Policy,
            Some(s) => match s.value.as_str() {
                "policy" => Scope::Policy,
                "global" => Scope::Global,
                other => {
                    e.at(
                        &s.referenced,
                        format!("step_up.scope: `{other}` is not `policy` or `global`"),
                    );
                    Scope::Policy
                }
            },
        };

        let max_age = raw_step_up
            .and_then(|s| s.max_age.as_ref())
            .map(|m| e.duration("step_up.max_age", Some(m), Duration::from_secs(60), false));
        let bind = match raw_step_up.and_then(|s| s.bind.as_ref()) {
            None => None,
            Some(b) if b.value == "client_ip" => {
                let prefix = raw_step_up.and_then(|s| s.bind_prefix.as_ref());
                let mut length = |raw: Option<&Spanned<u8>>, default: u8, max: u8, family: &str| {
                    match raw {
                        None => default,
                        Some(p) if (8..=max).contains(&p.value) => p.value,
                        Some(p) => {
                            e.at(
                                &p.referenced,
                                format!("step_up.bind_prefix.{family}: /{} is not between /8 and /{max}", p.value),
                            );
                            default
                        }
                    }
                };
                let ipv4 = length(prefix.and_then(|p| p.ipv4.as_ref()), 32, 32, "ipv4");
                let ipv6 = length(prefix.and_then(|p| p.ipv6.as_ref()), 64, 128, "ipv6");
                Some(Bind { ipv4, ipv6 })
            }
            Some(b) => {
                e.at(
                    &b.referenced,
                    format!(
                        "step_up.bind: `{}` is not a binding: the one binding is `client_ip`",
                        b.value
                    ),
                );
                None
            }
        };
        if bind.is_none()
            && let Some(p) = raw_step_up.and_then(|s| s.bind_prefix.as_ref())
            && let Some(at) = p
                .ipv4
                .as_ref()
                .map(|p| p.referenced)
                .or(p.ipv6.as_ref().map(|p| p.referenced))
        {
            e.at(
                &at,
                "step_up.bind_prefix: applies with `bind: client_ip` only".to_owned(),
            );
        }
        let uses = raw_step_up.and_then(|s| s.uses.as_ref()).and_then(|u| {
            if u.value == 0 {
                e.at(
                    &u.referenced,
                    "step_up.uses: must be at least 1 (use `ttl: 0s` for no tokens)".to_owned(),
                );
                None
            } else {
                Some(u.value)
            }
        });

        let roles = raw.roles.as_ref().map_or_else(Roles::default, |r| Roles {
            only: r.only.clone(),
            except: r.except.clone(),
        });

        let rollout_raw = raw.rollout.as_ref();
        let mode = match rollout_raw.and_then(|r| r.mode.as_ref()) {
            None => RolloutMode::Enforce,
            Some(m) => match m.value.as_str() {
                "enforce" => RolloutMode::Enforce,
                "report_only" => RolloutMode::ReportOnly,
                other => {
                    e.at(
                        &m.referenced,
                        format!("rollout.mode: `{other}` is not `enforce` or `report_only`"),
                    );
                    RolloutMode::Enforce
                }
            },
        };
        let grace_until = rollout_raw
            .and_then(|r| r.grace_until.as_ref())
            .and_then(|g| {
                let parsed = crate::clock::parse_rfc3339(&g.value.0);
                if parsed.is_none() {
                    e.at(
                        &g.referenced,
                        format!(
                            "rollout.grace_until: `{}` is not a date such as 2027-01-31",
                            g.value.0
                        ),
                    );
                }
                parsed
            });

        let approval = match (&raw.approval, approval_listed) {
            (Some(section), Some(_)) => {
                let mut errors = Vec::new();
                let rule = approvals::rule(
                    section,
                    &mut |t| e.duration("approval.ttl", Some(t), Duration::from_secs(300), false),
                    &mut |at, message| errors.push((*at, message)),
                );
                for (at, message) in errors {
                    e.at(&at, message);
                }
                Some(rule)
            }
            (None, Some(at)) => {
                e.at(
                    &at,
                    "factors: `approval` needs an `approval:` section (who approves: `approvers: { roles: [...] }`)"
                        .into(),
                );
                None
            }
            (Some(section), None) => {
                e.at(
                    &section.referenced,
                    "approval: applies when `factors` lists `approval`".into(),
                );
                None
            }
            (None, None) => None,
        };
        let mut methods = factors.names();
        if approval.is_some() {
            methods.push("approval");
        }
        let description =
            raw.description
                .as_ref()
                .and_then(|d| match words_for_people(&d.value, 200) {
                    Ok(text) => Some(text),
                    Err(message) => {
                        e.at(&d.referenced, format!("description: {message}"));
                        None
                    }
                });
        let failed = !e.errors.is_empty();
        self.errors.0.extend(e.errors);
        if failed {
            return None;
        }
        Some(Policy {
            shared_name: Arc::from(name.as_str()),
            name,
            description,
            file: file.to_path_buf(),
            api_key: raw.api_key.value,
            second_factor: raw.second_factor.value,
            factors,
            step_up: StepUp {
                ttl,
                scope,
                max_age,
                bind,
                uses,
            },
            roles,
            failures: Failures {
                per_consumer,
                per_ip,
                ban,
            },
            rollout: Rollout { mode, grace_until },
            challenge_methods: Arc::from(methods.join(" ")),
            approval,
        })
    }

    /// `websocket: true` with its `on_token_expiry`: a tunnel needs an upstream that can
    /// answer the upgrade (a `url` one), and `on_token_expiry` means nothing without it.
    fn websocket(
        &mut self,
        field: &str,
        r: &raw::Route,
        upstreams: &BTreeMap<String, UpstreamSpec>,
    ) -> Option<OnTokenExpiry> {
        let on_expiry = r
            .on_token_expiry
            .as_ref()
            .and_then(|v| match v.value.as_str() {
                "close" => Some(OnTokenExpiry::Close),
                "keep" => Some(OnTokenExpiry::Keep),
                other => {
                    self.at(
                        &v.referenced,
                        format!("{field}.on_token_expiry: `{other}` is not one of close, keep"),
                    );
                    None
                }
            });
        let Some(websocket) = r.websocket.as_ref().filter(|w| w.value) else {
            if let Some(v) = &r.on_token_expiry {
                self.at(
                    &v.referenced,
                    format!(
                        "{field}.on_token_expiry: applies to WebSocket tunnels only; add `websocket: true` or remove it"
                    ),
                );
            }
            return None;
        };
        if let Some(UpstreamSpec {
            target: Target::Echo,
            name,
        }) = upstreams.get(&r.upstream.value)
        {
            self.at(
                &websocket.referenced,
                format!(
                    "{field}.websocket: upstream `{name}` is the built-in echo, which answers no upgrade; use a `url` upstream"
                ),
            );
        }
        Some(on_expiry.unwrap_or(OnTokenExpiry::Close))
    }

    fn routes(
        &mut self,
        raw: &[Spanned<raw::Route>],
        upstreams: &BTreeMap<String, UpstreamSpec>,
        policies: &BTreeMap<String, Arc<Policy>>,
        limits: &Limits,
        reserved: &SelfServiceSpec,
    ) -> Vec<RouteSpec> {
        let mut routes: Vec<RouteSpec> = Vec::with_capacity(raw.len());
        for spec in raw {
            let r = &spec.value;
            let name = r.name.value.clone();
            if name.is_empty() {
                self.at(&r.name.referenced, "routes.name: must not be empty");
            }
            if let Some(first) = routes.iter().find(|other| other.name == name) {
                let message = format!(
                    "routes.name: duplicate route name `{name}` (first defined on line {})",
                    first.line
                );
                self.at(&r.name.referenced, message);
            }
            let field = format!("routes[{name}]");

            // The same canonical form as a request's host, so that a route written
            // `API.example.com.` matches what requests for it are canonicalised to.
            let host = r.matcher.host.as_ref().and_then(|h| {
                let canonical = crate::host::canonicalize(h.value.trim().as_bytes(), false, None);
                match canonical {
                    Ok(host) if !host.has_port() => Some(host.name().to_owned()),
                    Ok(_) => {
                        self.at(
                            &h.referenced,
                            format!(
                                "{field}.match.host: `{}` has a port; routes match host names only",
                                h.value
                            ),
                        );
                        None
                    }
                    Err(error) => {
                        self.at(
                            &h.referenced,
                            format!("{field}.match.host: `{}`: {error}", h.value),
                        );
                        None
                    }
                }
            });

            let path = &r.matcher.path;
            let canonical = path::normalize(&path.value).map(|p| p.into_owned());
            let under_reserved = canonical
                .as_ref()
                .is_ok_and(|p| reserved.strip(p).is_some());
            let route_path = if under_reserved {
                self.at(
                    &path.referenced,
                    format!(
                        "{field}.match.path: `{}` is reserved for the gateway's own \
                         endpoints (self_service.prefix)",
                        reserved.prefix
                    ),
                );
                None
            } else if !path.value.starts_with('/') {
                self.at(
                    &path.referenced,
                    format!("{field}.match.path: must start with `/`"),
                );
                None
            } else {
                match path::normalize(&path.value) {
                    Ok(p) => {
                        let p = p.trim_end_matches('/');
                        Some(if p.is_empty() {
                            "/".to_owned()
                        } else {
                            p.to_owned()
                        })
                    }
                    Err(e) => {
                        self.at(&path.referenced, format!("{field}.match.path: {e}"));
                        None
                    }
                }
            };

            let methods = r.matcher.methods.as_ref().map(|methods| {
                let mut parsed = Vec::with_capacity(methods.len());
                for m in methods {
                    let upper = m.value.to_ascii_uppercase();
                    match Method::from_bytes(upper.as_bytes()) {
                        Ok(method) if !upper.is_empty() => parsed.push(method),
                        _ => self.at(
                            &m.referenced,
                            format!("{field}.match.methods: `{}` is not an HTTP method", m.value),
                        ),
                    }
                }
                if methods.is_empty() {
                    self.at(
                        &spec.referenced,
                        format!("{field}.match.methods: an empty list matches nothing; leave it out to match every method"),
                    );
                }
                parsed
            });

            let upstream = upstreams
                .contains_key(&r.upstream.value)
                .then(|| r.upstream.value.clone());
            if upstream.is_none() && !self.broken_upstreams.contains(&r.upstream.value) {
                let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                self.at(
                    &r.upstream.referenced,
                    format!(
                        "{field}.upstream: unknown upstream `{}` (defined: {})",
                        r.upstream.value,
                        list_or_none(&known)
                    ),
                );
            }
            let policy = policies.get(&r.policy.value).cloned();
            if policy.is_none() && !self.broken_policies.contains(&r.policy.value) {
                let known: Vec<&str> = policies.keys().map(String::as_str).collect();
                self.at(
                    &r.policy.referenced,
                    format!(
                        "{field}.policy: unknown policy `{}` (policies found: {})",
                        r.policy.value,
                        list_or_none(&known)
                    ),
                );
            }
            let body_bytes = self.size_or(
                &format!("{field}.body_bytes"),
                &r.body_bytes,
                limits.body_bytes,
            );
            let websocket = self.websocket(&field, r, upstreams);

            if let (Some(path), Some(upstream), Some(policy)) = (route_path, upstream, policy) {
                let route = RouteSpec {
                    name,
                    host,
                    path,
                    methods,
                    upstream,
                    policy,
                    strip_prefix: r.strip_prefix,
                    body_bytes,
                    websocket,
                    line: spec.referenced.line(),
                };
                if let Some(twin) = routes.iter().find(|other| other.shadows(&route)) {
                    let message = format!(
                        "{field}.match: route `{}` (line {}) already matches every request this one does; it could never be chosen",
                        twin.name, twin.line
                    );
                    self.at(&spec.referenced, message);
                }
                routes.push(route);
            }
        }
        routes
    }
}

/// Errors of one policy file, collected before the policy is accepted or refused as a whole.
/// A text shown to people (a policy's description, the page's title): one line of at most
/// `max` characters, no control characters, trimmed.
pub(super) fn words_for_people(text: &str, max: usize) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty".into());
    }
    if text.chars().count() > max {
        return Err(format!("at most {max} characters"));
    }
    if text.chars().any(char::is_control) {
        return Err("one line, without control characters".into());
    }
    Ok(text.to_owned())
}

struct PolicyErrors<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl PolicyErrors<'_> {
    fn at(&mut self, location: &Location, message: String) {
        self.errors.push(ConfigError::new(
            self.file,
            location.line(),
            location.column(),
            message,
        ));
    }

    fn duration(
        &mut self,
        field: &str,
        value: Option<&Spanned<Scalar>>,
        default: Duration,
        allow_zero: bool,
    ) -> Duration {
        let Some(value) = value else { return default };
        match parse_duration(&value.value.0) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.at(
                    &value.referenced,
                    format!("{field}: must be greater than 0"),
                );
                default
            }
            Ok(d) => d,
            Err(message) => {
                self.at(&value.referenced, format!("{field}: {message}"));
                default
            }
        }
    }

    fn rate(&mut self, field: &str, raw: Option<&raw::Rate>, default: Rate) -> Rate {
        let Some(raw) = raw else { return default };
        let window = self.duration(
            &format!("{field}.window"),
            Some(&raw.window),
            default.window,
            false,
        );
        match NonZeroU32::new(raw.max.value) {
            Some(max) => Rate { max, window },
            None => {
                self.at(
                    &raw.max.referenced,
                    format!("{field}.max: must be at least 1"),
                );
                default
            }
        }
    }
}

/// A synthetic route per policy that issues step-up tokens, for `POST {prefix}/step-up`.
/// An upstream URL taken apart: scheme (http or https; `h2c` is http with HTTP/2 from the
/// first byte, the last member), authority (no credentials), and the path prefix without
/// trailing `/`; no query.
fn parse_url(url: &str) -> Result<(http::uri::Scheme, http::uri::Authority, String, bool), String> {
    use http::uri::{Scheme, Uri};
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let h2c = uri.scheme_str() == Some("h2c");
    let scheme = uri
        .scheme()
        .filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS)
        .cloned()
        .or(h2c.then_some(Scheme::HTTP))
        .ok_or_else(|| format!("`{url}` must start with http://, https:// or h2c://"))?;
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("`{url}`: credentials in the URL are not supported"));
    }
    if uri.query().is_some() {
        return Err(format!("`{url}` must not have a query"));
    }
    Ok((
        scheme,
        authority,
        uri.path().trim_end_matches('/').to_owned(),
        h2c,
    ))
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

impl Loader<'_> {
    /// Adds a non-YAML file (certificate, key, CA) to the version digest; unreadable files are
    /// reported where they are used.
    fn hash_file(&mut self, path: &Path) {
        self.extra_files.push(path.to_path_buf());
        if let Ok(bytes) = fs::read(path) {
            self.digest.update(path.as_os_str().as_encoded_bytes());
            self.digest.update([0]);
            self.digest.update(&bytes);
        }
    }

    /// Reads and parses one YAML file; a syntax or schema error names its line and column.
    fn parse_file<T: DeserializeOwned>(&mut self, file: &Path) -> Result<T, ConfigError> {
        let text = fs::read_to_string(file)
            .map_err(|e| ConfigError::new(file, 0, 0, format!("cannot read: {e}")))?;
        self.digest.update(file.as_os_str().as_encoded_bytes());
        self.digest.update([0]);
        self.digest.update(text.as_bytes());
        self.digest.update([0]);
        serde_saphyr::from_str(&text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            ConfigError::new(file, line, column, yaml_message(&e))
        })
    }
}

/// serde-saphyr's message without the location or source snippet (we print our own).
fn yaml_message(error: &serde_saphyr::Error) -> String {
    let text = error.without_snippet().to_string();
    let first = text.lines().next().unwrap_or("invalid YAML");
    match first.rfind(" at line ") {
        Some(at) => first[..at].to_owned(),
        None => first.to_owned(),
    }
}
