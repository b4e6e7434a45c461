//! ibex-proxy: the thread-per-core HTTP/1.1 edge of IBEX Harness.
//!
//! Layers, outermost first (no import runs back up; `docs/ARCHITECTURE.md`
//! walks one request through them):
//! - [`server`]: worker threads, one monoio runtime and SO_REUSEPORT
//!   listener each, the connection loop, timeouts and draining.
//! - [`chain`]: request id → route → token → agent → permission → rate
//!   limit → handler, built in one place ([`chain::wiring`]).
//! - [`auth`], [`ratelimit`], [`upstream`]: the per-core pieces the chain
//!   calls, each given the worker's [`ctx::WorkerCtx`] or its clock.
//! - [`error`]: every refusal and the SPEC §3 envelope; [`metrics`]: the
//!   per-worker counters and `/metrics`.
//! - At the bottom, importing nothing of the crate above them: [`http`] (the
//!   HTTP/1.1 codec), [`routes`] (the route table), [`request_id`],
//!   [`clock`].

pub mod addr;
pub mod auth;
pub mod chain;
pub mod clock;
pub mod config;
pub mod ctx;
pub mod error;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod providers;
pub mod ratelimit;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod tls;
pub mod tokens;
pub mod upstream;
