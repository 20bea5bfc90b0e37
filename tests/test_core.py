"""Unit tests for the pure cluster core of hoster_ha.py (SPEC §3.1-§3.3).

Every test drives Core objects directly with explicit `now` values: no threads,
no sockets, no sleeps.  A "round" delivers each node's requests to every
candidate synchronously (a.outgoing → b.handle_register/handle_ping →
a.on_register_result/on_ping_result) and then ticks every node.
"""

import pytest

import hoster_ha
from hoster_ha import Core, PING_ANSWER_FIELDS, check_fields, parse_config

# -- fixtures ------------------------------------------------------------------

# Timings chosen small and distinct so the tests can tell them apart:
# failover_time 20 >= survival_window 5 + watchdog 3 + fence 3 + 2*1 + 5 = 18.
PING_INTERVAL = 1
PING_TIMEOUT = 0.5
SURVIVAL = 5
LEASE = 3
TIMINGS = {"ping_interval": PING_INTERVAL, "ping_timeout": PING_TIMEOUT,
           "survival_window": SURVIVAL, "vote_lease": LEASE, "watchdog_timeout": 3,
           "fence_timeout": 3, "failover_time": 20}

CANDIDATES = [
    {"hostname": "a", "address": "127.0.0.1", "port": 9001},
    {"hostname": "b", "address": "127.0.0.1", "port": 9002},
    {"hostname": "c", "address": "127.0.0.1", "port": 9003},
]
SECRET = "0123456789abcdef0123"


def make_cfg(hostname, **extra):
    data = {"candidates": [dict(c) for c in CANDIDATES], "hostname": hostname,
            "secret": SECRET, **TIMINGS}
    if hostname not in ("a", "b", "c"):
        data.setdefault("address", "127.0.0.9")
        data.setdefault("port", 9100)
    data.update(extra)
    return parse_config(data, "<test>")


STARTUPS = {"a": 1000, "b": 2000, "c": 3000, "w": 4000}


def make_core(hostname, now=0.0, startup=None, **kw):
    return Core(make_cfg(hostname), STARTUPS.get(hostname, 5000) if startup is None else startup,
                now, **kw)


def make_cluster(names=("a", "b", "c"), now=0.0, startups=None):
    startups = startups or STARTUPS
    return {n: Core(make_cfg(n), startups[n], now) for n in names}


def deliver(src, dst, now, delay=0.0):
    """One request from src to candidate dst, answered at once, received at now+delay.

    Returns (kind, status, answer)."""
    for cand, kind, body in src.outgoing(now):
        if cand != dst.hostname:
            continue
        if kind == "register":
            status, answer = dst.handle_register(body, now)
            src.on_register_result(cand, status, answer, now + delay)
        else:
            status, answer = dst.handle_ping(body, now)
            src.on_ping_result(cand, now, status, answer, now + delay)
        return kind, status, answer
    raise AssertionError(f"{src.hostname} has no request for {dst.hostname}")


def run_round(cores, now, cut=(), acks=None):
    """Every node sends to every candidate in `cores` except directed links in `cut`
    ((src, dst) pairs whose request is lost), then every node ticks."""
    for s in cores.values():
        for d in s.candidates:
            if d in cores and (s.hostname, d) not in cut:
                deliver(s, cores[d], now)
    for n, core in cores.items():
        core.tick(now, watchdog_armed=bool(acks and acks.get(n)))


def run(cores, start, end, step=1.0, cut=(), acks=None):
    t = start
    while t <= end + 1e-9:
        run_round(cores, t, cut, acks)
        t += step
    return t - step


def actions(core, kind=None):
    out = core.take_actions()
    return [a for a in out if kind is None or a["kind"] == kind]


def events(acts, name):
    return [a for a in acts if a["kind"] == "event" and a["event"] == name]


def answer(vote=None, vote_startup_time=None, vote_term=0, vote_lease_ms=LEASE * 1000,
           manager=None, term=0, hostname="x", term_seen=0):
    return {"hostname": hostname, "vote": vote, "vote_startup_time": vote_startup_time,
            "vote_term": vote_term, "vote_lease_ms": vote_lease_ms, "manager": manager,
            "term": term, "term_seen": term_seen}


def elect(cores, until=4.0):
    """Bring the cluster up from t=0 and run rounds until `until` (a wins with startups above)."""
    return run(cores, 0.0, until)


# -- votes: start-up quiet period and preference --------------------------------

def test_no_vote_during_first_vote_lease_after_start():
    cores = make_cluster()
    run(cores, 0.0, LEASE - 0.5, step=0.5)
    for c in cores.values():
        assert c.vote is None
        assert actions(c, "persist_term") == []
        assert c.election.ping_answer(LEASE - 0.5)["vote"] is None
    run_round(cores, float(LEASE))
    for c in cores.values():
        assert c.vote is not None and c.vote.holder == "a"


def test_quiet_period_counts_from_own_start_not_cluster_start():
    cores = make_cluster()
    elect(cores)
    # b restarts at t=10: its new incarnation must not vote until t=13
    cores["b"] = make_core("b", now=10.0, startup=9000)
    run(cores, 10.0, 12.5, step=0.5)
    assert cores["b"].vote is None
    run_round(cores, 13.0)
    assert cores["b"].vote is not None and cores["b"].vote.holder == "a"


def test_preference_is_earliest_startup_time_among_alive():
    cores = make_cluster(startups={"a": 3000, "b": 2000, "c": 1000})
    run(cores, 0.0, LEASE)
    for c in cores.values():
        assert c.vote.holder == "c"
        assert c.vote.holder_startup == 1000


def test_preference_ties_broken_by_hostname():
    cores = make_cluster(startups={"a": 7000, "b": 5000, "c": 5000})
    run(cores, 0.0, LEASE)
    for c in cores.values():
        assert c.vote.holder == "b"


def test_preference_ignores_candidates_never_seen():
    # a has the earliest startup_time but never reaches b or c
    cores = make_cluster()
    run(cores, 0.0, LEASE, cut={("a", "b"), ("a", "c")})
    assert cores["b"].vote.holder == "b"
    assert cores["c"].vote.holder == "b"
    assert cores["a"].vote.holder == "a"


def test_preference_ignores_candidate_silent_longer_than_survival_window():
    cores = make_cluster()
    elect(cores)                       # everybody votes a; a pings until t=4
    assert cores["b"].vote.holder == "a"
    cut = {("a", "b"), ("a", "c")}
    # b's vote for a was renewed at t=4: lease runs out at t=7, but a is still
    # alive in b's view (last ping t=4) until t=9, so the vote is not moved.
    run(cores, 5.0, 9.0, cut=cut)
    assert cores["b"].vote.holder == "a"
    run_round(cores, 9.5, cut=cut)     # a silent 5.5 s > survival_window
    assert cores["b"].vote.holder == "b"
    assert cores["c"].vote.holder == "b"


# -- renewal -----------------------------------------------------------------------

def test_ping_from_current_holder_renews_vote():
    cores = make_cluster()
    elect(cores)
    b = cores["b"]
    assert b.vote.holder == "a"
    deliver(cores["a"], b, 4.7)
    assert b.vote.renewed_at == 4.7


def test_ping_from_other_member_does_not_renew():
    cores = make_cluster()
    elect(cores)
    b = cores["b"]
    before = b.vote.renewed_at
    deliver(cores["c"], b, 4.7)
    assert b.vote.renewed_at == before


def test_restarted_holder_does_not_renew_vote_for_old_incarnation():
    cores = make_cluster()
    elect(cores)                                   # b votes a@1000, renewed at t=4
    b = cores["b"]
    assert (b.vote.holder, b.vote.holder_startup, b.vote.renewed_at) == ("a", 1000, 4.0)
    old_term = b.vote.term
    a2 = make_core("a", now=4.5, startup=1500)     # a restarts: new incarnation
    cores["a"] = a2
    assert deliver(a2, b, 4.5)[0] == "register"
    for t in (5.0, 6.0, 6.9):
        kind, status, ans = deliver(a2, b, t)
        assert (kind, status) == ("ping", 200)
        assert b.vote.renewed_at == 4.0, "a new incarnation renewed the old one's vote"
        assert ans["vote_startup_time"] == 1000
        # and a2 does not count a vote given to its previous incarnation
        assert "b" not in a2.valid_votes(t)
        b.tick(t)
        assert b.vote.holder_startup == 1000       # lease (from t=4) not run out yet
    b.take_actions()
    deliver(a2, b, 7.0)
    b.tick(7.0)                                    # 7.0 - 4.0 >= vote_lease
    assert (b.vote.holder, b.vote.holder_startup) == ("a", 1500)
    assert b.vote.term > old_term
    assert actions(b, "persist_term") == [{"kind": "persist_term", "term": b.vote.term}]


# -- switching -----------------------------------------------------------------------

def test_remote_vote_not_moved_before_lease_runs_out_and_moved_after():
    cores = make_cluster(startups={"a": 1000, "b": 2000, "c": 500})
    a, b, c = cores["a"], cores["b"], cores["c"]
    for t in (0.0, 1.0, 2.0, 3.0):     # only a and b talk to b; c is unseen
        deliver(a, b, t)
        b.tick(t)
    assert (b.vote.holder, b.vote.renewed_at) == ("a", 3.0)
    term_a = b.vote.term
    # c (earliest startup_time) appears; a keeps pinging: the vote stays with a
    for t in (4.0, 5.0, 6.0, 7.0, 8.0):
        deliver(a, b, t)
        deliver(c, b, t)
        b.tick(t)
        assert b.vote.holder == "a"
        assert b.vote.renewed_at == t
    b.take_actions()
    # a falls silent after t=8: not moved while now - renewed_at < vote_lease
    for t in (9.0, 10.0, 10.999):
        deliver(c, b, t)
        b.tick(t)
        assert b.vote.holder == "a", t
    assert actions(b, "persist_term") == []
    deliver(c, b, 11.0)
    b.tick(11.0)                       # 11.0 - 8.0 == vote_lease: moved
    assert b.vote.holder == "c"
    assert b.vote.holder_startup == 500
    assert b.vote.term == term_a + 1


def test_self_vote_is_given_up_at_once():
    cores = make_cluster()
    a, b = cores["a"], cores["b"]
    for t in (0.0, 1.0, 2.0, 3.0):     # b alone
        deliver(b, b, t)
        b.tick(t)
    assert b.vote.holder == "b"
    assert "b" in b.valid_votes(3.0)
    self_term = b.vote.term
    b.take_actions()
    deliver(a, b, 3.2)                 # a (earlier startup) registers
    b.tick(3.2)                        # only 0.2 s after the last self-renewal
    assert (b.vote.holder, b.vote.holder_startup) == ("a", 1000)
    assert b.vote.term == self_term + 1
    assert "b" not in b.valid_votes(3.2)
    acts = b.take_actions()
    assert {"kind": "persist_term", "term": self_term + 1} in acts


def test_self_vote_is_renewed_every_tick():
    cores = make_cluster()
    b = cores["b"]
    for t in (0.0, 1.0, 2.0, 3.0, 10.0, 20.0):   # no pings at all: the tick alone renews
        b.tick(t)
        if b.vote:
            assert b.vote.renewed_at == t
    assert b.vote.holder == "b"
    assert b.vote.term == 1            # a renewal is not a new grant


# -- terms ------------------------------------------------------------------------------

def test_new_grant_emits_persist_term_in_same_tick_before_vote_event():
    cores = make_cluster()
    run(cores, 0.0, LEASE - 1)
    b = cores["b"]
    b.take_actions()
    run_round(cores, float(LEASE))
    acts = b.take_actions()
    kinds = [(x["kind"], x.get("event")) for x in acts]
    assert ("persist_term", None) in kinds
    p = kinds.index(("persist_term", None))
    assert ("event", "vote") in kinds and p < kinds.index(("event", "vote"))
    assert acts[p]["term"] == b.vote.term == 1
    # a renewal is not a grant: no further persist_term
    run_round(cores, LEASE + 1.0)
    assert actions(b, "persist_term") == []


def test_persist_term_precedes_any_observation_of_the_vote():
    b = make_core("b")
    b.tick(0.0)
    b.take_actions()
    assert b.election.ping_answer(3.0)["vote"] is None
    b.tick(3.0)
    # the vote is visible only after this tick; its persist action is in this tick's batch
    assert b.election.ping_answer(3.0)["vote"] == "b"
    acts = b.take_actions()
    assert acts[0] == {"kind": "persist_term", "term": 1}


def test_persisted_term_7_grants_term_8():
    b = make_core("b", persisted_term=7)
    b.tick(LEASE)
    assert b.vote.term == 8
    assert actions(b, "persist_term") == [{"kind": "persist_term", "term": 8}]


def test_grant_term_is_max_of_persisted_and_seen_plus_one():
    b = make_core("b", persisted_term=3)
    b.on_ping_result("c", 1.0, 200, answer(vote="c", vote_startup_time=3000, vote_term=41,
                                           term=0), 1.1)
    b.tick(LEASE)
    assert b.vote.term == 42
    c = make_core("c", persisted_term=3)
    c.on_ping_result("a", 1.0, 200, answer(manager="a", term=17, vote_term=2), 1.1)
    c.tick(LEASE)
    assert c.vote.term == 18
    # a term seen in an incoming ping counts too
    a = make_core("a", persisted_term=3)
    w = make_core("w")
    a.handle_register(w.link.register_body(), 1.0)
    body = dict(w.link.ping_body(1.0), term=99)
    assert a.handle_ping(body, 1.5)[0] == 200
    a.tick(LEASE)
    assert a.vote.term == 100
    # and the persisted term wins when it is the larger
    d = make_core("b", persisted_term=50)
    d.on_ping_result("c", 1.0, 200, answer(vote_term=20, term=20), 1.1)
    d.tick(LEASE)
    assert d.vote.term == 51


def test_successive_grants_strictly_increase_terms():
    cores = make_cluster(startups={"a": 1000, "b": 2000, "c": 500})
    a, b, c = cores["a"], cores["b"], cores["c"]
    terms = []
    for t in (0.0, 1.0, 2.0, 3.0):
        deliver(b, b, t)
        b.tick(t)
    terms.append(b.vote.term)           # self
    deliver(a, b, 3.5)
    b.tick(3.5)
    terms.append(b.vote.term)           # a (self-vote given up)
    for t in (4.0, 5.0, 6.0, 7.0):
        deliver(c, b, t)
        b.tick(t)
    terms.append(b.vote.term)           # c after a's lease ran out
    assert [b.vote.holder] == ["c"]
    assert terms == sorted(set(terms)) and len(terms) == 3


# -- vote validity on the holder's side ------------------------------------------------

def test_vote_counts_until_send_time_plus_0_9_lease():
    a = make_core("a")
    a.on_ping_result("b", 10.0, 200, answer(vote="a", vote_startup_time=1000, vote_term=5),
                     10.2)
    assert a.valid_votes(10.2) == {"b": 5}
    assert "b" in a.valid_votes(10.0 + 0.9 * LEASE - 0.001)
    assert "b" not in a.valid_votes(10.0 + 0.9 * LEASE)
    assert "b" not in a.valid_votes(10.0 + LEASE)


def test_vote_validity_uses_the_shorter_of_the_two_leases():
    a = make_core("a")
    a.on_ping_result("b", 10.0, 200, answer(vote="a", vote_startup_time=1000, vote_term=5,
                                            vote_lease_ms=1000), 10.2)
    assert "b" in a.valid_votes(10.89)
    assert "b" not in a.valid_votes(10.91)


def test_vote_for_other_incarnation_or_other_holder_does_not_count():
    a = make_core("a")
    a.on_ping_result("b", 10.0, 200, answer(vote="a", vote_startup_time=999, vote_term=5),
                     10.1)
    a.on_ping_result("c", 10.0, 200, answer(vote="b", vote_startup_time=1000, vote_term=5),
                     10.1)
    assert a.valid_votes(10.1) == {}


def test_manager_needs_two_of_three_valid_votes_and_term_is_highest():
    a = make_core("a")
    a.on_ping_result("b", 10.0, 200, answer(vote="a", vote_startup_time=1000, vote_term=4,
                                            term_seen=9), 10.1)
    assert not a.is_manager(10.1)
    a.on_ping_result("c", 10.5, 200, answer(vote="a", vote_startup_time=1000, vote_term=9,
                                            term_seen=9), 10.6)
    assert a.is_manager(10.6)
    assert a.manager_term(10.6) == 9
    assert a.can_act(10.6)
    assert a.manager_view(10.6) == ("a", 9)
    # b's vote (sent 10.0) expires at 12.7, c's (sent 10.5) at 13.2
    assert a.is_manager(12.69)
    assert not a.is_manager(12.71)
    assert a.valid_votes(12.71) == {"c": 9}
    assert a.manager_term(13.21) == 0


def test_manager_acts_only_once_two_voters_persisted_its_term():
    a = make_core("a")
    a.on_ping_result("b", 10.0, 200, answer(vote="a", vote_startup_time=1000, vote_term=4,
                                            term_seen=4), 10.1)
    a.on_ping_result("c", 10.5, 200, answer(vote="a", vote_startup_time=1000, vote_term=9,
                                            term_seen=9), 10.6)
    assert a.is_manager(10.6) and a.manager_term(10.6) == 9
    assert not a.can_act(10.6), "b has not persisted term 9 yet"
    assert a.manager_view(10.6) == (None, 0)
    assert a.link.ping_body(10.6)["manager"] is False and a.link.ping_body(10.6)["term"] == 9
    a.on_ping_result("b", 11.0, 200, answer(vote="a", vote_startup_time=1000, vote_term=4,
                                            term_seen=9), 11.1)
    assert a.can_act(11.1)
    assert a.link.ping_body(11.1)["manager"] is True


def test_a_candidate_persists_a_higher_term_before_answering_a_ping():
    cores = {n: make_core(n) for n in "abc"}
    a, b = cores["a"], cores["b"]
    deliver(b, a, 0.0)                         # b registers with a
    a.take_actions()
    body = dict(b.link.ping_body(1.0), term=7)
    status, ans = a.handle_ping(body, 1.0)
    assert status == 200 and ans["term_seen"] == 7
    assert {"kind": "persist_term", "term": 7} in a.take_actions()


def test_own_vote_counts_like_any_other():
    a = make_core("a")
    a.tick(LEASE)                      # a votes for itself
    assert a.valid_votes(LEASE) == {"a": 1}
    assert not a.is_manager(LEASE)
    a.on_ping_result("c", 3.0, 200, answer(vote="a", vote_startup_time=1000, vote_term=2), 3.1)
    assert a.is_manager(3.1)
    assert a.manager_term(3.1) == 2


def test_worker_never_counts_votes():
    w = make_core("w")
    for c in ("a", "b", "c"):
        w.on_ping_result(c, 1.0, 200, answer(vote="w", vote_startup_time=4000, vote_term=3), 1.1)
    assert w.valid_votes(1.1) == {}
    assert not w.is_manager(1.1)


def test_full_election_single_manager_and_views():
    cores = make_cluster()
    w = make_core("w")
    cores["w"] = w
    elect(cores, until=4.0)
    a = cores["a"]
    assert a.is_manager(4.0)
    assert not cores["b"].is_manager(4.0) and not cores["c"].is_manager(4.0)
    term = a.manager_term(4.0)
    assert term >= 1
    acts = a.take_actions()
    assert len(events(acts, "manager_elected")) == 1
    run_round(cores, 5.0)
    for n in ("b", "c"):
        assert cores[n].manager_view(5.0) == ("a", term)
    assert w.manager_view(5.0) == ("a", term)
    assert w.status(5.0)["role"] == "worker"
    assert a.status(5.0)["role"] == "manager"
    assert cores["b"].status(5.0)["role"] == "candidate"


def test_manager_loses_office_when_votes_lapse():
    cores = make_cluster()
    elect(cores)
    a = cores["a"]
    assert a.is_manager(4.0)
    a.take_actions()
    # a's pings to b and c are lost from t=5; its last votes came with pings sent at t=4
    cut = {("a", "b"), ("a", "c")}
    run_round(cores, 5.0, cut=cut)
    run_round(cores, 6.0, cut=cut)
    assert a.is_manager(6.0)           # 6.0 < 4.0 + 2.7
    run_round(cores, 6.71, cut=cut)
    assert not a.is_manager(6.71)
    assert len(events(a.take_actions(), "manager_lost")) == 1


# -- membership: 409 and re-registration ---------------------------------------------------

def test_ping_from_unregistered_member_gets_409_and_member_reregisters():
    cores = make_cluster()
    elect(cores)
    a = cores["a"]
    b2 = make_core("b", now=5.0, startup=6000)      # b restarts: empty member table
    cores["b"] = b2
    kind, status, ans = deliver(a, b2, 5.0)
    assert (kind, status) == ("ping", 409)
    assert "error" in ans
    assert a.link.registered["b"] is False
    kind, status, ans = deliver(a, b2, 6.0)
    assert (kind, status) == ("register", 200)
    assert a.link.registered["b"] is True
    assert "a" in {m["hostname"] for m in b2.table.members_view(6.0)}
    assert deliver(a, b2, 7.0)[:2] == ("ping", 200)


def test_ping_from_old_incarnation_gets_409():
    cores = make_cluster()
    elect(cores)
    b = cores["b"]
    old_a = cores["a"]
    new_a = make_core("a", now=5.0, startup=1500)
    assert deliver(new_a, b, 5.0)[:2] == ("register", 200)
    kind, status, _ = deliver(old_a, b, 5.5)
    assert (kind, status) == ("ping", 409)
    assert old_a.link.registered["b"] is False
    assert deliver(new_a, b, 6.0)[:2] == ("ping", 200)


def test_register_retried_until_2xx():
    a = make_core("a")
    w = make_core("w")
    (cand, kind, body), = [r for r in w.outgoing(0.0) if r[0] == "a"]
    assert kind == "register"
    w.on_register_result("a", 503, {"error": "overload"}, 0.1)
    assert w.link.registered["a"] is False
    assert [k for c, k, _ in w.outgoing(1.0) if c == "a"] == ["register"]
    assert deliver(w, a, 1.0)[:2] == ("register", 200)
    assert [k for c, k, _ in w.outgoing(2.0) if c == "a"] == ["ping"]


def test_worker_is_404_at_register_and_ping():
    w = make_core("w")
    x = make_core("w2")
    assert w.handle_register(x.link.register_body(), 0.0)[0] == 404
    assert w.handle_ping(x.link.ping_body(0.0), 0.0)[0] == 404


# -- ping outcomes -------------------------------------------------------------------------------

def _registered_worker():
    a = make_core("a")
    w = make_core("w")
    deliver(w, a, 0.0)
    return a, w


def test_good_answer_marks_candidate_reachable_at_send_time():
    a, w = _registered_worker()
    kind, status, _ = deliver(w, a, 10.0, delay=0.4)
    assert (kind, status) == ("ping", 200)
    assert w.reach["a"] == 10.0
    assert w.reachable(10.4) == ["a"]


def test_late_answer_is_a_failure():
    a, w = _registered_worker()
    deliver(w, a, 10.0, delay=PING_TIMEOUT + 0.01)
    assert w.reach["a"] is None
    assert "a" not in w.link.answers
    deliver(w, a, 11.0, delay=PING_TIMEOUT)   # exactly at the limit still counts
    assert w.reach["a"] == 11.0


@pytest.mark.parametrize("bad", [
    None, [], "ok", {},
    {k: v for k, v in answer().items() if k != "vote_term"},
    dict(answer(), vote_term="1"),
    dict(answer(), vote_term=True),
    dict(answer(), vote_lease_ms=3000.0),
    dict(answer(), vote=5),
    dict(answer(), vote_startup_time="1000"),
    dict(answer(), manager=1),
    dict(answer(), term=None),
])
def test_malformed_answer_is_a_failure(bad):
    w = make_core("w")
    w.link.registered["a"] = True
    w.on_ping_result("a", 10.0, 200, bad, 10.1)
    assert w.reach["a"] is None
    assert "a" not in w.link.answers
    assert w.link.registered["a"] is True


@pytest.mark.parametrize("status", [None, 0, 500, 503, 401, 404, 301])
def test_non_2xx_or_transport_error_is_a_failure(status):
    w = make_core("w")
    w.link.registered["a"] = True
    w.on_ping_result("a", 10.0, status, answer(), 10.1)
    assert w.reach["a"] is None
    assert w.link.registered["a"] is True


def test_older_answer_does_not_replace_a_newer_one():
    w = make_core("w")
    w.on_ping_result("a", 11.0, 200, answer(manager="a", term=5), 11.1)
    w.on_ping_result("a", 10.9, 200, answer(manager=None, term=1), 11.2)  # in time, but older
    assert w.reach["a"] == 11.0
    assert w.link.answers["a"].term == 5


def test_check_fields_schema():
    assert check_fields(answer(), PING_ANSWER_FIELDS) is None
    assert check_fields(dict(answer(), vote="a", vote_startup_time=1), PING_ANSWER_FIELDS) is None
    assert check_fields(dict(answer(), term=False), PING_ANSWER_FIELDS) is not None
    assert check_fields("x", PING_ANSWER_FIELDS) == "expected a JSON object"
    assert "vote_term" in check_fields({k: v for k, v in answer().items() if k != "vote_term"},
                                       PING_ANSWER_FIELDS)


# -- reachability and the survival rule ------------------------------------------------------

def test_reachable_is_successful_send_time_within_survival_window():
    w = make_core("w")
    for c in ("a", "b"):
        w.on_ping_result(c, 10.0, 200, answer(), 10.3)
    w.on_ping_result("c", 12.0, 200, answer(), 12.1)
    assert w.reachable(15.0) == ["a", "b", "c"]
    assert w.reachable(10.0 + SURVIVAL) == ["a", "b", "c"]
    assert w.reachable(10.0 + SURVIVAL + 0.001) == ["c"]
    assert w.reachable(12.0 + SURVIVAL + 0.001) == []


def _armed_worker():
    """A 3-candidate cluster plus worker w, w armed (watchdog acknowledged) at t=5."""
    cores = make_cluster()
    w = make_core("w")
    cores["w"] = w
    elect(cores)
    run_round(cores, 5.0, acks={"w": True})
    assert w.armed
    for c in cores.values():
        c.take_actions()
    return cores, w


def test_not_armed_without_quorum_manager_and_watchdog_ack():
    cores = make_cluster()
    w = make_core("w")
    cores["w"] = w
    acks = {"w": True}
    # quorum (all 3 reachable) but no manager yet: t < vote_lease + 1
    run(cores, 0.0, 3.0, acks=acks)
    assert len(w.reachable(3.0)) == 3
    assert w.manager_view(3.0)[0] is None
    assert not w.armed
    # manager exists, quorum, but the watchdog has not acknowledged
    run_round(cores, 4.0, acks={})
    assert w.manager_view(4.0)[0] == "a"
    assert not w.armed
    acts = w.take_actions()
    assert events(acts, "armed") == [] and actions(w, "fence") == []
    assert w.link.ping_body(4.0)["armed"] is False
    run_round(cores, 5.0, acks=acks)
    assert w.armed
    assert len(events(w.take_actions(), "armed")) == 1
    assert w.link.ping_body(5.0)["armed"] is True


def test_no_arming_without_quorum_even_with_ack():
    w = make_core("w")
    w.on_ping_result("a", 1.0, 200, answer(manager="a", term=3), 1.1)
    for t in (1.5, 2.0, 3.0):
        w.tick(t, watchdog_armed=True)
    assert w.reachable(3.0) == ["a"]
    assert not w.armed
    assert actions(w, "fence") == []


def test_armed_node_below_two_candidates_fences_exactly_once():
    cores, w = _armed_worker()
    cut = {("w", "a"), ("w", "b")}
    acks = {"w": True}
    run(cores, 6.0, 10.0, cut=cut, acks=acks)    # last good pings to a, b sent at t=5
    assert len(w.reachable(10.0)) == 3
    assert actions(w, "fence") == []
    run_round(cores, 10.5, cut=cut, acks=acks)
    assert w.reachable(10.5) == ["c"]
    acts = w.take_actions()
    fences = [x for x in acts if x["kind"] == "fence"]
    emerg = events(acts, "self_fence")
    assert len(fences) == 1 and len(emerg) == 1
    assert emerg[0]["level"] == "EMERG"
    assert emerg[0]["msg"] == "candidatesRegistered has gone below 2, initiating self fencing"
    assert emerg[0]["msg"] == hoster_ha.EMERG_BELOW_2
    assert acts.index(emerg[0]) < acts.index(fences[0])
    assert w.fenced
    run(cores, 11.0, 15.0, cut=cut, acks=acks)
    assert actions(w, "fence") == []
    w.tick(30.0, watchdog_armed=True)
    assert w.take_actions() == []


def test_armed_candidate_fences_too():
    cores = make_cluster()
    elect(cores)
    run_round(cores, 5.0, acks={"b": True})
    b = cores["b"]
    assert b.armed
    b.take_actions()
    cut = {("b", "a"), ("b", "c")}             # b reaches only itself
    run(cores, 6.0, 10.5, step=0.5, cut=cut, acks={"b": True})
    acts = b.take_actions()
    assert len([x for x in acts if x["kind"] == "fence"]) == 1
    assert events(acts, "self_fence")[0]["msg"] == hoster_ha.EMERG_BELOW_2


def test_unarmed_node_losing_quorum_logs_quorum_lost_and_does_not_fence():
    cores = make_cluster()
    w = make_core("w")
    cores["w"] = w
    elect(cores)                                 # w never gets a watchdog ack
    w.take_actions()
    cut = {("w", "a"), ("w", "b")}
    run(cores, 5.0, 12.0, cut=cut)
    acts = w.take_actions()
    lost = events(acts, "quorum_lost")
    assert len(lost) == 1
    assert lost[0]["level"] in ("WARNING", "NOTICE")
    assert [x for x in acts if x["kind"] == "fence"] == []
    assert events(acts, "self_fence") == []
    assert not w.fenced and not w.armed


def test_quorum_lost_before_watchdog_ack_does_not_arm_and_fence():
    """SPEC §3.3: armed once it has seen quorum, a manager exists, and the watchdog has
    acknowledged; before that, losing reachability does nothing.  A node that wanted
    to arm, then lost quorum before the ack came, must not arm (and fence) on the ack."""
    cores = make_cluster()
    w = make_core("w")
    cores["w"] = w
    elect(cores)                                 # quorum + manager at t=4, no ack yet
    assert w.arming and not w.armed
    cut = {("w", "a"), ("w", "b")}
    run(cores, 5.0, 10.0, cut=cut)               # quorum lost at t=10, still no ack
    assert len(w.reachable(10.0)) == 1
    w.take_actions()
    w.tick(10.5, watchdog_armed=True)            # a late ack arrives now
    acts = w.take_actions()
    assert not w.armed, "armed without quorum"
    assert [x for x in acts if x["kind"] == "fence"] == [], \
        "an unarmed node fenced itself on a late watchdog ack after losing quorum"


def test_maintenance_disarms_and_prevents_fence():
    cores, w = _armed_worker()
    w.link.maintenance = True
    run_round(cores, 6.0, acks={"w": True})
    assert not w.armed
    assert w.link.ping_body(6.0)["armed"] is False
    assert w.link.ping_body(6.0)["maintenance"] is True
    cut = {("w", "a"), ("w", "b")}
    run(cores, 7.0, 15.0, cut=cut, acks={"w": True})
    acts = w.take_actions()
    assert [x for x in acts if x["kind"] == "fence"] == []
    assert not w.fenced
    # the candidates see the maintenance flag
    view = {m["hostname"]: m for m in cores["c"].table.members_view(15.0)}
    assert view["w"]["maintenance"] is True and view["w"]["armed"] is False


def test_core_started_in_maintenance_never_arms():
    cores = make_cluster()
    w = make_core("w", maintenance=True)
    cores["w"] = w
    run(cores, 0.0, 8.0, acks={"w": True})
    assert not w.armed


# -- members_view ---------------------------------------------------------------------------------

def test_members_view_fields_and_silence():
    a = make_core("a", now=100.0)
    w = make_core("w", now=0.0)
    assert deliver(w, a, 90.0)[:2] == ("register", 200)   # before a's start (odd clock)
    view, = a.table.members_view(105.0)
    assert set(view) == {"hostname", "startup_time", "silence", "armed", "maintenance", "left",
                         "backup_node", "failover_time", "address", "port", "protocol",
                         "ready", "not_ready", "fence_confirmed"}
    assert view["ready"] is None and view["not_ready"] == []   # no ping yet
    assert view["hostname"] == "w"
    assert view["startup_time"] == 4000
    assert view["address"] == "127.0.0.9" and view["port"] == 9100
    assert view["protocol"] == "http"
    assert view["failover_time"] == 20
    assert view["backup_node"] is False
    assert (view["armed"], view["maintenance"], view["left"]) == (False, False, False)
    # silence = now - max(last_ping, candidate start) = 105 - max(90, 100)
    assert view["silence"] == pytest.approx(5.0)
    deliver(w, a, 110.0)
    assert a.table.members_view(117.5)[0]["silence"] == pytest.approx(7.5)
    # a register resets silence
    w2 = make_core("w", now=120.0, startup=4500)
    deliver(w2, a, 125.0)
    view, = a.table.members_view(126.0)
    assert view["silence"] == pytest.approx(1.0)
    assert view["startup_time"] == 4500


def test_members_view_reports_armed_and_backup_node():
    a = make_core("a")
    w = Core(make_cfg("w", backup_node=True, failover_time=30), 4000, 0.0)
    deliver(w, a, 0.0)
    w.link.armed = True
    deliver(w, a, 1.0)
    view, = a.table.members_view(1.0)
    assert view["armed"] is True
    assert view["backup_node"] is True
    assert view["failover_time"] == 30


def test_registered_event_once_per_incarnation():
    a = make_core("a")
    w = make_core("w")
    deliver(w, a, 0.0)
    w.link.registered["a"] = False
    deliver(w, a, 1.0)                       # same incarnation registers again
    assert len(events(a.take_actions(), "registered")) == 1
    w2 = make_core("w", now=2.0, startup=4001)
    deliver(w2, a, 2.0)
    assert len(events(a.take_actions(), "registered")) == 1


def test_an_unacknowledged_term_is_never_acted_on_or_announced():
    """SPEC §3.2: "terms of successive managers strictly increase".  Here a holds a
    majority with a term (10, from persisted_term 9) that no other candidate has seen:
    b's pings to a are lost, a and c cannot talk, and a's pings to b stop before b learns
    the term.  a must then neither act nor announce itself, so that b, elected later with
    a lower term, is not refused by anyone."""
    cores = {"a": make_core("a", persisted_term=9), "b": make_core("b"), "c": make_core("c")}
    a, b = cores["a"], cores["b"]
    cut = {("b", "a"), ("c", "a"), ("a", "c")}
    run(cores, 0.0, 4.0, cut=cut)
    assert a.is_manager(4.0) and a.manager_term(4.0) == 10
    assert b.election.persisted_term < 10, "scenario: b never learned term 10"
    assert not a.can_act(4.0)
    assert a.link.ping_body(4.0)["manager"] is False
    assert a.status(4.0)["role"] != "manager"
    cut = cut | {("a", "b")}                     # a is now cut off from b and c
    t = run(cores, 5.0, 12.0, cut=cut)
    assert not a.is_manager(t)
    assert b.can_act(t), "b should have taken over"
    assert all(c.election.max_manager_term <= b.manager_term(t) for n, c in cores.items() if n != "a")


def test_successive_acting_managers_have_strictly_increasing_terms():
    """Once a voter has persisted (term_seen) the manager's term, any later grant of that
    voter is higher: the next manager's term is above the previous one's."""
    cores = {"a": make_core("a", persisted_term=9), "b": make_core("b"), "c": make_core("c")}
    a, b = cores["a"], cores["b"]
    cut = {("b", "a"), ("c", "a"), ("a", "c")}
    t = run(cores, 0.0, 6.0, cut=cut)            # a's pings keep reaching b
    assert a.can_act(t)
    t1 = a.manager_term(t)
    assert t1 == 10 and b.election.persisted_term >= 10
    cut = cut | {("a", "b")}
    t = run(cores, t + 1, t + 10.0, cut=cut)
    assert b.can_act(t)
    t2 = b.manager_term(t)
    assert t2 > t1, f"new manager b has term {t2}, not above the previous manager's {t1}"


# -- safety under an honest fault model (issue 12) ----------------------------------------------

def test_maintenance_off_takes_effect_only_with_two_acknowledgements():
    """Finding 5, the reverse: a node leaving maintenance arms only once 2 candidates have
    had a ping saying so; before that, 2 views may still say it may not be failed."""
    cores = make_cluster()
    w = make_core("w", maintenance=True)
    cores["w"] = w
    run(cores, 0.0, 8.0, acks={"w": True})
    assert not w.armed
    w.set_maintenance(False, 8.5)
    cut = {("w", "a"), ("w", "b")}          # only c hears it (for less than survival_window)
    run(cores, 9.0, 12.0, cut=cut, acks={"w": True})
    assert len(w.reachable(12.0)) == 3
    assert not w.armed, "armed while a and b still record it in maintenance"
    assert cores["a"].members["w"].maintenance and cores["b"].members["w"].maintenance
    run(cores, 13.0, 15.0, acks={"w": True})
    assert w.armed


def test_refused_leave_rearms_only_with_two_acknowledgements():
    """Finding 5, the reverse: a leave that reached one candidate was refused; the node
    (not armed yet) arms only once 2 candidates have had a ping that says it has not left."""
    cores = make_cluster()
    w = make_core("w")
    cores["w"] = w
    run(cores, 0.0, 5.0, acks={})
    assert not w.armed and w.arming
    body = w.leave_body()
    assert cores["a"].handle_leave(body, 5.2)[0] == 200
    w.leave_refused()
    cut = {("w", "b"), ("w", "c")}
    run(cores, 6.0, 9.0, cut=cut, acks={"w": True})
    assert not w.armed, "armed after a refused leave that only one candidate has cleared"
    run(cores, 10.0, 12.0, acks={"w": True})
    assert w.armed and not any(cores[c].members["w"].left for c in "abc")


def test_leave_acknowledged_by_two_disarms_through_the_core():
    cores, w = _armed_worker()
    body = w.leave_body()
    acks = [c for c in "ab" if cores[c].handle_leave(body, 6.0)[0] == 200]
    assert w.leave_result(acks) is True
    assert w.left
    w.tick(6.5, watchdog_armed=True)
    assert not w.armed and not w.arming
    w2 = make_core("w", startup=4001)
    w2.leave_body()
    assert w2.leave_result(["a"]) is False and not w2.left and not w2.link.leaving


def test_voter_without_term_file_votes_only_after_hearing_both_other_candidates():
    """Finding 8: a candidate whose state_dir/term is lost (persisted_term None) grants no
    vote before it has heard term_seen from both other candidates: the highest term an
    acting manager used was persisted by 2 voters, so one of the other two holds it."""
    b = make_core("b", persisted_term=None)
    c = make_core("c", persisted_term=3)
    cores = {"b": b, "c": c}
    run(cores, 0.0, 10.0)
    assert b.vote is None, "voted without knowing a's term"
    a = make_core("a", now=10.0, persisted_term=7)
    cores["a"] = a
    run(cores, 10.0, 20.0)
    assert b.vote is not None and b.vote.term > 7
    assert b.election.persisted_term >= b.vote.term


def test_members_are_persisted_on_register_and_flag_changes_only():
    """Finding 6: the candidate asks for state_dir/members.json to be written when its
    table changes (register, armed/maintenance/left), not on every ping."""
    a = make_core("a")
    w = make_core("w")
    deliver(w, a, 1.0)
    first = [x for x in actions(a) if x["kind"] == "persist"]
    assert len(first) == 1 and first[0]["file"] == "members.json"
    rec, = first[0]["data"]["members"]
    assert rec["hostname"] == "w" and rec["startup_time"] == w.startup_time
    deliver(w, a, 2.0)
    assert [x for x in actions(a) if x["kind"] == "persist"] == []
    w.link.armed = True
    deliver(w, a, 3.0)
    acts = [x for x in actions(a) if x["kind"] == "persist"]
    assert len(acts) == 1 and acts[0]["data"]["members"][0]["armed"] is True
    a2 = make_core("a", now=50.0, startup=1001, members_state=acts[0]["data"])
    m = a2.members["w"]
    assert (m.armed, m.startup_time) == (True, w.startup_time)
    assert a2.table.members_view(58.0)[0]["silence"] == 8.0       # counted from a2's start


def test_every_lifecycle_transition_is_logged_once_and_shown_in_status():
    """Issue 10 item 4: the node's lifecycle (Link.LIFECYCLE) changes only through one
    mutator, which logs each transition as "state A => B"; status says the state."""
    cores, w = _armed_worker()
    assert w.status(5.0)["state"] == "armed"
    seen = []

    def step(t, **kw):
        run_round(cores, t, acks={"w": True}, **kw)
        seen.extend(a["msg"] for a in w.take_actions()
                    if a["kind"] == "event" and a["event"] == "state")
    w.set_maintenance(True, 6.0)
    for t in (6.0, 7.0, 8.0):
        step(t)
    assert w.status(8.0)["state"] == "maintenance" and not w.armed
    w.set_maintenance(False, 9.0)
    for t in (9.0, 10.0, 11.0, 12.0):
        step(t)
    assert w.status(12.0)["state"] == "armed"
    w.leave_body()
    w.leave_result(["a"])                  # refused: one acknowledgement
    w.leave_body()
    w.leave_result(["a", "b"])             # acknowledged by 2: left
    step(13.0)
    assert w.status(13.0)["state"] == "left" and not w.armed
    assert seen == ["state armed => maintenance", "state maintenance => unarmed",
                    "state unarmed => armed", "state armed => leaving",
                    "state leaving => armed", "state armed => leaving",
                    "state leaving => left"], seen
    assert set(hoster_ha.Link.LIFECYCLE) == {"fenced", "left", "leaving", "maintenance",
                                             "armed", "unarmed"}
