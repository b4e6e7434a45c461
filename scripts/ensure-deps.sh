#!/usr/bin/env bash
# Installs what `make dev` and `make test` need and is missing: a Postgres server, redis-server,
# curl, a C compiler (mimalloc's build) and python3 with venv (the routes suite's SDK checks).
# As root it runs apt-get; otherwise it prints the one
# command to run and exits non-zero. The Rust toolchain itself comes from rustup, not apt.
# No system protoc is needed: the proto is compiled with protox.
set -euo pipefail

missing=()

have_pg_server() {
    local dir
    if dir="$(pg_config --bindir 2>/dev/null)" && [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
        return 0
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && return 0
    done
    return 1
}

have_pg_server || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
# The routes suite runs the official openai and anthropic Python SDKs in a venv it makes.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "ensure-deps: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
    else
        echo "ensure-deps: missing ${missing[*]}. Run:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "ensure-deps: no Rust toolchain. Install it with:" >&2
    echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            rustup component add "$component"
        else
            echo "ensure-deps: cargo $component is missing (rustup component add $component)" >&2
            exit 1
        fi
    fi
done

if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    # Postgres refuses to run as root; the postgresql package normally creates this user.
    echo "ensure-deps: creating the postgres system user"
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
