"""Failover (SPEC §3.4) and rejoin (§3.6), driven through Core objects directly.

No threads, sockets or sleeps.  `Net` is a tiny synchronous network: every step
delivers each live node's register/ping to every live candidate (test_core.deliver),
ticks every node, then carries out the manager's {"kind": "send"} actions at once:
GET members -> members_answer, GET vms -> an inventory the test builds per host,
POST plan -> handle_plan, POST failover -> handle_failover (+ finish_failover, the
VM then marked live in the inventory).  A policy hook lets a test fail, hold or
rewrite any request.  After every step the network checks that no VM is live on two
hosts at once.
"""

import json

import pytest

from hoster_ha import (FAILOVER_FIELDS, MAX_BATCH, MAX_PLANS, PLAN_BODY_FIELDS, PREFETCH_LEAD,
                       Core, check_fields, check_plan_entry, parse_config, valid_vm_name)
from test_core import CANDIDATES, SECRET, TIMINGS, deliver, run


# test_core timings: ping_interval 1, ping_timeout 0.5, survival_window 5, vote_lease 3,
# watchdog_timeout 3, fence_timeout 3, failover_time 20.
FAILOVER_TIME = TIMINGS["failover_time"]
WAIT = TIMINGS["watchdog_timeout"] + TIMINGS["fence_timeout"] + 2 * TIMINGS["ping_interval"]
GB = 1 << 30
STARTUP = {"a": 1000, "b": 2000, "c": 3000, "w1": 4000, "w2": 4100, "w3": 4200}
WORKER_PORT = {"w1": 9101, "w2": 9102, "w3": 9103}
LOCK = "__HA_LOCKED_2026-11-25_10-00-00__"


def cfg(host, debug=False, **extra):
    data = {"candidates": [dict(c) for c in CANDIDATES], "hostname": host, "secret": SECRET,
            **TIMINGS}
    if host not in ("a", "b", "c"):
        data["address"] = "127.0.0.9"
        data["port"] = WORKER_PORT.get(host, 9199)
    data.update(extra)
    return parse_config(data, "<test>", debug=debug)


def vm(name, parent, production=True, live=False, creation=None):
    return {"vm_name": name, "production": production, "live": live,
            "state": "live" if live else "stopped", "parent_host": parent,
            "current_host": None,
            "latest_snapshot": None if creation is None else
            {"name": f"zroot/vm-encrypted/{name}@snap-{creation}", "creation": creation,
             "guid": str(1000 + creation)},
            "memory": GB}


def host_inv(h, *vms, free=8 * GB, running=0):
    return {"host": {"hostname": h, "free_memory": free, "running_vms": running},
            "vms": [dict(v) for v in vms], "errors": []}


def wire(x):
    """What a JSON transport would carry."""
    return json.loads(json.dumps(x))


class Net:
    """The synchronous network and the hosts' VMs."""

    def __init__(self, cores, invs):
        self.cores = cores
        self.inv = invs
        self.dead = set()
        self.cut = set()            # (src, dst): that node's pings to that candidate are lost
        self.noack = set()          # nodes whose watchdog never acknowledges the armed state
        self.log = []               # (now, node, action), every action of every node
        self.policy = None          # fn(net, src, action, now) -> None | "fail" | "hold" |
        #                             "lost" (served, never answered: the sender died) |
        #                             "timeout" (served, sender gets status None) |
        #                             (status, answer)
        self.held = []              # (src, action) held by the policy
        self.start_outcome = {}     # (host, vm) -> ["fail", ...] consumed per start; default ok
        self.starts = []            # (host, vm, uid): starts the network carried out
        self.bmc = {}               # host -> "off" | "fail": what its fence command does
        self.external = []          # (now, manager, action) of fence_member actions
        self.now = 0.0

    # -- helpers ---------------------------------------------------------------------

    def alive(self, n):
        return n not in self.dead and not self.cores[n].fenced

    def kill(self, n):
        """Power loss: no more pings, requests or answers; its VMs are gone."""
        self.dead.add(n)
        for v in self.inv.get(n, {}).get("vms", []):
            v["live"], v["state"] = False, "stopped"

    def sends(self, node=None, method=None, name=None, to=None, since=0, protection=False,
              prefetch=False):
        """Requests sent; the manager's protection rounds (GET vms every few rounds,
        issue 14 item 1) only with protection=True, its inventories asked for just before
        a deadline (issue 13 item 3) only with prefetch=True."""
        return [a for i, (t, n, a) in enumerate(self.log) if i >= since and a["kind"] == "send"
                and (protection or a.get("purpose") != "pvms")
                and (prefetch or a.get("purpose") != "prefetch")
                and (node is None or n == node) and (method is None or a["method"] == method)
                and (name is None or a["name"] == name) and (to is None or a["to"] == to)]

    def events(self, node=None, event=None, since=0):
        return [a for i, (t, n, a) in enumerate(self.log) if i >= since and a["kind"] == "event"
                and (node is None or n == node) and (event is None or a["event"] == event)]

    def timed(self, node=None, event=None):
        return [(t, a) for t, n, a in self.log if a["kind"] == "event"
                and (node is None or n == node) and (event is None or a["event"] == event)]

    def live_on(self, name):
        return sorted(h for h, i in self.inv.items() if h not in self.dead
                      for v in i["vms"] if v["vm_name"] == name and v["live"])

    def starts_of(self, name):
        return [s for s in self.starts if s[1] == name]

    # -- the clock -------------------------------------------------------------------

    def step(self, now):
        self.now = now
        names = sorted(self.cores)
        for s in names:
            if not self.alive(s):
                continue
            for d in self.cores[s].candidates:
                if d in self.cores and self.alive(d) and (s, d) not in self.cut:
                    deliver(self.cores[s], self.cores[d], now)
        for n in names:
            if self.alive(n):
                self.cores[n].tick(now, watchdog_armed=n not in self.noack)
        self.process(now)

    def run(self, start, end, step=1.0, until=None):
        t = start
        while t <= end + 1e-9:
            self.step(t)
            if until is not None and until(t):
                return t
            t += step
        return t - step

    def process(self, now):
        busy = True
        while busy:
            busy = False
            for n in sorted(self.cores):
                acts = self.cores[n].take_actions()
                if n in self.dead:
                    continue   # a dead node's requests never leave it
                for a in acts:
                    busy = True
                    self.log.append((now, n, a))
                    if a["kind"] == "fence":
                        self.kill(n)          # its VMs are destroyed, it reboots
                    elif a["kind"] == "fence_member":   # a BMC's power off (issue 13 item 5)
                        self.external.append((now, n, a))
                        off = self.bmc.get(a["member"]) == "off"
                        if off:
                            self.kill(a["member"])
                        self.cores[n].fence_member_done(a["member"], a["startup_time"], off,
                                                        "exited 0" if off else "exited 1: no",
                                                        now)
                    elif a["kind"] == "send" and self.alive(n):
                        self.handle(n, a, now)
        for h, i in self.inv.items():
            for v in i["vms"]:
                hosts = self.live_on(v["vm_name"])
                assert len(hosts) <= 1, f"t={now}: VM {v['vm_name']} is live on {hosts}"

    def handle(self, src, a, now):
        pol = self.policy(self, src, a, now) if self.policy else None
        if pol == "hold":
            self.held.append((src, a))
            return
        if pol == "fail":
            status, answer = None, None
        elif pol == "lost":
            self.serve(a, now)
            return
        elif pol == "timeout":
            self.serve(a, now)               # served, but the answer never came back
            status, answer = None, None
        elif pol is not None:
            status, answer = pol
        else:
            status, answer = self.serve(a, now)
        self.cores[src].on_response(a["id"], status, wire(answer), now)

    def release(self, item, now, status="serve", answer=None):
        src, a = item
        self.held.remove(item)
        if status == "serve":
            status, answer = self.serve(a, now)
        if self.alive(src):
            self.cores[src].on_response(a["id"], status, wire(answer), now)
        self.process(now)
        return status, answer

    # -- the servers -----------------------------------------------------------------

    def serve(self, a, now):
        to = a["to"]
        if to not in self.cores or not self.alive(to):
            return None, None            # connection refused / timeout
        core, name, body = self.cores[to], a["name"], wire(a["body"])
        assert a["peer"]["port"] == core.cfg.port, a
        if name == "members":
            assert a["method"] == "GET"
            if not core.is_candidate:
                return 404, {"error": "this node is not a candidate"}
            return 200, core.members_answer(now)
        if name == "vms":
            assert a["method"] == "GET"
            return 200, self.vms(to)
        if name == "plan":
            assert a["method"] == "POST"
            assert check_fields(body, PLAN_BODY_FIELDS) is None, body
            for e in body["entries"]:
                assert check_plan_entry(e) is None, e
            return core.handle_plan(body, now)
        if name == "failover" and "entries" in body:    # a batch (issue 13 item 1)
            assert a["method"] == "POST" and 1 < len(body["entries"]) <= MAX_BATCH
            results = []
            for e in body["entries"]:
                st, ans = self.serve(dict(a, body=e), now)
                results.append({"uid": e["uid"], "status": st, "answer": ans})
            return 200, {"ok": True, "results": results}
        if name == "failover":
            assert a["method"] == "POST"
            assert check_fields(body, FAILOVER_FIELDS) is None, body
            assert valid_vm_name(body["vm_name"]), body
            v = self.copy(to, body["vm_name"])
            decision = core.handle_failover(body, now, None if v is None else {"live": v["live"]})
            if decision[0] != "start":
                return decision
            self.starts.append((to, body["vm_name"], body["uid"]))
            outcomes = self.start_outcome.get((to, body["vm_name"]), [])
            if outcomes and outcomes.pop(0) == "fail":
                return core.finish_failover(body["uid"], False, "vm start exited 1: boom", now)
            v["live"], v["state"], v["parent_host"] = True, "live", to
            return core.finish_failover(body["uid"], True, None, now)
        raise AssertionError(f"unexpected request {a}")

    def copy(self, host, name):
        return next((v for v in self.inv[host]["vms"] if v["vm_name"] == name), None)

    def vms(self, host):
        out = wire(self.inv[host])
        starting = self.cores[host].starting()
        for v in out["vms"]:
            if v["vm_name"] in starting:
                v["live"], v["state"] = True, "starting"
        return out


# -- the standard cluster -------------------------------------------------------------------

def standard_invs():
    """vm1 (production) and dev1 (not) run on w1.  Replicas of vm1: w2 has the newest
    snapshot, then c, then b; a has none."""
    return {
        "a": host_inv("a"),
        "b": host_inv("b", vm("vm1", "w1", creation=100)),
        "c": host_inv("c", vm("vm1", "w1", creation=200)),
        "w1": host_inv("w1", vm("vm1", "w1", live=True, creation=300),
                       vm("dev1", "w1", production=False, live=True, creation=300),
                       running=2),
        "w2": host_inv("w2", vm("vm1", "w1", creation=300),
                       vm("dev1", "w1", production=False, creation=300)),
    }


def make_net(workers=("w1", "w2"), invs=None, debug=(), extra=None, fenced=None,
             noack=(), elect_until=5.0, stopped=None):
    extra, fenced, stopped = extra or {}, fenced or {}, stopped or {}
    cores = {}
    for n in ("a", "b", "c") + tuple(workers):
        cores[n] = Core(cfg(n, debug=n in debug, **extra.get(n, {})), STARTUP[n], 0.0,
                        fenced_vms=fenced.get(n, ()), stopped_vms=stopped.get(n, ()))
    net = Net(cores, invs or standard_invs())
    net.noack = set(noack)
    # elect a with test_core.run, then hand the queued actions to the network
    run(cores, 0.0, elect_until, acks={n: n not in net.noack for n in cores})
    net.now = elect_until
    net.process(elect_until)
    assert cores["a"].can_act(elect_until)
    return net, elect_until


def kill_w1(net, t0):
    """Run the cluster until t0 - 1, then w1 loses power: its last ping went out at t0 - 1."""
    net.run(net.now + 1.0, t0 - 1.0)
    net.kill("w1")
    return t0 - 1.0


def failed_at(net, member="w1", node="a"):
    evs = [t for t, a in net.timed(node, "member_failed") if a["details"]["member"] == member]
    return evs[0] if evs else None


# -- failure detection --------------------------------------------------------------------------

def test_member_failed_only_after_its_failover_time_and_after_the_managers_wait():
    net, t = make_net()
    a = net.cores["a"]
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME - 0.5, step=0.5)
    assert failed_at(net) is None
    assert net.sends(name="vms") == [] and net.sends(name="failover") == []
    assert net.sends(name="plan") == [] and a.plans == {}
    net.run(last + FAILOVER_TIME, last + FAILOVER_TIME + 3 * TIMINGS["ping_interval"], step=0.5)
    tf = failed_at(net)
    assert tf is not None and last + FAILOVER_TIME <= tf <= last + FAILOVER_TIME + 2.0
    assert tf - a.election.manager_since >= WAIT
    # exactly once, by the manager only
    assert len(net.events("a", "member_failed")) == 1
    assert net.events("b", "member_failed") == net.events("c", "member_failed") == []
    ev = net.events("a", "member_failed")[0]
    assert ev["level"] == "NOTICE" and ev["details"]["startup_time"] == STARTUP["w1"]
    # the job: inventories of every member that is neither failed nor left, nobody else
    # (asked for just before the deadline, issue 13 item 3)
    assert sorted({x["to"] for x in net.sends("a", "GET", "vms", prefetch=True)}) == \
        ["a", "b", "c", "w2"]
    assert net.live_on("vm1") == ["w2"]


def sent_at(net, node=None, name=None, purpose=None):
    """[(time, action)] of the requests sent, by purpose."""
    return [(t, a) for t, n, a in net.log if a["kind"] == "send"
            and (node is None or n == node) and (name is None or a["name"] == name)
            and (purpose is None or a["purpose"] == purpose)]


def test_inventories_asked_for_just_before_the_deadline_and_nothing_else_before_it():
    """Issue 13 item 3: the manager asks for the inventories within PREFETCH_LEAD of the
    deadline, plans nothing before the member is failed, and then starts at once, on
    those inventories."""
    net, _ = make_net()
    a = net.cores["a"]
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME - 0.5, step=0.25)
    early = sent_at(net, name="vms", purpose="prefetch")
    assert early and all(n >= last + FAILOVER_TIME - PREFETCH_LEAD for n, _ in early)
    assert {x["to"] for _, x in early} == {"a", "b", "c", "w2"}      # not the silent w1
    assert net.sends(name="plan") == [] and net.sends(name="failover") == []
    assert a.plans == {} and failed_at(net) is None
    assert all(c.moved_vms("w1") == [] for c in (net.cores[x] for x in "abc"))
    net.run(last + FAILOVER_TIME - 0.25, last + FAILOVER_TIME + 3, step=0.25)
    tf = failed_at(net)
    assert last + FAILOVER_TIME <= tf
    # the job asked nobody: every inventory was at most PREFETCH_LEAD old
    assert [x for n, x in sent_at(net, name="vms", purpose="vms")] == []
    note = [e for e in net.events("a") if "asked for just before the deadline" in e["msg"]]
    assert len(note) == 1 and "asking no other member" in note[0]["msg"]
    # the plan goes out in the step that failed the member
    assert min(n for n, _ in sent_at(net, "a", "plan")) == tf
    assert net.live_on("vm1") == ["w2"]
    # bounded: a round every PREFETCH_LEAD / 2 within PREFETCH_LEAD of the deadline
    rounds = {n for n, _ in sent_at(net, name="vms", purpose="prefetch")}
    assert len(rounds) <= 2 * PREFETCH_LEAD / (PREFETCH_LEAD / 2) + 1
    assert a.manager.prefetched == {}


def test_member_heard_again_just_before_its_deadline_gets_no_plan():
    net, _ = make_net()
    net.run(6.0, 9.0, step=0.5)
    net.cut = {("w1", c) for c in "abc"}    # w1 alive but unheard (it fences, see below)
    w1 = net.cores["w1"]
    w1.link.survive = lambda now, quorum, reach: None   # keep it armed and running:
    net.run(9.5, 9.0 + FAILOVER_TIME - 0.5, step=0.25)  # only its silence matters here
    assert sent_at(net, name="vms", purpose="prefetch")
    net.cut = set()
    net.run(9.0 + FAILOVER_TIME - 0.25, 9.0 + FAILOVER_TIME + 10, step=0.25)
    assert failed_at(net) is None
    assert net.sends(name="plan") == [] and net.sends(name="failover") == []
    for c in "abc":
        assert net.cores[c].plans == {} and net.cores[c].moved_vms("w1") == []
    assert w1.armed and not w1.fenced
    # only while its silence was within PREFETCH_LEAD of its failover_time
    assert all(9.0 + FAILOVER_TIME - PREFETCH_LEAD <= n < 9.0 + FAILOVER_TIME
               for n, _ in sent_at(net, name="vms", purpose="prefetch"))


def test_job_waits_for_an_inventory_asked_for_just_before_the_deadline_still_under_way():
    net, _ = make_net()
    last = kill_w1(net, 10.0)
    deadline = last + FAILOVER_TIME
    net.policy = lambda net, src, act, now: \
        "hold" if act["purpose"] == "prefetch" and act["to"] == "b" else None
    net.run(10.0, deadline + 2, step=0.25)
    tf = failed_at(net)
    assert tf is not None and tf - PREFETCH_LEAD <= min(
        n for n, x in sent_at(net, "a", "vms", "prefetch") if x["to"] == "b")
    assert len(net.held) == 1            # one request at a time per member
    assert all(x["to"] != "b" for _, x in sent_at(net, name="vms", purpose="vms"))
    assert net.sends(name="plan") == [], "planned without b's inventory"
    note = [e for e in net.events("a") if "asked for just before the deadline" in e["msg"]]
    assert "inventories of a, b, c, w2" in note[0]["msg"]
    net.policy = None
    net.release(net.held[0], deadline + 2)
    assert net.sends(name="plan")
    net.run(deadline + 2.25, deadline + 5, step=0.25)
    assert net.live_on("vm1") == ["w2"] and len(net.starts_of("vm1")) == 1


def test_inventory_asked_for_too_early_or_before_another_job_is_asked_for_again():
    """The other candidates' views come late (GET members fails): the member is failed
    more than PREFETCH_LEAD after its deadline in the manager's own view, so the job asks
    every member again; a prefetch answer that comes after a job began is dropped."""
    net, _ = make_net()
    a = net.cores["a"]
    last = kill_w1(net, 10.0)
    deadline = last + FAILOVER_TIME
    held_b = []

    def policy(net, src, act, now):
        if act["name"] == "members" and now < deadline + 3:
            return "fail"
        if act["purpose"] == "prefetch" and act["to"] == "b" and not held_b:
            held_b.append(now)
            return "hold"
        return None
    net.policy = policy
    net.run(10.0, deadline + 6, step=0.25)
    tf = failed_at(net)
    assert tf >= deadline + 3
    assert sorted(x["to"] for _, x in sent_at(net, name="vms", purpose="vms")) == \
        ["a", "b", "c", "w2"]
    assert not [e for e in net.events("a") if "just before the deadline" in e["msg"]]
    assert net.live_on("vm1") == ["w2"]
    (item,) = net.held
    net.release(item, deadline + 6)      # the first prefetch to b answers now
    assert a.manager.prefetched == {}


def test_member_silence_threshold_is_its_own_failover_time():
    net, t = make_net(extra={"w1": {"failover_time": 30}})
    last = kill_w1(net, 10.0)
    net.run(10.0, last + 29.5, step=0.5)
    assert failed_at(net) is None
    net.run(last + 30, last + 33, step=0.5)
    assert failed_at(net) is not None and failed_at(net) >= last + 30


@pytest.mark.parametrize("cut", [{"a"}, {"b"}, {"c"}])
def test_member_cut_off_from_one_candidate_alone_is_never_failed_over(cut):
    net, t = make_net()
    net.cut = {("w1", c) for c in cut}
    net.run(6.0, 80.0)
    assert not net.cores["w1"].fenced and net.cores["w1"].armed
    assert failed_at(net) is None
    assert net.events(event="member_failed") == []
    assert net.sends(name="vms") == [] and net.sends(name="failover") == []
    assert net.sends(name="plan") == []
    # the one candidate's view does say so
    view = {m["hostname"]: m for m in net.cores[min(cut)].table.members_view(80.0)}
    assert view["w1"]["silence"] >= FAILOVER_TIME


@pytest.mark.parametrize("cut", [("a", "b"), ("b", "c"), ("a", "c")])
def test_two_candidate_views_suffice(cut):
    """w1 loses 2 candidates, fences itself after survival_window; the third candidate
    still heard it 5 s longer.  2 views reporting >= failover_time fail it."""
    net, t = make_net()
    net.run(6.0, 9.5, step=0.5)
    net.cut = {("w1", c) for c in cut}
    net.run(10.0, 40.0, step=0.5, until=lambda t: failed_at(net) is not None)
    assert net.cores["w1"].fenced
    net.kill("w1")   # it reboots
    tf = failed_at(net)
    assert tf is not None
    last = 9.5       # its last ping to the cut candidates went out before t=10
    assert last + FAILOVER_TIME <= tf <= last + FAILOVER_TIME + 2.0
    third = ({"a", "b", "c"} - set(cut)).pop()
    third_view = {m["hostname"]: m for m in net.cores[third].table.members_view(tf)}
    assert third_view["w1"]["silence"] < FAILOVER_TIME, "the third view had not agreed yet"
    net.run(tf + 0.5, tf + 5, step=0.5)
    assert net.live_on("vm1") == ["w2"]


@pytest.mark.parametrize("how", ["unarmed", "maintenance", "left"])
def test_unarmed_maintenance_or_left_member_is_never_failed_over(how):
    net, t = make_net(noack=("w1",) if how == "unarmed" else ())
    w1 = net.cores["w1"]
    if how == "unarmed":
        assert not w1.armed
    else:
        assert w1.armed
    if how == "maintenance":
        w1.link.maintenance = True
    net.run(6.0, 8.0)
    if how == "left":
        for c in "bc":       # a leave is acknowledged by 2 candidates (one is not enough:
            net.cores[c].members["w1"].left = True   # see the stale-flag test below)
    last = kill_w1(net, 9.0)
    net.run(9.0, last + FAILOVER_TIME + 40)
    assert net.events(event="member_failed") == []
    assert net.sends(name="plan") == [] and net.sends(name="failover") == []
    notes = [e for e in net.events("a") if "not failed over" in e["msg"]]
    assert len(notes) == 1, [e["msg"] for e in net.events("a")]
    assert notes[0]["level"] == "NOTICE" and "w1" in notes[0]["msg"]
    assert {"unarmed": "not armed", "maintenance": "maintenance",
            "left": "left"}[how] in notes[0]["msg"]
    assert net.live_on("vm1") == []


def test_left_member_is_not_asked_for_its_inventory_and_does_not_block_failover():
    invs = standard_invs()
    invs["w3"] = host_inv("w3")
    net, t = make_net(workers=("w1", "w2", "w3"), invs=invs)
    for c in "abc":
        net.cores[c].members["w3"].left = True
    net.kill("w3")
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 4)
    assert "w3" not in [x["to"] for x in net.sends("a", "GET", "vms", prefetch=True)]
    assert net.live_on("vm1") == ["w2"]


def test_unanswered_inventory_delays_the_job_with_a_warning():
    net, t = make_net()
    last = kill_w1(net, 10.0)
    net.policy = lambda net, src, a, now: "fail" if a["name"] == "vms" and a["to"] == "b" \
        else None
    net.run(10.0, last + FAILOVER_TIME + 5)
    assert net.sends(name="plan") == [] and net.sends(name="failover") == []
    warn = [e for e in net.events("a") if e["level"] == "WARNING" and "inventory from b" in e["msg"]]
    assert warn
    net.policy = None
    net.run(last + FAILOVER_TIME + 6, last + FAILOVER_TIME + 9)
    assert net.live_on("vm1") == ["w2"]


# -- plans: replicated before any start ---------------------------------------------------------

def test_plan_replicated_and_failover_sent_only_after_an_ack():
    net, t = make_net()
    a = net.cores["a"]
    net.policy = lambda net, src, a_, now: "hold" if a_["name"] == "plan" else None
    kill_w1(net, 10.0)
    t = net.run(10.0, 40.0, until=lambda t: len(net.held) >= 2)
    plans = net.sends("a", "POST", "plan")
    assert sorted(p["to"] for p in plans) == ["b", "c"]
    body = plans[0]["body"]
    (e,) = body["entries"]
    assert (e["vm"], e["from"], e["to"], e["state"]) == ("vm1", "w1", "w2", "planned")
    assert e["term"] == body["term"] == a.manager_term(t) and e["uid"]
    assert net.sends(name="failover") == [], "a start before any acknowledgement"
    net.policy = None
    net.run(t + 1, t + 3)                 # rounds go by; still held, still nothing started
    assert net.sends(name="failover") == []
    assert net.starts == []
    first = next(h for h in net.held if h[1]["to"] == "c")
    status, _ = net.release(first, t + 3)
    assert status == 200
    fo = net.sends("a", "POST", "failover")
    assert len(fo) == 1
    assert fo[0]["to"] == "w2"
    assert fo[0]["body"] == {"vm_name": "vm1", "from_host": "w1", "term": e["term"],
                             "uid": e["uid"]}
    assert net.live_on("vm1") == ["w2"]
    # the second (late) ack changes nothing
    net.release(net.held[0], t + 3)
    assert len(net.sends("a", "POST", "failover")) == 1
    # the outcome is replicated: done on b and c
    net.run(t + 4, t + 5)
    for c in "bc":
        assert net.cores[c].plans[e["uid"]]["state"] == "done"
    assert a.plans[e["uid"]]["state"] == "done"
    assert len(net.starts_of("vm1")) == 1


def test_no_start_when_no_candidate_acknowledges_the_plan():
    net, t = make_net()
    a = net.cores["a"]
    net.policy = lambda net, src, a_, now: "fail" if a_["name"] == "plan" else None
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 8)
    assert net.sends("a", "POST", "plan"), "the plan was never sent"
    assert net.sends(name="failover") == []
    assert net.starts == []
    assert a.plans and all(e["state"] == "abandoned" for e in a.plans.values())
    warn = [e for e in net.events("a") if e["level"] == "WARNING" and "acknowledged" in e["msg"]]
    assert warn
    # once a candidate answers again, the VM is placed (once)
    net.policy = None
    net.run(last + FAILOVER_TIME + 9, last + FAILOVER_TIME + 12)
    assert net.live_on("vm1") == ["w2"]
    assert len(net.starts_of("vm1")) == 1


def test_one_ack_is_enough():
    net, t = make_net()
    net.policy = lambda net, src, a_, now: "fail" if a_["name"] == "plan" and a_["to"] == "b" \
        else None
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 4)
    assert net.live_on("vm1") == ["w2"]


def test_moving_vm_log_line():
    net, t = make_net()
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 4)
    msgs = [e["msg"] for e in net.events("a")]
    assert "MOVING VM: vm1 FROM offline parent: w1 TO: w2" in msgs
    moving = [e for e in net.events("a") if e["msg"].startswith("MOVING VM:")]
    assert len(moving) == 1 and moving[0]["level"] == "NOTICE"
    assert any("vm1" in m and "live on w2" in m for m in msgs)
    assert [e["details"]["vm_name"] for e in net.events("w2", "vm_started")] == ["vm1"]
    # dev1 (not production) stays where it is
    assert net.live_on("dev1") == []
    assert not any("dev1" in m for m in msgs if m.startswith("MOVING"))


# -- a failed start is retried once on the next best target ------------------------------------

def test_failed_start_retried_once_on_next_best_target():
    net, t = make_net()
    a = net.cores["a"]
    net.start_outcome[("w2", "vm1")] = ["fail"]
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 5)
    fo = net.sends("a", "POST", "failover")
    assert [x["to"] for x in fo] == ["w2", "c"]
    assert fo[0]["body"]["uid"] != fo[1]["body"]["uid"]
    # the new uid was replicated (and acknowledged) before its start
    idx = {id(act): i for i, (_, _, act) in enumerate(net.log)}
    new_uid = fo[1]["body"]["uid"]
    rep = [p for p in net.sends("a", "POST", "plan")
           if any(e["uid"] == new_uid for e in p["body"]["entries"])]
    assert sorted(p["to"] for p in rep if p["body"]["entries"][0]["state"] == "planned") == \
        ["b", "c"]
    assert min(idx[id(p)] for p in rep) < idx[id(fo[1])]
    assert a.plans[fo[0]["body"]["uid"]]["state"] == "failed"
    assert a.plans[new_uid]["state"] == "done" and a.plans[new_uid]["to"] == "c"
    assert net.live_on("vm1") == ["c"]
    assert net.events("a", "vm_start_failed") == []
    warn = [e for e in net.events("a") if "trying the next best target c" in e["msg"]]
    assert len(warn) == 1
    assert [e["msg"] for e in net.events("a") if e["msg"].startswith("MOVING")] == [
        "MOVING VM: vm1 FROM offline parent: w1 TO: w2",
        "MOVING VM: vm1 FROM offline parent: w1 TO: c"]


def test_second_failure_reports_vm_start_failed_and_stops():
    net, t = make_net()
    net.start_outcome[("w2", "vm1")] = ["fail"]
    net.start_outcome[("c", "vm1")] = ["fail"]
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 12)
    assert [x["to"] for x in net.sends("a", "POST", "failover")] == ["w2", "c"]
    failed = net.events("a", "vm_start_failed")
    assert len(failed) == 1
    assert failed[0]["level"] == "ERROR"
    d = failed[0]["details"]
    assert (d["vm_name"], d["from_host"], d["to_host"]) == ("vm1", "w1", "c")
    assert "boom" in d["reason"]
    assert net.live_on("vm1") == []
    assert ("b", "vm1") not in {(h, n) for h, n, _ in net.starts}


def test_unplaced_vm_reported_once():
    invs = standard_invs()
    invs["w1"]["vms"].append(vm("lonely", "w1", live=True, creation=5))
    invs["b"]["vms"].append(vm("lonely", "w1", creation=None))
    net, t = make_net(invs=invs)
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 10)
    failed = [e for e in net.events("a", "vm_start_failed")
              if e["details"]["vm_name"] == "lonely"]
    assert len(failed) == 1 and failed[0]["details"]["reason"]
    assert net.live_on("vm1") == ["w2"]


# -- the target: idempotent by uid, term-checked -----------------------------------------------

def armed_target(host="w2", **kw):
    """A target core that is armed (SPEC §3.4: only an armed node accepts failover starts)."""
    w = Core(cfg(host, **kw), 4100, 0.0)
    w.link.armed = True
    return w


def fo(uid="u1", term=5, name="vm1", check=False):
    body = {"vm_name": name, "from_host": "w1", "term": term, "uid": uid}
    if check:
        body["check"] = True
    return body


def test_repeated_uid_returns_the_first_result_and_starts_once():
    w = armed_target()
    status, entry = w.handle_failover(fo(), 1.0, {"live": False})
    assert status == "start" and entry["state"] == "starting"
    assert w.starting() == {"vm1"}
    # a repeat while it starts: same uid, no second start
    assert w.handle_failover(fo(), 1.5, {"live": False}) == \
        (200, {"ok": True, "uid": "u1", "vm_name": "vm1", "state": "starting"})
    assert w.finish_failover("u1", True, None, 2.0) == \
        (200, {"ok": True, "uid": "u1", "vm_name": "vm1", "state": "live"})
    assert w.starting() == set()
    # a repeat after: the first result, even though the VM is live here now
    assert w.handle_failover(fo(), 3.0, {"live": True}) == \
        (200, {"ok": True, "uid": "u1", "vm_name": "vm1", "state": "live"})
    # another uid for the same VM: refused, it is live here
    status, ans = w.handle_failover(fo(uid="u2"), 3.0, {"live": True})
    assert status == 409 and "already live" in ans["error"]
    # a failed start is repeated as a failure
    assert w.handle_failover(fo(uid="u3", name="vm3"), 4.0, {"live": False})[0] == "start"
    assert w.finish_failover("u3", False, "exit 1: boom", 5.0)[0] == 409
    status, ans = w.handle_failover(fo(uid="u3", name="vm3"), 6.0, {"live": False})
    assert status == 409 and ans["error"] == "exit 1: boom" and ans["uid"] == "u3"


def test_second_uid_while_starting_is_refused():
    w = armed_target()
    assert w.handle_failover(fo(), 1.0, {"live": False})[0] == "start"
    status, ans = w.handle_failover(fo(uid="u2"), 1.1, {"live": False})
    assert status == 409


def test_lower_term_than_highest_seen_is_refused():
    w = armed_target()
    assert w.handle_failover(fo(uid="u1", term=7), 1.0, {"live": False})[0] == "start"
    status, ans = w.handle_failover(fo(uid="u2", term=6, name="vm2"), 1.0, {"live": False})
    assert status == 409 and "stale term" in ans["error"]
    assert ans["refused"] is True      # nothing started: the manager places it again
    assert "u2" not in w.failovers
    # also a repeat of a known uid with a stale term, and a check with a stale term
    assert w.handle_failover(fo(uid="u1", term=6), 1.0, {"live": False})[0] == 409
    assert w.handle_failover(fo(uid="u1", term=6, check=True), 1.0, None)[0] == 409
    # the term learnt from ping answers counts too
    w2 = armed_target()
    w2.election.max_manager_term = 9
    assert w2.handle_failover(fo(term=8), 1.0, {"live": False})[0] == 409


def test_check_for_unknown_uid_raises_the_targets_term():
    w = armed_target()
    status, ans = w.handle_failover(fo(uid="old", term=9, check=True), 1.0, None)
    assert status == 200 and ans["known"] is False and ans["uid"] == "old"
    assert w.election.max_manager_term == 9
    assert w.failovers == {} and w.starting() == set()
    # the previous manager's (older) request for that uid now comes too late
    status, ans = w.handle_failover(fo(uid="old", term=8), 2.0, {"live": False})
    assert status == 409
    assert w.failovers == {}
    # a check for a known uid says what happened
    assert w.handle_failover(fo(uid="new", term=9), 3.0, {"live": False})[0] == "start"
    w.finish_failover("new", True, None, 4.0)
    status, ans = w.handle_failover(fo(uid="new", term=9, check=True), 5.0, None)
    assert status == 200 and ans["known"] is True and ans["state"] == "live"


def test_target_refuses_without_copy_live_copy_or_in_debug_mode():
    w = Core(cfg("w2"), 4100, 0.0)
    assert w.handle_failover(fo(), 1.0, None)[0] == 409
    assert w.handle_failover(fo(uid="u2"), 1.0, {"live": True})[0] == 409
    assert w.failovers == {}
    d = Core(cfg("w2", debug=True), 4100, 0.0)
    status, ans = d.handle_failover(fo(), 1.0, {"live": False})
    assert status == 409 and "debug" in ans["error"]
    assert d.failovers == {}


# -- the manager dies mid-failover ---------------------------------------------------------------

def die_mid_failover(net, mode):
    """a plans vm1 -> w2; b and c store the plan; then a's POST failover is either
    served with its answer lost ("lost") or never delivered ("hold"), and a dies."""
    state = {}

    def policy(net, src, act, now):
        if src == "a" and act["name"] == "failover" and not act["body"].get("check"):
            state["uid"] = act["body"]["uid"]
            state["t"] = now
            return mode
        return None
    net.policy = policy
    kill_w1(net, 10.0)
    t = net.run(10.0, 40.0, until=lambda t: "uid" in state)
    net.kill("a")
    net.policy = None
    uid = state["uid"]
    for c in "bc":
        assert net.cores[c].plans[uid]["state"] == "planned"
    return uid, t


def test_new_manager_asks_target_first_and_does_not_restart_a_started_vm():
    net, t = make_net()
    uid, t = die_mid_failover(net, "lost")
    assert net.live_on("vm1") == ["w2"]            # it started; a never heard so
    b = net.cores["b"]
    since = len(net.log)
    t = net.run(t + 1, t + 45)
    assert b.can_act(t)
    checks = [x for x in net.sends("b", "POST", "failover", since=since) if x["body"].get("check")]
    assert checks and checks[0]["to"] == "w2" and checks[0]["body"]["uid"] == uid
    assert checks[0]["body"]["term"] >= b.manager_term(t)
    assert b.plans[uid]["state"] == "done"
    assert [x for x in net.sends("b", "POST", "failover") if not x["body"].get("check")] == []
    assert len(net.starts_of("vm1")) == 1
    assert net.live_on("vm1") == ["w2"]
    # b failed a over too (a was a member); its first job came after its own wait
    assert failed_at(net, member="a", node="b") is not None
    first_job = min(t_ for t_, n, x in net.log if n == "b" and x["kind"] == "send"
                    and x["name"] == "vms")
    assert first_job - b.election.manager_since >= WAIT
    assert b.moved_vms("w1") == [{"vm_name": "vm1", "new_parent": "w2", "term": 1, "seq": 1}]


def test_new_manager_replans_after_target_says_unknown_and_starts_once():
    net, t = make_net()
    uid, t = die_mid_failover(net, "hold")
    assert net.live_on("vm1") == [] and net.starts == []
    b = net.cores["b"]
    since = len(net.log)
    t = net.run(t + 1, t + 45)
    idx = {id(act): i for i, (_, _, act) in enumerate(net.log)}
    b_fo = net.sends("b", "POST", "failover", since=since)
    checks = [x for x in b_fo if x["body"].get("check")]
    starts = [x for x in b_fo if not x["body"].get("check")]
    assert checks and checks[0]["body"]["uid"] == uid and checks[0]["to"] == "w2"
    assert b.plans[uid]["state"] == "abandoned"
    assert len(starts) == 1 and starts[0]["body"]["uid"] != uid
    assert starts[0]["body"]["term"] == b.manager_term(t)
    replans = net.sends("b", "POST", "plan", since=since)
    first_replan = min(idx[id(p)] for p in replans
                       if any(e["vm"] == "vm1" and e["uid"] != uid for e in p["body"]["entries"]))
    assert idx[id(checks[0])] < first_replan, "re-planned before the target answered"
    assert net.live_on("vm1") == ["w2"]
    assert len(net.starts_of("vm1")) == 1
    # the dead manager's request arrives at last: refused, nothing started twice
    (held,) = net.held
    status, ans = net.release(held, t + 1)
    assert status == 409 and "stale term" in ans["error"]
    assert len(net.starts_of("vm1")) == 1


def test_inherited_plan_to_a_failed_target_is_abandoned_and_replanned():
    net, t = make_net()
    uid, t = die_mid_failover(net, "hold")
    net.kill("w2")                                  # the target dies too
    net.held.clear()
    t = net.run(t + 1, t + 50)
    b = net.cores["b"]
    assert b.plans[uid]["state"] == "abandoned"
    assert net.live_on("vm1") == ["c"]
    assert len(net.starts_of("vm1")) == 1


# -- debug mode ----------------------------------------------------------------------------------

def test_debug_manager_logs_the_plan_and_sends_nothing():
    net, t = make_net(debug=("a",))
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 10)
    planned = net.events("a", "failover_planned")
    assert planned, "no plan logged"
    assert all("(DEBUG)" in e["msg"] for e in planned)
    assert any("vm1" in e["msg"] and "w1" in e["msg"] and "w2" in e["msg"] for e in planned)
    assert len(planned) == 1, "the debug plan is logged once per episode"
    assert net.sends(method="POST", name="plan") == []
    assert net.sends(method="POST", name="failover") == []
    assert net.starts == [] and net.live_on("vm1") == []


# -- rejoin (§3.6) -------------------------------------------------------------------------------

def test_moved_vms_from_done_plans_latest_wins():
    b = Core(cfg("b"), 2000, 0.0)

    def e(vm, src, to, term, seq, state="done", uid=None):
        return {"vm": vm, "from": src, "to": to, "term": term, "seq": seq, "state": state,
                "uid": uid or f"{vm}-{term}-{seq}"}
    entries = [
        e("x", "h", "t", 5, 1), e("x", "t", "h", 6, 1),             # moved back: not reported
        e("y", "h", "t", 5, 2), e("y", "t", "u", 7, 1),             # moved on: new owner u
        e("z", "h", "t", 5, 3, state="planned"),                    # not done
        e("q", "h", "t", 5, 4, state="failed"),
        e("r", "h", "t", 5, 5, state="abandoned"),
        e("s", "h", "t", 8, 1), e("s", "h", "u", 8, 2),             # same term: seq orders
        e("p", "other", "t", 5, 6),                                 # not from h
        e("n", "h", "t", 9, 1), e("n", "t", "h", 9, 2, state="failed"),  # failed move back
    ]
    status, ans = b.handle_plan({"term": 9, "entries": entries}, 1.0)
    assert status == 200
    assert b.moved_vms("h") == [
        {"vm_name": "n", "new_parent": "t", "term": 9, "seq": 1},
        {"vm_name": "s", "new_parent": "u", "term": 8, "seq": 2},
        {"vm_name": "x", "new_parent": "h", "term": 6, "seq": 1},   # back: void older entries
        {"vm_name": "y", "new_parent": "u", "term": 7, "seq": 1}]
    assert b.moved_vms("nobody") == []
    # and the register answer carries them
    h = Core(cfg("w1", hostname="h"), 7000, 0.0)
    status, ans = b.handle_register(h.link.register_body(), 2.0)
    assert status == 200 and ans["moved_vms"] == b.moved_vms("h")
    # a stale plan term is refused and changes nothing
    status, _ = b.handle_plan({"term": 3, "entries": [e("x", "h", "zz", 3, 9)]}, 3.0)
    assert status == 409
    assert [(m["vm_name"], m["new_parent"]) for m in b.moved_vms("h")] == [
        ("n", "t"), ("s", "u"), ("x", "h"), ("y", "u")]


def test_rejoin_demotes_moved_vms_before_arming():
    net, t = make_net()
    last = kill_w1(net, 10.0)
    t = net.run(10.0, last + FAILOVER_TIME + 5)
    assert net.live_on("vm1") == ["w2"]
    for c in "abc":
        assert net.cores[c].moved_vms("w1") == [{"vm_name": "vm1", "new_parent": "w2", "term": 1, "seq": 1}]
    # w1 boots again: a new incarnation, no fence record (power loss)
    w1 = Core(cfg("w1"), 4500, t + 1)
    net.cores["w1"] = w1
    net.dead.discard("w1")
    since = len(net.log)
    t = net.run(t + 1, t + 6)
    demotes = [act for _, n, act in net.log[since:] if n == "w1" and act["kind"] == "demote"]
    assert demotes == [{"kind": "demote", "vms": {"vm1": "w2"}, "keep_live": False}], \
        "asked exactly once"
    assert len(w1.reachable(t)) == 3 and w1.manager_view(t)[0] == "a"
    assert not w1.arming and not w1.armed
    assert w1.link.ping_body(t)["armed"] is False
    w1.demote_done({"vm1": "w2"})
    net.copy("w1", "vm1")["parent_host"] = "w2"
    t = net.run(t + 1, t + 2)
    assert w1.armed
    assert [a for _, n, a in net.log[since:] if n == "w1" and a["kind"] == "demote"] == demotes
    # nothing was failed over again
    assert len(net.starts_of("vm1")) == 1 and net.live_on("vm1") == ["w2"]


def test_rejoined_member_with_fence_record_gets_its_vms_placed():
    invs = standard_invs()
    invs["w1"] = host_inv("w1", vm("vm1", LOCK, creation=900),
                          vm("dev1", "w1", production=False, creation=300))
    invs["w2"]["vms"][0]["latest_snapshot"]["creation"] = 800
    net, t = make_net(invs=invs, fenced={"w1": ["vm1"]})
    assert net.cores["a"].members["w1"].fenced_vms == ["vm1"]
    net.run(6.0, 30.0)
    fo_ = net.sends("a", "POST", "failover")
    assert [(x["to"], x["body"]["vm_name"], x["body"]["from_host"]) for x in fo_] == \
        [("w1", "vm1", "w1")], "placed back on w1, which holds the newest snapshot"
    assert net.live_on("vm1") == ["w1"]
    assert net.copy("w1", "vm1")["parent_host"] == "w1"
    assert net.live_on("dev1") == []
    assert net.events(event="member_failed") == []


def test_fence_record_vm_live_elsewhere_is_left_alone():
    invs = standard_invs()
    invs["w1"] = host_inv("w1", vm("vm1", LOCK, creation=900))
    invs["w2"]["vms"][0]["live"] = True            # moved while w1 was gone
    invs["w2"]["vms"][0]["parent_host"] = "w2"
    net, t = make_net(invs=invs, fenced={"w1": ["vm1"]})
    net.run(6.0, 30.0)
    assert net.sends(name="failover") == [] and net.sends(name="plan") == []
    assert net.live_on("vm1") == ["w2"]


# -- found while writing these tests (see the report) --------------------------------------------

def test_lost_answer_of_a_started_vm_is_not_retried_elsewhere():
    """SPEC §1: a VM must never run on two hosts at once.  The POST failover reached w2,
    which started vm1, but the answer was lost (timeout, reset: status None).  A
    transport failure is not "a target that fails the start": the manager must find out
    (ask w2 with the same uid, as for an inherited plan) before it starts vm1 elsewhere."""
    net, t = make_net()
    lost = []

    def policy(net, src, act, now):
        if act["name"] == "failover" and act["to"] == "w2" and not act["body"].get("check") \
                and not lost:
            lost.append(act["body"]["uid"])
            return "timeout"
        return None
    net.policy = policy
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 10)      # the network asserts: live on 1 host at most
    starts = [h for h, n, _ in net.starts if n == "vm1"]
    assert lost, "scenario: the first start's answer was lost"
    assert starts == ["w2"], f"vm1 was started on {starts}"
    assert net.live_on("vm1") == ["w2"]


def test_target_saying_vm_already_live_is_not_replaced_by_another_target():
    """409 "VM ... is already live here" means it runs there: starting it on the next
    best target would run it twice.  Here somebody started vm1 on w2 after the manager
    took the inventories (the race the 409 exists for)."""
    net, t = make_net()

    def policy(net, src, act, now):
        if act["name"] == "failover" and act["to"] == "w2" and not act["body"].get("check"):
            v = net.copy("w2", "vm1")
            v["live"], v["state"] = True, "live"
        return None
    net.policy = policy
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 10)      # the network asserts: live on 1 host at most
    starts = [h for h, n, _ in net.starts if n == "vm1"]
    assert starts == [], f"vm1 (live on w2) was started again on {starts}"
    assert net.live_on("vm1") == ["w2"]


def test_rejoined_member_only_its_fence_record_is_placed():
    """SPEC §3.6: of a rejoined (not failed) member the manager places the VMs of its
    fence record that are live nowhere.  vm3, a production VM of w1 that its operator
    stopped before the fence (so it is not in the record), must stay stopped: w1 is up."""
    invs = standard_invs()
    invs["w1"] = host_inv("w1", vm("vm1", LOCK, creation=900),
                          vm("vm3", "w1", production=True, creation=900))
    invs["w2"]["vms"].append(vm("vm3", "w1", creation=800))
    net, t = make_net(invs=invs, fenced={"w1": ["vm1"]})
    net.run(6.0, 30.0)
    assert net.live_on("vm1") == ["w1"]
    started = sorted({n for _, n, _ in net.starts})
    assert started == ["vm1"], f"the manager started {started} on a member that is up"
    assert net.live_on("vm3") == []


def test_resolved_inherited_plan_is_replicated_to_the_other_candidates():
    """A new manager that learns from the target that an inherited plan is done tells the
    other candidates (they answer `register` with moved_vms from the plans they hold).
    The update must carry the new manager's term: the old plan's term is stale there."""
    net, t = make_net()
    uid, t = die_mid_failover(net, "lost")
    b, c = net.cores["b"], net.cores["c"]
    t = net.run(t + 1, t + 45)
    assert b.plans[uid]["state"] == "done"
    updates = [x for x in net.sends("b", "POST", "plan", to="c")
               if any(e["uid"] == uid for e in x["body"]["entries"])]
    assert updates, "b never told c"
    assert c.plans[uid]["state"] == "done", \
        f"c still holds the plan as {c.plans[uid]['state']!r} (update term " \
        f"{updates[0]['body']['term']}, c's highest manager term {c.election.max_manager_term})"
    assert c.moved_vms("w1") == [{"vm_name": "vm1", "new_parent": "w2", "term": 1, "seq": 1}]


def test_rejoined_member_with_newest_snapshot_gets_its_fenced_vm_back():
    """SPEC §3.6: the fence record's VMs are placed "by the normal rule (usually back onto
    this node, which holds the newest data)".  w1 fenced itself and rebooted within
    seconds (never failed).  It registers before it can arm (quorum needs a ping round,
    arming a watchdog ack); the manager must not place vm1 from the older snapshot on w2
    in that window, while w1, one ping round away from eligible, holds the newest one."""
    invs = standard_invs()
    invs["w1"] = host_inv("w1", vm("vm1", "w1", live=True, creation=900))
    invs["w2"]["vms"][0]["latest_snapshot"]["creation"] = 800
    net, t = make_net(invs=invs)
    net.run(6.0, 20.0)
    net.kill("w1")                                # fenced: VMs destroyed, vm1 locked
    net.copy("w1", "vm1")["parent_host"] = LOCK
    w1 = Core(cfg("w1"), 4500, 21.0, fenced_vms=["vm1"])
    net.cores["w1"] = w1
    net.dead.discard("w1")
    net.run(21.0, 40.0, step=0.5)
    assert w1.armed
    assert [h for h, n, _ in net.starts if n == "vm1"] == ["w1"], \
        f"vm1 started on {net.live_on('vm1')} from an older snapshot (800 < 900 on w1)"


def test_moved_vms_says_unknown_while_the_latest_plan_is_in_flight():
    b = Core(cfg("b"), 2000, 0.0)
    entries = [{"vm": "x", "from": "h", "to": "t", "term": 5, "seq": 1, "state": "done",
                "uid": "u1"},
               {"vm": "x", "from": "t", "to": "h", "term": 7, "seq": 1, "state": "planned",
                "uid": "u2"}]
    assert b.handle_plan({"term": 7, "entries": entries}, 1.0)[0] == 200
    assert b.moved_vms("h") == [{"vm_name": "x", "new_parent": None, "term": 7, "seq": 1}]


def test_rejoining_member_never_demotes_on_a_lagging_candidates_word():
    """x moved h -> t (term 5), then back t -> h (term 7).  A candidate that missed the
    second plan still says 't'; the others say 'h' (done) or 'unknown' (planned).  The
    newest entry wins whatever the order of the answers, and nothing is demoted until 2
    candidates have answered."""
    lagging = [{"vm_name": "x", "new_parent": "t", "term": 5, "seq": 1}]
    unknown = [{"vm_name": "x", "new_parent": None, "term": 7, "seq": 1}]
    back = [{"vm_name": "x", "new_parent": "h", "term": 7, "seq": 1}]
    for answers in ([lagging, unknown, back], [lagging, back, unknown], [unknown, lagging],
                    [back, lagging]):
        h = Core(cfg("w1", hostname="h"), 7000, 0.0)
        for cand, moved in zip("abc", answers):
            h.on_register_result(cand, 200, {"ok": True, "moved_vms": moved}, 1.0)
            h.tick(1.0)
            assert not [a for a in h.take_actions() if a["kind"] == "demote"], answers
    # a single answer (even a right one) is not enough
    h = Core(cfg("w1", hostname="h"), 7000, 0.0)
    h.on_register_result("a", 200, {"ok": True, "moved_vms": lagging}, 1.0)
    h.tick(1.0)
    assert not [a for a in h.take_actions() if a["kind"] == "demote"]
    h.on_register_result("b", 200, {"ok": True, "moved_vms": lagging}, 1.0)
    h.tick(1.0)
    assert [a for a in h.take_actions() if a["kind"] == "demote"] == [
        {"kind": "demote", "vms": {"x": "t"}, "keep_live": False}]


def test_retry_target_that_failed_meanwhile_is_skipped():
    """vm1's targets are [w2, c, b]; the start on w2 hangs; c fails meanwhile; w2 then
    refuses.  The retry goes to b (c is out of the job), and the job ends: a later job
    can run.  (Was: a KeyError in _pump that left the job set for the manager's term.)"""
    net, t = make_net()
    a = net.cores["a"]

    def hold(net, src, act, now):
        if act["kind"] == "send" and act["name"] == "failover" and act["to"] == "w2" and \
                not act["body"].get("check"):
            return "hold"
    net.policy = hold
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 3)
    assert [x["to"] for _, x in net.held] == ["w2"]
    net.kill("c")
    t = net.run(net.now + 1, net.now + FAILOVER_TIME + 5)
    assert "c" in a.detector.failed and "c" not in a.manager.job.members
    net.policy = None
    net.release(net.held[0], t, status=409, answer={"error": "boom"})
    net.run(t + 1, t + 60)
    assert a.manager.job is None
    assert sorted((e["to"], e["state"]) for e in a.plans.values()) == [("b", "done"),
                                                                      ("w2", "failed")]
    assert net.live_on("vm1") == ["b"]


def test_vm_moved_on_since_its_plan_is_not_failed_over_with_the_plans_target():
    """vm1 was failed over w1 -> w2; the operator then moved it to w3, which stopped HA in
    order (left: its VMs run on, unprotected, and its inventory is not collected).  When
    w2 fails, its plan says vm1 went to w2, but every copy now names w3: vm1 is left
    alone (was: started again on another host while it ran on w3)."""
    invs = standard_invs()
    invs["w3"] = host_inv("w3", vm("vm1", "w1", creation=50))
    net, t = make_net(workers=("w1", "w2", "w3"), invs=invs)
    a = net.cores["a"]
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 5)
    assert net.live_on("vm1") == ["w2"]
    for h in ("w2", "w3", "b", "c"):
        for v in net.inv[h]["vms"]:
            if v["vm_name"] == "vm1":
                v.update(parent_host="w3", live=h == "w3", state="live" if h == "w3" else
                         "stopped")
    net.cores["w3"].link.left = True
    net.run(net.now + 1, net.now + 5)
    assert all(net.cores[c].members["w3"].left for c in "abc")
    net.kill("w2")
    since = len(net.log)
    net.run(net.now + 1, net.now + FAILOVER_TIME + 20)
    assert "w2" in a.detector.failed
    assert [e["to"] for e in a.plans.values()] == ["w2"], "no new plan for vm1"
    assert net.live_on("vm1") == ["w3"]
    notes = [x["msg"] for _, n, x in net.log[since:] if n == "a" and x["kind"] == "event"]
    assert any("VM vm1 of w2 is not failed over" in m and "w3" in m for m in notes), notes


def test_fencing_node_refuses_failovers():
    w = Core(cfg("w2"), 5000, 0.0)
    w.link.fenced = True
    status, answer = w.handle_failover({"vm_name": "vm1", "from_host": "w1", "term": 5,
                                        "uid": "u1"}, 1.0, {"live": False})
    assert status == 409 and "fencing" in answer["error"]
    assert w.failovers == {}


# -- safety under an honest fault model (issue 12) -------------------------------------------

def test_unarmed_or_maintenance_target_refuses_failover_starts():
    """Finding 4: a node that is not armed, or is (going) in maintenance, refuses a start."""
    w = Core(cfg("w2"), 4100, 0.0)
    assert not w.armed
    status, ans = w.handle_failover(fo(), 1.0, {"live": False})
    assert status == 409 and "not armed" in ans["error"]
    assert w.failovers == {} and w.starting() == set()
    w.link.armed = True
    w.link.maintenance = True
    status, ans = w.handle_failover(fo(uid="u2"), 2.0, {"live": False})
    assert status == 409 and "maintenance" in ans["error"]
    w.link.maintenance = False
    w.set_maintenance(True, 3.0)          # asked, not acknowledged yet: still armed
    status, ans = w.handle_failover(fo(uid="u3"), 3.0, {"live": False})
    assert status == 409 and "maintenance" in ans["error"]
    w.set_maintenance(False, 4.0)
    assert w.handle_failover(fo(uid="u4"), 5.0, {"live": False})[0] == "start"
    # a check is still answered by an unarmed node
    u = Core(cfg("w3"), 4200, 0.0)
    status, ans = u.handle_failover(fo(uid="x", check=True), 1.0, None)
    assert status == 200 and ans["known"] is False


def test_a_start_accepted_then_refused_at_its_slot_answers_refused_and_is_not_starting():
    """Item 9 of issue 13's review: a start accepted while the node was armed, refused
    when it got its slot (maintenance asked meanwhile: start_refusal), ends as refused;
    the same uid is not started later."""
    w = armed_target()
    assert w.start_refusal() is None
    assert w.handle_failover(fo(), 1.0, {"live": False})[0] == "start"
    w.set_maintenance(True, 2.0)
    why = w.start_refusal()
    assert "maintenance" in why
    status, ans = w.finish_failover("u1", False, why, 2.0, refused=True)
    assert status == 409 and ans["refused"] is True and ans["uid"] == "u1"
    assert w.starting() == set()
    assert w.handle_failover(fo(), 3.0, {"live": False})[0] == 409


def test_check_for_an_unknown_uid_refuses_that_uid_for_good():
    """Finding 2: once a target has answered "unknown" for a uid, a request for that uid
    that comes later (a slow handler, the same term) never starts the VM."""
    w = armed_target()
    status, ans = w.handle_failover(fo(uid="u1", term=5, check=True), 1.0, None)
    assert status == 200 and ans["known"] is False
    status, ans = w.handle_failover(fo(uid="u1", term=5), 2.0, {"live": False})
    assert status == 409 and "u1" in ans["error"]
    assert w.failovers == {} and w.starting() == set()
    # asked again: still unknown (the manager re-plans on that answer)
    status, ans = w.handle_failover(fo(uid="u1", term=5, check=True), 3.0, None)
    assert status == 200 and ans["known"] is False
    # other uids are not affected
    assert w.handle_failover(fo(uid="u2", term=5), 4.0, {"live": False})[0] == "start"


def test_delayed_failover_request_after_a_check_said_unknown_never_starts_a_second_copy():
    """Finding 2, the whole story: the manager's POST failover to w2 is stuck in a slow
    handler; the manager times out, asks w2 about the uid ("unknown"), abandons the plan
    and re-plans (replication has meanwhile made c's copy the newest); then the stuck
    request is handled, with the same term."""
    net, t = make_net()
    a = net.cores["a"]
    state = {}

    def policy(net, src, act, now):
        if act["name"] == "failover" and not act["body"].get("check") and "uid" not in state:
            state["uid"] = act["body"]["uid"]
            return "hold"
        return None
    net.policy = policy
    last = kill_w1(net, 10.0)
    t = net.run(10.0, last + FAILOVER_TIME + 5, until=lambda t: "uid" in state)
    (item,) = net.held
    a.on_response(item[1]["id"], None, None, t)     # the manager's request timed out
    net.copy("w2", "vm1")["latest_snapshot"]["creation"] = 150
    t = net.run(t + 1, t + 30, until=lambda t: net.live_on("vm1") != [])
    assert a.plans[state["uid"]]["state"] == "abandoned"
    assert net.live_on("vm1") == ["c"]
    status, ans = net.release(item, t + 1)
    assert status == 409
    assert net.live_on("vm1") == ["c"] and len(net.starts_of("vm1")) == 1


@pytest.mark.parametrize("stale", ["a", "b", "c"])
@pytest.mark.parametrize("flag", ["left", "maintenance", "unarmed"])
def test_one_candidates_stale_flag_does_not_veto_a_failure(flag, stale):
    """Finding 5: a leave or maintenance that reached one candidate only (refused), then a
    crash: the 2 other views report w1 armed, not left, not in maintenance: it is failed."""
    net, t = make_net()
    kill_w1(net, 9.0)
    m = net.cores[stale].members["w1"]
    if flag == "unarmed":
        m.armed = False
    else:
        setattr(m, flag, True)
    net.run(9.0, 8.0 + FAILOVER_TIME + 6)
    assert failed_at(net) is not None
    assert net.live_on("vm1") == ["w2"]


def test_vm_whose_latest_done_plan_names_a_left_member_is_never_moved():
    """Finding 1: vm1 moved w1 -> w2; w1 came back and demoted its copy; w2 left (stop:
    vm1 runs on there, unprotected); w1 fails again.  w3's replica still names w1 as its
    parent, and w2 (left) is not asked for its inventory: only the done plan says where
    vm1 runs.  It must not be started on w3."""
    invs = standard_invs()
    invs["w3"] = host_inv("w3", vm("vm1", "w1", creation=250))
    net, t = make_net(workers=("w1", "w2", "w3"), invs=invs)
    a = net.cores["a"]
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 5)
    assert net.live_on("vm1") == ["w2"]
    # w1 comes back (new incarnation): its copy is demoted to a backup of w2
    net.dead.discard("w1")
    net.cores["w1"] = Core(cfg("w1"), 9000, net.now)
    net.run(net.now + 1, net.now + 3)
    assert net.cores["w1"].rejoin.demote_asked == {"vm1": "w2"}
    net.copy("w1", "vm1").update(parent_host="w2", live=False, state="stopped")
    net.cores["w1"].demote_done({"vm1": "w2"})
    net.run(net.now + 1, net.now + 5)
    assert net.cores["w1"].armed
    # w2 leaves in order (2 acknowledgements), then stops; vm1 keeps running there
    body = net.cores["w2"].leave_body()
    for c in "abc":
        assert net.cores[c].handle_leave(body, net.now)[0] == 200
    net.dead.add("w2")                      # its agent is gone; its VMs are not
    net.run(net.now + 1, net.now + 3)
    assert all(net.cores[c].members["w2"].left for c in "abc")
    net.kill("w1")
    since = len(net.log)
    net.run(net.now + 1, net.now + FAILOVER_TIME + 20)
    assert "w1" in a.detector.failed
    assert [s[0] for s in net.starts_of("vm1")] == ["w2"]
    notes = [x["msg"] for _, n, x in net.log[since:] if n == "a" and x["kind"] == "event"]
    assert any("VM vm1 of w1 is not failed over" in m and "w2" in m for m in notes), notes


def test_where_a_vm_last_ran_does_not_depend_on_the_plan_cap():
    """Finding 7: vm1 moved w1 -> w2; then many other failovers push its plan out of the
    capped plan list (MAX_PLANS).  w2 fails: vm1 must still be moved (no copy names w2)."""
    net, t = make_net()
    a = net.cores["a"]
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 5)
    assert net.live_on("vm1") == ["w2"]
    term = a.manager_term(net.now)
    others = [{"vm": f"x{i}", "from": "w9", "to": "w8", "term": term, "uid": f"other-{i}",
               "state": "done", "seq": 1000 + i} for i in range(MAX_PLANS + 20)]
    for c in "abc":
        assert net.cores[c].handle_plan({"term": term, "entries": others}, net.now)[0] == 200
        assert all(e["vm"] != "vm1" for e in net.cores[c].plans.values())
    net.kill("w2")
    net.run(net.now + 1, net.now + FAILOVER_TIME + 20)
    assert "w2" in a.detector.failed
    assert net.live_on("vm1") == ["c"]
    assert a.moved_vms("w1")[0]["vm_name"] == "vm1"


def _persisted(net, node, name):
    acts = [x for _, n, x in net.log if n == node and x["kind"] == "persist"
            and x["file"] == name]
    return acts[-1]["data"] if acts else None


def test_candidate_restart_keeps_members_and_where_vms_ran():
    """Findings 6 and 7: the membership table and the plans are written to state_dir
    (a "persist" action, the agent writes the file) and read back at start."""
    net, t = make_net()
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 5)
    assert net.live_on("vm1") == ["w2"]
    members, plans = _persisted(net, "b", "members.json"), _persisted(net, "b", "plans.json")
    assert members is not None and plans is not None
    b2 = Core(cfg("b"), 7000, 100.0, members_state=wire(members), plans_state=wire(plans))
    view = {m["hostname"]: m for m in b2.table.members_view(100.0)}
    assert set(view) == set(net.cores["b"].members)
    assert view["w2"]["armed"] is True and view["w2"]["silence"] == 0
    assert b2.moved_vms("w1") == net.cores["b"].moved_vms("w1") != []
    assert [e["uid"] for e in b2.planbook.latest_plans(("done",)).values()] == \
        [e["uid"] for e in net.cores["b"].planbook.latest_plans(("done",)).values()]


def test_a_vm_stranded_by_an_abandoned_failover_is_failed_over_again_not_unlocked_at_home():
    """sim-soak failover 30394: the failover's POST to w2 is lost; w2 rewrote vm1's copy
    to name itself, then fenced (locking it as a stopped VM) and came back as a new
    incarnation that does not know the plan (abandoned).  No copy names w1 any more:
    vm1 is placed by w1's failover again (Detector.stranded), and w2's restore does not
    unlock it at home, unstarted."""
    invs = standard_invs()
    for h in "bc":
        invs[h] = host_inv(h)
    net, t = make_net(invs=invs)
    net.policy = lambda net, src, act, now: "fail" if act["name"] == "failover" and \
        not act["body"].get("check") and len(net.sends(name="failover")) == 1 else None
    last = kill_w1(net, 10.0)
    t = net.run(10.0, last + FAILOVER_TIME + 5, step=0.5,
                until=lambda t: net.sends(name="failover"))
    (lost,) = net.sends(name="failover")
    assert lost["to"] == "w2" and net.starts == []
    net.copy("w2", "vm1")["parent_host"] = LOCK
    net.cores["w2"] = Core(cfg("w2"), STARTUP["w2"] + 1, t, locked_vms=("vm1",))
    net.run(t + 0.5, t + 40, step=0.5)
    assert net.live_on("vm1") == ["w2"] and len(net.starts_of("vm1")) == 1
    assert not [e for e in net.events() if "stays at home" in e["msg"]]
    moved = [e for e in net.events("a", "vm_moved") if e["details"]["vm_name"] == "vm1"]
    assert moved and moved[-1]["details"]["from_host"] == "w1"


def _strand_on_w2(invs=None):
    """vm1 planned w1 -> w2, started there, answer lost; w2's agent restarts in order
    (vm1 runs on) and does not know the plan: abandoned, vm1 stranded, running on w2."""
    net, _ = make_net(invs=invs or standard_invs())
    restarted = []

    def policy(net, src, act, now):
        if act["name"] == "failover" and act["to"] == "w2":
            if act["body"].get("check"):
                return None if restarted else "fail"
            return "timeout"       # w2 starts vm1, its answer is lost
        return None
    net.policy = policy
    last = kill_w1(net, 10.0)
    t = net.run(10.0, last + FAILOVER_TIME + 5, step=0.5, until=lambda t: net.starts_of("vm1"))
    net.cores["w2"] = Core(cfg("w2"), STARTUP["w2"] + 1, t)
    restarted.append(t)
    net.run(t + 0.5, t + 40, step=0.5)
    a = net.cores["a"]
    assert net.live_on("vm1") == ["w2"] and len(net.starts_of("vm1")) == 1
    assert [e["state"] for e in a.plans.values() if e["vm"] == "vm1"] == ["abandoned"]
    return net


def _w2_leaves(net):
    body = net.cores["w2"].leave_body()
    for c in "abc":
        assert net.cores[c].handle_leave(body, net.now)[0] == 200
    net.dead.add("w2")        # its agent is gone, vm1 runs on there


@pytest.mark.parametrize("unplaced", [False, True])
def test_a_stranded_vm_that_runs_on_its_target_is_never_started_again(unplaced):
    """Review of issue 13 (helper-16): w2 starts vm1 but its answer is lost; w2's agent
    restarts in order (vm1 runs on) and does not know the plan: abandoned, vm1 stranded.
    w1's failover must settle (it skips vm1, live on w2), and once w2 has left (not asked
    for its inventory) vm1 must not be started elsewhere: the abandoned plan's target
    counts like the host a done plan started it on.  unplaced: w1 also has a VM with no
    target, so its failover is retried anyway (the hole before the stranded rule too)."""
    invs = standard_invs()
    if unplaced:
        invs["w1"]["vms"].append(vm("vm2", "w1", live=True, creation=300))
        invs["b"]["vms"].append(vm("vm2", "w1"))   # a replica without a snapshot
    net = _strand_on_w2(invs)
    a = net.cores["a"]
    assert a.detector.stranded() == {"vm1": "w1"}
    if not unplaced:           # nothing left to do: w1's episode settles
        jobs = a.manager.job_seq
        net.run(net.now + 0.5, net.now + 60, step=0.5)
        assert ("failed", "w1", STARTUP["w1"]) in a.detector.settled
        assert a.manager.job_seq - jobs <= 1, "jobs with nothing to do"
    _w2_leaves(net)
    net.run(net.now + 0.5, net.now + 40, step=0.5)
    assert [s[0] for s in net.starts_of("vm1")] == ["w2"], "started again while it runs on w2"


# -- external fencing (issue 13 item 5) -----------------------------------------------

BMC = "/usr/local/sbin/bmc-off"
FENCING_ON = {c: {"fence_commands": {"w1": [BMC, "--host", "w1-bmc"]}} for c in "abc"}


def bmc_net():
    return make_net(extra=FENCING_ON)


def test_an_external_fence_powers_off_a_silent_member_and_fails_it_over_at_once():
    net, _ = bmc_net()
    net.bmc["w1"] = "off"
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 2, step=0.5)
    ((at, node, act),) = net.external
    assert node == "a" and act["member"] == "w1" and act["argv"] == [BMC, "--host", "w1-bmc"]
    (ev,) = net.events("a", "external_fence")
    assert "w1-bmc" not in ev["msg"] + str(ev["details"]), "arguments may hold credentials"
    assert last + TIMINGS["survival_window"] <= at < last + TIMINGS["survival_window"] + 2
    tf = failed_at(net)
    assert tf == at < last + FAILOVER_TIME
    (ev,) = net.events("a", "member_failed")
    assert ev["details"]["how"] == "fence confirmed"
    assert net.live_on("vm1") == ["w2"]
    assert [e["event"] for e in net.events("a") if e["event"].startswith("external")] == \
        ["external_fence"]


def test_an_external_fence_of_a_member_alive_but_cut_off_powers_it_off_before_any_start():
    net, _ = bmc_net()
    net.bmc["w1"] = "off"
    w1 = net.cores["w1"]
    w1.link.survive = lambda now, quorum, reach: None   # its own fence is late
    net.run(6.0, 9.0, step=0.5)
    net.cut = {("w1", c) for c in "abc"}
    net.copy("w1", "vm1")["live"] = True
    net.run(9.5, 9.0 + FAILOVER_TIME, step=0.5)
    ((at, _, _),) = net.external
    assert "w1" in net.dead                      # powered off: its VMs are gone
    first_start = min(n for n, x in sent_at(net, "a", "failover"))
    assert at <= first_start < 9.0 + FAILOVER_TIME
    assert net.live_on("vm1") == ["w2"]          # (never on two hosts: Net checks it)


def test_a_failed_external_fence_leaves_the_member_to_its_failover_time():
    net, _ = bmc_net()
    net.bmc["w1"] = "fail"
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME - 0.5, step=0.5)
    assert len(net.external) == 1 and failed_at(net) is None
    (err,) = net.events("a", "external_fence_failed")
    assert err["level"] == "ERROR" and "exited 1" in err["msg"]
    net.run(last + FAILOVER_TIME, last + FAILOVER_TIME + 3, step=0.5)
    assert failed_at(net) >= last + FAILOVER_TIME and net.live_on("vm1") == ["w2"]
    assert len(net.external) == 1                # once per incarnation


@pytest.mark.parametrize("how", ["no commands", "another member's", "one view", "maintenance",
                                 "unarmed"])
def test_no_external_fence_without_every_condition(how):
    extra = dict(FENCING_ON)
    if how == "no commands":
        extra = {}
    if how == "another member's":
        extra = {c: {"fence_commands": {"w2": [BMC, "w2"]}} for c in "abc"}
    net, _ = make_net(extra=extra, noack=("w1",) if how == "unarmed" else ())
    net.bmc["w1"] = "off"
    if how == "maintenance":
        net.cores["w1"].link.maintenance = True
    net.run(6.0, 9.0, step=0.5)
    if how == "one view":
        net.cut = {("w1", "a")}
        net.run(9.5, 9.0 + FAILOVER_TIME + 5, step=0.5)
    else:
        last = kill_w1(net, 10.0)
        net.run(10.0, last + FAILOVER_TIME - 1, step=0.5)
    assert net.external == []
    assert net.events(event="external_fence") == []


def test_an_external_fence_that_ends_after_the_member_came_back_is_reported():
    """Review (helper-16): the command ran for incarnation st - 1, the member came back as
    st meanwhile, and the command then powered the host off: nothing is confirmed for st
    (it waits for its failover_time), and an ERROR says what happened."""
    net, t = bmc_net()
    a = net.cores["a"]
    st = a.members["w1"].startup_time
    a.manager.external[("w1", st - 1)] = "running"
    since = len(a.box.out)
    a.fence_member_done("w1", st - 1, True, "exited 0", t)
    assert a.members["w1"].fence_confirmed is None
    (err,) = [x for x in a.box.out[since:] if x["kind"] == "event"]
    assert err["event"] == "external_fence_failed" and err["level"] == "ERROR"
    assert "came back as startup_time" in err["msg"]
    a.fence_member_done("w1", st, True, "exited 0", t)     # never asked for: ignored
    assert a.members["w1"].fence_confirmed is None


# -- review of issue 13 (helper-17): stranded VMs and external fencing --------------------

def test_a_restore_leaves_locked_a_vm_whose_abandoned_plans_target_left():
    """vm1 was stopped on w1 when w1 fenced (locked).  w1's failover starts it on w2
    (plan abandoned, w2 restarted in order); w2 leaves (vm1 runs on).  w1 comes back
    with locked_vms=[vm1]: _restore uses last_ran only (no `maybe`), sees vm1 live
    nowhere and gives w1 a done plan to itself.  w1 fails again: vm1's latest plan is
    that done one (w1, failed, not left), so vm1 is started elsewhere while it runs on
    w2.  The restore now counts the abandoned plan's target that left like last_ran."""
    invs = standard_invs()
    invs["w1"]["vms"][0].update(live=False, state="stopped")
    net = _strand_on_w2(invs)
    _w2_leaves(net)
    net.run(net.now + 0.5, net.now + 3, step=0.5)
    # w1 comes back: its copy of vm1 is locked (stopped when it fenced)
    net.dead.discard("w1")
    net.copy("w1", "vm1").update(parent_host=LOCK, live=False, state="stopped")
    net.cores["w1"] = Core(cfg("w1"), 9000, net.now, locked_vms=("vm1",))
    w1 = net.cores["w1"]
    for _ in range(60):
        net.run(net.now + 0.5, net.now + 0.5, step=0.5)
        acts = [x for _, n, x in net.log if n == "w1" and x["kind"] == "restore"]
        if acts:
            net.copy("w1", "vm1")["parent_host"] = "w1"
            w1.restore_done(["vm1"])
            break
    net.run(net.now + 0.5, net.now + 10, step=0.5)
    net.kill("w1")
    net.run(net.now + 0.5, net.now + FAILOVER_TIME + 30, step=0.5)
    starts = [s[0] for s in net.starts_of("vm1")]
    assert net.copy("w2", "vm1")["live"]
    assert starts == ["w2"], f"vm1 started again while it runs on w2 (left): {starts}"


def test_a_plan_abandoned_before_it_was_sent_does_not_keep_its_vm_down_once_its_target_left():
    """The first plan of vm1 (-> w2) gets no acknowledgement (b and c miss the POST plan):
    abandoned, nothing was sent to w2.  w2 leaves in order before the next round.  vm1
    runs nowhere: it is placed (only a plan whose start was sent counts like last_ran)."""
    net, _ = make_net()
    a = net.cores["a"]
    state = {"n": 0, "left": False}

    def policy(net, src, act, now):
        if act["name"] == "plan" and not state["left"]:
            state["n"] += 1
            return "fail"
        return None
    net.policy = policy
    last = kill_w1(net, 10.0)
    net.run(10.0, last + FAILOVER_TIME + 5, step=0.5,
            until=lambda t: any(e["state"] == "abandoned" for e in a.plans.values()))
    assert [e["to"] for e in a.plans.values() if e["state"] == "abandoned"] == ["w2"]
    _w2_leaves(net)
    state["left"] = True
    net.run(net.now + 0.5, net.now + 120, step=0.5)
    assert net.live_on("vm1") != [], "vm1 of dead w1 is never started again"


def test_a_vm_stranded_again_during_the_job_that_re_placed_it_is_not_forgotten():
    """vm1's first plan (-> w2) is abandoned (never delivered: w2 does not know its uid):
    stranded before the next job J1, so J1's snapshot holds (vm1, w1).  J1 plans vm1
    again (-> w2: never delivered again) and vm2 (its start is slow).  The check
    abandons vm1's second plan while vm2 is still starting.  When J1 ends, (vm1, w1) is
    in the snapshot: w1 settles, and vm1 -- live nowhere, its owner dead -- is never
    placed again (the snapshot is now of (vm, uid): a new abandoned plan is new)."""
    invs = standard_invs()
    invs["w1"]["vms"].append(vm("vm2", "w1", live=True, creation=300))
    invs["w2"]["vms"].append(vm("vm2", "w1", creation=300))
    invs["c"]["vms"].append(vm("vm2", "w1", creation=200))
    net, _ = make_net(invs=invs)
    a = net.cores["a"]
    phase = {"p": "A"}

    def policy(net, src, act, now):
        if act["name"] != "failover" or act["body"].get("check"):
            return None
        body = act["body"]
        names = [e["vm_name"] for e in body.get("entries", [body])]
        if phase["p"] == "C":
            return None
        if "vm2" in names and phase["p"] == "A":
            return 409, {"error": "not armed", "refused": True}
        if "vm2" in names and phase["p"] == "B":
            return "hold"
        if "vm1" in names:
            return "fail"      # lost on the way: the target never hears of it
        return None
    net.policy = policy
    last = kill_w1(net, 10.0)
    ab = lambda: [u for u, e in a.plans.items() if e["vm"] == "vm1" and e["state"] == "abandoned"]
    net.run(10.0, last + FAILOVER_TIME + 40, step=0.5,
            until=lambda t: ab() and a.manager.job is None)
    assert len(ab()) == 1 and a.detector.stranded() == {"vm1": "w1"}
    phase["p"] = "B"
    net.run(net.now + 0.5, net.now + 40, step=0.5,
            until=lambda t: len(ab()) == 2 and net.held)
    assert a.manager.job is not None and a.manager.job.stranded
    item = next(x for x in net.held if x[1]["name"] == "failover")
    phase["p"] = "C"
    net.release(item, net.now)
    net.run(net.now + 0.5, net.now + 120, step=0.5)
    assert net.live_on("vm2") == ["w2"]
    assert net.live_on("vm1") != [], "vm1 of dead w1 is never started again"


def test_an_external_fence_exit_0_is_not_believed_once_the_member_is_heard_again():
    """A fence command that exits 0 although the member is not off (a misdirected or
    lying BMC script): w1 is cut off from a and b for survival_window (its own fence is
    late), the command runs; meanwhile the cut heals and w1 pings all 3 candidates again;
    then the command exits 0.  Not taken as a fence: an ERROR, and w1 is not failed over."""
    net, _ = make_net(extra=FENCING_ON)
    a = net.cores["a"]
    w1 = net.cores["w1"]
    w1.link.survive = lambda now, quorum, reach: None   # its own fence is late
    held = []
    orig = a.fence_member_done
    a.fence_member_done = lambda *args: held.append(args)   # the command is still running
    net.run(6.0, 9.0, step=0.5)
    net.cut = {("w1", "a"), ("w1", "b")}
    net.run(9.5, 9.0 + TIMINGS["survival_window"] + 3, step=0.5, until=lambda t: net.external)
    assert net.external and "w1" not in net.dead
    net.cut = set()
    net.run(net.now + 0.5, net.now + 4, step=0.5)
    assert all(r["silence"] < 2 for v in a.detector.fresh_views(net.now)
               for h, r in v.items() if h == "w1")
    a.fence_member_done = orig
    member, st, _, _, _ = held[0]
    since = len(a.box.out)
    orig(member, st, True, "exited 0", net.now)       # the BMC script says "off"
    (err,) = [x for x in a.box.out[since:] if x["kind"] == "event"]
    assert err["event"] == "external_fence_failed" and "heard it after" in err["msg"]
    assert a.members["w1"].fence_confirmed is None
    net.run(net.now + 0.5, net.now + 5, step=0.5)     # Net asserts: never live twice
    assert failed_at(net) is None and net.live_on("vm1") == ["w1"]


def test_no_external_fence_when_the_manager_alone_is_cut_from_the_member_and_one_candidate():
    """a (manager) hears neither w1 nor b; c hears both; w1 reaches b and c.  Only a's
    own view reports w1 silent: no power off, no failover."""
    net, _ = make_net(extra=FENCING_ON)
    net.bmc["w1"] = "off"
    a = net.cores["a"]
    net.run(6.0, 9.0, step=0.5)
    net.cut = {("w1", "a"), ("a", "b"), ("b", "a")}
    net.policy = lambda net, src, act, now: "fail" if {src, act["to"]} == {"a", "b"} else None
    net.run(9.5, 9.0 + 2 * FAILOVER_TIME, step=0.5)
    assert a.can_act(net.now)
    assert net.external == [] and failed_at(net) is None
    assert net.live_on("vm1") == ["w1"]
