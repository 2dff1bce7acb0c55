//! Turns the raw YAML structs into a [`Snapshot`], collecting every error with its location
//! instead of stopping at the first, so `stepgate check` shows an operator everything at once.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::de::DeserializeOwned;
use serde_saphyr::{Location, Spanned};

use super::raw::{self, Requirement, Scalar};
use super::units::{parse_duration, parse_size};
use super::{ConfigError, ConfigErrors, Limits, Policy, Snapshot};
use crate::path;
use crate::proxy::upstream::{HttpSettings, Upstream};
use crate::routing::{Route, RouteTable};
use crate::tls;

/// Reads and validates `gateway.yaml` at `path` and the policies it points at.
pub fn load(path: &Path) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Errors::default();
    let snapshot = Loader {
        file: path,
        base: path.parent().unwrap_or(Path::new(".")),
        errors: &mut errors,
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

    fn load(&mut self) -> Option<Snapshot> {
        let raw: raw::Gateway = match parse_file(self.file) {
            Ok(raw) => raw,
            Err(error) => {
                self.errors.0.push(error);
                return None;
            }
        };

        let policies = self.policies(raw.policies_dir.as_ref());
        let listen = self.listen(&raw.listen);
        let tls = raw.tls.as_ref().and_then(|t| self.tls(t));
        let limits = self.limits(&raw.limits);
        let upstreams: BTreeMap<String, Arc<Upstream>> = raw
            .upstreams
            .iter()
            .filter_map(|(name, spec)| Some((name.clone(), Arc::new(self.upstream(name, spec)?))))
            .collect();
        let routes = self.routes(&raw.routes, &upstreams, &policies, &limits);

        Some(Snapshot {
            source: self.file.to_path_buf(),
            listen: listen?,
            tls,
            limits,
            upstreams,
            policies,
            routes: RouteTable::new(routes),
        })
    }

    fn listen(&mut self, listen: &Spanned<String>) -> Option<SocketAddr> {
        match listen.value.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.at(
                    &listen.referenced,
                    format!(
                        "listen: `{}` is not an address:port such as 127.0.0.1:8080",
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
            drain_timeout: self.duration_or(
                "limits.drain_timeout",
                &raw.drain_timeout,
                d.drain_timeout,
            ),
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

    fn upstream(&mut self, name: &str, spec: &Spanned<raw::Upstream>) -> Option<Upstream> {
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
                ];
                for (key, location) in http_only {
                    if let Some(location) = location {
                        self.at(
                            location,
                            format!("{field}.{key}: only applies to `url` upstreams"),
                        );
                    }
                }
                Some(Upstream::echo(name))
            }
            (Some(url), None) => {
                let d = HttpSettings::default();
                let settings = HttpSettings {
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
                    ca_file: raw.ca_file.as_ref().map(|f| self.base.join(&f.value)),
                };
                match Upstream::http(name, &url.value, settings) {
                    Ok(upstream) => Some(upstream),
                    Err(crate::proxy::upstream::UpstreamError::Url(message)) => {
                        self.at(&url.referenced, format!("{field}.url: {message}"));
                        None
                    }
                    Err(crate::proxy::upstream::UpstreamError::CaFile(message)) => {
                        let location = raw
                            .ca_file
                            .as_ref()
                            .map_or(spec.referenced, |f| f.referenced);
                        self.at(&location, format!("{field}.ca_file: {message}"));
                        None
                    }
                }
            }
        }
    }

    fn policies(&mut self, dir: Option<&Spanned<String>>) -> BTreeMap<String, Arc<Policy>> {
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
            if let Some(policy) = self.policy(&file, name.clone()) {
                policies.insert(name, Arc::new(policy));
            }
        }
        policies
    }

    fn policy(&mut self, file: &Path, name: String) -> Option<Policy> {
        let raw: raw::Policy = match parse_file(file) {
            Ok(raw) => raw,
            Err(error) => {
                self.errors.0.push(error);
                return None;
            }
        };
        // Nothing enforces a first or second factor yet: a policy asking for one is refused
        // rather than silently leaving its routes open.
        let mut ok = true;
        for (field, value) in [
            ("api_key", &raw.api_key),
            ("second_factor", &raw.second_factor),
        ] {
            if value.value == Requirement::Required {
                self.errors.0.push(ConfigError::new(
                    file,
                    value.referenced.line(),
                    value.referenced.column(),
                    format!(
                        "{field}: `required` is not supported by this build yet; \
                         stepgate refuses the policy rather than leave its routes unprotected"
                    ),
                ));
                ok = false;
            }
        }
        ok.then(|| Policy {
            name,
            file: file.to_path_buf(),
            api_key: raw.api_key.value,
            second_factor: raw.second_factor.value,
        })
    }

    fn routes(
        &mut self,
        raw: &[Spanned<raw::Route>],
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        policies: &BTreeMap<String, Arc<Policy>>,
        limits: &Limits,
    ) -> Vec<Route> {
        let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
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

            let host = r.matcher.host.as_ref().and_then(|h| {
                let host = h.value.trim().to_ascii_lowercase();
                let valid = !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !valid {
                    self.at(
                        &h.referenced,
                        format!(
                            "{field}.match.host: `{}` is not a host name (no port, no scheme)",
                            h.value
                        ),
                    );
                }
                valid.then_some(host)
            });

            let path = &r.matcher.path;
            let route_path = if !path.value.starts_with('/') {
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

            let upstream = upstreams.get(&r.upstream.value).cloned();
            if upstream.is_none() {
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
            if policy.is_none() {
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

            if let (Some(path), Some(upstream), Some(policy)) = (route_path, upstream, policy) {
                let route = Route {
                    name,
                    host,
                    path,
                    methods,
                    upstream,
                    policy,
                    strip_prefix: r.strip_prefix,
                    body_bytes,
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

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// Reads and parses one YAML file; a syntax or schema error names its line and column.
fn parse_file<T: DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let text = fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, 0, 0, format!("cannot read: {e}")))?;
    serde_saphyr::from_str(&text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        ConfigError::new(file, line, column, yaml_message(&e))
    })
}

/// serde-saphyr's message without the location or source snippet (we print our own).
fn yaml_message(error: &serde_saphyr::Error) -> String {
    let text = error.without_snippet().to_string();
    text.lines().next().unwrap_or("invalid YAML").to_owned()
}
