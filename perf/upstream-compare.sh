#!/usr/bin/env bash
# Forwarding overhead: the same non-streaming chat completion requested
#   direct      loadgen → fake upstream (nginx, fixed JSON with usage)
#   nginx-rp    loadgen → nginx reverse proxy (keep-alive upstream) → fake
#   ibex-proxy  loadgen → ibex-proxy (whole security chain) → fake
# at fixed rates (latency-corrected p50/p99/p99.9), plus CPU µs per request
# of the proxying server (utime+stime from /proc before and after), then
# peak req/s with wrk.
#
# Needs the dev stack (`make dev`: Postgres, Redis, authd, seeded). Starts
# its own single-threaded ibex-proxy (release) and nginx reverse proxy, both
# pinned to SERVER_CPU; the load generator and the fake upstream share
# LOAD_CPU (the same for every variant, so the differences are the proxy's).
#
#   make dev && perf/upstream-compare.sh
#   RATES="1000 5000" DURATION=10 perf/upstream-compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-"1000 5000"}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
FAKE_PORT=${FAKE_PORT:-18090}
RP_PORT=${RP_PORT:-18091}
PROXY_PORT=${PROXY_PORT:-18092}

[ -f .ibex/dev.env ] || { echo "run 'make dev' first" >&2; exit 1; }
# shellcheck disable=SC1091
set -a; . .ibex/env 2>/dev/null || true; . .ibex/dev.env; . .ibex/shell.env 2>/dev/null || true; set +a

cargo build --release -q -p ibex-proxy -p ibex-bench --bin ibex-proxy --bin loadgen
work=$(mktemp -d)
cleanup() {
  kill "${FAKE_PID:-}" "${RP_PID:-}" "${PROXY_PID:-}" 2>/dev/null || true
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

IBEX_PROXY_LISTEN=127.0.0.1:$PROXY_PORT IBEX_PROXY_THREADS=1 IBEX_LOG=warn \
IBEX_UPSTREAM_URL=http://127.0.0.1:$FAKE_PORT/v1 IBEX_UPSTREAM_API_KEY=sk-perf \
  taskset -c "$SERVER_CPU" target/release/ibex-proxy > "$work/proxy.out" 2> "$work/proxy.err" &
PROXY_PID=$!
for _ in $(seq 100); do grep -q IBEX_READY "$work/proxy.out" 2>/dev/null && break; sleep 0.1; done
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
for rate in $RATES; do
  run direct "$FAKE_W" "$rate" "$FAKE_PORT"
  run nginx-rp "$RP_W" "$rate" "$RP_PORT"
  run ibex-proxy "$PROXY_PID" "$rate" "$PROXY_PORT" "${AUTH[@]}"
done

if command -v wrk >/dev/null; then
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
  for v in "nginx-rp $RP_PID $RP_PORT post.lua" "ibex-proxy $PROXY_PID $PROXY_PORT post-auth.lua"; do
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
