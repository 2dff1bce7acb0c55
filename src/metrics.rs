//! Prometheus metrics (prometheus-client), served as text on the admin listener's `/metrics`.
//! Every label value comes from a small, closed set (route and upstream names from the
//! configuration, status codes, fixed outcome names), never from a path, key or consumer.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// All of the gateway's metrics. Cheap to share; counters are atomics.
pub struct Metrics {
    registry: Registry,
    /// The `route` label of requests no route matched.
    pub no_route: Arc<str>,
    pub requests: Family<RouteStatus, Counter>,
    pub request_duration: Family<RouteLabel, Histogram>,
    pub upstream_duration: Family<UpstreamLabel, Histogram>,
    pub upstream_errors: Family<UpstreamError, Counter>,
    pub second_factor: Family<FactorOutcome, Counter>,
    pub bans_started: Family<SubjectLabel, Counter>,
    pub bans_active: Gauge,
    pub step_up_issued: Counter,
    pub step_up_live: Gauge,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub config_last_reload_ok: Gauge,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("stepgate");
        let requests = Family::<RouteStatus, Counter>::default();
        let request_duration = Family::<RouteLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let upstream_duration = Family::<UpstreamLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let upstream_errors = Family::<UpstreamError, Counter>::default();
        let second_factor = Family::<FactorOutcome, Counter>::default();
        let bans_started = Family::<SubjectLabel, Counter>::default();
        let bans_active = Gauge::default();
        let step_up_issued = Counter::default();
        let step_up_live = Gauge::default();
        let config_reloads = Family::<ResultLabel, Counter>::default();
        let config_last_reload_ok = Gauge::default();
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
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            second_factor,
            bans_started,
            bans_active,
            step_up_issued,
            step_up_live,
            config_reloads,
            config_last_reload_ok,
        })
    }

    pub fn factor(&self, factor: &'static str, outcome: &'static str) {
        self.second_factor
            .get_or_create(&FactorOutcome { factor, outcome })
            .inc();
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
