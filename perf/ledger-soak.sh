#!/usr/bin/env bash
# Memory of the proxy and authd over a long run of forwarded chat with the usage ledger on
# (issue 13): a fixed rate (RATE req/s, default 5000) of non-streamed chat completions through one
# ibex-proxy (release, 1 worker) to an nginx fake upstream for DURATION seconds (default 600);
# every record is spooled, shipped and committed into Postgres by authd (release) as it runs.
# Every INTERVAL seconds (default 30) prints one line: elapsed s, proxy RSS, authd RSS (MiB),
# records shipped so far and the spool's bytes on disk.
#
# Runs inside perf/ledger-stack.sh (its own Postgres, Redis and release authd; it re-executes
# itself there when started alone); adds an nginx fake upstream and the proxy.
#
#   flock /tmp/ibex-perf.lock perf/ledger-soak.sh
#   RATE=2000 DURATION=120 perf/ledger-soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${PERF_STACK:-}" ] || exec perf/ledger-stack.sh "$0" "$@"
RATE=${RATE:-5000}
DURATION=${DURATION:-600}
INTERVAL=${INTERVAL:-30}
CONNS=${CONNS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
AUTHD_PID=$PERF_AUTHD_PID
work=$(mktemp -d /tmp/ibex-soak-XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  kill "${LOAD_PID:-}" "${PROXY_PID:-}" "${FAKE_PID:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
FAKE_PORT=$(free_port); PROXY_PORT=$(free_port)
CTL=target/release/ibexctl
ORG=$("$CTL" org create --name "soak-$$" --rpm 2000000000 | sed -E 's/.*"id": *"([^"]+)".*/\1/')
AGENT=$("$CTL" agent create --org "$ORG" --name soak | sed -E 's/.*"id": *"([^"]+)".*/\1/')
TOKEN=$("$CTL" token create --org "$ORG" --name soak --permissions all | sed -E 's/.*"token": *"([^"]+)".*/\1/')

sed "s#__DIR__#$work#g; s#__PORT__#$FAKE_PORT#g" perf/nginx-fake-upstream.conf > "$work/fake.conf"
taskset -c "$LOAD_CPU" nginx -c "$work/fake.conf" -p "$work" &
FAKE_PID=$!
echo '{"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}' > "$work/prices.json"
IBEX_PROXY_LISTEN=127.0.0.1:$PROXY_PORT IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:0 IBEX_PROXY_THREADS=1 \
IBEX_USAGE_SPOOL_DIR=$work/spool IBEX_PRICES_FILE=$work/prices.json IBEX_LOG=warn \
IBEX_AUTH_VALIDATE_TIMEOUT=2s \
IBEX_UPSTREAM_URL=http://127.0.0.1:$FAKE_PORT/v1 IBEX_UPSTREAM_API_KEY=sk-soak \
  taskset -c "$SERVER_CPU" target/release/ibex-proxy > "$work/proxy.out" 2> "$work/proxy.err" &
PROXY_PID=$!
for _ in $(seq 100); do grep -q IBEX_READY "$work/proxy.out" 2>/dev/null && break; sleep 0.1; done
ADMIN=$(sed -nE 's/.*admin=([0-9.:]+).*/\1/p' "$work/proxy.out")
BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
AUTH=(-H "Authorization: Bearer $TOKEN" -H "X-IBEX-Agent-ID: $AGENT")
for _ in $(seq 100); do
  curl -fsS -X POST "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" "${AUTH[@]}" \
    -H "Content-Type: application/json" -d "$BODY" >/dev/null 2>&1 && break
  sleep 0.1
done

psql_count() {
  local cmd=($PERF_STACK_PSQL -tAc 'select count(*) from ibex_core.usage_records')
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "${cmd[@]}"; else "${cmd[@]}"; fi
}
rss_mib() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
# awk reads to the end (no early exit), so curl never sees a closed pipe ("curl: (23)").
metric() { curl -fsS "http://$ADMIN/metrics" | awk -v m="$1" '$1 == m && v == "" {v = $2} END {print v}'; }
uptime
echo "rate=$RATE req/s duration=${DURATION}s proxy pid $PROXY_PID (CPU $SERVER_CPU), authd pid $AUTHD_PID (CPU $LOAD_CPU)"
taskset -c "$LOAD_CPU" target/release/loadgen --addr "127.0.0.1:$PROXY_PORT" \
  --path /v1/chat/completions --method POST --body "$BODY" -H "Content-Type: application/json" \
  "${AUTH[@]}" --rate "$RATE" --duration "$DURATION" --connections "$CONNS" > "$work/load.json" 2> "$work/load.err" &
LOAD_PID=$!
start=$(date +%s)
printf '%8s %12s %12s %12s %14s\n' elapsed_s proxy_rss_mb authd_rss_mb shipped spool_bytes
while kill -0 "$LOAD_PID" 2>/dev/null; do
  printf '%8d %12s %12s %12s %14s\n' $(( $(date +%s) - start )) "$(rss_mib "$PROXY_PID")" \
    "$(rss_mib "$AUTHD_PID")" "$(metric ibex_usage_records_shipped_total)" "$(metric ibex_usage_spool_bytes)"
  for _ in $(seq "$INTERVAL"); do kill -0 "$LOAD_PID" 2>/dev/null || break; sleep 1; done
done
load_rc=0; wait "$LOAD_PID" || load_rc=$?
# (A run of an earlier session ended early with no summary: say how loadgen ended, always.)
echo "loadgen exited with status $load_rc after $(( $(date +%s) - start )) s; its stderr: $(tail -c 2000 "$work/load.err")"
# Let the shipper catch up, then count what Postgres holds.
for _ in $(seq 60); do
  spooled=$(metric ibex_usage_records_spooled_total); shipped=$(metric ibex_usage_records_shipped_total)
  [ "$spooled" = "$shipped" ] && break
  sleep 1
done
printf '%8d %12s %12s %12s %14s\n' $(( $(date +%s) - start )) "$(rss_mib "$PROXY_PID")" \
  "$(rss_mib "$AUTHD_PID")" "$(metric ibex_usage_records_shipped_total)" "$(metric ibex_usage_spool_bytes)"
echo "loadgen: $(cat "$work/load.json")"
echo "records spooled $(metric ibex_usage_records_spooled_total), shipped $(metric ibex_usage_records_shipped_total)," \
  "in Postgres $(psql_count)"
uptime
