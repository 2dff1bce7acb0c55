//! # stepgate
//!
//! An API gateway that puts a second factor in front of API calls. This crate is the whole
//! gateway; `main.rs` only calls [`cli::main`].
//!
//! ## Layout: a request's path
//! - [`server`]: TCP accept, TLS termination (rustls), HTTP/1.1 + HTTP/2 (hyper), connection
//!   limits, idle and header-read timeouts, graceful drain.
//! - [`stack`]: the tower stack, assembled in one function, in request order:
//!   - [`observe`]: request id, configuration snapshot, access log;
//!   - [`rescue`]: refusals ([`error::Refusal`]) become problem+json, in one place;
//!   - [`limits`]: URI and header limits;
//!   - [`host`], [`path`]: canonical host and path, ambiguous forms refused;
//!   - [`client_headers`]: the client's headers cleaned in one pass (look-alikes of
//!     credential and identity headers refused, identity and hop-by-hop headers removed,
//!     ambiguous framing refused);
//!   - [`routing`]: route table and the routing layer;
//!   - [`auth`]: failure limiter, API key, consumer ban, roles, second factor;
//!   - [`selfservice`]: the consumers' own security page and enrolment API, answered by the
//!     gateway under its prefix (never forwarded);
//!   - [`proxy`]: forwarding to http(s) upstreams or the built-in echo upstream.
//! - Beside the path: [`header_names`] (which header names mean what), [`config`] (YAML to validated [`config::Snapshot`]), [`registry`] and
//!   [`store`] (consumers and credentials), [`sms`] (the SMS factor and its Twilio client),
//!   [`enrollment`] (who is enrolled for which policy), [`admin`], [`tls`], [`cli`].

#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod client_headers;
pub mod clock;
pub mod config;
pub mod connection;
pub mod context;
pub mod credentials;
pub mod directory;
pub mod edge;
pub mod enrollment;
pub mod error;
pub mod guard;
pub mod header_names;
pub mod host;
pub mod limiter;
pub mod metrics;
pub mod observe;
pub mod path;
pub mod proxy;
pub mod reload;
pub mod rescue;
pub mod routing;
pub mod secrets;
pub mod selfservice;
pub mod sensitive;
pub mod server;
pub mod sms;
pub mod snapshot;
pub mod stack;
pub mod startup;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod upstream;
pub mod views;

pub use server::Gateway;
pub use startup::Error;
