//! Shared helpers for the benches in `benches/`.
