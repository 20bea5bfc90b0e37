#!/usr/bin/env python3
"""`make demo`: a hoster_ha cluster on loopback shows a failover.

Three candidates (127.0.0.1-3) and two workers (127.0.0.4-5) run in PRODUCTION mode,
but every host command (zfs, hoster, bhyvectl, shutdown, reboot, sysctl) is a fake
in the demo folder (tools/fake_host_cmd.py): a "reboot" only writes a line.  VMs are
replicated across hosts with snapshots of different ages.  The demo kills worker1's
agent with SIGKILL; its watchdog fences worker1 (fake destroy, fake reboot); after
failover_time the manager restarts worker1's production VMs on the hosts with the
newest snapshots.  It prints the timeline, the final `vms` table, the manager's
`status` and its /metrics cluster and protection series, then stops everything and
removes the folder (KEEP_DEMO=1 keeps it).
"""
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from localcluster import LocalCluster  # noqa: E402

NOW = int(time.time())
HOUR = 3600
# vm: (runs on, production, {host: snapshot ages in hours, newest last; [] = no snapshot})
VMS = {
    "vm-web": ("worker1", True, {"worker1": [3, 1], "node2": [3, 1], "node3": [3]}),
    "vm-db": ("worker1", True, {"worker1": [5, 2], "worker2": [5, 2], "node1": [5],
                                "node3": []}),
    "vm-test": ("worker1", False, {"worker1": [4], "node1": [4]}),
    "vm-mail": ("worker2", True, {"worker2": [2], "worker1": [2]}),
}
TIMELINE = re.compile(r"failed:|plan:|MOVING VM|is live on|started VM|EMERG|fence record|lock VM|"
                      r"destroy VM|reboot:|cannot fail over|not failed over")


def banner(text):
    print(f"\n=== {text} " + "=" * max(0, 72 - len(text)))


def timeline(cluster, since):
    rows = []
    for node in cluster.nodes.values():
        for line in node.log().splitlines():
            m = re.match(r"(\d{4}-\d\d-\d\dT[\d:]+\.\d+) (\S+) (\S+?)\[\d+\]: (.*)", line)
            if not m or not TIMELINE.search(m.group(4)):
                continue
            t = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S"))
            t += float("0." + m.group(1)[20:])
            if t >= since - 1:
                rows.append((t, m.group(2), m.group(3), m.group(4)))
    for t, host, tag, msg in sorted(rows):
        print(f"  +{t - since:6.2f}s  {host:8} {tag:12} {msg}")


def main():
    base = tempfile.mkdtemp(prefix="hoster_ha_demo.")
    cluster = LocalCluster(base, workers=2, debug=False)
    t = cluster.timings
    print(f"demo folder: {base}")
    print("timings: " + ", ".join(f"{k}={v:g}" for k, v in t.items()))
    for vm, (home, prod, copies) in VMS.items():
        for host, ages in copies.items():
            snaps = [(f"snap-{a}h", NOW - a * HOUR, f"{abs(hash((vm, a))) % 10**12}")
                     for a in ages]
            cluster[host].add_vm(vm, parent=home, production=prod, snapshots=snaps,
                                 running=host == home)
    names = list(cluster.nodes)
    try:
        banner("VMs and replicas (snapshot ages)")
        for vm, (home, prod, copies) in VMS.items():
            reps = ", ".join(f"{h}: {'/'.join(f'{a}h' for a in ages) or 'no snapshot'}"
                             for h, ages in copies.items())
            print(f"  {vm:8} runs on {home}, {'production' if prod else 'not production'}; {reps}")

        banner("starting 3 candidates and 2 workers (PRODUCTION mode, fake host commands)")
        for n in names:
            r = cluster[n].start(foreground=False)
            if r.returncode != 0:
                print(r.stdout, r.stderr)
                return 1
        if not cluster.wait_for(lambda: all(cluster[n].status().get("armed") for n in names), 30):
            print("the cluster did not arm within 30 s")
            return 1
        st = cluster["node1"].status()
        print(f"all 5 nodes armed; manager: {st['manager']} (term {st['term']})\n")
        print(cluster[st["manager"]].cli("status").stdout.rstrip() + "\n")
        print(cluster["node1"].cli("members").stdout.rstrip())

        banner("kill -9 worker1's agent")
        killed = time.time()
        cluster["worker1"].signal(signal.SIGKILL)

        def moved():
            return all(os.path.exists(os.path.join(cluster[h].dir, "vmm", vm))
                       for vm, h in (("vm-web", "node2"), ("vm-db", "worker2")))
        ok = cluster.wait_for(moved, t["failover_time"] + 30)
        print(f"{'failover complete' if ok else 'failover NOT complete'} "
              f"{time.time() - killed:.1f} s after the kill (failover_time "
              f"{t['failover_time']:g} s)")
        time.sleep(1)

        banner("timeline (seconds after the kill)")
        timeline(cluster, killed)
        banner("worker1's fake host commands (what a real host would have run)")
        for line in cluster["worker1"].calls().splitlines():
            if " zfs " not in line and " sysctl " not in line:
                print(f"  {line.split(' ', 1)[1]}")
        banner("hoster_ha.py vms (on node1)")
        print(cluster["node1"].cli("vms").stdout.rstrip())
        print("\nvm-web went to node2 (newest snapshot, 1h); vm-db to worker2 (2h, newer than "
              "node1's 5h; node3 has no snapshot);\nvm-test is not a production VM and stays "
              "down; vm-mail kept running on worker2.")
        manager = cluster["node1"].status().get("manager") or "node1"
        banner(f"hoster_ha.py status (on the manager, {manager}, after the failover)")
        print(cluster[manager].cli("status").stdout.rstrip())
        banner(f"GET /metrics (on {manager}; the cluster and protection series)")
        m = cluster[manager]
        try:
            with urllib.request.urlopen(f"http://{m.address}:{cluster.port}/metrics",
                                        timeout=5) as r:
                text = r.read().decode()
        except OSError as e:
            text = f"(unavailable: {e})"
        for line in text.splitlines():
            if re.match(r"hoster_ha_(members|vm_protected|vm_replica_age_seconds|unprotected_vms|"
                        r"fences_total|vm_starts_total|manager|term)\b", line):
                print(f"  {line}")
        return 0 if ok else 1
    finally:
        banner("hoster_ha.py terminate (on node1): every member leaves and stops")
        r = cluster["node1"].cli("terminate")
        print("\n".join("  " + ln[:110] for ln in (r.stdout + r.stderr).splitlines()))
        cluster.stop_all()
        if os.environ.get("KEEP_DEMO"):
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
