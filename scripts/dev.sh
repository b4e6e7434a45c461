#!/usr/bin/env bash
# The local dev stack behind `make dev` and friends. Everything lives under .ibex/ (git-ignored):
#
#   .ibex/env          ports chosen once + IBEX_ADMIN_KEY and IBEX_SERVICE_KEY (mode 600)
#   .ibex/pg/          private Postgres cluster (owned by the postgres user when we are root)
#   .ibex/redis/       private redis-server (no persistence)
#   .ibex/dev.env      `export IBEX_DEV_*=` lines from `ibexctl seed` (mode 600)
#   .ibex/shell.env    everything a shell needs for ibexctl and curl (mode 600)
#   .ibex/*.pid *.log  ibex-authd and ibex-proxy
#
# Ports: Postgres 5432 and Redis 6379 if free on the first run, else a free port; the choice is
# remembered in .ibex/env. authd listens on 127.0.0.1:9091 (gRPC) / 127.0.0.1:8081 (HTTP) and the
# proxy on 127.0.0.1:8080 unless IBEX_AUTHD_GRPC_LISTEN / IBEX_AUTHD_HTTP_LISTEN /
# IBEX_PROXY_LISTEN say otherwise. None of this touches the system Postgres or Redis services.
#
# Usage: scripts/dev.sh up|down|clean|status|pg-up|redis-up|migrate|seed
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEV="$ROOT/.ibex"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/debug"

PROXY_LISTEN="${IBEX_PROXY_LISTEN:-127.0.0.1:8080}"
PROXY_ADMIN_LISTEN="${IBEX_PROXY_ADMIN_LISTEN:-127.0.0.1:9090}"
AUTHD_GRPC_LISTEN="${IBEX_AUTHD_GRPC_LISTEN:-127.0.0.1:9091}"
AUTHD_HTTP_LISTEN="${IBEX_AUTHD_HTTP_LISTEN:-127.0.0.1:8081}"
# Debug builds verify Argon2 far slower than release: give cold validations room in dev.
AUTH_VALIDATE_TIMEOUT="${IBEX_AUTH_VALIDATE_TIMEOUT:-2s}"

if [ -t 1 ]; then
    say() { printf '\033[1m[dev]\033[0m %s\n' "$*"; }
else
    say() { printf '[dev] %s\n' "$*"; }
fi
die() {
    printf '[dev] error: %s\n' "$*" >&2
    exit 1
}

is_root() { [ "$(id -u)" = 0 ]; }

# Postgres refuses to run as root: run its tools as the postgres system user when we are root.
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_bindir() {
    local dir
    if dir="$(pg_config --bindir 2>/dev/null)" && [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
        echo "$dir"
        return
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return
        fi
    done
    die "no Postgres server binaries found: run scripts/ensure-deps.sh"
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_port() {
    local preferred="$1" port
    if ! port_busy "$preferred"; then
        echo "$preferred"
        return
    fi
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 12000))
        if ! port_busy "$port"; then
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

# 64 random hex characters.
random_hex() {
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'
}

# Creates .ibex/env once (ports + admin and service keys), then loads it and derives the URLs.
load_env() {
    mkdir -p "$DEV"
    if [ ! -f "$DEV/env" ]; then
        local key
        key="ibex-admin-$(random_hex)"
        (
            umask 077
            cat >"$DEV/env" <<ENV
# Written once by scripts/dev.sh; delete it (make dev-clean) to choose again.
IBEX_DEV_PG_PORT=$(pick_port 5432)
IBEX_DEV_REDIS_PORT=$(pick_port 6379)
IBEX_ADMIN_KEY=$key
ENV
        )
    fi
    # An .ibex/env from before the service key existed: add one (authd and the proxy need it).
    if ! grep -q '^IBEX_SERVICE_KEY=' "$DEV/env"; then
        (umask 077 && echo "IBEX_SERVICE_KEY=ibex-service-$(random_hex)" >>"$DEV/env")
    fi
    # shellcheck disable=SC1091
    . "$DEV/env"
    PG_PORT="$IBEX_DEV_PG_PORT"
    REDIS_PORT="$IBEX_DEV_REDIS_PORT"
    PGDIR="$DEV/pg"
    PGDATA="$PGDIR/data"
    PGSOCK="$PGDIR/sock"
    export IBEX_ADMIN_KEY IBEX_SERVICE_KEY
    export IBEX_DATABASE_ADMIN_URL="postgres://postgres@127.0.0.1:$PG_PORT/ibex"
    export IBEX_DATABASE_URL="postgres://ibex_app@127.0.0.1:$PG_PORT/ibex"
    export IBEX_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
    export IBEX_AUTHD_GRPC="http://$AUTHD_GRPC_LISTEN"
    export IBEX_ENV="${IBEX_ENV:-development}"
    export IBEX_LOG="${IBEX_LOG:-info}"
}

pg_running() { [ -f "$PGDATA/postmaster.pid" ] && as_pg "$(pg_bindir)/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

pg_up() {
    load_env
    local bindir
    bindir="$(pg_bindir)"
    [ -z "${PG_CHECKED:-}" ] || return 0
    PG_CHECKED=1
    if pg_running; then
        say "Postgres running on 127.0.0.1:$PG_PORT"
        return
    fi
    mkdir -p "$PGDIR" "$PGSOCK"
    if is_root; then
        chown postgres:postgres "$PGDIR" "$PGSOCK"
        chmod 700 "$PGDIR"
        as_pg test -x "$PGDIR" || die "the postgres user cannot reach $PGDIR (a parent directory is not traversable)"
    fi
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        say "initdb $PGDATA"
        as_pg "$bindir/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C --no-instructions >"$PGDIR/initdb.log" 2>&1 ||
            { cat "$PGDIR/initdb.log" >&2; die "initdb failed"; }
        # Loopback and our private socket only.
        printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' | as_pg tee "$PGDATA/pg_hba.conf" >/dev/null
    fi
    if port_busy "$PG_PORT"; then
        die "port $PG_PORT (IBEX_DEV_PG_PORT in .ibex/env) is taken by another process; stop it or edit .ibex/env"
    fi
    say "starting Postgres on 127.0.0.1:$PG_PORT"
    as_pg "$bindir/pg_ctl" -D "$PGDATA" -l "$PGDIR/postgres.log" -w -t 60 \
        -o "-p $PG_PORT -k '$PGSOCK' -c listen_addresses=127.0.0.1" start >/dev/null ||
        { tail -n 30 "$PGDIR/postgres.log" >&2; die "Postgres did not start"; }
    if ! as_pg "$bindir/psql" -h "$PGSOCK" -p "$PG_PORT" -U postgres -d postgres -tAc \
        "select 1 from pg_database where datname = 'ibex'" | grep -q 1; then
        as_pg "$bindir/psql" -h "$PGSOCK" -p "$PG_PORT" -U postgres -d postgres -qc "create database ibex"
    fi
}

pg_down() {
    load_env
    if pg_running; then
        say "stopping Postgres"
        as_pg "$(pg_bindir)/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    fi
}

redis_pid() { cat "$DEV/redis/redis.pid" 2>/dev/null || true; }

redis_up() {
    load_env
    local pid
    pid="$(redis_pid)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "Redis running on 127.0.0.1:$REDIS_PORT"
        return
    fi
    if port_busy "$REDIS_PORT"; then
        die "port $REDIS_PORT (IBEX_DEV_REDIS_PORT in .ibex/env) is taken by another process; stop it or edit .ibex/env"
    fi
    mkdir -p "$DEV/redis"
    say "starting Redis on 127.0.0.1:$REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --pidfile "$DEV/redis/redis.pid" --logfile "$DEV/redis/redis.log" \
        --dir "$DEV/redis"
    for _ in $(seq 1 100); do
        if [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; then return; fi
        sleep 0.1
    done
    tail -n 20 "$DEV/redis/redis.log" >&2
    die "Redis did not answer PING"
}

redis_down() {
    local pid
    pid="$(redis_pid)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping Redis"
        kill "$pid"
        wait_gone "$pid" 10
    fi
    rm -f "$DEV/redis/redis.pid"
}

wait_gone() {
    local pid="$1" secs="$2"
    for _ in $(seq 1 $((secs * 10))); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

ibexctl() {
    [ -x "$BIN/ibexctl" ] || cargo build --quiet --bin ibexctl
    "$BIN/ibexctl" "$@"
}

migrate() {
    pg_up
    say "ibexctl migrate"
    ibexctl migrate >/dev/null
}

seed() {
    pg_up
    say "ibexctl seed -> .ibex/dev.env"
    local out
    out="$(ibexctl seed)"
    (
        umask 077
        printf '%s\n' "$out" | grep '^export IBEX_DEV_' >"$DEV/dev.env"
    )
    [ -s "$DEV/dev.env" ] || die "ibexctl seed printed no export lines"
    write_shell_env
}

write_shell_env() {
    (
        umask 077
        {
            echo "# source me: . .ibex/shell.env"
            echo "export IBEX_DATABASE_ADMIN_URL='$IBEX_DATABASE_ADMIN_URL'"
            echo "export IBEX_DATABASE_URL='$IBEX_DATABASE_URL'"
            echo "export IBEX_REDIS_URL='$IBEX_REDIS_URL'"
            echo "export IBEX_AUTHD_GRPC='$IBEX_AUTHD_GRPC'"
            echo "export IBEX_ADMIN_KEY='$IBEX_ADMIN_KEY'"
            echo "export IBEX_PROXY_URL='http://$PROXY_LISTEN'"
            echo "export IBEX_PROXY_ADMIN_URL='http://$PROXY_ADMIN_LISTEN'"
            cat "$DEV/dev.env" 2>/dev/null || true
        } >"$DEV/shell.env"
    )
}

# Starts a binary in its own session, logging to .ibex/<name>.log, pid in .ibex/<name>.pid.
start_daemon() {
    local name="$1" health="$2"
    shift 2
    stop_daemon "$name"
    local log="$DEV/$name.log"
    echo "---- $(date -u +%FT%TZ) starting $name" >>"$log"
    setsid "$@" >>"$log" 2>&1 </dev/null &
    echo $! >"$DEV/$name.pid"
    local pid
    pid="$(cat "$DEV/$name.pid")"
    for _ in $(seq 1 600); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$log" >&2
            die "$name exited during startup (log: .ibex/$name.log)"
        fi
        if curl -fsS -o /dev/null --max-time 1 "$health" 2>/dev/null; then
            say "$name up (pid $pid, log .ibex/$name.log)"
            return
        fi
        sleep 0.1
    done
    tail -n 40 "$log" >&2
    die "$name not healthy at $health after 60 s"
}

stop_daemon() {
    local name="$1" pid
    pid="$(cat "$DEV/$name.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        wait_gone "$pid" 10
    fi
    rm -f "$DEV/$name.pid"
}

check_listen_free() {
    local what="$1" addr="$2"
    local port="${addr##*:}"
    if port_busy "$port"; then
        die "$addr is taken by another process (needed for $what); stop it or set its IBEX_* listen variable"
    fi
}

up() {
    "$ROOT/scripts/ensure-deps.sh"
    load_env
    pg_up
    redis_up
    say "cargo build (ibex-authd, ibexctl, ibex-proxy)"
    (cd "$ROOT" && cargo build --bins -p ibex-authd -p ibex-proxy)
    migrate
    seed
    stop_daemon ibex-proxy
    stop_daemon ibex-authd
    check_listen_free ibex-authd "$AUTHD_GRPC_LISTEN"
    check_listen_free ibex-authd "$AUTHD_HTTP_LISTEN"
    check_listen_free ibex-proxy "$PROXY_LISTEN"
    check_listen_free ibex-proxy "$PROXY_ADMIN_LISTEN"
    start_daemon ibex-authd "http://$AUTHD_HTTP_LISTEN/health" env \
        IBEX_DATABASE_URL="$IBEX_DATABASE_URL" IBEX_ADMIN_KEY="$IBEX_ADMIN_KEY" \
        IBEX_SERVICE_KEY="$IBEX_SERVICE_KEY" IBEX_AUTHD_GRPC_LISTEN="$AUTHD_GRPC_LISTEN" IBEX_AUTHD_HTTP_LISTEN="$AUTHD_HTTP_LISTEN" \
        "$BIN/ibex-authd"
    start_daemon ibex-proxy "http://$PROXY_LISTEN/health" env \
        IBEX_PROXY_LISTEN="$PROXY_LISTEN" IBEX_PROXY_ADMIN_LISTEN="$PROXY_ADMIN_LISTEN" \
        IBEX_AUTHD_GRPC="$IBEX_AUTHD_GRPC" IBEX_SERVICE_KEY="$IBEX_SERVICE_KEY" \
        IBEX_REDIS_URL="$IBEX_REDIS_URL" IBEX_AUTH_VALIDATE_TIMEOUT="$AUTH_VALIDATE_TIMEOUT" \
        "$BIN/ibex-proxy"
    # What dev-smoke needs to know about the running proxy (nothing secret).
    {
        echo "IBEX_PROXY_LISTEN='$PROXY_LISTEN'"
        echo "IBEX_PROXY_ADMIN_LISTEN='$PROXY_ADMIN_LISTEN'"
        echo "IBEX_UPSTREAM_URL='${IBEX_UPSTREAM_URL:-}'"
    } >"$DEV/run.env"
    echo
    say "dev stack is up. Dev credentials (also in .ibex/dev.env):"
    sed 's/^/    /' "$DEV/dev.env"
    echo
    say "load them, plus the URLs and the operator key for ibexctl:  . .ibex/shell.env"
    say "try:"
    echo "    curl -s http://$PROXY_LISTEN/v1/internal/auth-probe -H \"Authorization: Bearer \$IBEX_DEV_TOKEN\" -H \"X-IBEX-Agent-ID: \$IBEX_DEV_AGENT_ID\""
    echo "    $BIN/ibexctl token list --org 00000000-0000-0000-0000-000000000001"
    say "metrics (admin listener, plain HTTP, loopback): curl -s http://$PROXY_ADMIN_LISTEN/metrics"
    say "smoke test: make dev-smoke    stop: make dev-down"
}

down() {
    load_env
    stop_daemon ibex-proxy
    stop_daemon ibex-authd
    rm -f "$DEV/run.env"
    redis_down
    pg_down
}

status() {
    load_env
    local name pid
    for name in ibex-authd ibex-proxy; do
        pid="$(cat "$DEV/$name.pid" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
    done
    pid="$(redis_pid)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "redis: running on $REDIS_PORT"; else echo "redis: stopped"; fi
    if pg_running; then echo "postgres: running on $PG_PORT"; else echo "postgres: stopped"; fi
}

case "${1:-}" in
up) up ;;
down) down ;;
clean)
    down
    say "removing .ibex/"
    rm -rf "$DEV"
    ;;
status) status ;;
pg-up) pg_up ;;
redis-up) redis_up ;;
migrate) migrate ;;
seed)
    migrate
    seed
    ;;
*)
    echo "usage: $0 up|down|clean|status|pg-up|redis-up|migrate|seed" >&2
    exit 2
    ;;
esac
