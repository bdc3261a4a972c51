#!/usr/bin/env python3
"""Outage check: a push rule's HTTP device is down for 30 s under load, then back.

Starts topicgate (embedded broker) with one push rule for `load/+` to a python3 HTTP device
run as a process of its own. A paho-mqtt client publishes at a steady rate (500 msg/s by
default) over 8 topics at QoS 1; after 3 s the device is killed, 30 s later started again on
the same port, and publishing goes on for 4 s more. Then every message the broker acknowledged
must reach the device, in order per topic (the first arrival of each message in publishing
order); duplicates are allowed (at least once) and counted. Bounded in time (about 50 s).

    outage.py TOPICGATE_BINARY [--rate N] [--down SECONDS]
"""

import argparse
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

from scaleout import FAILED, PASSED, check, free_port, poll

TOPICS = 8

DEVICE = r'''
import http.server, sys

log = open(sys.argv[2], "a", buffering=1)

class Device(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        # Written before the answer: a message counts as arrived once the device has it.
        log.write(self.path.rsplit("/", 1)[-1] + " " + body.decode() + "\n")
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Device).serve_forever()
'''


def http_get(port, path):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except OSError as e:
        return None, str(e)


def metric(port, sample):
    status, text = http_get(port, "/metrics")
    for line in text.splitlines() if status == 200 else []:
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


class Device:
    def __init__(self, work):
        self.port, self.log = free_port(), os.path.join(work, "device.log")
        self.script = os.path.join(work, "device.py")
        with open(self.script, "w") as f:
            f.write(DEVICE)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, self.script, str(self.port), self.log])
        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        return poll(up, 10)

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def arrivals(self):
        """(topic, seq) in the order the device logged them."""
        out = []
        with open(self.log) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and line.endswith("\n"):
                    out.append((parts[0], int(parts[1])))
        return out


class Publisher(threading.Thread):
    """Publishes `seq` on load/t0..t7 in turn at `rate` per second, at QoS 1."""

    def __init__(self, port, rate):
        super().__init__(daemon=True)
        self.rate, self.stop, self.sent = rate, threading.Event(), []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="outage-load",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def run(self):
        start, count, seq = time.monotonic(), 0, [0] * TOPICS
        while not self.stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while count < due:
                t = count % TOPICS
                info = self.client.publish(f"load/t{t}", str(seq[t]), qos=1)
                self.sent.append((info, (f"t{t}", seq[t])))
                seq[t] += 1
                count += 1
            time.sleep(0.002)

    def acknowledged(self):
        """The messages the broker acknowledged (PUBACK), and how many are still unanswered."""
        acked = [m for info, m in self.sent if info.is_published()]
        return acked, len(self.sent) - len(acked)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--down", type=float, default=30.0)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="topicgate-outage-")
    device = Device(work)
    http_port, mqtt_port, coap_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    config = os.path.join(work, "topicgate.toml")
    with open(config, "w") as f:
        f.write(f"""
[[push]]
name = "load"
filter = "load/+"
url = "http://127.0.0.1:{device.port}/in/{{2}}"
method = "POST"
max_attempts = 1000000
max_age = "10m"
backoff = "50ms"
max_backoff = "500ms"
max_queued = 100000
when_full = "refuse"
""")
    gateway = subprocess.Popen(
        [args.binary, "--config", config, "--data-dir", os.path.join(work, "data"),
         "--http-addr", f"127.0.0.1:{http_port}", "--mqtt-addr", f"127.0.0.1:{mqtt_port}",
         "--coap-addr", f"127.0.0.1:{coap_port}"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "gateway.log"), "w"),
        env={k: v for k, v in os.environ.items() if not k.startswith("TOPICGATE_")},
    )
    publisher = None
    try:
        check("the device starts", device.start())
        check("the gateway becomes ready", poll(lambda: http_get(http_port, "/readyz")[0] == 200, 20))
        publisher = Publisher(mqtt_port, args.rate)
        began = time.monotonic()
        publisher.start()
        time.sleep(3)  # load while the device is up
        device.kill()
        down_at = time.monotonic()
        time.sleep(args.down)  # the outage, under load
        queued = metric(http_port, 'topicgate_push_queued{rule="load"}') or 0
        check("messages wait in the outbox while the device is down", queued > args.rate * args.down / 2,
              f"{queued} queued")
        check("the device starts again on its port", device.start())
        print(f"outage: device down for {time.monotonic() - down_at:.1f} s, {queued:.0f} messages waiting")
        time.sleep(4)  # load while the backlog drains
        publisher.stop.set()
        publisher.join()
        poll(lambda: publisher.acknowledged()[1] == 0, 10)
        acked, unanswered = publisher.acknowledged()
        print(f"outage: {len(publisher.sent)} published at {args.rate}/s over {TOPICS} topics, "
              f"{len(acked)} acknowledged")
        check("the broker acknowledges every publish", not unanswered, f"{unanswered} unanswered")

        wanted = {}
        for topic, seq in acked:
            wanted.setdefault(topic, set()).add(seq)
        def all_arrived():
            got = {}
            for topic, seq in device.arrivals():
                got.setdefault(topic, set()).add(seq)
            return all(wanted[t] <= got.get(t, set()) for t in wanted)
        drained = poll(all_arrived, 25)
        check("every acknowledged message arrives", drained,
              f"missing {sum(len(wanted[t]) for t in wanted) - sum(1 for _ in device.arrivals())} or more")

        arrivals = device.arrivals()
        first, seen, duplicates = {}, set(), 0
        for topic, seq in arrivals:
            if (topic, seq) in seen:
                duplicates += 1
                continue
            seen.add((topic, seq))
            first.setdefault(topic, []).append(seq)
        unordered = [t for t, seqs in first.items() if seqs != sorted(seqs)]
        check("messages arrive in order per topic (first arrivals)", not unordered,
              f"out of order on {unordered[:3]}")
        overflow = metric(http_port, 'topicgate_push_overflow_total{rule="load"}')
        check("nothing is dropped at the outbox's bound", overflow == 0, f"overflow {overflow}")
        print(f"outage: {len(arrivals)} requests received, {len(seen)} distinct messages, "
              f"{duplicates} duplicates, in {time.monotonic() - began:.1f} s")
        gateway.send_signal(signal.SIGTERM)
        check("the gateway exits 0 on SIGTERM", gateway.wait(timeout=20) == 0)
    finally:
        if publisher is not None:
            publisher.stop.set()
            publisher.client.loop_stop()
        for p in (gateway, device.proc):
            if p is not None and p.poll() is None:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"outage: {len(PASSED)} passed, {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
