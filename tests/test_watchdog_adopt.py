"""ha_watchdog must not adopt a new agent while the old armed one is dead (issue 12, finding 3).

An armed agent dies; before the watchdog's next PID check, a new agent (started by an
operator, or by rc) writes its PID file and sends a heartbeat.  Adopting it would let the
host keep its VMs without a fence, while the candidates still count the old, armed
incarnation.  A PID change while armed, with the old process gone, must fence; a stranger's
heartbeat while the old armed agent lives is ignored.

Unit tests drive ha_watchdog.Watchdog directly (a debug-mode LocalCluster config with fake
host commands, sleeping children as the agents); the process test runs a real debug-mode
ha_watchdog.py, paused (SIGSTOP) while the agents change, so that the heartbeat of the new
agent is the first thing it sees when it resumes.  Nothing real is fenced: debug mode only
logs.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import pytest  # noqa: E402

import ha_watchdog  # noqa: E402
import hoster_ha  # noqa: E402
from localcluster import LocalCluster, our_pids  # noqa: E402

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


class ListLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level=None):
        return [r.getMessage() for r in self.records if level is None or r.levelno == level]


def make_log():
    log = logging.getLogger("test_watchdog_adopt")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    h = ListLog()
    log.addHandler(h)
    return log, h


@pytest.fixture
def env(tmp_path):
    """(cfg, watchdog, logs, start_agent): start_agent() runs a sleeper and writes its PID
    as the agent's pid file, like a starting hoster_ha."""
    cluster = LocalCluster(str(tmp_path), debug=True)
    cfg = hoster_ha.load_config(cluster["node1"].config, debug=True)
    procs = []
    log, logs = make_log()

    def start_agent():
        p = subprocess.Popen(SLEEPER, stdin=subprocess.DEVNULL)
        procs.append(p)
        hoster_ha.write_atomic(os.path.join(cfg.run_dir, "hoster_ha.pid"), f"{p.pid}\n".encode())
        return p
    try:
        yield cfg, ha_watchdog.Watchdog(cfg, log), logs, start_agent
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)


def kill(p):
    p.kill()
    p.wait(5)  # reaped: its PID is gone


def test_new_agent_heartbeat_while_the_old_armed_agent_is_dead_fences(env):
    cfg, w, logs, start_agent = env
    old = start_agent()
    now = time.monotonic()
    w.heartbeat(old.pid, True, now)
    assert w.armed and w.agent_pid == old.pid
    kill(old)
    new = start_agent()
    w.heartbeat(new.pid, False, now + 0.2)   # the new agent's first beat comes first
    reason = w.check(now + 0.2)              # ... then the PID check
    assert reason, "a new agent was adopted while the old armed one is dead: no fence"
    assert str(old.pid) in reason and "gone" in reason, reason
    assert w.agent_pid == old.pid            # the old incarnation is what we fence for
    # the ack never names the newcomer: it must not count itself armed (or acked)
    with open(os.path.join(cfg.run_dir, "ha_watchdog.ack")) as f:
        assert str(new.pid) not in f.read()


def test_new_agent_armed_heartbeat_is_not_adopted_either(env):
    cfg, w, logs, start_agent = env
    old = start_agent()
    now = time.monotonic()
    w.heartbeat(old.pid, True, now)
    kill(old)
    new = start_agent()
    w.heartbeat(new.pid, True, now + 0.2)
    assert w.agent_pid == old.pid
    assert w.check(now + 0.2)


def test_the_fence_kills_the_newcomer_too(env):
    """The new agent is not trusted either: the fence SIGKILLs it as well (debug: logged)."""
    cfg, w, logs, start_agent = env
    old = start_agent()
    now = time.monotonic()
    w.heartbeat(old.pid, True, now)
    kill(old)
    new = start_agent()
    w.heartbeat(new.pid, False, now + 0.2)
    reason = w.check(now + 0.2)
    assert w.fence(reason) == 1
    text = "\n".join(logs.lines())
    assert f"(DEBUG) would SIGKILL hoster_ha (PID {old.pid})" in text, text
    assert f"(DEBUG) would SIGKILL hoster_ha (PID {new.pid})" in text, text
    assert new.poll() is None  # debug mode: nothing is killed


def test_stranger_heartbeat_while_the_old_armed_agent_lives_is_ignored(env):
    cfg, w, logs, start_agent = env
    old = start_agent()
    now = time.monotonic()
    w.heartbeat(old.pid, True, now)
    other = start_agent()  # a second process claims the pid file
    for i in range(3):
        w.heartbeat(other.pid, True, now + 0.1 * (i + 1))
    assert w.agent_pid == old.pid and w.check(now + 0.4) is None
    warned = [m for m in logs.lines(logging.WARNING) if str(other.pid) in m]
    assert len(warned) == 1, logs.lines()  # once, not on every heartbeat


def test_new_agent_after_an_unarmed_agent_died_is_adopted(env):
    """The normal restart of an unarmed node: nothing to fence, the new agent is watched."""
    cfg, w, logs, start_agent = env
    old = start_agent()
    now = time.monotonic()
    w.heartbeat(old.pid, False, now)
    kill(old)
    new = start_agent()
    w.heartbeat(new.pid, False, now + 0.2)
    assert w.check(now + 0.2) is None
    assert w.agent_pid == new.pid
    w.heartbeat(new.pid, True, now + 0.4)
    assert w.armed and w.check(now + 0.4) is None


def test_unarmed_agent_death_is_alert_not_emerg(env):
    """SPEC §3.5: an unarmed agent's death is logged at ALERT; EMERG is the fence's alone."""
    cfg, w, logs, start_agent = env
    old = start_agent()
    now = time.monotonic()
    w.heartbeat(old.pid, False, now)
    kill(old)
    assert w.check(now + 0.1) is None
    gone = [r for r in logs.records if "is gone" in r.getMessage()]
    assert [r.levelno for r in gone] == [hoster_ha.ALERT], [(r.levelname, r.getMessage())
                                                           for r in gone]
    assert not logs.lines(hoster_ha.EMERG)


# -- a real watchdog process ------------------------------------------------------------------

# A stand-in agent: writes its PID as the agent's pid file, waits for the watchdog, then sends
# a heartbeat (SIGUSR1 armed / SIGHUP unarmed) every 0.05 s; touches BEAT after the first.
STAND_IN = r"""
import os, signal, sys, time
run, kind, beat = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.path.join(run, "hoster_ha.pid"), "w") as f:
    f.write(f"{os.getpid()}\n")
path = os.path.join(run, "ha_watchdog.pid")
while not os.path.exists(path):
    time.sleep(0.02)
wd = int(open(path).read())
sig = signal.SIGUSR1 if kind == "armed" else signal.SIGHUP
for i in range(2400):
    os.kill(wd, sig)
    if i == 0:
        open(beat, "w").close()
    time.sleep(0.05)
"""


def test_watchdog_process_fences_when_a_new_agent_beats_the_pid_check(tmp_path):
    """The old agent arms the watchdog and dies while the watchdog is paused; the new agent
    writes its pid file and beats; the watchdog resumes: the first thing it sees is the new
    agent's heartbeat.  It must fence (debug mode: log the steps, exit 1)."""
    c = LocalCluster(str(tmp_path / "c"), debug=True)
    node = c["node1"]
    run = node.run_dir
    ack = os.path.join(run, "ha_watchdog.ack")
    old = new = wd = None

    def agent(kind, beat):
        return subprocess.Popen([sys.executable, "-c", STAND_IN, run, kind, str(beat)],
                                stdin=subprocess.DEVNULL)

    def ack_is(words):
        try:
            with open(ack) as f:
                return f.read().split()[:2] == words
        except OSError:
            return False
    try:
        old = agent("armed", tmp_path / "old-beat")
        assert c.wait_for(lambda: node.pid() == old.pid, 10, 0.02)
        wd = subprocess.Popen([sys.executable, os.path.join(ROOT, "ha_watchdog.py"),
                               "--config", node.config, "--ha-debug"], stdin=subprocess.DEVNULL)
        assert c.wait_for(lambda: ack_is(["armed", str(old.pid)]), 15, 0.05), node.log()
        wd.send_signal(signal.SIGSTOP)
        try:
            kill(old)
            new = agent("unarmed", tmp_path / "new-beat")
            assert c.wait_for(lambda: (tmp_path / "new-beat").exists(), 10, 0.02)
            assert node.pid() == new.pid
        finally:
            wd.send_signal(signal.SIGCONT)
        c.wait_for(lambda: wd.poll() is not None, 10, 0.05)
        log = node.log()
        assert wd.returncode == 1, ("the watchdog adopted the new agent instead of fencing",
                                    wd.returncode, log[-2000:])
        assert f"(DEBUG) would SIGKILL hoster_ha (PID {old.pid})" in log, log[-2000:]
        assert f"hoster_ha (PID {old.pid}) is gone" in log, log[-2000:]
        assert f"watching hoster_ha (PID {new.pid})" not in log, log[-2000:]
    finally:
        for p in (old, new, wd):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait(5)
        assert c.wait_for(lambda: not our_pids(c.base), 10, interval=0.05), our_pids(c.base)


def test_the_watchdog_fence_is_notified_after_its_fence_commands(env, tmp_path):
    """Issue 14 item 4: a fence is sent by the fencing host when it can -- the watchdog's
    too: commands.notify gets `watchdog_fence` as JSON, started after the fence's commands
    and never waited for."""
    cfg, w, logs, start_agent = env
    out = tmp_path / "notified.jsonl"
    cfg.commands["notify"] = [sys.executable, "-c", "import sys; open(sys.argv[1], 'a')"
                              ".write(sys.stdin.read())", str(out)]
    old = start_agent()
    now = time.monotonic()
    w.heartbeat(old.pid, True, now)
    kill(old)
    reason = w.check(now + 0.3)
    assert reason
    assert w.fence(reason) == 1
    deadline, lines = time.monotonic() + 10, []
    while not lines and time.monotonic() < deadline:   # the notify command runs detached
        lines = [ln for ln in (out.read_text() if out.exists() else "").splitlines() if ln]
        time.sleep(0.05)
    (ev,) = [json.loads(ln) for ln in lines]
    assert ev["event"] == "watchdog_fence" and ev["reason"] == reason, ev
    assert ev["node"] == cfg.hostname and ev["message"].endswith("initiating fencing"), ev
    text = "\n".join(logs.lines())
    assert text.index("initiating fencing") < text.index("(DEBUG) would reboot"), text


def test_a_notify_command_that_cannot_start_does_not_stop_the_fence(env):
    cfg, w, logs, start_agent = env
    cfg.commands["notify"] = ["/nonexistent/notify"]
    old = start_agent()
    now = time.monotonic()
    w.heartbeat(old.pid, True, now)
    kill(old)
    assert w.fence(w.check(now + 0.3)) == 1
    text = "\n".join(logs.lines())
    assert "commands.notify failed for event watchdog_fence" in text, text
