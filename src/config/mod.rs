//! Configuration: `gateway.yaml` and `policies/*.yaml` are parsed into [`raw`] structs, then
//! validated as a whole into an immutable [`Config`]: plain data (durations, sizes, parsed
//! addresses and URLs, loaded certificates, policies), nothing that opens a connection. The
//! request path's [`crate::snapshot::Snapshot`] is built from it (upstream pools, the route
//! table) only once all of it is valid, so a running gateway can swap one in atomically.

pub mod raw;
mod units;

pub use units::{format_duration, format_size};
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use http::uri::{Authority, Scheme};

pub use crate::client_headers::Underscores;
pub use crate::credentials::factors::Factors;
pub use crate::tokens::Scope;
pub use raw::Requirement;
pub use validate::load;

/// One complete, validated configuration.
pub struct Config {
    /// The `gateway.yaml` this configuration was read from.
    pub source: PathBuf,
    /// Short hash over every file read: equal versions mean equal configurations.
    pub version: String,
    pub policies_dir: PathBuf,
    /// Non-YAML files the configuration reads (TLS certificate and key, CA files): their
    /// directories are watched for reloads too.
    pub extra_files: Vec<PathBuf>,
    pub listen: SocketAddr,
    /// rustls server configuration when the listener terminates TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limits: Limits,
    /// Peers whose `X-Forwarded-For` is believed (load balancers in front of stepgate).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Admin API listener; `None` when the config has no `admin` section.
    pub admin: Option<SocketAddr>,
    /// Where the master key, admin token and (by default) the database live.
    pub data_dir: PathBuf,
    pub store: StoreSettings,
    /// Audit events as JSON lines to stdout or a file (restart to change).
    pub audit_sink: Option<crate::audit::Sink>,
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    pub policies: BTreeMap<String, Arc<Policy>>,
    /// In file order.
    pub routes: Vec<RouteSpec>,
    /// The consumers' security page and enrolment API, and where they live.
    pub self_service: SelfServiceSpec,
    /// The SMS factor; `None` (the default) when `gateway.yaml` has no `sms` section.
    pub sms: Option<Arc<crate::sms::SmsSettings>>,
    /// How requests for approval are announced and bounded.
    pub approvals: ApprovalSettings,
}

/// `approvals:` in `gateway.yaml`.
#[derive(Debug, Clone)]
pub struct ApprovalSettings {
    /// Requests for approval a consumer may have waiting at once (default 5).
    pub max_pending: u32,
    pub notify: Option<Arc<NotifySettings>>,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        Self {
            max_pending: 5,
            notify: None,
        }
    }
}

/// The webhook told of each request for approval.
pub struct NotifySettings {
    pub url: http::Uri,
    /// The HMAC-SHA256 key of its `X-Stepgate-Signature`, from `secret_file`.
    pub secret: Vec<u8>,
    pub tls: rustls::ClientConfig,
}

impl fmt::Debug for NotifySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifySettings")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// A validated upstream.
#[derive(Debug)]
pub struct UpstreamSpec {
    pub name: String,
    pub target: Target,
}

/// What an upstream is.
#[derive(Debug)]
pub enum Target {
    /// The built-in upstream that describes the request it received.
    Echo,
    Http(Box<HttpSpec>),
}

/// An http(s) upstream: its URL taken apart, its tunables, and the TLS client configuration
/// its connections use.
pub struct HttpSpec {
    /// As configured, for display.
    pub url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the url without trailing `/`; empty for none.
    pub base_path: String,
    pub settings: HttpSettings,
    pub tls: rustls::ClientConfig,
}

impl fmt::Debug for HttpSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSpec")
            .field("url", &self.url)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Tunables of an http(s) upstream.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub connect_timeout: Duration,
    /// Time from sending the request to the response head.
    pub timeout: Duration,
    /// Pooled connections idle this long are closed; keep it below the upstream's own
    /// keep-alive timeout so the pool never reuses a connection the upstream is closing.
    pub idle_timeout: Duration,
    /// Extra attempts after a connect failure (idempotent requests without a body only).
    pub retries: u32,
    pub ca_file: Option<PathBuf>,
    /// HTTP/2 without negotiation over plain TCP (`h2c://` or `http2: prior_knowledge`).
    pub prior_knowledge: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            retries: 1,
            ca_file: None,
            prior_knowledge: false,
        }
    }
}

/// A validated route, in file order; the snapshot turns it into a routing table entry.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    /// Lower-case canonical host name without port; `None` matches any host.
    pub host: Option<String>,
    /// Canonical path prefix without trailing `/` (except the root `/`).
    pub path: String,
    /// `None` matches every method.
    pub methods: Option<Vec<Method>>,
    /// The name of one of [`Config::upstreams`].
    pub upstream: String,
    pub policy: Arc<Policy>,
    /// Forward the path with `path` removed from its front.
    pub strip_prefix: bool,
    /// Request body limit for this route.
    pub body_bytes: u64,
    /// WebSocket upgrades are tunnelled (`websocket: true`), with what becomes of a tunnel
    /// when its step-up token expires; `None`: no upgrade is honoured.
    pub websocket: Option<OnTokenExpiry>,
    /// Line in `gateway.yaml`, for messages.
    pub line: u64,
}

/// `on_token_expiry`: what becomes of a WebSocket tunnel opened with a step-up token (or with
/// a code that earned one) when that token expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTokenExpiry {
    /// The tunnel is closed: a connection cannot outlive its second factor.
    Close,
    /// The tunnel stays open until either side closes it (or it goes idle).
    Keep,
}

impl RouteSpec {
    /// True when `other` (defined later) could never win over `self`: same host and path and no
    /// method of `other` left for it.
    pub fn shadows(&self, other: &RouteSpec) -> bool {
        if self.host != other.host || self.path != other.path {
            return false;
        }
        match (&self.methods, &other.methods) {
            (None, None) => true,
            (Some(mine), Some(theirs)) => theirs.iter().all(|m| mine.contains(m)),
            _ => false,
        }
    }
}

/// The gateway's own endpoints under one path prefix: the security page, the enrolment API
/// and `step-up`. Routes in `gateway.yaml` may not use paths under the prefix.
#[derive(Debug, Clone)]
pub struct SelfServiceSpec {
    /// Canonical, no trailing `/`, never `/`; `/_stepgate` by default.
    pub prefix: String,
    /// False: the page and the enrolment API answer 404; `{prefix}/step-up` stays.
    pub enabled: bool,
    /// The gateway's name on the security page; `stepgate` by default.
    pub title: String,
    /// `{prefix}/step-up`, computed once.
    pub step_up_path: String,
    /// The built-in policy of the page and its assets (no credentials).
    pub page_policy: Arc<Policy>,
    /// The built-in policy of the enrolment API (an API key; codes checked per call).
    pub api_policy: Arc<Policy>,
}

impl SelfServiceSpec {
    pub const DEFAULT_PREFIX: &'static str = "/_stepgate";
    /// Largest request body the enrolment API reads (its JSON bodies are tiny).
    pub const API_BODY_BYTES: u64 = 16 * 1024;

    /// The rest of `path` after the prefix (`""`, `"/"`, `"/2fa"`...), when `path` is the prefix
    /// or below it by whole segments.
    pub fn strip<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(self.prefix.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }

    /// The security page's path, for messages that send consumers there; `None` when disabled.
    pub fn page_path(&self) -> Option<String> {
        self.enabled.then(|| format!("{}/", self.prefix))
    }
}

/// Where consumers and credentials are persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSettings {
    Sqlite {
        path: PathBuf,
    },
    /// Shared by several nodes.
    Redis(RedisSettings),
}

/// A Redis store shared by several nodes.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS), without a password.
    pub url: String,
    /// Before every key and the pub/sub channel, so that several deployments can share one
    /// Redis; `stepgate:` by default.
    pub key_prefix: String,
    /// From `password_env` or `password_file`; never shown.
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// How long one command may take before the gateway gives up on it (and fails closed).
    pub command_timeout: Duration,
    /// How long keys and step-up tokens are served from this node's memory once it has lost
    /// touch with Redis (revocations may be missed meanwhile); then they fail closed.
    pub stale_for: Duration,
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.url)
            .field("key_prefix", &self.key_prefix)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("stale_for", &self.stale_for)
            .finish()
    }
}

impl RedisSettings {
    pub const DEFAULT_PREFIX: &'static str = "stepgate:";
    pub const DEFAULT_STALE_FOR: Duration = Duration::from_secs(5);
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

    /// The settings for `url` with every default (no password).
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            key_prefix: Self::DEFAULT_PREFIX.to_owned(),
            password: None,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            command_timeout: Self::DEFAULT_COMMAND_TIMEOUT,
            stale_for: Self::DEFAULT_STALE_FOR,
        }
    }
}

/// Protocol limits of the public listener. Defaults sit close to nginx's and Envoy's.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sum of header name and value bytes (431 over it).
    pub header_bytes: usize,
    /// Number of header fields (431 over it).
    pub header_count: usize,
    /// Length of the request target (414 over it).
    pub uri_bytes: usize,
    /// Request body bytes (413 over it); a route may override it.
    pub body_bytes: u64,
    /// Time a client has to send a complete request head (and the TLS handshake).
    pub header_read_timeout: Duration,
    /// A connection with no bytes moving for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// Accepted connections at once; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// Threads serving the public listener, each with its own event loop and upstream
    /// connection pools; default one per CPU.
    pub workers: usize,
    /// How long a shutdown waits for in-flight requests before cutting them.
    pub drain_timeout: Duration,
    /// What becomes of request headers with `_` in their names (look-alikes of credential
    /// and identity headers are refused whatever this says).
    pub headers_with_underscores: Underscores,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_bytes: 32 * 1024,
            header_count: 100,
            uri_bytes: 8 * 1024,
            body_bytes: 10 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            drain_timeout: Duration::from_secs(30),
            headers_with_underscores: Underscores::Drop,
        }
    }
}

/// A route policy, from `policies/<name>.yaml`.
#[derive(Debug)]
pub struct Policy {
    pub name: String,
    /// For consumers, on the security page; the name stands in when there is none.
    pub description: Option<String>,
    /// The name again, shared (step-up tokens, limiter keys) without allocating per request.
    pub shared_name: Arc<str>,
    pub file: PathBuf,
    pub api_key: Requirement,
    pub second_factor: Requirement,
    /// Second factors accepted in `X-OTP`.
    pub factors: Factors,
    pub step_up: StepUp,
    pub roles: Roles,
    pub failures: Failures,
    pub rollout: Rollout,
    /// `methods="…"` of the `WWW-Authenticate: OTP` challenge, from `factors`.
    pub challenge_methods: Arc<str>,
    /// `approval` in `factors`: a person may approve a request in place of the caller's code.
    pub approval: Option<ApprovalRule>,
}

/// A policy's `approval:` section.
#[derive(Debug, Clone)]
pub struct ApprovalRule {
    /// An approver needs one of these roles.
    pub roles: Vec<String>,
    /// The requester may approve their own request.
    pub self_approval: bool,
    /// How long a request waits for its decision, and an approval for its use.
    pub ttl: Duration,
    /// JSON paths (`$.a.b`) of the body fields shown to approvers.
    pub show: Vec<String>,
}

impl Policy {
    /// Whether the policy asks for a second factor on any request (`required` or `writes`):
    /// its consumers must enrol, and codes earn tokens on it.
    pub fn asks_second_factor(&self) -> bool {
        self.second_factor != Requirement::Off
    }

    /// Whether a request of this method needs a second factor: every one under `required`,
    /// the unsafe ones (RFC 9110 §9.2.1) under `writes`.
    pub fn second_factor_for(&self, method: &http::Method) -> bool {
        match self.second_factor {
            Requirement::Required => true,
            Requirement::Writes => !method.is_safe(),
            Requirement::Off => false,
        }
    }

    /// A policy that asks for nothing: the base of the built-in self-service policies, and
    /// for tests and examples.
    pub fn public(name: &str) -> Self {
        Policy {
            name: name.to_owned(),
            description: None,
            shared_name: Arc::from(name),
            file: PathBuf::from(format!("policies/{name}.yaml")),
            api_key: Requirement::Off,
            second_factor: Requirement::Off,
            factors: Factors {
                totp: true,
                recovery_code: true,
                sms: false,
            },
            step_up: StepUp {
                ttl: Duration::from_secs(15 * 60),
                scope: Scope::Policy,
                max_age: None,
                bind: None,
                uses: None,
            },
            roles: Roles::default(),
            failures: Failures::default(),
            rollout: Rollout {
                mode: RolloutMode::Enforce,
                grace_until: None,
            },
            challenge_methods: Arc::from("totp recovery_code"),
            approval: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct StepUp {
    /// Zero: no tokens are issued; every call needs a code.
    pub ttl: Duration,
    pub scope: Scope,
    /// A token passes only if the code behind it was presented at most this long ago (the
    /// token's own policy or another's, under `scope: global`).
    pub max_age: Option<Duration>,
    /// `bind: client_ip`: a token passes only from the network it was earned from.
    pub bind: Option<Bind>,
    /// Tokens issued here work this many times (`1`: one-shot).
    pub uses: Option<u32>,
}

/// `bind: client_ip`, compared by these prefix lengths (defaults /32 and /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    pub ipv4: u8,
    pub ipv6: u8,
}

impl Bind {
    /// Whether `client` is in the network `earned_from` was in.
    pub fn holds(&self, earned_from: std::net::IpAddr, client: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        // An IPv4 client seen as IPv4-mapped IPv6 is the same client.
        let (earned_from, client) = (earned_from.to_canonical(), client.to_canonical());
        let net = match earned_from {
            IpAddr::V4(_) => ipnet::IpNet::new(earned_from, self.ipv4),
            IpAddr::V6(_) => ipnet::IpNet::new(earned_from, self.ipv6),
        };
        // `contains` is false across families.
        net.is_ok_and(|net| net.contains(&client))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Roles {
    /// When not empty, only consumers with one of these roles may call.
    pub only: Vec<String>,
    /// Consumers with any of these roles may not call.
    pub except: Vec<String>,
}

impl Roles {
    pub fn allows(&self, roles: &[String]) -> bool {
        (self.only.is_empty() || roles.iter().any(|r| self.only.contains(r)))
            && !roles.iter().any(|r| self.except.contains(r))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub max: std::num::NonZeroU32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Failures {
    pub per_consumer: Rate,
    pub per_ip: Rate,
    pub ban: Duration,
}

impl Default for Failures {
    /// 5 failures per consumer and 50 per client IP in 15 minutes, then a 15-minute ban:
    /// at most 20 failures per account per hour, well inside NIST SP 800-63B's 100.
    fn default() -> Self {
        let rate = |max: u32| Rate {
            max: std::num::NonZeroU32::new(max).unwrap_or(std::num::NonZeroU32::MIN),
            window: Duration::from_secs(15 * 60),
        };
        Self {
            per_consumer: rate(5),
            per_ip: rate(50),
            ban: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutMode {
    Enforce,
    /// Forward what would be refused, but log, audit and count it.
    ReportOnly,
}

#[derive(Debug, Clone, Copy)]
pub struct Rollout {
    pub mode: RolloutMode,
    /// Unix seconds until which consumers without a second factor pass (with a warning).
    pub grace_until: Option<u64>,
}

/// One problem in the configuration, pointing at the file, line and column it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is about the file as a whole (e.g. it cannot be read).
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, line: u64, column: u64, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Every problem found in one load; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
