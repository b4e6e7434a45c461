#!/usr/bin/env bash
# A throwaway stack for the ledger's perf runs, then `"$@"` inside it: its own Postgres (as the
# postgres user when root), Redis and ibex-authd (release) on free loopback ports under a temp dir,
# migrated; the IBEX_* variables a proxy and ibexctl need are exported (PERF_STACK=1,
# PERF_STACK_PSQL="psql and its args" for counting rows). Everything is stopped and removed at the end.
#
#   perf/ledger-stack.sh NOLEDGER=1 perf/upstream-compare.sh   # (env assignments allowed first)
#   perf/ledger-stack.sh perf/ledger-soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
AUTHD_CPU=${AUTHD_CPU:-1}
cargo build --release -q -p ibex-proxy -p ibex-authd -p ibex-bench --bin ibex-proxy --bin ibex-authd \
  --bin ibexctl --bin loadgen
stack=$(mktemp -d /tmp/ibex-stack-XXXXXX)
chmod 755 "$stack"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
stop_stack() {
  kill "${AUTHD_PID:-}" 2>/dev/null || true
  [ -n "${REDIS_PORT:-}" ] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  as_pg "$PGBIN/pg_ctl" -D "$stack/pg" -m immediate stop >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$stack"
}
trap stop_stack EXIT

PG_PORT=$(free_port); REDIS_PORT=$(free_port); GRPC_PORT=$(free_port); AHTTP_PORT=$(free_port)
mkdir -p "$stack/pg" "$stack/sock"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$stack/pg" "$stack/sock"
as_pg "$PGBIN/initdb" -D "$stack/pg" -U postgres -A trust -E UTF8 --locale=C --no-instructions >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$stack/pg" -l "$stack/sock/pg.log" -w -o \
  "-p $PG_PORT -k $stack/sock -c listen_addresses=127.0.0.1" start >/dev/null
as_pg "$PGBIN/psql" -h "$stack/sock" -p "$PG_PORT" -U postgres -d postgres -qc "create database ibex"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --dir "$stack" --logfile "$stack/redis.log"

export PERF_STACK=1
export PERF_STACK_PSQL="$PGBIN/psql -h $stack/sock -p $PG_PORT -U postgres -d ibex"
export IBEX_ADMIN_KEY="perf-admin-$(openssl rand -hex 16)"
export IBEX_SERVICE_KEY="perf-service-$(openssl rand -hex 16)"
export IBEX_DATABASE_ADMIN_URL="postgres://postgres@127.0.0.1:$PG_PORT/ibex"
export IBEX_DATABASE_URL="postgres://ibex_app@127.0.0.1:$PG_PORT/ibex"
export IBEX_AUTHD_GRPC="http://127.0.0.1:$GRPC_PORT"
export IBEX_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
target/release/ibexctl migrate >/dev/null
IBEX_AUTHD_GRPC_LISTEN=127.0.0.1:$GRPC_PORT IBEX_AUTHD_HTTP_LISTEN=127.0.0.1:$AHTTP_PORT IBEX_LOG=warn \
  taskset -c "$AUTHD_CPU" target/release/ibex-authd > "$stack/authd.out" 2> "$stack/authd.err" &
AUTHD_PID=$!
export PERF_AUTHD_PID=$AUTHD_PID
for _ in $(seq 300); do curl -fs "http://127.0.0.1:$AHTTP_PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
env "$@"
