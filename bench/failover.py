#!/usr/bin/env python3
"""Failover latency on a loopback cluster (production mode, fake host commands).

3 candidates + 2 workers (tools/localcluster.py, FAST timings, max_parallel_starts 16 per target).
worker1 runs N production VMs; each has replicas on two other hosts, the newer one on
node1, node2, node3, worker2 in turn, so the starts go to 4 targets.  Every fake
`hoster vm start` takes --start-delay s (NODE/start_delay) before the VM exists.
worker1's agent is SIGKILLed once every candidate reports all 5 members armed; its
watchdog fences worker1 (fake destroys and reboot).  worker1's pkill fails, so the fence is
not confirmed and the manager waits failover_time (one_run(confirmed=True) measures the
confirmed fence instead).

Start point: the last successful ping of the dead host, read from the candidates right
after the kill (GET members: wall time of the request - `silence`; the latest of the 3
candidates).  End point: the manager's log line "VM NAME is live on HOST" of the last VM
(the target's answer to POST failover after it saw /dev/vmm/NAME).

    overhead  = end - last ping - failover_time      (what the failover adds)
    (kill)    = end - kill - failover_time           (the last ping is <= 1 ping_interval
                                                      before the kill; for comparison)

Where the time goes (manager's log, target's calls.log):
    detect    member_failed line - (last ping + failover_time)
    plan      member_failed -> last "plan:" line   (GET vms of every member, planning)
    repl      last "plan:" -> first "MOVING VM"     (plan replicated to a candidate)
    starts    first "MOVING VM" -> last "is live on"
    pre       median, per VM: "MOVING VM" -> the target's `pending hoster vm start`
              (POST failover sent, the target finds its copy, parent_host rewrite)
    post      median, per VM: the target's `hoster vm start` (VM exists) -> "is live on"

Each run also checks that every VM was started exactly once, on its expected target.

    python3 bench/failover.py [--sizes 1,10,100] [--runs 3] [--start-delay 0.2] [--sh-start] [--keep]
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import hoster_ha  # noqa: E402
from localcluster import FAST, LocalCluster  # noqa: E402

DEAD = "worker1"
CANDIDATES = ("node1", "node2", "node3")
TARGETS = ("node1", "node2", "node3", "worker2")
NOW = 1_760_000_000
LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3}) (\S+) hoster_ha\[\d+\]: "
                    r"\w+: (.*)$")


def log_lines(node):
    """[(wall time, message)] of the agent's lines in its log_file."""
    out = []
    for line in node.log().splitlines():
        m = LOG_RE.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
            out.append((t + int(m.group(2)) / 1000, m.group(4)))
    return out


def calls(node):
    out = []
    for line in node.calls().splitlines():
        ts, _, rest = line.partition(" ")
        out.append((float(ts), rest))
    return out


def request(cluster, client, name, what, timeout=1.0):
    node = cluster[name]
    st, ans = client.request({"address": node.address, "port": cluster.port,
                              "protocol": "http"}, "GET", what, timeout=timeout)
    return ans if st == 200 and isinstance(ans, dict) else {}


def armed_everywhere(cluster, client):
    """Every node armed, and every candidate's members view says so (a member killed
    before its armed ping arrived is, by the rule, not failed over)."""
    names = list(cluster.nodes)
    if not all(request(cluster, client, n, "status").get("armed") is True for n in names):
        return False
    for c in CANDIDATES:
        view = {m.get("hostname"): m for m in request(cluster, client, c, "members")
                .get("members", []) if isinstance(m, dict)}
        if not all(view.get(n, {}).get("armed") is True for n in names):
            return False
    return True


def last_ping(cluster, client):
    """Wall time of the dead host's last successful ping: the latest over the candidates
    of (request time - silence).  None if no candidate answered."""
    best = None
    for c in CANDIDATES:
        t0 = time.time()
        ans = request(cluster, client, c, "members")
        t1 = time.time()
        for m in ans.get("members", []):
            if isinstance(m, dict) and m.get("hostname") == DEAD:
                t = (t0 + t1) / 2 - m["silence"]
                best = t if best is None else max(best, t)
    return best


SH_START = """#!/bin/sh
# bench/failover.py --sh-start: `hoster vm start NAME` as a shell script (the Python fake
# costs ~0.2 s of CPU per call, which on 2 cores is what 100 starts queue for)
node=$(dirname "$(dirname "$0")")
[ "$1 $2" = "vm start" ] || exit 1
echo "$(date +%s.%N) pending hoster vm start $3" >> "$node/calls.log"
sleep {delay}
echo "$(date +%s.%N) hoster vm start $3" >> "$node/calls.log"
: > "$node/vmm/$3"
"""


def use_sh_start(cluster, delay):
    """Point every node's `vm_start` at a shell-script fake (same records, same delay)."""
    for node in cluster.nodes.values():
        script = os.path.join(node.dir, "bin", "hoster-start.sh")
        with open(script, "w") as f:
            f.write(SH_START.format(delay=delay))
        os.chmod(script, 0o755)
        with open(node.config) as f:
            cfg = json.load(f)
        cfg["commands"]["vm_start"] = [script, "vm", "start", "{vm}"]
        with open(node.config, "w") as f:
            json.dump(cfg, f, indent=2)


def build(base, n, start_delay, sh_start=False, timings=None, confirmed=False, config=None):
    cluster = LocalCluster(base, workers=2, debug=False, timings=timings)
    if sh_start:
        use_sh_start(cluster, start_delay)
    if not confirmed:   # its pkill fails: the fence is not confirmed, the timeout path
        open(os.path.join(cluster[DEAD].dir, "pkill_fails"), "w").close()
    if config:
        for node in cluster.nodes.values():
            with open(node.config) as f:
                cfg = json.load(f)
            cfg.update(config)
            with open(node.config, "w") as f:
                json.dump(cfg, f, indent=2)
    expected = {}
    for i in range(n):
        vm = f"vm-{i:03d}"
        best, other = TARGETS[i % 4], TARGETS[(i + 1) % 4]
        cluster[DEAD].add_vm(vm, snapshots=[("s3", NOW - 60, f"{i}3")], running=True)
        cluster[best].add_vm(vm, parent=DEAD, snapshots=[("s1", NOW - 7200, f"{i}1"),
                                                         ("s2", NOW - 600, f"{i}2")])
        cluster[other].add_vm(vm, parent=DEAD, snapshots=[("s1", NOW - 7200, f"{i}1")])
        expected[vm] = best
    for node in cluster.nodes.values():
        with open(os.path.join(node.dir, "start_delay"), "w") as f:
            f.write(f"{start_delay}\n")
    return cluster, expected


def one_run(n, start_delay, keep, sh_start=False, timings=None, confirmed=False, config=None):
    """One failover of n VMs (timings: FAST unless given); the figures of the table.
    confirmed: the watchdog's fence is confirmed (POST fenced) and the failover does not
    wait for failover_time; else the dead host's pkill fails, so it is not (the timeout
    path).  config: keys set in every node's config (e.g. start_confirm)."""
    base = tempfile.mkdtemp(prefix=f"bench-failover-{n}-")
    cluster, expected = build(base, n, start_delay, sh_start, timings, confirmed, config)
    ft = cluster.timings["failover_time"]
    client = hoster_ha.Client(hoster_ha.load_config(cluster["node1"].config))
    try:
        cluster.start_all()
        if not cluster.wait_for(lambda: armed_everywhere(cluster, client), 60, interval=0.2):
            raise RuntimeError("the cluster did not arm within 60 s")
        if confirmed:   # a manager acts only after its new-manager wait (SPEC §3.2)
            t = cluster.timings
            wait = t["watchdog_timeout"] + t["fence_timeout"] + 2 * t["ping_interval"]
            if not cluster.wait_for(lambda: any(
                    (request(cluster, client, c, "status").get("manager_for_s") or 0) > wait
                    for c in CANDIDATES), wait + 30, interval=0.2):
                raise RuntimeError("no manager past its new-manager wait")
        dead = cluster[DEAD]
        t_kill = time.time()
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait(5)
        time.sleep(0.5)  # let an in-flight request to a candidate settle
        t_ping = last_ping(cluster, client)
        if t_ping is None:
            raise RuntimeError("no candidate answered GET members")

        def all_live():
            return all(os.path.exists(os.path.join(cluster[h].dir, "vmm", vm))
                       for vm, h in expected.items())
        if not cluster.wait_for(all_live, ft + 60 + 2 * n, interval=0.1):
            raise RuntimeError(f"not every VM live {time.time() - t_kill:.0f} s after the kill")

        def manager_done():
            for c in CANDIDATES:
                lines = log_lines(cluster[c])
                live = {m.split()[1] for _, m in lines if re.match(r"VM \S+ is live on ", m)}
                if live >= set(expected):
                    return c, lines
            return None
        got = cluster.wait_for(manager_done, 30, interval=0.2)
        if not got:
            raise RuntimeError("no manager logged every VM live")
        manager, lines = got
        t_fail = min(t for t, m in lines if m.startswith(f"member {DEAD} failed"))
        t_plans = [t for t, m in lines if m.startswith("plan: VM ")]
        moving = {m.split()[2]: t for t, m in lines if m.startswith("MOVING VM: ")}
        live = {}
        for t, m in lines:
            if re.match(r"VM \S+ is live on ", m):
                live.setdefault(m.split()[1], t)
        # every VM started once, on its target; the target's own command times
        pending, started = {}, {}
        for name, node in cluster.nodes.items():
            for t, c in calls(node):
                parts = c.split()
                if parts[:4] == ["pending", "hoster", "vm", "start"]:
                    pending[parts[4]] = t
                elif parts[:3] == ["hoster", "vm", "start"]:
                    if parts[3] in started:
                        raise RuntimeError(f"{parts[3]} started twice")
                    started[parts[3]] = (t, name)
        wrong = {vm: started.get(vm) for vm, h in expected.items()
                 if started.get(vm, (0, None))[1] != h}
        if wrong:
            raise RuntimeError(f"VMs not started once on their targets: {wrong}")
        end = max(live[vm] for vm in expected)
        reboot = min((t for t, c in calls(cluster[DEAD]) if c.startswith(("reboot", "shutdown"))),
                     default=None)
        return {
            "kill_to_live": end - t_kill,
            "fence": None if reboot is None else reboot - t_kill,
            "failed_after_fence": None if reboot is None else t_fail - reboot,
            "overhead": end - t_ping - ft,
            "overhead_kill": end - t_kill - ft,
            "ping_before_kill": t_kill - t_ping,
            "detect": t_fail - (t_ping + ft),
            "plan": max(t_plans) - t_fail,
            "repl": min(moving.values()) - max(t_plans),
            "starts": end - min(moving.values()),
            "pre": statistics.median(pending[vm] - moving[vm] for vm in expected),
            "post": statistics.median(live[vm] - started[vm][0] for vm in expected),
            "manager": manager,
        }
    finally:
        gone, left = cluster.teardown()
        if not gone:
            print(f"warning: processes survived stop_all(): {left}; killed", file=sys.stderr)
        if keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,10,100", help="production VMs on the dead worker")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--start-delay", type=float, default=0.2,
                   help="seconds a fake `hoster vm start` takes")
    p.add_argument("--sh-start", action="store_true",
                   help="a shell-script fake `hoster vm start` instead of the Python one")
    p.add_argument("--keep", action="store_true", help="keep each run's folder")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    results = {}
    for n in sizes:
        for i in range(a.runs):
            t0 = time.monotonic()
            r = one_run(n, a.start_delay, a.keep, a.sh_start)
            results.setdefault(n, []).append(r)
            print(f"{n:4} VMs run {i + 1}: overhead {r['overhead']:6.2f} s (kill-based "
                  f"{r['overhead_kill']:6.2f} s; last ping {r['ping_before_kill']:.2f} s before "
                  f"the kill), plan {r['plan']:.2f} s, starts {r['starts']:.2f} s, manager "
                  f"{r['manager']}; run took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print("timings: " + ", ".join(f"{k}={v:g}" for k, v in FAST.items()))
    print(f"cluster: 3 candidates + 2 workers, PRODUCTION mode, fake host commands; "
          f"max_parallel_starts 16 per target; a fake `hoster vm start` "
          f"({'shell script' if a.sh_start else 'Python'}) takes {a.start_delay:g} s; "
          f"targets node1, node2, node3, worker2 in turn")
    print("overhead = manager's last 'VM is live' line - dead host's last successful ping "
          "(candidates' GET members silence) - failover_time; (kill) uses the SIGKILL "
          "time instead of the last ping")
    cols = [("overhead", "overhead"), ("overhead_kill", "(kill)"), ("detect", "detect"),
            ("plan", "plan"), ("repl", "repl"), ("starts", "starts"), ("pre", "pre"),
            ("post", "post")]
    head = f"{'VMs':>4} {'runs':>4} {'overhead med':>12} {'max':>6} " + \
        " ".join(f"{h:>7}" for _, h in cols[1:])
    print(head)
    print(f"{'':>4} {'':>4} {'(s)':>12} {'(s)':>6} " +
          " ".join(f"{'med (s)':>7}" for _ in cols[1:]))
    for n, rs in results.items():
        ov = [r["overhead"] for r in rs]
        print(f"{n:>4} {len(rs):>4} {statistics.median(ov):12.2f} {max(ov):6.2f} " +
              " ".join(f"{statistics.median(r[k] for r in rs):7.2f}" for k, _ in cols[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
