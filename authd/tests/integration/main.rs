//! authd against a real Postgres (issue 3, "Tests that must exist"). Each test starts its own
//! throwaway cluster (`ibex_e2e::Postgres`) and runs authd in-process on 127.0.0.1:0; the CLI
//! tests run the real `ibexctl` and `ibex-authd` binaries.
//!
//! Run: `cargo test -p ibex-authd --test integration`

// Setup helpers panic on failure, like the tests themselves.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod authorisation;
mod cli;
mod common;
mod control;
mod invalidation;
mod lifecycle;
mod rls_audit;
mod tls;
