//! Configuration from `IBEX_*` environment variables.
