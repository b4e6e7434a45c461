#!/usr/bin/env bash
# The proxy's auth probe with its rate limiter on a single Redis vs a 3-master Redis Cluster
# (3 replicas), same run, with 1 org and with ORGS orgs (issue 12's "Measure"): proxy CPU µs per
# request, Redis calls per request, Redis CPU µs per request. Self-contained: the tool
# (bench/src/bin/rl_proxy.rs) starts Postgres, authd, a single Redis and a six-node cluster
# (`redis-server --cluster-enabled yes` ×6, `redis-cli --cluster create … --cluster-replicas 1`,
# the e2e harness's RedisCluster) and one single-worker proxy per backend; prints a Markdown
# table, one row per backend × org set × round.
#
#   flock /tmp/ibex-perf.lock perf/rl-proxy.sh       # RATE=5000 SECS=8 ROUNDS=3 ORGS=1000 CONNS=32
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ibex-proxy -p ibex-authd -p ibex-bench \
  --bin ibex-proxy --bin ibex-authd --bin ibexctl --bin loadgen --bin rl_proxy
# Proxies and Redis on SERVER_CPU (inherited), loadgen on LOAD_CPU.
LOAD_CPU=${LOAD_CPU:-1} taskset -c "${SERVER_CPU:-0}" target/release/rl_proxy
