//! ibex-authd: token and agent validation over gRPC, the schema's runtime side, and the
//! `ibexctl` operator CLI (SPEC §6–§8).
//!
//! Layers, outermost first: [`server`] (wiring, listeners, drain) → [`service`] (gRPC decoding,
//! status codes) and [`authz`] (who is calling) → [`validator`] (the ValidateToken decision) over
//! [`cache`], [`throttle`], [`hasher`] → [`store`] (every SQL statement) and [`audit`].
//! [`feed`] turns Postgres NOTIFY into the WatchInvalidations stream; [`usage`] batches
//! `last_used_at`; [`pgtls`] turns a DSN's `sslmode` into a rustls connector. [`ctl`] is ibexctl.

pub mod audit;
pub mod authz;
pub mod cache;
pub mod config;
pub mod ctl;
pub mod feed;
pub mod hasher;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod pat;
pub mod perms;
pub mod pgtls;
pub mod server;
pub mod service;
pub mod store;
pub mod throttle;
pub mod usage;
pub mod validator;
