#!/usr/bin/env bash
# Revocation latency (issue 12 item 3): from a revocation returning to a refusal (401) on both
# of two proxies, N revocations made with `ibexctl token revoke` and N made as a direct SQL
# `UPDATE ibex_core.tokens SET revoked_at = now()`. Prints p50/p90/p99/max for each.
#
# The stack is the e2e harness's (tests/tests/multi_authd.rs, `revocation_latency_benchmark`):
# a private Postgres and Redis, two authd, two proxies (2 workers each) each listing both authd;
# release builds. Each revocation is watched on two keep-alive connections per proxy (most
# likely both of its workers), each polling every 0.5 ms; the sample is the slowest of the four.
# Everything runs on both cores (the poller and the servers are one process tree, not pinned
# apart): a latency figure, not a throughput one.
#
#   perf/revocation.sh                      # N=100
#   N=200 perf/revocation.sh
#   IBEX_E2E_BIN_IBEX_AUTHD=/path/to/older/ibex-authd perf/revocation.sh   # another authd build
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100}
cargo build --release -q --workspace --bins
cargo test --release -q -p ibex-e2e --test multi_authd --no-run
uptime
IBEX_REVOCATION_BENCH_N=$N flock "${PERF_LOCK:-/tmp/ibex-perf.lock}" \
    cargo test --release -q -p ibex-e2e --test multi_authd revocation_latency_benchmark -- --nocapture 2>&1 \
    | grep -E '^revocation via|^  the invalidation|test result'
uptime
