#!/usr/bin/env bash
# Side-by-side: ibex-proxy's authenticated hot path vs nginx's fixed response.
#
# Needs the dev stack up (`make dev`: Postgres, Redis, authd and the seeded
# credentials in .ibex/dev.env). Starts its own single-threaded ibex-proxy
# (release build) and a one-worker nginx, both pinned to CPU 0; the load
# generator runs pinned to CPU 1. For each server and rate it prints the
# loadgen JSON plus the server's CPU µs per request, read from
# /proc/<pid>/stat (utime+stime) before and after the run.
#
#   make dev && perf/compare.sh            # defaults: 1k and 10k rps, 10 s each
#   RATES="1000 10000" DURATION=10 perf/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# PROXY_BIN=path runs another build of the proxy (e.g. an older commit's) in the same harness.
PROXY_BIN=${PROXY_BIN:-target/release/ibex-proxy}
RATES=${RATES:-"1000 10000"}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
NGINX_PORT=${NGINX_PORT:-18080}
PROXY_PORT=${PROXY_PORT:-18081}

[ -f .ibex/dev.env ] || { echo "run 'make dev' first" >&2; exit 1; }
# shellcheck disable=SC1091
set -a; . .ibex/env 2>/dev/null || true; . .ibex/dev.env; set +a
# PERF_AUTHD_GRPC: another authd for the proxy under test (e.g. an older build's own authd).
export IBEX_AUTHD_GRPC=${PERF_AUTHD_GRPC:-${IBEX_AUTHD_GRPC:-http://127.0.0.1:9091}}
# A cold validation (the warm-up request) must not be what a run measures.
export IBEX_AUTH_VALIDATE_TIMEOUT=${IBEX_AUTH_VALIDATE_TIMEOUT:-2s}

cargo build --release -q -p ibex-proxy -p ibex-bench --bin ibex-proxy --bin loadgen
work=$(mktemp -d)
cleanup() { kill "${NGINX_PID:-}" "${PROXY_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

sed "s#__DIR__#$work#g; s#__PORT__#$NGINX_PORT#g" perf/nginx-static.conf > "$work/nginx.conf"
taskset -c "$SERVER_CPU" nginx -c "$work/nginx.conf" -p "$work" &
NGINX_PID=$!

IBEX_PROXY_LISTEN=127.0.0.1:$PROXY_PORT IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:0 IBEX_USAGE_SPOOL_DIR=$work/spool IBEX_PROXY_THREADS=1 IBEX_LOG=warn \
  taskset -c "$SERVER_CPU" "$PROXY_BIN" > "$work/proxy.out" 2> "$work/proxy.err" &
PROXY_PID=$!
for _ in $(seq 100); do grep -q IBEX_READY "$work/proxy.out" 2>/dev/null && break; sleep 0.1; done
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$NGINX_PORT/" >/dev/null 2>&1 && break; sleep 0.1; done

# A dedicated org whose budget the run cannot exhaust, so every request goes
# through the whole chain (rate limiter included) to the handler.
CTL=target/release/ibexctl
[ -x "$CTL" ] || CTL=target/debug/ibexctl
ORG=$("$CTL" org create --name "perf-$$" --rpm 2000000000 | sed -E 's/.*"id": *"([^"]+)".*/\1/')
AGENT=$("$CTL" agent create --org "$ORG" --name perf | sed -E 's/.*"id": *"([^"]+)".*/\1/')
TOKEN=$("$CTL" token create --org "$ORG" --name perf --permissions all | sed -E 's/.*"token": *"([^"]+)".*/\1/')
IBEX_DEV_TOKEN=$TOKEN IBEX_DEV_AGENT_ID=$AGENT
AUTH=(-H "Authorization: Bearer $IBEX_DEV_TOKEN" -H "X-IBEX-Agent-ID: $IBEX_DEV_AGENT_ID")
# Warm the proxy's caches (token and agent) on its one worker.
curl -fsS "http://127.0.0.1:$PROXY_PORT/v1/internal/auth-probe" "${AUTH[@]}" >/dev/null

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
nginx_worker() { pgrep -P "$NGINX_PID" | head -1; }
TCK=$(getconf CLK_TCK)

run() { # name pid rate port path [headers...]
  local name=$1 pid=$2 rate=$3 port=$4 path=$5; shift 5
  local before after out
  before=$(cpu_ticks "$pid")
  out=$(taskset -c "$LOAD_CPU" target/release/loadgen --addr "127.0.0.1:$port" --path "$path" \
        --rate "$rate" --duration "$DURATION" --connections "$CONNS" "$@")
  after=$(cpu_ticks "$pid")
  local reqs; reqs=$(echo "$out" | sed -E 's/.*"requests":([0-9]+).*/\1/')
  local us; us=$(awk -v b="$before" -v a="$after" -v t="$TCK" -v n="$reqs" 'BEGIN{ if (n>0) printf "%.2f", (a-b)/t*1e6/n; else print "nan" }')
  echo "{\"server\":\"$name\",\"rate\":$rate,\"cpu_us_per_req\":$us,\"loadgen\":$out}"
}

for rate in $RATES; do
  run nginx "$(nginx_worker)" "$rate" "$NGINX_PORT" /
  # The proxy's floor: same server and codec, no auth, no rate limiter.
  run ibex-proxy-health "$PROXY_PID" "$rate" "$PROXY_PORT" /health
  run ibex-proxy "$PROXY_PID" "$rate" "$PROXY_PORT" /v1/internal/auth-probe \
      -H "Authorization: Bearer $IBEX_DEV_TOKEN" -H "X-IBEX-Agent-ID: $IBEX_DEV_AGENT_ID"
done

# Valid cached traffic at 1k rps while three other addresses flood the proxy
# with distinct random well-formed tokens (FLOOD_RATE each): the per-address
# guard answers them 429 without authd calls after 20 failures.
FLOOD_RATE=${FLOOD_RATE:-2000}
echo "# flood: valid traffic at 1000 rps, then the same beside 3 x $FLOOD_RATE rps of random tokens"
run ibex-proxy-no-flood "$PROXY_PID" 1000 "$PROXY_PORT" /v1/internal/auth-probe "${AUTH[@]}"
for ip in 127.0.0.2 127.0.0.3 127.0.0.4; do
  taskset -c "$LOAD_CPU" target/release/loadgen --addr "127.0.0.1:$PROXY_PORT" --path /v1/internal/auth-probe \
    --rate "$FLOOD_RATE" --duration "$DURATION" --connections 8 --bind "$ip" \
    -H 'Authorization: Bearer ibex_pat_{uuid}_{secret}' -H "X-IBEX-Agent-ID: $IBEX_DEV_AGENT_ID" \
    > "$work/flood-$ip.json" &
done
run ibex-proxy-beside-flood "$PROXY_PID" 1000 "$PROXY_PORT" /v1/internal/auth-probe "${AUTH[@]}"
wait_floods() { for ip in 127.0.0.2 127.0.0.3 127.0.0.4; do while pgrep -f -- "--bind $ip" >/dev/null; do sleep 0.2; done; echo "flood $ip: $(cat "$work/flood-$ip.json")"; done; }
wait_floods

if command -v wrk >/dev/null; then
  # Peak: wrk's own count, and the server's CPU per request over the run (the figure to compare).
  peak() { # name pid url [wrk args...]
    local name=$1 pid=$2 url=$3; shift 3
    local before after out reqs
    before=$(cpu_ticks "$pid")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$@" "$url")
    after=$(cpu_ticks "$pid")
    reqs=$(echo "$out" | sed -nE 's/^ *([0-9]+) requests in.*/\1/p')
    echo "{\"server\":\"$name\",\"case\":\"wrk-peak\",\"rps\":$(echo "$out" | sed -nE 's/^Requests\/sec: *([0-9.]+).*/\1/p'),\"non_2xx\":$(echo "$out" | sed -nE 's/^ *Non-2xx or 3xx responses: *([0-9]+).*/\1/p' | grep . || echo 0),\"cpu_us_per_req\":$(awk -v b="$before" -v a="$after" -v t="$TCK" -v n="${reqs:-0}" 'BEGIN{ if (n>0) printf "%.2f", (a-b)/t*1e6/n; else print "nan" }')}"
  }
  echo "# peak (wrk -t1 -c$CONNS -d${DURATION}s, pinned to CPU $LOAD_CPU)"
  peak nginx "$(nginx_worker)" "http://127.0.0.1:$NGINX_PORT/"
  cat > "$work/auth.lua" <<LUA
wrk.headers["Authorization"] = "Bearer $IBEX_DEV_TOKEN"
wrk.headers["X-IBEX-Agent-ID"] = "$IBEX_DEV_AGENT_ID"
LUA
  peak ibex-proxy "$PROXY_PID" "http://127.0.0.1:$PROXY_PORT/v1/internal/auth-probe" -s "$work/auth.lua"
fi
