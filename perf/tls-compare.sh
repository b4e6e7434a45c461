#!/usr/bin/env bash
# TLS at the edge, side by side: ibex-proxy (rustls) vs nginx (OpenSSL), same ECDSA P-256
# certificate, TLS 1.3, one worker each pinned to CPU 0, the client pinned to CPU 1.
#
# 1. Full handshakes: `openssl s_time -new` (a fresh handshake per connection, no
#    resumption) for DURATION seconds; prints handshakes/s and the server's CPU µs per
#    handshake (utime+stime from /proc/<pid>/stat).
# 2. Kept-alive requests over TLS: `wrk -t1 -cCONNS` on `/health` (nginx: a fixed 200);
#    server CPU µs per request, and the same over plain HTTP for the proxy (TLS's own cost).
#
# Needs no dev stack: /health answers without authd or Redis.
#   perf/tls-compare.sh                       # DURATION=10 CONNS=32
set -euo pipefail
cd "$(dirname "$0")/.."
# PROXY_BIN=path runs another build of the proxy (e.g. an older commit's) in the same harness.
PROXY_BIN=${PROXY_BIN:-target/release/ibex-proxy}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
NGINX_PORT=${NGINX_PORT:-18443}
PROXY_PORT=${PROXY_PORT:-18444}
PLAIN_PORT=${PLAIN_PORT:-18445}

cargo build --release -q -p ibex-proxy --bin ibex-proxy
work=$(mktemp -d)
cleanup() { kill "${NGINX_PID:-}" "${PROXY_PID:-}" "${PLAIN_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

sed "s#__DIR__#$work#g; s#__PORT__#$NGINX_PORT#g" perf/nginx-tls.conf > "$work/nginx.conf"
taskset -c "$SERVER_CPU" nginx -c "$work/nginx.conf" -p "$work" &
NGINX_PID=$!
# The proxy needs an authd address and a service key to start; /health uses neither.
common=(IBEX_PROXY_THREADS=1 IBEX_LOG=warn IBEX_AUTHD_GRPC=http://127.0.0.1:9
        IBEX_SERVICE_KEY=perf-tls-compare-service-key-0123456789 IBEX_PROXY_ADMIN_LISTEN=127.0.0.1:0)
env "${common[@]}" IBEX_PROXY_LISTEN=127.0.0.1:$PROXY_PORT IBEX_USAGE_SPOOL_DIR="$work/spool-tls" \
  IBEX_TLS_CERT_FILE="$work/cert.pem" IBEX_TLS_KEY_FILE="$work/key.pem" \
  taskset -c "$SERVER_CPU" "$PROXY_BIN" > "$work/proxy.out" 2> "$work/proxy.err" &
PROXY_PID=$!
env "${common[@]}" IBEX_PROXY_LISTEN=127.0.0.1:$PLAIN_PORT IBEX_USAGE_SPOOL_DIR="$work/spool-plain" \
  taskset -c "$SERVER_CPU" "$PROXY_BIN" > "$work/plain.out" 2> "$work/plain.err" &
PLAIN_PID=$!
for f in proxy plain; do
  for _ in $(seq 100); do grep -q IBEX_READY "$work/$f.out" 2>/dev/null && break; sleep 0.1; done
done
for _ in $(seq 100); do curl -fsk "https://127.0.0.1:$NGINX_PORT/" >/dev/null 2>&1 && break; sleep 0.1; done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
nginx_worker() { pgrep -P "$NGINX_PID" | head -1; }
TCK=$(getconf CLK_TCK)
per() { awk -v b="$1" -v a="$2" -v t="$TCK" -v n="$3" 'BEGIN{ if (n>0) printf "%.1f", (a-b)/t*1e6/n; else print "nan" }'; }

handshakes() { # name pid port
  local before after out n
  before=$(cpu_ticks "$2")
  out=$(taskset -c "$LOAD_CPU" openssl s_time -connect "127.0.0.1:$3" -new -tls1_3 -time "$DURATION" 2>&1 || true)
  after=$(cpu_ticks "$2")
  n=$(echo "$out" | sed -nE 's/^([0-9]+) connections in [0-9.]+s.*/\1/p' | head -1)
  echo "{\"server\":\"$1\",\"case\":\"full-handshake\",\"handshakes\":${n:-0},\"per_s\":$(awk -v n="${n:-0}" -v d="$DURATION" 'BEGIN{printf "%.0f", n/d}'),\"cpu_us_per_handshake\":$(per "$before" "$after" "${n:-0}")}"
}

keepalive() { # name pid url
  local before after out reqs
  before=$(cpu_ticks "$2")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$3")
  after=$(cpu_ticks "$2")
  reqs=$(echo "$out" | sed -nE 's/^ *([0-9]+) requests in.*/\1/p')
  echo "{\"server\":\"$1\",\"case\":\"keep-alive\",\"requests\":${reqs:-0},\"rps\":$(echo "$out" | sed -nE 's/^Requests\/sec: *([0-9.]+).*/\1/p'),\"cpu_us_per_req\":$(per "$before" "$after" "${reqs:-0}")}"
}

handshakes nginx "$(nginx_worker)" "$NGINX_PORT"
handshakes ibex-proxy "$PROXY_PID" "$PROXY_PORT"
keepalive nginx "$(nginx_worker)" "https://127.0.0.1:$NGINX_PORT/"
keepalive ibex-proxy "$PROXY_PID" "https://127.0.0.1:$PROXY_PORT/health"
keepalive ibex-proxy-plain "$PLAIN_PID" "http://127.0.0.1:$PLAIN_PORT/health"
