"""A real Hoster host (issue 11, items 2.1, 2.3, 2.4, 2.11): starts that fail late, locked
datasets at boot, readiness, and the cost of the periodic inventory.

Pure tests of the rules (hoster_ha's pure functions and Core) come first; then process
tests: real agents in PRODUCTION mode on loopback with the fake host commands
(tools/fake_host_cmd.py and its knobs, set through tools/localcluster.py), FAST timings,
every wait bounded by a deadline, and a teardown that leaves no process behind.
"""

import json
import os
import re
import time
import zlib

import invariants
from localcluster import DATASET, FAST, LocalCluster

import hoster_ha
from hoster_ha import (
    Core,
    FailoverTarget,
    Rejoin,
    absence_verdict,
    command_text,
    demotion_steps,
    failed_start_parent,
    parse_config,
    start_verdict,
)

ARM_BOUND = 30.0
NOW = 1_760_000_000
MIN, HOUR = 60, 3600
CANDS = [{"hostname": h, "address": f"127.0.0.{i}", "port": 9100, "protocol": "http"}
         for i, h in enumerate(("a", "b", "c"), 1)]
SECRET = "0123456789abcdef0123"
SPEC_TIMINGS = {"ping_interval": 2, "ping_timeout": 1.5, "survival_window": 10,
                "vote_lease": 6, "watchdog_timeout": 10, "fence_timeout": 10,
                "failover_time": 60}


def cfg(host="w", **extra):
    data = {"candidates": CANDS, "hostname": host, "secret": SECRET, **SPEC_TIMINGS}
    if host not in ("a", "b", "c"):
        data.update(address="127.0.0.9", port=9100)
    data.update(extra)
    return parse_config(data, "<test>")


def fo(uid="u1", name="vm1", src="w1", term=5):
    return {"vm_name": name, "from_host": src, "term": term, "uid": uid}


def armed(host="w2", **extra):
    w = Core(cfg(host, **extra), 4100, 0.0)
    w.link.armed = True
    return w


# =============================================================================
# Pure rules
# =============================================================================

# -- item 2.4: a start is confirmed, not assumed ------------------------------------------

def test_start_verdict_needs_the_vm_present_for_the_whole_confirmation():
    # not there yet, before the deadline: wait; at the deadline: failed
    assert start_verdict(1.0, 10.0, 3, None, None) == ("wait", None)
    verdict, why = start_verdict(10.0, 10.0, 3, None, None)
    assert verdict == "failed" and "did not appear" in why
    # seen at 2: waits until 5, then ok
    assert start_verdict(4.9, 10.0, 3, 2.0, None) == ("wait", None)
    assert start_verdict(5.0, 10.0, 3, 2.0, None) == ("ok", None)
    # appeared just before the deadline: the confirmation still runs past it
    assert start_verdict(11.0, 10.0, 3, 9.5, None) == ("wait", None)
    # appeared and vanished (bhyve died) within the confirmation: failed at once
    verdict, why = start_verdict(3.1, 10.0, 3, 2.0, 3.0)
    assert verdict == "failed" and "vanished 1.0 s" in why


def test_absence_verdict_gives_up_as_unknown_never_as_a_plain_failure():
    assert absence_verdict(1.0, 0.5, 3, 20.0) == "wait"
    assert absence_verdict(3.5, 0.5, 3, 20.0) == "confirmed"
    assert absence_verdict(19.0, None, 3, 20.0) == "wait"       # present: keep trying
    assert absence_verdict(20.0, None, 3, 20.0) == "unknown"
    assert absence_verdict(20.0, 18.0, 3, 20.0) == "unknown"    # absent too briefly


def test_failed_start_parent_never_leaves_the_target_as_parent():
    assert failed_start_parent("w1", "w2", "w1") == "w1"          # the usual replica
    assert failed_start_parent("__HA_LOCKED_x__", "w2", "w1") == "__HA_LOCKED_x__"
    assert failed_start_parent("w3", "w2", "w1") == "w3"          # a demoted backup
    assert failed_start_parent("w2", "w2", "w1") == "w1"          # claimed us: the source
    assert failed_start_parent(None, "w2", "w1") == "w1"
    assert failed_start_parent("w2", "w2", "w2") is None          # back home: lock it


def test_command_text_strips_ansi_and_reads_stdout_and_stderr():
    out = "\x1b[38;5;1m 🚫 ERROR: 🕔 2026-01-01: 📄 cannot start a backup VM\x1b[0m\n"
    assert command_text(out, "") == "🚫 ERROR: 🕔 2026-01-01: 📄 cannot start a backup VM"
    assert command_text("a\nb\n", "c\n") == "b / c"
    assert command_text("", "") == "no output"


def test_start_answer_timeout_covers_start_and_both_confirmations():
    c = cfg(start_timeout=40, start_confirm=5, fence_timeout=10, failover_time=60)
    assert FailoverTarget.start_answer_timeout(c) >= 40 + 2 * 5
    # the manager's POST failover carries it as its timeout
    assert FailoverTarget.start_answer_timeout(cfg()) >= 60 + 2 * 3


def test_target_entry_says_what_to_restore_and_unknown_keeps_the_vm_busy():
    w = armed()
    status, entry = w.handle_failover(fo(), 1.0, {"live": False, "parent_host": "w1"})
    assert status == "start" and entry["restore_parent"] == "w1"
    # the cleanup could not confirm the VM gone: 409 with live (the manager waits), and
    # the VM keeps counting as live here (GET vms lists it as starting)
    status, ans = w.finish_failover("u1", False, "it vanished", 2.0, unknown=True)
    assert status == 409 and ans["live"] is True
    assert w.starting() == {"vm1"} and "vm1" in w.fence_ours(set())
    status, ans = w.handle_failover(fo(), 3.0, {"live": False, "parent_host": "w1"})
    assert status == 409 and ans["live"] is True
    status, ans = w.handle_failover(dict(fo(), check=True), 3.0, None)
    assert status == 200 and ans["state"] == "unknown"
    assert set(w.unresolved_starts()) == {"u1"}
    # confirmed gone later: an ordinary failure from then on
    w.finish_failover("u1", False, "it vanished (confirmed gone later)", 4.0)
    assert w.starting() == set() and w.unresolved_starts() == {}
    status, ans = w.handle_failover(fo(), 5.0, {"live": False, "parent_host": "w1"})
    assert status == 409 and "live" not in ans


def test_manager_keeps_a_plan_planned_while_the_target_says_starting_or_unknown():
    m = Core(cfg("a"), 1000, 0.0)
    e = {"vm": "vm1", "from": "w1", "to": "w2", "term": 3, "uid": "p1", "state": "planned",
         "seq": 1}
    m.plans["p1"] = dict(e)
    for state in ("starting", "unknown"):
        m.manager._on_check(("check", "p1"), 200, {"known": True, "state": state}, 1.0)
        assert m.plans["p1"]["state"] == "planned", state
    m.manager._on_check(("check", "p1"), 200, {"known": True, "state": "live"}, 2.0)
    assert m.plans["p1"]["state"] == "done"


# -- item 2.1: locked, unmounted or missing datasets ---------------------------------------

def test_dataset_states_reads_zfs_get():
    out = ("tank/a\tmounted\tyes\ntank/a\tkeystatus\tavailable\n"
           "tank/b\tmounted\tno\ntank/b\tkeystatus\tunavailable\n"
           "tank/c\tmounted\tno\ntank/c\tkeystatus\t-\n"
           "tank/d\tmounted\tyes\ntank/d\tkeystatus\t-\n")
    err = "cannot open 'tank/e': dataset does not exist\n"
    st = hoster_ha.dataset_states(["tank/a", "tank/b", "tank/c", "tank/d", "tank/e"], 1, out,
                                  err)
    assert st["tank/a"] is None and st["tank/d"] is None
    assert st["tank/b"].startswith("locked")
    assert st["tank/c"].startswith("not mounted")
    assert st["tank/e"].startswith("missing") and "does not exist" in st["tank/e"]
    assert hoster_ha.dataset_states(["x"], None, "", "timed out")["x"].startswith(
        "zfs get failed")


def test_demotion_is_deferred_while_a_dataset_is_unavailable():
    moved = {"vm1": "node2", "vm2": "node3"}
    local = {"vm2": {"parent_host": "w1", "live": False}}
    assert demotion_steps(local, moved, False) == [("vm1", "node2", "absent"),
                                                   ("vm2", "node3", "demote")]
    assert demotion_steps(local, moved, False, {"tank/enc": "locked"}) == \
        [("vm1", "node2", "deferred"), ("vm2", "node3", "demote")]


def test_core_arms_with_a_deferred_demotion_and_retries_it_when_the_dataset_is_back():
    w = Core(cfg("w1"), 4100, 0.0)
    assert Rejoin.demote_retry({"tank/enc"}, {}) is True
    assert Rejoin.demote_retry({"tank/enc"}, {"tank/enc": "locked"}) is False
    w.link.registered = {c: True for c in w.link.registered}
    w.rejoin.moved = {"vm1": ((3, 1), "node2"), "vm2": ((3, 2), "node3")}
    w.tick(1.0)
    asked = [a for a in w.take_actions() if a["kind"] == "demote"]
    assert asked and asked[0]["vms"] == {"vm1": "node2", "vm2": "node3"}
    locked = {"tank/enc": "locked (keystatus unavailable)"}
    w.demote_done({"vm2": "node3"}, {"vm1": "node2"}, locked, 1.5)
    assert w.status(2.0)["demotion_pending"] == {"vm1": "node2"}
    assert w.status(2.0)["datasets_unavailable"] == locked
    events = [a for a in w.take_actions() if a["kind"] == "event"]
    assert [e["event"] for e in events].count("dataset_unavailable") == 1
    # nothing is asked again while the dataset stays locked (logged once per change)
    for t in (2.0, 2.5, 3.0):
        w.set_datasets(locked, t)
        w.tick(t)
    acts = w.take_actions()
    assert not [a for a in acts if a["kind"] == "demote" or
                a.get("event") == "dataset_unavailable"], acts
    # the deferred demotion does not keep the node from arming: only vm1 is pending
    assert set(w.demotion_pending()) == {"vm1"}
    # unlocked: the next tick asks for the demotion again
    w.set_datasets({}, 3.5)
    w.tick(3.6)
    acts = w.take_actions()
    assert [a["vms"] for a in acts if a["kind"] == "demote"] == [{"vm1": "node2"}]
    assert any(a.get("event") == "dataset_available" for a in acts)
    w.demote_done({"vm1": "node2"}, {}, {}, 3.7)
    assert w.demotion_pending() == {} and w.rejoin.demote_deferred == {}
    # an observation older than the last one changes nothing
    w.set_datasets(locked, 3.0)
    assert w.rejoin.datasets_unavailable == {}


def test_arming_waits_for_demotions_but_not_for_deferred_ones():
    def node(deferred):
        w = Core(cfg("w1"), 4100, 0.0)
        w.link.registered = {c: True for c in w.link.registered}
        w.rejoin.moved = {"vm1": ((3, 1), "node2")}
        if deferred:
            w.demote_done({}, {"vm1": "node2"}, {"tank/enc": "locked"}, 0.5)
        for c in w.candidates:    # quorum and a manager seen
            w.on_ping_result(c, 0.9, 200, {"vote": "a", "vote_startup_time": 1,
                                           "vote_term": 1, "vote_lease_ms": 6000,
                                           "manager": "a", "term": 1}, 1.0)
        w.tick(1.0)
        return w
    assert node(deferred=False).arming is False
    w = node(deferred=True)
    assert w.arming is True and w.demotion_pending() == {"vm1": "node2"}


# -- item 2.3: ready to be a target ---------------------------------------------------------

def test_a_target_not_ready_refuses_before_touching_the_copy():
    w = armed()
    status, ans = w.handle_failover(fo(), 1.0, {"live": False, "parent_host": "w1"},
                                    ["Hoster not initialised (no /var/run/hoster_init)"])
    assert status == 409 and "not ready to start VM vm1: Hoster not initialised" in \
        ans["error"]
    assert w.failovers == {}


def test_readiness_in_ping_status_and_member_table():
    w = Core(cfg("w1"), 4100, 0.0)
    assert w.link.ping_body(1.0)["ready"] is True
    w.set_host_readiness(["Hoster not initialised (no /x)"])
    w.set_datasets({"tank/enc": "locked"}, 1.0)
    body = w.link.ping_body(2.0)
    assert body["ready"] is False and body["not_ready"] == [
        "Hoster not initialised (no /x)", "dataset tank/enc unavailable: locked"]
    assert w.not_ready_reasons("tank/plain") == ["Hoster not initialised (no /x)"]
    st = w.status(2.0)
    assert st["ready"] is False and len(st["not_ready"]) == 2
    events = [a["event"] for a in w.take_actions() if a["kind"] == "event"]
    assert events.count("not_ready") == 1
    w.set_host_readiness(["Hoster not initialised (no /x)"])    # no change: no event
    assert not [a for a in w.take_actions() if a.get("event") == "not_ready"]
    # a candidate keeps what the member's pings say
    a = Core(cfg("a"), 1000, 0.0)
    a.handle_register(w.link.register_body(), 1.0)
    assert a.handle_ping(body, 2.0)[0] == 200
    view = {m["hostname"]: m for m in a.table.members_view(2.0)}["w1"]
    assert view["ready"] is False and view["not_ready"] == body["not_ready"]
    assert {m["hostname"]: m for m in a.table.member_list(2.0)}["w1"]["ready"] is False


def test_planner_skips_a_copy_that_is_not_ready():
    def inv(host, creation, ready=True):
        return {"host": {"hostname": host, "free_memory": 1, "running_vms": 0,
                         "ready": ready,
                         "not_ready": [] if ready else ["Hoster not initialised"]},
                "vms": [{"vm_name": "vm1", "production": True, "live": False,
                         "state": "stopped", "parent_host": "w1", "ready": ready,
                         "latest_snapshot": {"name": "s", "creation": creation, "guid": "1"}}]}
    invs = {h: hoster_ha.clean_inventory(i) for h, i in
            (("n2", inv("n2", 200, ready=False)), ("n3", inv("n3", 100)))}
    moves, unplaced = hoster_ha.plan_failover({"w1": set()}, invs, {"n2": True, "n3": True})
    assert moves == [("vm1", "w1", ["n3"])] and unplaced == []
    invs.pop("n3")
    moves, unplaced = hoster_ha.plan_failover({"w1": set()}, invs, {"n2": True})
    assert moves == [] and "not ready" in unplaced[0][2]


# =============================================================================
# Process tests
# =============================================================================

def snap(vm, age):
    return (f"snap-{age}", NOW - age, str(zlib.crc32(f"{vm}@{age}".encode())))


def live(node, vm):
    return os.path.exists(os.path.join(node.dir, "vmm", vm))




def parent_of(node, vm, dataset=DATASET):
    path = os.path.join(node.host.vm_dir(vm, dataset), "vm_config.json")
    with open(path) as f:
        return json.load(f).get("parent_host")


class Cluster(LocalCluster):
    def __init__(self, base, **kw):
        super().__init__(str(base), **kw)
        self.client = hoster_ha.Client(hoster_ha.load_config(self["node1"].config))

    def get(self, name, what, timeout=2.0):
        node = self[name]
        status, answer = self.client.request(
            {"address": node.address, "port": self.port, "protocol": "http"}, "GET", what,
            timeout=timeout)
        return answer if status == 200 and isinstance(answer, dict) else {}

    def armed(self, names):
        """Every node says it is armed, and every candidate's table says so too (the
        candidates learn it from the node's next ping; a member failed before that
        counts as unarmed and its VMs are not moved)."""
        status = {n: self.get(n, "status") for n in names}
        if not all(s.get("armed") is True for s in status.values()):
            return False
        for n in names:
            if n.startswith("node"):
                table = {m.get("hostname"): m.get("armed")
                         for m in status[n].get("members") or []}
                if not all(table.get(h) is True for h in names):
                    return False
        return True

    def manager(self):
        return self.get("node1", "status").get("manager")

    def teardown(self):
        gone, left = super().teardown()
        assert gone and not left, f"processes survived: {left}"


def test_failed_starts_end_live_once_on_the_next_target(tmp_path):
    """Issue 11 item 2.4: worker1 loses power.  Its VMs' newest replicas are on node2,
    whose starts fail late: vm1 appears and dies 1 s later (inside start_confirm 2 s);
    vm2's supervisor would create it only 6 s after `hoster vm start` returned 0, after
    start_timeout (3 s) has passed and the failure was reported.  node2 kills the
    supervisor, destroys what exists, sets the copies' parent_host back to worker1 and
    sees them stay absent before it answers; the manager then starts both on node3.
    Each VM ends live exactly once, on node3, and never on two hosts at once."""
    timings = dict(FAST, start_confirm=2, start_timeout=3)
    c = Cluster(tmp_path, workers=1, debug=False, timings=timings)
    nodes = ("node1", "node2", "node3", "worker1")
    for vm in ("vm1", "vm2"):
        c["worker1"].add_vm(vm, snapshots=[snap(vm, 5 * MIN)], running=True)
        c["node2"].add_vm(vm, parent="worker1", snapshots=[snap(vm, HOUR)])
        c["node3"].add_vm(vm, parent="worker1", snapshots=[snap(vm, 2 * HOUR)])
    c["node2"].set_start("vm1", dies_after=1)
    c["node2"].set_start("vm2", appear_after=6)
    try:
        t0 = time.time()
        c.start_all(nodes)
        assert c.wait_for(lambda: c.armed(nodes), ARM_BOUND, interval=0.2), \
            {n: c.get(n, "status") for n in nodes}
        t_off = time.time()
        assert c["worker1"].power_off().returncode == 0
        bound = timings["failover_time"] + 2 * FailoverTarget.start_answer_timeout(
            hoster_ha.load_config(c["node1"].config)) + 10

        def both_moved():
            m = c.manager()
            return m and all(f"VM {vm} is live on node3" in c[m].log() for vm in ("vm1", "vm2"))
        ok = c.wait_for(both_moved, bound, interval=0.2)
        m = c.manager()
        assert ok, (c[m].log()[-5000:] if m else "no manager") + "\nnode2:\n" + \
            c["node2"].log()[-3000:]
        # the late VM's supervisor would have created it 6 s after its start: wait past
        # that, then nothing may have appeared on node2
        pending = [float(ln.split()[0]) for ln in c["node2"].calls().splitlines()
                   if ln.split()[1:] == ["pending", "hoster", "vm", "start", "vm2"]]
        assert len(pending) == 1, c["node2"].calls()
        c.wait_for(lambda: time.time() > pending[0] + 6.5, 10, interval=0.2)
        assert c["node2"].supervisors() == {}
        log2 = c["node2"].log()
        assert "appeared and vanished" in log2 and "did not appear within 3 s" in log2, log2
        for vm in ("vm1", "vm2"):
            counts = {n: len(c[n].starts(vm)) for n in nodes}
            assert counts["node3"] == 1 and counts["worker1"] == 0, (vm, counts)
            assert [n for n in nodes if live(c[n], vm)] == ["node3"], vm
            # node2's copy is a backup of worker1 again, not node2's
            assert parent_of(c["node2"], vm) == "worker1"
            assert parent_of(c["node3"], vm) == "node3"
        assert len(c["node2"].starts("vm1")) == 1      # it appeared, and died
        assert c["node2"].starts("vm2") == []          # never: its supervisor was killed
        assert "pkill -9 -f /vm_supervisor_service for vm2$" in c["node2"].calls()
        records = invariants.load({n: c[n].dir for n in nodes})
        records = [invariants.Record(t0, "worker1", "start", vm, f"(setup) running {vm}")
                   for vm in ("vm1", "vm2")] + records
        bad = invariants.overlaps(invariants.live_intervals(records))
        assert not bad, invariants.format_timeline(records, t_off)
        # the manager tried node2 first, then the next best target
        mlog = c[m].log()
        assert re.search(r"start of VM vm1 on node2 failed .*trying the next best target "
                         r"node3", mlog), mlog[-4000:]
    finally:
        c.teardown()


def test_power_loss_then_locked_dataset_then_start_all_starts_nothing_running_elsewhere(
        tmp_path):
    """Issue 11 item 2.1, end to end: worker1 loses power; its VM vm1 is moved to node2.
    worker1 boots with its encrypted dataset locked (keylocation=prompt) and without
    `hoster init`; its agent starts: vm1's copy is invisible, so the demotion is deferred
    (status says which dataset, why, and what waits) and the node arms anyway.  The
    operator unlocks the dataset and runs `hoster init`; two ping_intervals later
    `hoster vm start-all` starts nothing: vm1's copy names node2 by then."""
    c = Cluster(tmp_path, workers=1, debug=False)
    nodes = ("node1", "node2", "node3", "worker1")
    w1 = c["worker1"]
    pi = c.timings["ping_interval"]
    w1.add_vm("vm1", snapshots=[snap("vm1", 5 * MIN)], running=True)
    c["node2"].add_vm("vm1", parent="worker1", snapshots=[snap("vm1", HOUR)])
    try:
        c.start_all(nodes)
        assert c.wait_for(lambda: c.armed(nodes), ARM_BOUND, interval=0.2)
        # the passphrase is asked at boot from now on: a reboot leaves the dataset locked
        assert w1.zfs("set", "keylocation=prompt", DATASET).returncode == 0
        assert w1.power_off().returncode == 0
        w1.proc.wait(5)
        bound = c.timings["failover_time"] + 30

        def moved():
            m = c.manager()
            return m and "VM vm1 is live on node2" in c[m].log()
        assert c.wait_for(moved, bound, interval=0.2), c["node1"].log()[-3000:]

        assert w1.power_on().returncode == 0
        assert w1.zfs("get", "-H", "-o", "value", "keystatus", DATASET).stdout.strip() == \
            "unavailable"
        assert not os.path.exists(w1.init_marker)
        w1.start()

        def waiting():
            st = c.get("worker1", "status")
            return st.get("armed") and DATASET in (st.get("datasets_unavailable") or {}) \
                and st.get("demotion_pending") == {"vm1": "node2"} and st
        st = c.wait_for(waiting, ARM_BOUND, interval=0.2)
        assert st, (c.get("worker1", "status"), w1.log()[-3000:])
        assert "locked" in st["datasets_unavailable"][DATASET]
        text = w1.cli("status").stdout
        assert f"{DATASET} UNAVAILABLE (locked" in text and \
            "Demotion pending: vm1 (moved to node2)" in text, text
        inv = c.get("worker1", "vms", timeout=10)
        assert inv["host"]["datasets_unavailable"].keys() == {DATASET}
        assert inv["host"]["demotion_pending"] == {"vm1": "node2"}
        # the warning is logged once, not every inventory or check
        assert w1.log().count(f"dataset {DATASET} is unavailable") == 1

        # the operator: zfs mount -a -l, hoster init, waits 2 ping_intervals, start-all
        w1.unlock_dataset()
        t_unlock = time.time()
        w1.set_initialised(True)
        c.wait_for(lambda: time.time() >= t_unlock + 2 * pi, 5, interval=0.05)
        r = w1.hoster("vm", "start-all")
        assert r.returncode == 0, r
        assert w1.starts("vm1") == [], w1.calls()[-2000:]
        assert not live(w1, "vm1") and live(c["node2"], "vm1")
        assert parent_of(w1, "vm1") == "node2"
        assert "demote VM vm1 to a backup (parent_host = node2)" in w1.log()
        st = c.get("worker1", "status")
        assert st["datasets_unavailable"] == {} and st["demotion_pending"] == {}, st
    finally:
        c.teardown()


def test_a_target_without_hoster_init_is_skipped_and_named(tmp_path):
    """Issue 11 item 2.3: node2 holds vm1's newest replica, but its Hoster is not
    initialised (its init marker is gone, as after a reboot before `hoster init`).  It
    reports ready: false with the reason (status, members, metric, ping), and when
    worker1 loses power the manager names it and starts vm1 on node3; node2's copy is
    never touched."""
    c = Cluster(tmp_path, workers=1, debug=False)
    nodes = ("node1", "node2", "node3", "worker1")
    c["worker1"].add_vm("vm1", snapshots=[snap("vm1", 5 * MIN)], running=True)
    c["node2"].add_vm("vm1", parent="worker1", snapshots=[snap("vm1", HOUR)])
    c["node3"].add_vm("vm1", parent="worker1", snapshots=[snap("vm1", 2 * HOUR)])
    n2 = c["node2"]
    try:
        c.start_all(nodes)
        assert c.wait_for(lambda: c.armed(nodes), ARM_BOUND, interval=0.2)
        n2.set_initialised(False)
        before = os.stat(os.path.join(n2.host.vm_dir("vm1"), "vm_config.json")).st_mtime_ns

        def named():
            view = {m["hostname"]: m for m in c.get("node1", "members").get("members", [])}
            return view.get("node2", {}).get("ready") is False and view["node2"]
        view = c.wait_for(named, 10, interval=0.2)
        assert view and "Hoster not initialised" in view["not_ready"][0], view
        st = c.get("node2", "status")
        assert st["ready"] is False and st["armed"] is True   # armed, but no target
        text = n2.cli("members").stdout
        assert re.search(r"node2 .* NO: Hoster not initialised", text), text
        assert "Ready: NO (Hoster not initialised" in n2.cli("status").stdout
        import urllib.request
        with urllib.request.urlopen(f"http://{n2.address}:{c.port}/metrics", timeout=5) as r:
            assert "\nhoster_ha_ready 0\n" in r.read().decode()

        assert c["worker1"].power_off().returncode == 0

        def moved():
            m = c.manager()
            return m and "VM vm1 is live on node3" in c[m].log() and m
        m = c.wait_for(moved, c.timings["failover_time"] + 30, interval=0.2)
        assert m, c["node1"].log()[-4000:]
        assert re.search(r"member node2 is not ready to start VMs \(Hoster not initialised",
                         c[m].log()), c[m].log()[-4000:]
        assert n2.starts("vm1") == [] and c["node3"].starts("vm1") != []
        # a start sent to it anyway is refused with the reason, before the copy is touched
        term = c.get("node2", "status")["term"]
        status, ans = c.client.request(
            {"address": n2.address, "port": c.port, "protocol": "http", "hostname": "node2"},
            "POST", "failover", {"vm_name": "vm1", "from_host": "worker1", "term": term,
                                 "uid": "test-not-ready"}, timeout=10)
        assert status == 409 and "not ready to start VM vm1: Hoster not initialised" in \
            ans["error"], (status, ans)
        assert parent_of(n2, "vm1") == "worker1"
        assert os.stat(os.path.join(n2.host.vm_dir("vm1"), "vm_config.json")).st_mtime_ns \
            == before
    finally:
        c.teardown()


# -- item 2.11: a cheaper inventory ---------------------------------------------------------

def zfs_calls(node):
    """The arguments of every zfs call on node ("get ...", "list ...")."""
    return [ln.split(" ", 2)[2] for ln in node.calls().splitlines()
            if ln.split(" ", 2)[1:2] == ["zfs"]]


def test_inventory_zfs_calls_do_not_grow_with_the_number_of_vms(tmp_path):
    """Host.inventory runs one `zfs get` and one `zfs list` per dataset (plus one
    snapshot listing per dataset when asked), whatever the number of VMs."""
    import logging
    c = LocalCluster(str(tmp_path), debug=True)    # folders and fakes only: no agent runs
    counts = {}
    for n, name in ((2, "node1"), (30, "node2")):
        node = c[name]
        for i in range(n):
            node.add_vm(f"vm{i}", snapshots=[snap(f"vm{i}", HOUR), snap(f"vm{i}", MIN)])
        host = hoster_ha.Host(hoster_ha.load_config(node.config), logging.getLogger("t"))
        mark = len(zfs_calls(node))
        vms, errors = host.inventory(snapshots=False)
        assert len(vms) == n and errors == [] and vms[0]["latest_snapshot"] is None
        plain = zfs_calls(node)[mark:]
        vms, errors = host.inventory()
        assert all(v["latest_snapshot"]["name"] == "snap-60" for v in vms)
        full = zfs_calls(node)[mark + len(plain):]
        counts[n] = (len(plain), len(full))
        assert not any("snapshot" in call for call in plain), plain
        assert sum("snapshot" in call for call in full) == 1, full
    assert counts[2] == counts[30] == (2, 3), counts


def test_the_periodic_inventory_lists_no_snapshots_only_vms_does(tmp_path):
    c = Cluster(tmp_path, debug=True)
    n1 = c["node1"]
    for i in range(5):
        n1.add_vm(f"vm{i}", snapshots=[snap(f"vm{i}", HOUR)], running=i == 0)
    try:
        n1.start()
        # the first inventory runs at start, then every 10 s; the dataset check every
        # ping_interval
        # (a zfs call is logged when it starts: wait for the inventory's result in status)
        assert c.wait_for(lambda: sum(call.startswith("get ") for call in zfs_calls(n1)) >= 3
                          and c.get("node1", "status").get("vms_running") == ["vm0"], 15), \
            (zfs_calls(n1), c.get("node1", "status"))
        calls = zfs_calls(n1)
        assert not [call for call in calls if "snapshot" in call], calls
        inv = c.get("node1", "vms", timeout=10)        # a failover plan and `vms` need them
        assert {v["vm_name"]: v["latest_snapshot"]["name"] for v in inv["vms"]} == \
            {f"vm{i}": f"snap-{HOUR}" for i in range(5)}
        assert sum("snapshot" in call for call in zfs_calls(n1)) == 1
    finally:
        c.teardown()


# -- item 2.2: the lock of a VM that was stopped when the host fenced -----------------------

def test_a_fence_lock_of_a_stopped_vm_is_lifted_when_the_host_is_back(tmp_path):
    """Issue 11 item 2.2, end to end: worker1 comes back from a fence whose record locked
    vmS (stopped then, it runs nowhere) and vmM (moved since: node2 runs it).  worker1
    registers with what it locked while stopped; the manager keeps vmS on worker1 (a done
    plan to worker1 itself, nothing started) and worker1 lifts its lock; vmM stays
    locked.  Nothing is started."""
    c = Cluster(tmp_path, workers=1, debug=False)
    nodes = ("node1", "node2", "node3", "worker1")
    w1 = c["worker1"]
    stamp = hoster_ha.lock_name(NOW - HOUR)
    w1.add_vm("vmS", parent=stamp, snapshots=[snap("vmS", HOUR)])
    w1.add_vm("vmM", parent=stamp, snapshots=[snap("vmM", HOUR)])
    c["node2"].add_vm("vmM", parent="node2", snapshots=[snap("vmM", MIN)], running=True)
    os.makedirs(w1.state_dir, exist_ok=True)
    with open(os.path.join(w1.state_dir, "fence.json"), "w") as f:
        json.dump({"ts": NOW - HOUR, "reason": "test", "vms": [], "locked": ["vmM", "vmS"]}, f)
    try:
        c.start_all(nodes)
        assert c.wait_for(lambda: c.armed(nodes), ARM_BOUND, interval=0.2)
        assert c.wait_for(lambda: parent_of(w1, "vmS") == "worker1", 30, interval=0.2), \
            w1.log()[-3000:]
        m = c.manager()
        log = c[m].log()
        assert re.search(r"VM vmS stays at home on worker1: its fence lock is lifted", log), \
            log[-3000:]
        assert c.wait_for(lambda: "VM vmM of worker1 is not unlocked: it runs on node2"
                          in c[m].log(), 10, interval=0.2), c[m].log()[-3000:]
        assert parent_of(w1, "vmM") == stamp
        assert "unlock VM vmS: parent_host = worker1" in w1.log()
        assert not live(w1, "vmS") and not live(w1, "vmM") and live(c["node2"], "vmM")
        assert all(c[n].starts(v) == [] for n in nodes for v in ("vmS", "vmM"))
        assert c.get("worker1", "status")["state"] == "armed"
    finally:
        c.teardown()


# -- issue 13 item 1: a target's VMs in one request ----------------------------------------

def start_batch_target(c, nodes, start_delay):
    """Start `nodes` with node2's fake `hoster vm start` taking start_delay s; once they
    are armed: node2 as a peer to send POST failover to, and the term to send."""
    n2 = c["node2"]
    with open(os.path.join(n2.dir, "start_delay"), "w") as f:
        f.write(f"{start_delay}\n")
    c.start_all(nodes)
    assert c.wait_for(lambda: c.armed(nodes), ARM_BOUND, interval=0.2)
    peer = {"address": n2.address, "port": c.port, "protocol": "http", "hostname": "node2"}
    return peer, c.get("node2", "status")["term"]


def test_a_batched_failover_starts_every_entry_at_once_and_answers_each(tmp_path):
    """POST failover with `entries`: the target handles each entry as if it had come
    alone, all at once (each fake start takes 1 s here: they overlap), and answers every
    uid's result together; repeating the request repeats the results (idempotent by
    uid); a malformed batch is refused whole (400), a uid twice refuses every entry."""
    c = Cluster(tmp_path, workers=0, debug=False)
    nodes = ("node1", "node2", "node3")
    n2 = c["node2"]
    for vm in ("vm1", "vm2", "odd"):
        n2.add_vm(vm, parent="worker1", snapshots=[snap(vm, HOUR)])
    odd = os.path.join(n2.host.vm_dir("odd"), "vm_config.json")
    with open(odd) as f:
        cfg_odd = json.load(f)
    with open(odd, "w") as f:     # a strategy of a type nobody expected: an internal error
        json.dump(dict(cfg_odd, failover_strategy=["cireset"]), f)
    try:
        peer, term = start_batch_target(c, nodes, 1)
        entries = [{"vm_name": vm, "from_host": "worker1", "term": term, "uid": f"b-{vm}"}
                   for vm in ("vm1", "vm2", "vm3")]
        # the incarnation file (the watchdog confirms a fence only with it) is gone while
        # a start is under way, and back once none is
        inc = os.path.join(n2.run_dir, "hoster_ha.incarnation")
        assert os.path.exists(inc)
        seen = []

        def watch():
            deadline = time.monotonic() + 10
            while "pending hoster vm start" not in n2.calls() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(os.path.exists(inc))
        import threading
        w = threading.Thread(target=watch)
        w.start()
        t0 = time.time()
        status, ans = c.client.request(peer, "POST", "failover",
                                       {"term": term, "entries": entries}, timeout=30)
        took = time.time() - t0
        w.join(10)
        assert seen == [False] and os.path.exists(inc), seen
        assert status == 200 and ans["ok"] is True, (status, ans)
        res = {r["uid"]: r for r in ans["results"]}
        assert sorted(res) == ["b-vm1", "b-vm2", "b-vm3"]
        for vm in ("vm1", "vm2"):
            assert res[f"b-{vm}"]["status"] == 200, res
            assert res[f"b-{vm}"]["answer"]["state"] == "live", res
            assert live(n2, vm) and parent_of(n2, vm) == "node2"
        assert res["b-vm3"]["status"] == 409 and "no copy" in res["b-vm3"]["answer"]["error"]
        # at once: the second start began before the first VM existed
        pending = [float(ln.split()[0]) for ln in n2.calls().splitlines()
                   if " pending hoster vm start vm" in ln]
        assert len(pending) == 2 and max(pending) < min(n2.starts("vm1") + n2.starts("vm2"))
        assert took < 2 * (1 + c.timings.get("start_confirm", 1)) + 5, took
        again = c.client.request(peer, "POST", "failover",
                                 {"term": term, "entries": entries[:2]}, timeout=30)
        assert again[0] == 200 and [r["status"] for r in again[1]["results"]] == [200, 200]
        assert len(n2.starts("vm1")) == 1 and len(n2.starts("vm2")) == 1
        # malformed: refused whole, nothing is started
        for bad in ([], [dict(entries[0], vm_name="bad name!")],
                    [entries[0]] * (hoster_ha.MAX_BATCH + 1)):
            st, a = c.client.request(peer, "POST", "failover",
                                     {"term": term, "entries": bad}, timeout=10)
            assert st == 400, (bad[:1], st, a)
        st, a = c.client.request(peer, "POST", "failover", {"term": term, "entries": [
            dict(entries[2], uid="dup"), dict(entries[2], uid="dup")]}, timeout=10)
        assert st == 200 and [r["status"] for r in a["results"]] == [400, 400], a
        assert not os.path.exists(os.path.join(n2.dir, "vmm", "vm3"))
        # an entry whose start raises is cleaned up and reported as a failure; the
        # others of its batch are unaffected
        st, a = c.client.request(peer, "POST", "failover", {"term": term, "entries": [
            dict(entries[0], vm_name="odd", uid="b-odd"), dict(entries[2], uid="b-vm3b")]},
            timeout=30)
        assert st == 200, (st, a)
        res = {r["uid"]: r for r in a["results"]}
        assert res["b-odd"]["status"] == 409 and "internal error" in \
            res["b-odd"]["answer"]["error"], res
        assert res["b-vm3b"]["status"] == 409 and "no copy" in res["b-vm3b"]["answer"]["error"]
        assert not live(n2, "odd") and parent_of(n2, "odd") == "worker1"
    finally:
        c.teardown()


def test_a_target_runs_max_parallel_starts_commands_at_once_and_confirms_outside_them(
        tmp_path):
    """max_parallel_starts is the target's own limit on `hoster vm start` commands at once
    (issue 13 item 1): a batch of 5 with a limit of 2 never has more than 2 commands under
    way, does have 2, takes them in the batch's order, and a VM's start confirmation
    (start_confirm) does not hold a slot: the third start begins as soon as the first
    command returned, before the first VM is confirmed."""
    c = Cluster(tmp_path, workers=0, debug=False,
                timings=dict(FAST, max_parallel_starts=2, start_confirm=2))
    nodes = ("node1", "node2", "node3")
    n2 = c["node2"]
    names = [f"vm{i}" for i in range(5)]
    for vm in names:
        n2.add_vm(vm, parent="worker1", snapshots=[snap(vm, HOUR)])
    try:
        peer, term = start_batch_target(c, nodes, 0.6)
        entries = [{"vm_name": vm, "from_host": "worker1", "term": term, "uid": f"s-{vm}"}
                   for vm in names]
        status, ans = c.client.request(peer, "POST", "failover",
                                       {"term": term, "entries": entries}, timeout=60)
        assert status == 200 and [r["status"] for r in ans["results"]] == [200] * 5, ans
        began = {}     # its first command (the strategy's cireset, then the start)
        for ln in n2.calls().splitlines():
            if " pending hoster vm start " in ln or " hoster vm cireset " in ln:
                began.setdefault(ln.split()[-1], float(ln.split()[0]))
        ended = {vm: n2.starts(vm)[0] for vm in names}     # the fake returns once it exists
        assert sorted(began) == names, n2.calls()
        spans = [(began[vm], ended[vm]) for vm in names]
        overlap = max(sum(b <= t < e for b, e in spans) for t, _ in spans)
        assert overlap == 2, spans
        # in the batch's order, round by round (two slots freed at about the same time
        # start their next two in either order)
        order = sorted(names, key=began.get)
        assert set(order[:2]) == {"vm0", "vm1"} and set(order[2:4]) == {"vm2", "vm3"} \
            and order[4] == "vm4", order
        first = min(ended.values())
        assert began[order[2]] < first + 2, (began, ended)   # start_confirm: 2 s
        assert all(live(n2, vm) for vm in names)
    finally:
        c.teardown()
