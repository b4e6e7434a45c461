#!/usr/bin/env bash
# What the usage ledger costs per forwarded request (issue 13's measure), interleaved so the box's
# drift falls on every variant alike: nginx-rp, ibex-proxy with the ledger on, the same binary
# with IBEX_USAGE_LEDGER=off, and other builds with their ledger on (OTHERS="name=binary …") — all
# single-threaded servers pinned to SERVER_CPU, forwarding the same non-streamed chat to an nginx
# fake upstream; wrk -t1 -c32 at peak on LOAD_CPU for DUR seconds per variant (or loadgen at a
# fixed RATE req/s when RATE is set: every variant then does the same work per second, so the
# difference is not also a difference in batching at different peaks), ROUNDS rounds, the
# variants' order rotated each round. Per variant and round: the whole server process's CPU
# (the sum of its threads' run time from /proc/<pid>/task/*/schedstat, in ns — the scheduler's
# own clock, interrupts landing on the thread included; utime+stime are sampled per 4 ms tick on
# this kernel, coarse for a thread that runs ~1 ms every 50 ms) per request, and
# for the ledger-on proxies the writer's and shipper's share; then medians, and the median of the
# per-round differences on − off (the ledger's cost). A ledger-on proxy's spool threads may still
# be writing and shipping the round's records when the load stops (at peak the shipper, whose
# authd shares LOAD_CPU with the load, falls behind): until its metrics say every record was
# spooled and shipped, their run time keeps being added to the round (DRAIN=0: not; what the
# script did before 2026-12-03).
#
# Runs inside perf/ledger-stack.sh (Postgres, Redis, release authd that the shippers ship to):
#
#   flock /tmp/ibex-perf.lock perf/ledger-stack.sh perf/ledger-onoff.sh
#   OTHERS="base=/tmp/bin-base/ibex-proxy" ROUNDS=8 flock /tmp/ibex-perf.lock perf/ledger-stack.sh perf/ledger-onoff.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${PERF_STACK:-}" ] || exec perf/ledger-stack.sh "$0" "$@"
PROXY_BIN=${PROXY_BIN:-target/release/ibex-proxy}
OTHERS=${OTHERS:-}
DUR=${DUR:-10}
ROUNDS=${ROUNDS:-6}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
work=$(mktemp -d /tmp/ibex-onoff-XXXXXX)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FAKE_PORT=$(free_port); RP_PORT=$(free_port)
sed "s#__DIR__#$work#g; s#__PORT__#$FAKE_PORT#g" perf/nginx-fake-upstream.conf > "$work/fake.conf"
taskset -c "$LOAD_CPU" nginx -c "$work/fake.conf" -p "$work" &
pids+=($!)
sed "s#__DIR__#$work#g; s#__PORT__#$RP_PORT#g; s#__UPSTREAM__#127.0.0.1:$FAKE_PORT#g" \
  perf/nginx-reverse-proxy.conf > "$work/rp.conf"
taskset -c "$SERVER_CPU" nginx -c "$work/rp.conf" -p "$work" &
RP_PID=$!
pids+=("$RP_PID")

DRAIN=${DRAIN:-1}
declare -A PID PORT ADMIN
start_proxy() { # name binary [env...]
  local name=$1 bin=$2 port; shift 2
  port=$(free_port)
  env "$@" IBEX_PROXY_LISTEN=127.0.0.1:$port IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:0 \
    IBEX_USAGE_SPOOL_DIR="$work/spool-$name" IBEX_PROXY_THREADS=1 IBEX_LOG=warn \
    IBEX_AUTH_VALIDATE_TIMEOUT=2s IBEX_UPSTREAM_URL=http://127.0.0.1:$FAKE_PORT/v1 \
    IBEX_UPSTREAM_API_KEY=sk-perf taskset -c "$SERVER_CPU" "$bin" > "$work/$name.out" 2> "$work/$name.err" &
  PID[$name]=$!
  PORT[$name]=$port
  pids+=("$!")
  for _ in $(seq 100); do grep -q IBEX_READY "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
  ADMIN[$name]=$(sed -nE 's/.*admin=([^ ]+).*/\1/p' "$work/$name.out" | head -1)
}
# "spooled shipped" from the admin metrics at $1.
usage_counts() {
  curl -fs "http://$1/metrics" | awk '/^ibex_usage_records_spooled_total / { s = $2 }
    /^ibex_usage_records_shipped_total / { h = $2 } END { print s + 0, h + 0 }'
}
# Until every record is shipped and the writer spooled nothing new for 100 ms (two ticks), ≤ 60 s.
drain() {
  local prev=-1 s h
  for _ in $(seq 600); do
    read -r s h < <(usage_counts "$1")
    [ "$s" = "$h" ] && [ "$s" = "$prev" ] && return 0
    prev=$s
    sleep 0.1
  done
  echo "warning: $1 did not drain in 60 s" >&2
}
variants=(nginx-rp on off)
start_proxy on "$PROXY_BIN"
start_proxy off "$PROXY_BIN" IBEX_USAGE_LEDGER=off
others=()
for o in $OTHERS; do
  start_proxy "${o%%=*}" "${o#*=}"
  others+=("${o%%=*}")
done
variants+=("${others[@]}")
for _ in $(seq 100); do curl -fs -X POST "http://127.0.0.1:$RP_PORT/v1/chat/completions" >/dev/null 2>&1 && break; sleep 0.1; done
RP_W=$(pgrep -P "$RP_PID" | head -1)
PID[nginx-rp]=$RP_W
PORT[nginx-rp]=$RP_PORT

CTL=target/release/ibexctl
ORG=$("$CTL" org create --name "perf-onoff-$$" --rpm 2000000000 | sed -E 's/.*"id": *"([^"]+)".*/\1/')
AGENT=$("$CTL" agent create --org "$ORG" --name perf | sed -E 's/.*"id": *"([^"]+)".*/\1/')
TOKEN=$("$CTL" token create --org "$ORG" --name perf --permissions all | sed -E 's/.*"token": *"([^"]+)".*/\1/')
BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
for v in on off "${others[@]}"; do
  for _ in $(seq 100); do
    curl -fsS -X POST "http://127.0.0.1:${PORT[$v]}/v1/chat/completions" -H "Authorization: Bearer $TOKEN" \
      -H "X-IBEX-Agent-ID: $AGENT" -H "Content-Type: application/json" -d "$BODY" >/dev/null 2>&1 && break
    sleep 0.1
  done
done
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
# Run time (ns) of all threads of process $1.
ticks() { cat /proc/"$1"/task/*/schedstat | awk '{ t += $1 } END { printf "%.0f\n", t }'; }
# Run time (ns) of the spool's threads of process $1: "writer shipper".
spool_ticks() {
  local w=0 s=0 t
  for t in /proc/"$1"/task/*; do
    case "$(cat "$t/comm")" in
      ibex-ledger-wri*) w=$((w + $(awk '{print $1}' "$t/schedstat"))) ;;
      ibex-ledger-shi*) s=$((s + $(awk '{print $1}' "$t/schedstat"))) ;;
    esac
  done
  echo "$w $s"
}
uptime
: > "$work/rows"
n=${#variants[@]}
for round in $(seq "$ROUNDS"); do
  for i in $(seq 0 $((n - 1))); do
    v=${variants[$(((i + round) % n))]}
    pid=${PID[$v]}
    lua=post-auth.lua; [ "$v" = nginx-rp ] && lua=post.lua
    before=$(ticks "$pid"); read -r wb sb < <(spool_ticks "$pid")
    if [ -n "${RATE:-}" ]; then
      auth=(-H "Authorization: Bearer $TOKEN" -H "X-IBEX-Agent-ID: $AGENT")
      [ "$v" = nginx-rp ] && auth=()
      out=$(taskset -c "$LOAD_CPU" target/release/loadgen --addr "127.0.0.1:${PORT[$v]}" \
            --path /v1/chat/completions --method POST --body "$BODY" -H "Content-Type: application/json" \
            "${auth[@]}" --rate "$RATE" --duration "$DUR" --connections 32)
      after=$(ticks "$pid"); read -r wa sa < <(spool_ticks "$pid")
      rps=$(echo "$out" | sed -E 's/.*"requests":([0-9]+).*/\1/' | awk -v d="$DUR" '{print $1 / d}')
      bad=$(echo "$out" | grep -oE '"errors":[0-9]+' | cut -d: -f2 || true)
    else
      out=$(taskset -c "$LOAD_CPU" wrk -t1 -c32 -d"${DUR}s" -s "$work/$lua" \
            "http://127.0.0.1:${PORT[$v]}/v1/chat/completions")
      after=$(ticks "$pid"); read -r wa sa < <(spool_ticks "$pid")
      rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
      bad=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    fi
    if [ "$DRAIN" = 1 ] && [ -n "${ADMIN[$v]:-}" ] && [ "$v" != off ]; then
      drain "${ADMIN[$v]}"
      read -r wd sd < <(spool_ticks "$pid")
      after=$((after + wd - wa + sd - sa)); wa=$wd; sa=$sd
    fi
    awk -v v="$v" -v r="$round" -v rps="$rps" -v d="$DUR" -v b="$before" -v a="$after" \
        -v wb="$wb" -v wa="$wa" -v sb="$sb" -v sa="$sa" -v bad="${bad:-0}" 'BEGIN {
      n = rps * d; k = 1e-3 / n
      printf "%s %d %.0f %.3f %.3f %.3f %s\n", v, r, rps, (a - b) * k, (wa - wb) * k, (sa - sb) * k, bad
    }' | tee -a "$work/rows"
  done
done
uptime
echo "# variant round req/s cpu_us_per_req writer_us shipper_us non2xx (above); medians:"
median() { sort -n | awk '{ x[NR] = $1 } END { if (NR % 2) print x[(NR + 1) / 2]; else printf "%.3f\n", (x[NR / 2] + x[NR / 2 + 1]) / 2 }'; }
for v in "${variants[@]}"; do
  printf "%-9s req/s %s  cpu %s µs/req  writer %s  shipper %s\n" "$v" \
    "$(awk -v v="$v" '$1 == v {print $3}' "$work/rows" | median)" \
    "$(awk -v v="$v" '$1 == v {print $4}' "$work/rows" | median)" \
    "$(awk -v v="$v" '$1 == v {print $5}' "$work/rows" | median)" \
    "$(awk -v v="$v" '$1 == v {print $6}' "$work/rows" | median)"
done
diffs() { # a b: per-round cpu(a) - cpu(b)
  awk -v a="$1" -v b="$2" '$1 == a { x[$2] = $4 } $1 == b { y[$2] = $4 } END { for (r in x) if (r in y) print x[r] - y[r] }' "$work/rows"
}
echo "ledger cost (on - off), median of per-round differences: $(diffs on off | median) µs/req  [$(diffs on off | sort -n | tr '\n' ' ')]"
echo "on / nginx-rp: $(awk '$1 == "on" {print $4}' "$work/rows" | median) / $(awk '$1 == "nginx-rp" {print $4}' "$work/rows" | median)"
for o in "${others[@]}"; do
  echo "$o ledger cost ($o - off): $(diffs "$o" off | median) µs/req  [$(diffs "$o" off | sort -n | tr '\n' ' ')]"
done
