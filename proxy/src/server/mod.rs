//! Worker threads, listeners and the connection loop.
