#!/usr/bin/env bash
# Ten rolling restarts of ibex-proxy under 1,000 req/s on 16 keep-alive connections, a
# streamed response in flight across every SIGTERM (issue 12 item 4). Self-contained: the tool
# (bench/src/bin/rolling_restart.rs) starts its own Postgres, Redis, authd, a slow streaming
# fake upstream (perf/fake_sse_upstream.py) and the proxies, and prints one JSON object:
# loadgen's errors/statuses/reconnects and how many streams completed on their old process.
# Root (it sets net.ipv4.tcp_migrate_req=1), Postgres binaries, redis-server and python3.
#
#   flock /tmp/ibex-perf.lock perf/rolling-restart.sh          # RESTARTS=10 RATE=1000 CONNS=16
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ibex-proxy -p ibex-authd -p ibex-bench \
  --bin ibex-proxy --bin ibex-authd --bin ibexctl --bin loadgen --bin rolling_restart
# The proxies run on SERVER_CPU (inherited), loadgen on LOAD_CPU.
LOAD_CPU=${LOAD_CPU:-1} taskset -c "${SERVER_CPU:-0}" target/release/rolling_restart
