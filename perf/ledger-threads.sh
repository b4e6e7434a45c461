#!/usr/bin/env bash
# Where the proxy's CPU goes, per thread (issue 13: the usage ledger's writer and shipper beside
# the worker): one release ibex-proxy (1 worker, the whole process on SERVER_CPU) forwarding
# non-streamed chat to an nginx fake upstream, wrk at peak (-t1 -c32) on LOAD_CPU for DUR
# seconds — or loadgen at a fixed RATE req/s when RATE is set — ROUNDS times; after each round,
# every thread's run time per request, from /proc/<pid>/task/*/schedstat (the scheduler's ns;
# until 2026-12-02 utime+stime, which this kernel samples per 4 ms tick: coarse for the spool's
# threads, which run ~1 ms at a time). PERFREC=1 also records round 2 with `perf record -e cpu-clock -g` into
# $PERF_DATA (default /tmp/ibex-ledger-threads.perf.data).
#
# Runs inside perf/ledger-stack.sh (Postgres, Redis, release authd), under the measurement lock:
#
#   flock /tmp/ibex-perf.lock perf/ledger-stack.sh perf/ledger-threads.sh
#   PROXY_BIN=/tmp/old-ibex-proxy flock /tmp/ibex-perf.lock perf/ledger-stack.sh perf/ledger-threads.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${PERF_STACK:-}" ] || exec perf/ledger-stack.sh "$0" "$@"
PROXY_BIN=${PROXY_BIN:-target/release/ibex-proxy}
DUR=${DUR:-10}
ROUNDS=${ROUNDS:-3}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PERF_DATA=${PERF_DATA:-/tmp/ibex-ledger-threads.perf.data}
work=$(mktemp -d /tmp/ibex-threads-XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  kill "${FAKE_PID:-}" "${PROXY_PID:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
FAKE_PORT=$(free_port); PROXY_PORT=$(free_port)
sed "s#__DIR__#$work#g; s#__PORT__#$FAKE_PORT#g" perf/nginx-fake-upstream.conf > "$work/fake.conf"
taskset -c "$LOAD_CPU" nginx -c "$work/fake.conf" -p "$work" &
FAKE_PID=$!
IBEX_PROXY_LISTEN=127.0.0.1:$PROXY_PORT IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:0 IBEX_USAGE_SPOOL_DIR=$work/spool \
IBEX_PROXY_THREADS=1 IBEX_LOG=warn IBEX_AUTH_VALIDATE_TIMEOUT=2s \
IBEX_UPSTREAM_URL=http://127.0.0.1:$FAKE_PORT/v1 IBEX_UPSTREAM_API_KEY=sk-perf \
  taskset -c "$SERVER_CPU" "$PROXY_BIN" > "$work/proxy.out" 2> "$work/proxy.err" &
PROXY_PID=$!
for _ in $(seq 100); do grep -q IBEX_READY "$work/proxy.out" 2>/dev/null && break; sleep 0.1; done
CTL=target/release/ibexctl
ORG=$("$CTL" org create --name "perf-th-$$" --rpm 2000000000 | sed -E 's/.*"id": *"([^"]+)".*/\1/')
AGENT=$("$CTL" agent create --org "$ORG" --name perf | sed -E 's/.*"id": *"([^"]+)".*/\1/')
TOKEN=$("$CTL" token create --org "$ORG" --name perf --permissions all | sed -E 's/.*"token": *"([^"]+)".*/\1/')
BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
for _ in $(seq 100); do
  curl -fsS -X POST "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" -H "Authorization: Bearer $TOKEN" \
    -H "X-IBEX-Agent-ID: $AGENT" -H "Content-Type: application/json" -d "$BODY" >/dev/null 2>&1 && break
  sleep 0.1
done
cat > "$work/post-auth.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.headers["X-IBEX-Agent-ID"] = "$AGENT"
LUA
# "name#tid ticks" per thread, sorted (thread names may repeat).
snap() {
  for t in /proc/"$PROXY_PID"/task/*; do
    echo "$(tr ' ' _ < "$t/comm")#$(basename "$t") $(awk '{print $1}' "$t/schedstat")"
  done | sort
}
uptime
for round in $(seq "$ROUNDS"); do
  snap > "$work/before"
  if [ -n "${PERFREC:-}" ] && [ "$round" = 2 ]; then
    (sleep 1; perf record -q -e cpu-clock -F 2000 -g -p "$PROXY_PID" -o "$PERF_DATA" -- sleep $((DUR - 3)) >/dev/null 2>&1) &
  fi
  if [ -n "${RATE:-}" ]; then
    out=$(taskset -c "$LOAD_CPU" target/release/loadgen --addr "127.0.0.1:$PROXY_PORT" \
          --path /v1/chat/completions --method POST --body "$BODY" -H "Content-Type: application/json" \
          -H "Authorization: Bearer $TOKEN" -H "X-IBEX-Agent-ID: $AGENT" \
          --rate "$RATE" --duration "$DUR" --connections 32)
    rps=$(echo "$out" | sed -E 's/.*"requests":([0-9]+).*/\1/' | awk -v d="$DUR" '{print $1 / d}')
  else
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c32 -d"${DUR}s" -s "$work/post-auth.lua" \
          "http://127.0.0.1:$PROXY_PORT/v1/chat/completions")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  fi
  snap > "$work/after"
  echo "round $round: $rps req/s $(echo "$out" | grep -E 'Non-2xx' || true)"
  join "$work/before" "$work/after" | awk -v r="$rps" -v d="$DUR" '
    { split($1, nm, "#"); by[nm[1]] += $3 - $2; all += $3 - $2 }
    END { n = r * d; for (k in by) if (by[k] > 0) printf "  %-18s %8.3f µs/req\n", k, by[k] / 1e3 / n
          printf "  %-18s %8.3f µs/req\n", "all threads", all / 1e3 / n }'
done
uptime
