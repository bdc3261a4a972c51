#!/usr/bin/env bash
# End-to-end checks of request/response (/rpc) with the clients people use: Python paho-mqtt
# responders (MQTT 5 with Response Topic and Correlation Data, and MQTT 3.1.1 through the JSON
# envelope) answer curl over HTTP and coap-client-notls over CoAP, one of them after 3 s, which
# CoAP gets as a separate response without retransmitting; `?require_subscriber=true` refuses a
# call nobody subscribes to at once. Prints one "ok"/"not ok" line per check and a summary line.
#
#   TOPICGATE_BIN   binary to test (default target/release/topicgate)
#   E2E_TIMEOUT     seconds any single wait may take (default 15)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-15}
CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# shellcheck source=lib.sh
source "$CI_DIR/lib.sh"
prepare "e2e_rpc" curl coap-client-notls python3 timeout

mapfile -t PORTS < <(free_ports 3)
HTTP_PORT=${PORTS[0]}
MQTT_PORT=${PORTS[1]}
COAP_PORT=${PORTS[2]}
BASE="http://127.0.0.1:$HTTP_PORT"
COAP="coap://127.0.0.1:$COAP_PORT"

start_gateway --http-addr "127.0.0.1:$HTTP_PORT" --mqtt-addr "127.0.0.1:$MQTT_PORT" \
    --coap-addr "127.0.0.1:$COAP_PORT" --data-dir "$WORK/data"

# Two responders in one process: MQTT 5 on svc/#, answering on the Response Topic with the
# Correlation Data (svc/slow after 3 s), and MQTT 3.1.1 on legacy/#, reading the reply topic
# from the JSON envelope of ?envelope=true. Each prints "ready" once subscribed.
cat >"$WORK/responders.py" <<'PY'
import json, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port = int(sys.argv[1])

def answer(client, msg):
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = msg.properties.CorrelationData
    props.ContentType = "text/plain"
    props.UserProperty = [("served-by", "paho")]
    reply = msg.payload.upper()
    client.publish(msg.properties.ResponseTopic, reply, qos=1, properties=props)

def on_v5(client, userdata, msg):
    if msg.topic == "svc/slow":
        threading.Timer(3.0, answer, (client, msg)).start()
    else:
        answer(client, msg)

def on_v4(client, userdata, msg):
    envelope = json.loads(msg.payload)
    reply_to = envelope["properties"]["response_topic"]
    client.publish(reply_to, "legacy got " + envelope["payload"], qos=1)

subscribed = threading.Barrier(3)
def responder(client_id, protocol, topic, on_message):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.wait()
    c.on_connect = lambda client, *a: client.subscribe(topic, qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c

responder("rpc-v5", mqtt.MQTTv5, "svc/#", on_v5)
responder("rpc-v4", mqtt.MQTTv311, "legacy/#", on_v4)
subscribed.wait()
print("ready", flush=True)
threading.Event().wait()
PY
python3 -u "$WORK/responders.py" "$MQTT_PORT" >"$WORK/responders.out" 2>&1 &
BG_PIDS+=($!)
responders_ready() { grep -q '^ready$' "$WORK/responders.out"; }
if ! wait_until responders_ready; then
    echo "e2e_rpc: the responders did not subscribe; their output:" >&2
    cat "$WORK/responders.out" >&2
    exit 1
fi

# --- HTTP --------------------------------------------------------------------------------------

name='curl POST /rpc/svc/upper gets the MQTT 5 reply with its type and user property'
http -D "$WORK/headers" -H 'content-type: text/plain' -d hello "$BASE/rpc/svc/upper"
if [[ $STATUS == 200 && $(body) == HELLO ]] &&
    grep -qi '^content-type: text/plain' "$WORK/headers" &&
    grep -qi '^mqtt-user-served-by: paho' "$WORK/headers"; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")" "headers: $(show "$(cat "$WORK/headers")")"
fi

name='curl POST /rpc/legacy/echo?envelope=true gets the MQTT 3.1.1 reply'
http -d ping "$BASE/rpc/legacy/echo?envelope=true"
if [[ $STATUS == 200 && $(body) == "legacy got ping" ]]; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")"
fi

name='curl POST /rpc with nobody answering gets 504 no_reply after ?timeout=1s'
started=$SECONDS
http -d anyone "$BASE/rpc/nobody/home?timeout=1s"
took=$((SECONDS - started))
if [[ $STATUS == 504 && $(body) == *'"error":"no_reply"'* ]] && ((took >= 1 && took < 5)); then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)") after ${took}s"
fi

name='curl POST /rpc?require_subscriber=true: 404 no_subscriber at once with nobody subscribed, 200 with paho on svc/#'
started=$SECONDS
http -d anyone "$BASE/rpc/nobody/home?require_subscriber=true&timeout=10s"
took=$((SECONDS - started))
first="$STATUS $(body)"
http -d hello "$BASE/rpc/svc/upper?require_subscriber=true"
if [[ $first == '404 '*'"error":"no_subscriber"'* && $STATUS == 200 && $(body) == HELLO ]] && ((took < 5)); then
    ok "$name"
else
    not_ok "$name" "got: $(show "$first") after ${took}s, then $STATUS $(show "$(body)")"
fi

# --- CoAP --------------------------------------------------------------------------------------

duplicates() {
    curl -s "$BASE/metrics" | awk '/^topicgate_coap_duplicates_total /{print $2}'
}

name='coap-client -m post rpc/svc/upper gets the reply in the ACK'
out=$(timeout "$TIMEOUT" coap-client-notls -m post -e hello "$COAP/rpc/svc/upper" 2>&1) || true
if [[ $out == HELLO ]]; then
    ok "$name"
else
    not_ok "$name" "got: $(show "$out")"
fi

name='coap-client -m post rpc/svc/slow gets a reply after 3 s as a separate response, without retransmitting'
before=$(duplicates)
started=$SECONDS
out=$(timeout "$TIMEOUT" coap-client-notls -m post -e slow "$COAP/rpc/svc/slow" 2>&1) || true
took=$((SECONDS - started))
after=$(duplicates)
if [[ $out == SLOW && -n $before && $before == "$after" ]] && ((took >= 3)); then
    ok "$name"
else
    not_ok "$name" "got: $(show "$out") after ${took}s; duplicates $before -> $after"
fi

name='coap-client -m post with nobody answering gets 5.04 after ?timeout=1s'
out=$(timeout "$TIMEOUT" coap-client-notls -m post -e anyone "$COAP/rpc/nobody/home?timeout=1s" 2>&1) || true
if [[ $out == *5.04* ]]; then
    ok "$name"
else
    not_ok "$name" "got: $(show "$out")"
fi

echo "e2e_rpc: $PASSED passed, $FAILED failed"
((FAILED == 0))
