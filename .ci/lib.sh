# Shared by the end-to-end scripts (sourced, not run): a work dir and cleanup of background
# processes, ok/not ok reporting, polling with a deadline, free loopback ports, and small MQTT
# and HTTP helpers. The sourcing script sets TIMEOUT, and MQTT_PORT / BASE before using the
# MQTT and HTTP helpers.

WORK=$(mktemp -d)
GW_PID=
BG_PIDS=()

cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}" $GW_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${BG_PIDS[@]}" $GW_PID; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- reporting ------------------------------------------------------------------------------

PASSED=0
FAILED=0

ok() {
    PASSED=$((PASSED + 1))
    echo "ok - $1"
}

not_ok() {
    FAILED=$((FAILED + 1))
    echo "not ok - $1"
    shift
    local line
    for line in "$@"; do
        echo "#   $line"
    done
}

# Prints a value on one line, escaping newlines and control characters.
show() {
    printf '%q' "$1"
}

# --- helpers --------------------------------------------------------------------------------

# Checks the tools a script needs and the binary under test (BIN), makes BIN an absolute path,
# and keeps the caller's TOPICGATE_* variables away from the gateway. $1 names the script in
# messages; the rest are the tools.
prepare() {
    local name=$1 tool
    SCRIPT=$name
    shift
    unset TOPICGATE_CONFIG TOPICGATE_MQTT_ADDR TOPICGATE_HTTP_ADDR TOPICGATE_COAP_ADDR \
        TOPICGATE_MQTTS_ADDR TOPICGATE_HTTPS_ADDR TOPICGATE_COAPS_ADDR \
        TOPICGATE_DATA_DIR TOPICGATE_LOG_FORMAT
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$name: missing tool: $tool" >&2; exit 1; }
    done
    [[ -x $BIN ]] || { echo "$name: no executable at $BIN (set TOPICGATE_BIN)" >&2; exit 1; }
    BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
}

# Whether the gateway at $BASE answers /readyz with 200.
http_ready() {
    [[ $(curl -s --max-time 1 -o /dev/null -w '%{http_code}' "$BASE/readyz") == 200 ]]
}

# What start_gateway waits for; a script waiting for more defines its own.
gateway_ready() { http_ready; }

# Ready, or gone: either way the wait is over.
ready_or_exited() {
    ! kill -0 "$GW_PID" 2>/dev/null || gateway_ready
}

# Starts the gateway with the given arguments (log in $WORK/gateway.log, output in
# $WORK/gateway.out, process id in GW_PID) and waits until gateway_ready; if it is not ready in
# time or exits first, says which, prints its log and exits 1.
start_gateway() {
    "$BIN" "$@" >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
    GW_PID=$!
    if ! wait_until ready_or_exited || ! kill -0 "$GW_PID" 2>/dev/null; then
        if kill -0 "$GW_PID" 2>/dev/null; then
            echo "$SCRIPT: the gateway did not become ready within ${TIMEOUT}s; its log:" >&2
        else
            echo "$SCRIPT: the gateway exited before it was ready; its log:" >&2
        fi
        cat "$WORK/gateway.log" >&2
        exit 1
    fi
}

# Polls a command every 0.1 s until it succeeds; fails after $TIMEOUT seconds.
wait_until() {
    local deadline=$((SECONDS + TIMEOUT))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# Free TCP ports on the loopback interface, one per line; each is free for UDP as well.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks, found = [], 0
while found < int(sys.argv[1]):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", s.getsockname()[1]))
    except OSError:
        continue
    socks += [s, u]
    found += 1
    print(s.getsockname()[1])
PY
}

mpub() {
    timeout "$TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -q 1 "$@"
}

# Starts mosquitto_sub in the background writing to a file; extra arguments go to mosquitto_sub.
# The subscriber also listens on a probe topic so that wait_subscribed can tell when it is live.
start_sub() {
    local out=$1 probe=$2
    shift 2
    mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -W 300 -t "$probe" "$@" >"$out" 2>"$out.err" &
    BG_PIDS+=($!)
}

# Publishes on the probe topic until the subscriber's file shows it.
wait_subscribed() {
    local out=$1 probe=$2
    probe_seen() {
        mpub -t "$probe" -m probe >/dev/null 2>&1 || true
        local i
        for i in 1 2 3; do
            grep -q "^$probe " "$out" && return 0
            sleep 0.1
        done
        return 1
    }
    wait_until probe_seen
}

file_has_line() {
    grep -qxF -- "$2" "$1"
}

# HTTP status and body of a request: sets STATUS and writes the body to $WORK/body.
http() {
    rm -f "$WORK/body"
    STATUS=$(curl -sS --max-time "$TIMEOUT" -o "$WORK/body" -w '%{http_code}' "$@" 2>"$WORK/curl.err") || true
}

body() {
    cat "$WORK/body" 2>/dev/null || true
}

get_equals() {
    http "$BASE/topics/$1"
    [[ $STATUS == "$2" && $(body) == "$3" ]]
}

get_status() {
    http "$BASE/topics/$1"
    [[ $STATUS == "$2" ]]
}

