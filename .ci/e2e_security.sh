#!/usr/bin/env bash
# End-to-end checks of the worked example in docs/security.md, with the clients people use:
# `topicgate passwd`, curl, mosquitto_pub/mosquitto_sub (3.1.1 and 5) and coap-client-notls;
# HTTPS and MQTT over TLS with certificates made by openssl (curl --cacert, mosquitto_sub
# --cafile, client certificates). Also checks the default posture: no auth config and a listener on 0.0.0.0 log a warning.
#
#   TOPICGATE_BIN   binary to test (default target/release/topicgate)
#   E2E_TIMEOUT     seconds any single wait may take (default 10)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-10}
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
prepare "e2e security" curl mosquitto_pub mosquitto_sub coap-client-notls python3 timeout openssl

mapfile -t PORTS < <(free_ports 5)
HTTP_PORT=${PORTS[0]}
MQTT_PORT=${PORTS[1]}
COAP_PORT=${PORTS[2]}
HTTPS_PORT=${PORTS[3]}
MQTTS_PORT=${PORTS[4]}
BASE="http://127.0.0.1:$HTTP_PORT"
COAP="coap://127.0.0.1:$COAP_PORT"

check() { # name, expected, actual
    if [[ $2 == "$3" ]]; then ok "$1"; else not_ok "$1" "expected $(show "$2")" "got $(show "$3")"; fi
}

check_has() { # name, actual, then the texts of which it must contain one
    local name=$1 actual=$2 text
    shift 2
    for text in "$@"; do
        [[ $actual == *"$text"* ]] && { ok "$name"; return; }
    done
    not_ok "$name" "got $(show "$actual")"
}

# --- the worked example, as written in docs/security.md -------------------------------------
KITCHEN_HASH=$(printf 'kitchen-secret\n' | "$BIN" passwd)
DASH_HASH=$(printf 'dash-secret\n' | "$BIN" passwd)
cat >"$WORK/topicgate.toml" <<TOML
data_dir = "$WORK/data"

[mqtt]
addr = "127.0.0.1:$MQTT_PORT"
[http]
addr = "127.0.0.1:$HTTP_PORT"
[coap]
addr = "127.0.0.1:$COAP_PORT"

[auth]
[[auth.users]]
name = "kitchen"
password_hash = "$KITCHEN_HASH"
[[auth.users]]
name = "dashboard"
password_hash = "$DASH_HASH"
[[auth.tokens]]
name = "thermostat"
token = "thermostat-7f3c9a1e5b"

[[auth.acl]]
user = "*"
topic = "devices/%u/#"
access = "readwrite"
[[auth.acl]]
user = "kitchen"
topic = "home/kitchen/#"
access = "readwrite"
[[auth.acl]]
user = "dashboard"
topic = "home/#"
access = "read"
[[auth.acl]]
user = "thermostat"
topic = "home/+/temp"
access = "write"
[[auth.acl]]
user = "anonymous"
topic = "public/#"
access = "read"
TOML

start_gateway --config "$WORK/topicgate.toml"

status() { curl -s -o "$WORK/body" -w '%{http_code}' "$@"; }

check "kitchen publishes over HTTP Basic" 204 \
    "$(status -u kitchen:kitchen-secret -d 21.5 "$BASE/topics/home/kitchen/temp?retain=true")"
check "dashboard reads it" 200 "$(status -u dashboard:dash-secret "$BASE/topics/home/kitchen/temp")"
check "the value read" 21.5 "$(cat "$WORK/body")"
check "dashboard may not publish: 403" 403 \
    "$(status -u dashboard:dash-secret -d x "$BASE/topics/home/kitchen/temp")"
check "no credentials: 401" 401 "$(status "$BASE/topics/home/kitchen/temp")"
check "wrong password: 401" 401 "$(status -u kitchen:nope "$BASE/topics/home/kitchen/temp")"
check "the thermostat's bearer token publishes" 204 \
    "$(status -H 'Authorization: Bearer thermostat-7f3c9a1e5b' -d 19 "$BASE/topics/home/hall/temp")"
check "%u: kitchen owns devices/kitchen" 204 \
    "$(status -u kitchen:kitchen-secret -d on "$BASE/topics/devices/kitchen/led")"
check "%u: not devices/dashboard" 403 \
    "$(status -u kitchen:kitchen-secret -d on "$BASE/topics/devices/dashboard/led")"

# MQTT: mosquitto_sub as the dashboard gets the retained value; anonymous is refused.
out=$(timeout "$TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -u dashboard -P dash-secret \
    -t 'home/#' -C 1 -v 2>&1 || true)
check "mosquitto_sub as dashboard" "home/kitchen/temp 21.5" "$out"
out=$(timeout "$TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t 'home/#' -C 1 2>&1 || true)
check_has "mosquitto_sub anonymous on home/#: refused" "$out" "not authorised" "Not authorized"
out=$(timeout "$TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -u nobody -P x -t public/x -m 1 2>&1 || true)
check_has "mosquitto_pub with a wrong password: refused" "$out" "ad user" "ad username"
out=$(timeout "$TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -V mqttv5 -q 1 -u dashboard \
    -P dash-secret -t home/kitchen/temp -m 99 2>&1 || true)
check_has "mosquitto_pub v5 without write access: not authorized" "$out" "ot authori"
check "the refused publish changed nothing" 21.5 \
    "$(curl -s -u dashboard:dash-secret "$BASE/topics/home/kitchen/temp")"

# CoAP: ?auth=<token>.
out=$(timeout "$TIMEOUT" coap-client-notls -m put -e 18 "$COAP/topics/home/attic/temp?auth=thermostat-7f3c9a1e5b" 2>&1 || true)
check "coap-client PUT with ?auth=: no error" "" "$out"
check "the CoAP value, read over HTTP" 18 "$(curl -s -u dashboard:dash-secret "$BASE/topics/home/attic/temp")"
out=$(timeout "$TIMEOUT" coap-client-notls "$COAP/topics/home/attic/temp" 2>&1 || true)
check_has "coap-client without a token: 4.01" "$out" "4.01"
out=$(timeout "$TIMEOUT" coap-client-notls -m put -e 1 "$COAP/topics/home/kitchen/light?auth=thermostat-7f3c9a1e5b" 2>&1 || true)
check_has "coap-client: a PUT outside the token's ACL gets 4.03" "$out" "4.03"

kill "$GW_PID"
wait "$GW_PID" || true
GW_PID=

# --- TLS: HTTPS and MQTT over TLS, a client certificate as the user ----------------------------
PKI=$WORK/pki
mkdir -p "$PKI"
(
    cd "$PKI"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=e2e CA" -keyout ca.key -out ca.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout server.key -out server.csr
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile server.ext -out server.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=sensor-7" \
        -keyout client.key -out client.csr
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile client.ext -out client.pem
) >"$WORK/openssl.log" 2>&1 || { cat "$WORK/openssl.log"; exit 1; }
cat >"$WORK/tls.toml" <<TOML
data_dir = "$WORK/tls-data"
[mqtt]
addr = "127.0.0.1:$MQTT_PORT"
tls_addr = "127.0.0.1:$MQTTS_PORT"
[http]
addr = "127.0.0.1:$HTTP_PORT"
tls_addr = "127.0.0.1:$HTTPS_PORT"
[coap]
addr = "127.0.0.1:$COAP_PORT"
[tls]
cert = "$PKI/server.pem"
key = "$PKI/server.key"
client_ca = "$PKI/ca.pem"
[auth]
allow_anonymous = false
[[auth.acl]]
user = "*"
topic = "sensors/%u/#"
access = "readwrite"
TOML
HTTPS="https://localhost:$HTTPS_PORT"
gateway_ready() { curl -fsS --max-time 1 --cacert "$PKI/ca.pem" -o /dev/null "$HTTPS/readyz"; }
start_gateway --config "$WORK/tls.toml"
ok "curl --cacert: HTTPS answers"
check "curl without the CA refuses the server certificate" 000 \
    "$(curl -s -o /dev/null -w '%{http_code}' "$HTTPS/healthz" || true)"
check "HTTPS without credentials: 401" 401 \
    "$(status --cacert "$PKI/ca.pem" -d 1 "$HTTPS/topics/sensors/sensor-7/t")"
CERT=(--cert "$PKI/client.pem" --key "$PKI/client.key")
timeout "$TIMEOUT" mosquitto_sub -h localhost -p "$MQTTS_PORT" --cafile "$PKI/ca.pem" \
    "${CERT[@]}" -t 'sensors/sensor-7/#' -C 1 -v >"$WORK/tls-sub.out" 2>&1 &
SUB_PID=$!
# The subscriber is in once its retained value arrives.
check "a client certificate (CN sensor-7) publishes over HTTPS" 204 \
    "$(status --cacert "$PKI/ca.pem" "${CERT[@]}" -X PUT -d seed "$HTTPS/topics/sensors/sensor-7/seed")"
wait "$SUB_PID" || true
check "mosquitto_sub --cafile --cert over MQTT/TLS receives it" "sensors/sensor-7/seed seed" \
    "$(cat "$WORK/tls-sub.out")"
out=$(timeout "$TIMEOUT" mosquitto_pub -h localhost -p "$MQTTS_PORT" --cafile "$PKI/ca.pem" \
    -t sensors/sensor-7/x -m 1 -V mqttv5 2>&1 || true)
check_has "mosquitto_pub --cafile without a certificate: not authorized" "$out" \
    "authori" "Not authorized"
timeout "$TIMEOUT" mosquitto_pub -h localhost -p "$MQTTS_PORT" --cafile "$PKI/ca.pem" \
    "${CERT[@]}" -t sensors/sensor-7/temp -m 22.5 -r
check "mosquitto_pub --cert over MQTT/TLS, read back over HTTPS" 22.5 \
    "$(curl -s --cacert "$PKI/ca.pem" "${CERT[@]}" "$HTTPS/topics/sensors/sensor-7/temp")"
check "outside the certificate's ACL: 403" 403 \
    "$(status --cacert "$PKI/ca.pem" "${CERT[@]}" -d 1 "$HTTPS/topics/sensors/other/t")"
kill "$GW_PID"
wait "$GW_PID" || true
GW_PID=

# --- the default posture ----------------------------------------------------------------------
"$BIN" --http-addr "0.0.0.0:$HTTP_PORT" --mqtt-addr "127.0.0.1:$MQTT_PORT" \
    --coap-addr "127.0.0.1:$COAP_PORT" --data-dir "$WORK/open" 2>"$WORK/open.log" &
GW_PID=$!
if wait_until grep -q "anonymous clients may publish" "$WORK/open.log"; then
    warned=$(grep -c "anonymous clients may publish" "$WORK/open.log")
    check "no auth config: one warning, for the listener on 0.0.0.0" 1 "$warned"
else
    not_ok "no auth config: a warning for the listener on 0.0.0.0" "$(cat "$WORK/open.log")"
fi
check "and anonymous access works" 204 "$(status -d 1 "$BASE/topics/open/x")"

echo "# security: $PASSED passed, $FAILED failed"
((FAILED == 0))
