#!/usr/bin/env bash
# Routes and providers (issue 15, SPEC §12), two measurements:
#
# 1. Forwarding CPU per request for each route — chat, completions, responses, embeddings,
#    messages (non-streamed) — of the proxying server, utime+stime from /proc before and after a
#    fixed-rate run (perf/upstream-compare.sh's method), in the same run:
#      nginx-rp    loadgen → nginx reverse proxy (keep-alive upstream) → fake
#      ibex-proxy  loadgen → ibex-proxy with an IBEX_PROVIDERS_FILE (an openai and an anthropic
#                  provider, both at the fake; the whole chain, usage ledger on) → fake
#    against one nginx fake answering each route in its own shape (perf/nginx-fake-routes.conf).
#    ROUNDS rounds (routes interleaved, the two servers back to back per route); the summary is
#    the median per route and server, and the ratio ibex/nginx.
# 2. Time to the first SSE event of a streamed Responses call and a streamed Messages call,
#    direct to perf/fake_sse_upstream.py vs through ibex-proxy (providers file), CALLS calls in
#    sequence on one keep-alive connection each (perf/sse_first_event.py), p50/p99.
#
# Servers are pinned to SERVER_CPU, the load generator and the fakes to LOAD_CPU. Needs a stack
# (authd, Postgres, Redis): run it inside perf/ledger-stack.sh, under the measurement lock:
#
#   cargo build --release --workspace --bins
#   flock /tmp/ibex-perf.lock perf/ledger-stack.sh perf/routes-compare.sh
#   ROUNDS=3 RATE=1000 DURATION=5 CALLS=200 (the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
PROXY_BIN=${PROXY_BIN:-target/release/ibex-proxy}
RATE=${RATE:-1000}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
CALLS=${CALLS:-200}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
FAKE_PORT=${FAKE_PORT:-18190}
RP_PORT=${RP_PORT:-18191}
PROXY_PORT=${PROXY_PORT:-18192}
SSE_PORT=${SSE_PORT:-18193}
SSE_PROXY_PORT=${SSE_PROXY_PORT:-18194}

if [ -z "${PERF_STACK:-}" ]; then
  [ -f .ibex/dev.env ] || { echo "run me under perf/ledger-stack.sh (or 'make dev' first)" >&2; exit 1; }
  # shellcheck disable=SC1091
  set -a; . .ibex/env 2>/dev/null || true; . .ibex/dev.env; . .ibex/shell.env 2>/dev/null || true; set +a
fi
export IBEX_AUTH_VALIDATE_TIMEOUT=${IBEX_AUTH_VALIDATE_TIMEOUT:-2s}

cargo build --release -q --workspace --bins
work=$(mktemp -d)
cleanup() {
  kill "${FAKE_PID:-}" "${RP_PID:-}" "${PROXY_PID:-}" "${SSE_PID:-}" "${SSE_PROXY_PID:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

providers() { # port → a providers file with both kinds at 127.0.0.1:port
  cat <<TOML
[[provider]]
name = "oa"
kind = "openai"
base_url = "http://127.0.0.1:$1/v1"
api_key_env = "PERF_OA_KEY"

[[provider]]
name = "ant"
kind = "anthropic"
base_url = "http://127.0.0.1:$1/v1"
api_key_env = "PERF_ANT_KEY"

[[route]]
model = "gpt-*"
providers = ["oa"]

[[route]]
model = "text-embedding-*"
providers = ["oa"]

[[route]]
model = "claude-*"
providers = ["ant"]
TOML
}
start_proxy() { # name port providers-file → pid in $!
  PERF_OA_KEY=sk-perf-oa PERF_ANT_KEY=sk-perf-ant IBEX_PROVIDERS_FILE=$3 \
  IBEX_PROXY_LISTEN=127.0.0.1:$2 IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:0 IBEX_USAGE_SPOOL_DIR=$work/$1-spool \
  IBEX_PROXY_THREADS=1 IBEX_LOG=warn \
    taskset -c "$SERVER_CPU" "$PROXY_BIN" > "$work/$1.out" 2> "$work/$1.err" &
}
wait_ready() { for _ in $(seq 100); do grep -q IBEX_READY "$1" 2>/dev/null && return; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }

sed "s#__DIR__#$work#g; s#__PORT__#$FAKE_PORT#g" perf/nginx-fake-routes.conf > "$work/fake.conf"
taskset -c "$LOAD_CPU" nginx -c "$work/fake.conf" -p "$work" &
FAKE_PID=$!
sed "s#__DIR__#$work#g; s#__PORT__#$RP_PORT#g; s#__UPSTREAM__#127.0.0.1:$FAKE_PORT#g" \
  perf/nginx-reverse-proxy.conf > "$work/rp.conf"
taskset -c "$SERVER_CPU" nginx -c "$work/rp.conf" -p "$work" &
RP_PID=$!
providers "$FAKE_PORT" > "$work/providers.toml"
start_proxy proxy "$PROXY_PORT" "$work/providers.toml"
PROXY_PID=$!
wait_ready "$work/proxy.out"
for port in "$FAKE_PORT" "$RP_PORT"; do
  for _ in $(seq 100); do curl -fs -X POST "http://127.0.0.1:$port/v1/chat/completions" >/dev/null 2>&1 && break; sleep 0.1; done
done

CTL=target/release/ibexctl
ORG=$("$CTL" org create --name "perf-routes-$$" --rpm 2000000000 | sed -E 's/.*"id": *"([^"]+)".*/\1/')
AGENT=$("$CTL" agent create --org "$ORG" --name perf | sed -E 's/.*"id": *"([^"]+)".*/\1/')
TOKEN=$("$CTL" token create --org "$ORG" --name perf --permissions read,chat,embeddings | sed -E 's/.*"token": *"([^"]+)".*/\1/')
AUTH=(-H "Authorization: Bearer $TOKEN" -H "X-IBEX-Agent-ID: $AGENT")

ROUTES=(chat completions responses embeddings messages)
path_of() { case $1 in chat) echo /v1/chat/completions;; completions) echo /v1/completions;;
  responses) echo /v1/responses;; embeddings) echo /v1/embeddings;; messages) echo /v1/messages;; esac; }
body_of() { case $1 in
  chat) echo '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}';;
  completions) echo '{"model":"gpt-3.5-turbo-instruct","prompt":"Say hello."}';;
  responses) echo '{"model":"gpt-4o-mini","input":"Say hello."}';;
  embeddings) echo '{"model":"text-embedding-3-small","input":"Say hello."}';;
  messages) echo '{"model":"claude-3-5-haiku","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}';;
  esac; }
# Warm the proxy's caches and its upstream connections; every route must answer 200.
for r in "${ROUTES[@]}"; do
  code=$(curl -sS -o "$work/warm.json" -w '%{http_code}' -X POST "http://127.0.0.1:$PROXY_PORT$(path_of "$r")" "${AUTH[@]}" \
    -H "Content-Type: application/json" -H "anthropic-version: 2023-06-01" -d "$(body_of "$r")")
  [ "$code" = 200 ] || { echo "warm-up $r: $code $(cat "$work/warm.json")" >&2; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)
RP_W=$(pgrep -P "$RP_PID" | head -1)
run() { # round route server pid port [headers...]
  local round=$1 route=$2 name=$3 pid=$4 port=$5; shift 5
  local before after out reqs us
  before=$(cpu_ticks "$pid")
  out=$(taskset -c "$LOAD_CPU" target/release/loadgen --addr "127.0.0.1:$port" \
        --path "$(path_of "$route")" --method POST --body "$(body_of "$route")" \
        -H "Content-Type: application/json" -H "anthropic-version: 2023-06-01" \
        --rate "$RATE" --duration "$DURATION" --connections "$CONNS" "$@")
  after=$(cpu_ticks "$pid")
  reqs=$(echo "$out" | sed -E 's/.*"requests":([0-9]+).*/\1/')
  us=$(awk -v b="$before" -v a="$after" -v t="$TCK" -v n="$reqs" 'BEGIN{ if (n>0) printf "%.2f", (a-b)/t*1e6/n; else print "nan" }')
  echo "{\"round\":$round,\"route\":\"$route\",\"server\":\"$name\",\"cpu_us_per_req\":$us,\"loadgen\":$out}" | tee -a "$work/cpu.jsonl"
}
echo "# uptime before: $(uptime)"
for round in $(seq "$ROUNDS"); do
  for r in "${ROUTES[@]}"; do
    run "$round" "$r" nginx-rp "$RP_W" "$RP_PORT"
    run "$round" "$r" ibex-proxy "$PROXY_PID" "$PROXY_PORT" "${AUTH[@]}"
  done
done
python3 - "$work/cpu.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| route | nginx-rp CPU µs/req | ibex-proxy CPU µs/req | ratio | ibex p50 / p99 µs | nginx p50 / p99 µs | non-200 (ibex) |")
print("|---|---|---|---|---|---|---|")
for route in ["chat", "completions", "responses", "embeddings", "messages"]:
    def med(server, f):
        return statistics.median(f(r) for r in rows if r["route"] == route and r["server"] == server)
    n = med("nginx-rp", lambda r: r["cpu_us_per_req"])
    i = med("ibex-proxy", lambda r: r["cpu_us_per_req"])
    bad = sum(v for r in rows if r["route"] == route and r["server"] == "ibex-proxy"
              for s, v in r["loadgen"]["statuses"].items() if s != "200") + \
          sum(r["loadgen"]["errors"] for r in rows if r["route"] == route and r["server"] == "ibex-proxy")
    print(f"| {route} | {n:.1f} | {i:.1f} | {i/n:.2f}× | {med('ibex-proxy', lambda r: r['loadgen']['p50_us']):.0f} / {med('ibex-proxy', lambda r: r['loadgen']['p99_us']):.0f} "
          f"| {med('nginx-rp', lambda r: r['loadgen']['p50_us']):.0f} / {med('nginx-rp', lambda r: r['loadgen']['p99_us']):.0f} | {bad} |")
PY

# Time to the first event of streamed Responses and Messages calls.
taskset -c "$LOAD_CPU" python3 perf/fake_sse_upstream.py "$SSE_PORT" 3 20 &
SSE_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$SSE_PORT") 2>/dev/null && break; sleep 0.1; done
providers "$SSE_PORT" > "$work/sse-providers.toml"
start_proxy sse-proxy "$SSE_PROXY_PORT" "$work/sse-providers.toml"
SSE_PROXY_PID=$!
wait_ready "$work/sse-proxy.out"
RBODY='{"model":"gpt-4o-mini","stream":true,"input":"Say hello."}'
MBODY='{"model":"claude-3-5-haiku","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}'
HDRS=("Authorization: Bearer $TOKEN" "X-IBEX-Agent-ID: $AGENT" "anthropic-version: 2023-06-01")
# Warm-up (the token's first validation, the upstream connection).
taskset -c "$LOAD_CPU" python3 perf/sse_first_event.py warm "$SSE_PROXY_PORT" /v1/responses "$RBODY" 2 "${HDRS[@]}" >/dev/null
taskset -c "$LOAD_CPU" python3 perf/sse_first_event.py warm "$SSE_PROXY_PORT" /v1/messages "$MBODY" 2 "${HDRS[@]}" >/dev/null
for v in "responses /v1/responses RBODY" "messages /v1/messages MBODY"; do
  set -- $v
  body=${!3}
  taskset -c "$LOAD_CPU" python3 perf/sse_first_event.py "$1-direct" "$SSE_PORT" "$2" "$body" "$CALLS"
  taskset -c "$LOAD_CPU" python3 perf/sse_first_event.py "$1-ibex-proxy" "$SSE_PROXY_PORT" "$2" "$body" "$CALLS" "${HDRS[@]}"
done
echo "# uptime after: $(uptime)"
