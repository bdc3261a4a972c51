#!/usr/bin/env python3
"""CoAP end-to-end checks that need a programmable client: drives a running topicgate with aiocoap
and with hand-built datagrams on plain UDP sockets. Run by .ci/e2e_coap.sh against its gateway.

Prints one "ok - ..."/"not ok - ..." line per check (details of a failure follow on "#   " lines)
and exits non-zero when a check fails.

    coap_checks.py --coap-port P --http-port P --mqtt-port P [--max-payload BYTES] [--timeout S]
"""

import argparse
import asyncio
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import aiocoap
from aiocoap import ACK, CON, GET, NON, POST, PUT, Code, Message
from aiocoap.optiontypes import BlockOption

HOST = "127.0.0.1"

PASSED = 0
FAILED = 0


def ok(name):
    global PASSED
    PASSED += 1
    print(f"ok - {name}", flush=True)


def not_ok(name, *details):
    global FAILED
    FAILED += 1
    print(f"not ok - {name}", flush=True)
    for line in details:
        print(f"#   {line}", flush=True)


class Gateway:
    """The gateway under test: its ports and small HTTP, MQTT and UDP helpers."""

    def __init__(self, args):
        self.coap_port = args.coap_port
        self.http_port = args.http_port
        self.mqtt_port = args.mqtt_port
        self.max_payload = args.max_payload
        self.timeout = args.timeout
        self.base = f"http://{HOST}:{args.http_port}"
        self.coap_uri = f"coap://{HOST}:{args.coap_port}"

    # --- HTTP --------------------------------------------------------------------------------

    def http(self, method, path, data=None, headers=None):
        """Status and body of an HTTP request; HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def publish(self, topic, payload, retain=False):
        """Publishes over HTTP (POST, or PUT for a retained value); raises unless 204."""
        status, body = self.http("PUT" if retain else "POST", f"/topics/{topic}", payload,
                                 {"Content-Type": "text/plain"})
        if status != 204:
            raise RuntimeError(f"HTTP publish to {topic}: status {status} {body!r}")

    def metrics(self):
        status, body = self.http("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics: status {status}")
        return body.decode("utf-8", "replace")

    def metric(self, series):
        """Value of one series (name with its labels, as printed), 0 when absent."""
        pattern = re.compile(r"^" + re.escape(series) + r" ([0-9.eE+-]+)$", re.M)
        m = pattern.search(self.metrics())
        return float(m.group(1)) if m else 0.0

    def wait_metric(self, series, predicate):
        """Polls a series until predicate(value) holds; returns (held, last value)."""
        deadline = time.monotonic() + self.timeout
        while True:
            value = self.metric(series)
            if predicate(value):
                return True, value
            if time.monotonic() >= deadline:
                return False, value
            time.sleep(0.1)

    # --- UDP ---------------------------------------------------------------------------------

    def udp(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, 0))
        s.connect((HOST, self.coap_port))
        return s

    def recv(self, sock, wait=None):
        """The next datagram, or None after `wait` seconds (default: the timeout)."""
        sock.settimeout(self.timeout if wait is None else wait)
        try:
            return sock.recv(65536)
        except socket.timeout:
            return None


class Subscriber:
    """mosquitto_sub -v on a filter, its output lines collected by a thread."""

    def __init__(self, gw, topic_filter, probe):
        self.gw = gw
        self.probe = probe
        self.lines = queue.Queue()
        self.seen = []
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-h", HOST, "-p", str(gw.mqtt_port), "-v", "-W", "120",
             "-t", topic_filter, "-t", probe],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))

    def mpub(self, topic, payload):
        subprocess.run(["mosquitto_pub", "-h", HOST, "-p", str(self.gw.mqtt_port), "-q", "1",
                        "-t", topic, "-m", payload],
                       timeout=self.gw.timeout, check=True, capture_output=True)

    def wait_for(self, predicate, wait):
        """Collects lines until one satisfies predicate or `wait` seconds pass."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return False
            self.seen.append(line)
            if predicate(line):
                return True

    def wait_subscribed(self):
        """Publishes on the probe topic until the subscriber shows it."""
        deadline = time.monotonic() + self.gw.timeout
        while time.monotonic() < deadline:
            self.mpub(self.probe, "probe")
            if self.wait_for(lambda line: line.startswith(self.probe + " "), 0.3):
                return True
        return False

    def close(self):
        self.proc.kill()
        self.proc.wait()


def msg(mtype, code, mid, token, path, payload=b"", query=(), **options):
    """A request built by hand: message type, id and token as given."""
    m = Message(code=code, payload=payload, uri_path=tuple(path.strip("/").split("/")),
                **({"uri_query": tuple(query)} if query else {}), **options)
    m.mtype = mtype
    m.mid = mid
    m.token = token
    return m


def describe(data):
    if data is None:
        return "nothing"
    try:
        m = Message.decode(data)
        options = ", ".join(f"{o.number}: {o.value}" for o in m.opt.option_list())
        return (f"{m.mtype} {m.code} mid={m.mid:#06x} token={m.token.hex()} [{options}] "
                f"{m.payload[:80]!r}")
    except Exception as e:  # noqa: BLE001 - a report, whatever the datagram
        return f"undecodable datagram {data.hex()} ({e})"


def new_mid():
    return int.from_bytes(os.urandom(2), "big")


# --- a. a duplicated confirmable POST is processed once ------------------------------------------

def check_duplicate(gw):
    name = "duplicated CON POST is answered twice with identical bytes"
    sub = Subscriber(gw, "dup/#", "dup/probe")
    try:
        if not sub.wait_subscribed():
            not_ok(name, "mosquitto_sub never saw its probe message", f"lines: {sub.seen}")
            return
        before = gw.metric("topicgate_coap_duplicates_total")
        mid, token = new_mid(), os.urandom(4)
        data = msg(CON, POST, mid, token, "/topics/dup/x", b"once", query=["qos=0"]).encode()
        sock = gw.udp()
        sock.send(data)
        first = gw.recv(sock)
        sock.send(data)
        # The answer comes from the cache: no reason for it to take long.
        second = gw.recv(sock, wait=2)
        sock.close()

        problems = []
        if first is None or second is None:
            problems.append(f"responses: first {describe(first)}, second {describe(second)}")
        else:
            if first != second:
                problems.append(f"the responses differ: {first.hex()} vs {second.hex()}")
            m = Message.decode(first)
            if (m.mtype, m.code, m.mid, m.token) != (ACK, Code.CHANGED, mid, token):
                problems.append(f"expected ACK 2.04 mid={mid:#06x} token={token.hex()}, "
                                f"got {describe(first)}")
        if problems:
            not_ok(name, *problems)
        else:
            ok(name)

        name = "duplicated CON POST is published to MQTT once"
        # Everything published before the sentinel reaches the subscriber before it.
        sub.mpub("dup/sentinel", "end")
        if not sub.wait_for(lambda line: line == "dup/sentinel end", gw.timeout):
            not_ok(name, "the sentinel message never arrived", f"lines: {sub.seen}")
        else:
            got = [line for line in sub.seen if line.startswith("dup/x")]
            if got == ["dup/x once"]:
                ok(name)
            else:
                not_ok(name, "expected exactly one line 'dup/x once'", f"got: {got}")

        name = "topicgate_coap_duplicates_total counts the duplicate"
        held, value = gw.wait_metric("topicgate_coap_duplicates_total",
                                     lambda v: v >= before + 1)
        if held:
            ok(name)
        else:
            not_ok(name, f"expected at least {before + 1:g}, got {value:g}")
    finally:
        sub.close()


def check_duplicate_right_after_response(gw, tries=30):
    """The cache must hold the response by the time the client has it: a duplicate sent the
    moment the ACK arrives is answered too, every time."""
    name = f"duplicates sent the moment the ACK arrives are answered ({tries} tries)"
    sock = gw.udp()
    try:
        for attempt in range(1, tries + 1):
            mid, token = new_mid(), os.urandom(4)
            data = msg(CON, POST, mid, token, "/topics/dup/burst", b"b", query=["qos=0"]).encode()
            sock.send(data)
            first = gw.recv(sock)
            if first is None:
                not_ok(name, f"try {attempt}: no response to the first copy (mid={mid:#06x})")
                return
            sock.send(data)
            second = gw.recv(sock, wait=2)
            if second != first:
                not_ok(name, f"try {attempt}: first copy answered with {describe(first)}",
                       f"the duplicate sent right after it got {describe(second)}")
                return
        ok(name)
    finally:
        sock.close()


# --- b. an RST to a notification removes the observer --------------------------------------------

def register(gw, sock, token, topic, name):
    """Registers an observation of `topic`; reports `name` as failed and returns False unless
    the answer is a 2.05 with an Observe option."""
    sock.send(msg(CON, GET, new_mid(), token, f"/topics/{topic}", observe=0).encode())
    data = gw.recv(sock)
    reply = Message.decode(data) if data else None
    if reply is None or reply.code != Code.CONTENT or reply.opt.observe is None:
        not_ok(name, f"registration: expected 2.05 with Observe, got {describe(data)}")
        return False
    return True


def check_reset_removes_observer(gw):
    name = "RST to a notification removes the observer"
    topic = "rst/t"
    observers = "topicgate_coap_observers"
    reset = 'topicgate_coap_observers_removed_total{reason="reset"}'
    base_observers = gw.metric(observers)
    base_reset = gw.metric(reset)
    sock = gw.udp()
    try:
        token = os.urandom(4)
        if not register(gw, sock, token, topic, name):
            return
        held, value = gw.wait_metric(observers, lambda v: v >= base_observers + 1)
        if not held:
            not_ok(name, f"{observers}: expected {base_observers + 1:g}, got {value:g}")
            return

        gw.publish(topic, b"n1")
        data = gw.recv(sock)
        note = Message.decode(data) if data else None
        if (note is None or note.token != token or note.code != Code.CONTENT
                or note.payload != b"n1" or note.mtype not in (NON, CON)):
            not_ok(name, f"expected a 2.05 notification 'n1', got {describe(data)}")
            return
        if note.mtype != NON:
            print(f"# note: the first notification was {note.mtype}, not NON", flush=True)
        sock.send(bytes([0x70, 0x00, note.mid >> 8, note.mid & 0xFF]))

        problems = []
        held, value = gw.wait_metric(observers, lambda v: v <= base_observers)
        if not held:
            problems.append(f"{observers}: expected {base_observers:g} after the RST, "
                            f"got {value:g}")
        held, value = gw.wait_metric(reset, lambda v: v >= base_reset + 1)
        if not held:
            problems.append(f"{reset}: expected at least {base_reset + 1:g}, got {value:g}")
        gw.publish(topic, b"n2")
        data = gw.recv(sock, wait=1.5)
        if data is not None:
            problems.append(f"a publish after the RST still sent {describe(data)}")
        if problems:
            not_ok(name, *problems)
        else:
            ok(name)
    finally:
        sock.close()


def ack(sock, mid):
    sock.send(bytes([0x60, 0x00, mid >> 8, mid & 0xFF]))


def check_confirmable_notifications(gw):
    """Notifications are NON with a CON at least every 100; a CON is resent until ACKed while
    newer values wait, and the newest of them follows the ACK."""
    name = "one of 100 notifications is CON; an unacknowledged CON is resent"
    topic = "con/hundred"
    retransmissions = "topicgate_coap_retransmissions_total"
    sock = gw.udp()
    token = os.urandom(4)
    try:
        if not register(gw, sock, token, topic, name):
            return
        before = gw.metric(retransmissions)

        # Round 1: 100 publishes, every CON acknowledged at once.
        for i in range(1, 101):
            gw.publish(topic, str(i).encode())
        notes = []
        while not notes or notes[-1].payload != b"100":
            data = gw.recv(sock)
            if data is None:
                break
            note = Message.decode(data)
            if note.token != token:
                continue
            notes.append(note)
            if note.mtype == CON:
                ack(sock, note.mid)
        numbers = [int(n.payload) for n in notes if n.payload.isdigit()]
        types = [str(n.mtype) for n in notes]
        if (len(numbers) != len(notes) or numbers != sorted(set(numbers)) or not numbers
                or numbers[-1] != 100):
            not_ok(name, "round 1: expected increasing values ending with 100",
                   f"got {[n.payload for n in notes]}")
            return
        if types.count(str(CON)) < 1:
            not_ok(name, f"round 1: no CON among {len(notes)} notifications")
            return

        # Round 2: 100 more; the first CON is left unacknowledged.
        for i in range(101, 201):
            gw.publish(topic, str(i).encode())
        first_con = None
        while True:
            data = gw.recv(sock)
            if data is None:
                break
            note = Message.decode(data)
            if note.token != token:
                continue
            if note.mtype == CON:
                first_con = (data, note)
                break
            if note.payload == b"200":
                break
        if first_con is None:
            not_ok(name, "round 2: no CON among the notifications of 101..200")
            return
        con_bytes, con = first_con
        data = gw.recv(sock)
        if data != con_bytes:
            not_ok(name, f"expected the CON {describe(con_bytes)} again",
                   f"got {describe(data)}")
            return
        ack(sock, con.mid)
        if con.payload != b"200":
            data = gw.recv(sock)
            note = Message.decode(data) if data else None
            if note is None or note.payload != b"200":
                not_ok(name, f"after the ACK, expected the newest value 200, got {describe(data)}")
                return
            if note.mtype == CON:
                ack(sock, note.mid)
        held, value = gw.wait_metric(retransmissions, lambda v: v >= before + 1)
        if not held:
            not_ok(name, f"{retransmissions}: expected at least {before + 1:g}, got {value:g}")
            return
        ok(name)
    finally:
        # Deregister (GET with Observe: 1) so that the observer does not linger.
        sock.send(msg(CON, GET, new_mid(), token, f"/topics/{topic}", observe=1).encode())
        gw.recv(sock, wait=1)
        sock.close()


# --- d. block-wise uploads out of order or over the limit ----------------------------------------

def check_block1_out_of_order(gw):
    name = "Block1 block 1 without block 0 is 4.08"
    sock = gw.udp()
    try:
        mid = new_mid()
        sock.send(msg(CON, PUT, mid, os.urandom(4), "/topics/big/ooo", b"b" * 1024,
                      block1=BlockOption.BlockwiseTuple(1, True, 6)).encode())
        data = gw.recv(sock)
        reply = Message.decode(data) if data else None
        status, _ = gw.http("GET", "/topics/big/ooo")
        if reply is None or reply.code != Code.REQUEST_ENTITY_INCOMPLETE or reply.mid != mid:
            not_ok(name, f"expected ACK 4.08 mid={mid:#06x}, got {describe(data)}")
        elif status != 404:
            not_ok(name, f"GET /topics/big/ooo over HTTP: expected 404, got {status}")
        else:
            ok(name)
    finally:
        sock.close()


def check_over_limit(gw):
    limit = gw.max_payload
    name = f"PUT of {limit + 1} bytes in one datagram is 4.13 with Size1 {limit}"
    sock = gw.udp()
    try:
        sock.send(msg(CON, PUT, new_mid(), os.urandom(4), "/topics/big/over",
                      b"o" * (limit + 1)).encode())
        data = gw.recv(sock)
        reply = Message.decode(data) if data else None
        if reply is None or reply.code != Code.REQUEST_ENTITY_TOO_LARGE or reply.opt.size1 != limit:
            not_ok(name, f"expected 4.13 with Size1 {limit}, got {describe(data)}")
        else:
            ok(name)

        # Blocks of 1024 bytes without a Size1 hint: the gateway only learns the size as they come.
        blocks = limit // 1024 + 1
        name = f"Block1 upload growing past {limit} bytes is 4.13 with Size1"
        token = os.urandom(4)
        replies = []
        for num in range(blocks):
            mid = new_mid()
            sock.send(msg(CON, PUT, mid, token, "/topics/big/over2", b"p" * 1024,
                          block1=BlockOption.BlockwiseTuple(num, num < blocks - 1, 6)).encode())
            data = gw.recv(sock)
            replies.append(describe(data))
            reply = Message.decode(data) if data else None
            if reply is None or reply.code != Code.CONTINUE:
                break
        status, _ = gw.http("GET", "/topics/big/over2")
        if reply is None or reply.code != Code.REQUEST_ENTITY_TOO_LARGE or reply.opt.size1 is None:
            not_ok(name, f"expected a 4.13 with Size1 by block {blocks - 1}", *replies)
        elif len(replies) < limit // 1024:
            not_ok(name, f"4.13 came early, at block {len(replies) - 1}", *replies)
        elif status != 404:
            not_ok(name, f"GET /topics/big/over2 over HTTP: expected 404, got {status}")
        else:
            ok(name)
    finally:
        sock.close()


# --- c. and e. with aiocoap's client ----------------------------------------------------------------

async def check_block1_upload(gw, ctx):
    name = "aiocoap PUT of 5000 bytes (Block1) is stored whole"
    payload = bytes((i * 7 + i // 256) % 256 for i in range(5000))
    request = Message(code=PUT, uri=f"{gw.coap_uri}/topics/big/up", payload=payload,
                      content_format=42)
    continues = 'topicgate_coap_requests_total{method="PUT",code="2.31"}'
    before = await asyncio.to_thread(gw.metric, continues)
    try:
        response = await asyncio.wait_for(ctx.request(request).response, gw.timeout)
    except Exception as e:  # noqa: BLE001
        not_ok(name, f"the request failed: {e!r}")
        return
    if response.code != Code.CHANGED:
        not_ok(name, f"expected 2.04, got {response.code} {response.payload[:200]!r}")
        return
    status, body = await asyncio.to_thread(gw.http, "GET", "/topics/big/up")
    after = await asyncio.to_thread(gw.metric, continues)
    if status == 200 and body == payload and after >= before + 4:
        ok(name)
    elif after < before + 4:
        not_ok(name, f"{continues} went from {before:g} to {after:g}: expected 4 more "
                     "(5 blocks of 1024 bytes; did aiocoap send it in one piece?)")
    else:
        not_ok(name, f"GET /topics/big/up over HTTP: status {status}, {len(body)} bytes, "
                     f"equal to what was sent: {body == payload}")


async def check_observe(gw, ctx):
    name = "aiocoap observation receives two HTTP publishes"
    topic = "obs/aio"
    request = ctx.request(Message(code=GET, uri=f"{gw.coap_uri}/topics/{topic}", observe=0))
    try:
        first = await asyncio.wait_for(request.response, gw.timeout)
        if first.code != Code.CONTENT or first.opt.observe is None:
            not_ok(name, f"registration: expected 2.05 with Observe, got {first.code} "
                         f"observe={first.opt.observe}")
            return
        # The iterator keeps only the newest notification it has not handed out (Observe is
        # eventually consistent), so each publish waits for the previous notification.
        notifications = request.observation.__aiter__()
        got = []
        for payload in (b"o1", b"o2"):
            await asyncio.to_thread(gw.publish, topic, payload)
            try:
                note = await asyncio.wait_for(notifications.__anext__(), gw.timeout)
            except asyncio.TimeoutError:
                break
            got.append((str(note.code), note.payload))
        want = [(str(Code.CONTENT), b"o1"), (str(Code.CONTENT), b"o2")]
        if got == want:
            ok(name)
        else:
            not_ok(name, f"expected {want}", f"got {got}")
    except Exception as e:  # noqa: BLE001
        not_ok(name, f"the observation failed: {e!r}")
    finally:
        if not request.observation.cancelled:
            request.observation.cancel()


async def aiocoap_checks(gw):
    # Plain UDP only: the default list also sets up TCP, TLS and WebSocket clients.
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        await check_block1_upload(gw, ctx)
        await check_observe(gw, ctx)
    finally:
        await ctx.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coap-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--max-payload", type=int, default=None,
                        help="the gateway's max_payload; enables the 4.13 checks")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds any single wait may take")
    gw = Gateway(parser.parse_args())

    checks = [check_duplicate, check_duplicate_right_after_response, check_reset_removes_observer,
              check_confirmable_notifications, check_block1_out_of_order]
    if gw.max_payload:
        checks.append(check_over_limit)
    for check in checks:
        try:
            check(gw)
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            not_ok(f"{check.__name__} ran to completion", repr(e))
    try:
        asyncio.run(asyncio.wait_for(aiocoap_checks(gw), 6 * gw.timeout))
    except Exception as e:  # noqa: BLE001
        not_ok("aiocoap checks ran to completion", repr(e))

    print(f"coap_checks: {PASSED} passed, {FAILED} failed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
