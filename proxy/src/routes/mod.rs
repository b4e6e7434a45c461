//! Handlers for the proxy routes.
