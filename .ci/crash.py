#!/usr/bin/env python3
"""Crash test of the retained store.

Starts the gateway, runs concurrent retained HTTP publishes (PUT) over many topics, kills the
process with SIGKILL at a random moment, restarts it on the same data dir and checks that every
topic whose publish got a 2xx holds that value or a later one. Each writer thread owns its topics
and publishes increasing numbers, so "later" is "greater". Bounded in time; prints the count.

    crash.py BINARY [--seconds-before-kill MIN MAX] [--threads N] [--topics-per-thread K]
"""

import argparse
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

DEADLINE = 20.0


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, data_dir, ports):
    http_port, mqtt_port, coap_port = ports
    proc = subprocess.Popen(
        [
            binary,
            "--http-addr", f"127.0.0.1:{http_port}",
            "--mqtt-addr", f"127.0.0.1:{mqtt_port}",
            "--coap-addr", f"127.0.0.1:{coap_port}",
            "--data-dir", data_dir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("TOPICGATE_")},
    )
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"crash: the gateway exited early: {proc.stderr.read().decode()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    sys.exit("crash: the gateway did not become ready")


def writer(port, topics, acked, counts, stop):
    """PUTs increasing values to its topics round-robin; records the last acknowledged value."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    value = 0
    while not stop.is_set():
        for topic in topics:
            value += 1
            try:
                conn.request("PUT", f"/topics/{topic}", body=str(value))
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                return
            if 200 <= resp.status < 300:
                acked[topic] = value
                counts.append(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--seconds-before-kill", nargs=2, type=float, default=(0.5, 2.0))
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--topics-per-thread", type=int, default=50)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="topicgate-crash-")
    data_dir = os.path.join(work, "data")
    ports = (free_port(), free_port(), free_port(socket.SOCK_DGRAM))
    try:
        proc = start(args.binary, data_dir, ports)
        acked, counts = {}, []
        stop = threading.Event()
        threads = []
        for t in range(args.threads):
            topics = [f"crash/{t}/{k}" for k in range(args.topics_per_thread)]
            th = threading.Thread(target=writer, args=(ports[0], topics, acked, counts, stop), daemon=True)
            th.start()
            threads.append(th)
        time.sleep(random.uniform(*args.seconds_before_kill))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        for th in threads:
            th.join(timeout=DEADLINE)
        snapshot = dict(acked)
        if not snapshot:
            sys.exit("crash: no publish was acknowledged before the kill")

        proc = start(args.binary, data_dir, ports)
        lost = []
        conn = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=5)
        for topic, value in sorted(snapshot.items()):
            conn.request("GET", f"/topics/{topic}")
            resp = conn.getresponse()
            body = resp.read().decode()
            if resp.status != 200 or int(body) < value:
                lost.append((topic, value, resp.status, body))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=DEADLINE)
        total = len(counts)
        print(
            f"crash: {len(snapshot)} topics checked after kill -9, "
            f"{total} acknowledged publishes, {len(lost)} lost"
        )
        for topic, value, status, body in lost[:10]:
            print(f"crash:   {topic}: acknowledged {value}, read {status} {body!r}")
        sys.exit(1 if lost else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
