"""Scenario tests: every folder in tests/scenarios is one story (SPEC §3.1-§3.6).

A folder keeps the world apart from what happens to it (like pve-ha-manager's test
folders, hardware_status apart from cmdlist):

  README.md    the intent: what the story shows and why it matters;
  setup.json   the world before time 0: hosts with other than default properties, and
               every VM copy (a Hoster dataset) with its properties;
  cmds.json    what happens and what must hold: [[time_seconds, "command"], ...], the
               simulator's commands (tests/sim.py's docstring lists them) other than
               `host` and `vm`, which belong in setup.json; `expect ...` lines are timed
               checks among the events (a check reads right after the event it is
               about, and one list keeps an event and a check of the same second in
               order);
  log.expect   the golden log.

setup.json (every key optional; an empty world is {"hosts": {}, "copies": []}):

  {
    "hosts": {
      "worker3": {"free_gib": 16, "backup": true}
    },
    "copies": [
      {"host": "worker1", "vm": "vmA", "snapshot": 400, "live": true},
      {"host": "worker2", "vm": "vmA", "parent": "worker1", "snapshot": 300}
    ]
  }

  hosts    NAME -> free_gib (free memory, default 8), backup (a backup node: true/false,
           default false), confirms_fence (false: its fence confirmations, POST fenced,
           never leave the host; default true), bmc (the candidates' fence command for it, issue 13 item 5:
           "off" powers it off, "fail" exits 1, "hang" never returns; default none).  Candidates node1-node3 always exist; a worker exists once a
           command or a copy names it, so list here only hosts that differ.
  copies   one VM dataset on one host: host, vm (required); parent (its parent_host,
           default the host itself), production (default true), snapshot (creation time
           of its newest snapshot, default none), live (running, default false),
           memory_gib (default 1).

The world becomes the simulator's `host` and `vm` commands at time 0 (setup_commands
below), hosts first, then the copies in the order listed; the golden log shows them as
its first `cmd` lines, before the events of cmds.json.  The order is kept as written
because it is the order in which the simulator learns about hosts and VMs, which shows
in the log.

The scenario runs in the deterministic simulator (clocks at rate 1.0); its log must equal
log.expect, its `expect` commands must hold and no invariant may break.  A behaviour
change shows up as a readable diff.  To accept a change, rewrite the golden files and
review them:

    UPDATE_GOLDEN=1 python3 -m pytest -q tests/test_scenarios.py
    git diff tests/scenarios

Run one scenario and print its log:

    python3 tests/test_scenarios.py tests/scenarios/NAME
"""

import difflib
import json
import os
import sys

import pytest

import sim

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIOS = os.path.join(HERE, "scenarios")
NAMES = sorted(d for d in os.listdir(SCENARIOS)
               if os.path.isfile(os.path.join(SCENARIOS, d, "cmds.json")))
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
SETUP_COMMANDS = ("host", "vm")      # in setup.json, never in cmds.json


# -- the folder format --------------------------------------------------------------------

class ScenarioFormatError(ValueError):
    """A setup.json or cmds.json that does not follow the format above."""


def _number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ScenarioFormatError(f"{what}: a number >= 0, not {value!r}")
    return str(int(value)) if value == int(value) else repr(float(value))


def _check_keys(d, allowed, what):
    if not isinstance(d, dict):
        raise ScenarioFormatError(f"{what}: an object, not {d!r}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ScenarioFormatError(f"{what}: unknown key(s) {unknown} "
                                  f"(allowed: {', '.join(allowed)})")


def _flag(d, key, what, default):
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ScenarioFormatError(f"{what}: {key} is true or false, not {value!r}")
    return value


def _name(value, what):
    if not isinstance(value, str) or value.split() != [value]:
        raise ScenarioFormatError(f"{what} must be a name, not {value!r}")
    return value


def setup_commands(setup):
    """The simulator's commands for a setup.json: `host NAME ...` for each host, then
    `vm HOST NAME ...` for each copy, in the order written, with only the options that
    differ from the defaults (the command's own option order)."""
    _check_keys(setup, ("hosts", "copies"), "setup.json")
    hosts, copies = setup.get("hosts", {}), setup.get("copies", [])
    if not isinstance(hosts, dict):
        raise ScenarioFormatError(f"setup.json hosts: an object, not {hosts!r}")
    if not isinstance(copies, list):
        raise ScenarioFormatError(f"setup.json copies: a list, not {copies!r}")
    out = []
    for name, h in hosts.items():
        what = f"setup.json host {name!r}"
        _check_keys(h, ("free_gib", "backup", "confirms_fence", "bmc"), what)
        words = ["host", _name(name, what)]
        if "free_gib" in h:
            words.append("free=" + _number(h["free_gib"], what + " free_gib"))
        if "backup" in h:
            words.append("backup=" + ("1" if _flag(h, "backup", what, False) else "0"))
        if "confirms_fence" in h:
            words.append("confirm=" + ("1" if _flag(h, "confirms_fence", what, True) else "0"))
        if "bmc" in h:
            if h["bmc"] not in ("off", "fail", "hang"):
                raise ScenarioFormatError(f"{what} bmc: off, fail or hang, not {h['bmc']!r}")
            words.append("bmc=" + h["bmc"])
        out.append(" ".join(words))
    for i, c in enumerate(copies):
        what = f"setup.json copy {i + 1}"
        _check_keys(c, ("host", "vm", "parent", "production", "snapshot", "live",
                        "memory_gib"), what)
        host, vm = _name(c.get("host"), what + " host"), _name(c.get("vm"), what + " vm")
        words = ["vm", host, vm]
        if c.get("parent", host) != host:
            words.append("parent=" + _name(c["parent"], what + " parent"))
        if not _flag(c, "production", what, True):
            words.append("production=0")
        snap = c.get("snapshot")
        if snap is not None:
            if isinstance(snap, bool) or not isinstance(snap, int):
                raise ScenarioFormatError(f"{what}: snapshot is a creation time (int) or null")
            words.append(f"snapshot={snap}")
        if _flag(c, "live", what, False):
            words.append("live=1")
        if "memory_gib" in c:
            words.append("memory=" + _number(c["memory_gib"], what + " memory_gib"))
        out.append(" ".join(words))
    return out


def load_scenario(folder):
    """A scenario folder as the simulator's command list: setup.json's commands at time 0,
    then cmds.json's."""
    name = os.path.basename(os.path.normpath(folder))
    with open(os.path.join(folder, "setup.json")) as f:
        setup = setup_commands(json.load(f))
    with open(os.path.join(folder, "cmds.json")) as f:
        cmds = json.load(f)
    if not (isinstance(cmds, list) and all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[1], str)
            and isinstance(c[0], (int, float)) and not isinstance(c[0], bool)
            for c in cmds)):
        raise ScenarioFormatError(
            f"{name}/cmds.json must be a list of [time_seconds, \"command\"]")
    misplaced = [c for _, c in cmds if (c.split() or [""])[0] in SETUP_COMMANDS]
    if misplaced:
        raise ScenarioFormatError(f"{name}/cmds.json: {misplaced[0]!r} describes the world "
                                  f"before time 0: it belongs in setup.json")
    return [[0.0, c] for c in setup] + [[float(t), c] for t, c in cmds]


def run_scenario(folder, seed=0):
    """Run a scenario folder (clocks at rate 1.0).  Returns the Sim; .log_text(), .failures."""
    return sim.Sim(seed=seed).run(load_scenario(folder))


# -- the scenarios --------------------------------------------------------------------------

def test_there_are_scenarios():
    assert len(NAMES) >= 7, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name):
    folder = os.path.join(SCENARIOS, name)
    with open(os.path.join(folder, "README.md")) as f:
        assert f.read().strip(), f"{name}/README.md must say what the scenario is for"
    cmds = load_scenario(folder)    # ScenarioFormatError: a malformed setup.json or cmds.json
    assert any(c[1].startswith("expect ") for c in cmds), f"{name} asserts nothing"

    s = sim.Sim().run(cmds)         # raises SimViolation if an invariant breaks
    got = s.log_text()
    golden = os.path.join(folder, "log.expect")
    if UPDATE:
        with open(golden, "w") as f:
            f.write(got)
    if not os.path.exists(golden):
        pytest.fail(f"{name}: no log.expect; run with UPDATE_GOLDEN=1 and review it")
    with open(golden) as f:
        want = f.read()
    if got != want:
        diff = "".join(difflib.unified_diff(
            want.splitlines(True), got.splitlines(True),
            fromfile=f"{name}/log.expect", tofile=f"{name} (this run)"))
        pytest.fail(f"{name}: log differs from log.expect "
                    f"(UPDATE_GOLDEN=1 rewrites it):\n{diff}", pytrace=False)
    assert not s.failures, f"{name}: expectations failed:\n" + "\n".join(s.failures)


def test_scenarios_are_deterministic():
    def has_vms(name):
        with open(os.path.join(SCENARIOS, name, "setup.json")) as f:
            return bool(json.load(f).get("copies"))
    folder = os.path.join(SCENARIOS, next(n for n in NAMES if has_vms(n)))
    assert run_scenario(folder).log_text() == run_scenario(folder).log_text()


def test_failed_expectation_is_reported():
    s = sim.Sim().run([[0, "start node1"], [0, "start node2"], [0, "start node3"],
                       [30, "expect manager node2"], [30, "expect fenced node3"]])
    assert len(s.failures) == 2
    assert "managers: ['node1']" in s.failures[0]
    assert "node3 is running" in s.failures[1]


def test_bad_command_is_refused():
    with pytest.raises(ValueError, match="bad command"):
        sim.Sim().run([[0, "explode node1"]])


def test_setup_json_becomes_the_simulators_time_zero_commands():
    """Hosts first, then the copies as written; only options that differ from the
    defaults, in the `vm` command's own order."""
    setup = {"hosts": {"worker3": {"free_gib": 16, "backup": True}, "worker4": {"free_gib": 2.5},
                       "worker5": {"backup": False}},
             "copies": [{"host": "worker1", "vm": "vmA", "snapshot": 400, "live": True},
                        {"host": "worker2", "vm": "vmA", "parent": "worker1", "snapshot": 300,
                         "live": False, "production": True},
                        {"host": "worker2", "vm": "dev1", "parent": "worker2",
                         "production": False, "snapshot": None, "memory_gib": 4},
                        {"live": True, "memory_gib": 0.5, "vm": "vmB", "host": "node2"}]}
    assert setup_commands(setup) == [
        "host worker3 free=16 backup=1", "host worker4 free=2.5", "host worker5 backup=0",
        "vm worker1 vmA snapshot=400 live=1", "vm worker2 vmA parent=worker1 snapshot=300",
        "vm worker2 dev1 production=0 memory=4", "vm node2 vmB live=1 memory=0.5"]
    assert setup_commands({}) == setup_commands({"hosts": {}, "copies": []}) == []
    s = sim.Sim().run([[0, c] for c in setup_commands(setup)])
    assert list(s.nodes)[3:] == ["worker3", "worker4", "worker5", "worker1", "worker2"]
    assert s.nodes["worker2"].vms["vmA"]["parent"] == "worker1"
    assert s.nodes["worker2"].vms["dev1"]["production"] is False


@pytest.mark.parametrize("setup, message", [
    ({"vms": []}, "unknown key"),
    ({"hosts": []}, "hosts: an object"),
    ({"hosts": {"worker3": {"free": 16}}}, "unknown key"),
    ({"hosts": {"worker3": {"backup": 1}}}, "true or false"),
    ({"hosts": {"worker3": {"free_gib": "16"}}}, "a number"),
    ({"copies": {}}, "copies: a list"),
    ({"copies": [{"vm": "vmA"}]}, "copy 1 host must be a name"),
    ({"copies": [{"host": "worker1", "vm": "vm A"}]}, "copy 1 vm must be a name"),
    ({"copies": [{"host": "worker1", "vm": "vmA", "snapshot": "400"}]}, "creation time"),
    ({"copies": [{"host": "worker1", "vm": "vmA", "live": "yes"}]}, "true or false"),
    ({"copies": [{"host": "worker1", "vm": "vmA", "runs": True}]}, "unknown key"),
])
def test_bad_setup_json_is_refused(setup, message):
    with pytest.raises(ScenarioFormatError, match=message):
        setup_commands(setup)


def test_world_in_cmds_json_is_refused(tmp_path):
    """A `vm` or `host` line in cmds.json belongs in setup.json."""
    (tmp_path / "setup.json").write_text("{}")
    (tmp_path / "cmds.json").write_text(
        '[[0, "start node1"], [0, "vm worker1 vmA live=1"], [9, "expect running node1"]]')
    with pytest.raises(ScenarioFormatError, match="belongs in setup.json"):
        load_scenario(str(tmp_path))
    (tmp_path / "cmds.json").write_text('[[0, "start node1"], [9, "expect running node1"]]')
    assert load_scenario(str(tmp_path)) == [[0.0, "start node1"], [9.0, "expect running node1"]]
    (tmp_path / "cmds.json").write_text('[["0", "start node1"]]')
    with pytest.raises(ScenarioFormatError, match="list of"):
        load_scenario(str(tmp_path))


def main(argv=None):
    """Run one scenario folder and print its log (and any failed expectation)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        sys.stderr.write("usage: python3 tests/test_scenarios.py tests/scenarios/NAME\n")
        return 2
    s = run_scenario(argv[0])
    sys.stdout.write(s.log_text())
    return 1 if s.failures or s.violations else 0


if __name__ == "__main__":
    sys.exit(main())
