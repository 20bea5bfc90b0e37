"""Scenario tests: every folder in tests/scenarios is one story (SPEC §3.1-§3.6).

A folder holds README.md (the intent), cmds.json ([[time_seconds, "command"], ...])
and log.expect (the golden log).  The scenario runs in the deterministic simulator
(tests/sim.py, clocks at rate 1.0); its log must equal log.expect, its `expect`
commands must hold and no invariant may break.  A behaviour change shows up as a
readable diff.  To accept a change, rewrite the golden files and review them:

    UPDATE_GOLDEN=1 python3 -m pytest -q tests/test_scenarios.py
    git diff tests/scenarios
"""

import difflib
import json
import os

import pytest

import sim

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIOS = os.path.join(HERE, "scenarios")
NAMES = sorted(d for d in os.listdir(SCENARIOS)
               if os.path.isfile(os.path.join(SCENARIOS, d, "cmds.json")))
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def test_there_are_scenarios():
    assert len(NAMES) >= 7, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name):
    folder = os.path.join(SCENARIOS, name)
    with open(os.path.join(folder, "README.md")) as f:
        assert f.read().strip(), f"{name}/README.md must say what the scenario is for"
    with open(os.path.join(folder, "cmds.json")) as f:
        cmds = json.load(f)
    assert isinstance(cmds, list) and all(
        isinstance(c, list) and len(c) == 2 and isinstance(c[1], str) for c in cmds), \
        f"{name}/cmds.json must be a list of [time_seconds, \"command\"]"
    assert any(c[1].startswith("expect ") for c in cmds), f"{name} asserts nothing"

    s = sim.run_scenario(folder)    # raises SimViolation if an invariant breaks
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
    folder = os.path.join(SCENARIOS, NAMES[0])
    assert sim.run_scenario(folder).log_text() == sim.run_scenario(folder).log_text()


def test_failed_expectation_is_reported():
    s = sim.Sim().run([[0, "start node1"], [0, "start node2"], [0, "start node3"],
                       [30, "expect manager node2"], [30, "expect fenced node3"]])
    assert len(s.failures) == 2
    assert "managers: ['node1']" in s.failures[0]
    assert "node3 is running" in s.failures[1]


def test_bad_command_is_refused():
    with pytest.raises(ValueError, match="bad command"):
        sim.Sim().run([[0, "explode node1"]])
