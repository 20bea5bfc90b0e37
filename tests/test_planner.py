"""Table and property tests for the pure failover placement (SPEC §3.4 steps 2-3).

plan_failover(sources, inventories, eligible, busy) -> (moves, unplaced) and
clean_inventory(answer) are pure functions: no Core, no clock, no network.
"""

import functools
import random

import pytest

from hoster_ha import LOCK_PREFIX, clean_inventory, plan_failover, plan_restart, restore_steps

GB = 1 << 30


# -- builders (SPEC §4.3 GET vms shape) -------------------------------------------------

def snap(creation, name=None):
    return {"name": name or f"zroot/vm-encrypted/x@snap-{creation}", "creation": creation,
            "guid": str(creation * 7 + 1)}


def vm(name, parent="m", production=True, live=False, state=None, creation=None,
       snap_name=None):
    return {"vm_name": name, "production": production, "live": live,
            "state": state or ("live" if live else "stopped"), "parent_host": parent,
            "latest_snapshot": None if creation is None else snap(creation, snap_name)}


def inv(host, *vms, free=8 * GB, running=0):
    return {"host": {"hostname": host, "free_memory": free, "running_vms": running},
            "vms": list(vms)}


def plan(sources, invs, eligible=None, busy=()):
    if eligible is None:
        eligible = {h: True for h in invs}
    return plan_failover(sources, invs, eligible, busy)


def targets_of(moves, name):
    return next(t for n, _, t in moves if n == name)


# -- choosing the target -------------------------------------------------------------------

def test_newest_creation_wins_not_snapshot_name_order():
    # Hoster uses two timestamp formats: names do not sort by age (SPEC §5)
    invs = {"t1": inv("t1", vm("vm1", creation=1_700_000_100,
                               snap_name="zroot/vm-encrypted/vm1@zfs_snap_2099-01-01")),
            "t2": inv("t2", vm("vm1", creation=1_700_000_200,
                               snap_name="zroot/vm-encrypted/vm1@a-2023")),
            "t3": inv("t3", vm("vm1", creation=1_700_000_150,
                               snap_name="zroot/vm-encrypted/vm1@zzzz"))}
    moves, unplaced = plan({"m": set()}, invs)
    assert moves == [("vm1", "m", ["t2", "t3", "t1"])]
    assert unplaced == []


@pytest.mark.parametrize("hosts, expected", [
    # equal creation: the most free memory wins
    ({"t1": (100, 4 * GB, 0), "t2": (100, 16 * GB, 5), "t3": (100, 8 * GB, 0)},
     ["t2", "t3", "t1"]),
    # free memory None counts lowest (below 0)
    ({"t1": (100, None, 0), "t2": (100, 0, 9), "t3": (100, 1, 9)}, ["t3", "t2", "t1"]),
    # equal creation and memory: the fewest running VMs wins
    ({"t1": (100, 8 * GB, 3), "t2": (100, 8 * GB, 1), "t3": (100, 8 * GB, 2)},
     ["t2", "t3", "t1"]),
    # all equal: hostname order
    ({"zz": (100, 8 * GB, 1), "aa": (100, 8 * GB, 1), "mm": (100, 8 * GB, 1)},
     ["aa", "mm", "zz"]),
    # both None: running VMs, then hostname
    ({"t2": (100, None, 0), "t1": (100, None, 0), "t0": (100, None, 1)}, ["t1", "t2", "t0"]),
    # creation beats everything else
    ({"t1": (99, 64 * GB, 0), "t2": (100, None, 50)}, ["t2", "t1"]),
    # memory beats running VMs
    ({"t1": (100, 8 * GB, 0), "t2": (100, 9 * GB, 10)}, ["t2", "t1"]),
    # running VMs beat hostname
    ({"a": (100, 8 * GB, 2), "b": (100, 8 * GB, 1)}, ["b", "a"]),
])
def test_tie_breaks(hosts, expected):
    invs = {h: inv(h, vm("vm1", creation=c), free=f, running=r)
            for h, (c, f, r) in hosts.items()}
    moves, unplaced = plan({"m": set()}, invs)
    assert moves == [("vm1", "m", expected)]
    assert unplaced == []


def test_replica_without_snapshot_is_never_a_target():
    invs = {"t1": inv("t1", vm("vm1", creation=None), free=64 * GB),
            "t2": inv("t2", vm("vm1", creation=5), free=1 * GB)}
    moves, unplaced = plan({"m": set()}, invs)
    assert moves == [("vm1", "m", ["t2"])]
    # no snapshot anywhere: unplaced, with a reason
    invs = {"t1": inv("t1", vm("vm1", creation=None))}
    moves, unplaced = plan({"m": set()}, invs)
    assert moves == []
    assert [(n, s) for n, s, _ in unplaced] == [("vm1", "m")]
    assert isinstance(unplaced[0][2], str) and unplaced[0][2]


@pytest.mark.parametrize("why", ["backup", "unarmed", "maintenance", "left"])
def test_ineligible_hosts_are_never_targets(why):
    # `eligible` is what Core computes from armed/backup_node/maintenance/left
    invs = {"bk": inv("bk", vm("vm1", creation=900), free=64 * GB),
            "t1": inv("t1", vm("vm1", creation=100), free=1 * GB)}
    moves, unplaced = plan({"m": set()}, invs, eligible={"bk": False, "t1": True})
    assert moves == [("vm1", "m", ["t1"])], why
    moves, unplaced = plan({"m": set()}, invs, eligible={"bk": False, "t1": False})
    assert moves == []
    assert [(n, s) for n, s, _ in unplaced] == [("vm1", "m")]
    assert "bk" in unplaced[0][2] and "t1" in unplaced[0][2]
    # a host missing from `eligible` is not eligible either
    moves, unplaced = plan({"m": set()}, invs, eligible={"t1": True})
    assert moves == [("vm1", "m", ["t1"])]


@pytest.mark.parametrize("where, copy", [
    ("on a target", vm("vm1", live=True, creation=100)),
    ("starting on a target", vm("vm1", live=False, state="starting", creation=100)),
    ("on a backup node", vm("vm1", live=True, creation=None)),
    ("elsewhere, parent changed", vm("vm1", parent="x", live=True, creation=100)),
])
def test_vm_live_anywhere_is_not_moved(where, copy):
    invs = {"t1": inv("t1", vm("vm1", creation=500)),
            "x": inv("x", copy)}
    moves, unplaced = plan({"m": set()}, invs, eligible={"t1": True, "x": False})
    assert moves == [] and unplaced == [], where
    # same when it is in the fence record
    moves, unplaced = plan({"m": {"vm1"}}, invs, eligible={"t1": True, "x": False})
    assert moves == [] and unplaced == [], where


def test_busy_vm_is_not_moved():
    invs = {"t1": inv("t1", vm("vm1", creation=5), vm("vm2", creation=5))}
    moves, unplaced = plan({"m": set()}, invs, busy={"vm1"})
    assert moves == [("vm2", "m", ["t1"])] and unplaced == []
    moves, unplaced = plan({"m": {"vm1"}}, invs, busy={"vm1", "vm2"})
    assert moves == [] and unplaced == []
    # busy also silences "unplaced"
    invs = {"t1": inv("t1", vm("vm3", creation=None))}
    assert plan({"m": set()}, invs, busy={"vm3"}) == ([], [])


def test_non_production_vm_of_failed_host_is_not_moved():
    invs = {"t1": inv("t1", vm("dev1", production=False, creation=5),
                      vm("prod1", production=True, creation=5))}
    moves, unplaced = plan({"m": set()}, invs)
    assert moves == [("prod1", "m", ["t1"])]
    assert unplaced == []


def test_vm_of_another_host_is_not_moved():
    invs = {"t1": inv("t1", vm("vm1", parent="other", creation=5),
                      vm("vm2", parent="t1", creation=5))}
    assert plan({"m": set()}, invs) == ([], [])


@pytest.mark.parametrize("parent", ["__HA_LOCKED_2026-11-25_10-00-00__", "r", "elsewhere",
                                    None])
def test_fence_record_vms_are_moved_whatever_their_parent_host(parent):
    # r rejoined with a fence record listing vm1; its own copy is locked
    invs = {"r": inv("r", vm("vm1", parent=parent, creation=300), free=1 * GB),
            "t1": inv("t1", vm("vm1", parent=parent, creation=200), free=64 * GB)}
    moves, unplaced = plan({"r": {"vm1"}}, invs)
    assert moves == [("vm1", "r", ["r", "t1"])]
    assert unplaced == []


def test_fence_record_vm_with_no_copy_is_unplaced():
    invs = {"t1": inv("t1")}
    moves, unplaced = plan({"r": {"ghost"}}, invs)
    assert moves == []
    assert [(n, s) for n, s, _ in unplaced] == [("ghost", "r")]
    assert unplaced[0][2]


def test_output_sorted_by_vm_name_and_reasons_are_strings():
    names = ["zeta", "alpha", "Mid", "beta9", "beta10", "0first"]
    invs = {"t1": inv("t1", *[vm(n, creation=i) for i, n in enumerate(names)],
                      vm("nosnap-b", creation=None), vm("nosnap-a", creation=None))}
    moves, unplaced = plan({"m": {"ghost-z", "ghost-a"}}, invs)
    assert [n for n, _, _ in moves] == sorted(names)
    assert [n for n, _, _ in unplaced] == sorted(["nosnap-a", "nosnap-b", "ghost-a", "ghost-z"])
    for _, _, reason in unplaced:
        assert isinstance(reason, str) and reason.strip()


def test_two_failed_sources_at_once():
    invs = {"t1": inv("t1", vm("a1", parent="m1", creation=10), vm("b1", parent="m2", creation=5),
                      free=4 * GB),
            "t2": inv("t2", vm("a1", parent="m1", creation=10), vm("b1", parent="m2", creation=9),
                      vm("b2", parent="m2", creation=None), free=2 * GB)}
    moves, unplaced = plan({"m1": set(), "m2": {"f2"}}, invs)
    assert moves == [("a1", "m1", ["t1", "t2"]), ("b1", "m2", ["t2", "t1"])]
    assert [(n, s) for n, s, _ in unplaced] == [("b2", "m2"), ("f2", "m2")]


def test_moves_have_no_duplicates_and_targets_have_a_copy():
    invs = {"t1": inv("t1", vm("vm1", creation=5)), "t2": inv("t2", vm("vm2", creation=5))}
    moves, _ = plan({"m": {"vm1"}, "m2": {"vm1"}}, invs)
    assert [n for n, _, _ in moves] == ["vm1", "vm2"]
    assert targets_of(moves, "vm1") == ["t1"] and targets_of(moves, "vm2") == ["t2"]


def test_empty_inputs():
    assert plan_failover({}, {}, {}, ()) == ([], [])
    assert plan_failover({"m": set()}, {}, {}, ()) == ([], [])


# -- property test over random clusters ---------------------------------------------------------

def _better(x, y):
    """cmp for targets: (host, creation, free, running); negative when x is better."""
    hx, cx, fx, rx = x
    hy, cy, fy, ry = y
    if cx != cy:
        return -1 if cx > cy else 1
    if fx != fy:
        if fx is None:
            return 1
        if fy is None:
            return -1
        return -1 if fx > fy else 1
    if rx != ry:
        return -1 if rx < ry else 1
    return -1 if hx < hy else (1 if hx > hy else 0)


def random_cluster(rng):
    hosts = rng.sample(["h0", "h1", "h2", "h3", "h4", "h5", "w10", "w9", "zz", "aa"],
                       rng.randint(1, 6))
    failed = ["m"] + (["m2"] if rng.random() < 0.35 else [])
    parents = failed + hosts[:2] + ["__HA_LOCKED_2026-01-01_00-00-00__", "gone"]
    names = [f"vm{i:02d}" for i in range(rng.randint(0, 12))]
    invs = {}
    for h in hosts:
        invs[h] = {"host": {"hostname": h,
                            "free_memory": rng.choice([None, 0, GB, GB, 2 * GB, 4 * GB]),
                            "running_vms": rng.choice([0, 0, 1, 2, 3])}, "vms": []}
    production = {n: rng.random() < 0.75 for n in names}
    parent = {n: rng.choice(parents) for n in names}
    for n in names:
        for h in rng.sample(hosts, rng.randint(0, len(hosts))):
            r = rng.random()
            live, state = (True, "live") if r < 0.08 else \
                (False, "starting") if r < 0.12 else (False, "stopped")
            invs[h]["vms"].append(
                {"vm_name": n, "production": production[n] if rng.random() < 0.95 else
                 not production[n], "live": live, "state": state,
                 "parent_host": parent[n] if rng.random() < 0.9 else rng.choice(parents),
                 "latest_snapshot": None if rng.random() < 0.2 else
                 snap(rng.choice([100, 200, 200, 300, 300, 300]))})
    eligible = {h: rng.random() < 0.7 for h in hosts}
    sources = {}
    for f in failed:
        pool = names + ["ghost1", "ghost2"]
        sources[f] = set(rng.sample(pool, rng.randint(0, min(3, len(pool)))))
    if rng.random() < 0.3 and hosts:
        sources[hosts[0]] = set(rng.sample(names, min(len(names), rng.randint(0, 2))))
    busy = set(rng.sample(names, rng.randint(0, min(2, len(names)))))
    return sources, invs, eligible, busy


def reference(sources, invs, eligible, busy):
    """An independent reading of SPEC §3.4 steps 2-3."""
    copies = {}
    for h, i in invs.items():
        for v in i["vms"]:
            copies.setdefault(v["vm_name"], []).append((h, v))
    live = {n for n, cs in copies.items()
            if any(v["live"] or v["state"] == "starting" for _, v in cs)}
    production = {n for n, cs in copies.items() if any(v["production"] for _, v in cs)}
    claims = {}
    for src, fenced in sources.items():
        for n, cs in copies.items():
            if n in production and any(v["parent_host"] == src for _, v in cs):
                claims.setdefault(n, set()).add(src)
        for n in fenced:
            claims.setdefault(n, set()).add(src)
    order = {}
    for n in claims:
        cands = []
        for h, v in copies.get(n, []):
            if eligible.get(h) and v["latest_snapshot"] is not None:
                hh = invs[h]["host"]
                cands.append((h, v["latest_snapshot"]["creation"], hh["free_memory"],
                              hh["running_vms"]))
        cands.sort(key=functools.cmp_to_key(_better))
        order[n] = cands
    return claims, live, order


@pytest.mark.parametrize("seed", range(4))
def test_property_random_clusters(seed):
    rng = random.Random(1234 + seed)
    for case in range(100):
        sources, invs, eligible, busy = random_cluster(rng)
        ctx = f"seed {seed} case {case}: sources={sources} eligible={eligible} busy={busy}"
        moves, unplaced = plan_failover(sources, invs, eligible, busy)
        claims, live, order = reference(sources, invs, eligible, busy)
        moved = [n for n, _, _ in moves]
        unpl = [n for n, _, _ in unplaced]
        # sorted, no duplicates, disjoint
        assert moved == sorted(set(moved)), ctx
        assert unpl == sorted(set(unpl)), ctx
        assert not set(moved) & set(unpl), ctx
        # every claimed VM in exactly one of moves / unplaced / live / busy
        for n in claims:
            where = [n in moved, n in unpl, n in live, n not in live and n in busy]
            assert sum(where) == 1, f"{ctx}: {n} accounted as {where}"
        assert set(moved) | set(unpl) <= set(claims), ctx
        for n, src, targets in moves:
            assert src in claims[n], ctx
            assert n not in live and n not in busy, ctx
            ref = [c[0] for c in order[n]]
            assert targets == ref, f"{ctx}: {n}: {targets} != {ref}"
            best = max(c[1] for c in order[n])
            holders = {h: v for h, v in ((h, v) for h, i in invs.items() for v in i["vms"]
                                         if v["vm_name"] == n)}
            assert holders[targets[0]]["latest_snapshot"]["creation"] == best, ctx
            assert all(eligible[t] for t in targets), ctx
        for n, src, reason in unplaced:
            assert src in claims[n], ctx
            assert order[n] == [], ctx
            assert isinstance(reason, str) and reason.strip(), ctx


# -- clean_inventory ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    None, [], "vms", 5, {}, {"vms": []}, {"host": {}}, {"host": [], "vms": []},
    {"host": {"hostname": "h"}, "vms": {}}, {"host": "h", "vms": []},
    {"host": None, "vms": None},
])
def test_clean_inventory_malformed_answers(bad):
    assert clean_inventory(bad) is None


def test_clean_inventory_keeps_good_entries_and_drops_junk():
    good = {"vm_name": "ok-1.x_y", "production": True, "live": False, "state": "stopped",
            "parent_host": "m", "latest_snapshot": snap(7), "memory": 1}
    answer = {"host": {"hostname": "h", "free_memory": 5, "running_vms": 2},
              "vms": ["x", 5, None, [], {"vm_name": "../x"}, {"vm_name": "a;b"},
                      {"vm_name": ""}, {"vm_name": 5}, {"vm_name": None}, {"vm_name": "-x"},
                      {"vm_name": "a" * 65}, {"vm_name": "a/b"}, {"vm_name": "a b"},
                      {"production": True}, good],
              "errors": []}
    out = clean_inventory(answer)
    # a host or copy that does not say `ready` counts as ready (issue 11 item 2.3)
    assert out["host"] == {"hostname": "h", "free_memory": 5, "running_vms": 2,
                           "ready": True, "not_ready": [], "time": None,
                           "max_parallel_starts": None}    # an older version's answer
    answer["host"]["max_parallel_starts"] = 8
    assert clean_inventory(answer)["host"]["max_parallel_starts"] == 8
    del answer["host"]["max_parallel_starts"]
    for wall, kept in ((1.7e9, 1.7e9), (True, None), ("1", None), (float("nan"), None)):
        answer["host"]["time"] = wall     # the host's wall clock (protection's replica age)
        assert clean_inventory(answer)["host"]["time"] == kept
    assert out["vms"] == [{"vm_name": "ok-1.x_y", "production": True, "live": False,
                           "state": "stopped", "parent_host": "m", "ready": True,
                           "latest_snapshot": {"name": snap(7)["name"], "creation": 7,
                                               "guid": snap(7)["guid"]}}]
    assert clean_inventory({"host": {}, "vms": []})["vms"] == []


@pytest.mark.parametrize("free, expected", [
    (True, None), (False, None), ("123", None), (1.5, None), (None, None), ([], None),
    (0, 0), (123, 123), (1 << 40, 1 << 40),
])
def test_clean_inventory_free_memory(free, expected):
    out = clean_inventory({"host": {"hostname": "h", "free_memory": free, "running_vms": 0},
                           "vms": []})
    assert out["host"]["free_memory"] == expected
    assert out["host"]["free_memory"] is None or type(out["host"]["free_memory"]) is int


@pytest.mark.parametrize("running, expected", [("3", 0), (None, 0), (1.5, 0), (4, 4)])
def test_clean_inventory_running_vms(running, expected):
    out = clean_inventory({"host": {"running_vms": running}, "vms": []})
    assert out["host"]["running_vms"] == expected


@pytest.mark.parametrize("s", [
    None, "x", 5, [], {}, {"name": "a", "creation": "123", "guid": "1"},
    {"name": "a", "creation": True, "guid": "1"}, {"name": "a", "creation": 1.5},
    {"name": "a", "creation": None}, {"name": "a"},
])
def test_clean_inventory_bad_snapshot_is_none(s):
    out = clean_inventory({"host": {}, "vms": [{"vm_name": "v", "latest_snapshot": s}]})
    assert out["vms"][0]["latest_snapshot"] is None


def test_clean_inventory_snapshot_fields_are_strings_and_flags_strict():
    out = clean_inventory({"host": {}, "vms": [
        {"vm_name": "v", "production": "yes", "live": 1, "parent_host": 7,
         "latest_snapshot": {"creation": 9, "name": 3, "guid": 12345}}]})
    v = out["vms"][0]
    assert v["production"] is False and v["live"] is False and v["parent_host"] is None
    assert v["latest_snapshot"] == {"name": "3", "creation": 9, "guid": "12345"}


def test_clean_inventory_output_feeds_the_planner():
    raw = {"host": {"hostname": "t1", "free_memory": True, "running_vms": 0},
           "vms": [{"vm_name": "vm1", "production": True, "live": False, "state": "stopped",
                    "parent_host": "m", "latest_snapshot": {"name": "s", "creation": "9"}},
                   {"vm_name": "vm2", "production": True, "live": False, "state": "stopped",
                    "parent_host": "m", "latest_snapshot": {"name": "s", "creation": 9}},
                   {"vm_name": "../etc", "production": True, "parent_host": "m",
                    "latest_snapshot": {"name": "s", "creation": 9}}]}
    moves, unplaced = plan_failover({"m": set()}, {"t1": clean_inventory(raw)}, {"t1": True})
    assert moves == [("vm2", "m", ["t1"])]
    assert [n for n, _, _ in unplaced] == ["vm1"]


def test_vm_whose_parent_is_a_left_member_is_never_moved():
    """SPEC §3.4 step 1: VMs whose parent_host is a left member are never moved (that
    member's inventory is not collected: its VMs may run)."""
    invs = {"t1": inv("t1", vm("vm1", parent="gone", creation=5), free=64 * GB),
            "t2": inv("t2", vm("vm1", parent="m", creation=4))}
    skipped = []
    moves, unplaced = plan_failover({"m": {"vm1"}}, invs, {"t1": True, "t2": True}, (),
                                    left={"gone"}, skipped=skipped)
    assert moves == [] and unplaced == []
    assert skipped and skipped[0][:2] == ("vm1", "m") and "gone" in skipped[0][2]


def test_vm_wanted_by_a_plan_is_not_moved_if_a_copy_names_another_owner():
    invs = {"t1": inv("t1", vm("vm1", parent="p", creation=5)),
            "t2": inv("t2", vm("vm1", parent="__HA_LOCKED_2026-11-25_10-00-00__",
                                creation=4))}
    skipped = []
    assert plan_failover({"m": {"vm1"}}, invs, {"t1": True, "t2": True}, (),
                         owners={"vm1": {"m", "a"}}, skipped=skipped) == ([], [])
    assert "p" in skipped[0][2]
    # the plan's own hosts, locks and the source are fine
    moves, _ = plan_failover({"m": {"vm1"}}, invs, {"t1": True, "t2": True}, (),
                             owners={"vm1": {"m", "p"}})
    assert moves == [("vm1", "m", ["t1", "t2"])]


# -- issue 11 item 2.2: a fence's lock on a stopped VM is lifted only when safe -------------

LOCKED = LOCK_PREFIX + "2026-12-06_23-00-00__"


def test_restore_lifts_a_lock_only_for_a_vm_that_runs_nowhere_and_was_not_moved():
    """plan_restart(locked=True): the member's copy must be locked; a VM that runs
    elsewhere, is being moved, has a copy naming another parent or was last started
    elsewhere stays as it is; a member whose dataset is unavailable waits."""
    invs = {"m": inv("m", vm("ok", parent=LOCKED), vm("runs", parent=LOCKED),
                     vm("busy", parent=LOCKED), vm("moved", parent=LOCKED),
                     vm("other", parent=LOCKED), vm("free", parent="m"),
                     vm("dev", parent=LOCKED, production=False)),
            "t": inv("t", vm("ok", parent="m", creation=5), vm("runs", parent="t", live=True),
                     vm("other", parent="x"), vm("moved", parent=LOCKED))}
    skipped, waiting = [], []
    out = plan_restart("m", {"ok", "runs", "busy", "moved", "other", "free", "dev", "gone"},
                       invs, busy={"busy"}, last_ran={"moved": "t"}, skipped=skipped,
                       waiting=waiting, locked=True)
    assert out == ["ok"]
    why = {vm: reason for vm, _, reason in skipped}
    assert why["runs"] == "it runs on t"
    assert why["moved"] == "its latest failover plan started it on t"
    assert why["other"] == "a copy names x as its parent_host"
    assert why["free"] == "its parent_host here is m"           # not locked: nothing to do
    assert why["dev"] == "it is not a production VM"
    assert why["gone"] == "m holds no copy of it"
    assert "busy" not in why and waiting == []                  # busy: not even reported
    # the member's dataset is locked: its copies are invisible, so it waits (tried again)
    hidden = {"m": {"host": {"hostname": "m", "ready": False,
                             "not_ready": ["dataset tank/vm unavailable: locked"]},
                    "vms": []}}
    waiting = []
    assert plan_restart("m", {"ok"}, hidden, waiting=waiting, locked=True) == []
    assert waiting == [("ok", "m", "not ready: dataset tank/vm unavailable: locked")]


def test_restore_steps_touch_only_a_locked_stopped_copy():
    local = {"a": {"parent_host": LOCKED, "live": False},
             "b": {"parent_host": "h", "live": False},
             "c": {"parent_host": LOCKED, "live": True},
             "d": {"parent_host": "other", "live": False}}
    assert restore_steps(local, ["d", "c", "b", "a", "e"], "h") == [
        ("a", "restore"), ("b", "done"), ("c", "skip"), ("d", "skip"), ("e", "absent")]
