#!/usr/bin/env bash
# Forwarding overhead: the same non-streaming chat completion requested
#   direct      loadgen → fake upstream (nginx, fixed JSON with usage)
#   nginx-rp    loadgen → nginx reverse proxy (keep-alive upstream) → fake
#   ibex-proxy  loadgen → ibex-proxy (whole security chain) → fake
#   ibex-noledger  the same binary with IBEX_USAGE_LEDGER=off (no usage record; only with
#               NOLEDGER=1): what the usage ledger costs per request is the difference
# at fixed rates (latency-corrected p50/p99/p99.9), plus CPU µs per request
# of the proxying server (utime+stime from /proc before and after), then
# peak req/s with wrk; last, time to first streamed byte (SSE) direct vs
# through ibex-proxy, against perf/fake_sse_upstream.py.
#
# Needs the dev stack (`make dev`: Postgres, Redis, authd, seeded). Starts
# its own single-threaded ibex-proxy (release) and nginx reverse proxy, both
# pinned to SERVER_CPU; the load generator and the fake upstream share
# LOAD_CPU (the same for every variant, so the differences are the proxy's).
#
#   make dev && perf/upstream-compare.sh
#   RATES="1000 5000" DURATION=10 perf/upstream-compare.sh
#   ONLY_TTFB=1 perf/upstream-compare.sh     # just the streaming part
set -euo pipefail
cd "$(dirname "$0")/.."
# PROXY_BIN=path runs another build of the proxy (e.g. an older commit's) in the same harness.
PROXY_BIN=${PROXY_BIN:-target/release/ibex-proxy}
RATES=${RATES:-"1000 5000"}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
FAKE_PORT=${FAKE_PORT:-18090}
RP_PORT=${RP_PORT:-18091}
PROXY_PORT=${PROXY_PORT:-18092}
SSE_PORT=${SSE_PORT:-18093}
SSE_PROXY_PORT=${SSE_PROXY_PORT:-18094}
SSE_ADMIN_PORT=${SSE_ADMIN_PORT:-18095}
TTFB_REQUESTS=${TTFB_REQUESTS:-200}
NOLEDGER=${NOLEDGER:-}
NOLEDGER_PORT=${NOLEDGER_PORT:-18096}

# Inside perf/ledger-stack.sh (PERF_STACK set) the stack's variables are already exported.
if [ -z "${PERF_STACK:-}" ]; then
  [ -f .ibex/dev.env ] || { echo "run 'make dev' first (or run me under perf/ledger-stack.sh)" >&2; exit 1; }
  # shellcheck disable=SC1091
  set -a; . .ibex/env 2>/dev/null || true; . .ibex/dev.env; . .ibex/shell.env 2>/dev/null || true; set +a
fi
# PERF_AUTHD_GRPC: another authd for the proxy under test (e.g. an older build's own authd).
export IBEX_AUTHD_GRPC=${PERF_AUTHD_GRPC:-${IBEX_AUTHD_GRPC:-http://127.0.0.1:9091}}
# A cold validation (the warm-up request) must not be what a run measures.
export IBEX_AUTH_VALIDATE_TIMEOUT=${IBEX_AUTH_VALIDATE_TIMEOUT:-2s}
# The dev authd is a debug build: give the one cold validation per proxy room.
export IBEX_AUTH_VALIDATE_TIMEOUT=${IBEX_AUTH_VALIDATE_TIMEOUT:-2s}

cargo build --release -q -p ibex-proxy -p ibex-bench --bin ibex-proxy --bin loadgen
work=$(mktemp -d)
cleanup() {
  kill "${FAKE_PID:-}" "${RP_PID:-}" "${PROXY_PID:-}" "${NL_PID:-}" "${SSE_PID:-}" "${SSE_PROXY_PID:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

sed "s#__DIR__#$work#g; s#__PORT__#$FAKE_PORT#g" perf/nginx-fake-upstream.conf > "$work/fake.conf"
taskset -c "$LOAD_CPU" nginx -c "$work/fake.conf" -p "$work" &
FAKE_PID=$!
sed "s#__DIR__#$work#g; s#__PORT__#$RP_PORT#g; s#__UPSTREAM__#127.0.0.1:$FAKE_PORT#g" \
  perf/nginx-reverse-proxy.conf > "$work/rp.conf"
taskset -c "$SERVER_CPU" nginx -c "$work/rp.conf" -p "$work" &
RP_PID=$!

IBEX_PROXY_LISTEN=127.0.0.1:$PROXY_PORT IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:0 IBEX_USAGE_SPOOL_DIR=$work/spool IBEX_PROXY_THREADS=1 IBEX_LOG=warn \
IBEX_UPSTREAM_URL=http://127.0.0.1:$FAKE_PORT/v1 IBEX_UPSTREAM_API_KEY=sk-perf \
  taskset -c "$SERVER_CPU" "$PROXY_BIN" > "$work/proxy.out" 2> "$work/proxy.err" &
PROXY_PID=$!
for _ in $(seq 100); do grep -q IBEX_READY "$work/proxy.out" 2>/dev/null && break; sleep 0.1; done
if [ -n "$NOLEDGER" ]; then
  IBEX_USAGE_LEDGER=off IBEX_PROXY_LISTEN=127.0.0.1:$NOLEDGER_PORT IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:0 IBEX_PROXY_THREADS=1 IBEX_LOG=warn \
  IBEX_UPSTREAM_URL=http://127.0.0.1:$FAKE_PORT/v1 IBEX_UPSTREAM_API_KEY=sk-perf \
    taskset -c "$SERVER_CPU" "$PROXY_BIN" > "$work/nl.out" 2> "$work/nl.err" &
  NL_PID=$!
  for _ in $(seq 100); do grep -q IBEX_READY "$work/nl.out" 2>/dev/null && break; sleep 0.1; done
fi
for port in "$FAKE_PORT" "$RP_PORT"; do
  for _ in $(seq 100); do curl -fs -X POST "http://127.0.0.1:$port/v1/chat/completions" >/dev/null 2>&1 && break; sleep 0.1; done
done

# A dedicated org whose budget the run cannot exhaust.
CTL=target/release/ibexctl
[ -x "$CTL" ] || CTL=target/debug/ibexctl
ORG=$("$CTL" org create --name "perf-up-$$" --rpm 2000000000 | sed -E 's/.*"id": *"([^"]+)".*/\1/')
AGENT=$("$CTL" agent create --org "$ORG" --name perf | sed -E 's/.*"id": *"([^"]+)".*/\1/')
TOKEN=$("$CTL" token create --org "$ORG" --name perf --permissions all | sed -E 's/.*"token": *"([^"]+)".*/\1/')
BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
AUTH=(-H "Authorization: Bearer $TOKEN" -H "X-IBEX-Agent-ID: $AGENT")
# Warm the proxy's caches and its upstream connection.
curl -fsS -X POST "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" "${AUTH[@]}" \
  -H "Content-Type: application/json" -d "$BODY" >/dev/null
[ -n "$NOLEDGER" ] && curl -fsS -X POST "http://127.0.0.1:$NOLEDGER_PORT/v1/chat/completions" "${AUTH[@]}" \
  -H "Content-Type: application/json" -d "$BODY" >/dev/null

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
nginx_worker() { pgrep -P "$1" | head -1; }
TCK=$(getconf CLK_TCK)

run() { # name pid rate port [headers...]
  local name=$1 pid=$2 rate=$3 port=$4; shift 4
  local before after out reqs us
  before=$(cpu_ticks "$pid")
  out=$(taskset -c "$LOAD_CPU" target/release/loadgen --addr "127.0.0.1:$port" \
        --path /v1/chat/completions --method POST --body "$BODY" \
        -H "Content-Type: application/json" \
        --rate "$rate" --duration "$DURATION" --connections "$CONNS" "$@")
  after=$(cpu_ticks "$pid")
  reqs=$(echo "$out" | sed -E 's/.*"requests":([0-9]+).*/\1/')
  us=$(awk -v b="$before" -v a="$after" -v t="$TCK" -v n="$reqs" 'BEGIN{ if (n>0) printf "%.2f", (a-b)/t*1e6/n; else print "nan" }')
  echo "{\"server\":\"$name\",\"rate\":$rate,\"cpu_us_per_req\":$us,\"loadgen\":$out}"
}

FAKE_W=$(nginx_worker "$FAKE_PID")
RP_W=$(nginx_worker "$RP_PID")
[ -n "${ONLY_TTFB:-}" ] && RATES=""
for rate in $RATES; do
  run direct "$FAKE_W" "$rate" "$FAKE_PORT"
  run nginx-rp "$RP_W" "$rate" "$RP_PORT"
  run ibex-proxy "$PROXY_PID" "$rate" "$PROXY_PORT" "${AUTH[@]}"
  [ -n "$NOLEDGER" ] && run ibex-noledger "$NL_PID" "$rate" "$NOLEDGER_PORT" "${AUTH[@]}"
done

if [ -z "${ONLY_TTFB:-}" ] && command -v wrk >/dev/null; then
  cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
LUA
  cat > "$work/post-auth.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.headers["X-IBEX-Agent-ID"] = "$AGENT"
LUA
  variants=("nginx-rp $RP_PID $RP_PORT post.lua" "ibex-proxy $PROXY_PID $PROXY_PORT post-auth.lua")
  [ -n "$NOLEDGER" ] && variants+=("ibex-noledger $NL_PID $NOLEDGER_PORT post-auth.lua")
  for v in "${variants[@]}"; do
    set -- $v
    pid=$2; [ "$1" = nginx-rp ] && pid=$RP_W
    before=$(cpu_ticks "$pid")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$work/$4" \
          "http://127.0.0.1:$3/v1/chat/completions")
    after=$(cpu_ticks "$pid")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    echo "# peak $1: $rps req/s, server CPU $(awk -v b="$before" -v a="$after" -v t="$TCK" -v r="$rps" -v d="$DURATION" 'BEGIN{ printf "%.2f", (a-b)/t*1e6/(r*d) }') µs/req $(echo "$out" | grep -E 'Non-2xx' || true)"
  done
fi

# Time to first streamed byte: one keep-alive client connection, requests in
# sequence (curl -K with the URL repeated), direct and through the proxy.
taskset -c "$LOAD_CPU" python3 perf/fake_sse_upstream.py "$SSE_PORT" 3 20 &
SSE_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$SSE_PORT") 2>/dev/null && break; sleep 0.1; done
IBEX_PROXY_LISTEN=127.0.0.1:$SSE_PROXY_PORT IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:$SSE_ADMIN_PORT IBEX_USAGE_SPOOL_DIR=$work/sse-spool IBEX_PROXY_THREADS=1 IBEX_LOG=warn \
IBEX_UPSTREAM_URL=http://127.0.0.1:$SSE_PORT/v1 IBEX_UPSTREAM_API_KEY=sk-perf \
  taskset -c "$SERVER_CPU" "$PROXY_BIN" > "$work/sse-proxy.out" 2> "$work/sse-proxy.err" &
SSE_PROXY_PID=$!
for _ in $(seq 100); do grep -q IBEX_READY "$work/sse-proxy.out" 2>/dev/null && break; sleep 0.1; done
curl -fsS -N -X POST "http://127.0.0.1:$SSE_PROXY_PORT/v1/chat/completions" "${AUTH[@]}" \
  -H "Content-Type: application/json" -d '{"stream":true}' >/dev/null
SBODY='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello."}]}'
ttfb() { # name port [headers...]
  local name=$1 port=$2; shift 2
  for _ in $(seq "$TTFB_REQUESTS"); do
    echo "url = \"http://127.0.0.1:$port/v1/chat/completions\""; echo 'output = "/dev/null"'
  done > "$work/curl-$name.cfg"
  taskset -c "$LOAD_CPU" curl -sN -K "$work/curl-$name.cfg" -H "Content-Type: application/json" "$@" \
    -d "$SBODY" -w '%{http_code} %{time_starttransfer}\n' | tail -n +2 |
  sort -k2 -n | awk -v name="$name" '{ code[NR]=$1; t[NR]=$2 } END {
    bad=0; for (i=1;i<=NR;i++) if (code[i]!=200) bad++
    printf "{\"ttfb\":\"%s\",\"requests\":%d,\"non_200\":%d,\"p50_us\":%.0f,\"p99_us\":%.0f,\"max_us\":%.0f}\n",
      name, NR, bad, t[int(NR*0.5)+1]*1e6, t[int(NR*0.99)+1]*1e6, t[NR]*1e6 }'
}
ttfb direct "$SSE_PORT"
ttfb ibex-proxy "$SSE_PROXY_PORT" "${AUTH[@]}"
# Where the proxy's time goes, from its own /metrics (means over the run):
# until the upstream's response head, and the whole request as the proxy
# measured it.
curl -fsS "http://127.0.0.1:$SSE_ADMIN_PORT/metrics" | awk '
  /^ibex_upstream_response_header_seconds_sum/ { us = $2 } /^ibex_upstream_response_header_seconds_count/ { uc = $2 }
  /^ibex_proxy_request_duration_seconds_sum/ { ps += $2 } /^ibex_proxy_request_duration_seconds_count/ { pc += $2 }
  END { printf "{\"sse_proxy_mean_upstream_head_us\":%.0f,\"sse_proxy_mean_request_us\":%.0f}\n", (uc ? us/uc*1e6 : -1), (pc ? ps/pc*1e6 : -1) }'
