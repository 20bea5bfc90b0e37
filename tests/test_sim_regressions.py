"""Regressions of the simulator and of the core that the honest fault model found.

Every seed of the random generators that ever failed stays here by name, with what it
found (a core bug, fixed, or a simulator artefact, fixed in tests/sim.py).  Replay one
with `python3 tests/sim.py [--vms] --seed N`.
"""

import pytest
import sim

import hoster_ha

# -- the simulator's clock ------------------------------------------------------------

def test_scheduler_refuses_events_in_the_past():
    s = sim.Sim()
    s.run([[0, "start node1"]], until=10)
    with pytest.raises(sim.SimError, match="in the past"):
        s.at(9.0, "audit")


def test_a_timeout_fires_at_send_time_plus_timeout(monkeypatch):
    """A ping on a link slower than ping_timeout to a node that is down: the sender's
    timeout fires ping_timeout after the send, not when the message reaches the dead
    node (that scheduled the timeout in the past: virtual time ran backwards, in 23 of
    300 election seeds)."""
    failures = []
    orig = hoster_ha.Core.on_ping_result

    def record(self, cand, sent_at, status, answer, now):
        if self.hostname == "node1" and cand == "node2" and status is None:
            failures.append(now - sent_at)
        return orig(self, cand, sent_at, status, answer, now)
    monkeypatch.setattr(hoster_ha.Core, "on_ping_result", record)
    s = sim.Sim()
    s.run([[0, "start node1"], [0, "start node2"], [0, "start node3"],
           [20, "link node1>node2 delay 2.5"], [21, "kill node2"]], until=40)
    assert len(failures) >= 5
    assert all(abs(f - s.timings["ping_timeout"]) < 1e-6 for f in failures), failures


@pytest.mark.parametrize("seed", [6, 31, 35])
def test_election_seeds_whose_time_ran_backwards(seed):
    """Election seeds (kind schedules) in which the old simulator scheduled timeouts in
    the past; the scheduler would now raise SimError."""
    s, _ = sim.run_random(seed, tick=1.0, honest=False)
    assert not s.failures, s.failures
