"""fence_host (SPEC §3.3 steps 2-4) against a fake host: what is recorded and locked.

The node folder comes from tools/localcluster.py (fake zfs, bhyvectl, shutdown, reboot
named in `commands`): a "reboot" here only writes a line to calls.log.
"""
import json
import logging
import os
import time

import hoster_ha
from localcluster import LocalCluster


LOCKED = "__HA_LOCKED_2026-11-25_10-00-00__"


def node(tmp_path):
    c = LocalCluster(str(tmp_path), workers=1, debug=False)
    n = c["worker1"]
    cfg = hoster_ha.load_config(n.config)
    log = logging.getLogger("test_fence")
    return n, cfg, hoster_ha.Host(cfg, log), log


def vm_cfg(n, vm):
    with open(os.path.join(n.dir, "vms", vm, "vm_config.json")) as f:
        return json.load(f)


def record(cfg):
    with open(os.path.join(cfg.state_dir, "fence.json")) as f:
        return json.load(f)


def test_records_running_and_locks_every_production_vm_owned_here_from_a_fresh_inventory(
        tmp_path):
    """Issue 11 §2.2: the record's `vms` are the production VMs it ran as parent (what
    rejoin places); every production VM whose parent_host is this host is locked,
    running or not (a stopped one may be moved by the planner), and listed in
    `locked`."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    n.add_vm("stopped")
    n.add_vm("guest", parent="node1", running=True)       # a backup copy that runs: not ours
    n.add_vm("dev", production=False, running=True)
    # the caller's cache predates "own": the fresh inventory finds it anyway
    hoster_ha.fence_host(cfg, host, log, "test", debug=False, cache=[])
    rec = record(cfg)
    assert rec["vms"] == ["own"]
    assert rec["locked"] == ["own", "stopped"]
    assert rec["reason"] == "test" and isinstance(rec["ts"], float)
    assert vm_cfg(n, "own")["parent_host"].startswith(hoster_ha.LOCK_PREFIX)
    assert vm_cfg(n, "stopped")["parent_host"].startswith(hoster_ha.LOCK_PREFIX)
    assert vm_cfg(n, "guest")["parent_host"] == "node1"
    assert vm_cfg(n, "dev")["parent_host"] == "worker1"
    assert not os.listdir(os.path.join(n.dir, "vmm")), "every VM destroyed"
    calls = n.calls()
    assert "shutdown -r now" in calls and "reboot -nq" not in calls


def test_second_fence_of_one_incident_keeps_the_first_record(tmp_path):
    """The agent fenced (record [a], a locked) and did not finish within
    watchdog_timeout; the watchdog fences too: a locked VM that still runs is ours, and
    the record is extended, never replaced by a shorter one."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("a", parent=LOCKED, running=True)
    n.add_vm("b", running=True)
    os.makedirs(cfg.state_dir, exist_ok=True)
    with open(os.path.join(cfg.state_dir, "fence.json"), "w") as f:
        json.dump({"ts": 1, "reason": "agent", "vms": ["a", "gone-already"],
                   "locked": ["a", "s"]}, f)
    n.add_vm("s", parent=LOCKED)                           # the first fence locked it
    hoster_ha.fence_host(cfg, host, log, "watchdog", debug=False)
    assert record(cfg)["vms"] == ["a", "b", "gone-already"]
    assert record(cfg)["locked"] == ["a", "b", "s"]
    assert vm_cfg(n, "s")["parent_host"] == LOCKED
    assert vm_cfg(n, "a")["parent_host"] == LOCKED, "an existing lock is kept as it is"
    assert vm_cfg(n, "b")["parent_host"].startswith(hoster_ha.LOCK_PREFIX)


def test_vm_started_here_by_a_failover_counts_as_ours(tmp_path):
    """`ours`: VMs the agent started by a failover, whatever their copy says (cireset
    leaves parent_host to Hoster)."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("moved", parent="worker9", running=True)
    hoster_ha.fence_host(cfg, host, log, "test", debug=False, ours={"moved"})
    assert record(cfg)["vms"] == ["moved"]


def test_cache_is_used_when_the_fresh_inventory_fails(tmp_path):
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    cache, _ = host.inventory()
    cfg.commands["zfs"] = [os.path.join(n.dir, "bin", "no-such-zfs")]
    hoster_ha.fence_host(cfg, host, log, "test", debug=False, cache=cache)
    assert record(cfg)["vms"] == ["own"]
    assert vm_cfg(n, "own")["parent_host"].startswith(hoster_ha.LOCK_PREFIX)


def test_debug_changes_nothing(tmp_path, caplog):
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    n.add_vm("stopped")
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=True)
    text = caplog.text
    assert "(DEBUG) would write fence record" in text and "(DEBUG) would lock VM own" in text
    assert "(DEBUG) would lock VM stopped" in text
    assert "(DEBUG) would reboot" in text
    assert vm_cfg(n, "own")["parent_host"] == "worker1"
    assert vm_cfg(n, "stopped")["parent_host"] == "worker1"
    assert os.listdir(os.path.join(n.dir, "vmm")) == ["own"]
    assert not os.path.exists(os.path.join(cfg.state_dir, "fence.json"))
    assert "shutdown" not in n.calls() and "bhyvectl" not in n.calls()


def test_vm_being_started_by_a_failover_is_locked_and_one_that_appears_is_destroyed(tmp_path):
    """A failover start was under way when the node fenced: its VM (`ours`, not running
    yet) is recorded and locked; a VM that comes up while the others are being destroyed
    is destroyed too before the reboot."""
    import threading
    n, cfg, host, log = node(tmp_path)
    # the fence's inventory gets fence_timeout / 4 (at least 1 s): on a busy 2-core
    # machine 1 s is not always enough for the fake zfs, and the record came out empty
    cfg.fence_timeout = 8
    n.add_vm("own", running=True)
    n.add_vm("arriving")                                 # change-parent done, not live yet
    with open(os.path.join(n.dir, "destroy_delay"), "w") as f:
        f.write("0.6\n")
    timer = threading.Timer(0.3, lambda: open(os.path.join(n.dir, "vmm", "arriving"),
                                              "w").close())
    timer.start()
    try:
        hoster_ha.fence_host(cfg, host, log, "test", debug=False, ours={"arriving"})
    finally:
        timer.cancel()
    assert record(cfg)["vms"] == ["arriving", "own"]
    assert vm_cfg(n, "arriving")["parent_host"].startswith(hoster_ha.LOCK_PREFIX)
    assert not os.listdir(os.path.join(n.dir, "vmm"))
    calls = n.calls()
    assert "bhyvectl --destroy --vm=arriving" in calls and "shutdown -r now" in calls


def test_only_the_reboot_line_is_emerg(tmp_path, caplog):
    """Issue 11 §9: EMERG is a wall message, for the fence line alone; a destroy that
    failed is ALERT, a lock that failed CRIT."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    cache, _ = host.inventory()
    cache.append({"vm_name": "ghost", "production": True, "parent_host": "worker1",
                  "live": False, "config_path": os.path.join(n.dir, "no", "vm_config.json")})
    cfg.commands["zfs"] = [os.path.join(n.dir, "bin", "no-such-zfs")]   # the cache is used
    cfg.commands["vm_destroy"] = ["false"]
    cfg.fence_timeout = 1
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=False, cache=cache)
    levels = {r.levelname: r.getMessage() for r in caplog.records}
    emerg = [r.getMessage() for r in caplog.records if r.levelno == hoster_ha.EMERG]
    assert len(emerg) == 1 and emerg[0].startswith("reboot: "), emerg
    assert "not confirmed gone" in emerg[0], emerg
    assert levels["ALERT"].startswith("destroy of VM own failed"), levels
    assert levels["CRITICAL"].startswith("cannot lock VM ghost"), levels
    assert record(cfg)["locked"] == ["ghost", "own"]
    assert hoster_ha.SyslogHandler.priority_map["ALERT"] == "alert"
    assert hoster_ha.SyslogHandler.priority_map["CRITICAL"] == "critical"


def test_an_inventory_that_failed_is_asked_again_after_the_destroys(tmp_path, caplog):
    """A host slow enough to lose its agent is slow for zfs too: when the fence's first
    inventory fails (here its `zfs get` outlives the budget of fence_timeout / 4), the VMs
    are destroyed anyway, then zfs is asked again and what it finds is recorded and locked
    before the reboot (CI saw a watchdog's fence lock nothing on a busy machine)."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    n.add_vm("stopped")
    zfs = os.path.join(n.dir, "bin", "zfs")
    slow = os.path.join(n.dir, "bin", "slow-zfs")
    with open(slow, "w") as f:     # the first call hangs past the budget, later ones answer
        f.write(f'#!/bin/sh\nif mkdir "{n.dir}/zfs-slow-once" 2>/dev/null; then sleep 5; fi\n'
                f'exec "{zfs}" "$@"\n')
    os.chmod(slow, 0o755)
    cfg.commands["zfs"] = [slow]
    cfg.fence_timeout = 4                  # budget of the first inventory: 1 s
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=False)
    msgs = [r.getMessage() for r in caplog.records]
    first = next(m for m in msgs if m.startswith("write fence record"))
    assert first.endswith("production VMs none, locked none"), msgs   # the failed inventory
    assert any(m.startswith("fence: the inventory was incomplete") for m in msgs), msgs
    rec = record(cfg)
    assert rec["vms"] == ["own"] and rec["locked"] == ["own", "stopped"], rec
    assert vm_cfg(n, "own")["parent_host"].startswith(hoster_ha.LOCK_PREFIX)
    assert vm_cfg(n, "stopped")["parent_host"].startswith(hoster_ha.LOCK_PREFIX)
    calls = n.calls()
    assert "bhyvectl --destroy --vm=own" in calls and "shutdown -r now" in calls
    assert calls.index("bhyvectl --destroy --vm=own") < calls.rindex("zfs list")
    assert calls.rindex("zfs list") < calls.index("shutdown -r now")


def test_the_inventory_is_asked_until_it_answers(tmp_path, caplog):
    """CI saw a watchdog's fence lock nothing again: its second inventory failed too.
    zfs is asked until it answers (bounded), and the record and the locks are those of
    the answer.  Here the first two `zfs get`s fail."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    n.add_vm("stopped")
    zfs = os.path.join(n.dir, "bin", "zfs")
    flaky = os.path.join(n.dir, "bin", "flaky-zfs")
    with open(flaky, "w") as f:
        f.write(f'#!/bin/sh\nfor i in 1 2; do\n  if mkdir "{n.dir}/zfs-fail-$i" 2>/dev/null; then\n'
                f'    echo "cannot open pool: I/O error" >&2; exit 1\n  fi\ndone\n'
                f'exec "{zfs}" "$@"\n')
    os.chmod(flaky, 0o755)
    cfg.commands["zfs"] = [flaky]
    cfg.fence_timeout = 2
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=False)
    msgs = [r.getMessage() for r in caplog.records]
    again = [m for m in msgs if m.startswith("fence: the inventory was incomplete")]
    assert len(again) == 2 and again[1].endswith("asking zfs again (2)"), msgs
    rec = record(cfg)
    assert rec["vms"] == ["own"] and rec["locked"] == ["own", "stopped"], rec
    assert vm_cfg(n, "stopped")["parent_host"].startswith(hoster_ha.LOCK_PREFIX)
    assert n.calls().count("shutdown -r now") == 1


def test_a_zfs_that_never_answers_does_not_stop_the_reboot(tmp_path, caplog):
    """The bound: a zfs that always fails at once is asked again every 0.5 s (not in a
    tight loop) for max(fence_timeout, 2 s) after the destroys, then the host reboots."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    count = os.path.join(n.dir, "zfs-calls")
    failing = os.path.join(n.dir, "bin", "failing-zfs")
    with open(failing, "w") as f:
        f.write(f'#!/bin/sh\necho x >> "{count}"\necho "I/O error" >&2\nexit 1\n')
    os.chmod(failing, 0o755)
    cfg.commands["zfs"] = [failing]
    cfg.fence_timeout = 1
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=False)
    took = time.monotonic() - t0
    with open(count) as f:
        calls = len(f.read().split())
    assert 1.5 <= took < 1 + 2 + 5, took
    assert 3 <= calls <= 8, calls         # about one per 0.5 s, each inventory 1 zfs get
    assert record(cfg)["vms"] == [] and "bhyvectl --destroy --vm=own" in n.calls()
    assert n.calls().count("shutdown -r now") == 1


def test_run_cmd_is_bounded_when_children_keep_the_output_open():
    """A timed-out command is killed and waited for at most 1 s more: a child it left
    holding the output pipe (or one stuck in the kernel) does not hold the caller."""
    t0 = time.monotonic()
    rc, out, err = hoster_ha.run_cmd(["sh", "-c", "sleep 20 & sleep 20"], 0.3)
    assert rc is None and "timed out after 0.3 s" in err
    assert time.monotonic() - t0 < 3.0
    assert hoster_ha.run_cmd(["sh", "-c", "echo hi; echo oops >&2; exit 3"], 5) == \
        (3, "hi\n", "oops\n")
    assert hoster_ha.run_cmd(["/no/such/command"], 5)[0] == 127


def test_agent_restore_unlocks_only_a_locked_stopped_copy(tmp_path, caplog):
    """Issue 11 item 2.2, the executor: the copies the manager keeps here get this host
    back as parent_host only if locked and stopped; a running one is left alone and
    reported; what was handled goes back to the core."""
    import threading
    import types
    n, cfg, host, log = node(tmp_path)
    n.add_vm("s", parent=LOCKED)
    n.add_vm("r", parent=LOCKED, running=True)
    n.add_vm("o", parent="node2")
    told = []
    agent = types.SimpleNamespace(
        host=host, cfg=cfg, log=log, debug=False, lock=threading.RLock(),
        core=types.SimpleNamespace(restore_done=lambda done, failed=(): told.append(
            (sorted(done), sorted(failed)))))
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.AgentTarget.restore(agent, ["s", "r", "o", "gone"])
    assert vm_cfg(n, "s")["parent_host"] == "worker1"
    assert vm_cfg(n, "r")["parent_host"] == LOCKED and vm_cfg(n, "o")["parent_host"] == "node2"
    assert told == [(["gone", "o", "r", "s"], [])]
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "unlock VM s: parent_host = worker1" in msgs and "VM r: the cluster keeps it" in msgs


# -- the confirmed fence (issue 13 item 4) -------------------------------------------------

def test_the_supervisors_are_killed_before_the_destroys(tmp_path, caplog):
    """Hoster's vm_supervisor_service could start a VM again after its destroy: the fence
    kills the supervisors of every VM it knows (one pkill, the names as an alternation)
    before any destroy.  Without an incarnation nothing is confirmed (no POST fenced)."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    n.add_vm("web.1", running=True)
    n.add_vm("stopped")
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=False)
    lines = n.calls().splitlines()
    kill = [i for i, ln in enumerate(lines)
            if " pkill -9 -f /vm_supervisor_service for (own|stopped|web\\.1)$" in ln]
    destroys = [i for i, ln in enumerate(lines) if " bhyvectl --destroy" in ln]
    assert kill and destroys and kill[0] < min(destroys), lines
    msgs = [r.getMessage() for r in caplog.records]
    assert not any("fence confirmed" in m or "fence not confirmed" in m for m in msgs), msgs
    assert "shutdown -r now" in n.calls()


def test_a_fence_whose_supervisors_cannot_be_stopped_is_not_confirmed(tmp_path, caplog):
    """pkill fails (exit 3): the supervisors are not known stopped, so the fence is not
    confirmed (the cluster waits failover_time) and the host reboots the orderly way."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    open(os.path.join(n.dir, "pkill_fails"), "w").close()
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=False, incarnation=1700000000000)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fence not confirmed (the VM supervisors could not be stopped)")
               and m.endswith("after failover_time") for m in msgs), msgs
    assert not any(m.startswith("fence confirmed") for m in msgs), msgs
    calls = n.calls()
    assert "bhyvectl --destroy --vm=own" in calls
    assert "shutdown -r now" in calls and "reboot -nq" not in calls


def test_an_incomplete_inventory_is_not_confirmed(tmp_path, caplog):
    """A zfs that never answers: what is locked is unknown, so no confirmation."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    failing = os.path.join(n.dir, "bin", "failing-zfs")
    with open(failing, "w") as f:
        f.write('#!/bin/sh\necho "I/O error" >&2\nexit 1\n')
    os.chmod(failing, 0o755)
    cfg.commands["zfs"] = [failing]
    cfg.fence_timeout = 1
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=False, incarnation=1700000000000)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fence not confirmed (the inventory is incomplete") for m in msgs), msgs
    assert n.calls().count("shutdown -r now") == 1 and "reboot -nq" not in n.calls()


def test_a_confirmation_no_candidate_acknowledges_still_reboots_at_once(tmp_path, caplog):
    """Every condition holds but no candidate answers (none runs here): POST fenced goes to
    all three within ping_timeout, nobody acknowledges.  One may hold it all the same (its
    answer lost), and the cluster may fail the host over at once: reboot_now, no rc.d."""
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=False, incarnation=1700000000000)
    msgs = [r.getMessage() for r in caplog.records]
    sent = [m for m in msgs if m.startswith("fence confirmed to no candidate (not to node1: ")]
    assert sent and "node2: " in sent[0] and "node3: " in sent[0], msgs
    assert n.calls().count("reboot -nq") == 1 and "shutdown -r now" not in n.calls()
    assert time.monotonic() - t0 < cfg.fence_timeout + 3 * cfg.ping_timeout + 5


def test_debug_mode_confirms_nothing(tmp_path, caplog):
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    with caplog.at_level(logging.INFO, logger="test_fence"):
        hoster_ha.fence_host(cfg, host, log, "test", debug=True, incarnation=1700000000000)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m == "(DEBUG) would stop the VM supervisors of own" for m in msgs), msgs
    assert not any("fence confirmed" in m or "pkill" in m for m in msgs), msgs
    assert "pkill" not in n.calls() and "bhyvectl" not in n.calls()


def test_a_supervisor_started_during_the_fence_stops_the_confirmation(tmp_path, caplog):
    """A start under way when the agent died (its `hoster vm start` child lives on, past
    its parent_host check, before the lock) may launch a supervisor after the fence killed
    them all: the check after the destroys finds it (and kills it), so the fence is not
    confirmed.  Here Hoster's supervisor of `late` is launched while the destroys take
    0.5 s, its VM to appear 3 s later."""
    import threading

    import fake_host
    n, cfg, host, log = node(tmp_path)
    n.add_vm("own", running=True)
    n.add_vm("late")
    with open(os.path.join(n.dir, "destroy_delay"), "w") as f:
        f.write("0.5\n")

    def start_during_the_destroys():
        deadline = time.monotonic() + 10
        while "pkill" not in n.calls() and time.monotonic() < deadline:
            time.sleep(0.01)
        fake_host.launch_supervisor(fake_host.FakeHost(n.dir), "late", 3.0, None, "0")
    t = threading.Thread(target=start_during_the_destroys)
    t.start()
    try:
        with caplog.at_level(logging.INFO, logger="test_fence"):
            hoster_ha.fence_host(cfg, host, log, "test", debug=False, incarnation=1700000000000)
    finally:
        t.join(15)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fence not confirmed (a VM supervisor was started during the "
                            "fence)") for m in msgs), msgs
    assert not any(m.startswith("fence confirmed") for m in msgs), msgs
    time.sleep(3.5)   # when the killed supervisor would have created the VM
    assert not os.path.exists(os.path.join(n.dir, "vmm", "late")), n.calls()
