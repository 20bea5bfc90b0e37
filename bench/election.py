#!/usr/bin/env python3
"""Election timing on a loopback cluster (debug mode, fake host commands).

Measures, over N runs: the time from the third agent's start until all three report
the same manager, and the time from SIGKILL of the manager's agent until both
survivors report the same new manager.  Polls each agent's GET status directly every
20 ms.  Prints a table.

    python3 bench/election.py [--runs 5] [--ping-interval 0.5]
"""
import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import hoster_ha  # noqa: E402
from localcluster import FAST, LocalCluster  # noqa: E402


def views(cluster, names, client):
    out = {}
    for n in names:
        node = cluster[n]
        st, ans = client.request({"address": node.address, "port": cluster.port,
                                  "protocol": "http"}, "GET", "status", timeout=0.3)
        out[n] = ans.get("manager") if st == 200 else None
    return out


def agreed(cluster, names, client, not_this=None):
    v = set(views(cluster, names, client).values())
    if len(v) == 1:
        m = v.pop()
        if m is not None and m != not_this:
            return m
    return None


def one_run(timings):
    with tempfile.TemporaryDirectory() as base:
        cluster = LocalCluster(base, timings=timings)
        cfg = hoster_ha.load_config(cluster["node1"].config)
        client = hoster_ha.Client(cfg)
        names = ["node1", "node2", "node3"]
        try:
            for n in names:
                cluster[n].start()
            t0 = time.monotonic()
            m = cluster.wait_for(lambda: agreed(cluster, names, client), 60, interval=0.02)
            t_elect = time.monotonic() - t0
            cluster.wait_for(lambda: all(cluster[n].pid("ha_watchdog") for n in names), 10)
            cluster[m].proc.send_signal(signal.SIGKILL)
            t1 = time.monotonic()
            survivors = [n for n in names if n != m]
            m2 = cluster.wait_for(lambda: agreed(cluster, survivors, client, not_this=m), 60,
                                  interval=0.02)
            t_take = time.monotonic() - t1
            return t_elect, t_take, bool(m and m2)
        finally:
            cluster.stop_all()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--defaults", action="store_true",
                   help="use SPEC default timings (ping_interval 2, vote_lease 6, ...)")
    a = p.parse_args()
    timings = dict(hoster_ha.TIMINGS) if a.defaults else dict(FAST)
    elect, take = [], []
    for i in range(a.runs):
        e, t, ok = one_run(timings)
        if not ok:
            print(f"run {i}: no manager", file=sys.stderr)
            return 1
        elect.append(e)
        take.append(t)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print("timings: " + ", ".join(f"{k}={v:g}" for k, v in timings.items()))
    print(f"{'measure':44} {'runs':>4} {'median':>7} {'min':>7} {'max':>7}")
    for name, xs in (("election after the third start (s)", elect),
                     ("new manager after SIGKILL of the manager (s)", take)):
        print(f"{name:44} {len(xs):>4} {statistics.median(xs):7.2f} {min(xs):7.2f} "
              f"{max(xs):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
