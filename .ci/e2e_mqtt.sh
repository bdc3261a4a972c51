#!/usr/bin/env bash
# End-to-end checks of the MQTT side with the clients people use: mosquitto_sub on $SYS/# (what
# MQTT Explorer subscribes to), a bulk mosquitto_pub -l, MQTT 3.1 and 5 clients, and MQTT over
# WebSocket with MQTT.js (npm mqtt) and Python paho-mqtt, each exchanging messages with a TCP
# client. Prints one "ok"/"not ok" line per check and a summary line.
#
#   TOPICGATE_BIN   binary to test (default target/release/topicgate)
#   E2E_TIMEOUT     seconds any single wait may take (default 15)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-15}
CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# shellcheck source=lib.sh
source "$CI_DIR/lib.sh"
prepare "e2e_mqtt" curl mosquitto_pub mosquitto_sub python3 node timeout

mapfile -t PORTS < <(free_ports 3)
HTTP_PORT=${PORTS[0]}
MQTT_PORT=${PORTS[1]}
COAP_PORT=${PORTS[2]}
BASE="http://127.0.0.1:$HTTP_PORT"

cat >"$WORK/gateway.toml" <<'EOF'
[mqtt]
sys_interval = "1s"
EOF
start_gateway --config "$WORK/gateway.toml" --http-addr "127.0.0.1:$HTTP_PORT" \
    --mqtt-addr "127.0.0.1:$MQTT_PORT" --coap-addr "127.0.0.1:$COAP_PORT" --data-dir "$WORK/data"

# --- $SYS ------------------------------------------------------------------------------------

name='mosquitto_sub -t "$SYS/#" gets its SUBACK and the broker statistics'
SYS_OUT=$WORK/sys.txt
# The retained figures first (about 45), then the next round, in which this client is counted.
if timeout "$TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -v -t '$SYS/#' \
    -C 100 >"$SYS_OUT" 2>"$SYS_OUT.err" &&
    grep -q '^\$SYS/broker/version topicgate ' "$SYS_OUT" &&
    grep -q '^\$SYS/broker/clients/connected [1-9]' "$SYS_OUT" &&
    grep -q '^\$SYS/broker/uptime [0-9]* seconds' "$SYS_OUT"; then
    ok "$name"
else
    not_ok "$name" "got: $(show "$(head -c 600 "$SYS_OUT" "$SYS_OUT.err")")"
fi

name='$SYS is read over HTTP and refused for writing'
http "$BASE/topics/%24SYS/broker/uptime"
read_status=$STATUS
read_body=$(body)
http -d x "$BASE/topics/%24SYS/broker/uptime"
if [[ $read_status == 200 && $read_body == *seconds && $STATUS == 400 ]]; then
    ok "$name"
else
    not_ok "$name" "GET: $read_status $(show "$read_body"), POST: $STATUS $(show "$(body)")"
fi

# --- a bulk publish ----------------------------------------------------------------------------

name="mosquitto_pub -l of 200,000 lines of 100 B at QoS 0 reaches mosquitto_sub whole and in order"
BULK_OUT=$WORK/bulk.txt
BULK_IN=$WORK/bulk-in.txt
# Each line is its number in 8 digits and 92 x: 100 bytes, and a gap can be located.
python3 -c 'import sys; sys.stdout.write("".join("%08d%s\n" % (i, "x" * 92) for i in range(1, 200001)))' >"$BULK_IN"
mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t bulk/x -W 120 >"$BULK_OUT" 2>&1 &
BG_PIDS+=($!)
# The subscriber is live once a probe on its topic arrives.
probe_arrived() {
    mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -t bulk/x -m probe
    grep -q '^probe$' "$BULK_OUT"
}
wait_until probe_arrived
# The check is that nothing is lost, not how fast: a busy machine gets a generous limit.
timeout 180 mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -t bulk/x -l <"$BULK_IN"
last_arrived() { tail -n 1 "$BULK_OUT" | grep -q '^00200000x'; }
if wait_until last_arrived &&
    python3 - "$BULK_OUT" "$BULK_IN" <<'PY'; then
import sys
got = [l for l in open(sys.argv[1]).read().split("\n") if l[:8].isdigit()]
sent = open(sys.argv[2]).read().split("\n")[:-1]
sys.exit(0 if got == sent else 1)
PY
    ok "$name"
else
    not_ok "$name" "got $(grep -c '^[0-9]\{8\}x' "$BULK_OUT" || true) numbered lines of 200000" \
        "tail: $(show "$(tail -c 300 "$BULK_OUT")")"
fi

# --- versions ----------------------------------------------------------------------------------

name="MQTT 3.1, 3.1.1 and 5 clients share topics"
V5_OUT=$WORK/v5.txt
start_sub "$V5_OUT" e2e/probe/v5 -V mqttv5 -v -t 'ver/#'
if wait_subscribed "$V5_OUT" e2e/probe/v5 &&
    mpub -V mqttv31 -t ver/31 -m a && mpub -V mqttv311 -t ver/311 -m b &&
    wait_until file_has_line "$V5_OUT" "ver/31 a" &&
    wait_until file_has_line "$V5_OUT" "ver/311 b"; then
    ok "$name"
else
    not_ok "$name" "got: $(show "$(cat "$V5_OUT" "$V5_OUT.err")")"
fi

# --- MQTT over WebSocket -------------------------------------------------------------------------

WS_URL="ws://127.0.0.1:$HTTP_PORT/mqtt"

name="MQTT.js over WebSocket exchanges messages with TCP clients"
if (cd "$CI_DIR/mqttjs" && timeout "$TIMEOUT" node ws_exchange.mjs "$WS_URL" js "$MQTT_PORT") \
    >"$WORK/mqttjs.txt" 2>&1 &&
    [[ $(timeout "$TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t js/from-ws -C 1 \
        -W "$TIMEOUT") == "from ws" ]]; then
    ok "$name"
else
    not_ok "$name" "got: $(show "$(cat "$WORK/mqttjs.txt")")"
fi

name="Python paho-mqtt over WebSocket exchanges messages with TCP clients"
if timeout "$TIMEOUT" python3 - "$HTTP_PORT" "$MQTT_PORT" >"$WORK/paho.txt" 2>&1 <<'PY'; then
import subprocess, sys, threading
import paho.mqtt.client as mqtt

http_port, mqtt_port = int(sys.argv[1]), sys.argv[2]
got, subscribed = threading.Event(), threading.Event()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-ws-e2e",
                     transport="websockets")
client.ws_set_options(path="/mqtt")
client.on_subscribe = lambda *a: subscribed.set()
client.on_message = lambda c, u, m: m.payload == b"from tcp" and got.set()
client.connect("127.0.0.1", http_port)
client.loop_start()
client.subscribe("paho/to-ws", qos=1)
assert subscribed.wait(10), "no SUBACK"
info = client.publish("paho/from-ws", b"from ws", qos=1, retain=True)
info.wait_for_publish(10)
subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", mqtt_port, "-q", "1",
                "-t", "paho/to-ws", "-m", "from tcp"], check=True)
assert got.wait(10), "the TCP client's message did not arrive"
client.disconnect()
client.loop_stop()
print("paho: ok")
PY
    if [[ $(timeout "$TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t paho/from-ws -C 1 \
        -W "$TIMEOUT") == "from ws" ]]; then
        ok "$name"
    else
        not_ok "$name" "the TCP subscriber did not get the retained message from WebSocket"
    fi
else
    not_ok "$name" "got: $(show "$(cat "$WORK/paho.txt")")"
fi

echo "e2e_mqtt: $PASSED passed, $FAILED failed"
((FAILED == 0))
