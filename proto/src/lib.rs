//! Generated types and client/server stubs for `ibex.auth.v1` (SPEC §6).
//! No hand-written logic lives here.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod auth {
    pub mod v1 {
        tonic::include_proto!("ibex.auth.v1");
    }
}

pub use auth::v1 as pb;
