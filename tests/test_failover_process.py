"""Process test of a whole failover (SPEC §3.3-§3.5): real agents, production mode, fakes.

3 candidates (127.0.0.1-3) and 2 workers (127.0.0.4-5) run in PRODUCTION mode with the
FAST timings (tools/localcluster.py); every host command is a fake
(tools/fake_host_cmd.py) that records itself in NODE/calls.log, so a "reboot" is one line
there and a "start" creates NODE/vmm/NAME.

worker1 runs 5 production VMs (parent_host worker1).  Their replicas sit on the other hosts
with snapshots of different ages, so each VM has its own expected target:

    vm-1  node1 (1h) beats worker2 (2h) and node2 (3h)
    vm-2  node2 (30min) beats node1 (2h); node3 holds a copy without a snapshot
    vm-3  node3 (1h) beats worker2 (4h)
    vm-4  worker2 (10min) beats node1 (1h) and node3 (5h)
    vm-5  node1 and node2 tie (same snapshot creation); node2 has more free memory
          (NODE/free_pages), and wins although node1 runs fewer VMs and sorts first

worker1's agent is SIGKILLed once all 5 nodes are armed; its watchdog fences it (fake
destroys).  Twice (issue 13 item 4):
  fence_confirmed  the watchdog confirms the fence (POST fenced) to the candidates and
                   reboots with `reboot -nq`; the manager starts every VM on its target at
                   once: kill -> last VM live within failover_time - 2*ping_interval;
  timeout          worker1's pkill fails, so its VM supervisors are not known stopped and
                   the fence is not confirmed (`shutdown -r now`); only after failover_time
                   does the manager start them: kill -> last VM live within failover_time +
                   2*ping_interval + 5 s, and nothing starts before failover_time -
                   2*ping_interval.
A third run hangs worker1 instead (agent and watchdog SIGSTOPped) and lets the manager
power it off with the fence command the candidates have for it (external fencing, issue 13
item 5).

Checked both times: each VM started exactly once cluster-wide, on its target, with
parent_host rewritten there (other keys kept); never live on two hosts at once (worker1's
copy counts as live until its fake destroy), every start after worker1's destroy of it.

Like the other process tests: the cluster lives in its own tmp folder, is stopped in a
finally (stop_all), and no process started for it may survive (checked via /proc); every
wait has a deadline.
"""

import json
import os
import signal
import sys
import time
import zlib

import pytest

import hoster_ha
import invariants
from localcluster import LocalCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NODES = ("node1", "node2", "node3", "worker1", "worker2")
DEAD = "worker1"
ARM_BOUND = 30.0        # start of the agents -> every node armed (slow 2-core machine)
NOW = 1_760_000_000     # snapshot creation times are relative to this
MIN, HOUR = 60, 3600

# vm: {host: [snapshot ages in seconds, oldest first]; [] = a copy without a snapshot}.
# worker1 (the dead host) holds the newest snapshot of each; it is never a target.
VMS = {
    "vm-1": {DEAD: [2 * HOUR, 5 * MIN], "node1": [2 * HOUR, 1 * HOUR], "worker2": [2 * HOUR],
             "node2": [3 * HOUR]},
    "vm-2": {DEAD: [10 * MIN], "node2": [2 * HOUR, 30 * MIN], "node1": [2 * HOUR],
             "node3": []},
    "vm-3": {DEAD: [1 * MIN], "node3": [1 * HOUR], "worker2": [4 * HOUR]},
    "vm-4": {DEAD: [2 * MIN], "worker2": [1 * HOUR, 10 * MIN], "node1": [1 * HOUR],
             "node3": [5 * HOUR]},
    "vm-5": {DEAD: [3 * MIN], "node1": [1 * HOUR], "node2": [1 * HOUR], "node3": [6 * HOUR]},
}
EXPECTED = {"vm-1": "node1", "vm-2": "node2", "vm-3": "node3", "vm-4": "worker2",
            "vm-5": "node2"}
FREE_PAGES = {"node2": 524288}  # 2 GiB free on node2; 1 GiB (the fake's default) elsewhere
EXTRA_RUNNING = {"node2": "vm-other"}  # node2 runs one more VM than node1 (not production)


def snap(vm, age):
    return (f"snap-{age}", NOW - age, str(zlib.crc32(f"{vm}@{age}".encode())))


def vm_config_path(node, vm):
    return os.path.join(node.dir, "vms", vm, "vm_config.json")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def live(node, vm):
    return os.path.exists(os.path.join(node.dir, "vmm", vm))




class Cluster(LocalCluster):
    """LocalCluster plus signed HTTP status queries and a strict teardown."""

    def __init__(self, base, **kw):
        super().__init__(str(base), **kw)
        self.client = hoster_ha.Client(hoster_ha.load_config(self["node1"].config))

    def http_status(self, name, timeout=1.0):
        node = self[name]
        status, answer = self.client.request(
            {"address": node.address, "port": self.port, "protocol": "http"}, "GET", "status",
            timeout=timeout)
        return answer if status == 200 and isinstance(answer, dict) else {}

    def armed_views(self):
        """True when every node says it is armed and every candidate's `GET members` reports
        all of them armed (a member killed before its armed ping reached the candidates is,
        by the rule, not failed over)."""
        if not all(self.http_status(n).get("armed") is True for n in NODES):
            return False
        for cand in ("node1", "node2", "node3"):
            node = self[cand]
            status, answer = self.client.request(
                {"address": node.address, "port": self.port, "protocol": "http"}, "GET",
                "members", timeout=1.0)
            if status != 200 or not isinstance(answer, dict):
                return False
            view = {m.get("hostname"): m for m in answer.get("members", [])
                    if isinstance(m, dict)}
            if not all(view.get(n, {}).get("armed") is True for n in NODES):
                return False
        return True

    def teardown(self):
        """stop_all(), reap our children, and make sure nothing started for us survives."""
        gone, left = super().teardown()
        assert gone and not left, f"processes survived stop_all(): {left}"


def build(base):
    c = Cluster(base, workers=2, debug=False)
    for vm, copies in VMS.items():
        for host, ages in copies.items():
            c[host].add_vm(vm, parent=DEAD, snapshots=[snap(vm, a) for a in ages],
                           running=host == DEAD)
            # keys the failover must keep when it rewrites parent_host
            path = vm_config_path(c[host], vm)
            cfg = read_json(path)
            cfg.update(cpus=2, os_type="debian12", description=f"{vm} copy on {host}")
            with open(path, "w") as f:
                json.dump(cfg, f)
    for host, vm in EXTRA_RUNNING.items():
        c[host].add_vm(vm, production=False, snapshots=[snap(vm, HOUR)], running=True)
    for host, pages in FREE_PAGES.items():
        with open(os.path.join(c[host].dir, "free_pages"), "w") as f:
            f.write(f"{pages}\n")
    # commands.notify (issue 14 item 4): every event as one JSON object on stdin, appended
    # to NODE/notified.jsonl
    for n in NODES:
        cfg = read_json(c[n].config)
        cfg["commands"]["notify"] = [
            sys.executable, "-c", "import sys; open(sys.argv[1], 'a').write("
            "sys.stdin.read().strip() + '\\n')", os.path.join(c[n].dir, "notified.jsonl")]
        with open(c[n].config, "w") as f:
            json.dump(cfg, f)
    return c


def notified(node):
    """The events node's notify command received ([] before the first)."""
    try:
        with open(os.path.join(node.dir, "notified.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("confirmed", [True, False], ids=["fence_confirmed", "timeout"])
def test_worker_kill_fails_its_vms_over_to_the_newest_snapshots(tmp_path, confirmed):
    c = build(tmp_path)
    t = c.timings
    ft, pi = t["failover_time"], t["ping_interval"]
    bound = ft - 2 * pi if confirmed else ft + 2 * pi + 5
    dead = c[DEAD]
    if not confirmed:   # a broken process table: the supervisors cannot be known stopped
        open(os.path.join(dead.dir, "pkill_fails"), "w").close()
    try:
        before = {vm: read_json(vm_config_path(c[h], vm)) for vm, h in EXPECTED.items()}
        t_start = time.time()
        c.start_all(list(NODES))
        armed = c.wait_for(c.armed_views, ARM_BOUND, interval=0.2)
        assert armed, f"not armed within {ARM_BOUND} s: { {n: c.http_status(n) for n in NODES} }"
        manager = c.http_status("node1").get("manager")
        assert manager in ("node1", "node2", "node3")
        assert all(live(dead, vm) for vm in VMS)

        t_kill = time.time()
        dead.proc.send_signal(signal.SIGKILL)
        assert dead.proc.wait(5) == -signal.SIGKILL

        def all_live():
            return all(live(c[h], vm) for vm, h in EXPECTED.items())
        ok = c.wait_for(all_live, bound + 10, interval=0.05)
        t_seen = time.time()
        where = {vm: [n for n in NODES if live(c[n], vm)] for vm in VMS}
        assert ok, (f"not every VM live on its target {t_seen - t_kill:.1f} s after the kill: "
                    f"{where}\nmanager log:\n{c[manager].log()[-4000:]}")

        # The job ends with the manager's confirmation of every VM; then no second start
        # may follow (a bounded wait for the bad thing).
        c.wait_for(lambda: all(f"VM {vm} is live on {h}" in c[manager].log()
                               for vm, h in EXPECTED.items()), 10, interval=0.1)
        c.wait_for(lambda: sum(len(c[n].starts(vm)) for n in NODES for vm in VMS) > len(VMS),
                   3 * pi, interval=0.1)

        # -- each VM started exactly once cluster-wide, on the host with its newest snapshot
        for vm, target in EXPECTED.items():
            counts = {n: len(c[n].starts(vm)) for n in NODES}
            assert counts == {n: int(n == target) for n in NODES}, (vm, counts)
        assert not any(live(dead, vm) for vm in VMS), os.listdir(os.path.join(dead.dir, "vmm"))
        for vm in VMS:
            assert [n for n in NODES if live(c[n], vm)] == [EXPECTED[vm]], (vm, where)
        for host, vm in EXTRA_RUNNING.items():
            assert live(c[host], vm) and all(len(c[n].starts(vm)) == 0 for n in NODES)

        # -- the manager's notify command got the failure and every move, each a JSON
        # object with the event's name, time, node, message and details
        assert c.wait_for(lambda: sum(e.get("event") == "vm_moved"
                                      for e in notified(c[manager])) >= len(VMS), 10)
        events = notified(c[manager])
        failed = [e for e in events if e.get("event") == "member_failed"]
        assert [e.get("host") or e.get("member") for e in failed] == [DEAD], failed
        moved = {e["vm_name"]: e["to_host"] for e in events if e.get("event") == "vm_moved"}
        assert moved == EXPECTED, events
        for e in failed + [e for e in events if e.get("event") == "vm_moved"]:
            assert e["node"] == manager and isinstance(e["time"], float) and e["message"], e

        # -- parent_host rewritten on the target, every other key kept
        for vm, target in EXPECTED.items():
            after = read_json(vm_config_path(c[target], vm))
            assert after == dict(before[vm], parent_host=target), (vm, before[vm], after)

        # -- each target's running record (state_dir/running.json) names the VM it took over:
        # a power loss of the target right after the failover must not lose it
        for vm, target in EXPECTED.items():
            rec = read_json(os.path.join(c[target].state_dir, "running.json"))
            assert vm in rec["vms"], (vm, target, rec)

        # -- worker1 fenced: each of its VMs destroyed there, then the fake reboot
        dead_calls = [(float(ts), rest) for ts, _, rest in
                      (ln.partition(" ") for ln in dead.calls().splitlines())]
        destroyed = {rest[len("bhyvectl --destroy --vm="):]: ts for ts, rest in dead_calls
                     if rest.startswith("bhyvectl --destroy --vm=")}
        assert sorted(destroyed) == sorted(VMS), dead_calls
        reboot = "reboot -nq" if confirmed else "shutdown -r now"
        reboots = [ts for ts, rest in dead_calls if rest == reboot]
        assert len(reboots) == 1 and reboots[0] >= max(destroyed.values()), dead_calls
        assert len([1 for _, rest in dead_calls if rest in ("reboot -nq", "shutdown -r now")]) \
            == 1, dead_calls
        said = ("fence confirmed to node" if confirmed else
                "fence not confirmed (the VM supervisors could not be stopped")
        assert said in dead.log(), dead.log()[-3000:]
        assert not any(rest.startswith("hoster vm start") for _, rest in dead_calls)

        # -- never live on two hosts at once: worker1's copy counted as live from before
        # the start until its fake destroy
        records = invariants.load({n: c[n].dir for n in NODES})
        records = [invariants.Record(t_start, DEAD, "start", vm, f"(setup) running {vm}")
                   for vm in sorted(VMS)] + records
        ivs = invariants.live_intervals(records)
        bad = invariants.overlaps(ivs)
        assert not bad, "\n".join(
            f"{vm} live on {a.host} and {b.host} at once ({lo - t_kill:+.3f}..{hi - t_kill:+.3f})"
            for vm, a, b, lo, hi in bad) + "\n" + invariants.format_timeline(records, t_kill)
        for vm, target in EXPECTED.items():
            (t_vm,) = c[target].starts(vm)
            assert t_vm > destroyed[vm], (vm, t_vm - destroyed[vm])

        # -- time from the kill to the last VM live
        last_start = max(c[h].starts(vm)[0] for vm, h in EXPECTED.items())
        took, took_seen = last_start - t_kill, t_seen - t_kill
        print(f"\nfailover: last VM live {took:.2f} s after the kill (seen by the poll at "
              f"{took_seen:.2f} s); failover_time {ft:g} s, bound {bound:g} s; manager "
              f"{manager}; fake reboot of {DEAD} {reboots[0] - t_kill:.2f} s after the kill")
        # Unconfirmed: the last ping of worker1 was sent before the kill: nothing may start
        # earlier than failover_time after it (at most one ping round before the kill).
        first_start = min(c[h].starts(vm)[0] for vm, h in EXPECTED.items())
        if not confirmed:
            assert first_start - t_kill >= ft - 2 * pi, first_start - t_kill
        how = [e.get("how") for e in failed]
        assert how == ["fence confirmed" if confirmed else "silent"], failed
        assert took_seen <= bound, \
            f"last VM live {took_seen:.2f} s after the kill; bound {bound:g} s"
    finally:
        c.teardown()


def test_a_hung_worker_is_powered_off_by_its_fence_command_and_failed_over_at_once(tmp_path):
    """External fencing (issue 13 item 5): the candidates' fence_commands give worker1 the
    fake `power off` (which kills its agent, watchdog, supervisors and VMs, then exits
    0).  worker1 hangs (agent and
    watchdog SIGSTOPped, its VMs still live): nothing fences it itself.  Once 2 views
    report it silent for survival_window, the manager runs the command, and every VM is
    live on its target well before failover_time, each started once, every start after
    the power off."""
    c = build(tmp_path)
    t = c.timings
    ft, pi, sw = t["failover_time"], t["ping_interval"], t["survival_window"]
    dead = c[DEAD]
    power = os.path.join(dead.dir, "bin", "power")
    for n in ("node1", "node2", "node3"):
        cfg = read_json(c[n].config)
        cfg["fence_commands"] = {DEAD: [power, "off", "bmc"]}
        with open(c[n].config, "w") as f:
            json.dump(cfg, f)
    try:
        c.start_all(list(NODES))
        armed = c.wait_for(c.armed_views, ARM_BOUND, interval=0.2)
        assert armed, f"not armed within {ARM_BOUND} s: { {n: c.http_status(n) for n in NODES} }"
        manager = c.http_status("node1").get("manager")
        t_hang = time.time()
        for which in ("ha_watchdog", "hoster_ha"):
            dead.signal(signal.SIGSTOP, which)
        assert all(live(dead, vm) for vm in VMS)

        def all_live():
            return all(live(c[h], vm) for vm, h in EXPECTED.items())
        ok = c.wait_for(all_live, ft, interval=0.05)
        took = time.time() - t_hang
        assert ok, f"not every VM live within {ft} s:\n{c[manager].log()[-4000:]}"
        assert took < ft - 2 * pi, f"{took:.1f} s: no faster than the timeout path"
        down = [float(ts) for ts, _, rest in (ln.partition(" ") for ln in
                                              dead.calls().splitlines())
                if rest.startswith("down power off bmc")]
        assert len(down) == 1 and down[0] - t_hang >= sw, (down, t_hang)
        for vm, target in EXPECTED.items():
            assert [s > down[0] for s in c[target].starts(vm)] == [True], (vm, target)
            assert sum(len(c[n].starts(vm)) for n in NODES) == 1
        assert not any(live(dead, vm) for vm in VMS)
        log = c[manager].log()
        assert f"member {DEAD} is silent for >= {sw:g} s on" in log and \
            f"member {DEAD} is powered off (its fence command exited 0" in log, log[-4000:]
        events = notified(c[manager])
        assert [e.get("member") for e in events if e.get("event") == "external_fence"] == [DEAD]
        failed = [e for e in events if e.get("event") == "member_failed"]
        assert [e.get("how") for e in failed] == ["fence confirmed"], failed
        print(f"\nexternal fence: last VM live {took:.2f} s after the hang (power off at "
              f"{down[0] - t_hang:.2f} s); failover_time {ft:g} s")
    finally:
        c.teardown()
