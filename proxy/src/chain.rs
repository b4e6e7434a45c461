//! The security chain, built in one place.
