#!/usr/bin/env python3
"""Flood of unsigned requests against one candidate of a loopback cluster (issue 6).

Starts 3 candidates (tools/localcluster.py, --ha-debug, fake host commands, FAST timings),
registers a fake member "bench-member" with the flooded candidate, then:

  1. baseline (--baseline s, no flood): legitimate requests only;
  2. flood (--seconds s): --threads threads in --procs separate processes, each thread
     from its own source address (127.0.0.120 and up, as other hosts would be), send
     unsigned `POST /api/v1/ha/ping` on a new connection each, as fast as answers come
     (tools/flood.py, the flood tests/test_hostile.py uses too).

Legitimate traffic during both phases, from 127.0.0.1 (the address every node's own
traffic comes from on loopback):
  - a signed GET status every --interval s (hoster_ha.Client, 2 s timeout);
  - a signed POST ping from the registered fake member every 2 x --interval s;
  - the cluster's own pings (the other candidates' ping failures are read from /metrics).

Prints the machine, then a table: 401 answers/s, other answers, legitimate p50/p99/max
latency and failures per phase, the cluster's ping failures, whether the cluster kept
its manager and whether anyone fenced.

    python3 bench/flood.py [--threads 8] [--seconds 10] [--procs 2] [--target manager]
"""
import argparse
import http.client
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import hoster_ha  # noqa: E402
from flood import Flood  # noqa: E402
from localcluster import FAST, LocalCluster  # noqa: E402

NAMES = ("node1", "node2", "node3")
TROUBLE = re.compile(r"EMERG|\(DEBUG\) would|no longer the manager|"
                     r"reaching [01] of 3 candidates|Traceback|internal error")

def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))] if v else float("nan")


class Bench:
    def __init__(self, base, args):
        self.args = args
        self.cluster = LocalCluster(base)
        self.cfgs = {n: hoster_ha.load_config(self.cluster[n].config, debug=True)
                     for n in NAMES}
        self.client = hoster_ha.Client(self.cfgs["node1"])
        self.marks = {}

    def peer(self, name):
        c = self.cfgs[name]
        return {"hostname": name, "address": c.address, "port": c.port, "protocol": "http"}

    def status(self, name, timeout=1.0):
        st, ans = self.client.request(self.peer(name), "GET", "status", timeout=timeout)
        return ans if st == 200 and isinstance(ans, dict) else {}

    def agreed(self):
        ms = {self.status(n).get("manager") for n in NAMES}
        return ms.pop() if len(ms) == 1 and None not in ms else None

    def ping_failures(self):
        """{node: hoster_ha_ping_failures_total} from the unsigned /metrics."""
        out = {}
        for n in NAMES:
            conn = http.client.HTTPConnection(self.cluster[n].address, self.cluster.port,
                                              timeout=2)
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
                m = re.search(r"^hoster_ha_ping_failures_total (\S+)$", text, re.M)
                out[n] = float(m.group(1)) if m else float("nan")
            except OSError:
                out[n] = float("nan")
            finally:
                conn.close()
        return out

    def trouble(self):
        out = []
        for n in NAMES:
            node = self.cluster[n]
            if node.proc is None or node.proc.poll() is not None:
                out.append(f"{n}: agent not running")
            new = node.log()[self.marks.get(n, 0):]
            out += [f"{n}: {ln}" for ln in new.splitlines() if TROUBLE.search(ln)]
        return out

    def legit(self, target, seconds, member):
        """Measure legitimate requests for `seconds`: {"status": [...], "ping": [...]}, each
        a list of (ok, seconds); and the manager seen by all three every 0.5 s."""
        res = {"status": [], "ping": []}
        managers = []
        end = time.monotonic() + seconds
        interval = self.args.interval

        def status_loop():
            while time.monotonic() < end:
                t0 = time.monotonic()
                st, _ = self.client.request(self.peer(target), "GET", "status", timeout=2.0)
                res["status"].append((st == 200, time.monotonic() - t0))
                time.sleep(max(0.0, interval - (time.monotonic() - t0)))

        def ping_loop():
            body = {"hostname": member["hostname"], "startup_time": member["startup_time"],
                    "armed": False, "maintenance": False, "manager": False, "term": 0}
            while time.monotonic() < end:
                t0 = time.monotonic()
                st, _ = self.client.request(self.peer(target), "POST", "ping", body,
                                            timeout=2.0)
                res["ping"].append((st == 200, time.monotonic() - t0))
                time.sleep(max(0.0, 2 * interval - (time.monotonic() - t0)))

        def manager_loop():
            while time.monotonic() < end:
                managers.append(self.agreed())
                time.sleep(0.5)

        threads = [threading.Thread(target=f, daemon=True)
                   for f in (status_loop, ping_loop, manager_loop)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 10)
        return res, managers

    def run(self):
        a, c = self.args, self.cluster
        c.start_all()
        manager = c.wait_for(lambda: self.agreed() and all(self.status(n).get("armed")
                                                           for n in NAMES)
                             and self.agreed(), 40, interval=0.2)
        if not manager:
            raise RuntimeError("no manager within 40 s")
        target = manager if a.target == "manager" else a.target
        st = int(time.time() * 1000)
        member = {"hostname": "bench-member", "address": "127.0.0.250", "port": 4000,
                  "protocol": "http", "startup_time": st, "backup_node": False,
                  "failover_strategy": "change-parent", "failover_time": 13, "fenced_vms": []}
        s, ans = self.client.request(self.peer(target), "POST", "register", member)
        if s != 200:
            raise RuntimeError(f"register bench-member: {s} {ans}")
        self.marks = {n: len(c[n].log()) for n in NAMES}

        rows = []
        base_fail = self.ping_failures()
        res, managers = self.legit(target, a.baseline, member)
        rows.append(("baseline (no flood)", None, res, managers, self.ping_failures(),
                     base_fail, a.baseline))
        before = self.ping_failures()
        flood = Flood(c[target].address, c.port, threads=a.threads, seconds=a.seconds,
                      procs=a.procs).start()
        try:
            res, managers = self.legit(target, a.seconds, member)
        finally:
            counts = flood.stop()
        took = flood.seconds
        rows.append((f"flood: {a.threads} threads, {a.procs} procs", (counts, took), res,
                     managers, self.ping_failures(), before, took))
        final = self.agreed()
        trouble = self.trouble()
        return manager, target, rows, final, trouble


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=8, help="flood threads in all (8)")
    p.add_argument("--procs", type=int, default=2, help="flood processes (2)")
    p.add_argument("--seconds", type=float, default=10.0, help="flood duration (10)")
    p.add_argument("--baseline", type=float, default=3.0, help="baseline duration (3)")
    p.add_argument("--interval", type=float, default=0.05,
                   help="seconds between legitimate GET status requests (0.05)")
    p.add_argument("--target", default="manager", help="manager (default) or node1..node3")
    a = p.parse_args()
    a.procs = max(1, min(a.procs, a.threads))
    with tempfile.TemporaryDirectory(prefix="hoster_ha_flood_") as base:
        b = Bench(base, a)
        try:
            manager, target, rows, final, trouble = b.run()
        finally:
            b.cluster.stop_all()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
    print("timings: " + ", ".join(f"{k}={v:g}" for k, v in FAST.items()))
    print(f"flooded: {target} (the manager: {manager}); unsigned POST /api/v1/ha/ping, a new "
          f"connection per request, each thread from its own 127.0.0.x")
    print()
    hdr = (f"{'phase':28} {'401/s':>7} {'other answers':>22} {'legit request':>13} {'n':>4} "
           f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'fail':>4} {'cluster ping fail':>17}")
    print(hdr)
    print("-" * len(hdr))
    for name, flood, res, managers, fails, fails_before, secs in rows:
        if flood:
            counts, took = flood
            rate = f"{counts.get(401, 0) / took:7.0f}"
            other = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(),
                                                              key=lambda kv: str(kv[0]))
                              if k != 401)
        else:
            rate, other = f"{'-':>7}", ""
        cluster_fail = int(sum(fails[n] - fails_before[n] for n in NAMES))
        for kind in ("status", "ping"):
            xs = res[kind]
            ok = [dt * 1000 for good, dt in xs if good]
            first = kind == "status"
            fails_text = f"{cluster_fail} in {secs:.0f} s" if first else ""
            worst = max(ok) if ok else float("nan")
            print(f"{name if first else '':28} {rate if first else '':>7} "
                  f"{(other or '-') if first else '':>22} "
                  f"{'GET status' if first else 'member ping':>13} {len(xs):4d} "
                  f"{pct(ok, 0.5):7.1f} {pct(ok, 0.99):7.1f} {worst:7.1f} "
                  f"{len(xs) - len(ok):4d} {fails_text:>17}")
    seen = {m for _, _, _, managers, _, _, _ in rows for m in managers}
    print()
    kept = seen == {manager} and final == manager
    print(f"manager kept throughout: {'yes' if kept else 'NO'} ({manager}; seen "
          f"{sorted(map(str, seen))}, at the end {final})")
    print(f"nobody fenced, no EMERG, no lost quorum: {'yes' if not trouble else 'NO'}")
    for t in trouble[:10]:
        print("  " + t)
    return 0 if kept and not trouble else 1


if __name__ == "__main__":
    sys.exit(main())
