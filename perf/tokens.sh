#!/usr/bin/env bash
# Token limits (issue 14's "Measure"), self-contained on the e2e harness
# (bench/src/bin/tokens_perf.rs starts Postgres, Redis, authd, the proxies, nginx):
#
#   MODE=cost (default)  forwarding CPU µs/request and Redis calls/request with token limits
#                        off vs on, beside the nginx reverse proxy, same run; a Markdown table.
#   MODE=overshoot       60 s, 64 clients, one org at 10,000 TPM, two proxies, a fake upstream
#                        with realistic usage; admitted tokens per minute window; exits non-zero
#                        if any window went above the limit.
#
#   flock /tmp/ibex-perf.lock perf/tokens.sh                 # RATE=2000 SECS=10 ROUNDS=3 CONNS=32
#   MODE=overshoot flock /tmp/ibex-perf.lock perf/tokens.sh  # TPM=10000 CLIENTS=64 SECS=60 BACKOFF_MS=100
#   BEFORE_PROXY=/path/to/other/ibex-proxy (cost mode): a fourth row, that build with limits on
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ibex-proxy -p ibex-authd -p ibex-bench \
  --bin ibex-proxy --bin ibex-authd --bin ibexctl --bin loadgen --bin tokens_perf
uptime
# Proxies, Redis, Postgres, authd and the nginx reverse proxy on SERVER_CPU (inherited);
# loadgen and the fake upstream on LOAD_CPU.
SERVER_CPU=${SERVER_CPU:-0} LOAD_CPU=${LOAD_CPU:-1} taskset -c "${SERVER_CPU:-0}" target/release/tokens_perf
uptime
