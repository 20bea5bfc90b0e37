"""Process tests: real hoster_ha agents (and their ha_watchdog companions) on loopback.

Three candidates listen on 127.0.0.1-127.0.0.3 (tools/localcluster.py), always with
--ha-debug and the FAST timings, and every host command is a fake
(tools/fake_host_cmd.py), so nothing real is ever destroyed or rebooted.

Rules kept by every test here:
  * each cluster lives under its own tmp folder and is stopped in a fixture teardown,
    which also checks (via /proc) that no process started for it survives;
  * every wait has a deadline (cluster.wait_for); no fixed sleeps;
  * status polling during waits goes through the signed HTTP `status` endpoint (cheap);
    the assertions that SPEC words in terms of the CLI use the CLI.

SPEC sections: §2 timings, §3.2 election, §3.3 self-fencing, §3.4 members, §3.5 watchdog,
§4.1 CLI, §4.5 files.
"""

import json
import os
import re
import signal
import sys
import time

import pytest

import hoster_ha
from localcluster import FAST, LocalCluster, our_pids


NAMES = ("node1", "node2", "node3")
EMERG_LINE = "EMERG: candidatesRegistered has gone below 2, initiating self fencing"
STATUS_KEYS = ("hostname", "role", "manager", "term", "reachable_candidates", "armed",
               "maintenance", "mode", "api_pid", "watchdog_pid")
MEMBER_FIELDS = ("hostname", "startup_time", "silence", "armed", "maintenance", "left",
                 "backup_node", "failover_time", "address", "port", "protocol")
BE_CAREFUL = ("🔶 BE CAREFUL! This system is running as a part of the HA. Changes applied "
              "here, may affect other cluster members.")

# Bounds.  FAST: ping_interval 0.5, survival_window 2.5, vote_lease 1.5.
ELECTION_BOUND = 12.0   # start of 3 agents -> one manager reported by all three
ARM_BOUND = 8.0         # manager agreed -> all three armed
SCHED_TOLERANCE = 1.5   # scheduling / process noise on a slow 2-core machine
REBOOT_RE = re.compile(r"^\S+ (shutdown|reboot)\b", re.M)


# -- helpers -------------------------------------------------------------------------------

class Cluster(LocalCluster):
    """LocalCluster plus cheap signed HTTP status queries and a strict teardown."""

    def __init__(self, base, **kw):
        super().__init__(str(base), **kw)
        self.cfgs = {n: hoster_ha.load_config(node.config, debug=True)
                     for n, node in self.nodes.items()}
        self.client = hoster_ha.Client(self.cfgs["node1"])

    def http_status(self, name, timeout=1.0):
        """GET /api/v1/ha/status of one agent, or {} when it does not answer 200."""
        cfg = self.cfgs[name]
        status, answer = self.client.request(
            {"address": cfg.address, "port": cfg.port, "protocol": "http"}, "GET", "status",
            timeout=timeout)
        return answer if status == 200 and isinstance(answer, dict) else {}

    def agreed_manager(self, names=NAMES):
        views = [self.http_status(n) for n in names]
        managers = {v.get("manager") for v in views}
        if len(managers) == 1 and None not in managers and all(views):
            return managers.pop()
        return None

    def all_armed(self, names=NAMES):
        return all(self.http_status(n).get("armed") is True for n in names)

    def teardown(self):
        """stop_all(), reap our children, and make sure nothing started for us survives."""
        gone, left = super().teardown()
        assert gone and not left, f"processes survived stop_all(): {left}"


def start_ready_cluster(base, names=NAMES, vms=False):
    """Start node1-3, wait (bounded) until they agree on one manager and are all armed.

    Returns (cluster, seconds from start to agreement)."""
    c = Cluster(base)
    try:
        if vms:
            for n in names:  # one running production VM each, owned by its node
                c[n].add_vm(f"vm-{n}", snapshots=[("s1", 1700000000, "111")], running=True)
        t0 = time.monotonic()
        c.start_all(list(names))
        manager = c.wait_for(lambda: c.agreed_manager(names), ELECTION_BOUND, interval=0.1)
        elected = time.monotonic() - t0
        assert manager, (f"no agreed manager within {ELECTION_BOUND} s: "
                         f"{ {n: c.http_status(n) for n in names} }")
        assert c.wait_for(lambda: c.all_armed(names), ARM_BOUND, interval=0.1), \
            f"not all armed within {ARM_BOUND} s: { {n: c.http_status(n) for n in names} }"
    except BaseException:
        c.teardown()
        raise
    return c, elected


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def events_of(node):
    return hoster_ha.EventLog.read(os.path.join(node.state_dir, "events.jsonl"))


def wait_exit(cluster, node, timeout):
    """Wait (bounded) for a foreground agent to exit; (returncode or None, seconds waited)."""
    t0 = time.monotonic()
    cluster.wait_for(lambda: node.proc.poll() is not None, timeout, interval=0.02)
    return node.proc.poll(), time.monotonic() - t0


# -- a healthy 3-node cluster: views, files, CLI -------------------------------------------

class TestHealthyCluster:
    """One cluster for the read-only checks; test_zz_stop (last) stops node3."""

    @pytest.fixture(scope="class")
    def ready(self, tmp_path_factory):
        c, elected = start_ready_cluster(tmp_path_factory.mktemp("healthy"))
        try:
            yield c, elected
        finally:
            c.teardown()

    @pytest.fixture(scope="class")
    def cli_views(self, ready):
        """`status --json` of every node, run once: {name: (CompletedProcess, parsed)}."""
        c, _ = ready
        out = {}
        for n in NAMES:
            r = c[n].cli("status", "--json")
            try:
                out[n] = (r, json.loads(r.stdout))
            except ValueError:
                out[n] = (r, {})
        return out

    def test_exactly_one_manager_reported_by_all_status_json(self, ready, cli_views):
        c, elected = ready
        assert elected <= ELECTION_BOUND
        views = {n: v for n, (_, v) in cli_views.items()}  # the CLI: status --json
        managers = {v["manager"] for v in views.values()}
        assert len(managers) == 1 and None not in managers, views
        manager = managers.pop()
        assert manager in NAMES
        roles = {n: v["role"] for n, v in views.items()}
        assert [n for n, r in roles.items() if r == "manager"] == [manager], roles
        assert all(r == "candidate" for n, r in roles.items() if n != manager), roles
        terms = {v["term"] for v in views.values()}
        assert len(terms) == 1 and terms.pop() >= 1, views

    def test_status_text_matches_spec(self, ready):
        c, _ = ready
        node = c["node1"]
        r = node.cli("status")
        assert r.returncode == 0, r
        lines = r.stdout.splitlines()
        api, wd = node.pid(), node.pid("ha_watchdog")
        assert lines[:5] == [
            f"🟢 API Server is running as PID {api}",
            f"🟢 HA Watchdog service is running as PID {wd}",
            "",
            "🤖 HA is running in DEBUG mode",
            BE_CAREFUL,
        ], r.stdout
        # ... followed by the node's role, manager, term, reachable candidates, armed state
        rest = "\n".join(lines[5:]).lower()
        manager = c.agreed_manager()
        for word in ("role", "manager", "term", "reachable", "armed", manager):
            assert word in rest, (word, r.stdout)
        assert "Traceback" not in r.stderr

    def test_status_json_has_every_spec_key(self, ready, cli_views):
        c, _ = ready
        for n in NAMES:
            node = c[n]
            r, st = cli_views[n]
            assert r.returncode == 0, r
            for k in STATUS_KEYS:
                assert k in st, (k, st)
            assert st["hostname"] == n
            assert st["role"] in ("manager", "candidate")
            assert isinstance(st["term"], int) and st["term"] >= 1
            assert sorted(st["reachable_candidates"]) == sorted(NAMES), st
            assert st["armed"] is True and st["maintenance"] is False
            assert st["mode"] == "DEBUG"
            assert st["api_pid"] == node.proc.pid == node.pid()
            assert isinstance(st["watchdog_pid"], int)
            assert st["watchdog_pid"] == node.pid("ha_watchdog") != st["api_pid"]

    def test_pid_files_and_mode_file(self, ready):
        c, _ = ready
        for n in NAMES:
            node = c[n]
            api = read(os.path.join(node.run_dir, "hoster_ha.pid"))
            assert api == f"{node.proc.pid}\n"
            wd = read(os.path.join(node.run_dir, "ha_watchdog.pid"))
            assert re.fullmatch(r"[1-9][0-9]*\n", wd)
            wd_pid = int(wd)
            assert wd_pid != node.proc.pid and hoster_ha.pid_alive(wd_pid)
            cmdline = open(f"/proc/{wd_pid}/cmdline", "rb").read().split(b"\0")
            assert any(a.endswith(b"ha_watchdog.py") for a in cmdline), cmdline
            assert b"--ha-debug" in cmdline and node.config.encode() in cmdline  # same mode
            assert read(os.path.join(node.run_dir, "hoster_ha.mode")) == "DEBUG\n"

    def test_the_agent_loads_no_ssl_without_a_tls_section(self, ready):
        """Issue 13 item 6, footprint: without a tls section the agent never imports ssl
        (http.client is kept from it when hoster_ha.py is the program)."""
        c, _ = ready
        for n in NAMES:
            maps = open(f"/proc/{c[n].pid()}/maps").read()
            assert "_ssl" not in maps and "libssl" not in maps, n

    def test_members_json_lists_the_three_members(self, ready):
        c, _ = ready
        r = c["node1"].cli("members", "--json")
        assert r.returncode == 0, r
        view = json.loads(r.stdout)
        members = {m["hostname"]: m for m in view["members"]}
        assert sorted(members) == sorted(NAMES), view
        for n, m in members.items():
            for k in MEMBER_FIELDS:
                assert k in m, (k, m)
            assert m["address"] == c[n].address
            assert m["port"] == c.port and m["protocol"] == "http"
            assert m["armed"] is True
            assert m["maintenance"] is False and m["left"] is False
            assert m["backup_node"] is False
            assert m["failover_time"] == FAST["failover_time"]
            assert 0 <= m["silence"] < FAST["survival_window"], m
            assert m["startup_time"] == c.http_status(n)["startup_time"]
        r = c["node2"].cli("members")  # the table form
        assert r.returncode == 0 and all(n in r.stdout for n in NAMES), r

    def test_events_manager_elected_and_armed(self, ready):
        c, _ = ready
        manager = c.agreed_manager()
        for n in NAMES:
            evs = events_of(c[n])
            for ev in evs:
                assert {"ts", "node", "event"} <= set(ev) and ev["node"] == n, ev
                assert ev["event"] in hoster_ha.EVENT_NAMES, ev
            names = [e["event"] for e in evs]
            assert "armed" in names, (n, names)
            if n == manager:
                elected = [e for e in evs if e["event"] == "manager_elected"]
                assert elected and elected[-1]["term"] >= 1, evs
            registered = {e["member"] for e in evs if e["event"] == "registered"}
            assert registered == set(NAMES), evs
        node = c[manager]
        r = node.cli("events", "--json")
        assert r.returncode == 0, r
        printed = json.loads(r.stdout)
        on_disk = events_of(node)
        assert printed == on_disk[:len(printed)]  # the file may only have grown since
        assert "manager_elected" in [e["event"] for e in printed]
        r = node.cli("events")
        assert r.returncode == 0 and "manager_elected" in r.stdout and "armed" in r.stdout

    def test_second_start_refused(self, ready):
        c, _ = ready
        node = c["node2"]
        pid = node.pid()
        for args in (("start", "--ha-debug", "--foreground"), ("start", "--ha-debug")):
            r = node.cli(*args)
            assert r.returncode == 1, (args, r)
            assert "already running" in r.stderr and str(pid) in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        assert node.proc.poll() is None and node.pid() == pid
        assert c.http_status("node2").get("api_pid") == pid

    def test_the_agent_runs_from_its_cached_bytecode_without_ssl(self, ready):
        """Footprint (issue 13 item 6): the agent's process (same PID: it exec'd) loads
        this module from state_dir/pycache instead of compiling the file it was started
        as, the watchdog loads it from there too, nothing else is cached there, and
        neither loads ssl without a tls section."""
        c, _ = ready
        node = c["node1"]
        api, wd = node.pid(), node.pid("ha_watchdog")
        assert api == node.proc.pid
        prefix = os.path.join(node.state_dir, "pycache")
        pyc = os.path.join(prefix, f"hoster_ha.{sys.implementation.cache_tag}.pyc")
        assert os.listdir(prefix) == [os.path.basename(pyc)]
        with open(f"/proc/{api}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        assert hoster_ha.IMPORT_SELF in argv, argv
        assert argv[argv.index(hoster_ha.IMPORT_SELF) + 1:][:3] == [
            os.path.realpath(hoster_ha.__file__), pyc, "start"], argv
        with open(f"/proc/{wd}/environ", "rb") as f:
            assert f"HOSTER_HA_BYTECODE={pyc}".encode() in f.read().split(b"\0")
        for pid in (api, wd):
            with open(f"/proc/{pid}/maps") as f:
                assert "/_ssl." not in f.read(), pid

    def test_zz_stop(self, ready):
        """Last in the class: stop node3 and check the 'not running' views."""
        c, _ = ready
        node = c["node3"]
        api, wd = node.pid(), node.pid("ha_watchdog")
        r = node.cli("stop")
        assert r.returncode == 0, r
        assert "stopped" in r.stdout.lower()
        assert node.proc.wait(5) == 0  # orderly exit
        assert not hoster_ha.pid_alive(api) and not hoster_ha.pid_alive(wd)
        for f in ("hoster_ha.pid", "ha_watchdog.pid"):
            assert not os.path.exists(os.path.join(node.run_dir, f)), f
        r = node.cli("status")
        assert r.returncode == 1, r
        assert r.stdout.splitlines() == ["🔴 API Server IS NOT running",
                                         "🔴 HA Watchdog service IS NOT running"], r.stdout
        r = node.cli("status", "--json")
        assert r.returncode == 1, r
        st = json.loads(r.stdout)
        assert st["api_pid"] is None and st["watchdog_pid"] is None
        for k in STATUS_KEYS:
            assert k in st, (k, st)
        r = node.cli("stop")  # nothing runs: a message, exit 0
        assert r.returncode == 0 and r.stdout.strip(), r
        assert "not running" in r.stdout
        # the two others keep their quorum and stay up, and know node3 left (§3.7)
        assert c["node1"].proc.poll() is None and c["node2"].proc.poll() is None
        r = c["node1"].cli("members", "--json")
        assert r.returncode == 0, r
        left = {m["hostname"]: m["left"] for m in json.loads(r.stdout)["members"]}
        assert left == {"node1": False, "node2": False, "node3": True}, left


# -- daemon mode ---------------------------------------------------------------------------

def test_daemon_mode_start_status_stop(tmp_path):
    """node1 in daemon mode; node2 in the foreground so that `stop` can leave (§3.7: it needs
    2 candidates to acknowledge the leave)."""
    c = Cluster(tmp_path)
    node = c["node1"]
    try:
        c["node2"].start()
        t0 = time.monotonic()
        r = node.start(foreground=False)  # `start --ha-debug`, no --foreground
        assert r.returncode == 0, r
        assert time.monotonic() - t0 < 20
        api, wd = node.pid(), node.pid("ha_watchdog")
        assert api and wd and api != wd
        lines = r.stdout.splitlines()
        assert lines[:2] == [f"🟢 API Server is running as PID {api}",
                             f"🟢 HA Watchdog service is running as PID {wd}"], r.stdout
        assert "🤖 HA is running in DEBUG mode" in lines
        # detached: not our child, in a session of its own
        assert api not in (os.getpid(), os.getppid()) and os.getsid(api) != os.getsid(0)
        assert c.http_status("node1").get("api_pid") == api
        r = node.cli("status")
        assert r.returncode == 0 and f"PID {api}" in r.stdout, r
        # both candidates registered with each other: the leave can be acknowledged by 2
        assert c.wait_for(lambda: all(c.http_status(n).get("reachable_candidates", []) ==
                                      ["node1", "node2"] for n in ("node1", "node2")),
                          10, interval=0.1)
        r = node.cli("stop")
        assert r.returncode == 0, r
        assert c.wait_for(lambda: not hoster_ha.pid_alive(api) and
                          not hoster_ha.pid_alive(wd), 10, interval=0.05), "still running"
        for f in ("hoster_ha.pid", "ha_watchdog.pid"):
            assert not os.path.exists(os.path.join(node.run_dir, f)), f
        r = node.cli("status")
        assert r.returncode == 1 and "🔴 API Server IS NOT running" in r.stdout, r
    finally:
        c.teardown()


# -- self-fencing: two candidates SIGKILLed ------------------------------------------------

def test_two_sigkills_make_the_survivor_self_fence(tmp_path):
    c, _ = start_ready_cluster(tmp_path, vms=True)
    try:
        survivor_name = c.agreed_manager()
        assert survivor_name
        survivor = c[survivor_name]
        victims = [c[n] for n in NAMES if n != survivor_name]
        victim_wd = {v.name: v.pid("ha_watchdog") for v in victims}
        t = c.timings
        bound = t["survival_window"] + 2 * t["ping_interval"] + SCHED_TOLERANCE
        for v in victims:
            v.signal(signal.SIGKILL)
        rc, elapsed = wait_exit(c, survivor, bound + 5)
        print(f"survivor {survivor_name} exited {rc} {elapsed:.2f} s after the kill")
        log = survivor.log()
        assert rc == 1, (rc, log[-3000:])
        assert elapsed <= bound, f"fenced {elapsed:.2f} s after the kill; bound {bound:g} s"
        # The last good ping to a victim was sent at most ~2 ping_intervals before the kill.
        assert elapsed >= t["survival_window"] - 2 * t["ping_interval"] - 0.3, elapsed
        assert EMERG_LINE in log, log[-3000:]
        vm = f"vm-{survivor_name}"
        assert "(DEBUG) would reboot" in log, log[-3000:]
        assert f"(DEBUG) would destroy VM {vm}" in log, log[-3000:]
        assert f"(DEBUG) would lock VM {vm}" in log, log[-3000:]
        assert "(DEBUG) would write fence record" in log
        assert "self_fence" in [e["event"] for e in events_of(survivor)]
        # debug mode changes nothing: VM still "running", not locked, no fence record
        assert os.path.exists(os.path.join(survivor.dir, "vmm", vm))
        cfg = json.loads(read(os.path.join(survivor.dir, "vms", vm, "vm_config.json")))
        assert cfg["parent_host"] == survivor_name
        assert not os.path.exists(os.path.join(survivor.state_dir, "fence.json"))
        # The victims were armed: their watchdogs see the agent gone and "fence" (debug).
        for v in victims:
            assert v.proc.wait(5) == -signal.SIGKILL
        for v in victims:
            wd = victim_wd[v.name]
            assert c.wait_for(lambda: not hoster_ha.pid_alive(wd), 10, interval=0.05), \
                f"watchdog {wd} of {v.name} still running"
            assert "(DEBUG) would SIGKILL hoster_ha" in v.log(), v.log()[-2000:]
        # ... and the survivor's watchdog, whose armed agent is now gone, too.
        assert c.wait_for(lambda: not our_pids(c.base), 10, interval=0.05), our_pids(c.base)
        for n in NAMES:
            calls = c[n].calls()
            assert not REBOOT_RE.search(calls), (n, calls)
            assert "bhyvectl" not in calls, (n, calls)
    finally:
        c.teardown()


# -- the agent watches its watchdog --------------------------------------------------------

def test_watchdog_sigkill_on_armed_node_fences_after_three_checks(tmp_path):
    c, _ = start_ready_cluster(tmp_path)
    try:
        manager = c.agreed_manager()
        name = next(n for n in NAMES if n != manager)
        node = c[name]
        wd = node.pid("ha_watchdog")
        assert wd and c.http_status(name).get("armed") is True
        pi = c.timings["ping_interval"]
        node.signal(signal.SIGKILL, "ha_watchdog")
        rc, elapsed = wait_exit(c, node, 3 * pi + SCHED_TOLERANCE + 5)
        print(f"{name} exited {rc} {elapsed:.2f} s after its watchdog was killed")
        log = node.log()
        assert rc == 1, (rc, log[-3000:])
        # gone at 3 consecutive checks, one per ping_interval: after >= 2 and <= 3 intervals
        assert 2 * pi - 0.1 <= elapsed <= 3 * pi + SCHED_TOLERANCE, elapsed
        emerg = [ln for ln in log.splitlines() if "EMERG:" in ln and "ha_watchdog" in ln]
        assert emerg and str(wd) in emerg[0], log[-3000:]
        assert "(DEBUG) would reboot" in log
        assert not REBOOT_RE.search(node.calls()), node.calls()
        # the other two keep quorum and keep running
        others = [n for n in NAMES if n != name]
        assert all(c[n].proc.poll() is None for n in others)
    finally:
        c.teardown()
