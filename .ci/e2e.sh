#!/usr/bin/env bash
# End-to-end checks: starts the topicgate binary on free loopback ports and drives it with real
# clients (curl, mosquitto_pub, mosquitto_sub). Prints one "ok"/"not ok" line per check and a
# summary line; exits non-zero when a check fails.
#
#   TOPICGATE_BIN   binary to test (default target/release/topicgate)
#   E2E_TIMEOUT     seconds any single wait may take (default 10)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-10}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
prepare "e2e" curl mosquitto_pub mosquitto_sub python3 timeout

mapfile -t PORTS < <(free_ports 6)
HTTP_PORT=${PORTS[0]}
MQTT_PORT=${PORTS[1]}
COAP_PORT=${PORTS[2]}
BASE="http://127.0.0.1:$HTTP_PORT"

# Whether the saved body is a JSON object with a string "error" field.
body_has_error_field() {
    python3 -c '
import json, sys
doc = json.load(open(sys.argv[1]))
sys.exit(0 if isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"] else 1)
' "$WORK/body" 2>/dev/null
}

# One line per complete `event: message` of an SSE capture: topic<TAB>payload<TAB>retain.
sse_messages() {
    python3 - "$1" <<'PY'
import base64, json, sys
event, data = "message", []
with open(sys.argv[1], encoding="utf-8", errors="replace", newline="") as f:
    text = f.read()
for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
    if line == "":
        if data and event == "message":
            try:
                msg = json.loads("\n".join(data))
                payload = msg.get("payload") or ""
                if msg.get("payload_encoding") == "base64":
                    payload = base64.b64decode(payload).decode("utf-8", "replace")
                retain = "true" if msg.get("retain") else "false"
                print(f"{msg.get('topic')}\t{payload}\t{retain}")
            except Exception as e:
                print(f"!unparsable\t{e}\t")
        event, data = "message", []
        continue
    if line.startswith(":"):
        continue
    field, _, value = line.partition(":")
    if value.startswith(" "):
        value = value[1:]
    if field == "event":
        event = value
    elif field == "data":
        data.append(value)
PY
}

sse_has() {
    sse_messages "$1" | cut -f1,2 | grep -qxF -- "$2"
}

# --- start the gateway ----------------------------------------------------------------------

start_gateway --http-addr "127.0.0.1:$HTTP_PORT" --mqtt-addr "127.0.0.1:$MQTT_PORT" \
    --coap-addr "127.0.0.1:$COAP_PORT" --data-dir "$WORK/data"

if grep -q 'listening protocol="mqtt" addr=127.0.0.1:'"$MQTT_PORT" "$WORK/gateway.log" &&
    grep -q 'listening protocol="http" addr=127.0.0.1:'"$HTTP_PORT" "$WORK/gateway.log"; then
    ok "startup log names both listeners"
else
    not_ok "startup log names both listeners" \
        "expected lines with listening protocol=\"mqtt\"/\"http\" and the bound addresses" \
        "got: $(show "$(cat "$WORK/gateway.log")")"
fi

# --- 1. HTTP publish reaches an MQTT subscriber ---------------------------------------------

SUB_HOME=$WORK/sub-home.txt
start_sub "$SUB_HOME" e2e/probe/home -v -t 'home/#'
name="HTTP POST is received by mosquitto_sub"
if ! wait_subscribed "$SUB_HOME" e2e/probe/home; then
    not_ok "$name" "the subscriber never saw its probe message" \
        "subscriber output: $(show "$(cat "$SUB_HOME" "$SUB_HOME.err")")"
else
    http -d 21.5 "$BASE/topics/home/temp"
    if [[ $STATUS != 204 ]]; then
        not_ok "$name" "POST /topics/home/temp: expected 204, got $STATUS $(show "$(body)")"
    elif wait_until file_has_line "$SUB_HOME" "home/temp 21.5"; then
        ok "$name"
    else
        not_ok "$name" "expected a line 'home/temp 21.5'" \
            "got: $(show "$(cat "$SUB_HOME")")"
    fi
fi

# --- 2. MQTT retained publish is readable over HTTP -----------------------------------------

name="mosquitto_pub -r is readable with GET"
if ! mpub -r -t home/hum -m 40; then
    not_ok "$name" "mosquitto_pub -r -t home/hum -m 40 failed"
elif wait_until get_equals home/hum 200 40; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/hum: expected 200 '40', got $STATUS $(show "$(body)")"
fi

name="an MQTT 3.1 client publishes, as with Mosquitto"
if ! mpub -V mqttv31 -r -t home/old -m x 2>"$WORK/v31.err"; then
    not_ok "$name" "mosquitto_pub -V mqttv31 failed" "got: $(show "$(cat "$WORK/v31.err")")"
elif wait_until get_equals home/old 200 x; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/old: expected 200 'x', got $STATUS $(show "$(body)")"
fi

# --- 3. MQTT 5 content type and user property from HTTP headers -----------------------------

SUB_V5=$WORK/sub-v5.txt
start_sub "$SUB_V5" e2e/probe/v5 -V mqttv5 -F '%t %p %C %P' -t home/json
name="MQTT 5 subscriber sees Content-Type and mqtt-user-* headers"
if ! wait_subscribed "$SUB_V5" e2e/probe/v5; then
    not_ok "$name" "the subscriber never saw its probe message" \
        "subscriber output: $(show "$(cat "$SUB_V5" "$SUB_V5.err")")"
else
    http -H 'Content-Type: application/json' -H 'mqtt-user-unit: C' -d '{"t":1}' \
        "$BASE/topics/home/json"
    expected='home/json {"t":1} application/json unit:C'
    if [[ $STATUS != 204 ]]; then
        not_ok "$name" "POST /topics/home/json: expected 204, got $STATUS $(show "$(body)")"
    elif wait_until file_has_line "$SUB_V5" "$expected"; then
        ok "$name"
    else
        not_ok "$name" "expected a line $(show "$expected")" "got: $(show "$(cat "$SUB_V5")")"
    fi
fi

# --- 4. Server-sent events: retained first, then live from MQTT and HTTP ---------------------

SSE=$WORK/sse.txt
curl -sS -N --max-time 300 -H 'Accept: text/event-stream' "$BASE/topics/home/%23" \
    >"$SSE" 2>"$SSE.err" &
BG_PIDS+=($!)

first_sse_is_hum() {
    [[ $(sse_messages "$SSE" | head -n 1 | cut -f1,2) == $'home/hum\t40' ]]
}
name="SSE stream starts with the retained home/hum"
if wait_until first_sse_is_hum; then
    ok "$name"
    name="SSE stream shows a live mosquitto_pub message"
    mpub -t home/sse -m from-mqtt || true
    if wait_until sse_has "$SSE" $'home/sse\tfrom-mqtt'; then
        ok "$name"
    else
        not_ok "$name" "expected a message on home/sse with payload from-mqtt" \
            "got: $(show "$(cat "$SSE")")"
    fi
    name="SSE stream shows a live HTTP POST message"
    http -d from-http "$BASE/topics/home/sse"
    if wait_until sse_has "$SSE" $'home/sse\tfrom-http'; then
        ok "$name"
    else
        not_ok "$name" "expected a message on home/sse with payload from-http" \
            "POST status $STATUS, stream: $(show "$(cat "$SSE")")"
    fi
else
    not_ok "$name" "expected the first message event to be home/hum with payload 40" \
        "got: $(show "$(cat "$SSE" "$SSE.err")")"
    not_ok "SSE stream shows live messages" "skipped: the stream never started"
fi

# --- 5. Empty publishes: non-retained keeps the retained value, retained deletes it ----------

name="empty non-retained publish keeps the retained value"
mpub -t home/hum -n || true
# The open event stream sees the empty message once the gateway has handled it.
if ! wait_until sse_has "$SSE" $'home/hum\t'; then
    not_ok "$name" "the empty message on home/hum never appeared on the event stream" \
        "stream: $(show "$(cat "$SSE")")"
elif get_equals home/hum 200 40; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/hum: expected 200 '40', got $STATUS $(show "$(body)")"
fi

name="empty retained publish deletes the retained value"
mpub -r -t home/hum -n || true
if wait_until get_status home/hum 404; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/hum: expected 404, got $STATUS $(show "$(body)")"
fi

# --- 6. A value retained over HTTP is sent to a new MQTT subscriber ---------------------------

name="PUT value is delivered, retained, to a new subscriber"
http -X PUT -D "$WORK/headers" -d x "$BASE/topics/home/temp2"
if [[ $STATUS != 204 ]]; then
    not_ok "$name" "PUT /topics/home/temp2: expected 204, got $STATUS $(show "$(body)")"
else
    if ! grep -qi '^location:' "$WORK/headers"; then
        not_ok "PUT answers with a Location header" "headers: $(show "$(cat "$WORK/headers")")"
    else
        ok "PUT answers with a Location header"
    fi
    # The retained value reaches the HTTP side first; only then is subscribing meaningful.
    wait_until get_equals home/temp2 200 x || true
    got=$(timeout $((TIMEOUT + 5)) mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -W "$TIMEOUT" \
        -C 1 -F '%t %p retain=%r' -t home/temp2 2>&1) || true
    if [[ $got == "home/temp2 x retain=1" ]]; then
        ok "$name"
    else
        not_ok "$name" "expected 'home/temp2 x retain=1'" "got: $(show "$got")"
    fi
fi

# --- 7. Error statuses with JSON bodies --------------------------------------------------------

expect_error() {
    local name=$1 want=$2
    shift 2
    http "$@"
    if [[ $STATUS == "$want" ]] && body_has_error_field; then
        ok "$name"
    else
        not_ok "$name" "expected $want with a JSON \"error\" field" \
            "got $STATUS $(show "$(body)") $(show "$(cat "$WORK/curl.err")")"
    fi
}

expect_error "POST to a wildcard topic is 400" 400 -d x "$BASE/topics/a/+/b"
expect_error "PATCH is 405" 405 -X PATCH -d x "$BASE/topics/a"
head -c 2097152 /dev/zero >"$WORK/big"
expect_error "a 2 MiB body is 413" 413 --data-binary @- "$BASE/topics/big" <"$WORK/big"
expect_error "GET of a never-published topic is 404" 404 "$BASE/topics/never/published/here"

# --- 8. Command line ---------------------------------------------------------------------------

# Runs the binary with a deadline; sets RC, and OUT/ERR to its stdout/stderr.
run_bin() {
    RC=0
    timeout "$TIMEOUT" "$BIN" "$@" >"$WORK/run.out" 2>"$WORK/run.err" </dev/null || RC=$?
    OUT=$(cat "$WORK/run.out")
    ERR=$(cat "$WORK/run.err")
}

# Whether ERR is exactly one line starting "topicgate: error:" and containing $1.
one_error_line_naming() {
    [[ $(printf '%s\n' "$ERR" | wc -l) -eq 1 && $ERR == "topicgate: error:"* && $ERR == *"$1"* ]]
}

name="print-config exits 0 and shows [mqtt]"
run_bin print-config
if [[ $RC == 0 ]] && grep -qxF '[mqtt]' "$WORK/run.out"; then
    ok "$name"
else
    not_ok "$name" "exit $RC, stdout: $(show "$OUT"), stderr: $(show "$ERR")"
fi

name="--http-addr nope exits 2"
run_bin --http-addr nope --mqtt-addr "127.0.0.1:${PORTS[3]}" --data-dir "$WORK/data-bad"
if [[ $RC == 2 ]]; then
    ok "$name"
else
    not_ok "$name" "exit $RC (expected 2), stderr: $(show "$ERR")"
fi

name="unknown config key exits 2 naming the key"
printf 'data_dir = "%s"\nno_such_setting = true\n' "$WORK/data-bad" >"$WORK/bad.toml"
run_bin --config "$WORK/bad.toml" --http-addr "127.0.0.1:${PORTS[3]}" \
    --mqtt-addr "127.0.0.1:${PORTS[4]}" --coap-addr "127.0.0.1:${PORTS[5]}"
if [[ $RC == 2 ]] && one_error_line_naming no_such_setting; then
    ok "$name"
else
    not_ok "$name" "expected exit 2 and one stderr line 'topicgate: error: ...no_such_setting...'" \
        "got exit $RC, stderr: $(show "$ERR")"
fi

name="HTTP port already in use exits 2 naming the address"
run_bin --http-addr "127.0.0.1:$HTTP_PORT" --mqtt-addr "127.0.0.1:${PORTS[4]}" \
    --coap-addr "127.0.0.1:${PORTS[5]}" --data-dir "$WORK/data-second"
if [[ $RC == 2 ]] && one_error_line_naming "127.0.0.1:$HTTP_PORT"; then
    ok "$name"
else
    not_ok "$name" "expected exit 2 and one stderr line 'topicgate: error: ...127.0.0.1:$HTTP_PORT...'" \
        "got exit $RC, stderr: $(show "$ERR")"
fi

# --- 9. Graceful stop --------------------------------------------------------------------------

name="SIGTERM stops the gateway with status 0 within 10 s"
started=$SECONDS
gateway_gone() { ! kill -0 "$GW_PID" 2>/dev/null; }
if gateway_gone; then
    rc=0
    wait "$GW_PID" 2>/dev/null || rc=$?
    GW_PID=
    not_ok "$name" "the gateway had already exited (status $rc) before SIGTERM" \
        "log tail: $(show "$(tail -n 5 "$WORK/gateway.log")")"
elif kill -TERM "$GW_PID" && TIMEOUT=10 wait_until gateway_gone; then
    rc=0
    wait "$GW_PID" || rc=$?
    GW_PID=
    if [[ $rc == 0 ]]; then
        ok "$name"
    else
        not_ok "$name" "exit status $rc after $((SECONDS - started)) s" \
            "log tail: $(show "$(tail -n 5 "$WORK/gateway.log")")"
    fi
else
    not_ok "$name" "still running after 10 s" \
        "log tail: $(show "$(tail -n 5 "$WORK/gateway.log")")"
fi

echo "e2e: $PASSED passed, $FAILED failed"
((FAILED == 0))
