//! What the request path runs on: a validated [`Config`] with its upstreams' connection
//! pools and the route table built, shared by every request admitted under it. A reload
//! builds a new snapshot from a new configuration that validated in full, then swaps it in;
//! requests in flight finish on the one they started with.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use http::Method;

use crate::config::{Config, Policy, RouteSpec, SelfServiceSpec};
use crate::routing::{Route, RouteTable};
use crate::upstream::{Target, Upstream};

/// Shared handle to the snapshot in force; a reload stores a new one into it.
pub type ConfigHandle = Arc<arc_swap::ArcSwap<Snapshot>>;

/// One configuration, ready to serve. Its plain settings are those of [`Config`] (it
/// dereferences to it); its upstreams, routes and built-in endpoints are live objects.
pub struct Snapshot {
    pub config: Config,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub routes: RouteTable,
    /// The built-in `POST {prefix}/step-up` route of each policy that issues step-up tokens.
    pub step_up_routes: BTreeMap<String, Arc<Route>>,
    /// The consumers' security page and enrolment API, and their synthetic routes.
    pub self_service: SelfService,
}

impl Deref for Snapshot {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

/// The gateway's own endpoints under their prefix, with their synthetic routes.
pub struct SelfService {
    pub spec: SelfServiceSpec,
    /// The page and its assets (no credentials).
    pub page_route: Arc<Route>,
    /// The enrolment API (API key required; codes checked per call).
    pub api_route: Arc<Route>,
}

impl Deref for SelfService {
    type Target = SelfServiceSpec;
    fn deref(&self) -> &SelfServiceSpec {
        &self.spec
    }
}

impl Snapshot {
    /// Builds the live objects of a configuration that validated: nothing here can fail,
    /// and no connection is opened (pools connect on first use).
    pub fn build(config: Config) -> Self {
        let upstreams: BTreeMap<String, Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|(name, spec)| (name.clone(), Arc::new(Upstream::from_spec(spec))))
            .collect();
        // Validation resolved every route's upstream; a route naming none is not built.
        let routes = config
            .routes
            .iter()
            .filter_map(|spec| Some(Route::new(spec, upstreams.get(&spec.upstream)?.clone())))
            .collect();
        let step_up_routes = step_up_routes(&config.policies, &config.self_service.step_up_path);
        let self_service = self_service(&config.self_service);
        Self {
            upstreams,
            routes: RouteTable::new(routes),
            step_up_routes,
            self_service,
            config,
        }
    }
}

/// A synthetic route of the gateway's own endpoints: under the prefix, for any host.
fn builtin_route(
    name: &str,
    label: &str,
    path: &str,
    methods: &[Method],
    upstream: &Arc<Upstream>,
    policy: Arc<Policy>,
    body_bytes: u64,
) -> Arc<Route> {
    let mut route = Route::new(
        &RouteSpec {
            name: name.to_owned(),
            host: None,
            path: path.to_owned(),
            methods: Some(methods.to_vec()),
            upstream: upstream.name.clone(),
            policy,
            strip_prefix: false,
            body_bytes,
            websocket: None,
            line: 0,
        },
        upstream.clone(),
    );
    route.label = Arc::from(label);
    Arc::new(route)
}

fn self_service(spec: &SelfServiceSpec) -> SelfService {
    let upstream = Arc::new(Upstream::builtin("stepgate", Target::SelfService));
    let route = |name: &str, policy: &Arc<Policy>, methods: &[Method], body_bytes: u64| {
        builtin_route(
            name,
            name,
            &spec.prefix,
            methods,
            &upstream,
            policy.clone(),
            body_bytes,
        )
    };
    SelfService {
        page_route: route(
            "_stepgate/page",
            &spec.page_policy,
            &[Method::GET, Method::HEAD],
            0,
        ),
        api_route: route(
            "_stepgate/self-service",
            &spec.api_policy,
            &[Method::GET, Method::POST, Method::DELETE],
            SelfServiceSpec::API_BODY_BYTES,
        ),
        spec: spec.clone(),
    }
}

fn step_up_routes(
    policies: &BTreeMap<String, Arc<Policy>>,
    path: &str,
) -> BTreeMap<String, Arc<Route>> {
    let upstream = Arc::new(Upstream::builtin("stepgate", Target::StepUp));
    policies
        .iter()
        .filter(|(_, p)| p.asks_second_factor() && !p.step_up.ttl.is_zero())
        .map(|(name, policy)| {
            let route = builtin_route(
                &format!("_stepgate/step-up:{name}"),
                "_stepgate/step-up",
                path,
                &[Method::POST],
                &upstream,
                policy.clone(),
                4096,
            );
            (name.clone(), route)
        })
        .collect()
}
