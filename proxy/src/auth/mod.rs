//! Authentication and agent identity for the chain: per-core token and agent
//! caches, the flood guard, single-flight, the authd bridge and the
//! invalidation feed.
//!
//! Layout: [`step`] is what the chain calls; [`core`] is one worker's state
//! and trust rule; [`cache`], [`bounded`], [`flight`], [`guard`] are its
//! parts; [`backend`] is the authd interface and [`bridge`] its tonic
//! implementation; [`principal`] holds the proofs the steps hand on;
//! [`secret`] keeps the bearer out of logs.

pub mod backend;
pub mod bounded;
pub mod bridge;
pub mod budget;
pub mod cache;
pub mod core;
pub mod flight;
pub mod guard;
pub mod principal;
pub mod recent;
pub mod secret;
pub mod step;

pub use backend::{
    AgentAnswer, AgentLimits, AuthBackend, OrgLimits, TokenAnswer, Unavailable, ValidToken,
};
pub use core::{AuthCore, AuthSettings, AuthShared, FeedEvent};
pub use principal::{Principal, TokenGrant};
pub use step::Authenticator;
