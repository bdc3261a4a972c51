#!/usr/bin/env bash
# End-to-end checks of push and pull rules with the clients people use: a small HTTP device
# (a python3 http.server subclass) receives what mosquitto_pub publishes, fails at first, answers
# back to mosquitto_sub and mosquitto_rr, refuses some with 404 (dead letters), and serves a
# value with an ETag that a pull rule publishes once while unchanged; libcoap's
# coap-server-notls takes a CoAP push (read back with coap-client-notls) and has its observable
# `time` resource observed into a topic; a paho-mqtt MQTT 5 requester calls both devices
# across. Prints one "ok"/"not ok" line per check and a summary line.
#
#   TOPICGATE_BIN   binary to test (default target/release/topicgate)
#   E2E_TIMEOUT     seconds any single wait may take (default 15)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-15}
CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# shellcheck source=lib.sh
source "$CI_DIR/lib.sh"
prepare "e2e_devices" curl mosquitto_pub mosquitto_sub mosquitto_rr python3 timeout \
    coap-server-notls coap-client-notls

mapfile -t PORTS < <(free_ports 5)
HTTP_PORT=${PORTS[0]}
MQTT_PORT=${PORTS[1]}
COAP_PORT=${PORTS[2]}
DEVICE_PORT=${PORTS[3]}
COAP_DEVICE_PORT=${PORTS[4]}
BASE="http://127.0.0.1:$HTTP_PORT"
DEVICE="http://127.0.0.1:$DEVICE_PORT"

# The device: PUT /relay/<id>?turn=<v> is logged and answered with the relay's state, after two
# 503s; /relay/bad is 404; GET /temp serves a value with an ETag (304 to If-None-Match), and
# POST /temp sets it. It checks the bearer token the gateway read from the environment.
cat >"$WORK/device.py" <<'PY'
import http.server, sys, threading

log_path, token = sys.argv[2], sys.argv[3]
state = {"failures": 0, "temp": b"21.5", "not_modified": 0}
lock = threading.Lock()

class Device(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body=b"", ctype="text/plain", extra=()):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("authorization") != "Bearer " + token:
            return self.answer(401, b"who are you")
        if self.path.startswith("/relay/bad"):
            return self.answer(404, b"no such relay")
        with lock:
            if state["failures"] < 2:
                state["failures"] += 1
                return self.answer(503, b"warming up", extra=[("retry-after", "0")])
            with open(log_path, "a") as f:
                f.write(f"{self.command} {self.path} {body.decode()}\n")
        self.answer(200, b'{"relay":"' + self.path.split("turn=")[-1].encode() + b'"}', "application/json")

    def do_GET(self):
        etag = '"' + state["temp"].decode() + '"'
        if self.headers.get("if-none-match") == etag:
            state["not_modified"] += 1
            return self.answer(304)
        self.answer(200, state["temp"], extra=[("etag", etag)])

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/temp":
            state["temp"] = body
            return self.answer(204)
        if self.path == "/stats":
            return self.answer(200, str(state["not_modified"]).encode())
        self.answer(404)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Device).serve_forever()
PY
export E2E_PLUG_TOKEN=plug-token-from-the-environment
python3 -u "$WORK/device.py" "$DEVICE_PORT" "$WORK/device.log" "$E2E_PLUG_TOKEN" \
    >"$WORK/device.out" 2>&1 &
BG_PIDS+=($!)
touch "$WORK/device.log"
device_up() { curl -s -o /dev/null --max-time 1 "$DEVICE/temp"; }
wait_until device_up || { echo "e2e_devices: the device did not start" >&2; cat "$WORK/device.out" >&2; exit 1; }

coap-server-notls -A 127.0.0.1 -p "$COAP_DEVICE_PORT" >"$WORK/coap-server.out" 2>&1 &
BG_PIDS+=($!)
coap_device_up() {
    [[ $(timeout 2 coap-client-notls -B 1 -m get "coap://127.0.0.1:$COAP_DEVICE_PORT/" 2>/dev/null) != "" ]]
}
wait_until coap_device_up || { echo "e2e_devices: coap-server-notls did not start" >&2; exit 1; }

cat >"$WORK/topicgate.toml" <<TOML
[[push]]
name = "plugs"
filter = "plugs/+/set"
url = "$DEVICE/relay/{2}?turn={payload}"
method = "PUT"
headers = { Authorization = "Bearer \${E2E_PLUG_TOKEN}" }
reply_topic = "plugs/{2}/state"
dead_letter_topic = "plugs/dead"
backoff = "50ms"
max_backoff = "200ms"

[[pull]]
name = "temp"
url = "$DEVICE/temp"
interval = "100ms"
topic = "sensors/temp"

[[push]]
name = "coap-data"
filter = "coap/data"
url = "coap://127.0.0.1:$COAP_DEVICE_PORT/example_data"
method = "PUT"

[[pull]]
name = "clock"
url = "coap://127.0.0.1:$COAP_DEVICE_PORT/time"
observe = true
topic = "sensors/clock"
retain = false
TOML

start_gateway --config "$WORK/topicgate.toml" --http-addr "127.0.0.1:$HTTP_PORT" \
    --mqtt-addr "127.0.0.1:$MQTT_PORT" --coap-addr "127.0.0.1:$COAP_PORT" --data-dir "$WORK/data"

start_sub "$WORK/sub.out" probe/devices -v -t 'plugs/+/state' -t plugs/dead -t sensors/temp \
    -t sensors/clock
wait_subscribed "$WORK/sub.out" probe/devices

# --- push ----------------------------------------------------------------------------------------

name='mosquitto_pub to plugs/p1/set: every message reaches the device in order, after two 503s'
for v in 0 1 2 3 4; do mpub -t plugs/p1/set -m "on$v"; done
five_logged() { (($(wc -l <"$WORK/device.log") >= 5)); }
wait_until five_logged || true
expected=$(for v in 0 1 2 3 4; do echo "PUT /relay/p1?turn=on$v on$v"; done)
if [[ $(cat "$WORK/device.log") == "$expected" ]]; then
    ok "$name"
else
    not_ok "$name" "device log: $(show "$(cat "$WORK/device.log")")"
fi

name='mosquitto_sub sees the device answers on the reply_topic plugs/p1/state'
answered() { grep -qxF 'plugs/p1/state {"relay":"on4"}' "$WORK/sub.out"; }
if wait_until answered; then
    ok "$name"
else
    not_ok "$name" "subscriber saw: $(show "$(cat "$WORK/sub.out")")"
fi

name='a 404 becomes a dead letter: mosquitto_sub sees it with the status and body'
mpub -t plugs/bad/set -m on
dead() { grep -q '^plugs/dead .*"reason":"refused".*"status":404.*"body":"no such relay"' "$WORK/sub.out"; }
if wait_until dead; then
    ok "$name"
else
    not_ok "$name" "subscriber saw: $(show "$(cat "$WORK/sub.out")")"
fi

name='mosquitto_rr (MQTT 5) gets the device answer on its Response Topic'
out=$(timeout "$TIMEOUT" mosquitto_rr -h 127.0.0.1 -p "$MQTT_PORT" -t plugs/p2/set \
    -e rr/replies/e2e -m off -W "$TIMEOUT" 2>&1) || true
if [[ $out == '{"relay":"off"}' ]]; then
    ok "$name"
else
    not_ok "$name" "got: $(show "$out")"
fi

name='GET /rules counts the deliveries and redacts the token'
http "$BASE/rules"
if [[ $STATUS == 200 && $(body) == *'"authorization":"<redacted>"'* &&
    $(body) == *'"dead_letters":1'* && $(body) != *"$E2E_PLUG_TOKEN"* ]]; then
    ok "$name"
else
    not_ok "$name" "got: $STATUS $(show "$(body)")"
fi

# --- pull ----------------------------------------------------------------------------------------

not_modified() { curl -s -X POST "$DEVICE/stats"; }
name='pull with ETag: mosquitto_sub sees 21.5 once while the device answers 304'
many_304() { (($(not_modified) >= 5)); }
wait_until many_304 || true
if [[ $(grep -c '^sensors/temp ' "$WORK/sub.out") == 1 ]] &&
    file_has_line "$WORK/sub.out" "sensors/temp 21.5" && (($(not_modified) >= 5)); then
    ok "$name"
else
    not_ok "$name" "304s: $(not_modified); subscriber saw: $(show "$(cat "$WORK/sub.out")")"
fi

name='pull: a changed value is published again and retained'
curl -s -X POST -d 22.0 "$DEVICE/temp" >/dev/null
changed() { file_has_line "$WORK/sub.out" "sensors/temp 22.0"; }
if wait_until changed && get_equals sensors/temp 200 22.0; then
    ok "$name"
else
    not_ok "$name" "subscriber saw: $(show "$(cat "$WORK/sub.out")")"
fi

# --- CoAP ---------------------------------------------------------------------------------------

name='mosquitto_pub to coap/data: a confirmable PUT that coap-client-notls reads back'
mpub -t coap/data -m hello-coap
coap_stored() {
    [[ $(timeout 2 coap-client-notls -B 1 -m get "coap://127.0.0.1:$COAP_DEVICE_PORT/example_data" 2>/dev/null) == hello-coap ]]
}
if wait_until coap_stored; then
    ok "$name"
else
    not_ok "$name" "coap-server has: $(show "$(coap-client-notls -B 1 -m get "coap://127.0.0.1:$COAP_DEVICE_PORT/example_data" 2>&1)")"
fi

name='observing coap-server-notls /time: mosquitto_sub sees a new value per notification'
two_ticks() { (($(grep -c '^sensors/clock ' "$WORK/sub.out") >= 2)); }
if wait_until two_ticks && [[ $(grep '^sensors/clock ' "$WORK/sub.out" | sort -u | wc -l) -ge 2 ]]; then
    ok "$name"
else
    not_ok "$name" "subscriber saw: $(show "$(cat "$WORK/sub.out")")"
fi

# --- request/response across with paho-mqtt ------------------------------------------------

# An MQTT 5 requester: publishes with a Response Topic and Correlation Data to a topic pushed
# to the HTTP device and to one pushed to coap-server-notls, and prints each answer as
# "<correlation> <status> <payload>".
cat >"$WORK/requester.py" <<'PY'
import sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port = int(sys.argv[1])
answers, subscribed = [], threading.Event()

def on_message(client, userdata, msg):
    status = dict(msg.properties.UserProperty).get("status")
    answers.append(f"{msg.properties.CorrelationData.decode()} {status} {msg.payload.decode()}")
    if len(answers) == 2:
        print("\n".join(sorted(answers)), flush=True)
        client.disconnect()

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-requester", protocol=mqtt.MQTTv5)
c.on_message = on_message
c.on_connect = lambda client, *a: client.subscribe("paho/answers", qos=1)
c.on_subscribe = lambda *a: subscribed.set()
c.connect("127.0.0.1", port)
c.loop_start()
subscribed.wait(10)
for topic, correlation, payload in [("plugs/p9/set", "http-call", "on"), ("coap/data", "coap-call", "paho")]:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "paho/answers"
    props.CorrelationData = correlation.encode()
    c.publish(topic, payload, qos=1, properties=props)
threading.Event().wait(10)
PY
name='paho-mqtt (MQTT 5) calls the HTTP device and the CoAP device and gets each answer with its correlation data'
out=$(timeout "$TIMEOUT" python3 -u "$WORK/requester.py" "$MQTT_PORT" 2>&1) || true
expected=$(printf '%s\n%s' 'coap-call 204 ' 'http-call 200 {"relay":"on"}')
if [[ $out == "$expected" ]]; then
    ok "$name"
else
    not_ok "$name" "got: $(show "$out")"
fi

echo "e2e_devices: $PASSED passed, $FAILED failed"
((FAILED == 0))
