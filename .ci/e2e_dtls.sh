#!/usr/bin/env bash
# End-to-end CoAP-over-DTLS checks: starts the topicgate binary with a PSK identity, a second
# identity outside the ACL and an EC P-256 certificate made here with openssl, then drives its
# coaps:// socket with libcoap's coap-client-openssl and coap-client-gnutls: a retained read, a
# publish seen by mosquitto_sub and the HTTP API, an observation notified of an HTTP publish, a
# client certificate whose CN is the principal, a wrong key (no answer) and an identity the ACL
# refuses (4.03). Prints one "ok"/"not ok" line per check and a summary line.
#
#   TOPICGATE_BIN   binary to test (default target/release/topicgate)
#   E2E_TIMEOUT     seconds any single wait may take (default 10)
set -euo pipefail

BIN=${TOPICGATE_BIN:-target/release/topicgate}
TIMEOUT=${E2E_TIMEOUT:-10}
OBSERVE_SECONDS=4
ADMIN_TOKEN=admin-token-0123456789
PSK=kitchen-secret-1

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
prepare "e2e dtls" coap-client-openssl coap-client-gnutls openssl curl mosquitto_pub mosquitto_sub \
    timeout

mapfile -t PORTS < <(free_ports 6)
HTTP_PORT=${PORTS[0]}
MQTT_PORT=${PORTS[1]}
COAP_PORT=${PORTS[2]}
COAPS_PORT=${PORTS[3]}
BASE="http://127.0.0.1:$HTTP_PORT"
COAPS="coaps://127.0.0.1:$COAPS_PORT"

# A throwaway CA, server and client certificates, all EC P-256; the client's CN is sensor-7.
# X.509 v3 (extensions given), as rustls, which loads [tls] for HTTPS too, asks.
cert() {
    local name=$1 cn=$2
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$cn" \
        -keyout "$WORK/$name.key" -out "$WORK/$name.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nsubjectAltName=DNS:%s\n' "$cn" >"$WORK/$name.ext"
    openssl x509 -req -in "$WORK/$name.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
        -CAcreateserial -days 1 -extfile "$WORK/$name.ext" -out "$WORK/$name.crt" 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=e2e CA" \
    -days 1 -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>/dev/null
cert server localhost
cert client sensor-7

cat >"$WORK/topicgate.toml" <<EOF
[auth]
allow_anonymous = false

[[auth.tokens]]
name = "admin"
token = "$ADMIN_TOKEN"

[[auth.psk]]
identity = "sensor-7"
key = "\${E2E_PSK}"

[[auth.psk]]
identity = "intruder"
key = "intruder-secret-1"

[[auth.acl]]
user = "admin"
topic = "#"
access = "readwrite"

[[auth.acl]]
user = "sensor-7"
topic = "sensors/%u/#"
access = "readwrite"

[tls]
cert = "$WORK/server.crt"
key = "$WORK/server.key"
client_ca = "$WORK/ca.crt"
EOF

E2E_PSK=$PSK start_gateway --config "$WORK/topicgate.toml" --http-addr "127.0.0.1:$HTTP_PORT" \
    --mqtt-addr "127.0.0.1:$MQTT_PORT" --coap-addr "127.0.0.1:$COAP_PORT" \
    --coaps-addr "127.0.0.1:$COAPS_PORT" --https-addr "127.0.0.1:${PORTS[4]}" \
    --mqtts-addr "127.0.0.1:${PORTS[5]}" --data-dir "$WORK/data"

# Runs coap-client-$CLIENT with a deadline; its stdout goes to $WORK/coap.out, its stderr
# (where an error response's code and diagnostic go) to $WORK/coap.err.
coaps() {
    CRC=0
    timeout $((TIMEOUT + 5)) "coap-client-$CLIENT" -B "$TIMEOUT" "$@" \
        >"$WORK/coap.out" 2>"$WORK/coap.err" </dev/null || CRC=$?
}

coap_said() {
    echo "exit $CRC, stdout: $(show "$(head -c 2000 "$WORK/coap.out")"), stderr: $(show "$(cat "$WORK/coap.err")")"
}

# The lib's helpers publish as the admin token's principal: anonymous clients are refused.
mpub() {
    timeout "$TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -q 1 -u admin -P "$ADMIN_TOKEN" "$@"
}

admin() {
    curl -s --max-time "$TIMEOUT" -H "Authorization: Bearer $ADMIN_TOKEN" "$@"
}

metric() {
    curl -s --max-time "$TIMEOUT" "$BASE/metrics" |
        awk -v series="$1" '$1 == series { value = $2 } END { print value == "" ? 0 : value }'
}

observers_at_least() {
    awk -v v="$(metric topicgate_coap_observers)" -v min="$1" 'BEGIN { exit !(v >= min) }'
}

admin -X PUT -d 21.5 "$BASE/topics/sensors/sensor-7/temp" >/dev/null

for CLIENT in openssl gnutls; do
    psk=(-u sensor-7 -k "$PSK")

    coaps "${psk[@]}" "$COAPS/topics/sensors/sensor-7/temp"
    if [[ $(cat "$WORK/coap.out") == 21.5 ]]; then
        ok "$CLIENT: a PSK client reads a retained value over coaps://"
    else
        not_ok "$CLIENT: a PSK client reads a retained value over coaps://" "$(coap_said)"
    fi

    topic=sensors/sensor-7/from-$CLIENT
    sub=$WORK/sub-$CLIENT.txt
    start_sub "$sub" "e2e/probe/$CLIENT" -v -u admin -P "$ADMIN_TOKEN" -t "$topic"
    if ! wait_subscribed "$sub" "e2e/probe/$CLIENT"; then
        not_ok "$CLIENT: a PSK client's PUT reaches mosquitto_sub and the HTTP API" \
            "the subscriber never saw its probe message: $(show "$(cat "$sub" "$sub.err")")"
    else
        coaps "${psk[@]}" -m put -e "hello-$CLIENT" "$COAPS/topics/$topic"
        if wait_until file_has_line "$sub" "$topic hello-$CLIENT" &&
            [[ $(admin "$BASE/topics/$topic") == "hello-$CLIENT" ]]; then
            ok "$CLIENT: a PSK client's PUT reaches mosquitto_sub and the HTTP API"
        else
            not_ok "$CLIENT: a PSK client's PUT reaches mosquitto_sub and the HTTP API" \
                "mosquitto_sub: $(show "$(cat "$sub")")" "$(coap_said)"
        fi
    fi

    topic=sensors/sensor-7/observed-$CLIENT
    before=$(metric topicgate_coap_observers)
    timeout $((OBSERVE_SECONDS + TIMEOUT)) "coap-client-$CLIENT" -B "$TIMEOUT" -s "$OBSERVE_SECONDS" \
        "${psk[@]}" "$COAPS/topics/$topic" >"$WORK/observe.out" 2>&1 </dev/null &
    observer=$!
    BG_PIDS+=("$observer")
    if wait_until observers_at_least $((before + 1)); then
        admin -d "seen-by-$CLIENT" "$BASE/topics/$topic" >/dev/null
    fi
    wait "$observer" || true
    if grep -qx "seen-by-$CLIENT" "$WORK/observe.out"; then
        ok "$CLIENT: an observer over coaps:// is notified of an HTTP publish"
    else
        not_ok "$CLIENT: an observer over coaps:// is notified of an HTTP publish" \
            "observer printed: $(show "$(cat "$WORK/observe.out")")"
    fi

    coaps -c "$WORK/client.crt" -j "$WORK/client.key" -C "$WORK/ca.crt" \
        "$COAPS/topics/sensors/sensor-7/temp"
    if [[ $(cat "$WORK/coap.out") == 21.5 ]]; then
        ok "$CLIENT: a client certificate's CN is the principal over coaps://"
    else
        not_ok "$CLIENT: a client certificate's CN is the principal over coaps://" "$(coap_said)"
    fi

    coaps -u sensor-7 -k wrong-secret-1 "$COAPS/topics/sensors/sensor-7/temp"
    # libcoap logs "cannot send CoAP pdu" to stdout: no payload, no response code.
    if ! grep -qx 21.5 "$WORK/coap.out" && ! grep -q '^[245]\.[0-9][0-9]' "$WORK/coap.err"; then
        ok "$CLIENT: a wrong key gets no answer"
    else
        not_ok "$CLIENT: a wrong key gets no answer" "$(coap_said)"
    fi

    coaps -u intruder -k intruder-secret-1 "$COAPS/topics/sensors/sensor-7/temp"
    if grep -q '^4\.03' "$WORK/coap.err" && [[ ! -s $WORK/coap.out ]]; then
        ok "$CLIENT: a PSK identity outside the ACL gets 4.03"
    else
        not_ok "$CLIENT: a PSK identity outside the ACL gets 4.03" "$(coap_said)"
    fi
done

if awk -v v="$(metric topicgate_dtls_hello_verify_requests_total)" 'BEGIN { exit !(v >= 1) }'; then
    ok "every handshake went through the stateless cookie exchange"
else
    not_ok "every handshake went through the stateless cookie exchange" \
        "topicgate_dtls_hello_verify_requests_total: $(metric topicgate_dtls_hello_verify_requests_total)"
fi
if ! grep -q -e "$PSK" -e intruder-secret "$WORK/gateway.log" "$WORK/gateway.out"; then
    ok "no key appears in the gateway's log"
else
    not_ok "no key appears in the gateway's log"
fi

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
