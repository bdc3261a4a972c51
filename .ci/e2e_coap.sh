#!/usr/bin/env bash
# End-to-end CoAP checks: starts the topicgate binary on free loopback ports and drives its CoAP
# endpoint with real clients (coap-client-notls from libcoap, curl, mosquitto_pub, mosquitto_sub,
# hand-built datagrams), then runs .ci/coap_checks.py (aiocoap and raw UDP) against the same
# gateway. Prints one "ok"/"not ok" line per check and a summary line; exits non-zero when a check
# fails.
#
#   TOPICGATE_BIN   binary to test (default target/release/topicgate)
#   E2E_TIMEOUT     seconds any single wait may take (default 10)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-10}
CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The gateway runs with this payload limit so that the 4.13 checks need only small payloads.
MAX_PAYLOAD=8192
# How long coap-client-notls keeps its observations (-s).
OBSERVE_SECONDS=4

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
prepare "e2e coap" coap-client-notls curl mosquitto_pub mosquitto_sub python3 timeout cmp
python3 -c 'import aiocoap' 2>/dev/null ||
    { echo "e2e coap: missing the python3 module aiocoap (pip install aiocoap)" >&2; exit 1; }

mapfile -t PORTS < <(free_ports 3)
HTTP_PORT=${PORTS[0]}
MQTT_PORT=${PORTS[1]}
COAP_PORT=${PORTS[2]}
BASE="http://127.0.0.1:$HTTP_PORT"
COAP="coap://127.0.0.1:$COAP_PORT"

# Runs coap-client-notls with a deadline (-B bounds its own wait for a response); sets CRC.
# Its stdout goes to $WORK/coap.out: the response payload (followed by a newline), and with -v 6
# also one line per message sent and received ("v:1 t:ACK c:2.05 i:... [ options ] :: 'payload'").
# Its stderr goes to $WORK/coap.err: "4.04 <diagnostic>" when the response is an error.
coap() {
    CRC=0
    timeout $((TIMEOUT + 5)) coap-client-notls -B "$TIMEOUT" "$@" \
        >"$WORK/coap.out" 2>"$WORK/coap.err" </dev/null || CRC=$?
}

coap_out() {
    cat "$WORK/coap.out" 2>/dev/null || true
}

coap_err() {
    cat "$WORK/coap.err" 2>/dev/null || true
}

# What coap-client printed, for failure reports.
coap_said() {
    echo "exit $CRC, stdout: $(show "$(coap_out | head -c 2000)"), stderr: $(show "$(coap_err)")"
}

coap_get_equals() {
    coap "$COAP/$1"
    [[ $(coap_out) == "$2" && ! -s $WORK/coap.err ]]
}

# Whether coap-client reported the response code $1 followed by a diagnostic text.
coap_error_is() {
    [[ $(coap_err) =~ ^$1\ [^[:space:]] ]]
}

# Value of a metric series (name and labels exactly as exposed), 0 when absent.
metric() {
    curl -s --max-time "$TIMEOUT" "$BASE/metrics" |
        awk -v series="$1" '$1 == series { value = $2 } END { print value == "" ? 0 : value }'
}

metric_at_least() {
    awk -v v="$(metric "$1")" -v min="$2" 'BEGIN { exit !(v >= min) }'
}

metric_at_most() {
    awk -v v="$(metric "$1")" -v max="$2" 'BEGIN { exit !(v <= max) }'
}

# One line per link of a link-format document: the target, then its attributes sorted.
links() {
    python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read().strip()
for link in re.findall(r'<[^>]*>(?:;[^,;="]+(?:="[^"]*"|=[^,;]*)?)*', text):
    target, *attrs = link.split(";")
    print(" ".join([target] + sorted(attrs)))
PY
}

# --- start the gateway ----------------------------------------------------------------------

printf 'max_payload = %s\n' "$MAX_PAYLOAD" >"$WORK/topicgate.toml"
# Ready once the HTTP side reports ready and the CoAP listener is logged.
gateway_ready() {
    http_ready && grep -q 'listening protocol="coap" addr=127.0.0.1:'"$COAP_PORT" "$WORK/gateway.log"
}
start_gateway --config "$WORK/topicgate.toml" --http-addr "127.0.0.1:$HTTP_PORT" \
    --mqtt-addr "127.0.0.1:$MQTT_PORT" --coap-addr "127.0.0.1:$COAP_PORT" \
    --data-dir "$WORK/data"
ok "startup log names the CoAP listener"

# --- 1. an MQTT retained value is readable with a CoAP GET ------------------------------------

name="mosquitto_pub -r is readable with coap-client GET"
if ! mpub -r -t home/hum -m 40; then
    not_ok "$name" "mosquitto_pub -r -t home/hum -m 40 failed"
elif wait_until coap_get_equals topics/home/hum 40; then
    ok "$name"
else
    not_ok "$name" "GET $COAP/topics/home/hum: expected '40'" "got $(coap_said)"
fi

name="GET on the /ps alias reads the same value"
if coap_get_equals ps/home/hum 40; then
    ok "$name"
else
    not_ok "$name" "GET $COAP/ps/home/hum: expected '40'" "got $(coap_said)"
fi

name="GET of a never-published topic is 4.04 with a diagnostic"
coap "$COAP/topics/never/published"
if coap_error_is 4.04 && [[ -z $(coap_out) ]]; then
    ok "$name"
else
    not_ok "$name" "expected '4.04 <text>' from coap-client" "got $(coap_said)"
fi

# --- 2. observations see publishes from HTTP, MQTT and CoAP -----------------------------------

OBS_BASE=$(metric topicgate_coap_observers)
DEREG_BASE=$(metric 'topicgate_coap_observers_removed_total{reason="deregistered"}')
timeout $((OBSERVE_SECONDS + TIMEOUT + 5)) coap-client-notls -B "$TIMEOUT" -s "$OBSERVE_SECONDS" \
    -o "$WORK/obs-temp.bin" "$COAP/topics/home/temp" >"$WORK/obs-temp.log" 2>&1 </dev/null &
OBS_TEMP_PID=$!
BG_PIDS+=($OBS_TEMP_PID)
timeout $((OBSERVE_SECONDS + TIMEOUT + 5)) coap-client-notls -B "$TIMEOUT" -s "$OBSERVE_SECONDS" \
    -v 6 -o "$WORK/obs-sensor.bin" "$COAP/topics/sensor/%23" >"$WORK/obs-sensor.log" 2>&1 </dev/null &
OBS_SENSOR_PID=$!
BG_PIDS+=($OBS_SENSOR_PID)

# The notifications of the filter observation: one line per JSON document after the first (the
# registration response): "topic<TAB>payload" of each envelope, or a complaint.
filter_notifications() {
    python3 - "$WORK/obs-sensor.bin" <<'PY'
import json, sys
try:
    text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
except OSError as e:
    print(f"!no output: {e}")
    sys.exit()
decoder, docs, pos = json.JSONDecoder(), [], 0
try:
    while pos < len(text.rstrip()):
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
except ValueError as e:
    print(f"!unparsable at {pos}: {e}")
for doc in docs[1:]:
    msgs = doc.get("messages") if isinstance(doc, dict) else None
    if not isinstance(msgs, list) or len(msgs) != 1 or doc.get("next") is not None:
        print(f"!not one envelope: {json.dumps(doc)}")
        continue
    print(f"{msgs[0].get('topic')}\t{msgs[0].get('payload')}")
PY
}

name="coap-client observations register"
if wait_until metric_at_least topicgate_coap_observers $((OBS_BASE + 2)); then
    ok "$name"
    for value in 21.5 22.0 22.5; do
        http -d "$value" "$BASE/topics/home/temp"
        [[ $STATUS == 204 ]] || echo "# POST /topics/home/temp $value: status $STATUS"
    done
    mpub -t sensor/a -m m1 || echo "# mosquitto_pub -t sensor/a failed"
    coap -m post -e c1 "$COAP/topics/sensor/b"
    [[ ! -s $WORK/coap.err ]] || echo "# CoAP POST /topics/sensor/b: $(coap_said)"
    http -d h1 "$BASE/topics/sensor/c"
    [[ $STATUS == 204 ]] || echo "# POST /topics/sensor/c: status $STATUS"
else
    not_ok "$name" "topicgate_coap_observers: expected $((OBS_BASE + 2)), got $(metric topicgate_coap_observers)" \
        "observers: $(show "$(cat "$WORK/obs-temp.log" "$WORK/obs-sensor.log")")"
fi
# Both end by themselves after $OBSERVE_SECONDS s (timeout kills them otherwise).
wait "$OBS_TEMP_PID" || echo "# coap-client -s on home/temp exited with status $?"
wait "$OBS_SENSOR_PID" || echo "# coap-client -s on sensor/# exited with status $?"

name="observer of home/temp gets each HTTP publish in order"
got=$(cat "$WORK/obs-temp.bin" 2>/dev/null || true)
if [[ $got == *21.5*22.0*22.5* ]]; then
    ok "$name"
else
    not_ok "$name" "expected the notifications 21.5, 22.0, 22.5 in order" \
        "got: $(show "$got"), log: $(show "$(head -c 2000 "$WORK/obs-temp.log")")"
fi

name="observer of sensor/# gets one JSON envelope per publish (MQTT, CoAP, HTTP)"
got=$(filter_notifications)
expected=$'sensor/a\tm1\nsensor/b\tc1\nsensor/c\th1'
if [[ $got == "$expected" ]]; then
    ok "$name"
else
    not_ok "$name" "expected envelopes $(show "$expected")" "got: $(show "$got")" \
        "payloads: $(show "$(head -c 3000 "$WORK/obs-sensor.bin" 2>/dev/null)")"
fi

name="filter notifications carry Content-Format 50"
count=$(grep -cE '^v:1 t:(NON|CON) c:2\.05 .*Content-Format:application/json' "$WORK/obs-sensor.log" || true)
if ((count >= 3)); then
    ok "$name"
else
    not_ok "$name" "expected 3 notifications with Content-Format:application/json, got $count" \
        "log: $(show "$(grep -E '^v:1' "$WORK/obs-sensor.log" | cut -c1-200)")"
fi

name="observations end with a deregistration when coap-client stops"
if wait_until metric_at_most topicgate_coap_observers "$OBS_BASE" &&
    metric_at_least 'topicgate_coap_observers_removed_total{reason="deregistered"}' $((DEREG_BASE + 2)); then
    ok "$name"
else
    not_ok "$name" "expected topicgate_coap_observers back to $OBS_BASE and 2 more removals with reason=\"deregistered\"" \
        "got: $(curl -s --max-time "$TIMEOUT" "$BASE/metrics" | grep '^topicgate_coap_observers' | tr '\n' ' ')"
fi

# --- 3. a CoAP PUT reaches MQTT and HTTP -------------------------------------------------------

SUB_X=$WORK/sub-x.txt
start_sub "$SUB_X" e2e/probe/x -v -t home/x
name="coap-client PUT is received by mosquitto_sub"
if ! wait_subscribed "$SUB_X" e2e/probe/x; then
    not_ok "$name" "the subscriber never saw its probe message" \
        "subscriber output: $(show "$(cat "$SUB_X" "$SUB_X.err")")"
else
    coap -m put -e 7 "$COAP/topics/home/x"
    if [[ -s $WORK/coap.err ]]; then
        not_ok "$name" "PUT $COAP/topics/home/x: expected 2.04, got $(coap_said)"
    elif wait_until file_has_line "$SUB_X" "home/x 7"; then
        ok "$name"
    else
        not_ok "$name" "expected a line 'home/x 7'" "got: $(show "$(cat "$SUB_X")")"
    fi
fi

name="coap-client PUT is retained: curl reads it back"
if wait_until get_equals home/x 200 7; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/x: expected 200 '7', got $STATUS $(show "$(body)")"
fi

name="CoAP POST is not retained"
coap -m post -e transient "$COAP/topics/home/transient"
if [[ -s $WORK/coap.err ]]; then
    not_ok "$name" "POST $COAP/topics/home/transient: expected 2.04, got $(coap_said)"
elif get_status home/transient 404; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/transient: expected 404, got $STATUS $(show "$(body)")"
fi

name="CoAP POST ?retain=true on the /ps alias is retained"
coap -m post -e kept "$COAP/ps/home/kept?retain=true"
if [[ -s $WORK/coap.err ]]; then
    not_ok "$name" "POST $COAP/ps/home/kept?retain=true: expected 2.04, got $(coap_said)"
elif wait_until get_equals home/kept 200 kept; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/kept: expected 200 'kept', got $STATUS $(show "$(body)")"
fi

name="CoAP POST ?retain=true&expiry=1 is retained, then expires"
coap -m post -e soon "$COAP/topics/home/soon?retain=true&expiry=1"
if [[ -s $WORK/coap.err ]]; then
    not_ok "$name" "POST $COAP/topics/home/soon?retain=true&expiry=1: expected 2.04, got $(coap_said)"
elif ! get_equals home/soon 200 soon; then
    not_ok "$name" "GET /topics/home/soon right away: expected 200 'soon', got $STATUS $(show "$(body)")"
elif wait_until get_status home/soon 404; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/soon: expected 404 once expired, got $STATUS $(show "$(body)")"
fi

name="POST with ?qos=7 is 4.00"
coap -m post -e v "$COAP/topics/home/q?qos=7"
if coap_error_is 4.00; then
    ok "$name"
else
    not_ok "$name" "expected '4.00 <text>'" "got $(coap_said)"
fi

# --- 4. block-wise GET of a 4 KB value ---------------------------------------------------------

python3 -c 'import sys; sys.stdout.write(("The quick brown fox jumps over the lazy dog, 0123456789.\n" * 80)[:4096])' \
    >"$WORK/four.txt"
http -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/four.txt" \
    "$BASE/topics/blk/four"
if [[ $STATUS != 204 ]]; then
    not_ok "block-wise GET" "PUT /topics/blk/four over HTTP: expected 204, got $STATUS $(show "$(body)")"
else
    for size in 256 default; do
        name="4 KB value read with coap-client -b $size is byte-identical"
        if [[ $size == default ]]; then
            coap -v 6 -o "$WORK/four.$size" "$COAP/topics/blk/four"
            last='Block2:3/_/1024'
        else
            coap -v 6 -b "$size" -o "$WORK/four.$size" "$COAP/topics/blk/four"
            last="Block2:$((4096 / size - 1))/_/$size"
        fi
        if ! cmp -s "$WORK/four.txt" "$WORK/four.$size"; then
            not_ok "$name" "cmp: $(cmp "$WORK/four.txt" "$WORK/four.$size" 2>&1 || true)" \
                "got $(coap_said)"
        elif ! grep -qF "$last" "$WORK/coap.out"; then
            not_ok "$name" "expected the last response to carry $last" \
                "responses: $(show "$(grep -E '^v:1 t:ACK' "$WORK/coap.out" | cut -d']' -f1)")"
        else
            ok "$name"
        fi
    done
fi

# --- 5. content formats ------------------------------------------------------------------------

name="JSON retained over HTTP is served with Content-Format 50"
http -X PUT -H 'Content-Type: application/json' -d '{"a":1}' "$BASE/topics/home/json"
if [[ $STATUS != 204 ]]; then
    not_ok "$name" "PUT /topics/home/json over HTTP: expected 204, got $STATUS $(show "$(body)")"
else
    coap -v 6 -o "$WORK/json.out" "$COAP/topics/home/json"
    if grep -qE '^v:1 t:ACK c:2\.05 .*\[ ETag:0x[0-9a-f]+, Content-Format:application/json, Max-Age:[0-9]+ \]' \
        "$WORK/coap.out" && [[ $(cat "$WORK/json.out" 2>/dev/null) == '{"a":1}' ]]; then
        ok "$name"
    else
        not_ok "$name" "expected a 2.05 with ETag, Content-Format:application/json, Max-Age and payload {\"a\":1}" \
            "got $(coap_said)"
    fi
fi

name="CoAP PUT with Content-Format 60 is served over HTTP as application/cbor"
printf '\xa1\x61\x61\x01' >"$WORK/value.cbor"
coap -m put -t 60 -f "$WORK/value.cbor" "$COAP/topics/home/cbor"
if [[ -s $WORK/coap.err ]]; then
    not_ok "$name" "PUT $COAP/topics/home/cbor: expected 2.04, got $(coap_said)"
else
    http -D "$WORK/headers" "$BASE/topics/home/cbor"
    if [[ $STATUS == 200 ]] && grep -qi '^content-type: *application/cbor\s*$' "$WORK/headers" &&
        cmp -s "$WORK/value.cbor" "$WORK/body"; then
        ok "$name"
    else
        not_ok "$name" "GET /topics/home/cbor: expected 200, content-type application/cbor, the 4 bytes sent" \
            "got $STATUS, headers $(show "$(cat "$WORK/headers")"), body $(show "$(body)")"
    fi
fi

name="GET of a wildcard filter is a JSON listing with Content-Format 50"
coap -v 6 -o "$WORK/listing.json" "$COAP/topics/home/%23"
listing=$(python3 - "$WORK/listing.json" <<'PY' 2>&1
import json, sys
doc = json.load(open(sys.argv[1]))
assert doc["next"] is None, "next is not null"
by_topic = {m["topic"]: m for m in doc["messages"]}
hum, cbor = by_topic["home/hum"], by_topic["home/cbor"]
assert (hum["payload"], hum["payload_encoding"], hum["retain"]) == ("40", "utf8", True), hum
assert (cbor["payload"], cbor["payload_encoding"], cbor["content_type"]) == (
    "oWFhAQ==", "base64", "application/cbor"), cbor
for m in doc["messages"]:
    missing = {"topic", "payload", "payload_encoding", "content_type", "qos", "retain",
               "updated_at", "properties"} - set(m)
    assert not missing, f"{m['topic']} lacks {sorted(missing)}"
PY
) || true
if ! grep -qE '^v:1 t:ACK c:2\.05 .*Content-Format:application/json' "$WORK/coap.out"; then
    not_ok "$name" "expected a 2.05 with Content-Format:application/json" "got $(coap_said)"
elif [[ -n $listing ]]; then
    not_ok "$name" "the listing is not as expected: $(show "$listing")" \
        "listing: $(show "$(head -c 3000 "$WORK/listing.json")")"
else
    ok "$name"
fi

name="PUT with an unsupported Content-Format is 4.15"
coap -m put -t 1234 -e v "$COAP/topics/home/odd"
if coap_error_is 4.15; then
    ok "$name"
else
    not_ok "$name" "expected '4.15 <text>'" "got $(coap_said)"
fi

# --- 6. resource discovery ---------------------------------------------------------------------

name="/.well-known/core lists the pub-sub roots and the retained topics"
coap "$COAP/.well-known/core"
links "$WORK/coap.out" >"$WORK/links"
missing=()
for want in '</topics> ct=40 rt="core.ps"' '</ps> ct=40 rt="core.ps"' \
    '</topics/home/hum> obs rt="core.ps.data"' '</topics/home/json> ct=50 obs rt="core.ps.data"' \
    '</topics/home/cbor> ct=60 obs rt="core.ps.data"'; do
    file_has_line "$WORK/links" "$want" || missing+=("$want")
done
if ((${#missing[@]} == 0)) && [[ ! -s $WORK/coap.err ]]; then
    ok "$name"
else
    not_ok "$name" "missing (target, sorted attributes): $(show "${missing[*]}")" "got $(coap_said)"
fi

name="/.well-known/core?rt=core.ps lists only the two roots"
coap "$COAP/.well-known/core?rt=core.ps"
got=$(links "$WORK/coap.out" | cut -d' ' -f1 | sort | tr '\n' ' ')
if [[ $got == '</ps> </topics> ' ]]; then
    ok "$name"
else
    not_ok "$name" "expected the links </ps> and </topics>" "got $(coap_said)"
fi

name="/.well-known/core?rt=core.ps.data lists only topics"
coap "$COAP/.well-known/core?rt=core.ps.data"
links "$WORK/coap.out" >"$WORK/links"
if file_has_line "$WORK/links" '</topics/home/hum> obs rt="core.ps.data"' &&
    ! grep -qv 'rt="core.ps.data"' "$WORK/links"; then
    ok "$name"
else
    not_ok "$name" "expected </topics/home/hum> and only links with rt=\"core.ps.data\"" \
        "got $(coap_said)"
fi

# --- 7. DELETE ---------------------------------------------------------------------------------

name="CoAP DELETE clears the retained value (2.02, then HTTP 404)"
coap -v 6 -m delete "$COAP/topics/home/x"
if ! grep -qE '^v:1 t:ACK c:2\.02 ' "$WORK/coap.out"; then
    not_ok "$name" "DELETE $COAP/topics/home/x: expected 2.02" "got $(coap_said)"
elif wait_until get_status home/x 404; then
    ok "$name"
else
    not_ok "$name" "GET /topics/home/x: expected 404, got $STATUS $(show "$(body)")"
fi

name="DELETE of a topic with nothing retained is 4.04"
coap -m delete "$COAP/topics/home/x"
if coap_error_is 4.04; then
    ok "$name"
else
    not_ok "$name" "expected '4.04 <text>'" "got $(coap_said)"
fi

# --- 8. errors ---------------------------------------------------------------------------------

name="PUT to a wildcard topic is 4.00 with a diagnostic"
coap -m put -e v "$COAP/topics/a/+"
if coap_error_is 4.00; then
    ok "$name"
else
    not_ok "$name" "expected '4.00 <text>'" "got $(coap_said)"
fi

name="FETCH on a topic is 4.05"
coap -m fetch -e v "$COAP/topics/home/hum"
if coap_error_is 4.05; then
    ok "$name"
else
    not_ok "$name" "expected '4.05 <text>'" "got $(coap_said)"
fi

name="block-wise PUT over max_payload is 4.13 with Size1"
head -c $((MAX_PAYLOAD + 1808)) /dev/zero | tr '\0' z >"$WORK/too-big"
coap -v 6 -m put -f "$WORK/too-big" "$COAP/topics/big/too"
if coap_error_is 4.13 && grep -qE "^v:1 t:ACK c:4\.13 .*Size1:$MAX_PAYLOAD" "$WORK/coap.out" &&
    get_status big/too 404; then
    ok "$name"
else
    not_ok "$name" "expected a 4.13 with Size1:$MAX_PAYLOAD and nothing retained (GET: $STATUS)" \
        "got $(coap_said)"
fi

# --- 9. malformed datagrams --------------------------------------------------------------------

# Sends each datagram from its own socket; prints "label<TAB>reply as hex" or "label<TAB>silence".
python3 - "$COAP_PORT" >"$WORK/raw.txt" <<'PY'
import select, socket, sys, time
port = int(sys.argv[1])
cases = [
    ("2-byte datagram", bytes([0x40, 0x01])),
    ("version 2 CON", bytes([0x80, 0x01, 0x10, 0x01])),
    ("token length 9 CON", bytes([0x49, 0x01, 0x10, 0x02]) + b"123456789"),
    ("token length 9 NON", bytes([0x59, 0x01, 0x10, 0x03]) + b"123456789"),
    ("option nibble 15 CON", bytes([0x40, 0x01, 0x10, 0x04, 0xF0])),
    ("option nibble 15 NON", bytes([0x50, 0x01, 0x10, 0x05, 0xF0])),
    ("payload marker without payload CON", bytes([0x40, 0x01, 0x10, 0x06, 0xFF])),
    ("payload marker without payload NON", bytes([0x50, 0x01, 0x10, 0x07, 0xFF])),
    ("CON ping", bytes([0x40, 0x00, 0x10, 0x08])),
]
socks = {}
for label, data in cases:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    s.send(data)
    socks[s] = label
replies = {}
# Five of them must be answered; give the rest a second more to stay silent.
deadline = time.monotonic() + 10
while socks and time.monotonic() < deadline:
    if len(replies) >= 5:
        deadline = min(deadline, time.monotonic() + 1)
    ready, _, _ = select.select(list(socks), [], [], max(0, deadline - time.monotonic()))
    for s in ready:
        replies[socks.pop(s)] = s.recv(65536).hex()
for label, _ in cases:
    print(f"{label}\t{replies.get(label, 'silence')}")
PY
while IFS=$'\t' read -r label got; do
    case $label in
        "token length 9 CON") want=70001002 ;;
        "option nibble 15 CON") want=70001004 ;;
        "payload marker without payload CON") want=70001006 ;;
        "CON ping") want=70001008 ;;
        *) want=silence ;;
    esac
    name="$label: $([[ $want == silence ]] && echo "ignored" || echo "answered by RST")"
    if [[ $got == "$want" ]]; then
        ok "$name"
    else
        not_ok "$name" "expected $want, got $got"
    fi
done <"$WORK/raw.txt"

name="the endpoint still answers GET after malformed datagrams"
if coap_get_equals topics/home/hum 40; then
    ok "$name"
else
    not_ok "$name" "GET $COAP/topics/home/hum: expected '40'" "got $(coap_said)"
fi

# --- 10. metrics -------------------------------------------------------------------------------

for series in 'topicgate_coap_requests_total{method="PUT",code="2.04"}' \
    'topicgate_coap_requests_total{method="GET",code="2.05"}' \
    'topicgate_coap_requests_total{method="DELETE",code="2.02"}' \
    'topicgate_publishes_total{protocol="coap"}'; do
    name="metrics count $series"
    if metric_at_least "$series" 1; then
        ok "$name"
    else
        not_ok "$name" "expected at least 1, got $(metric "$series")"
    fi
done

# --- 11. aiocoap and hand-built datagrams (.ci/coap_checks.py) ----------------------------------

rc=0
timeout $((TIMEOUT * 10)) python3 "$CI_DIR/coap_checks.py" --coap-port "$COAP_PORT" \
    --http-port "$HTTP_PORT" --mqtt-port "$MQTT_PORT" --max-payload "$MAX_PAYLOAD" \
    --timeout "$TIMEOUT" >"$WORK/checks.out" 2>&1 </dev/null || rc=$?
reported=0
while IFS= read -r line; do
    case $line in
        "ok - "*) ok "${line#ok - }"; reported=$((reported + 1)) ;;
        "not ok - "*) FAILED=$((FAILED + 1)); echo "$line"; reported=$((reported + 1)) ;;
        "#"*) echo "$line" ;;
    esac
done <"$WORK/checks.out"
if ((rc != 0 && FAILED == 0)) || ((reported == 0)); then
    not_ok "coap_checks.py runs" "exit status $rc, output: $(show "$(tail -c 3000 "$WORK/checks.out")")"
fi

echo "e2e coap: $PASSED passed, $FAILED failed"
((FAILED == 0))
