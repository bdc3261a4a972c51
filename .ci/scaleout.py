#!/usr/bin/env python3
"""Scale-out check: two gateways in front of one real Mosquitto.

Starts Mosquitto (persistence on) on a spare loopback port and two topicgate processes in
external-broker mode. Checks that an HTTP publish through gateway A is streamed by SSE from
gateway B, read back as retained from B, and notified to a CoAP observer on B; then stops and
restarts Mosquitto and checks that both gateways refuse publishes while it is away (503, never a
silent 2xx), recover, and that no publish that got a 2xx is lost. Bounded in time.

    scaleout.py TOPICGATE_BINARY [MOSQUITTO_BINARY]
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

DEADLINE = 20.0
PASSED, FAILED = [], []


def check(name, ok, detail=""):
    (PASSED if ok else FAILED).append(name)
    print(f"{'ok' if ok else 'not ok'} - {name}" + (f"\n#   {detail}" if detail and not ok else ""))


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate, deadline=DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


def request(port, method, path, body=None, headers=None):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except OSError as e:
        return None, str(e)


class Mosquitto:
    def __init__(self, binary, work):
        self.binary, self.port = binary, free_port()
        self.conf = os.path.join(work, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                f"persistence true\npersistence_location {work}/\n"
            )
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "-c", self.conf],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        def accepting():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        if not poll(accepting):
            sys.exit("scaleout: mosquitto did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=DEADLINE)


class Gateway:
    def __init__(self, binary, work, name, broker_port):
        self.http, self.coap = free_port(), free_port(socket.SOCK_DGRAM)
        self.proc = subprocess.Popen(
            [
                binary,
                "--broker", f"mqtt://127.0.0.1:{broker_port}",
                "--http-addr", f"127.0.0.1:{self.http}",
                "--coap-addr", f"127.0.0.1:{self.coap}",
                "--data-dir", os.path.join(work, f"data-{name}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(work, f"{name}.log"), "w"),
            env={k: v for k, v in os.environ.items() if not k.startswith("TOPICGATE_")},
        )

    def ready(self):
        return request(self.http, "GET", "/readyz")[0] == 200

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


class SseReader(threading.Thread):
    """Collects `message` events of one stream."""

    def __init__(self, port, path):
        super().__init__(daemon=True)
        self.port, self.path, self.events, self.opened = port, path, [], threading.Event()

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("GET", self.path, headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        self.opened.set()
        event = {}
        while True:
            line = resp.fp.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if not line:
                if event.get("event") == "message":
                    self.events.append(json.loads(event["data"]))
                event = {}
            elif line.startswith("event:"):
                event["event"] = line[6:].strip()
            elif line.startswith("data:"):
                event["data"] = line[5:].strip()

    def payloads(self, topic_prefix):
        return [e["payload"] for e in list(self.events) if e["topic"].startswith(topic_prefix)]


def coap_payload(data):
    """The payload of a CoAP message, walking its options (RFC 7252 section 3.1)."""
    i = 4 + (data[0] & 0x0F)
    while i < len(data):
        head = data[i]
        if head == 0xFF:
            return data[i + 1:]
        i += 1
        for nibble in (head >> 4, head & 0x0F):
            if nibble == 13:
                value, i = data[i] + 13, i + 1
            elif nibble == 14:
                value, i = int.from_bytes(data[i:i + 2], "big") + 269, i + 2
            else:
                value = nibble
        i += value  # the last nibble read is the option length
    return b""


class CoapObserver(threading.Thread):
    """Registers an observation with a hand-built CoAP GET and collects notification payloads."""

    def __init__(self, port, path):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.2)
        self.port, self.payloads, self.registered = port, [], threading.Event()
        options = b"\x60"  # Observe (6), length 0: register
        prev = 6
        for segment in path.split("/"):
            data = segment.encode()
            options += bytes([((11 - prev) << 4) | len(data)]) + data
            prev = 11
        self.request = bytes([0x41, 0x01, 0x12, 0x34, 0x7B]) + options  # CON GET, token 0x7B
        self.stop = threading.Event()

    def run(self):
        self.sock.sendto(self.request, ("127.0.0.1", self.port))
        while not self.stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                if not self.registered.is_set():
                    self.sock.sendto(self.request, ("127.0.0.1", self.port))
                continue
            kind, mid = (data[0] >> 4) & 3, data[2:4]
            if kind == 0:  # a confirmable notification: acknowledge it
                self.sock.sendto(bytes([0x60, 0x00]) + mid, ("127.0.0.1", self.port))
            if data[1] != 0x45:
                continue
            payload = coap_payload(data).decode(errors="replace")
            if not self.registered.is_set():
                self.registered.set()
            else:
                self.payloads.append(payload)


def main():
    binary = sys.argv[1]
    mosquitto_bin = sys.argv[2] if len(sys.argv) > 2 else shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    work = tempfile.mkdtemp(prefix="topicgate-scaleout-")
    broker = Mosquitto(mosquitto_bin, work)
    broker.start()
    a = Gateway(binary, work, "a", broker.port)
    b = Gateway(binary, work, "b", broker.port)
    try:
        check("both gateways become ready in front of Mosquitto", poll(a.ready) and poll(b.ready))
        stream = SseReader(b.http, "/topics/scale/%23")
        stream.start()
        stream.opened.wait(DEADLINE)
        observer = CoapObserver(b.coap, "topics/scale/obs")
        observer.start()
        check("a CoAP observer registers on B", observer.registered.wait(DEADLINE))

        acked = {}
        for i in range(50):
            status, body = request(a.http, "PUT", f"/topics/scale/t{i}?qos=1", body=f"v{i}")
            if status == 204:
                acked[f"scale/t{i}"] = f"v{i}"
        check("50 retained QoS 1 publishes through A get 204", len(acked) == 50, f"{len(acked)} acknowledged")
        got = poll(lambda: len(stream.payloads("scale/t")) >= len(acked))
        check("B streams every publish made through A", got, f"{len(stream.payloads('scale/t'))} streamed")
        missing = [t for t, v in acked.items() if request(b.http, "GET", f"/topics/{t}") != (200, v)]
        check("B reads every value retained through A", not missing, f"missing {missing[:5]}")
        request(a.http, "POST", "/topics/scale/obs?qos=1", body="21.5")
        check("the CoAP observer on B is notified of a publish through A",
              poll(lambda: "21.5" in observer.payloads), f"{observer.payloads}")

        broker.stop()
        check("A reports not ready while Mosquitto is down", poll(lambda: not a.ready()))
        check("B reports not ready while Mosquitto is down", poll(lambda: not b.ready()))
        status, body = request(a.http, "PUT", "/topics/scale/down?qos=1", body="x")
        check("a publish while Mosquitto is down gets 503, not a silent 2xx", status == 503, f"{status} {body}")

        broker.start()
        check("both gateways recover when Mosquitto is back", poll(a.ready) and poll(b.ready))
        for i in range(50, 80):
            status, _ = request(a.http, "PUT", f"/topics/scale/t{i}?qos=1", body=f"v{i}")
            if status == 204:
                acked[f"scale/t{i}"] = f"v{i}"
        status, _ = request(b.http, "PUT", "/topics/scale/from-b?qos=1", body="b")
        if status == 204:
            acked["scale/from-b"] = "b"
        check("publishes after the restart get 204", len(acked) == 81, f"{len(acked)} acknowledged")
        check("B's stream goes on after the restart",
              poll(lambda: len(stream.payloads("scale/t")) >= 80), f"{len(stream.payloads('scale/t'))}")
        lost = []
        for gw in (a, b):
            for topic, value in acked.items():
                if topic == "scale/from-b" and gw is b or topic != "scale/from-b" and gw is a:
                    continue  # a gateway's own publishes are checked on the other one
                if poll(lambda: request(gw.http, "GET", f"/topics/{topic}") == (200, value), 2.0) is None:
                    lost.append((gw.http, topic))
        check("no publish that got a 2xx is lost", not lost, f"{lost[:5]}")
        print(f"scaleout: {len(acked)} acknowledged publishes checked across 2 gateways and a Mosquitto restart")
        observer.stop.set()
        check("gateway A exits 0 on SIGTERM", a.stop() == 0)
        check("gateway B exits 0 on SIGTERM", b.stop() == 0)
    finally:
        for p in (a.proc, b.proc, broker.proc):
            if p.poll() is None:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"scaleout: {len(PASSED)} passed, {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
