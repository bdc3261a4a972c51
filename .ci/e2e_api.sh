#!/usr/bin/env bash
# End-to-end checks of the EMQX-compatible publish API, long polling and CORS with the clients
# people use: curl sends EMQX 5's documented `/api/v5/publish` and `/publish/bulk` requests
# (with the API key as Basic credentials, which an open gateway lets in as anonymous) and gets
# EMQX's answers while mosquitto_sub (MQTT 5) receives the messages; curl long-polls a topic
# mosquitto_pub publishes to; curl sends a browser's CORS preflight. Prints one "ok"/"not ok"
# line per check and a summary line.
#
#   TOPICGATE_BIN   binary to test (default target/release/topicgate)
#   E2E_TIMEOUT     seconds any single wait may take (default 15)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-15}
CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# shellcheck source=lib.sh
source "$CI_DIR/lib.sh"
prepare "e2e_api" curl mosquitto_pub mosquitto_sub python3 timeout

mapfile -t PORTS < <(free_ports 3)
HTTP_PORT=${PORTS[0]}
MQTT_PORT=${PORTS[1]}
COAP_PORT=${PORTS[2]}
BASE="http://127.0.0.1:$HTTP_PORT"
DASH=https://dash.example

cat >"$WORK/topicgate.toml" <<TOML
[http.cors]
origins = ["$DASH"]
TOML
start_gateway --config "$WORK/topicgate.toml" --http-addr "127.0.0.1:$HTTP_PORT" \
    --mqtt-addr "127.0.0.1:$MQTT_PORT" --coap-addr "127.0.0.1:$COAP_PORT" --data-dir "$WORK/data"

# Whether the saved body, as JSON, satisfies a Python expression over `doc`.
body_is() {
    python3 -c '
import json, re, sys
doc = json.load(open(sys.argv[1]))
sys.exit(0 if eval(sys.argv[2]) else 1)
' "$WORK/body" "$1" 2>/dev/null
}

# The value of a response header saved by curl -D, without its line end.
header_of() {
    grep -i "^$1:" "$WORK/headers" | head -1 | cut -d' ' -f2- | tr -d '\r'
}

IS_ID='re.fullmatch(r"[0-9A-F]{32}", doc["id"])'
NO_SUBSCRIBER='doc == {"reason_code": 16, "message": "no_matching_subscribers"}'

# --- EMQX's publish API -------------------------------------------------------------------------

start_sub "$WORK/sub" probe/api -V 5 -t 'api/example/#' -F '%t %C %R %p'
wait_subscribed "$WORK/sub" probe/api

name="curl POST /api/v5/publish, EMQX's example, answers 200 {id} and mosquitto_sub gets it"
http -u 'api_key:api_secret' -H 'Content-Type: application/json' -X POST "$BASE/api/v5/publish" \
    -d '{
  "topic": "api/example/topic",
  "qos": 1,
  "clientid": "api_example_client",
  "payload": "hello emqx api",
  "properties": {
    "payload_format_indicator": 0,
    "message_expiry_interval": 0,
    "response_topic": "some_other_topic",
    "correlation_data": "string",
    "user_properties": {"foo": "bar"},
    "content_type": "text/plain"
  },
  "retain": false
}'
expected='api/example/topic text/plain some_other_topic hello emqx api'
if [[ $STATUS == 200 ]] && body_is "$IS_ID" && wait_until file_has_line "$WORK/sub" "$expected"; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")" "subscriber: $(show "$(cat "$WORK/sub")")"
fi

name='curl POST /api/v5/publish with a base64 payload nobody subscribes to: 202, reason_code 16'
http -u 'api_key:api_secret' -H 'Content-Type: application/json' -X POST "$BASE/api/v5/publish" \
    -d '{"topic": "nobody/listens", "payload": "aGVsbG8=", "payload_encoding": "base64", "retain": true}'
if [[ $STATUS == 202 ]] && body_is "$NO_SUBSCRIBER" && get_equals nobody/listens 200 hello; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")"
fi

name="curl POST /api/v5/publish/bulk, EMQX's example: 202 with one result per message"
http -u 'api_key:api_secret' -H 'Content-Type: application/json' -X POST \
    "$BASE/api/v5/publish/bulk" -d '[
  {"topic": "api/example/topic", "qos": 0, "payload": "hello emqx api 1", "retain": false},
  {"topic": "api/other/topic", "qos": 0, "payload": "hello emqx api 2", "retain": false}
]'
if [[ $STATUS == 202 ]] && body_is 'len(doc) == 2 and re.fullmatch(r"[0-9A-F]{32}", doc[0]["id"])' &&
    body_is 'doc[1] == {"reason_code": 16, "message": "no_matching_subscribers"}' &&
    wait_until file_has_line "$WORK/sub" 'api/example/topic   hello emqx api 1'; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")" "subscriber: $(show "$(cat "$WORK/sub")")"
fi

name='curl POST /api/v5/publish with bad JSON: 400 {"code": "BAD_REQUEST"}'
http -H 'Content-Type: application/json' -X POST "$BASE/api/v5/publish" -d '{"topic": '
if [[ $STATUS == 400 ]] && body_is 'doc["code"] == "BAD_REQUEST" and doc["message"]'; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")"
fi

name='curl POST /api/v5/publish/bulk with one wildcard topic: 400, nothing published'
http -H 'Content-Type: application/json' -X POST "$BASE/api/v5/publish/bulk" \
    -d '[{"topic": "bulk/kept", "payload": "x", "retain": true}, {"topic": "bulk/#", "payload": "y"}]'
if [[ $STATUS == 400 ]] && body_is 'doc["code"] == "BAD_REQUEST"' && get_status bulk/kept 404; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")"
fi

# --- long polling -------------------------------------------------------------------------------

mpub -t lp/temp -m 20 -r
wait_until get_equals lp/temp 200 20 || true

name='curl GET ?wait=30s with no If-None-Match answers the retained value at once'
started=$SECONDS
http -D "$WORK/headers" "$BASE/topics/lp/temp?wait=30s"
took=$((SECONDS - started))
etag=$(header_of etag)
if [[ $STATUS == 200 && $(body) == 20 && -n $etag ]] && ((took < 5)); then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)") after ${took}s"
fi

name='curl GET ?wait=30s with the current ETag gets the next value mosquitto_pub sends'
curl -sS --max-time "$TIMEOUT" -o "$WORK/poll" -w '%{http_code}' -H "If-None-Match: $etag" \
    "$BASE/topics/lp/temp?wait=30s" >"$WORK/poll.status" 2>"$WORK/poll.err" &
poller=$!
BG_PIDS+=("$poller")
# Published until the poll is answered: a poll not yet waiting when one is sent gets the next.
publish_until_answered() {
    mpub -t lp/temp -m 21 -r >/dev/null 2>&1 || true
    ! kill -0 "$poller" 2>/dev/null
}
wait_until publish_until_answered || true
wait "$poller" 2>/dev/null || true
if [[ $(cat "$WORK/poll.status") == 200 && $(cat "$WORK/poll") == 21 ]]; then
    ok "$name"
else
    not_ok "$name" "got: $(show "$(cat "$WORK/poll.status")") $(show "$(cat "$WORK/poll")")"
fi

name='curl GET ?wait=1s on a quiet topic: 204 after the wait'
started=$(date +%s%N)
http "$BASE/topics/lp/quiet?wait=1s"
took_ms=$((($(date +%s%N) - started) / 1000000))
if [[ $STATUS == 204 && -z $(body) ]] && ((took_ms >= 900 && took_ms < 5000)); then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)") after ${took_ms}ms"
fi

name='curl GET ?wait=61s, over http.max_wait: 400'
http "$BASE/topics/lp/temp?wait=61s"
if [[ $STATUS == 400 ]] && body_is 'doc["error"] == "invalid_parameter"'; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")"
fi

# --- CORS ---------------------------------------------------------------------------------------

# What a browser sends before a cross-origin PUT with a JSON body and credentials.
preflight() {
    http -D "$WORK/headers" -X OPTIONS \
        -H "Origin: $1" \
        -H 'Access-Control-Request-Method: PUT' \
        -H 'Access-Control-Request-Headers: authorization,content-type' \
        -H 'Sec-Fetch-Mode: cors' \
        -H 'Referer: https://dash.example/' \
        -H 'User-Agent: Mozilla/5.0' \
        "$BASE/topics/lp/temp"
}

name='curl CORS preflight from the allowed origin: 204 with the Access-Control-* headers'
preflight "$DASH"
if [[ $STATUS == 204 && $(header_of access-control-allow-origin) == "$DASH" &&
    $(header_of access-control-allow-methods) == *PUT* &&
    $(header_of access-control-allow-headers) == *authorization* &&
    $(header_of access-control-allow-headers) == *content-type* &&
    -n $(header_of access-control-max-age) ]]; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS" "headers: $(show "$(cat "$WORK/headers")")"
fi

name='curl CORS preflight from another origin: 403 without Access-Control-Allow-Origin'
preflight https://evil.example
if [[ $STATUS == 403 && -z $(header_of access-control-allow-origin) ]]; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS" "headers: $(show "$(cat "$WORK/headers")")"
fi

name='curl GET with Origin: Access-Control-Allow-Origin, and ETag exposed to the script'
http -D "$WORK/headers" -H "Origin: $DASH" "$BASE/topics/lp/temp"
if [[ $STATUS == 200 && $(header_of access-control-allow-origin) == "$DASH" &&
    $(header_of access-control-expose-headers) == *etag* ]]; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS" "headers: $(show "$(cat "$WORK/headers")")"
fi

name='curl event stream with Origin: Access-Control-Allow-Origin on the stream'
curl -sS -N --max-time 2 -D "$WORK/headers" -o /dev/null -H "Origin: $DASH" \
    -H 'Accept: text/event-stream' "$BASE/topics/lp/%23" 2>/dev/null || true
if [[ $(header_of content-type) == text/event-stream* &&
    $(header_of access-control-allow-origin) == "$DASH" ]]; then
    ok "$name"
else
    not_ok "$name" "headers: $(show "$(cat "$WORK/headers")")"
fi

echo "e2e_api: $PASSED passed, $FAILED failed"
((FAILED == 0))
