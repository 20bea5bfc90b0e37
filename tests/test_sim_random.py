"""Randomized simulation: many seeds of random faults, invariants after every step.

Each seed derives a fault schedule (tests/sim.py random_schedule): 3 candidates and
sometimes a worker, clock rates at most 1.1 apart, often exactly (SPEC promises safety
within 10 %), random offsets; kills, restarts, pauses (hung hosts), one-way and two-way
link cuts, lossy and slow links and isolation for FAULT_END virtual seconds, and the
honest fault model (sim.HONEST): operators' stop/leave and maintenance on/off (also when
they reach one candidate only), rolling restarts of the candidates, fast agent restarts
under the watchdog's rules, a dying watchdog, a lost term file, and a network with
jitter, spikes, requests delayed past their timeout up to the signature window,
replays and slow handlers; then everything heals and restarts.  The simulator checks after every step that at most
one node is manager, that no unarmed node fences, that no vote moves before its
lease ran out, and that terms are persisted before they are announced (see sim.py).
Liveness, weakly: 60 s after the heal exactly one manager exists and every running
node agrees on it.

The seeds run in chunks of CHUNK, each on 2 processes, or in the test process under
pytest-xdist (sim.check_seeds, sim.seed_processes).  A failing chunk
lists its failing seeds and prints the first one's schedule; replay it with

    python3 tests/sim.py --seed N

More seeds: SIM_SEEDS=5000 (a count) or SIM_SEEDS=1000-2000 (a range); make sim-soak runs
100,000 (tools/sim_soak.py).
"""

import os

import pytest

import sim


TICK = 1.0      # the control-loop tick of the random runs (coarse, for speed)
# A falling manager term is a violation (test_acting_manager_term_never_falls below).
TERM_DROP = "violation"


def _seeds():
    spec = os.environ.get("SIM_SEEDS", "2000")
    if "-" in spec:
        lo, hi = spec.split("-")
        return range(int(lo), int(hi))
    return range(int(spec))


CHUNK = 125     # seeds per test, run on 2 processes (1 under pytest-xdist: sim.check_seeds)
CHUNKS = [(s.start, s.stop) for s in (_seeds()[i:i + CHUNK]
                                      for i in range(0, len(_seeds()), CHUNK))]


def _report(seed, sch, s, what):
    tail = "".join(s.log_text().splitlines(True)[-60:])
    return (f"{what}\n\nreplay: python3 tests/sim.py --seed {seed}\n\n"
            f"{sim.format_schedule(sch)}\n\nlast lines of the log:\n{tail}")


def failing(gen, seeds, replay):
    """pytest.fail with every failing seed of the chunk and the first one's story."""
    bad = sim.check_seeds(gen, seeds, processes=sim.seed_processes())
    if not bad:
        return
    seed = bad[0][0]
    s, sch = sim.run_random(seed, tick=TICK, stop_on_violation=False, vms=gen == "failover")
    lines = [f"seed {x}: {kind}: {text}" for x, kind, text in bad]
    pytest.fail(f"{len(bad)} of {len(seeds)} seeds failed:\n  " + "\n  ".join(lines) + "\n\n"
                + _report(seed, sch, s, f"the first, {replay} {seed}"), pytrace=False)


@pytest.mark.parametrize("lo,hi", CHUNKS, ids=[f"{a}-{b}" for a, b in CHUNKS])
def test_random_faults(lo, hi):
    failing("election", range(lo, hi), "python3 tests/sim.py --seed")


def test_replay_is_deterministic():
    a, _ = sim.run_random(7, tick=TICK, term_drop=TERM_DROP)
    b, _ = sim.run_random(7, tick=TICK, term_drop=TERM_DROP)
    assert a.log_text() == b.log_text()
    assert len(a.log) > 50


# -- the checker checks: break the SPEC's assumptions and it must notice ---------------

def test_checker_catches_two_managers_when_clocks_drift_too_far():
    """Voters whose clocks run 3x fast drop their lease while the old manager still
    counts their votes: outside SPEC's 10 % bound two managers appear, and the
    simulator must say so."""
    s = sim.Sim(rates={"node2": 3.0, "node3": 3.0})
    with pytest.raises(sim.SimViolation, match="2 managers at once: node1, node2"):
        s.run([[0, "start node1"], [0, "start node2"], [0, "start node3"],
               [30, "link node1>node2 down"], [30, "link node1>node3 down"], [60, "heal"]])


def test_checker_catches_an_unarmed_fence():
    s = sim.Sim()
    s.run([[0, "start node1"], [1, "expect unarmed node1"]])
    with pytest.raises(sim.SimViolation, match="never armed"):
        s._fence(s.nodes["node1"], "node1/candidate", "test")


# -- known core bug ---------------------------------------------------------------------

# A candidate that restarts re-grants its vote with a higher term; when it later dies, the
# manager keeps its majority with the lower-term votes, and manager_term() (the highest
# *valid* vote term) falls back.  The other candidates remember the higher manager term, so
# they refuse the manager's plans and failover commands as stale (409) - and the failover of
# the dead candidate's VMs waits until some vote is granted again.
TERM_FALLS = [[0, "start node1"], [0, "start node2"], [0, "start node3"],
              [20, "restart node3"],       # re-grants node1 its vote with term 2
              [40, "expect manager node1"], [40, "expect term node1 2"],
              [50, "kill node3"],          # the term-2 vote lapses at node1
              [70, "expect manager node1"], [70, "expect term node1 2"],
              [70, "expect term node2 2"]]


def test_acting_manager_term_never_falls():
    s = sim.Sim(stop_on_violation=False)
    s.run(TERM_FALLS)
    node1, node2 = s.nodes["node1"], s.nodes["node2"]
    term = node1.core.manager_term(node1.now(s.t))
    status, answer = node2.core.handle_plan({"term": term, "entries": []}, node2.now(s.t))
    assert status == 200, f"node2 refuses the manager's plan: {answer}"
    assert not s.violations and not s.failures, s.violations + s.failures


def test_acting_manager_term_never_falls_random():
    bad = []
    for seed in range(15):
        s, _ = sim.run_random(seed, tick=TICK, term_drop="record")
        bad += [f"seed {seed}: {t}" for t in s.term_drops]
    assert not bad, "\n".join(bad[:10])
