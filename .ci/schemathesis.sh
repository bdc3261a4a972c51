#!/usr/bin/env bash
# Property-based check of the HTTP API against its own OpenAPI document: schemathesis generates
# requests from /openapi.json, valid and invalid ones, and checks every response: no 5xx, a
# documented status, a documented content type, a body matching the documented schema. Installs
# schemathesis from PyPI if missing, starts the topicgate binary on free loopback ports, prints
# the number of cases tried, exits non-zero on any failure.
#
#   TOPICGATE_BIN               binary to test (default target/release/topicgate)
#   E2E_TIMEOUT                 seconds the gateway may take to become ready (default 10)
#   SCHEMATHESIS_MAX_EXAMPLES   cases per operation in each phase (default 100)
#   SCHEMATHESIS_MAX_TIME       seconds for the whole run, which fuzzing fills (default 120)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-10}
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-100}
MAX_TIME=${SCHEMATHESIS_MAX_TIME:-120}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
prepare "schemathesis" curl python3

# Debian's own python3 refuses a plain install (PEP 668, externally managed): only then is it
# retried with --break-system-packages, as .ci/run does for aiocoap.
if ! python3 -c 'import schemathesis' 2>/dev/null; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    if ! python3 -m pip install -q schemathesis >/dev/null 2>&1 </dev/null; then
        python3 -m pip install -q --break-system-packages schemathesis </dev/null
    fi
fi

mapfile -t PORTS < <(free_ports 3)
HTTP_PORT=${PORTS[0]}
BASE="http://127.0.0.1:$HTTP_PORT"

start_gateway --http-addr "127.0.0.1:$HTTP_PORT" --mqtt-addr "127.0.0.1:${PORTS[1]}" \
    --coap-addr "127.0.0.1:${PORTS[2]}" --data-dir "$WORK/data"

# An event stream never ends: a generated read that would open one (`stream=true`, or an Accept
# header asking for text/event-stream) is sent as a plain read instead of waiting out the request
# timeout, and so is a long poll (`wait=`). Streams have their own tests (tests/it/sse.rs, .ci/e2e.sh).
cat >"$WORK/hooks.py" <<'PY'
import schemathesis

@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.operation.method.upper() != "GET":
        return
    if case.query and str(case.query.get("stream")).lower() in ("true", "1"):
        case.query["stream"] = "false"
    # A long poll of a quiet topic waits up to ?wait= (checked by tests/it/long_poll.rs and
    # .ci/e2e_api.sh); a generated one is sent as a plain read.
    if case.query and "wait" in case.query:
        del case.query["wait"]
    for name in list(case.headers or {}):
        if name.lower() == "accept" and "event-stream" in str(case.headers[name]).lower():
            del case.headers[name]
PY

# `/rpc` answers 504 when no responder replies, which is what a generated request meets: it is
# left out here and checked with responders by tests/it/rpc.rs and .ci/e2e_rpc.sh.
# Run from the work dir: schemathesis keeps its example database and crash cache in the current
# directory.
status=0
(
    cd "$WORK"
    SCHEMATHESIS_HOOKS="$WORK/hooks.py" python3 -m schemathesis.cli run "$BASE/openapi.json" \
        --exclude-path-regex '^/rpc/' \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        --max-examples "$MAX_EXAMPLES" \
        --max-time "$MAX_TIME" \
        --request-timeout 5 \
        --workers 1 \
        --no-color
) | tee "$WORK/schemathesis.out" || status=$?

cases=$(grep -Eo '[0-9]+ generated' "$WORK/schemathesis.out" | tail -1 | grep -Eo '[0-9]+' || echo 0)
echo "schemathesis: $cases cases tried"
if ! kill -0 "$GW_PID" 2>/dev/null; then
    echo "schemathesis: the gateway exited during the run; its log:" >&2
    cat "$WORK/gateway.log" >&2
    status=1
elif grep -q panicked "$WORK/gateway.log"; then
    echo "schemathesis: the gateway panicked during the run; its log:" >&2
    cat "$WORK/gateway.log" >&2
    status=1
fi
if ((cases == 0)); then
    status=1
fi
exit "$status"
