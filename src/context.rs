//! What the layers learn about a request on its way in, kept in one request extension: the
//! configuration snapshot it is served under, its connection, and, as the layers find them,
//! its canonical host, route, client address and API key. One extension is one allocation; one per fact made
//! five, plus the map growing twice.

use std::sync::Arc;

use http::Request;

use crate::connection::{ClientIp, ConnInfo};
use crate::directory::KeyEntry;
use crate::error::Refusal;
use crate::host::Host;
use crate::routing::Route;
use crate::snapshot::Snapshot;

#[derive(Clone)]
pub struct Context {
    /// Read once by the outermost layer; the request keeps it to its end.
    pub snapshot: Arc<Snapshot>,
    pub conn: Arc<ConnInfo>,
    /// The canonical host, set before routing; `None` when the request names none.
    pub host: Option<Host>,
    /// Set by routing.
    pub route: Option<Arc<Route>>,
    /// Set by the client-address guard.
    pub client: Option<ClientIp>,
    /// Set by the API-key guard, when the route needs a key and it was valid.
    pub entry: Option<Arc<KeyEntry>>,
    /// The client asked to upgrade to WebSocket (set by the client-headers guard, which
    /// removed the upgrade headers: only a route that tunnels WebSocket puts them back).
    pub websocket: bool,
    /// The credential headers the request carries (set by the client-headers guard).
    pub credentials: crate::client_headers::Credentials,
    /// The request may carry `Content-Length` (false once the client-headers guard saw none).
    pub content_length: bool,
    /// A gRPC request, once the client-headers guard has looked.
    pub grpc: Option<bool>,
}

impl Context {
    pub fn new(snapshot: Arc<Snapshot>, conn: Arc<ConnInfo>) -> Self {
        Self {
            snapshot,
            conn,
            host: None,
            route: None,
            client: None,
            entry: None,
            websocket: false,
            credentials: crate::client_headers::Credentials::UNKNOWN,
            content_length: true,
            grpc: None,
        }
    }

    /// The request's context (inserted by the outermost layer).
    pub fn of<B>(request: &Request<B>) -> Result<&Context, Refusal> {
        request
            .extensions()
            .get::<Context>()
            .ok_or_else(|| Refusal::Internal("request has no context"))
    }

    pub fn of_mut<B>(request: &mut Request<B>) -> Result<&mut Context, Refusal> {
        request
            .extensions_mut()
            .get_mut::<Context>()
            .ok_or_else(|| Refusal::Internal("request has no context"))
    }

    /// The route, once routing has picked it.
    pub fn route_of<B>(request: &Request<B>) -> Option<&Arc<Route>> {
        request.extensions().get::<Context>()?.route.as_ref()
    }

    /// The consumer's key entry, once the API key has been checked.
    pub fn entry_of<B>(request: &Request<B>) -> Option<&Arc<KeyEntry>> {
        request.extensions().get::<Context>()?.entry.as_ref()
    }
}

impl Snapshot {
    /// The snapshot a request was admitted under (in its context, from the server's
    /// connection).
    pub fn of<B>(request: &Request<B>) -> Result<&Arc<Snapshot>, Refusal> {
        Context::of(request).map(|c| &c.snapshot)
    }
}
