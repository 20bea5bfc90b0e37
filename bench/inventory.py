#!/usr/bin/env python3
"""GET vms latency (a failover plan waits for every member's): one node of a loopback
cluster in production mode with fake host commands, 20 VMs, where every `zfs` and
`sysctl` call first sleeps DELAY seconds (a busy pool, a slow disk).  The `zfs get` of the
dataset states comes first; the filesystem list, the snapshot list and the free memory
then run at once, so the answer takes about 2 delays rather than 4.

    python3 bench/inventory.py [--delays 0,0.05,0.2] [--runs 8]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import hoster_ha  # noqa: E402
from localcluster import LocalCluster  # noqa: E402


def slow(node, delay):
    """Put a `sleep DELAY` in front of the node's zfs and free_memory commands."""
    with open(node.config) as f:
        cfg = json.load(f)
    for key in ("zfs", "free_memory"):
        argv = cfg["commands"][key]
        wrapper = os.path.join(node.dir, f"slow_{key}")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nsleep {delay}\nexec {argv[0]} "$@"\n')
        os.chmod(wrapper, 0o755)
        cfg["commands"][key] = [wrapper] + argv[1:]
    with open(node.config, "w") as f:
        json.dump(cfg, f)


def measure(delay, runs):
    with tempfile.TemporaryDirectory(prefix="bench-inventory-") as base:
        c = LocalCluster(base, workers=0, debug=False)
        for n in c.nodes.values():
            for v in range(20):
                n.add_vm(f"vm{v}", parent="elsewhere", snapshots=[])
            slow(n, delay)
        try:
            c.start_all()
            client = hoster_ha.Client(hoster_ha.load_config(c["node1"].config))
            peer = {"address": c["node2"].address, "port": c.port, "protocol": "http"}
            if not c.wait_for(lambda: client.request(peer, "GET", "status", timeout=2)[0]
                              == 200, 30, interval=0.2):
                raise SystemExit("node2 did not answer")
            took = []
            for _ in range(runs):
                t0 = time.monotonic()
                status, answer = client.request(peer, "GET", "vms", timeout=30)
                took.append(time.monotonic() - t0)
                if status != 200 or len(answer.get("vms", [])) != 20:
                    raise SystemExit(f"GET vms: {status} {str(answer)[:200]}")
            return statistics.median(took), min(took), max(took)
        finally:
            c.teardown()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delays", default="0,0.05,0.2")
    p.add_argument("--runs", type=int, default=8)
    a = p.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{a.runs} GET vms per row")
    print("\n| each zfs/sysctl call takes | GET vms, median | min | max |\n|---|---|---|---|")
    for d in (float(x) for x in a.delays.split(",")):
        med, lo, hi = measure(d, a.runs)
        print(f"| +{d:g} s | {med:.3f} s | {lo:.3f} s | {hi:.3f} s |", flush=True)


if __name__ == "__main__":
    main()
