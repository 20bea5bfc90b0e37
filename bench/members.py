#!/usr/bin/env python3
"""The manager under many members: CPU and ping latency with 100 to 1,000 simulated members.

3 candidates on loopback (tools/localcluster.py, debug mode, fake host commands, SPEC
default timings unless --fast).  Once they agree on a manager, N simulated members
register with every candidate and then ping every candidate once per ping_interval, as
workers do (the real protocol: signed POST register, then POST ping with the member's
fields), each from its own loopback address (127.0.1.1 and up) so that the per-address
request limit sees them as separate hosts.  No member listens: the manager's requests to
them (GET vms) are refused at once.  After --settle s, measures over --seconds s: the CPU
each candidate's agent used (% of one core) and each ping's round trip as the member sees
it (p50, p99, max), and counts failed pings.  The simulated members use cheap raw-socket
requests (they do not check answer signatures), but they share the 2 cores with the
agents: the driver's own CPU is printed too.

    python3 bench/members.py [--sizes 100,300,1000] [--seconds 30] [--settle 10] [--fast]
"""
import argparse
import heapq
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools"), os.path.dirname(os.path.abspath(__file__))]
import hoster_ha  # noqa: E402
from footprint import sample  # noqa: E402
from localcluster import FAST, LocalCluster  # noqa: E402

CANDIDATES = ("node1", "node2", "node3")
THREADS = 48


def post(secret, src, dst, port, name, body, timeout):
    """One signed POST from address src; (status or None, seconds)."""
    target = hoster_ha.API + name
    data = json.dumps(body).encode()
    headers = hoster_ha.signed_headers(secret, "POST", target, data)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    req = (f"POST {target} HTTP/1.1\r\nHost: {dst}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\nConnection: close\r\n{head}\r\n").encode() + data
    t0 = time.monotonic()
    try:
        with socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0)) as s:
            s.sendall(req)
            got = b""
            while b"\r\n" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            parts = got.split(b" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
            while s.recv(65536):   # read to the end, as a real client would
                pass
    except OSError:
        status = None
    return status, time.monotonic() - t0


class Members:
    """N simulated members pinging every candidate once per ping_interval."""

    def __init__(self, n, cluster, secret, interval):
        self.n, self.cluster, self.secret, self.interval = n, cluster, secret, interval
        self.startup = int(time.time())
        self.lat, self.failed, self.sent = [], 0, 0
        self.recording = False
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.queue = []      # (due, member index, candidate)
        self.cv = threading.Condition()

    def address(self, i):
        return f"127.0.{1 + i // 250}.{1 + i % 250}"

    def name(self, i):
        return f"sim-{i:04d}"

    def register_all(self):
        def one(i):
            for c in CANDIDATES:
                node = self.cluster[c]
                body = {"hostname": self.name(i), "address": self.address(i), "port": 9,
                        "protocol": "http", "startup_time": self.startup, "backup_node": False,
                        "failover_strategy": "cireset", "failover_time": 60, "fenced_vms": []}
                post(self.secret, self.address(i), node.address, self.cluster.port,
                     "register", body, 5.0)
        threads = [threading.Thread(target=lambda k=k: [one(i) for i in range(k, self.n, 16)])
                   for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def ping(self, i, c):
        node = self.cluster[c]
        body = {"hostname": self.name(i), "startup_time": self.startup, "seq": 1,
                "left": False, "armed": True, "maintenance": False, "manager": False,
                "term": 0, "ready": True, "not_ready": []}
        status, took = post(self.secret, self.address(i), node.address, self.cluster.port,
                            "ping", body, self.interval)
        if self.recording:
            with self.lock:
                self.sent += 1
                if status == 200:
                    self.lat.append(took)
                else:
                    self.failed += 1

    def worker(self):
        while not self.stop.is_set():
            with self.cv:
                while not self.queue and not self.stop.is_set():
                    self.cv.wait(0.1)
                if self.stop.is_set():
                    return
                due, i, c = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self.cv.wait(min(wait, 0.05))
                    continue
                heapq.heappop(self.queue)
            self.ping(i, c)
            with self.cv:
                heapq.heappush(self.queue, (due + self.interval, i, c))
                self.cv.notify()

    def start(self):
        now = time.monotonic()
        self.queue = [(now + random.random() * self.interval, i, c)
                      for i in range(self.n) for c in CANDIDATES]
        heapq.heapify(self.queue)
        self.threads = [threading.Thread(target=self.worker, daemon=True)
                        for _ in range(THREADS)]
        for t in self.threads:
            t.start()

    def end(self):
        self.stop.set()
        with self.cv:
            self.cv.notify_all()
        for t in self.threads:
            t.join(5)


def one_size(n, timings, seconds, settle):
    with tempfile.TemporaryDirectory(prefix="bench-members-") as base:
        cluster = LocalCluster(base, timings=timings)
        cfg = hoster_ha.load_config(cluster["node1"].config)
        client = hoster_ha.Client(cfg)
        try:
            cluster.start_all()

            def manager():
                views = set()
                for c in CANDIDATES:
                    node = cluster[c]
                    st, ans = client.request({"address": node.address, "port": cluster.port,
                                              "protocol": "http"}, "GET", "status", timeout=1)
                    views.add(ans.get("manager") if st == 200 else None)
                return views.pop() if len(views) == 1 and None not in views else None
            m = cluster.wait_for(manager, 60, interval=0.5)
            if not m:
                raise SystemExit("no manager within 60 s")
            members = Members(n, cluster, cfg.secret, timings["ping_interval"])
            members.register_all()
            members.start()
            time.sleep(settle)
            pids = {c: cluster[c].pid() for c in CANDIDATES}
            before = {c: sample(p)[1] for c, p in pids.items()}
            me0 = time.process_time()
            members.recording = True
            t0 = time.monotonic()
            time.sleep(seconds)
            members.recording = False
            elapsed = time.monotonic() - t0
            after = {c: sample(p)[1] for c, p in pids.items()}
            driver = (time.process_time() - me0) / elapsed * 100
            members.end()
            known = None   # the CLI's request (3 s) may time out on a saturated machine
            for _ in range(5):
                out = cluster[m].cli("members", "--json").stdout
                try:
                    known = len(json.loads(out)["members"])
                    break
                except (ValueError, KeyError, TypeError):
                    time.sleep(1)
        finally:
            cluster.teardown()
    cpu = {c: (after[c] - before[c]) / elapsed * 100 for c in CANDIDATES}
    lat = sorted(members.lat)
    q = (lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000) if lat else (lambda f: None)
    return {"n": n, "manager": m, "cpu_manager": cpu[m],
            "cpu_other": statistics.mean(v for c, v in cpu.items() if c != m),
            "p50": q(0.5), "p99": q(0.99), "max": lat[-1] * 1000 if lat else None,
            "sent": members.sent, "failed": members.failed, "driver": driver,
            "known": known, "elapsed": elapsed}


def table(rows, timings):
    out = [f"3 candidates, debug mode, ping_interval {timings['ping_interval']:g} s; every "
           "simulated member pings every candidate once per ping_interval",
           "", "| members | manager CPU | other candidates' CPU (mean) | ping p50 | ping p99 | "
           "ping max | failed pings | members in the manager's view | driver CPU |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ms(v):
            return "n/a" if v is None else f"{v:.1f} ms"
        out.append(f"| {r['n']} | {r['cpu_manager']:.1f} % | {r['cpu_other']:.1f} % | "
                   f"{ms(r['p50'])} | {ms(r['p99'])} | {ms(r['max'])} | "
                   f"{r['failed']} of {r['sent']} | {r['known']} | {r['driver']:.0f} % |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,300,1000")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=10.0)
    p.add_argument("--fast", action="store_true", help="the test timings (ping_interval 0.5)")
    a = p.parse_args()
    timings = dict(FAST) if a.fast else dict(hoster_ha.TIMINGS)
    rows = []
    for n in (int(s) for s in a.sizes.split(",") if s.strip()):
        rows.append(one_size(n, timings, a.seconds, a.settle))
        print(f"{n} members done", file=sys.stderr)
    print(f"machine: {platform.node()} {platform.system()} {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print(table(rows, timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
