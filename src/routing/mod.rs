//! The route table: which route, upstream and policy a request gets.
//!
//! Precedence, most specific first: a route with a `host` beats one without; then the longer
//! `path` (more segments); then a route with `methods` beats one without; then file order. The
//! table is sorted once at load time, so matching is the first hit of a linear scan.

pub mod guard;

use std::sync::Arc;

use http::Method;

use crate::config::{Policy, RouteSpec};
use crate::upstream::Upstream;

/// A validated route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// The name as a shared metric label.
    pub label: Arc<str>,
    /// Lower-case host name without port; `None` matches any host.
    pub host: Option<String>,
    /// Canonical path prefix without trailing `/` (except the root `/`).
    pub path: String,
    /// `None` matches every method.
    pub methods: Option<Vec<Method>>,
    pub upstream: Arc<Upstream>,
    pub policy: Arc<Policy>,
    /// Forward the path with `path` removed from its front.
    pub strip_prefix: bool,
    /// Request body limit for this route.
    pub body_bytes: u64,
    /// WebSocket upgrades are tunnelled, and what a tunnel does when its token expires.
    pub websocket: Option<crate::config::OnTokenExpiry>,
    /// Line in `gateway.yaml`, for messages.
    pub line: u64,
    /// This route's request metrics.
    pub metrics: crate::metrics::RouteHandles,
}

impl Route {
    /// The table entry of a validated route, on its upstream.
    pub fn new(spec: &RouteSpec, upstream: Arc<Upstream>) -> Self {
        Self {
            name: spec.name.clone(),
            label: Arc::from(spec.name.as_str()),
            host: spec.host.clone(),
            path: spec.path.clone(),
            methods: spec.methods.clone(),
            upstream,
            policy: spec.policy.clone(),
            strip_prefix: spec.strip_prefix,
            body_bytes: spec.body_bytes,
            websocket: spec.websocket,
            line: spec.line,
            metrics: Default::default(),
        }
    }

    fn path_matches(&self, path: &str) -> bool {
        segment_prefix(&self.path, path)
    }

    /// `host`: the request's canonical host name (lower case, as the route's).
    fn host_matches(&self, host: Option<&[u8]>) -> bool {
        match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.as_bytes() == got,
            (Some(_), None) => false,
        }
    }

    fn method_matches(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
    }

    /// The path sent upstream for a request `path` this route matched.
    pub fn forward_path<'a>(&self, path: &'a str) -> &'a str {
        if !self.strip_prefix || self.path == "/" {
            return path;
        }
        match &path[self.path.len()..] {
            "" => "/",
            rest => rest,
        }
    }

    fn precedence(&self) -> (bool, usize, bool) {
        let segments = if self.path == "/" {
            0
        } else {
            self.path.matches('/').count()
        };
        (self.host.is_some(), segments, self.methods.is_some())
    }
}

/// `/orders` matches `/orders`, `/orders/` and `/orders/7`, never `/ordersX`.
fn segment_prefix(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Why no route took a request, for `stepgate explain` and the 404 detail.
#[derive(Debug)]
pub enum Miss<'a> {
    /// No route's path is a prefix of the request path.
    NoPath,
    /// Routes matched the path but not the host or method.
    Near(Vec<&'a Route>),
}

/// Routes sorted by precedence.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// `routes` in file order.
    pub fn new(routes: Vec<Route>) -> Self {
        let mut routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        // Stable sort keeps file order among equals.
        routes.sort_by_key(|r| std::cmp::Reverse(r.precedence()));
        Self { routes }
    }

    /// The route for a request; `host` canonical (lower case, without port), `path` canonical.
    pub fn find(&self, host: Option<&[u8]>, method: &Method, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| r.path_matches(path) && r.host_matches(host) && r.method_matches(method))
    }

    /// Like [`find`](Self::find), but says why nothing matched.
    pub fn explain(
        &self,
        host: Option<&[u8]>,
        method: &Method,
        path: &str,
    ) -> Result<&Arc<Route>, Miss<'_>> {
        if let Some(route) = self.find(host, method, path) {
            return Ok(route);
        }
        let near: Vec<&Route> = self
            .routes
            .iter()
            .filter(|r| r.path_matches(path))
            .map(Arc::as_ref)
            .collect();
        Err(if near.is_empty() {
            Miss::NoPath
        } else {
            Miss::Near(near)
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, host: Option<&str>, path: &str, methods: Option<&[Method]>) -> Route {
        Route {
            name: name.into(),
            label: Arc::from(name),
            host: host.map(Into::into),
            path: path.into(),
            methods: methods.map(<[Method]>::to_vec),
            upstream: Arc::new(Upstream::echo("demo")),
            policy: Arc::new(Policy::public("public")),
            strip_prefix: false,
            body_bytes: 1,
            websocket: None,
            line: 1,
            metrics: Default::default(),
        }
    }

    fn name(table: &RouteTable, host: Option<&str>, method: Method, path: &str) -> Option<String> {
        table
            .find(host.map(str::as_bytes), &method, path)
            .map(|r| r.name.clone())
    }

    #[test]
    fn whole_segments() {
        let t = RouteTable::new(vec![route("o", None, "/orders", None)]);
        assert_eq!(name(&t, None, Method::GET, "/orders").as_deref(), Some("o"));
        assert_eq!(
            name(&t, None, Method::GET, "/orders/").as_deref(),
            Some("o")
        );
        assert_eq!(
            name(&t, None, Method::GET, "/orders/7").as_deref(),
            Some("o")
        );
        assert_eq!(name(&t, None, Method::GET, "/ordersX"), None);
        assert_eq!(name(&t, None, Method::GET, "/"), None);
    }

    #[test]
    fn precedence() {
        let t = RouteTable::new(vec![
            route("root", None, "/", None),
            route("any", None, "/orders", None),
            route("get", None, "/orders", Some(&[Method::GET])),
            route("deep", None, "/orders/archive", None),
            route("host", Some("api.example.com"), "/", None),
        ]);
        assert_eq!(
            name(&t, None, Method::GET, "/orders/7").as_deref(),
            Some("get")
        );
        assert_eq!(
            name(&t, None, Method::POST, "/orders/7").as_deref(),
            Some("any")
        );
        assert_eq!(
            name(&t, None, Method::GET, "/orders/archive/1").as_deref(),
            Some("deep")
        );
        assert_eq!(
            name(&t, Some("api.example.com"), Method::GET, "/orders").as_deref(),
            Some("host")
        );
        assert_eq!(
            name(&t, Some("api.example.com"), Method::GET, "/x").as_deref(),
            Some("host")
        );
        assert_eq!(name(&t, None, Method::GET, "/x").as_deref(), Some("root"));
    }

    #[test]
    fn file_order_breaks_ties() {
        let t = RouteTable::new(vec![
            route("first", None, "/a", Some(&[Method::GET])),
            route("second", None, "/a", Some(&[Method::GET, Method::POST])),
        ]);
        assert_eq!(name(&t, None, Method::GET, "/a").as_deref(), Some("first"));
        assert_eq!(
            name(&t, None, Method::POST, "/a").as_deref(),
            Some("second")
        );
    }

    #[test]
    fn strip_prefix() {
        let mut r = route("o", None, "/orders", None);
        r.strip_prefix = true;
        assert_eq!(r.forward_path("/orders/7"), "/7");
        assert_eq!(r.forward_path("/orders"), "/");
        assert_eq!(r.forward_path("/orders/"), "/");
    }
}
