#!/usr/bin/env python3
"""Device rules on two gateways in front of one real Mosquitto (MQTT 5 shared subscriptions).

Starts Mosquitto on a spare loopback port, a python3 HTTP device in this process, and two
topicgate processes in external-broker mode with the same push rule and pull rule (the pull
rule sends an `x-gateway` header naming its gateway). Checks that messages published over MQTT
and over HTTP through either gateway are pushed once in total, shared by both gateways; that
the device is read by one gateway at a time; that the other takes over when the holder stops
(SIGTERM) and again when the next holder is killed (kill -9, through its will). Bounded in time.

    scaleout_devices.py TOPICGATE_BINARY [MOSQUITTO_BINARY]
"""

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from scaleout import Mosquitto, check, free_port, poll, request, FAILED, PASSED

KEEP_ALIVE = 5  # seconds: a killed holder's will goes after 1.5 x this


class Device(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    pushed, reads, lock, value = [], [], threading.Lock(), [0]

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
        with self.lock:
            self.pushed.append((self.path, body))
        self.send_response(204)
        self.end_headers()

    def do_GET(self):
        with self.lock:
            self.reads.append(self.headers.get("x-gateway", "?"))
            self.value[0] += 1
            body = str(self.value[0]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def reads():
    with Device.lock:
        return list(Device.reads)


def pushed():
    with Device.lock:
        return list(Device.pushed)


class Gateway:
    def __init__(self, binary, work, name, broker_port, config):
        self.name, self.http, self.coap = name, free_port(), free_port(socket.SOCK_DGRAM)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOPICGATE_")}
        env["GATEWAY_NAME"] = name
        self.proc = subprocess.Popen(
            [binary, "--config", config, "--broker", f"mqtt://127.0.0.1:{broker_port}",
             "--http-addr", f"127.0.0.1:{self.http}", "--coap-addr", f"127.0.0.1:{self.coap}",
             "--data-dir", os.path.join(work, f"data-{name}")],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{name}.log"), "w"), env=env,
        )

    def ready(self):
        return request(self.http, "GET", "/readyz")[0] == 200

    def metric(self, sample):
        status, text = request(self.http, "GET", "/metrics")
        for line in text.splitlines() if status == 200 else []:
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0


def one_reader(since, at_least):
    """The only gateway among the reads after index `since`, once there are `at_least`."""
    after = reads()[since:]
    if len(after) < at_least:
        return None
    return after[0] if len(set(after)) == 1 else ",".join(sorted(set(after)))


def main():
    binary = sys.argv[1]
    mosquitto_bin = sys.argv[2] if len(sys.argv) > 2 else shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    work = tempfile.mkdtemp(prefix="topicgate-scaleout-devices-")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Device)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    device = f"http://127.0.0.1:{server.server_address[1]}"
    config = os.path.join(work, "topicgate.toml")
    with open(config, "w") as f:
        f.write(f"""
[broker]
keep_alive = "{KEEP_ALIVE}s"

[[push]]
name = "relay"
filter = "relay/+"
url = "{device}/relay/{{2}}"
backoff = "50ms"
max_backoff = "200ms"

[[pull]]
name = "temp"
url = "{device}/temp"
interval = "100ms"
topic = "sensors/temp"
headers = {{ x-gateway = "${{GATEWAY_NAME}}" }}
""")
    broker = Mosquitto(mosquitto_bin, work)
    broker.start()
    gateways = {n: Gateway(binary, work, n, broker.port, config) for n in ("a", "b", "c")}
    a, b = gateways["a"], gateways["b"]
    try:
        check("three gateways become ready in front of Mosquitto",
              all(poll(g.ready) for g in gateways.values()))
        # Warm up until every gateway has pushed: each has joined the shared group.
        expected, n = [], 0
        def all_joined():
            nonlocal n
            n += 1
            request(a.http, "POST", "/topics/relay/w?qos=1", body=f"w{n}")
            expected.append(("/relay/w", f"w{n}"))
            time.sleep(0.02)
            return all(g.metric('topicgate_push_sent_total{rule="relay"}') > 0 for g in gateways.values())
        check("every gateway takes part in the push rule's shared subscription", poll(all_joined))
        acked = 0
        for i in range(60):
            gw = list(gateways.values())[i % 3]
            status, _ = request(gw.http, "POST", f"/topics/relay/{gw.name}?qos=1", body=f"m{i}")
            if status == 204:
                acked += 1
                expected.append((f"/relay/{gw.name}", f"m{i}"))
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-V", "mqttv5", "-q", "1",
                        "-t", "relay/mqtt", "-m", "from-mqtt"], check=False, timeout=10)
        expected.append(("/relay/mqtt", "from-mqtt"))
        check("60 publishes over HTTP through the three gateways get 204", acked == 60, f"{acked}")

        def settled():
            if len(pushed()) < len(expected):
                return False
            return all(g.metric('topicgate_push_queued{rule="relay"}') == 0 for g in gateways.values())
        # Once every outbox is empty, whatever any gateway was going to push has been pushed.
        poll(settled)
        got = pushed()
        sent = {g.name: g.metric('topicgate_push_sent_total{rule="relay"}') for g in gateways.values()}
        check("each message is pushed once in total", sorted(got) == sorted(expected),
              f"{len(got)} pushed for {len(expected)} messages, by gateway {sent}")
        print(f"scaleout_devices: {len(expected)} messages pushed once, by gateway {sent}")

        holder = poll(lambda: one_reader(0, 20) if len(reads()) >= 20 else None)
        check("one gateway at a time reads the device", holder in gateways, f"readers {holder}")
        if holder not in gateways:
            return
        gateways.pop(holder).proc.send_signal(signal.SIGTERM)
        mark, stopped = len(reads()), time.monotonic()
        second = poll(lambda: one_reader(mark, 10))
        check(f"after {holder} stops, one other gateway takes over", second in gateways,
              f"readers {second}")
        print(f"scaleout_devices: {holder} stopped, {second} reads after {time.monotonic() - stopped:.1f} s")
        if second not in gateways:
            return
        gateways.pop(second).proc.kill()
        mark, killed = len(reads()), time.monotonic()
        third = poll(lambda: one_reader(mark, 10), deadline=6 * KEEP_ALIVE)
        check(f"after {second} is killed, the last gateway takes over through the will",
              third in gateways, f"readers {third}")
        print(f"scaleout_devices: {second} killed, {third} reads after {time.monotonic() - killed:.1f} s")
    finally:
        for p in [g.proc for g in gateways.values()] + [broker.proc]:
            if p.poll() is None:
                p.kill()
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"scaleout_devices: {len(PASSED)} passed, {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
