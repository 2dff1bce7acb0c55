//! The standing adversarial suite: the gateway attacked as a black box, over raw HTTP/1.1
//! sockets and HTTP/2 frames, against recording and misbehaving upstreams. Every test asserts
//! both what the client gets and what the upstream received (nothing, or exactly the
//! canonical request), so that the next way past the gate is caught here.
//!
//! - `host`: spellings of one host, ambiguous hosts, authority against `Host`;
//! - `headers`: look-alikes of credential and identity headers, underscores, identity and
//!   connection facts sent by the client;
//! - `connection`: `Connection` options naming what the gateway adds or reads;
//! - `framing`: `Content-Length` with `Transfer-Encoding`, codings, malformed chunks;
//! - `limits`: request targets and heads over the limits;
//! - `upstream_faults`: stalls at every phase, resets, `1xx` answers;
//! - `paths`: dot segments with path parameters;
//! - `watcher`: trace logging into a watched directory.

mod tools;

mod connection;
mod framing;
mod headers;
mod host;
mod limits;
mod paths;
mod properties;
mod upstream_faults;
mod watcher;
