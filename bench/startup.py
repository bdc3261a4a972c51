#!/usr/bin/env python3
"""Startup with many retained topics: fills a fresh data dir with N retained values over HTTP,
stops the gateway, then times a restart until /readyz answers 200, and reads its RSS.

    bench/startup.py [--topics 100000] [--binary target/release/topicgate]
"""

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, data_dir, ports):
    began = time.monotonic()
    proc = subprocess.Popen(
        [binary, "--http-addr", f"127.0.0.1:{ports[0]}", "--mqtt-addr", f"127.0.0.1:{ports[1]}",
         "--coap-addr", f"127.0.0.1:{ports[2]}", "--data-dir", data_dir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("TOPICGATE_")},
    )
    while time.monotonic() - began < 120:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc, time.monotonic() - began
        except OSError:
            pass
        time.sleep(0.005)
    proc.kill()
    sys.exit("startup: not ready in 120 s")


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fill(port, topics, threads):
    def worker(start):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(start, topics, threads):
            conn.request("PUT", f"/topics/bench/{i % 100}/{i}", body=f"value-{i}")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 204:
                sys.exit(f"startup: PUT got {resp.status}")
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--topics", type=int, default=100_000)
    parser.add_argument("--binary", default="target/release/topicgate")
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="topicgate-startup-")
    ports = (free_port(), free_port(), free_port(socket.SOCK_DGRAM))

    proc, first = start(args.binary, data_dir, ports)
    idle = rss_mb(proc.pid)
    began = time.monotonic()
    fill(ports[0], args.topics, 32)
    filled = time.monotonic() - began
    loaded_rss = rss_mb(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    size = os.path.getsize(os.path.join(data_dir, "retained.redb")) / 1024 / 1024

    proc, ready = start(args.binary, data_dir, ports)
    after_rss = rss_mb(proc.pid)
    conn = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=5)
    conn.request("GET", f"/topics/bench/7/{args.topics - 93}")
    resp = conn.getresponse()
    ok = resp.status == 200 and resp.read().decode() == f"value-{args.topics - 93}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)

    print(f"empty start to ready:              {first * 1000:.0f} ms, RSS {idle:.1f} MB")
    print(f"{args.topics} retained PUTs, 32 connections: {filled:.1f} s ({args.topics / filled:.0f}/s), RSS {loaded_rss:.1f} MB")
    print(f"store file:                        {size:.1f} MB")
    print(f"restart with {args.topics} topics to ready: {ready * 1000:.0f} ms, RSS {after_rss:.1f} MB")
    print(f"a value read back after restart:   {'ok' if ok else 'WRONG'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
