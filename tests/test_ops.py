"""Issue 14 (operating it): warnings before a fence, metrics, notifications, restart
order, the cluster view and the events' inputs.  Core-level tests drive Core objects
with explicit `now` values (the helpers of test_core / test_failover_core)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

import hoster_ha
from test_core import (SURVIVAL, PING_INTERVAL, _armed_worker, events, run, run_round)

# -- item 2: approaching self-fence ---------------------------------------------


def _all(cores):
    return {n: c.take_actions() for n, c in cores.items()}


def test_warning_when_one_candidate_away_from_fence_then_notice_when_it_clears():
    cores, w = _armed_worker()
    cut = {("w", "a")}
    acks = {"w": True}
    # a is silent from t=6: still "reachable" until 5 + SURVIVAL, then 2 of 3
    run(cores, 6.0, 5.0 + SURVIVAL, cut=cut, acks=acks)
    assert events(w.take_actions(), "fence_warning") == []
    t = run(cores, 5.0 + SURVIVAL + 1, 5.0 + SURVIVAL + 1 + PING_INTERVAL, cut=cut, acks=acks)
    assert len(w.reachable(t)) == 2
    # exactly 2 reachable, but not yet for more than ping_interval: no warning
    assert events(w.take_actions(), "fence_warning") == []
    t = run(cores, t + 0.5, t + 3.0, cut=cut, acks=acks)
    acts = w.take_actions()
    warn = events(acts, "fence_warning")
    assert len(warn) == 1, acts
    assert warn[0]["level"] == "WARNING"
    assert warn[0]["msg"].startswith("approaching self-fence: 2 of 3 candidates reachable")
    assert "fence in" in warn[0]["msg"] and "if one more is lost" in warn[0]["msg"]
    assert sorted(warn[0]["details"]["reachable"]) == ["b", "c"]
    assert w.status(t)["approaching_fence"] is True
    # once, not every tick; never a fence while 2 are reachable
    t = run(cores, t + 1, t + 10, cut=cut, acks=acks)
    acts = w.take_actions()
    assert events(acts, "fence_warning") == [] and not [a for a in acts if a["kind"] == "fence"]
    # a answers again: one NOTICE
    t = run(cores, t + 1, t + 3, acks=acks)
    acts = w.take_actions()
    note = events(acts, "fence_warning_cleared")
    assert len(note) == 1 and note[0]["level"] == "NOTICE"
    assert w.status(t)["approaching_fence"] is False
    t = run(cores, t + 1, t + 5, acks=acks)
    assert events(w.take_actions(), "fence_warning_cleared") == []


def test_no_warning_on_an_unarmed_node():
    cores, w = _armed_worker()
    w.armed = False          # as if in maintenance: not armed, nothing to warn about
    w.maintenance = True
    run(cores, 6.0, 30.0, cut={("w", "a")}, acks={"w": True})
    assert events(w.take_actions(), "fence_warning") == []


def test_survival_margin_and_silence_ages():
    cores, w = _armed_worker()
    run_round(cores, 6.0, acks={"w": True})
    assert w.survival_margin(6.0) == pytest.approx(SURVIVAL)
    assert w.survival_margin(8.0) == pytest.approx(SURVIVAL - 2)
    assert w.silence_ages(8.0) == {"a": 2.0, "b": 2.0, "c": 2.0}
    assert w.survival_margin(6.0 + SURVIVAL + 1) == 0.0
