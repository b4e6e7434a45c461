#!/usr/bin/env bash
# What CI runs (`make test`, `.ci/run`): dependencies, formatting, lints, build, every test.
# Integration tests start their own Postgres and Redis on free loopback ports; nothing here
# touches system services or fixed ports. Prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${CI:-}" ]; then
    export CARGO_TERM_COLOR=never
    # A clean one-shot build: incremental artefacts only cost time and disk.
    export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
    # Line tables keep panics and backtraces readable at a fraction of full debug info's
    # compile and link time.
    export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
fi

timings=()
total_start=$SECONDS

report() {
    local rc=$?
    echo
    echo "== stage timings =="
    for line in "${timings[@]}"; do echo "  $line"; done
    echo "  total: $((SECONDS - total_start))s"
    [ "$rc" = 0 ] && echo "== make test: OK ==" || echo "== make test: FAILED (exit $rc) =="
}
trap report EXIT

stage() {
    local name="$1" start=$SECONDS
    shift
    echo
    echo "==> $name: $*"
    if "$@"; then
        timings+=("$(printf '%-8s %4ss' "$name" "$((SECONDS - start))")")
    else
        local rc=$?
        timings+=("$(printf '%-8s %4ss  FAILED' "$name" "$((SECONDS - start))")")
        return "$rc"
    fi
}

stage deps scripts/ensure-deps.sh
stage fmt cargo fmt --all -- --check
stage clippy cargo clippy --workspace --all-targets -- -D warnings
stage build cargo build --workspace --bins
stage test cargo test --workspace
