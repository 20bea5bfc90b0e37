"""The host-side rules of hoster_ha's core (pure: no clock, no files, no commands), and
that the simulator runs them rather than a copy of its own.

  fence_plan            what a fence records (`vms`) and locks (`locked`, SPEC §3.3;
                        issue 11 §2.2: every production VM whose parent is this host)
  demotion_steps        what a returning host does to copies moved away (§3.6)
  Core.running_record   state_dir/running.json (§3.6, power loss)
  Core.check_watchdog   the watchdog-gone rule (§3.5)
  arming / persist      the clear_fence_record, record_running and persist_term actions
"""
import os
import time

import pytest

import hoster_ha
import sim
from hoster_ha import demotion_steps, fence_plan
from test_core import _armed_worker, make_cluster, make_core, run_round
from test_scenarios import run_scenario

HOST = "w1"
LOCKED = "__HA_LOCKED_2026-11-25_10-00-00__"


def vm(name, parent=HOST, production=True, live=False):
    return {"vm_name": name, "parent_host": parent, "production": production, "live": live,
            "config_path": f"/vms/{name}/vm_config.json"}


def plan(inventory, ours=(), old=None):
    running = {v["vm_name"] for v in inventory if v["live"]}
    return fence_plan(HOST, inventory, running, ours, old)


# -- fence_plan ---------------------------------------------------------------------------

def test_fence_locks_a_stopped_production_vm_of_this_host_and_records_the_running_one():
    p = plan([vm("run", live=True), vm("stopped")])
    assert p["vms"] == ["run"], "the record lists what it was running (what rejoin places)"
    assert p["locked"] == ["run", "stopped"], "every production VM whose parent is this host"
    assert [v["vm_name"] for v in p["lock"]] == ["run", "stopped"]
    assert p["destroy"] == ["run"]


def test_fence_leaves_backups_and_non_production_vms_unlocked_but_destroys_what_runs():
    p = plan([vm("guest", parent="node1", live=True), vm("guest2", parent="node1"),
              vm("dev", production=False, live=True), vm("dev2", production=False)])
    assert p["vms"] == [] and p["locked"] == [] and p["lock"] == []
    assert p["destroy"] == ["dev", "guest"]


def test_fence_counts_failover_starts_as_ours_even_when_not_running_or_not_yet_parent():
    """`ours`: a start under way (not running yet) or a VM started by cireset (its copy
    still names the old parent)."""
    p = plan([vm("arriving", parent="worker9"), vm("moved", parent="worker9", live=True)],
             ours={"arriving", "moved"})
    assert p["vms"] == ["arriving", "moved"]
    assert p["locked"] == ["arriving", "moved"]


def test_second_fencer_extends_the_record_and_keeps_existing_locks():
    """The agent fenced (record vms [a], locked [a, s]); the watchdog fences too: a
    running copy already locked is ours, a stopped locked one stays listed, nothing is
    locked twice, and nothing is dropped from the old record."""
    old = {"vms": ["a", "gone"], "locked": ["a", "s", "gone"]}
    p = plan([vm("a", parent=LOCKED, live=True), vm("s", parent=LOCKED), vm("b", live=True)],
             old=old)
    assert p["vms"] == ["a", "b", "gone"]
    assert p["locked"] == ["a", "b", "gone", "s"]
    assert [v["vm_name"] for v in p["lock"]] == ["b"]


def test_fence_ignores_an_old_lock_it_did_not_take():
    """A stopped copy locked by an earlier incident (its record cleared at arming) is not
    ours to restore: it is not listed again."""
    p = plan([vm("stale", parent=LOCKED)])
    assert p == {"vms": [], "locked": [], "lock": [], "destroy": []}


def test_fence_reads_an_old_record_without_locked():
    p = plan([vm("a", live=True)], old={"vms": ["x"]})
    assert p["vms"] == ["a", "x"] and p["locked"] == ["a"]


# -- demotion_steps -----------------------------------------------------------------------

def test_demotion_steps():
    local = {"done": {"parent_host": "w2", "live": False},
             "stopped": {"parent_host": HOST, "live": False},
             "locked": {"parent_host": LOCKED, "live": False},
             "live": {"parent_host": HOST, "live": True}}
    moved = {"absent": "w2", "done": "w2", "stopped": "w2", "locked": "w3", "live": "w2"}
    assert demotion_steps(local, moved, keep_live=False) == [
        ("absent", "w2", "absent"), ("done", "w2", "done"), ("live", "w2", "destroy"),
        ("locked", "w3", "demote"), ("stopped", "w2", "demote")]
    # armed: a live copy is ours by the cluster's own rule; a lagging plan never kills it
    steps = dict((name, step) for name, _, step in demotion_steps(local, moved, True))
    assert steps["live"] == "keep" and steps["stopped"] == "demote"


# -- Core.running_record --------------------------------------------------------------------

def inv(host):
    return [vm("own", parent=host, live=True), vm("stopped", parent=host),
            vm("guest", parent="a", live=True), vm("dev", parent=host, production=False,
                                                   live=True)]


def test_running_record_while_armed_lists_production_vms_run_here_as_parent():
    _, w = _armed_worker()
    assert w.running_record(inv("w")) == ("write", ["own"])
    assert w.running_record(started=["new"], old=["own"]) == ("write", ["new", "own"])
    # an inventory begun before a failover start finished did not see that VM live (or
    # still saw the old parent_host): the start noted since stays in the record
    assert w.running_record(inv("w"), started=["new"]) == ("write", ["new", "own"])


def test_running_record_untouched_when_unarmed_or_leaving_and_removed_in_maintenance():
    w = make_core("w")
    assert w.running_record(inv("w")) is None
    assert w.running_record(started=["x"], old=[]) is None
    w.link.maintenance = True
    assert w.running_record(inv("w")) == ("remove", None)
    _, a = _armed_worker()
    a.leave_body()                       # a leave request is out: not protected any more
    assert a.running_record(inv("w")) is None


# -- Core.check_watchdog --------------------------------------------------------------------

def kinds(actions):
    return [(a["kind"], a.get("event")) for a in actions]


def test_watchdog_gone_three_checks_armed_fences():
    _, w = _armed_worker()
    w.take_actions()
    for t in (10.0, 11.0):
        w.check_watchdog(False, t, pid=42)
    assert w.take_actions() == [] and not w.fenced
    w.check_watchdog(False, 12.0, pid=42)
    acts = w.take_actions()
    assert kinds(acts) == [("event", "self_fence"), ("event", "state"), ("fence", None)]
    assert acts[0]["level"] == "EMERG"
    assert acts[0]["msg"] == "ha_watchdog (PID 42) is gone, initiating self fencing"
    assert acts[0]["details"] == {"reason": "ha_watchdog gone"}
    assert acts[1]["msg"] == "state armed => fenced"
    assert acts[2]["reason"] == "ha_watchdog is gone"
    assert w.fenced
    w.check_watchdog(False, 13.0, pid=42)
    assert w.take_actions() == [], "fenced once"


def test_watchdog_gone_unarmed_restarts_it_once_at_a_time():
    w = make_core("w")
    for t in (1.0, 2.0):
        w.check_watchdog(False, t, pid=7)
    w.check_watchdog(False, 3.0, pid=7)
    acts = w.take_actions()
    assert kinds(acts) == [("event", "note"), ("restart_watchdog", None)]
    assert acts[0]["level"] == "ERROR" and not w.fenced
    w.check_watchdog(False, 4.0, restarting=True, pid=7)
    assert w.take_actions() == [], "a restart is under way"
    w.check_watchdog(False, 5.0, pid=7)  # that restart failed: try again
    assert ("restart_watchdog", None) in kinds(w.take_actions())


def test_watchdog_seen_alive_resets_the_count():
    _, w = _armed_worker()
    w.take_actions()
    for alive in (False, False, True, False, False):
        w.check_watchdog(alive, 10.0)
    assert w.take_actions() == [] and not w.fenced


# -- arming and persisting are actions --------------------------------------------------------

def test_arming_clears_the_fence_record_and_rewrites_the_running_record_by_actions():
    cores = make_cluster()
    w = make_core("w", fenced_vms=["v"])
    cores["w"] = w
    for t in range(0, 6):
        run_round(cores, float(t), acks={"w": True})
    acts = kinds(w.take_actions())
    i = acts.index(("event", "armed"))
    assert acts[i + 1:i + 3] == [("clear_fence_record", None), ("record_running", None)]


def test_take_persist_takes_only_the_persist_actions():
    c = make_core("a")
    c.box.event("note", "NOTICE", "x")
    c.election.see_term(5)
    assert c.take_persist() == [{"kind": "persist_term", "term": 5}]
    assert kinds(c.take_actions()) == [("event", "note")]


# -- the simulator runs these rules -----------------------------------------------------------

def _fenced_worker_sim():
    return [[0, "vm worker1 run snapshot=400 live=1"],
            [0, "vm worker1 stopped snapshot=400"],
            [0, "vm worker1 guest parent=worker2 snapshot=300"],
            [0, "vm worker2 run parent=worker1 snapshot=300"],
            [0, "vm worker2 guest snapshot=300 live=1"]] + \
        [[0, f"start {n}"] for n in sim.CANDIDATES + ("worker1", "worker2")] + \
        [[30, "expect armed worker1"], [31, "isolate worker1"],
         [50, "expect fenced worker1"],
         [50, "expect parent worker1 stopped locked"],
         [50, "expect parent worker1 run locked"],
         [50, "expect parent worker1 guest worker2"]]


def test_sim_fence_locks_a_stopped_production_vm_by_the_real_rule(monkeypatch):
    calls = []
    real = hoster_ha.fence_plan

    def spy(*args, **kw):
        calls.append(args[0])
        return real(*args, **kw)
    monkeypatch.setattr(hoster_ha, "fence_plan", spy)
    s = sim.Sim()
    s.run(_fenced_worker_sim())
    assert not s.failures, s.failures
    assert calls == ["worker1"]
    w1 = s.nodes["worker1"]
    assert w1.fence_record == ["run"] and w1.fence_locked == ["run", "stopped"]
    assert "fence record [run] (locked), also locked [stopped]" in s.log_text()


def test_sim_demotes_and_records_running_by_the_real_rules(monkeypatch):
    """Scenario 14 demotes moved copies; a power loss of an armed host keeps its running
    record: both through hoster_ha's functions."""
    seen = []
    real_steps = hoster_ha.demotion_steps
    real_record = hoster_ha.Link.running_record

    def steps(*a, **kw):
        seen.append("demotion_steps")
        return real_steps(*a, **kw)

    def record(self, *a, **kw):
        seen.append("running_record")
        return real_record(self, *a, **kw)
    monkeypatch.setattr(hoster_ha, "demotion_steps", steps)
    monkeypatch.setattr(hoster_ha.Link, "running_record", record)
    s = run_scenario(os.path.join(os.path.dirname(sim.__file__), "scenarios",
                                  "14_returning_node_demotes_moved_vms"))
    assert not s.failures and "demotion_steps" in seen
    s = sim.Sim()
    s.run([[0, "vm worker1 own snapshot=400 live=1"]] +
          [[0, f"start {n}"] for n in sim.CANDIDATES + ("worker1",)] +
          [[30, "expect armed worker1"], [31, "crash worker1"]])
    assert "running_record" in seen and s.nodes["worker1"].fence_record == ["own"]



def test_watchdog_verdict_is_the_rule_of_the_watchdog_and_of_the_simulator(monkeypatch):
    """ha_watchdog.py's fence rule (§3.5) is hoster_ha.watchdog_verdict, and the
    simulator's watchdog asks the same function (issue 10: no copy in tests/sim.py)."""
    v = hoster_ha.watchdog_verdict
    assert v(False, False, 99.0, 10, 42) is None                  # unarmed: nothing
    assert v(True, True, 9.9, 10, 42) is None                     # heartbeats arrive
    assert v(True, True, 10.0, 10, 42).startswith("no heartbeat from hoster_ha (PID 42)")
    assert v(True, False, 0.1, 10, 42) == "hoster_ha (PID 42) is gone"
    assert "PID 43 took its place" in v(True, False, 0.1, 10, 42, newcomer=43)
    seen = []

    def spy(*a, **kw):
        seen.append(a[:2])
        return v(*a, **kw)
    monkeypatch.setattr(hoster_ha, "watchdog_verdict", spy)
    s = sim.Sim()
    s.run([[0, "vm worker1 own snapshot=400 live=1"]] +
          [[0, f"start {n}"] for n in sim.CANDIDATES + ("worker1",)] +
          [[30, "expect armed worker1"], [31, "pause worker1"], [60, "expect fenced worker1"]])
    assert (True, True) in seen and not s.failures, (seen, s.failures)


def queued_batch(monkeypatch):
    """An AgentTarget with one start slot and fakes around it, running a batch of two
    (vm0, vm1) in a thread: vm0's `hoster vm start` runs until `release` is set, vm1
    waits for the slot.  Returns (target, history of set_parent, release, thread, out,
    finished {uid: finish_failover's keywords})."""
    import logging
    import threading
    import types
    history = []
    release = threading.Event()

    def run_cmd(argv, timeout):
        if argv == ["vm_start", "vm0"]:
            release.wait(10)           # the first start runs until it is let go
            return 1, "", "killed"
        return 0, "", ""
    monkeypatch.setattr(hoster_ha, "run_cmd", run_cmd)
    finished = {}

    class Core:
        fenced = False
        refusal = None

        def __init__(self):
            self.fo = {}

        def handle_failover(self, body, now, local, reasons):
            self.fo[body["uid"]] = "starting"
            return "start", {"uid": body["uid"], "restore_parent": "worker1"}

        def finish_failover(self, uid, ok, err, now, unknown=False, refused=False):
            self.fo[uid] = "done"
            finished[uid] = {"unknown": unknown, "refused": refused}
            return 409, dict({"error": err}, **({"refused": True} if refused else {}))

        def start_refusal(self):
            return self.refusal

        def starting(self):
            return {u for u, st in self.fo.items() if st == "starting"}

    class Host:
        def set_parent(self, path, parent):
            history.append((path, parent))

        def destroy_all(self, names, timeout):
            return True

    t = hoster_ha.AgentTarget.__new__(hoster_ha.AgentTarget)
    t.lock, t.core, t.host = threading.RLock(), Core(), Host()
    t.log = logging.getLogger("test-queued-start")
    t.cfg = types.SimpleNamespace(start_timeout=30, start_confirm=0.2, fence_timeout=1,
                                  hostname="node2", failover_strategy="change-parent",
                                  vmm_dir="/nonexistent", command=lambda k, n: [k, n])
    t.start_slots = threading.BoundedSemaphore(1)
    t.unresolved = {}
    t.sync_incarnation = lambda: None
    t.note_running = lambda n: None
    t.local_copy = lambda n: {"vm_name": n, "config_path": n, "live": False,
                              "parent_host": "worker1", "failover_strategy": None}
    t.host_readiness = lambda: None
    entries = [{"vm_name": f"vm{i}", "from_host": "worker1", "term": 1, "uid": f"u{i}"}
               for i in range(2)]
    out = []
    th = threading.Thread(target=lambda: out.append(t.failovers(entries)))
    th.start()
    deadline = time.monotonic() + 5
    while ("vm0", "node2") not in history and time.monotonic() < deadline:
        time.sleep(0.01)
    return t, history, release, th, out, finished


def test_a_start_queued_for_a_slot_while_the_node_fences_never_unlocks_its_copy(monkeypatch):
    """Review of issue 13 (helper-15): a batch entry waiting for a start slot gets it when
    the fence kills the running start; it must not rewrite parent_host (the fence's lock)
    to this host, nor undo anything: nothing ran.  Its answer says the node is fencing."""
    t, history, release, th, out, _ = queued_batch(monkeypatch)
    with t.lock:                      # the fence: the core is fenced, then the locks
        t.core.fenced = True
        for n in ("vm0", "vm1"):
            history.append((n, "__HA_LOCKED_fence__"))
    release.set()                     # its kill ends vm0's start: vm1 gets the slot
    th.join(10)
    assert [p for v, p in history if v == "vm1"] == ["__HA_LOCKED_fence__"], history
    res = {r["uid"]: r for r in out[0]}
    assert res["u1"]["status"] == 409 and res["u1"]["answer"]["error"] == hoster_ha.FENCING


def test_a_start_queued_for_a_slot_is_refused_if_maintenance_began_meanwhile(monkeypatch):
    """Review of issue 13 (helper-15, item 9): the operator turned maintenance on (or
    asked to leave) while a batch entry waited for its slot: it starts nothing, touches
    nothing, and its answer says refused (the manager places it again)."""
    t, history, release, th, out, finished = queued_batch(monkeypatch)
    with t.lock:
        t.core.refusal = "this node is in maintenance"
    release.set()
    th.join(10)
    assert [p for v, p in history if v == "vm1"] == [], history
    res = {r["uid"]: r for r in out[0]}
    assert res["u1"]["status"] == 409 and res["u1"]["answer"]["refused"] is True
    assert finished["u1"] == {"unknown": False, "refused": True}
    assert finished["u0"]["refused"] is False     # vm0 ran (and failed): not a refusal


@pytest.mark.parametrize("script, ok, said", [
    ("exit 0", True, "exited 0"),
    ("echo 'BMC not reachable' >&2; exit 3", False, "exited 3: BMC not reachable"),
    ("sleep 30", False, "did not return within 0.5 s"),
])
def test_the_external_fence_runs_the_members_argv_and_reports_its_outcome(
        tmp_path, monkeypatch, script, ok, said):
    """Issue 13 item 5: the fence_member action runs the argv (never a shell), bounded by
    EXTERNAL_FENCE_TIMEOUT, and tells the core what came of it; a debug node runs
    nothing."""
    import threading
    prog = tmp_path / "bmc-off"
    prog.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n{script}\n")
    prog.chmod(0o755)
    monkeypatch.setattr(hoster_ha, "EXTERNAL_FENCE_TIMEOUT", 0.5)
    done = []

    class Core:
        def fence_member_done(self, *a):
            done.append(a[:4])
    t = hoster_ha.AgentTarget.__new__(hoster_ha.AgentTarget)
    t.lock, t.core, t.wake, t.debug = threading.RLock(), Core(), threading.Event(), False
    a = {"kind": "fence_member", "member": "w1", "startup_time": 7,
         "argv": [str(prog), "--host", "w1 ; reboot"]}
    t0 = time.monotonic()
    t.fence_member(a)
    assert time.monotonic() - t0 < 5
    ((member, st, result, detail),) = done
    assert (member, st, result) == ("w1", 7, ok) and said in detail
    assert (tmp_path / "args").read_text() == "--host w1 ; reboot\n"
    assert t.wake.is_set()
    t.debug = True
    t.fence_member(a)
    assert len(done) == 1
