//! ibex-authd: token and agent validation over gRPC.
