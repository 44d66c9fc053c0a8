#!/usr/bin/env python3
"""Soak and overload benchmark of `absorb serve` (make soak): prints figures, asserts nothing.

Starts the service on a loopback port, measures its capacity for the default generate request,
then drives it at a multiple of that (default 2x) for a fixed time with a mix of valid requests
(generate of 1 or 2 images, inpaint), bad requests (malformed JSON, out-of-range numbers, unknown
routes), clients that hang up mid-request, and slow clients that send their head a byte a second.
It samples the service's RSS and open file descriptors at the start, once warm (a tenth of the
way: ONNX Runtime's arena has grown to the largest batch by then), half way and at the end. At the end it prints
requests by kind and status, p50/p99 latency of the answered valid requests, RSS and descriptors
at start, middle and end, whether any 5xx occurred, then sends SIGTERM under load and reports
what the drain answered and the exit status. Standard library only.

    python3 scripts/soak.py --seconds 600            # the 10-minute run of the README
    python3 scripts/soak.py --seconds 60 --rate 2    # shorter, at twice the capacity
"""
import argparse
import base64
import collections
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_figures(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Service:
    def __init__(self, binary, model, extra):
        cmd = [binary, "serve", "-m", model, "--listen", "127.0.0.1:0", *extra]
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log = []
        for line in self.p.stderr:
            self.log.append(line)
            if line.startswith("listening on "):
                host, port = line.split()[-1].rsplit(":", 1)
                self.addr = (host, int(port))
                break
        else:
            sys.exit("soak: the service did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain_log, daemon=True).start()
        while True:  # ready once /healthz answers (after the warm-up)
            try:
                if request(self.addr, "GET", "/healthz", None, timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)

    def _drain_log(self):
        for line in self.p.stderr:
            self.log.append(line)


def exchange(addr, method, path, body, timeout=120):
    """One request on a fresh connection: (status, body, seconds)."""
    start = time.monotonic()
    c = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read(), time.monotonic() - start
    finally:
        c.close()


def request(addr, method, path, body, timeout=120):
    """One request on a fresh connection: (status, seconds)."""
    status, _, seconds = exchange(addr, method, path, body, timeout)
    return status, seconds


def hang_up(addr, body):
    """Sends a whole generate request, then closes before the answer."""
    s = socket.create_connection(addr, timeout=10)
    s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(random.uniform(0.0, 0.3))
    s.close()


def half_body(addr):
    """Sends a head and half a body, then closes."""
    s = socket.create_connection(addr, timeout=10)
    s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: soak\r\nContent-Length: 40\r\n\r\n{\"seed\": 1")
    time.sleep(random.uniform(0.0, 0.5))
    s.close()


def slow_client(addr, seconds):
    """Sends a request head one byte a second; returns how long until the server closed it."""
    head = b"GET /healthz HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"s" * 200
    s = socket.create_connection(addr, timeout=5)
    start = time.monotonic()
    try:
        for b in head:
            s.sendall(bytes([b]))
            time.sleep(1.0)
            if time.monotonic() - start > seconds:
                return None
    except OSError:
        return time.monotonic() - start
    finally:
        s.close()
    return None


BAD = [
    ("POST", "/v1/generate", b"{not json"),
    ("POST", "/v1/generate", b'{"steps": -1}'),
    ("POST", "/v1/generate", b'{"count": 100000}'),
    ("POST", "/v1/generate", b'{"grid": [18446744073709551615, 2]}'),
    ("POST", "/v1/inpaint", b'{"image": "not base64", "rect": [0, 0, 8, 8]}'),
    ("POST", "/v1/outpaint", b'{"extend": {"right": 18446744073709551615}}'),
    ("GET", "/nope", None),
    ("DELETE", "/v1/generate", None),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/absorb"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/digits"))
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--rate", type=float, default=2.0, help="load as a multiple of the measured capacity")
    ap.add_argument("--slow", type=int, default=20, help="slow clients kept connected at any time")
    args = ap.parse_args()
    svc = Service(args.bin, args.model, ["--threads", "2", "--header-timeout-ms", "10000"])
    addr, pid = svc.addr, svc.p.pid
    rng = random.Random(0)

    # Capacity: default generate requests from 4 clients for 10 s (concurrent ones share calls).
    done, stop = [0], time.monotonic() + 10

    def probe():
        while time.monotonic() < stop:
            request(addr, "POST", "/v1/generate", json.dumps({"seed": rng.randrange(1 << 30)}).encode())
            done[0] += 1

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    capacity = done[0] / 10
    rate = capacity * args.rate
    png = base64.b64decode(json.loads(exchange(addr, "POST", "/v1/generate", b'{"seed": 5, "count": 2}')[1])["images"][0])
    inpaint = json.dumps({"image": base64.b64encode(png).decode(), "rect": [8, 8, 16, 16], "seed": 1}).encode()
    print(f"capacity {capacity:.1f} requests/s (default generate, 4 clients); driving at {rate:.1f}/s "
          f"({args.rate:g}x) for {args.seconds:g} s, {args.slow} slow clients at a time", flush=True)

    counts = collections.Counter()
    latency = []
    errors = collections.Counter()
    lock = threading.Lock()
    samples = [("start", *proc_figures(pid))]
    slow_closed = []

    def one(kind):
        try:
            if kind == "generate":
                body = {"seed": rng.randrange(1 << 30)}
                if rng.random() < 0.3:
                    body["count"] = 2
                status, t = request(addr, "POST", "/v1/generate", json.dumps(body).encode())
            elif kind == "inpaint":
                status, t = request(addr, "POST", "/v1/inpaint", inpaint)
            elif kind == "bad":
                status, t = request(addr, *rng.choice(BAD))
            elif kind == "hang-up":
                if rng.random() < 0.5:
                    hang_up(addr, b'{"seed": 3}')
                else:
                    half_body(addr)
                status, t = "closed by client", None
            with lock:
                counts[(kind, status)] += 1
                if t is not None and kind in ("generate", "inpaint") and status == 200:
                    latency.append(t)
        except OSError as e:
            with lock:
                errors[(kind, type(e).__name__)] += 1

    def slow_loop(deadline):
        while time.monotonic() < deadline:
            closed = slow_client(addr, 60)
            with lock:
                counts[("slow", "closed by server" if closed else "not closed")] += 1
                if closed:
                    slow_closed.append(closed)

    start = time.monotonic()
    end = start + args.seconds
    slow_threads = [threading.Thread(target=slow_loop, args=(end,), daemon=True) for _ in range(args.slow)]
    for t in slow_threads:
        t.start()
    workers = []
    next_at, next_sample, middle_done, warm_done = start, start + 5, False, False
    warm_at = [0]
    kinds = ["generate"] * 60 + ["inpaint"] * 10 + ["bad"] * 20 + ["hang-up"] * 10
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_sample:
            next_sample += 5
            if not warm_done and now - start >= args.seconds / 10:
                # Steady state: ONNX Runtime's arena has grown to the largest batch by now.
                samples.append(("warm", *proc_figures(pid)))
                warm_at[0] = sum(counts.values())
                warm_done = True
            if not middle_done and now - start >= args.seconds / 2:
                samples.append(("middle", *proc_figures(pid)))
                middle_done = True
        if now < next_at:
            time.sleep(min(next_at - now, 0.05))
            continue
        next_at += rng.expovariate(rate)
        t = threading.Thread(target=one, args=(rng.choice(kinds),), daemon=True)
        t.start()
        workers.append(t)
        workers = [w for w in workers if w.is_alive()]
    for w in workers:
        w.join()
    for t in slow_threads:
        t.join()
    time.sleep(11)  # the header timeout closes whatever slow client is left
    samples.append(("end", *proc_figures(pid)))

    total = sum(counts.values())
    print(f"\n{total} requests in {args.seconds:g} s:")
    for (kind, status), n in sorted(counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"  {kind:>8} {status!s:>18}: {n}")
    for (kind, e), n in sorted(errors.items()):
        print(f"  {kind:>8} {'error ' + e:>18}: {n}")
    if latency:
        latency.sort()
        p = lambda q: latency[min(len(latency) - 1, int(q * len(latency)))] * 1000  # noqa: E731
        print(f"latency of answered valid requests: p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms ({len(latency)})")
    if slow_closed:
        print(f"slow clients closed by the server after {min(slow_closed):.1f}-{max(slow_closed):.1f} s")
    for name, rss, fds in samples:
        print(f"  {name:>6}: RSS {rss:.1f} MiB, {fds} open file descriptors")
    fivexx = sum(n for (k, s), n in counts.items() if isinstance(s, int) and s >= 500)
    print(f"5xx answers: {fivexx}; client-side errors on requests not hung up on purpose: "
          f"{sum(n for (k, _), n in errors.items() if k != 'hang-up')}")
    warm = next((s for s in samples if s[0] == "warm"), samples[0])
    print(f"RSS growth {samples[-1][1] - samples[0][1]:+.1f} MiB from start, {samples[-1][1] - warm[1]:+.1f} MiB "
          f"from warm over the {total - warm_at[0]} requests since; descriptors {samples[0][2]} -> {samples[-1][2]}")

    # SIGTERM under load: 24 generate requests in flight or queued, then the signal.
    results = []

    def last(i):
        try:
            results.append(request(addr, "POST", "/v1/generate", json.dumps({"seed": i, "count": 2}).encode())[0])
        except OSError as e:
            results.append(type(e).__name__)

    burst = [threading.Thread(target=last, args=(i,)) for i in range(24)]
    for t in burst:
        t.start()
    time.sleep(0.3)
    sent = time.monotonic()
    svc.p.send_signal(signal.SIGTERM)
    code = svc.p.wait(timeout=60)
    took = time.monotonic() - sent
    for t in burst:
        t.join()
    print(f"SIGTERM under load: exit {code} after {took:.2f} s; the 24 requests: "
          f"{dict(collections.Counter(map(str, results)))}")
    print("".join(line for line in svc.log if "drained in" in line).strip())


if __name__ == "__main__":
    main()
