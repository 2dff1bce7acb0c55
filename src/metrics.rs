//! Prometheus metrics (prometheus-client), served as text on the admin listener's `/metrics`.
//! Every label value comes from a small, closed set (route and upstream names from the
//! configuration, status codes, fixed outcome names), never from a path, key or consumer.
//!
//! What every request records goes through handles resolved once per route and upstream
//! ([`RouteHandles`], [`UpstreamHandles`]) onto lock-free, per-thread [`sharded`] metrics:
//! a family lookup takes a read lock and hashes the labels, a handle is a few atomics.

pub mod sharded;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use sharded::{Count, Latency};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamError {
    pub upstream: Arc<str>,
    /// `connect`, `timeout`, `reset`, `body_too_large`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FactorOutcome {
    /// `totp`, `recovery_code`, `step_up`, `none`.
    pub factor: &'static str,
    /// `accepted`, `rejected`, `replayed`, `missing`, `not_enrolled`, `grace`, `would_refuse`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubjectLabel {
    /// `consumer` or `ip`.
    pub subject: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelEnd {
    pub route: Arc<str>,
    /// `closed` (by a peer), `idle`, `token_expired`, `token_revoked`, `store_unavailable`,
    /// `shutdown`, `error`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// All of the gateway's metrics. Cheap to share; counters are atomics.
pub struct Metrics {
    registry: Registry,
    /// The `route` label of requests no route matched.
    pub no_route: Arc<str>,
    no_route_handles: RouteHandles,
    pub requests: Family<RouteStatus, Count>,
    pub request_duration: Family<RouteLabel, Latency>,
    pub upstream_duration: Family<UpstreamLabel, Latency>,
    pub upstream_errors: Family<UpstreamError, Counter>,
    pub second_factor: Family<FactorOutcome, Count>,
    /// `second_factor` by (factor, outcome) index, resolved on first use.
    factor_handles: Box<[OnceLock<Count>]>,
    pub bans_started: Family<SubjectLabel, Counter>,
    pub bans_active: Gauge,
    pub step_up_issued: Counter,
    pub step_up_live: Gauge,
    /// 1 while the store answers (set at each scrape).
    pub store_up: Gauge,
    /// 1 while this node's copies of shared state are not trusted (it lost touch with a
    /// shared store for longer than allowed; keyed requests fail closed).
    pub store_stale: Gauge,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub config_last_reload_ok: Gauge,
    /// WebSocket tunnels open now, and the ones that ended, by route and why.
    pub tunnels_open: Gauge,
    pub tunnels_closed: Family<TunnelEnd, Counter>,
    /// Requests for approval, by what became of them.
    pub approvals: Family<OutcomeLabel, Counter>,
}

/// The `factor` and `outcome` label values of `second_factor` (others are counted too, just
/// through a family lookup).
const FACTORS: [&str; 6] = ["totp", "recovery_code", "sms", "step_up", "code", "none"];
const OUTCOMES: [&str; 11] = [
    "accepted",
    "rejected",
    "replayed",
    "missing",
    "not_enrolled",
    "grace",
    "would_refuse",
    "sent",
    "send_failed",
    "send_limited",
    "enrolled",
];

/// Statuses per route with a handle of their own (a route answers with few).
const STATUS_SLOTS: usize = 8;

/// A route's request metrics, resolved on its first request. Each route of a configuration
/// snapshot carries one; a reload starts new ones on the same metric families.
#[derive(Default)]
pub struct RouteHandles(OnceLock<RouteMetrics>);

struct RouteMetrics {
    duration: Latency,
    statuses: [OnceLock<(u16, Count)>; STATUS_SLOTS],
}

impl std::fmt::Debug for RouteHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteHandles")
    }
}

/// An upstream's latency histogram, resolved on its first request.
#[derive(Default)]
pub struct UpstreamHandles(OnceLock<Latency>);

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("stepgate");
        let requests = Family::<RouteStatus, Count>::default();
        let request_duration = Family::<RouteLabel, Latency>::default();
        let upstream_duration = Family::<UpstreamLabel, Latency>::default();
        let upstream_errors = Family::<UpstreamError, Counter>::default();
        let second_factor = Family::<FactorOutcome, Count>::default();
        let bans_started = Family::<SubjectLabel, Counter>::default();
        let bans_active = Gauge::default();
        let step_up_issued = Counter::default();
        let step_up_live = Gauge::default();
        let store_up = Gauge::default();
        let store_stale = Gauge::default();
        let config_reloads = Family::<ResultLabel, Counter>::default();
        let config_last_reload_ok = Gauge::default();
        let tunnels_open = Gauge::default();
        let tunnels_closed = Family::<TunnelEnd, Counter>::default();
        let approvals = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "approvals",
            "Requests for approval: requested, approved, denied, used, mismatched, expired, reused, unknown, limited",
            approvals.clone(),
        );
        registry.register(
            "websocket_tunnels_open",
            "WebSocket tunnels open",
            tunnels_open.clone(),
        );
        registry.register(
            "websocket_tunnels_closed",
            "WebSocket tunnels ended, by route and reason",
            tunnels_closed.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by route (empty: none matched) and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the response head, by route",
            request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Upstream time to the response head, by upstream",
            upstream_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed upstream requests, by upstream and kind",
            upstream_errors.clone(),
        );
        registry.register(
            "second_factor",
            "Second-factor checks, by factor and outcome",
            second_factor.clone(),
        );
        registry.register(
            "bans_started",
            "Bans started by the failure limiter, by subject",
            bans_started.clone(),
        );
        registry.register("bans_active", "Bans in force", bans_active.clone());
        registry.register(
            "step_up_tokens_issued",
            "Step-up tokens issued",
            step_up_issued.clone(),
        );
        registry.register(
            "step_up_tokens_live",
            "Step-up tokens held (approximate)",
            step_up_live.clone(),
        );
        registry.register(
            "store_up",
            "1 when the store answered the last scrape's ping",
            store_up.clone(),
        );
        registry.register(
            "store_stale",
            "1 while this node is out of touch with its shared store (keyed requests get 503)",
            store_stale.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        registry.register(
            "config_last_reload_success",
            "1 when the last reload succeeded, 0 when it was rejected",
            config_last_reload_ok.clone(),
        );
        config_last_reload_ok.set(1);
        Arc::new(Self {
            registry,
            no_route: Arc::from(""),
            no_route_handles: RouteHandles::default(),
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            second_factor,
            factor_handles: (0..FACTORS.len() * OUTCOMES.len())
                .map(|_| OnceLock::new())
                .collect(),
            bans_started,
            bans_active,
            step_up_issued,
            step_up_live,
            store_up,
            store_stale,
            config_reloads,
            config_last_reload_ok,
            tunnels_open,
            tunnels_closed,
            approvals,
        })
    }

    pub fn approval(&self, outcome: &'static str) {
        self.approvals
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn factor(&self, factor: &'static str, outcome: &'static str) {
        let label = FactorOutcome { factor, outcome };
        let index = FACTORS
            .iter()
            .position(|f| *f == factor)
            .zip(OUTCOMES.iter().position(|o| *o == outcome))
            .map(|(f, o)| f * OUTCOMES.len() + o);
        match index.and_then(|i| self.factor_handles.get(i)) {
            Some(slot) => slot
                .get_or_init(|| self.second_factor.get_or_create(&label).clone())
                .inc(),
            None => self.second_factor.get_or_create(&label).inc(),
        }
    }

    /// Counts a request answered with `status` after `elapsed`, on the route with this label
    /// and handles (none matched: `None`).
    pub fn request(
        &self,
        route: Option<(&Arc<str>, &RouteHandles)>,
        status: u16,
        elapsed: Duration,
    ) {
        let (label, handles) = route.unwrap_or((&self.no_route, &self.no_route_handles));
        let metrics = handles.0.get_or_init(|| RouteMetrics {
            duration: self
                .request_duration
                .get_or_create(&RouteLabel {
                    route: label.clone(),
                })
                .clone(),
            statuses: Default::default(),
        });
        metrics.duration.observe(elapsed);
        for slot in &metrics.statuses {
            let (slot_status, count) = slot.get_or_init(|| {
                let count = self.requests.get_or_create(&RouteStatus {
                    route: label.clone(),
                    status,
                });
                (status, count.clone())
            });
            if *slot_status == status {
                count.inc();
                return;
            }
        }
        // More statuses than slots on this route: the family, with its lookup.
        self.requests
            .get_or_create(&RouteStatus {
                route: label.clone(),
                status,
            })
            .inc();
    }

    /// Records how long the upstream with this label and handles took to answer with a
    /// response head.
    pub fn upstream(&self, label: &Arc<str>, handles: &UpstreamHandles, elapsed: Duration) {
        handles
            .0
            .get_or_init(|| {
                self.upstream_duration
                    .get_or_create(&UpstreamLabel {
                        upstream: label.clone(),
                    })
                    .clone()
            })
            .observe(elapsed);
    }

    pub fn upstream_error(&self, upstream: &Arc<str>, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamError {
                upstream: upstream.clone(),
                kind,
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
