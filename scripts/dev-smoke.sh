#!/usr/bin/env bash
# Smoke test of the running dev stack (`make dev` first): public endpoints, the auth failures,
# the seeded credentials, the chat route. Fails loudly on the first mismatch.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEV="$ROOT/.ibex"
[ -f "$DEV/dev.env" ] || { echo "dev-smoke: no .ibex/dev.env: run make dev first" >&2; exit 1; }
# shellcheck disable=SC1091
. "$DEV/dev.env"
# The proxy's listen address and upstream as `make dev` started it.
[ -f "$DEV/run.env" ] || { echo "dev-smoke: the dev proxy is not running: run make dev" >&2; exit 1; }
# shellcheck disable=SC1091
. "$DEV/run.env"
PROXY="http://$IBEX_PROXY_LISTEN"
: "${IBEX_DEV_TOKEN:?.ibex/dev.env has no IBEX_DEV_TOKEN}"
: "${IBEX_DEV_AGENT_ID:?.ibex/dev.env has no IBEX_DEV_AGENT_ID}"

BODY="$(mktemp)"
HEADERS="$(mktemp)"
trap 'rm -f "$BODY" "$HEADERS"' EXIT
failures=0

# check NAME EXPECTED_STATUS EXPECTED_CODE(or -) curl-args...
check() {
    local name="$1" want_status="$2" want_code="$3"
    shift 3
    local status
    status="$(curl -sS -o "$BODY" -D "$HEADERS" -w '%{http_code}' --max-time 10 "$@")" || status="curl-failed"
    local ok=1
    [ "$status" = "$want_status" ] || ok=0
    if [ "$want_code" != - ] && ! grep -Eq "\"code\" *: *\"$want_code\"" "$BODY"; then ok=0; fi
    if ! grep -qi '^x-request-id: ' "$HEADERS"; then ok=0; fi
    # No response may echo the secret part of a token.
    if grep -Fq "${IBEX_DEV_TOKEN##*_}" "$BODY" "$HEADERS"; then ok=0; fi
    if [ "$ok" = 1 ]; then
        printf '  ok    %-48s %s %s\n' "$name" "$status" "$([ "$want_code" = - ] || echo "$want_code")"
    else
        failures=$((failures + 1))
        printf '  FAIL  %-48s want %s %s, got %s\n' "$name" "$want_status" "$want_code" "$status"
        sed 's/^/        /' "$BODY" | head -c 2000
        echo
    fi
}

AGENT=(-H "X-IBEX-Agent-ID: $IBEX_DEV_AGENT_ID")
BAD_TOKEN="ibex_pat_00000000-0000-0000-0000-000000000004_$(printf 'x%.0s' $(seq 1 43))"

echo "dev-smoke against $PROXY"
check "GET /health" 200 - "$PROXY/health"
check "GET /ready" 200 - "$PROXY/ready"
check "probe without a token" 401 MISSING_TOKEN "${AGENT[@]}" "$PROXY/v1/internal/auth-probe"
check "probe with a wrong secret" 401 INVALID_TOKEN "${AGENT[@]}" \
    -H "Authorization: Bearer $BAD_TOKEN" "$PROXY/v1/internal/auth-probe"
check "probe with garbage" 401 INVALID_TOKEN "${AGENT[@]}" \
    -H "Authorization: Bearer not-a-token" "$PROXY/v1/internal/auth-probe"
check "probe with the seeded token" 200 - "${AGENT[@]}" \
    -H "Authorization: Bearer $IBEX_DEV_TOKEN" "$PROXY/v1/internal/auth-probe"
if [ "$failures" = 0 ] && ! grep -q "$IBEX_DEV_AGENT_ID" "$BODY"; then
    failures=$((failures + 1))
    echo "  FAIL  the probe does not name the seeded agent: $(cat "$BODY")"
fi
CHAT=(-X POST -H "Content-Type: application/json" -H "Authorization: Bearer $IBEX_DEV_TOKEN" "${AGENT[@]}"
    --data '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"ping"}]}'
    "$PROXY/v1/chat/completions")
if [ -n "${IBEX_UPSTREAM_URL:-}" ]; then
    check "POST /v1/chat/completions (forwarded)" 200 - "${CHAT[@]}"
else
    check "POST /v1/chat/completions (no upstream)" 501 PROVIDER_NOT_CONFIGURED "${CHAT[@]}"
fi

if [ "$failures" -gt 0 ]; then
    echo "dev-smoke: $failures check(s) FAILED" >&2
    exit 1
fi
echo "dev-smoke: all checks passed"
