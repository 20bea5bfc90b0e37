#!/usr/bin/env python3
"""Watchdog fencing latency and footprint on a loopback cluster (production mode, fakes).

3 candidates + 1 worker (tools/localcluster.py, FAST timings), production mode, every host
command a fake that records itself in NODE/calls.log, so the "reboot" is one line there.
The worker runs two production VMs.  Over N runs:

  (a) SIGKILL the worker's armed agent and measure, from the kill (wall clock):
      - the EMERG reason line of its ha_watchdog (the log line's own timestamp),
      - the fake `shutdown -r now` (its calls.log timestamp: destroys done, reboot issued);
  (b) the resident set size of the worker's ha_watchdog.py (VmRSS in /proc/PID/status,
      else `ps -o rss=`) while the node is armed, next to its agent's for scale.

Prints a table.

    python3 bench/watchdog.py [--runs 5] [--vms 2]
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import hoster_ha  # noqa: E402
from footprint import sample  # noqa: E402  (RSS and CPU of a process)
from localcluster import FAST, LocalCluster  # noqa: E402


def log_time(line):
    """Wall-clock time of a log_file line ("2026-01-02T03:04:05.678 host tag[pid]: ...")."""
    stamp = line.split(" ", 1)[0]
    whole, _, ms = stamp.partition(".")
    return time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(ms or 0) / 1000


def http_status(client, node, port):
    st, ans = client.request({"address": node.address, "port": port, "protocol": "http"},
                             "GET", "status", timeout=0.5)
    return ans if st == 200 and isinstance(ans, dict) else {}


def one_run(vms):
    with tempfile.TemporaryDirectory(prefix="bench-watchdog-") as base:
        cluster = LocalCluster(base, workers=1, debug=False)
        worker = cluster["worker1"]
        for i in range(vms):
            worker.add_vm(f"vm{i}", snapshots=[("s1", 1700000000, str(i))], running=True)
        client = hoster_ha.Client(hoster_ha.load_config(worker.config))
        try:
            cluster.start_all()
            armed = cluster.wait_for(
                lambda: all(http_status(client, cluster[n], cluster.port).get("armed")
                            for n in cluster.nodes), 60, interval=0.1)
            if not armed:
                raise RuntimeError("the cluster did not arm within 60 s")
            agent, wd = worker.pid(), worker.pid("ha_watchdog")
            rss = (sample(wd)[0], sample(agent)[0])
            t_kill = time.time()
            worker.proc.kill()
            worker.proc.wait(5)
            emerg = f"EMERG: hoster_ha (PID {agent}) is gone, initiating fencing"

            def done():
                reboots = [ln for ln in worker.calls().splitlines()
                           if ln.split(" ", 1)[1:] == ["shutdown -r now"]]
                lines = [ln for ln in worker.log().splitlines() if emerg in ln]
                return (reboots[0], lines[0]) if reboots and lines else None
            got = cluster.wait_for(done, 30, interval=0.02)
            if not got:
                raise RuntimeError(f"no fence within 30 s:\n{worker.log()[-2000:]}")
            reboot_line, emerg_line = got
            t_reboot = float(reboot_line.split(" ", 1)[0])
            destroyed = sum(ln.split(" ", 1)[1].startswith("bhyvectl --destroy")
                            for ln in worker.calls().splitlines())
            if destroyed != vms:
                raise RuntimeError(f"{destroyed} destroys for {vms} VMs:\n{worker.calls()}")
            return log_time(emerg_line) - t_kill, t_reboot - t_kill, rss
        finally:
            cluster.stop_all()
            for node in cluster.nodes.values():
                if node.proc is not None and node.proc.poll() is None:
                    node.proc.kill()
                    node.proc.wait(5)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--vms", type=int, default=2, help="running production VMs on the worker")
    a = p.parse_args()
    to_emerg, to_reboot, wd_rss, agent_rss = [], [], [], []
    for _ in range(a.runs):
        e, r, (w, g) = one_run(a.vms)
        to_emerg.append(e)
        to_reboot.append(r)
        if w:
            wd_rss.append(w / 1024)
        if g:
            agent_rss.append(g / 1024)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print("timings: " + ", ".join(f"{k}={v:g}" for k, v in FAST.items()))
    print(f"cluster: 3 candidates + 1 worker, PRODUCTION mode, fake host commands; "
          f"the worker runs {a.vms} production VMs; watchdog_timeout = "
          f"{FAST['watchdog_timeout']:g} s (not used by this path: a dead PID is seen at once)")
    print(f"{'measure':46} {'runs':>4} {'median':>7} {'min':>7} {'max':>7}")
    rows = [("SIGKILL of armed agent -> watchdog EMERG (s)", to_emerg),
            ("SIGKILL of armed agent -> fake reboot (s)", to_reboot),
            ("ha_watchdog.py RSS while armed (MiB)", wd_rss),
            ("hoster_ha.py agent RSS, for scale (MiB)", agent_rss)]
    for name, xs in rows:
        if xs:
            print(f"{name:46} {len(xs):>4} {statistics.median(xs):7.2f} {min(xs):7.2f} "
                  f"{max(xs):7.2f}")
        else:
            print(f"{name:46} {0:>4} {'n/a':>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
