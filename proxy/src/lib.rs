//! ibex-proxy: the thread-per-core HTTP/1.1 edge of IBEX Harness.
//!
//! Layers, outermost first:
//! - [`server`]: worker threads, one monoio runtime and SO_REUSEPORT
//!   listener each, the connection loop, timeouts and draining.
//! - [`http`]: the HTTP/1.1 codec (httparse), limits and smuggling defences.
//! - [`chain`]: request id → route → token → agent → permission → rate
//!   limit → handler, built in one place.
//! - [`auth`], [`ratelimit`], [`upstream`]: the per-core pieces the chain
//!   calls; [`error`] renders every refusal as the SPEC §3 envelope.

pub mod auth;
pub mod chain;
pub mod config;
pub mod error;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod ratelimit;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod upstream;
