"""Process tests of the watchdog pair and planned stops (SPEC §3.3, §3.5, §3.7, §4.1).

Real hoster_ha agents and their ha_watchdog companions on loopback (tools/localcluster.py),
with the FAST timings unless a test says otherwise.  Every host command is a fake
(tools/fake_host_cmd.py) that records itself in NODE/calls.log, so a production-mode
fence "destroys" and "reboots" by writing lines there: the production tests assert that
those lines are present, in order; the debug tests assert that they are absent.

Rules kept by every test here:
  * each cluster lives under its own tmp folder and is stopped in a fixture teardown
    (LocalCluster.stop_all), which first resumes (SIGCONT) anything a test paused and then
    checks, via /proc, that no process started for the cluster survives;
  * every wait has a deadline (cluster.wait_for); no fixed sleeps beyond small polls; a
    negative check ("nothing happens for T s") is a bounded wait for the bad thing.

Clusters (7, plus one stand-alone watchdog; about 90 s in all on a 2-core machine):
  TestProduction   3 candidates + 2 workers, production: status text, second start,
                   kill -9 of an armed agent, SIGSTOP of an armed agent;
  TestDebug        3 candidates, --ha-debug: status text, kill -9 of an armed agent,
                   kill -9 of an armed node's watchdog;
  lone candidate   production, never armed: its agent's death is only logged; (another)
                   its watchdog killed, the agent starts a new one and fences nothing;
  lingering        a debug watchdog left by a dead unarmed debug agent must not serve a
                   production agent started next on the same run_dir;
  stop             3 candidates + 2 workers, production: `stop` leaves, nobody fences,
                   no failover of the stopped worker (worker2 is killed as the control);
  TestStopRefused  3 candidates + 1 worker, production, long survival_window and
                   watchdog_timeout: `stop` with 2 candidates paused refuses, and leaves
                   no `left` mark behind;
  stand-alone      ha_watchdog.py fencing for a stand-in agent: the commands it runs must
                   not inherit its blocked signals.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import hoster_ha
from localcluster import FAST, LocalCluster, our_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CANDIDATES = ("node1", "node2", "node3")
BE_CAREFUL = ("🔶 BE CAREFUL! This system is running as a part of the HA. Changes applied "
              "here, may affect other cluster members.")
ARM_BOUND = 30.0        # start of the agents -> every node armed (slow 2-core machine)
SCHED = 1.5             # scheduling / process-start noise
LOCK_RE = re.compile(r"^__HA_LOCKED_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d__$")
FENCE_CMD_RE = re.compile(r"^(bhyvectl|shutdown|reboot)\b")
SNAP = ("s1", 1700000000, "1111")


# -- helpers -------------------------------------------------------------------------------


def calls(node):
    """calls.log as [(unix time, "cmd args...")]."""
    out = []
    for line in node.calls().splitlines():
        ts, _, rest = line.partition(" ")
        out.append((float(ts), rest))
    return out


def fence_calls(node):
    """The destroy / shutdown / reboot calls a node made, [(time, text)]."""
    return [(t, c) for t, c in calls(node) if FENCE_CMD_RE.match(c)]


def vm_config(node, vm):
    with open(os.path.join(node.dir, "vms", vm, "vm_config.json")) as f:
        return json.load(f)


def vm_running(node, vm):
    return os.path.exists(os.path.join(node.dir, "vmm", vm))


def events_of(node):
    return hoster_ha.EventLog.read(os.path.join(node.state_dir, "events.jsonl"))


def log_lines(node, needle):
    return [ln for ln in node.log().splitlines() if needle in ln]


class Cluster(LocalCluster):
    """LocalCluster plus cheap signed status queries and a strict teardown."""

    def __init__(self, base, **kw):
        os.makedirs(str(base), exist_ok=True)
        super().__init__(str(base), **kw)
        self.cfgs = {n: hoster_ha.load_config(node.config) for n, node in self.nodes.items()}
        self.client = hoster_ha.Client(self.cfgs["node1"])

    def http(self, name, what="status", timeout=1.0):
        """GET /api/v1/ha/WHAT of one agent, or {} when it does not answer 200."""
        cfg = self.cfgs[name]
        status, answer = self.client.request(
            {"address": cfg.address, "port": cfg.port, "protocol": "http"}, "GET", what,
            timeout=timeout)
        return answer if status == 200 and isinstance(answer, dict) else {}

    def armed(self, names):
        return all(self.http(n).get("armed") is True for n in names)

    def manager(self, names=CANDIDATES):
        """The manager every answering candidate reports, or None."""
        views = [v.get("manager") for v in (self.http(n) for n in names) if v]
        return views[0] if views and len(set(views)) == 1 and views[0] else None

    def start_armed(self, names=None):
        names = list(names or self.nodes)
        self.start_all(names)
        ok = self.wait_for(lambda: self.armed(names) and self.manager(), ARM_BOUND,
                           interval=0.2)
        assert ok, f"not armed within {ARM_BOUND} s: { {n: self.http(n) for n in names} }"

    def left_view(self, candidate, member):
        """`left` of member as candidate reports it (GET members), or None."""
        for m in self.http(candidate, "members").get("members", []):
            if m["hostname"] == member:
                return m["left"]
        return None

    def teardown(self):
        """Resume what a test paused, stop_all(), reap, check that nothing survives."""
        for node in self.nodes.values():
            pids = {node.pid(), node.pid("ha_watchdog")}
            if node.proc is not None and node.proc.poll() is None:
                pids.add(node.proc.pid)
            for pid in pids - {None}:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        gone, left = super().teardown()
        assert gone and not left, f"processes survived stop_all(): {left}"


def status_head(node, mode_line):
    """The §4.1 head of `status` for a running agent."""
    return [f"🟢 API Server is running as PID {node.pid()}",
            f"🟢 HA Watchdog service is running as PID {node.pid('ha_watchdog')}",
            "",
            mode_line,
            BE_CAREFUL]


def check_running_status(cluster, name, mode_line, role):
    node = cluster[name]
    r = node.cli("status")
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[:5] == status_head(node, mode_line), r.stdout
    # ... followed by the node's role, manager, term, reachable candidates, armed state
    manager = cluster.manager()
    term = cluster.http(name)["term"]
    rest = lines[5:]
    assert rest[0] == "", r.stdout
    assert f"Role: {role}" in rest, r.stdout
    assert f"Manager: {manager} (term {term})" in rest, r.stdout
    assert "Reachable candidates: 3 of 3 (node1, node2, node3)" in rest, r.stdout
    assert "Armed: yes" in rest, r.stdout
    assert "Traceback" not in r.stderr
    st = json.loads(node.cli("status", "--json").stdout)
    assert st["mode"] == ("DEBUG" if "DEBUG" in mode_line else "PRODUCTION")
    assert st["api_pid"] == node.pid() and st["watchdog_pid"] == node.pid("ha_watchdog")


def wait_gone(cluster, pid, timeout):
    return cluster.wait_for(lambda: not hoster_ha.pid_alive(pid), timeout, interval=0.02)


class Subreaper:
    """Make this process the reaper of orphaned descendants (Linux prctl), so that the exit
    status of a watchdog whose agent was killed can be read with waitpid()."""

    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self):
        self.on = False
        if sys.platform.startswith("linux"):
            import ctypes
            self.libc = ctypes.CDLL(None, use_errno=True)
            self.on = self.libc.prctl(self.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0

    def close(self):
        if self.on:
            self.libc.prctl(self.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
            self.on = False


def exit_status(pid):
    """waitpid(pid, WNOHANG): the exit code, None while running, "not ours" if not a child."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "not ours"
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


# -- production: kill -9 and SIGSTOP of an armed agent -------------------------------------

class TestProduction:
    """3 candidates + 2 workers, production mode, fake host commands.

    worker1 runs vm-a and vm-b (production), vm-dev (not production) and owns vm-off
    (production, stopped); worker2 runs vm-c (production).  The tests that kill touch only
    their own worker."""

    @pytest.fixture(scope="class")
    def prod(self, tmp_path_factory):
        c = Cluster(tmp_path_factory.mktemp("prod"), workers=2, debug=False)
        w1, w2 = c["worker1"], c["worker2"]
        for vm in ("vm-a", "vm-b"):
            w1.add_vm(vm, snapshots=[SNAP], running=True)
        w1.add_vm("vm-dev", production=False, snapshots=[SNAP], running=True)
        w1.add_vm("vm-off", snapshots=[SNAP], running=False)
        w2.add_vm("vm-c", snapshots=[SNAP], running=True)
        try:
            c.start_armed()
            yield c
        finally:
            c.teardown()

    def test_status_text_in_production_mode(self, prod):
        check_running_status(prod, "node1", "🚀 HA is running in PRODUCTION mode",
                             "manager" if prod.manager() == "node1" else "candidate")
        check_running_status(prod, "worker2", "🚀 HA is running in PRODUCTION mode", "worker")
        with open(os.path.join(prod["node1"].run_dir, "hoster_ha.mode")) as f:
            assert f.read() == "PRODUCTION\n"

    def test_second_start_refused_naming_the_pid(self, prod):
        node = prod["node2"]
        pid, wd = node.pid(), node.pid("ha_watchdog")
        for args in (("start", "--foreground"), ("start",)):
            r = node.cli(*args, timeout=20)
            assert r.returncode == 1, (args, r)
            assert f"already running as PID {pid}" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        assert node.proc.poll() is None and node.pid() == pid
        assert node.pid("ha_watchdog") == wd and hoster_ha.pid_alive(wd)
        assert prod.http("node2").get("armed") is True

    def test_kill9_of_an_armed_agent_makes_its_watchdog_fence(self, prod):
        node = prod["worker1"]
        wt = prod.timings["watchdog_timeout"]
        assert prod.http("worker1").get("armed") is True
        agent, wd = node.pid(), node.pid("ha_watchdog")
        assert agent == node.proc.pid and wd
        assert fence_calls(node) == []
        t_kill = time.time()
        node.proc.kill()
        assert node.proc.wait(5) == -signal.SIGKILL
        assert prod.wait_for(lambda: any("reboot -nq" == c for _, c in calls(node)),
                             wt + 2 + 2 + 5, interval=0.02), (node.calls(), node.log()[-3000:])
        fenced = fence_calls(node)
        texts = [c for _, c in fenced]
        t_reboot = next(t for t, c in fenced if c == "reboot -nq")
        print(f"worker1: fake reboot {t_reboot - t_kill:.2f} s after kill -9")
        # the VMs are gone within watchdog_timeout + 2 s; the reboot may wait up to
        # max(fence_timeout, 2 s) longer for a zfs that failed (the locks come first)
        t_destroyed = max(t for t, c in fenced if c.startswith("bhyvectl"))
        assert t_destroyed - t_kill <= wt + 2, (t_destroyed - t_kill, fenced)
        assert t_reboot - t_kill <= wt + 2 + max(2, prod.timings["fence_timeout"]), fenced
        # every running VM destroyed, the fence confirmed to the candidates (issue 13 item
        # 4: the network is up), then `reboot -nq` at once, not the orderly shutdown
        destroys = [c for c in texts if c.startswith("bhyvectl")]
        assert sorted(destroys) == [f"bhyvectl --destroy --vm={vm}"
                                    for vm in ("vm-a", "vm-b", "vm-dev")], texts
        assert texts.index("reboot -nq") > max(texts.index(d) for d in destroys), texts
        assert texts.count("reboot -nq") == 1 and "shutdown -r now" not in texts, texts
        # it reboots at the first acknowledgement: at least that candidate holds it
        said = log_lines(node, "fence confirmed to node")
        assert said, node.log()[-3000:]
        first = said[0].split("fence confirmed to ")[1].split()[0]
        assert prod.wait_for(lambda: any(
            e["event"] == "fence_confirmed" and e.get("member") == "worker1"
            for e in events_of(prod[first])), 5, interval=0.05), first
        assert not any(vm_running(node, vm) for vm in ("vm-a", "vm-b", "vm-dev"))
        # the fence record lists the production VMs it was running; every production VM
        # whose parent is this host is locked, running or not (issue 11 §2.2), and listed
        # in `locked`
        with open(os.path.join(node.state_dir, "fence.json")) as f:
            record = json.load(f)
        assert sorted(record["vms"]) == ["vm-a", "vm-b"], (record, node.log()[-3000:])
        assert sorted(record["locked"]) == ["vm-a", "vm-b", "vm-off"], record
        assert isinstance(record["ts"], (int, float)) and str(agent) in record["reason"]
        for vm in ("vm-a", "vm-b", "vm-off"):
            assert LOCK_RE.match(vm_config(node, vm)["parent_host"]), vm_config(node, vm)
        assert vm_config(node, "vm-dev")["parent_host"] == "worker1"  # not production
        # the reason at EMERG, the SIGKILL logged, the event recorded
        reason = f"EMERG: hoster_ha (PID {agent}) is gone, initiating fencing"
        assert [ln for ln in log_lines(node, reason) if f"ha_watchdog[{wd}]" in ln], \
            node.log()[-3000:]
        assert log_lines(node, f"ALERT: SIGKILL hoster_ha (PID {agent})"), node.log()[-3000:]
        assert "watchdog_fence" in [e["event"] for e in events_of(node)]
        # ... and the watchdog exits (after its stand-down: pid and ack files removed)
        assert wait_gone(prod, wd, 5), f"watchdog {wd} still running"
        assert node.pid("ha_watchdog") is None
        assert not os.path.exists(os.path.join(node.run_dir, "ha_watchdog.pid"))
        assert not os.path.exists(os.path.join(node.run_dir, "ha_watchdog.ack"))

    def test_sigstop_of_an_armed_agent_makes_its_watchdog_sigkill_it_and_fence(self, prod):
        node = prod["worker2"]
        t = prod.timings
        wt, pi = t["watchdog_timeout"], t["ping_interval"]
        assert prod.http("worker2").get("armed") is True
        agent, wd = node.pid(), node.pid("ha_watchdog")
        assert agent == node.proc.pid and wd
        try:
            t_stop = time.time()
            node.proc.send_signal(signal.SIGSTOP)
            assert prod.wait_for(lambda: node.proc.poll() is not None, wt + 2 + 5,
                                 interval=0.02), "the paused agent was not killed"
            t_dead = time.time()
        finally:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
        assert node.proc.returncode == -signal.SIGKILL, node.proc.returncode
        assert not hoster_ha.pid_alive(agent)
        assert prod.wait_for(lambda: any(c == "reboot -nq" for _, c in calls(node)),
                             5, interval=0.02), (node.calls(), node.log()[-3000:])
        fenced = fence_calls(node)
        texts = [c for _, c in fenced]
        t_reboot = next(ts for ts, c in fenced if c == "reboot -nq")
        print(f"worker2: SIGKILL {t_dead - t_stop:.2f} s, fake reboot {t_reboot - t_stop:.2f} s "
              "after SIGSTOP")
        # the last heartbeat came at most one ping_interval before the SIGSTOP
        assert wt - pi - 0.2 <= t_dead - t_stop, t_dead - t_stop
        # the VM is gone within watchdog_timeout + 2 s; the reboot follows the fence's
        # confirmation, which waits up to max(ping_timeout, 1 s) for a candidate (a loaded
        # CI machine took 1.1 s between the destroy and the reboot)
        t_destroyed = max(ts for ts, c in fenced if c.startswith("bhyvectl"))
        assert t_destroyed - t_stop <= wt + 2, (t_destroyed - t_stop, fenced)
        assert t_reboot - t_stop <= wt + 2 + max(2, t["fence_timeout"]), (t_reboot - t_stop,
                                                                          fenced)
        # confirmed (the network is up): reboot_now at once
        assert texts == ["bhyvectl --destroy --vm=vm-c", "reboot -nq"], texts
        assert not vm_running(node, "vm-c")
        assert LOCK_RE.match(vm_config(node, "vm-c")["parent_host"])
        with open(os.path.join(node.state_dir, "fence.json")) as f:
            assert json.load(f)["vms"] == ["vm-c"]
        assert log_lines(node, f"ALERT: SIGKILL hoster_ha (PID {agent})"), node.log()[-3000:]
        why = [ln for ln in log_lines(node, f"EMERG: no heartbeat from hoster_ha (PID {agent})")
               if "initiating fencing" in ln and f"watchdog_timeout {wt:g}" in ln]
        assert why, node.log()[-3000:]
        assert wait_gone(prod, wd, 5), f"watchdog {wd} still running"


# -- debug mode: the same events are only logged -------------------------------------------

class TestDebug:
    """3 candidates, --ha-debug.  Each test picks an armed non-manager that still runs."""

    @pytest.fixture(scope="class")
    def dbg(self, tmp_path_factory):
        c = Cluster(tmp_path_factory.mktemp("debug"), debug=True)
        for n in CANDIDATES:
            c[n].add_vm(f"vm-{n}", snapshots=[SNAP], running=True)
        try:
            c.start_armed()
            yield c
        finally:
            c.teardown()

    @staticmethod
    def victim(c):
        manager = c.manager()
        for n in CANDIDATES:
            if n != manager and c[n].proc.poll() is None and c.http(n).get("armed") is True:
                return n
        raise AssertionError(f"no armed non-manager left: { {n: c.http(n) for n in CANDIDATES} }")

    def test_status_text_in_debug_mode(self, dbg):
        manager = dbg.manager()
        name = next(n for n in CANDIDATES if n != manager)
        check_running_status(dbg, name, "🤖 HA is running in DEBUG mode", "candidate")
        check_running_status(dbg, manager, "🤖 HA is running in DEBUG mode", "manager")

    def test_kill9_of_an_armed_agent_watchdog_only_logs_and_exits_1(self, dbg):
        name = self.victim(dbg)
        node = dbg[name]
        agent, wd = node.pid(), node.pid("ha_watchdog")
        assert agent == node.proc.pid and wd
        reaper = Subreaper()  # the watchdog becomes our child when its agent dies
        try:
            node.proc.kill()
            assert node.proc.wait(5) == -signal.SIGKILL
            status = dbg.wait_for(lambda: exit_status(wd), 10, interval=0.02)
        finally:
            reaper.close()
        log = node.log()
        reaper_used = status != "not ours"  # else: not Linux, only the log tells
        if reaper_used:
            assert status == 1, (status, log[-3000:])
        assert wait_gone(dbg, wd, 5), f"watchdog {wd} still running"
        print(f"{name}: watchdog exit status {status} (read with waitpid: {reaper_used})")
        wd_lines = [ln for ln in log.splitlines() if f"ha_watchdog[{wd}]" in ln]
        text = "\n".join(wd_lines)
        assert f"(DEBUG) would SIGKILL hoster_ha (PID {agent})" in text, text
        assert f"EMERG: hoster_ha (PID {agent}) is gone, initiating fencing" in text, text
        assert "(DEBUG) would write fence record" in text, text
        assert f"(DEBUG) would lock VM vm-{name}" in text, text
        assert f"(DEBUG) would destroy VM vm-{name}" in text, text
        assert "(DEBUG) would reboot" in text, text
        assert "(DEBUG) exiting with status 1" in text, text
        assert not os.path.exists(os.path.join(node.run_dir, "ha_watchdog.pid"))
        # nothing was done
        assert fence_calls(node) == [], node.calls()
        assert vm_running(node, f"vm-{name}")
        assert vm_config(node, f"vm-{name}")["parent_host"] == name
        assert not os.path.exists(os.path.join(node.state_dir, "fence.json"))

    def test_kill9_of_an_armed_watchdog_makes_the_agent_fence_after_3_checks(self, dbg):
        name = self.victim(dbg)
        node = dbg[name]
        pi = dbg.timings["ping_interval"]
        wd = node.pid("ha_watchdog")
        assert wd
        t0 = time.monotonic()
        node.signal(signal.SIGKILL, "ha_watchdog")
        dbg.wait_for(lambda: node.proc.poll() is not None, 3 * pi + SCHED + 5, interval=0.02)
        elapsed = time.monotonic() - t0
        rc = node.proc.poll()
        log = node.log()
        print(f"{name}: agent exited {rc} {elapsed:.2f} s after its watchdog was killed")
        assert rc == 1, (rc, log[-3000:])
        # gone at 3 consecutive checks, one per ping_interval
        assert 2 * pi - 0.1 <= elapsed <= 3 * pi + SCHED, elapsed
        emerg = [ln for ln in log.splitlines()
                 if "hoster_ha[" in ln and "EMERG:" in ln and "ha_watchdog" in ln]
        assert emerg and f"PID {wd}" in emerg[0], log[-3000:]
        assert "(DEBUG) would reboot" in log and "(DEBUG) exiting with status 1" in log
        assert {"event": "self_fence", "reason": "ha_watchdog gone"}.items() <= \
            next(e for e in events_of(node) if e["event"] == "self_fence").items()
        assert fence_calls(node) == [], node.calls()
        assert vm_running(node, f"vm-{name}")
        assert node.pid() is None  # pid file removed at exit


# -- an unarmed node: its agent's death is only logged -------------------------------------

def test_unarmed_agent_death_is_logged_and_nothing_is_fenced(tmp_path):
    """node1 alone never reaches quorum, so it never arms (production mode, fakes)."""
    c = Cluster(tmp_path, debug=False)
    node = c["node1"]
    node.add_vm("vm-u", snapshots=[SNAP], running=True)
    wt = c.timings["watchdog_timeout"]
    try:
        node.start()
        watching = "NOTICE: watching hoster_ha (PID"
        assert c.wait_for(lambda: log_lines(node, watching) and c.http("node1"), 15,
                          interval=0.05), node.log()
        agent, wd = node.pid(), node.pid("ha_watchdog")
        assert agent == node.proc.pid and wd
        assert c.http("node1")["armed"] is False
        assert not log_lines(node, "armed by hoster_ha")  # the watchdog never saw an arm
        node.proc.kill()
        assert node.proc.wait(5) == -signal.SIGKILL
        gone = f"ALERT: hoster_ha (PID {agent}) is gone; the node was not armed"
        assert c.wait_for(lambda: log_lines(node, gone), 5, interval=0.02), node.log()[-2000:]
        # then nothing: no fence within watchdog_timeout + margin, and the watchdog runs on
        fenced = c.wait_for(lambda: fence_calls(node) or log_lines(node, "initiating fencing")
                            or not hoster_ha.pid_alive(wd), wt + 1.5, interval=0.05)
        assert not fenced, (fenced, node.calls(), node.log()[-2000:])
        assert hoster_ha.pid_alive(wd) and node.pid("ha_watchdog") == wd
        assert fence_calls(node) == [] and vm_running(node, "vm-u")
        assert vm_config(node, "vm-u")["parent_host"] == "node1"
        assert not os.path.exists(os.path.join(node.state_dir, "fence.json"))
        assert "watchdog_fence" not in [e["event"] for e in events_of(node)]
        # status: the agent is gone, its watchdog still runs
        r = node.cli("status")
        assert r.returncode == 1, r
        assert r.stdout.splitlines() == ["🔴 API Server IS NOT running",
                                         f"🟢 HA Watchdog service is running as PID {wd}"], \
            r.stdout
    finally:
        c.teardown()


def test_unarmed_agent_restarts_a_watchdog_that_is_gone_once(tmp_path):
    """§3.5, the watchdog-gone rule (Core.check_watchdog) as the agent executes it: node1
    alone never arms; its watchdog killed, the agent starts a new one after 3 checks
    (restart_watchdog action), logs that once, and fences nothing."""
    c = Cluster(tmp_path, debug=False)
    node = c["node1"]
    node.add_vm("vm-u", snapshots=[SNAP], running=True)
    pi = c.timings["ping_interval"]
    try:
        node.start()
        assert c.wait_for(lambda: log_lines(node, "NOTICE: watching hoster_ha (PID")
                          and c.http("node1"), 15, interval=0.05), node.log()
        wd = node.pid("ha_watchdog")
        assert wd and c.http("node1")["armed"] is False
        os.kill(wd, signal.SIGKILL)
        gone = f"ERROR: ha_watchdog (PID {wd}) is gone; node not armed, starting a new one"
        assert c.wait_for(lambda: log_lines(node, gone), 4 * pi + 5, interval=0.05), \
            node.log()[-2000:]
        assert c.wait_for(lambda: node.pid("ha_watchdog") not in (None, wd), 15,
                          interval=0.05), node.log()[-2000:]
        new = node.pid("ha_watchdog")
        assert c.wait_for(lambda: log_lines(node, f"started ha_watchdog (PID {new})"), 5,
                          interval=0.05), node.log()[-2000:]
        # the new one is seen alive: no second restart, no fence
        again = c.wait_for(lambda: len(log_lines(node, "is gone; node not armed")) > 1 or
                           fence_calls(node), 4 * pi, interval=0.05)
        assert not again, (node.log()[-2000:], node.calls())
        assert hoster_ha.pid_alive(new) and node.proc.poll() is None
        assert vm_running(node, "vm-u") and fence_calls(node) == []
    finally:
        c.teardown()


def test_production_agent_does_not_keep_a_lingering_debug_watchdog(tmp_path):
    """§3.5: the agent's watchdog runs in the agent's mode.  A --ha-debug agent that dies
    unarmed leaves its (debug) watchdog running; a production agent started next on the same
    run_dir (rc.conf hoster_ha_debug switched to NO) must not arm with it: when that armed
    agent is killed, the host must really be fenced (here: the fake reboot), not only
    "(DEBUG) would reboot" -- else its VMs run on while the cluster fails them over."""
    c = Cluster(tmp_path, debug=True)
    node = c["node1"]
    node.add_vm("vm-1", snapshots=[SNAP], running=True)
    wt = c.timings["watchdog_timeout"]
    try:
        node.start()  # --ha-debug, alone: never armed
        assert c.wait_for(lambda: log_lines(node, "watching hoster_ha (PID"), 15, 0.05)
        debug_wd = node.pid("ha_watchdog")
        node.proc.kill()
        node.proc.wait(5)
        assert c.wait_for(lambda: log_lines(node, "the node was not armed"), 5, 0.02)
        assert hoster_ha.pid_alive(debug_wd)  # it lingers, as §3.5 says for an unarmed node
        c.debug = False
        c.start_armed()  # production now, node1 on the same run_dir
        wd = node.pid("ha_watchdog")
        with open(f"/proc/{wd}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        agent = node.pid()
        node.proc.kill()
        node.proc.wait(5)
        fenced = c.wait_for(lambda: any(cl in ("shutdown -r now", "reboot -nq")
                                        for _, cl in calls(node)),
                            wt + 2 + 3, interval=0.05)
        assert fenced and not vm_running(node, "vm-1"), (
            f"armed production agent {agent} killed, but its watchdog {wd} (argv {argv}; "
            f"the debug one was {debug_wd}) did not fence: calls {fence_calls(node)}, "
            f"log: {[ln for ln in node.log().splitlines() if f'ha_watchdog[{wd}]' in ln][-4:]}")
        assert b"--ha-debug" not in argv
    finally:
        c.teardown()


# -- `stop` of an armed worker: an orderly leave --------------------------------------------

def test_stop_of_an_armed_worker_leaves_without_fence_or_failover(tmp_path):
    """worker1 stops; worker2 is kill -9'd at the same moment as the control: its VM must
    be failed over (so the cluster could move VMs), worker1's must not (§3.7)."""
    c = Cluster(tmp_path, workers=2, debug=False)
    w1, w2 = c["worker1"], c["worker2"]
    t = c.timings
    w1.add_vm("vm-w1", snapshots=[SNAP], running=True)
    w2.add_vm("vm-w2", snapshots=[("s1", 1700000000, "2222")], running=True)
    # replicas with the same snapshot: failover targets, if anything were failed over
    c["node2"].add_vm("vm-w1", parent="worker1", snapshots=[SNAP])
    c["node3"].add_vm("vm-w2", parent="worker2", snapshots=[("s1", 1700000000, "2222")])
    try:
        c.start_armed()
        check_running_status(c, "worker1", "🚀 HA is running in PRODUCTION mode", "worker")
        _api, wd = w1.pid(), w1.pid("ha_watchdog")
        t_stop = time.monotonic()
        r = w1.cli("stop")
        print(f"stop took {time.monotonic() - t_stop:.2f} s: {r.stdout.strip()}")
        assert r.returncode == 0, r
        assert "stopped" in r.stdout and "left the cluster" in r.stdout, r.stdout
        assert w1.proc.wait(10) == 0
        w2.proc.kill()  # the control
        w2.proc.wait(5)
        assert wait_gone(c, wd, 5), "worker1's watchdog still running"
        for f in ("hoster_ha.pid", "ha_watchdog.pid"):
            assert not os.path.exists(os.path.join(w1.run_dir, f)), f
        r = w1.cli("status")
        assert r.returncode == 1, r
        assert r.stdout.splitlines() == ["🔴 API Server IS NOT running",
                                         "🔴 HA Watchdog service IS NOT running"], r.stdout
        r = c["node1"].cli("members", "--json")
        assert r.returncode == 0, r
        view = {m["hostname"]: m for m in json.loads(r.stdout)["members"]}
        assert view["worker1"]["left"] is True, view["worker1"]
        assert all(c.left_view(n, "worker1") is True for n in ("node2", "node3"))

        # the control is failed over once it has been silent for failover_time
        moved_w2 = "MOVING VM: vm-w2 FROM offline parent: worker2 TO: node3"
        assert c.wait_for(lambda: any(log_lines(c[n], moved_w2) for n in CANDIDATES),
                          t["failover_time"] + 15, interval=0.2), \
            {n: c[n].log()[-1500:] for n in CANDIDATES}
        assert c.wait_for(lambda: vm_running(c["node3"], "vm-w2"), 10, interval=0.1)
        # worker1: nothing, even after failover_time + a margin since its stop
        moved_w1 = "MOVING VM: vm-w1"
        remaining = t_stop + t["failover_time"] + 3 - time.monotonic()
        bad = c.wait_for(lambda: [n for n in CANDIDATES if log_lines(c[n], moved_w1)],
                         max(0.0, remaining), interval=0.2)
        assert not bad, {n: log_lines(c[n], moved_w1) for n in bad}
        declined = [ln for n in CANDIDATES
                    for ln in log_lines(c[n], "member worker1 is silent for") if "it left" in ln]
        assert declined, {n: c[n].log()[-1500:] for n in CANDIDATES}  # seen, and declined
        for n in c.nodes:
            node = c[n]
            failed = [e for e in events_of(node)
                      if e["event"] in ("member_failed", "failover_planned", "vm_started",
                                        "vm_start_failed")
                      and ("worker1" in (e.get("member"), e.get("from"))
                           or e.get("vm") == "vm-w1" or e.get("vm_name") == "vm-w1")]
            assert failed == [], (n, failed)
            assert not any("vm start vm-w1" in cl for _, cl in calls(node)), (n, node.calls())
            if n != "worker1":
                assert not vm_running(node, "vm-w1"), n
        assert vm_config(c["node2"], "vm-w1")["parent_host"] == "worker1"
        # nobody fenced except the control; worker1's VM keeps running, unlocked
        for n in ("node1", "node2", "node3", "worker1"):
            assert fence_calls(c[n]) == [], (n, c[n].calls())
        assert {"shutdown -r now", "reboot -nq"} & {cl for _, cl in fence_calls(w2)}
        assert not log_lines(w1, "EMERG"), log_lines(w1, "EMERG")
        assert vm_running(w1, "vm-w1") and vm_config(w1, "vm-w1")["parent_host"] == "worker1"
        assert not os.path.exists(os.path.join(w1.state_dir, "fence.json"))
        assert any(e["event"] == "left" and e.get("member") == "worker1"
                   for n in CANDIDATES for e in events_of(c[n]))
    finally:
        c.teardown()


# -- `stop` without 2 acknowledgements is refused --------------------------------------------

# survival_window and watchdog_timeout long enough that pausing two candidates for the
# length of one `stop` (about 2 s of leave timeouts) neither fences the others nor gets the
# paused agents killed by their own watchdogs.  failover_time keeps the §2 rule.
REFUSE_TIMINGS = dict(FAST, survival_window=8, watchdog_timeout=8, failover_time=24)


class TestStopRefused:
    """worker1 armed; node2 and node3 paused (SIGSTOP) while `stop` runs on worker1."""

    @pytest.fixture(scope="class")
    def refused(self, tmp_path_factory):
        c = Cluster(tmp_path_factory.mktemp("refuse"), workers=1, debug=False,
                    timings=REFUSE_TIMINGS)
        w1 = c["worker1"]
        w1.add_vm("vm-r", snapshots=[SNAP], running=True)
        paused = [c["node2"], c["node3"]]
        try:
            c.start_armed()
            out = {"api": w1.pid(), "wd": w1.pid("ha_watchdog")}
            try:
                for node in paused:
                    node.proc.send_signal(signal.SIGSTOP)
                t0 = time.monotonic()
                out["stop"] = w1.cli("stop", timeout=30)
                out["elapsed"] = time.monotonic() - t0
                out["running"] = w1.proc.poll() is None
                out["status"] = c.http("worker1")
                out["wd_alive"] = hoster_ha.pid_alive(out["wd"])
                out["left_on_node1_while_paused"] = c.left_view("node1", "worker1")
            finally:
                for node in paused:
                    node.proc.send_signal(signal.SIGCONT)
            # worker1 keeps running and pinging: every candidate must (again) see it as a
            # member that has not left.  Poll a bounded while for the views to settle.
            views = lambda: {n: c.left_view(n, "worker1") for n in CANDIDATES}  # noqa: E731
            pi = c.timings["ping_interval"]
            settled = c.wait_for(lambda: all(v is False for v in views().values()),
                                 6 * pi + SCHED, interval=0.1)
            out["left_after_resume"] = views()
            if settled:  # ... and they stay so (no late leave request flips one back)
                c.wait_for(lambda: any(views().values()), 3 * pi, interval=0.1)
            out["left_later"] = views()
            yield c, out
        finally:
            c.teardown()

    def test_stop_refuses_and_the_agent_keeps_running(self, refused):
        c, out = refused
        w1 = c["worker1"]
        r = out["stop"]
        print(f"refused stop took {out['elapsed']:.2f} s: {r.stderr.strip()}")
        assert r.returncode == 1, r
        assert "refusing to stop" in r.stderr, r.stderr
        assert "acknowledged by 1 of 3 candidates (node1)" in r.stderr, r.stderr
        assert "2 are needed" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert out["elapsed"] < 10
        assert out["running"] and out["wd_alive"]
        assert out["status"].get("armed") is True, out["status"]
        assert w1.proc.poll() is None and w1.pid() == out["api"]
        assert w1.pid("ha_watchdog") == out["wd"] and hoster_ha.pid_alive(out["wd"])
        assert log_lines(w1, "ERROR: refusing to stop"), w1.log()[-2000:]
        for n in c.nodes:  # nobody fenced, nobody stopped
            assert fence_calls(c[n]) == [], (n, c[n].calls())
            assert c[n].proc.poll() is None, n
        # once the candidates answer again, the same `stop` succeeds
        r = w1.cli("stop", timeout=30)
        assert r.returncode == 0, r
        assert "acknowledged by node1, node2, node3" in r.stdout, r.stdout
        assert w1.proc.wait(10) == 0
        assert wait_gone(c, out["wd"], 5)
        assert vm_running(w1, "vm-r") and fence_calls(w1) == []

    def test_refused_stop_leaves_no_left_mark_on_the_candidates(self, refused):
        """A refused stop must not leave worker1 marked `left`: it keeps running, armed,
        and a left member is never failed over (§3.4, §3.7) -- if worker1 died later, its
        production VMs would never be restarted elsewhere."""
        c, out = refused
        assert out["running"], "precondition: the stop was refused and worker1 runs on"
        assert out["left_after_resume"] == {n: False for n in CANDIDATES}, (
            f"after a refused stop, worker1 (still running and armed) is marked left by "
            f"{sorted(n for n, v in out['left_after_resume'].items() if v)}; "
            f"node1 already while node2/node3 were paused: "
            f"{out['left_on_node1_while_paused']}")
        assert out["left_later"] == {n: False for n in CANDIDATES}, out["left_later"]


# -- the commands a fencing watchdog runs ---------------------------------------------------

PROBE = r"""
import sys
with open("/proc/self/status") as f:
    mask = next(line.split()[1] for line in f if line.startswith("SigBlk:"))
with open(sys.argv[1], "w") as f:
    f.write(mask)
"""

STAND_IN_AGENT = r"""
import os, signal, sys, time
run = sys.argv[1]
with open(os.path.join(run, "hoster_ha.pid"), "w") as f:
    f.write(f"{os.getpid()}\n")
path = os.path.join(run, "ha_watchdog.pid")
while not os.path.exists(path):
    time.sleep(0.02)
wd = int(open(path).read())
while True:
    os.kill(wd, signal.SIGUSR1)  # armed heartbeat
    time.sleep(0.1)
"""


def test_watchdog_fence_commands_do_not_inherit_its_blocked_signals(tmp_path):
    """ha_watchdog blocks SIGHUP, SIGINT, SIGUSR1 and SIGTERM for sigtimedwait(); the host
    commands it runs while fencing (zfs, bhyvectl, shutdown/reboot, and watchdog(8) on
    FreeBSD 15) must not start with those signals blocked, or a SIGTERM/SIGINT/SIGHUP
    (rc.shutdown, an operator, a tty hangup) can neither stop nor interrupt them.

    A stand-alone production watchdog, a stand-in "agent" that sends armed heartbeats, and
    commands.reboot replaced by a probe that records its blocked-signal mask (SigBlk)."""
    c = LocalCluster(str(tmp_path / "c"), debug=False)
    node = c["node1"]
    probe, mask_file = tmp_path / "probe.py", tmp_path / "sigblk"
    probe.write_text(PROBE)
    with open(node.config) as f:
        cfg = json.load(f)
    cfg["commands"]["reboot"] = [sys.executable, str(probe), str(mask_file)]
    with open(node.config, "w") as f:
        json.dump(cfg, f)
    agent = wd = None
    try:
        agent = subprocess.Popen([sys.executable, "-c", STAND_IN_AGENT, node.run_dir],
                                 stdin=subprocess.DEVNULL)
        wd = subprocess.Popen([sys.executable, os.path.join(ROOT, "ha_watchdog.py"),
                               "--config", node.config], stdin=subprocess.DEVNULL)
        ack = os.path.join(node.run_dir, "ha_watchdog.ack")
        armed = c.wait_for(lambda: os.path.exists(ack) and
                           open(ack).read().split()[:2] == ["armed", str(agent.pid)], 15, 0.05)
        assert armed, node.log()
        agent.kill()  # not reaped until the watchdog is done: its PID cannot be reused
        c.wait_for(lambda: wd.poll() is not None, 15, interval=0.05)
        assert wd.returncode == 1, (wd.returncode, node.log()[-2000:])
        assert mask_file.exists(), node.log()[-2000:]  # the fence ran the (probe) reboot
        mask = int(mask_file.read_text(), 16)
        names = {s.name: 1 << (s - 1) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1,
                                                 signal.SIGTERM)}
        blocked = sorted(n for n, bit in names.items() if mask & bit)
        assert blocked == [], f"the fence's reboot command ran with {blocked} blocked " \
                              f"(SigBlk {mask:#x})"
    finally:
        for p in (wd, agent):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait(5)
        assert c.wait_for(lambda: not our_pids(c.base), 10, interval=0.05), our_pids(c.base)
