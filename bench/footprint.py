#!/usr/bin/env python3
"""Footprint of an idle cluster (issue 13 item 6): memory and CPU of each process.

3 candidates + 1 worker on loopback (tools/localcluster.py), PRODUCTION mode with fake
host commands, SPEC default timings (--fast: the test timings).  Once every node is
armed and one manager is agreed, waits --settle s, then measures over --seconds s: the
CPU time each agent and watchdog used (user + system, as % of one core) and their
resident set size at the end.  For scale, in the same run: a bare interpreter started
the way the agents are (same flags), and one that has imported what the agent imports.

    python3 bench/footprint.py [--seconds 60] [--settle 5] [--fast]

Linux reads /proc; elsewhere `ps -o rss=,time=`.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import hoster_ha  # noqa: E402
from localcluster import FAST, LocalCluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
IMPORTS = ("argparse, collections, concurrent.futures, email.utils, hashlib, hmac, http.client, "
           "http.server, ipaddress, json, logging.handlers, socket, subprocess, threading, "
           "urllib.parse")


def sample(pid):
    """(RSS in KiB, CPU seconds used so far) of pid, or (None, None)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return rss, (int(fields[11]) + int(fields[12])) / TICK   # utime, stime
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    try:   # FreeBSD: ps(1); time= is [dd-]hh:mm:ss.cc or mm:ss.cc
        out = subprocess.run(["ps", "-o", "rss=,time=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=5).stdout.split()
        secs = 0.0
        for part in out[1].replace("-", ":").split(":"):
            secs = secs * 60 + float(part)
        return int(out[0]), secs
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None, None


def reference(code):
    """RSS (KiB) of an interpreter, started with the agents' flags, after `code`."""
    argv = [sys.executable] + [f for f, on in (("-S", sys.flags.no_site),
                                               ("-I", sys.flags.isolated)) if on]
    p = subprocess.Popen(argv + ["-c", code + "\nimport sys, time\nprint(1, flush=True)\n"
                                 "time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        p.stdout.readline()
        return sample(p.pid)[0]
    finally:
        p.kill()
        p.wait()


def status(client, node, port):
    st, ans = client.request({"address": node.address, "port": port, "protocol": "http"},
                             "GET", "status", timeout=1.0)
    return ans if st == 200 and isinstance(ans, dict) else {}


def measure(timings, seconds, settle):
    """(bare RSS KiB, RSS KiB with the agent's imports, elapsed s, rows) where rows are
    (process, node, role, RSS KiB or None, CPU % of a core or None) of an idle cluster."""
    bare = reference("")
    # as the agent does: http.client without ssl (hoster_ha loads it for a tls section)
    stdlib = reference(f"import sys\nsys.modules['ssl'] = None\nimport {IMPORTS}")
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as base:
        cluster = LocalCluster(base, workers=1, timings=timings, debug=False)
        client = hoster_ha.Client(hoster_ha.load_config(cluster["node1"].config))
        try:
            cluster.start_all()
            views = {}

            def ready():
                views.update({n: status(client, cluster[n], cluster.port)
                              for n in cluster.nodes})
                managers = {v.get("manager") for v in views.values()}
                return all(v.get("armed") for v in views.values()) and len(managers) == 1 \
                    and None not in managers
            if not cluster.wait_for(ready, 120, interval=0.5):
                raise SystemExit(f"the cluster did not arm within 120 s: {views}")
            manager = next(iter(views.values()))["manager"]
            time.sleep(settle)
            procs = []
            for n in cluster.nodes:
                role = "manager" if n == manager else (
                    "candidate" if cluster[n].candidate else "worker")
                procs += [("hoster_ha", n, role, cluster[n].pid()),
                          ("ha_watchdog", n, role, cluster[n].pid("ha_watchdog"))]
            before = {pid: sample(pid)[1] for *_, pid in procs}
            t0 = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            after = {pid: sample(pid) for *_, pid in procs}
        finally:
            cluster.stop_all()
    rows = []
    for what, node, role, pid in procs:
        rss, cpu = after[pid]
        used = None if cpu is None or before[pid] is None else \
            (cpu - before[pid]) / elapsed * 100
        rows.append((what, node, role, rss, used))
    return bare, stdlib, elapsed, rows


def table(bare, stdlib, rows):
    """The markdown table of measure()'s figures."""
    out = ["| process | node | role | RSS | CPU, % of a core |", "|---|---|---|---|---|",
           f"| bare python3 | | | {bare / 1024:.1f} MiB | |",
           f"| python3 + the agent's imports | | | {stdlib / 1024:.1f} MiB | |"]
    for what, node, role, rss, used in rows:
        out.append(f"| {what} | {node} | {role} | "
                   f"{'n/a' if rss is None else f'{rss / 1024:.1f} MiB'} | "
                   f"{'n/a' if used is None else f'{used:.2f} %'} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--fast", action="store_true", help="the test timings (ping_interval 0.5)")
    a = p.parse_args()
    timings = dict(FAST) if a.fast else dict(hoster_ha.TIMINGS)
    bare, stdlib, elapsed, rows = measure(timings, a.seconds, a.settle)
    print(f"machine: {platform.node()} {platform.system()} {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"timings: {'test' if a.fast else 'SPEC defaults'} (ping_interval "
          f"{timings['ping_interval']:g} s); idle for {elapsed:.0f} s after arming; "
          f"interpreter flags: {'-S' if sys.flags.no_site else 'none'}")
    print()
    print(table(bare, stdlib, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
