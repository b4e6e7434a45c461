//! End-to-end harness for the IBEX test suites.
//!
//! Starts throwaway services on free loopback ports and the real binaries against them:
//! [`pg::Postgres`] (a private cluster in a temp dir), [`redis::Redis`], and, in [`procs`],
//! helpers to find and run the workspace binaries. Nothing here touches the system services or a
//! fixed port, and every process is stopped when its handle is dropped — also when the test
//! binary itself dies, through a small watchdog process (see [`watchdog`]).

pub mod certs;
pub mod http;
pub mod pg;
pub mod procs;
pub mod redis;
pub mod stack;
pub mod wait;
pub mod watchdog;

pub use nix::sys::signal::Signal;
pub use pg::Postgres;
pub use procs::{Authd, Proxy};
pub use redis::{Redis, RedisCluster};
pub use stack::{Seed, Stack};
