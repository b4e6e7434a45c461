//! Permission bits of a PAT (SPEC §2): defined once in [`ibex_proto::perms`],
//! which the proxy uses too, so both binaries agree on what each bit means.

pub use ibex_proto::perms::*;
