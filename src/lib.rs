//! # stepgate
//!
//! An API gateway that puts a second factor in front of API calls. This crate is the whole
//! gateway; `main.rs` only calls [`cli::main`].
//!
//! ## A request's path
//! - [`server`]: TCP accept, TLS termination (rustls), HTTP/1.1 + HTTP/2 (hyper), connection
//!   limits, idle and header-read timeouts, graceful drain; each request gets its
//!   [`context`] (the [`snapshot`] it runs on, its [`connection`]'s facts).
//! - [`stack`]: the tower stack, assembled in one function, in request order:
//!   - [`sensitive`], [`observe`]: credentials marked sensitive; the front: request id,
//!     refusals ([`error::Refusal`]) made problem+json in one place, the
//!     [`security_headers`], the access log, and the guards it runs:
//!   - [`edge`]: the guards before routing: limits, the canonical [`host`] and [`path`], the
//!     client's address, the client's headers cleaned ([`client_headers`]);
//!   - [`routing`]: the route table and the routing guard;
//!   - [`auth`]: failure limiter, API key, consumer ban, roles, second factor;
//!   - [`selfservice`]: the consumers' own security page and enrolment API, answered by the
//!     gateway under its prefix (never forwarded);
//!   - [`proxy`]: forwarding to the route's [`upstream`] (http(s) pools, or the echo).
//!
//! ## Beside it: the state behind ports
//! - [`store`]: the durable store and its change feed (SQLite; a shared store for several
//!   nodes implements the same port);
//! - [`tokens`]: the step-up token store; [`limiter`]: the attempt limiter (failure counts and
//!   bans); each a port with a one-node implementation;
//! - [`directory`]: the request path's read model of consumers, fed by the store's changes;
//!   [`accounts`]: every write operation (admin and self-service) and the code check;
//!   [`views`]: consumers as the admin API shows them;
//! - [`config`]: YAML to a validated [`config::Config`]; [`audit`], [`metrics`], [`sms`],
//!   [`enrollment`], [`credentials`], [`secrets`], [`tls`], [`clock`], [`timer`];
//! - [`admin`], [`reload`], [`cli`], [`startup`].
//!
//! ## Layers
//!
//! Every module sits in one layer and imports only from its own layer and the ones above it
//! in this table (lower numbers); `tests/layering.rs` reads this table and checks every
//! `crate::` path in `src/` against it.
//!
//! | layer | modules | what they are |
//! |---|---|---|
//! | 1 | `clock`, `timer`, `secrets`, `header_names`, `host`, `path`, `client_headers`, `credentials`, `json_path`, `error` | leaves: values and pure rules (and a connection's kept timers) |
//! | 2 | `store`, `tls`, `sms`, `audit`, `tokens`, `config` | the durable store, its records, settings |
//! | 3 | `limiter`, `directory`, `metrics` | state the request path reads |
//! | 4 | `accounts`, `views`, `enrollment`, `approvals` | operations on that state |
//! | 5 | `upstream` | upstream targets and their pools |
//! | 6 | `routing` | the route table |
//! | 7 | `snapshot` | a configuration ready to serve |
//! | 8 | `connection` | a client connection's facts |
//! | 9 | `context` | a request's facts |
//! | 10 | `guard`, `sensitive`, `observe`, `security_headers` | tower plumbing |
//! | 11 | `edge`, `routing::guard` | the guards before routing, and routing |
//! | 12 | `auth` | the credential layers |
//! | 13 | `selfservice` | the gateway's own endpoints |
//! | 14 | `proxy` | forwarding |
//! | 15 | `stack`, `server`, `admin`, `reload`, `cli`, `startup` | assembly |

#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod approvals;
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
pub mod json_path;
pub mod limiter;
pub mod metrics;
pub mod observe;
pub mod path;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod secrets;
pub mod security_headers;
pub mod selfservice;
pub mod sensitive;
pub mod server;
pub mod sms;
pub mod snapshot;
pub mod stack;
pub mod startup;
pub mod store;
pub mod timer;
pub mod tls;
pub mod tokens;
pub mod upstream;
pub mod views;

pub use server::Gateway;
pub use startup::Error;
