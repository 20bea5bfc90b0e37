#!/usr/bin/env python3
"""A flood of unsigned requests from many client addresses, for the hostile-input test
(tests/test_hostile.py) and the benchmark (bench/flood.py).  Stdlib only.

    flood = Flood("127.0.0.1", 4000, threads=8, seconds=10, procs=2)
    flood.start()
    while flood.running():
        ...                       # measure legitimate requests meanwhile
    counts = flood.stop()         # {401: 14321, 503: 3, "ConnectionResetError": 1}
    rate = counts.get(401, 0) / flood.seconds

`threads` threads, spread over `procs` separate processes (so that the flood is not
limited by one interpreter's lock), each from its own source address 127.0.0.{first},
127.0.0.{first+1}, ... (as other hosts would be: on loopback every node's own traffic
comes from 127.0.0.1), send an unsigned `POST /api/v1/ha/ping` on a new connection each
(the agent closes every one), as fast as answers come, for `seconds`.

stop() waits for the processes (at most `seconds` + 20 s, then kills them) and returns
the answers counted: an HTTP status (int), "no answer", or the name of the exception
(str).  `seconds` is then the longest time a process flooded.  A process that fails
raises RuntimeError.

Run as a script, this file is one flood process:

    python3 tools/flood.py HOST PORT THREADS SECONDS FIRST

prints {"counts": {"401": N, ...}, "seconds": S} as JSON.
"""
import json
import socket
import subprocess
import sys
import threading
import time

__all__ = ["Flood"]

FIRST = 120          # 127.0.0.120 and up: no cluster node's address (tools/localcluster.py)
IP_BIND_ADDRESS_NO_PORT = 24    # Linux: a source port is chosen at connect(), not bind()


def request_bytes():
    """The unsigned ping: a stranger claiming to be the manager of a high term."""
    body = json.dumps({"hostname": "node9", "startup_time": 1, "armed": True,
                       "maintenance": False, "manager": True, "term": 99}).encode()
    return (b"POST /api/v1/ha/ping HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def one_request(host, port, src, req):
    """Send `req` from source address `src` on a new connection; the answer's status
    (int), "no answer", or the exception's name."""
    s = socket.socket()
    s.settimeout(3)
    try:
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass
        s.bind((src, 0))
        s.connect((host, port))
        s.sendall(req)
        resp = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            resp += d
        return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/") else "no answer"
    except (OSError, ValueError, IndexError) as e:
        return type(e).__name__
    finally:
        s.close()


def worker(host, port, threads, seconds, first):
    """One flood process: `threads` threads for `seconds`; ({answer: count}, seconds)."""
    req = request_bytes()
    counts = [{} for _ in range(threads)]
    end = time.monotonic() + seconds

    def run(i):
        c, src = counts[i], f"127.0.0.{first + i}"
        while time.monotonic() < end:
            k = one_request(host, port, src, req)
            c[k] = c.get(k, 0) + 1

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    total = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total, time.monotonic() - t0


class Flood:
    """Unsigned POST ping from `threads` threads in `procs` processes, for `seconds`."""

    def __init__(self, host, port, threads=6, seconds=6.0, procs=1, first=FIRST):
        procs = max(1, min(procs, threads))
        per = [threads // procs + (1 if i < threads % procs else 0) for i in range(procs)]
        self.commands = []
        for k in per:
            self.commands.append([sys.executable, __file__, host, str(port), str(k),
                                  str(seconds), str(first)])
            first += k
        self.threads, self.procs, self.seconds = threads, procs, seconds
        self.running_procs = []

    def start(self):
        self.running_procs = [subprocess.Popen(c, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)
                              for c in self.commands]
        return self

    def running(self):
        return any(p.poll() is None for p in self.running_procs)

    def stop(self):
        counts, took, failed = {}, 0.0, []
        for p in self.running_procs:
            try:
                out, err = p.communicate(timeout=self.seconds + 20)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate(timeout=5)
            if p.returncode != 0:
                failed.append(f"flood process exited {p.returncode}: {err[-500:]}")
                continue
            r = json.loads(out)
            took = max(took, r["seconds"])
            for k, v in r["counts"].items():
                k = int(k) if k.isdigit() else k
                counts[k] = counts.get(k, 0) + v
        self.running_procs = []
        if failed:
            raise RuntimeError("\n".join(failed))
        self.seconds = took
        return counts


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit("usage: flood.py HOST PORT THREADS SECONDS FIRST")
    a = sys.argv
    total, took = worker(a[1], int(a[2]), int(a[3]), float(a[4]), int(a[5]))
    print(json.dumps({"counts": {str(k): v for k, v in total.items()}, "seconds": took}))
