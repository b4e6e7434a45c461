//! ibex-proxy library.
