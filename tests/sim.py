#!/usr/bin/env python3
"""Deterministic simulator for the hoster_ha cluster core (SPEC §3.1-§3.6).

Every node of a cluster runs in this one process on virtual time.  Each node
owns a real `hoster_ha.Core`, driven exactly as the agent drives it: a ping
round every `ping_interval` (core.outgoing -> handle_register/handle_ping on
the candidate -> on_register_result/on_ping_result back on the sender, or a
failure at sent_at + ping_timeout), a control-loop tick every `tick` seconds
(core.tick with an instantly acknowledging watchdog), and the actions the
core returns (events are logged, terms persisted to the node's "disk",
fences kill the node, a manager's "send" requests travel the same network
and come back through on_response).

Hosts may hold VMs (the `vm` command; a node without VMs behaves exactly as
in the election-only model).  A host's VMs are copies: {name: production,
parent_host, latest snapshot creation or None, live, memory}; several hosts
may hold copies of one VM (replicas: same name, parent_host = the owner).
GET vms is answered from them in the shape of SPEC §4.3 (a VM whose start
the core accepted is "starting").  POST failover goes to the target's
core.handle_failover with its local copy; an accepted start rewrites
parent_host (change-parent) at once, the VM is live `start_delay` seconds
later (1-3 s, seeded), and then finish_failover's answer travels back (the
link may lose it).  `failstart NODE VM` makes the next start of VM there
fail; the target then sets the copy's parent_host back to what the core's
start entry says (restore_parent, hoster_ha.failed_start_parent) before the
failure travels back.  The host-side rules are hoster_ha's, never a copy: a fence (the core's,
or the watchdog's) carries out hoster_ha.fence_plan (the record: the production
VMs the node runs as their parent and the failover starts under way there; the
locks, parent_host = __HA_LOCKED_...__: every production VM whose parent is the
node, running or not) and destroys every live VM at most fence_timeout later;
the record is passed as fenced_vms when the node starts again and deleted on
the core's clear_fence_record action (once it is armed).  A "demote" action
carries out hoster_ha.demotion_steps on the local copies, then calls
core.demote_done.  A power loss keeps what core.running_record says the
agent's running record holds.  Sim._actions is the simulator's one executor of
the core's actions (hoster_ha.Core.take_actions lists them).

A node is running, paused (a hung host: it neither ticks nor answers; its
watchdog fences it watchdog_timeout after its last heartbeat if it was
armed), down (killed; once VMs exist, the watchdog of a node that was armed
fences it watchdog_timeout after its last heartbeat, an unarmed one keeps
its VMs running) or fenced.  `crash` is a power loss: down, and its VMs are
gone at once, without a fence record.  `restart` gives it a new
startup_time and the term it persisted (a restart within watchdog_timeout
is not fenced).

The network is a link matrix: each direction of each pair is up, down,
lossy(p) or delayed(d seconds).  Each node has its own clock
(node_now = offset + rate * t).  Latencies come from a seeded RNG and
simultaneous events run in the order they were scheduled, so a run is a pure
function of its inputs: the same commands and seed give the same log.

After every simulated step the simulator checks, independently of the core:
  - at most one live node (running or paused, not fenced) is manager;
  - a node fences only after it logged `armed` in this incarnation;
  - a candidate moves its vote away from another candidate only when
    vote_lease has passed since it last received a ping from that holder's
    incarnation, and casts no vote in its first vote_lease after start;
  - every granted term is higher than the voter's earlier grants and is
    persisted before any answer announces it;
  - the terms of successive managers (manager_elected events) strictly increase,
    and an acting manager's term never falls (commands are checked against the
    highest manager term a node has seen);
  - request bodies pass the transport's field checks;
  - a production VM is never live on two hosts at once (a fencing host's VMs
    count as live until they are destroyed);
  - a failover start is accepted only on a non-backup host holding a snapshot;
  - every production VM of a silent host, and every VM of the fence record of a
    node that rejoined, is live again (or, with no eligible replica, named by a
    vm_start_failed event) within the bound of Sim._check_recovery, whenever the
    rest of the cluster stayed healthy.
A breach raises SimViolation.

Commands (a list of [time_seconds, "command"]; a scenario folder's setup.json gives the
`host` and `vm` commands at time 0 and its cmds.json the rest: tests/test_scenarios.py):
  start NODE | kill NODE | crash NODE | restart NODE | pause NODE | resume NODE
  link A>B down|up|lossy P|delay SECONDS      one direction
  link A-B down|up|lossy P|delay SECONDS      both directions
  isolate NODE | heal
  (in any command, @manager is the node acting as manager now, @last what @manager
   stood for last time; with no acting manager the command is skipped)
  vm NODE NAME [parent=HOST] [production=1|0] [snapshot=CREATION|none] [live=1|0]
               [memory=GIB]                   a VM copy on NODE (parent: NODE)
  host NODE [free=GIB] [backup=1|0] [confirm=1|0]   before NODE starts (default free 8;
                                              confirm=0: its fences are never confirmed)
  failstart NODE VM                           the next start of VM on NODE fails
  expect manager NODE | no_manager | one_manager | agreed
  expect fenced NODE | not_fenced NODE | armed NODE | unarmed NODE
  expect running NODE | down NODE | vote VOTER HOLDER | quorum NODE | no_quorum NODE
  expect term NODE N            (the manager term NODE sees)
  expect live VM NODE|none      (VM live on exactly NODE / nowhere)
  expect parent NODE VM HOST|locked      (parent_host of the copy on NODE)
  expect starts VM N            (failover starts of VM accepted so far, anywhere)
  expect event EVENT VM | no_event EVENT VM     (a core event naming VM was logged)
Candidates are always node1, node2, node3; any other node name is a worker.

    python3 tests/test_scenarios.py tests/scenarios/NAME   run one scenario, print its log
    python3 tests/sim.py --seed N                 replay one random seed
    python3 tests/sim.py --vms --seed N           replay one random failover seed
"""

import heapq
import inspect
import itertools
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import hoster_ha  # noqa: E402

CANDIDATES = ("node1", "node2", "node3")
TIMINGS = {"ping_interval": 2, "ping_timeout": 1.5, "survival_window": 10, "vote_lease": 6,
           "watchdog_timeout": 10, "fence_timeout": 10, "failover_time": 60}
SECRET = "sim-secret-0123456789abcdef"
WALL_BASE_MS = 1_700_000_000_000
EPS = 1e-9

RUNNING, PAUSED, DOWN, FENCED = "running", "paused", "down", "fenced"
GIB = 1 << 30
LOCK_PREFIX = hoster_ha.LOCK_PREFIX


class SimViolation(AssertionError):
    """An invariant broke.  The message says which, when and where."""


class SimError(AssertionError):
    """The simulator itself went wrong (an event scheduled in the past)."""


BMC = "/usr/local/sbin/bmc-off"   # `host N bmc=...`: the candidates' fence command for N


def node_config(name, index, timings=None, extra=None):
    """A validated Config for node `name`, built the way the agent builds it."""
    data = {"candidates": [{"hostname": c, "address": f"10.0.0.{i + 1}", "port": 8081,
                            "protocol": "http"} for i, c in enumerate(CANDIDATES)],
            "hostname": name, "secret": SECRET}
    data.update(timings or TIMINGS)
    data.update(extra or {})
    if name not in CANDIDATES:
        data["address"] = f"10.0.1.{index + 1}"
        data["port"] = 8081
    return hoster_ha.parse_config(data, "<sim>")


class Node:
    """One simulated host: its clock, its disk, and the Core of its current incarnation."""

    def __init__(self, name, cfg, rate=1.0, offset=0.0):
        self.name, self.cfg, self.rate, self.offset = name, cfg, rate, offset
        self.role = "candidate" if cfg.is_candidate else "worker"
        self.who = f"{name}/{self.role}"
        self.core = None
        self.state = DOWN
        self.inc = 0                # event epoch: bumped on start, stop, resume; stale events are void
        self.incarnation = 0        # process incarnation: bumped on start only
        self.disk = {}              # state_dir, what survives restarts: {"term": n,
        #                             "members.json": .., "plans.json": .., "maintenance": 1}
        self.startup_time = 0
        self.start_local = None
        self.armed_logged = False   # an "armed" event was seen in this incarnation
        self.hb_t = None            # real time of the last watchdog heartbeat
        self.hb_armed = False       # armed state carried by that heartbeat
        self.pause_id = 0
        # the sim's own record of this candidate's vote (independent of the core)
        self.vote_holder = None     # (holder, holder_startup)
        self.vote_renewed = None    # local time of the last ping from that holder incarnation
        self.vote_inc = None        # our incarnation that granted it (a dead one renews nothing)
        self.max_granted = 0
        self.acting_term = 0        # highest term this incarnation has acted (been manager) with
        self.term_drop_seen = False
        self.manager_t = None       # sim time this incarnation became manager (None: it is not)
        # the host under the agent: what a restart of the agent does not change
        self.vms = {}               # VM copies: name -> {production, parent, snap, live, memory}
        self.mem = 8 * GIB          # free memory with no VM running
        self.fence_record = None    # state_dir/fence.json: [VM names] or None
        self.fence_locked = []      # ... and the VMs that fence locked (its `locked`)
        self.host_epoch = 0         # bumped when the host's VMs die (fence, power loss)
        self.fence_pending = None   # token of a fence whose VM destruction is still to come
        self.fence_confirm = None   # the startup_time its fence confirms once the VMs are gone
        self.confirms = True        # False: its confirmations are lost (`host N confirm=0`)
        self.bmc = None             # its fence command's outcome (`host N bmc=off|fail|hang`)
        self.extra = {}             # its config's keys set by `host`
        self.fail_next = set()      # VM names whose next start here fails
        self.late_next = {}         # VM name -> its next start here fails, live this later
        self.term_lost = False      # state_dir/term is lost at the next start
        self.stash = []             # results of the core's requests that came in while paused
        self.nonces = set()         # the agent's nonce cache (RAM: a new process forgets)
        self.wd_alive = True        # the ha_watchdog companion runs
        self.wd_restart_at = None   # sim time a new watchdog started by the agent is up
        self.armed_since = None     # sim time of this incarnation's "armed" event
        self.started_t = None       # sim time this incarnation started
        self.stopped_t = None       # sim time its last incarnation ended (or it paused)

    def free_memory(self):
        return self.mem - sum(v["memory"] for v in self.vms.values() if v["live"])

    def running_vms(self):
        return sum(1 for v in self.vms.values() if v["live"])

    def now(self, t):
        return self.offset + self.rate * t

    @property
    def alive(self):
        return self.state in (RUNNING, PAUSED)


class Batch:
    """A batched POST failover being served: the entries' results, answered together."""

    def __init__(self, msg, n):
        self.msg, self.left, self.results = msg, n, []

    def done(self, sim, d, uid, status, answer):
        self.results.append({"uid": uid, "status": status, "answer": answer})
        self.left -= 1
        if self.left == 0:
            sim._reply(d, self.msg, 200, {"ok": True, "results": self.results})


class BatchEntry:
    """One entry of a Batch, standing in for its request while the start runs."""

    def __init__(self, batch, body):
        self.batch, self.body = batch, body


class Msg:
    """One request in flight: a ping round's register/ping, or a core "send" action."""
    __slots__ = ("src", "inc", "dst", "kind", "body", "sent_at", "timeout_at", "rid", "method",
                 "done", "answered", "t_sent", "nonce", "t_done", "proc")

    def __init__(self, src, inc, dst, kind, body, sent_at, timeout_at, rid=None, method="POST"):
        self.src, self.inc, self.dst, self.kind = src, inc, dst, kind
        self.body, self.sent_at, self.timeout_at = body, sent_at, timeout_at
        self.rid, self.method = rid, method
        self.done = False   # its answer (or failure) has reached the sender
        self.answered = False   # ... and it was an answer
        self.t_sent = None  # sim time it was sent (the signature's timestamp)
        self.nonce = None   # the request's X-HA-Nonce
        self.t_done = None  # sim time its answer or failure reached the sender
        self.proc = None    # the sender's process incarnation (a pause does not change it)


class Sim:
    """A cluster on virtual time.  run(cmds) plays a command list; the log is in .log."""

    def __init__(self, nodes=None, seed=0, tick=0.5, latency=(0.001, 0.020), rates=None,
                 offsets=None, timings=None, wire=True, stop_on_violation=True, audit=1.0,
                 term_drop="violation", start_delay=(1.0, 3.0), fence_delay=None, net=None):
        self.seed = seed
        # the honest network (off for the scenarios, whose golden logs it would change):
        # {"jitter": mean extra latency (s), "spike": probability of 0.2-2 s more,
        #  "late": probability of a request delayed beyond its timeout, up to the
        #  signature window, "dup": probability of a replayed copy of a request (served
        #  only by a process whose nonce cache has not seen it), "slow": probability of a
        #  slow handler (GET vms, POST failover) at the target, up to "slow_max" s}
        self.net = dict(net) if net else None
        self.nonce_seq = itertools.count(1)
        self.streams = {}
        self.tick_interval = tick
        self.lat_lo, self.lat_hi = latency
        self.timings = dict(timings or TIMINGS)
        self.wire = wire            # JSON round-trip bodies, as the transport would
        self.audit = audit          # seconds between full checks of the manager invariant
        self.audit_on = False
        self.nodes = {}
        self.links = {}             # (a, b) -> ("down",) | ("lossy", p) | ("delay", d); absent = up
        self.q = []
        self.seq = 0
        self.t = 0.0
        self.log = []
        self.failures = []          # failed `expect` commands
        self.elections = []         # (t, node, startup_time, term)
        self.stop_on_violation = stop_on_violation
        self.violations = []
        self.maybe_managers = set()     # nodes that were manager at their last checked step
        self.office_lost = []           # times a running manager lost its majority
        self.unhandled = set()
        self.term_drop = term_drop  # "violation", or "record" into term_drops (a known core bug)
        self.term_drops = []
        # VMs (SPEC §3.3-§3.6): off until a `vm` command runs; nodes without VMs are unchanged
        self.vm_mode = False
        self.start_delay = start_delay  # (lo, hi) seconds from an accepted start to live
        self.fence_delay = fence_delay  # seconds from a fence to its VMs' end; None: random
        #                                 in [0, fence_timeout]
        self.starts = []                # (t, host, vm, uid, from_host) of accepted starts
        self.vm_events = []             # (t, node, event, vm) of core events naming a VM
        self.live_since = {}            # production VM -> (host, t) while it is live somewhere
        self.ran_on = {}                # production VM -> the host it last went live on
        self.went_live = {}             # production VM -> [(host, t)] every time it did
        self.heard = {}                 # node -> sim time a candidate last accepted its ping
        self.obligations = {}           # node H -> its current failure obligation
        self.rejoins = []               # rejoin obligations (Sim._check_recovery)
        self.recoveries = []            # (H, vm, t_silent, deadline, how, t_m) checked, held
        self.skipped = []               # (H, t_silent, why) obligations not asserted
        self.fence_seq = itertools.count(1)
        self.requests = []              # inventory and failover requests of managers
        self.failed_starts = set()      # VMs whose start failed (failstart)
        self.last_manager = None        # what @manager stood for in the last command
        self.leaves = {}                # (node, inc) -> a `leave` waiting for its answers
        rates, offsets = rates or {}, offsets or {}
        for name in list(CANDIDATES) + [n for n in (nodes or ()) if n not in CANDIDATES]:
            self.add_node(name, rates.get(name, 1.0), offsets.get(name, 0.0))

    def add_node(self, name, rate=1.0, offset=0.0):
        if name not in self.nodes:
            if not hoster_ha.valid_hostname(name):
                raise ValueError(f"bad node name {name!r}")
            cfg = node_config(name, len(self.nodes), self.timings)
            self.nodes[name] = Node(name, cfg, rate, offset)
        return self.nodes[name]

    # -- plumbing ---------------------------------------------------------------

    def at(self, t, kind, *args):
        if t < self.t - EPS:    # virtual time never runs backwards
            raise SimError(f"t={self.t:.6f}: event {kind} scheduled in the past, at {t:.6f}")
        self.seq += 1
        heapq.heappush(self.q, (t, self.seq, kind, args))

    def emit(self, who, level, msg):
        self.log.append(f"{self.t:7.1f}  {who:<16} {level:<7} {msg}")

    def violation(self, text):
        text = f"t={self.t:.3f}: {text}"
        self.violations.append(text)
        self.emit("sim", "VIOLATE", text)
        if self.stop_on_violation:
            raise SimViolation(text)

    def log_text(self):
        return "".join(line.rstrip() + "\n" for line in self.log)

    def run(self, cmds, until=None):
        """Play [(time, command)] and every event up to `until` (default: the last command)."""
        cmds = sorted(((float(t), c) for t, c in cmds), key=lambda x: x[0])
        for t, c in cmds:
            for word in c.replace(">", " ").replace("-", " ").split()[1:]:
                word = word.split("=", 1)[-1]
                if word.startswith("worker"):
                    self.add_node(word)
            self.at(t, "cmd", c)
        end = until if until is not None else (cmds[-1][0] if cmds else 0.0)
        if self.audit and not self.audit_on:
            self.audit_on = True
            self.at(self.t + self.audit, "audit")
        q = self.q
        while q and q[0][0] <= end + EPS:
            t, _, kind, args = heapq.heappop(q)
            self.t = t
            getattr(self, "_ev_" + kind)(*args)
        self.t = end
        return self

    # -- links ------------------------------------------------------------------

    def _stream(self, a, b, kind):
        """The RNG of one kind of message on one link direction.  Separate streams keep
        pings' latencies unchanged when the core adds or drops other traffic."""
        key = (a, b, kind)
        r = self.streams.get(key)
        if r is None:
            r = self.streams[key] = random.Random(f"{self.seed}/{a}>{b}/{kind}")
        return r

    def _hop(self, a, b, kind):
        """Arrival delay of one message a -> b, or None if the link loses it."""
        rng = self._stream(a, b, kind)
        latency = rng.uniform(self.lat_lo, self.lat_hi)
        st = None if a == b else self.links.get((a, b))
        if st is None:
            return latency
        if st[0] == "down":
            return None
        if st[0] == "lossy":
            return None if rng.random() < st[1] else latency
        return latency + st[1]

    # -- node lifecycle -----------------------------------------------------------

    def _start(self, n):
        if n.alive:
            return
        n.inc += 1
        n.incarnation += 1
        n.state = RUNNING
        now = n.now(self.t)
        n.startup_time = max(WALL_BASE_MS + int(round(self.t * 1000)), n.startup_time + 1)
        n.start_local = now
        n.armed_logged = False
        n.acting_term = 0
        n.term_drop_seen = False
        n.manager_t = None
        n.stash = []
        n.nonces = set()
        n.armed_since = None
        n.started_t = self.t
        if not n.wd_alive and n.wd_restart_at is None:
            n.wd_alive = True               # a new agent starts its watchdog (Agent.run)
        if n.fence_pending is not None:     # the host rebooted: its fence has ended
            self._destroy_all(n, "the fence ended before the reboot")
        if n.term_lost:
            self._lose_term(n)
        if not n.disk:                      # a new state_dir: the agent writes term 0
            n.disk["term"] = 0
        persisted = n.disk.get("term")      # None: the term file was lost (losetermfile)
        fenced = list(n.fence_record or [])
        # Agent.read_locked: what the fence locked while it was stopped (issue 11 item 2.2)
        locked = sorted(set(n.fence_locked or []) - set(fenced)) if n.fence_record is not None \
            else []
        n.core = hoster_ha.Core(n.cfg, n.startup_time, now, persisted_term=persisted,
                                fenced_vms=fenced, maintenance=bool(n.disk.get("maintenance")),
                                members_state=n.disk.get("members.json"),
                                plans_state=n.disk.get("plans.json"), locked_vms=locked)
        self.emit(n.who, "INFO", f"agent started (incarnation {n.incarnation}, persisted term "
                                 f"{'lost' if persisted is None else persisted}"
                                 + (f", fence record: {', '.join(fenced)}"
                                    if fenced else "")
                                 + (f", locked while stopped: {', '.join(locked)}"
                                    if locked else "") + ")")
        self.at(self.t, "round", n.name, n.inc)
        self.at(self.t, "tick", n.name, n.inc)

    def _stop(self, n, state):
        n.state = state
        n.stopped_t = self.t
        n.inc += 1          # every pending event of the old incarnation is void
        n.manager_t = None

    @staticmethod
    def _host_inventory(n):
        """n's VM copies as Host.inventory lists them (the fields the host-side rules read)."""
        return [{"vm_name": name, "production": v["production"], "parent_host": v["parent"],
                 "live": v["live"]} for name, v in sorted(n.vms.items())]

    def _fence(self, n, who, reason, agent=False):
        if not n.armed_logged:
            self.violation(f"{n.name} fenced but was never armed in this incarnation ({reason})")
        # the fence is confirmed (POST fenced, hoster_ha.confirm_fence) once its VMs are
        # gone, and only if no failover start was under way here: the agent checks
        # (Agent.fence), the watchdog finds no run_dir/hoster_ha.incarnation then
        # (Agent.sync_incarnation)
        n.fence_confirm = (n.core.startup_time if n.core is not None and n.confirms and
                           not n.core.starting() else None)
        self._stop(n, FENCED)
        n.hb_armed = False      # the host reboots: the watchdog of its next boot is new
        if not n.vms:
            self.emit(who, "FENCE", f"VMs destroyed, host rebooting ({reason})")
            self._confirm_fence(n)
            return
        # SPEC §3.3 steps 2-4, by hoster_ha.fence_plan: fence record and locks first, then
        # destroy within fence_timeout.  The agent's fence knows its failover starts
        # (`ours`); the watchdog's does not.
        inventory = self._host_inventory(n)
        running = {v["vm_name"] for v in inventory if v["live"]}
        ours = n.core.fence_ours(running) if n.core is not None and agent else ()
        old = None if n.fence_record is None else {"vms": n.fence_record,
                                                   "locked": n.fence_locked}
        plan = hoster_ha.fence_plan(n.name, inventory, running, ours, old)
        record = plan["vms"]
        n.fence_record, n.fence_locked = record, plan["locked"]
        stamp = LOCK_PREFIX + time.strftime(
            "%Y-%m-%d_%H-%M-%S", time.gmtime(WALL_BASE_MS / 1000 + self.t)) + "__"
        for v in plan["lock"]:
            n.vms[v["vm_name"]]["parent"] = stamp
        also = [x for x in plan["locked"] if x not in record]
        n.host_epoch += 1   # starts in progress never finish
        live = plan["destroy"]
        delay = self.fence_delay
        if delay is None:
            delay = self._stream(n.name, n.name, "fence").uniform(0, n.cfg.fence_timeout)
        token = next(self.fence_seq)
        n.fence_pending = token
        self.emit(who, "FENCE", f"fence record [{', '.join(record)}] (locked), "
                                + (f"also locked [{', '.join(also)}], " if also else "")
                                + f"destroying [{', '.join(live)}] within {delay:.1f} s, "
                                f"host rebooting ({reason})")
        self.at(self.t + delay / n.rate, "destroy", n.name, token)

    def _ev_destroy(self, name, token):
        n = self.nodes[name]
        if n.fence_pending == token:
            self._destroy_all(n, "fence")

    def _destroy_all(self, n, why):
        n.fence_pending = None
        gone = sorted(name for name, v in n.vms.items() if v["live"])
        for name in gone:
            self._set_live(n, name, False)
        if gone:
            self.emit(f"{n.name}/host", "INFO", f"VMs destroyed: {', '.join(gone)} ({why})")
        self._confirm_fence(n)

    def _confirm_fence(self, n):
        """The fence's VMs are gone: POST fenced to every candidate, from the fenced
        incarnation, over the same network (a partition may let it reach one or none)."""
        st, n.fence_confirm = n.fence_confirm, None
        if st is None:
            return
        body = {"hostname": n.name, "startup_time": st,
                "record": {"ts": 0.0, "reason": "fence", "vms": list(n.fence_record or []),
                           "locked": list(n.fence_locked or [])}}
        if hoster_ha.check_fields(body, hoster_ha.FENCED_FIELDS):
            self.violation(f"{n.name} sent a malformed fenced")
        self.emit(f"{n.name}/host", "INFO", f"fence confirmed to the candidates "
                                            f"(startup_time {st})")
        for cand in n.cfg.candidate_names:
            self._transmit(Msg(n.name, n.inc, cand, "fenced", body, n.now(self.t),
                               self.t + n.cfg.ping_timeout / n.rate))

    def _set_live(self, n, name, live):
        """Change whether VM `name` runs on n; a production VM may run on one host only."""
        v = n.vms[name]
        if v["live"] == live:
            return
        v["live"] = live
        if not v["production"]:
            return
        if not live:
            if self.live_since.get(name, (None,))[0] == n.name:
                del self.live_since[name]
            return
        others = [x.name for x in self.nodes.values()
                  if x is not n and name in x.vms and x.vms[name]["live"]]
        self.live_since[name] = (n.name, self.t)
        self.ran_on[name] = n.name
        self.went_live.setdefault(name, []).append((n.name, self.t))
        if others:
            self.violation(f"VM {name} is live on {n.name} and on {', '.join(others)}")

    # -- events -------------------------------------------------------------------

    def _ev_round(self, name, inc):
        n = self.nodes[name]
        if n.inc != inc or n.state != RUNNING:
            return
        now = n.now(self.t)
        # Agent.loop: heartbeat, the watchdog-gone rule, then the ping round
        n.core.check_watchdog(n.wd_alive, now, restarting=n.wd_restart_at is not None)
        self._actions(n)
        if n.state != RUNNING:
            return          # it fenced
        for cand, kind, body in n.core.outgoing(now):
            self._send(n, cand, kind, body, now)
        self._actions(n)
        self.at(self.t + n.cfg.ping_interval / n.rate, "round", name, inc)

    def _send(self, n, cand, kind, body, now):
        if self.wire:
            body = json.loads(json.dumps(body))
        # (the random runs, wire=False, check every register and 1 ping in 8: the same
        # builder makes them all)
        err = hoster_ha.check_fields(
            body, hoster_ha.REGISTER_FIELDS if kind == "register" else hoster_ha.PING_FIELDS) \
            if self.wire or kind == "register" or body.get("seq", 0) % 8 == 1 else None
        if err:
            self.violation(f"{n.name} sent a malformed {kind} to {cand}: {err}")
        self._transmit(Msg(n.name, n.inc, cand, kind, body, now,
                           self.t + n.cfg.ping_timeout / n.rate))

    def _send_action(self, n, a, now):
        """A request the core asked for ({"kind": "send", ...}); the answer goes to on_response."""
        body = a.get("body")
        if self.wire and body is not None:
            body = json.loads(json.dumps(body))
        msg = Msg(n.name, n.inc, a["to"], a["name"], body, now,
                  self.t + a["timeout"] / n.rate, rid=a["id"], method=a["method"])
        msg.proc = n.incarnation
        if self.vm_mode and (a["name"] == "vms" or (a["name"] == "failover"
                                                   and not (body or {}).get("check"))):
            self.requests.append(msg)   # a job waits for these (Sim._check_recovery)
        self._transmit(msg)

    def _transmit(self, msg):
        """Send a request.  The sender's timeout is scheduled now, at send time: it fires
        at timeout_at whatever happens to the message (a late answer is dropped)."""
        self.at(msg.timeout_at, "timeout", msg)
        msg.t_sent, msg.nonce = self.t, next(self.nonce_seq)
        hop = self._hop(msg.src, msg.dst, msg.kind) if msg.dst in self.nodes else None
        if hop is not None and self.net:
            hop, dup = self._net_request(msg, hop)
            if dup is not None:     # a replayed copy: its answer goes nowhere
                self.at(self.t + dup, "deliver", msg, True)
        if hop is not None:
            self.at(self.t + hop, "deliver", msg)

    def _net_request(self, msg, hop):
        """The honest network on one request: jitter, sometimes a spike, sometimes a delay
        beyond the sender's timeout up to the signature window (SPEC §4.3: ±60 s), and
        sometimes a replayed copy within that window.  Returns (delay, replay delay or
        None)."""
        net, rng = self.net, self._stream(msg.src, msg.dst, "net/" + msg.kind)
        window = hoster_ha.SIGNATURE_WINDOW
        hop += rng.expovariate(1 / net["jitter"]) if net.get("jitter") else 0.0
        if rng.random() < net.get("spike", 0):
            hop += rng.uniform(0.2, 2.0)
        if rng.random() < net.get("late", 0):
            hop = max(hop, rng.uniform(msg.timeout_at - self.t, window - 1))
        dup = None
        if rng.random() < net.get("dup", 0):
            dup = rng.uniform(0, window - 1)
        return min(hop, window - 0.5), dup

    def _serve(self, d, msg, dnow, snap=None):
        """The destination's HTTP handler: (status, answer).  snap: the host inventory a
        slow GET vms took when it began (Agent.vms reads core.starting() after it)."""
        core, body, name = d.core, msg.body, msg.kind
        if name == "register":
            status, answer = core.handle_register(body, dnow)
            m = core.members.get(msg.src)
            if status == 200 and m is not None and m.last_ping == dnow:
                self.heard[msg.src] = self.t    # (a known incarnation's register is not)
            return status, answer
        if name == "ping":
            status, answer = core.handle_ping(body, dnow)
            if status == 200:
                self.heard[msg.src] = self.t
                if d.vote_inc == d.incarnation and \
                        d.vote_holder == (body["hostname"], body["startup_time"]):
                    d.vote_renewed = dnow   # a ping from the holder's incarnation was accepted
            return status, answer
        # The failover requests of a manager (SPEC §3.4)
        if name == "members" and hasattr(core, "members_answer"):
            if not d.cfg.is_candidate:
                return 404, {"error": "this node is not a candidate"}
            return 200, core.members_answer(dnow)
        if name == "plan" and hasattr(core, "handle_plan"):
            return core.handle_plan(body, dnow)
        if name == "vms":
            return 200, self._inventory(d, seen=snap)
        if name == "failover" and hasattr(core, "handle_failover"):
            return self._failover(d, msg, dnow)
        if name == "status":
            return 200, core.status(dnow)
        if name == "leave":
            return core.handle_leave(body, dnow)
        if name == "fenced" and hasattr(core, "handle_fenced"):
            return core.handle_fenced(body, dnow)
        return 404, {"error": f"unknown path {name}"}

    # -- the host side of failover (SPEC §3.4, §4.3) -------------------------------

    def _inventory(self, d, seen=None):
        """GET vms, built from the host's copies like Agent.vms builds it.  seen: the
        copies' live state as a slow inventory saw them when it began."""
        if not d.vms:
            return {"host": {"hostname": d.name, "free_memory": 8 << 30, "running_vms": 0},
                    "vms": [], "errors": []}
        starting = d.core.starting()
        out = []
        for name in sorted(d.vms):
            v = d.vms[name]
            live = v["live"] if seen is None else any(
                x["vm_name"] == name and x["live"] for x in seen)
            state = "starting" if name in starting else "live" if live else "stopped"
            snap = None if v["snap"] is None else {
                "name": f"zroot/vm-encrypted/{name}@snap-{v['snap']}",
                "creation": v["snap"], "guid": f"{v['snap']:x}{len(name):02x}"}
            out.append({"vm_name": name, "production": v["production"],
                        "live": state != "stopped", "state": state,
                        "parent_host": v["parent"],
                        "current_host": d.name if state != "stopped" else None,
                        "latest_snapshot": snap, "memory": v["memory"]})
        return {"host": {"hostname": d.name, "free_memory": d.free_memory(),
                         "running_vms": d.running_vms()},
                "vms": out, "errors": []}

    def _failover(self, d, msg, dnow):
        """POST failover: the core decides; an accepted start runs on the host.  A batch
        (`entries`, AgentAPI.failovers): each entry as if it had come alone, answered
        together once every one has ended."""
        if "entries" in msg.body:
            part = Batch(msg, len(msg.body["entries"]))
            for e in msg.body["entries"]:
                status, answer = self._failover(d, BatchEntry(part, e), dnow)
                if status != "defer":
                    part.done(self, d, e["uid"], status, answer)
            return "defer", None
        body = msg.body
        v = d.vms.get(body["vm_name"])
        status, answer = d.core.handle_failover(body, dnow, None if v is None else
                                                {"live": v["live"], "parent_host": v["parent"]})
        if status != "start":
            return status, answer
        name, uid = body["vm_name"], body["uid"]
        self.starts.append((self.t, d.name, name, uid, body["from_host"]))
        if d.cfg.backup_node:
            self.violation(f"VM {name} was sent to the backup node {d.name} (uid {uid})")
        if v["snap"] is None:
            self.violation(f"VM {name} was sent to {d.name}, which holds no snapshot of it")
        v["parent"] = d.name    # change-parent, before `hoster vm start`
        lo, hi = self.start_delay
        delay = self._stream(d.name, d.name, "vmstart").uniform(lo, hi)
        self.emit(f"{d.name}/host", "INFO", f"starting VM {name} (parent_host = {d.name}, "
                                            f"live in {delay:.1f} s)")
        self.at(self.t + delay / d.rate, "vm_start", d.name, d.host_epoch, d.incarnation,
                msg, uid, name, answer["restore_parent"])
        return "defer", None

    def _ev_vm_start(self, name, epoch, incarnation, msg, uid, vm, restore=None):
        d = self.nodes[name]
        if d.host_epoch != epoch:
            return          # fenced or powered off meanwhile: the start never finished
        if d.state == PAUSED:
            self.at(self.t + 0.5, "vm_start", name, epoch, incarnation, msg, uid, vm, restore)
            return          # a hung host: the start finishes when it resumes
        ok = vm not in d.fail_next and vm not in d.late_next
        d.fail_next.discard(vm)
        late = d.late_next.pop(vm, None)
        if not ok:
            self.failed_starts.add(vm)
            error = f"vm start {vm} exited 1: simulated failure"
            # Agent.undo_start: the target stops what `hoster vm start` launched (Hoster's
            # supervisor, killed before it creates a late VM: the fake's documented
            # behaviour), sets the copy's parent_host back (restore_parent; None: locked)
            # and reports the failure only once the VM stayed absent for start_confirm
            d.vms[vm]["parent"] = restore if restore is not None else LOCK_PREFIX + "sim__"
            self.emit(f"{name}/host", "INFO", f"start of VM {vm} failed (parent_host = "
                      f"{d.vms[vm]['parent']})" + (f"; its supervisor, which would have "
                                                   f"created it {late:g} s later, is killed"
                                                   if late is not None else ""))
            self.at(self.t + (d.cfg.start_confirm + 1e-6) / d.rate, "vm_start_failed", name,
                    epoch, incarnation, msg, uid, vm, error, d.now(self.t))
            return
        self._set_live(d, vm, True)
        self.emit(f"{name}/host", "INFO", f"VM {vm} is live")
        if d.state != RUNNING or d.incarnation != incarnation:
            return          # the agent died meanwhile: nobody answers
        status, answer = d.core.finish_failover(uid, True, None, d.now(self.t))
        self._actions(d)
        self._reply(d, msg, status, answer)

    def _ev_vm_start_failed(self, name, epoch, incarnation, msg, uid, vm, error, absent_since):
        """A failed start's report, once the VM stayed absent (hoster_ha.absence_verdict)."""
        d = self.nodes[name]
        if d.host_epoch != epoch:
            return          # fenced or powered off meanwhile: nothing runs there
        if d.state == PAUSED:
            self.at(self.t + 0.5, "vm_start_failed", name, epoch, incarnation, msg, uid, vm,
                    error, absent_since)
            return
        now = d.now(self.t)
        verdict = hoster_ha.absence_verdict(now, None if d.vms[vm]["live"] else absent_since,
                                            d.cfg.start_confirm,
                                            absent_since + d.cfg.fence_timeout
                                            + d.cfg.start_confirm)
        if verdict != "confirmed":
            raise SimError(f"{name}: VM {vm} not confirmed absent after its failed start "
                           f"({verdict})")
        if d.state != RUNNING or d.incarnation != incarnation:
            return          # the agent died meanwhile: nobody answers
        status, answer = d.core.finish_failover(uid, False, error, now)
        self._actions(d)
        self._reply(d, msg, status, answer)

    def _ev_deliver(self, msg, replay=False):
        d = self.nodes[msg.dst]
        if d.state != RUNNING:
            return          # nobody answers: the sender's timeout fires
        if self.net:
            # verify_request: the timestamp within the window, the nonce not seen by
            # this process (its nonce cache lives in RAM: a restarted agent forgets)
            if self.t - msg.t_sent > hoster_ha.SIGNATURE_WINDOW or msg.nonce in d.nonces:
                return      # 401; nobody reads it (a replay) or the sender gets no answer
            d.nonces.add(msg.nonce)
            if replay:
                self.emit(f"{d.name}/net", "INFO", f"replayed {msg.kind} from {msg.src} "
                          f"(sent at {msg.t_sent:.1f}) served")
            slow = self._stream(msg.src, d.name, "slow").random() < self.net.get("slow", 0)
            if (msg.kind == "vms" or msg.kind == "failover" and
                    not (msg.body or {}).get("check")) and slow:
                delay = self._stream(msg.src, d.name, "slow").uniform(
                    0.5, self.net.get("slow_max", 40))
                snap = self._host_inventory(d) if msg.kind == "vms" else None
                self.emit(f"{d.name}/http", "INFO", f"slow handler: {msg.kind} from {msg.src} "
                          f"takes {delay:.1f} s")
                self.at(self.t + delay / d.rate, "serve", msg, d.incarnation, replay, snap)
                return
        self._deliver(d, msg, replay)

    def _ev_serve(self, msg, incarnation, replay, snap):
        """The end of a slow handler: the process that took the request answers it."""
        d = self.nodes[msg.dst]
        if d.incarnation != incarnation or not d.alive:
            return
        if d.state == PAUSED:
            self.at(self.t + 0.5, "serve", msg, incarnation, replay, snap)
            return
        self._deliver(d, msg, replay, snap)

    def _deliver(self, d, msg, replay=False, snap=None):
        status, answer = self._serve(d, msg, d.now(self.t), snap)
        self._actions(d)    # persist_term is written here, before the answer leaves
        if status == "defer":
            return          # a VM start: answered when it is live (_ev_vm_start), or never
        if msg.kind == "ping" and status == 200:
            for key in ("vote_term", "term_seen"):
                if answer.get(key, 0) > d.disk.get("term", 0):
                    self.violation(f"{d.name} answered {key} {answer[key]} but has "
                                   f"persisted only {d.disk.get('term', 0)}")
        self._check(d)
        if not replay:
            self._reply(d, msg, status, answer)

    def _reply(self, d, msg, status, answer):
        """The answer travels back; after the sender's timeout nobody reads it."""
        if isinstance(msg, BatchEntry):      # one entry of a batch: its answer waits for the rest
            msg.batch.done(self, d, msg.body["uid"], status, answer)
            return
        if self.wire:
            answer = json.loads(json.dumps(answer))
        hop = self._hop(d.name, msg.src, "answer/" + msg.kind)
        if hop is not None and self.net:
            rng = self._stream(d.name, msg.src, "net/answer/" + msg.kind)
            hop += rng.expovariate(1 / self.net["jitter"]) if self.net.get("jitter") else 0.0
            if rng.random() < self.net.get("spike", 0):
                hop += rng.uniform(0.2, 2.0)
        if hop is not None and self.t + hop < msg.timeout_at:
            self.at(self.t + hop, "answer", msg, status, answer)

    def _result(self, msg, status, answer):
        if msg.done:
            return
        msg.done = True
        msg.t_done = self.t
        n = self.nodes[msg.src]
        if msg.rid is not None:
            # the core's own requests belong to its process, not to an event epoch: an
            # answer that comes after a pause of the sender still reaches it
            if msg.proc != n.incarnation or not n.alive:
                return
            if n.state == PAUSED:
                n.stash.append((msg, status, answer))   # read when the process resumes
                return
        elif n.inc != msg.inc or n.state != RUNNING:
            return
        now = n.now(self.t)
        if msg.kind == "register":
            n.core.on_register_result(msg.dst, status, answer, now)
        elif msg.kind == "ping":
            n.core.on_ping_result(msg.dst, msg.sent_at, status, answer, now)
        elif msg.kind == "leave":
            self._leave_answer(n, msg, status)
        else:
            n.core.on_response(msg.rid, status, answer, now)
        self._actions(n)
        self._check(n)

    def _ev_answer(self, msg, status, answer):
        if not msg.done:
            msg.answered = True
        self._result(msg, status, answer)

    def _ev_timeout(self, msg):
        self._result(msg, None, None)

    def _ev_tick(self, name, inc):
        n = self.nodes[name]
        if n.inc != inc or n.state != RUNNING:
            return
        core = n.core
        now = n.now(self.t)
        core.tick(now, watchdog_armed=core.arming and n.wd_alive)
        if not core.armed:
            n.armed_since = None    # (maintenance, a leave: it disarmed)
        if n.wd_alive:
            n.hb_t, n.hb_armed = self.t, core.armed      # heartbeat to the watchdog
        self._actions(n)
        self._check(n)
        if n.state == RUNNING and core.was_manager:  # tick: can_act(now), so manager
            term = core.manager_term(now)
            if term < n.acting_term and not n.term_drop_seen:
                n.term_drop_seen = True     # once per incarnation
                text = (f"{name}: the term of the acting manager fell from {n.acting_term} to "
                        f"{term} (votes {core.valid_votes(now)}); its commands are now refused "
                        f"as stale where {n.acting_term} was seen")
                if self.term_drop == "violation":
                    self.violation(text)
                else:
                    self.term_drops.append(f"t={self.t:.3f}: {text}")
            n.acting_term = max(n.acting_term, term)
        if n.state == RUNNING:
            self.at(self.t + self.tick_interval / n.rate, "tick", name, inc)

    @staticmethod
    def _can_act(core, now):
        can_act = getattr(core, "can_act", None)
        return can_act(now) if can_act else True

    def _ev_audit(self):
        self._check()
        if self.vm_mode:
            self._check_recovery()
        self.at(self.t + self.audit, "audit")

    # -- the recovery invariant (SPEC §3.4) ------------------------------------------

    RECOVERY_SLACK = 7.0    # + the longest start (start_delay): 10 s with the default
    SLOW_ANSWER = 1.0       # an answer that took longer (a slow handler, a late request)
    #                         holds its job up until it comes: the bound counts it as stuck

    def bounds(self):
        """(FT, W, E) in real seconds, for the slowest clock of the cluster:
        FT the silence after which a member is failed (failover_time, §3.4), W the wait of
        a new manager before its first failover action (watchdog_timeout + fence_timeout +
        2 ping_interval, §3.2), E the election of a new manager once the old one is silent
        (survival_window, after which the voters prefer another candidate (their leases,
        vote_lease, ran out by then), + 2 ping_interval for the grant to reach the new
        manager and for its term to be acknowledged, + 2 ticks)."""
        tm = self.timings
        r = min(n.rate for n in self.nodes.values())
        ft = tm["failover_time"] / r
        w = (tm["watchdog_timeout"] + tm["fence_timeout"] + 2 * tm["ping_interval"]) / r
        e = (tm["survival_window"] + 2 * tm["ping_interval"]) / r + 2 * self.tick_interval
        return ft, w, e

    def _check_recovery(self):
        """Every production VM of a silent host is live again in bounded time (SPEC §3.4),
        and so is every VM of a rejoined node's fence record (§3.6).

        t_s(X) is the last time a candidate accepted a ping or register from node X; X is
        *silent* while no candidate has heard it for 2 ping_interval + ping_timeout, and
        *down* while it is silent or not running.

        Failure obligation: when H turns silent, its VMs are taken as the manager will see
        them (§3.4 step 2): production VMs of which another host holds a copy with
        parent_host = H.  It is asserted only if the candidates' records say H was armed
        (not in maintenance, not left) and H is not heard again; its VMs must then be live
        by D with  ready = t_s(H) + FT.
        Rejoin obligation: when a node armed with a fence record (it rejoined after a
        fence), the VMs of the record must be live by D with  ready = t_a + ping_interval
        (t_a: when it armed; its next ping tells the manager), unless it goes down again.

        Both are asserted only while the rest of the cluster is healthy from t_s(H) (t_a)
        on: at every audit, every node that is not down runs and is armed, every faulty link
        touches a down node, and every other node down meanwhile (the set O) fell silent
        armed (an unarmed silent member blocks every failover job by design, §3.4 step 1:
        it is never failed).  A VM is *placeable* if a non-backup host (other than H) holds
        a copy of it with a snapshot; a placeable VM must be live on some host by

            D = max(ready, t_s(X) + FT for X in O, t_m + W, T_stuck) + 10

        and an unplaceable one (or one whose start was made to fail, `failstart`) must be
        live somewhere or named by a vm_start_failed event by D.  FT, W, E: bounds().  t_m
        is when the manager acting at D took office (the same one since then); if it took
        office after t_s(H) (t_a), that must have been within E after the previous manager
        (a node of O, or H) fell silent.  T_stuck is the latest timeout of an inventory or
        failover request that manager sent (to a node of O or H, or before t_s(H) (t_a) on
        a faulty link) and never got answered: the job waits for it (INVENTORY_TIMEOUT,
        START_TIMEOUT + 10).  Reasons: H is failed when two candidates have seen it silent
        for failover_time; a job needs the inventory of every member that is not failed, so
        the members of O must be failed first; a new manager first waits W.  The 10 s (7 + the longest start, start_delay) cover one
        manager round (ping_interval), the age of the other candidate's view (ping_interval
        + latency), the tick, the inventory, plan and failover round trips, and the start.
        With SPEC's §2 rule and a stable manager, a failure gives D = t_s(H) +
        failover_time + 10.
        """
        t = self.t
        tm = self.timings
        quiet = (2 * tm["ping_interval"] + tm["ping_timeout"]) / \
            min(n.rate for n in self.nodes.values())
        silent = {x for x, ts in self.heard.items() if t - ts >= quiet}
        down = {x.name for x in self.nodes.values() if x.state != RUNNING} | silent
        # healthy: every node that is not down runs (armed or not: a restarted candidate,
        # a node in maintenance or one that left answers every request), every faulty
        # link touches a down node
        healthy = all(a in down or b in down for a, b in self.links)
        ft = self.bounds()[0]
        for h, ts in list(self.heard.items()):
            ob = self.obligations.get(h)
            if ob is not None and ob["t_s"] != ts:
                if not ob["done"]:
                    self._skip(ob, f"{h} was heard again at {ts:.1f}")
                del self.obligations[h]
                ob = None
            if h not in silent:
                continue
            if ob is None:
                ob = self.obligations[h] = self._obligation(h, ts, ft)
            self._advance(ob, healthy, down, silent)
        for ob in self.rejoins:
            n = self.nodes[ob["node"]]
            if not ob["done"] and (n.incarnation != ob["inc"] or n.name in down):
                self._skip(ob, f"{n.name} went down again")
            self._advance(ob, healthy, down, silent)

    def _skip(self, ob, why):
        ob["done"] = True
        self.skipped.append((ob["node"], ob["t_s"], why))

    def _advance(self, ob, healthy, down, silent):
        if ob["done"]:
            return
        if not healthy:
            return self._skip(ob, f"the rest of the cluster was not healthy at {self.t:.1f}")
        for x in down - {ob["node"]}:
            ob["others"].setdefault(x, self.heard.get(x, self.t))   # when it was last heard
        self._settle(ob, silent)

    def _placeable(self, name, gone, by):
        """Some host that is not down, and has been an eligible target since `by` (armed,
        not in maintenance, not left, not a backup node), holds a copy of VM `name` with a
        snapshot.  (A target that armed later may be found only by the manager's next
        try, up to RETRY_MAX later: the VM's vm_start_failed report is enough.)"""
        return any(name in x.vms and x.vms[name]["snap"] is not None and
                   not x.cfg.backup_node and x.state == RUNNING and
                   x.core.armed and x.armed_since is not None and x.armed_since <= by and
                   not x.core.maintenance and not x.core.left
                   for x in self.nodes.values() if x.name not in gone)

    def _obligation(self, h, ts, ft):
        records = [c.core.members.get(h) for c in self.nodes.values()
                   if c.cfg.is_candidate and c.state == RUNNING]
        records = [m for m in records if m is not None]
        why = None
        if not records:
            why = "no candidate has a record of it"
        elif sum(m.armed and not m.maintenance and not m.left for m in records) < 2:
            why = "fewer than 2 candidates record it armed, not in maintenance and not left"
        # H's VMs: the production VMs that last ran on H (where they actually ran, not
        # what copies' parent_host say), with the other hosts that hold a copy
        names = {}
        for name, where in sorted(self.ran_on.items()):
            if where == h:
                names[name] = [x.name for x in self.nodes.values()
                               if x.name != h and name in x.vms]
        ob = {"kind": "failure", "node": h, "t_s": ts, "ready": ts + ft, "armed": why is None,
              "left": sum(m.left for m in records) >= 2, "vms": names,
              "others": {}, "done": False}
        if why:
            self._skip(ob, why)
        elif not names:
            ob["done"] = True
        return ob

    def _detected(self, ob):
        """When 2 candidates' views can say H is silent for failover_time, armed, not left
        and not in maintenance: a candidate counts a member's silence from its own start
        at the earliest (members.json), so after candidate restarts this is the second
        earliest of max(t_s, its start) + FT over the candidates that run now and whose
        record of H says so (a refused maintenance or leave leaves a stale flag on one
        candidate: that view does not count, and does not veto either) (the failure
        obligation's `ready`)."""
        h, ft = ob["node"], self.bounds()[0]

        def ok(m):      # the view that may fail H (README, Safety rules): a stale flag
            return m is not None and m.armed and not m.left and not m.maintenance
        starts = sorted(max(ob["t_s"], c.started_t) + ft for c in self.nodes.values()
                        if c.cfg.is_candidate and c.state == RUNNING and c.name != h
                        and ok(c.core.members.get(h)))
        return starts[1] if len(starts) >= 2 else math.inf

    def _on_rejoin(self, n):
        """n armed with a fence record (§3.6): its VMs get a rejoin obligation, except
        those that ran on another host since (a failover moved them: they are that host's,
        and its own obligation covers them, or exempts them if it left: seed 44801, w1b
        moved to node1, which left and then lost power)."""
        ob = {"kind": "rejoin", "node": n.name, "t_s": self.t, "inc": n.incarnation,
              "ready": self.t + self.timings["ping_interval"] / n.rate, "armed": True,
              "vms": {name: [n.name] for name in n.core.fenced_vms
                      if self.ran_on.get(name, n.name) == n.name},
              "others": {}, "done": False}
        self.rejoins.append(ob)

    def _settle(self, ob, silent):
        _, w, e = self.bounds()
        h, ts = ob["node"], ob["t_s"]
        failure = ob["kind"] == "failure"
        ready, fell = [self._detected(ob) if failure else ob["ready"]], [ts] if failure else []
        gone = {h} if failure else set()    # down now: their copies are out of reach
        for x, last in sorted(ob["others"].items()):
            fell.append(self.heard.get(x, last))
            xo = self.obligations.get(x)
            if xo is None:
                xn = self.nodes[x]
                if x in silent or xn.state != RUNNING:
                    return      # down, not silent yet: decide once it is
                if not xn.core.armed or xn.armed_since is None:
                    return      # back, not armed yet: decide once it is
                # back and armed: a job that lacked its copies (it was down, or failed)
                # runs again (the settled failover re-runs, a source without a target is
                # retried with a delay up to RETRY_MAX): its VMs count from then (seed
                # 10093: w1a's only replica was on worker2, fenced, back 2 s before the
                # deadline, unarmed)
                if xn.armed_since > ts:
                    ready.append(xn.armed_since + hoster_ha.RETRY_MAX)
                continue
            if xo["left"]:
                gone.add(x)     # a left member is not asked for its inventory
                continue
            if not xo["armed"]:
                return self._skip(ob, f"{x} fell silent unarmed (its inventory blocks every "
                                      f"failover job)")
            ready.append(self._detected(xo))
            gone.add(x)
        # a candidate that stopped or restarted meanwhile (a rolling restart, a fast
        # restart, a leave) may have been the manager: the next election counts from then
        fell += [x.stopped_t for x in self.nodes.values() if x.cfg.is_candidate and
                 x.stopped_t is not None and x.stopped_t >= ts - e]
        # ... and so may a running manager that lost its majority (votes lapse when 2 or
        # 3 ping answers in a row are late or lost: the honest network's spikes)
        fell += [x for x in self.office_lost if x >= ts - e]
        # ... and so may a candidate that started (there may have been no manager before)
        fell += [x.started_t for x in self.nodes.values() if x.cfg.is_candidate and
                 x.started_t is not None and x.started_t >= ts - e]
        slack = self.RECOVERY_SLACK + self.start_delay[1]
        mgrs = [x for x in self.nodes.values() if x.manager_t is not None and x.alive]
        what = f"{h} silent since {ts:.1f}" if failure else f"{h} rejoined at {ts:.1f}"
        if len(mgrs) != 1:
            if any(x.cfg.is_candidate and x.alive and not x.core.term_known
                   for x in self.nodes.values()):
                # a candidate that lost its term file votes only once it has heard both
                # others (README, A lost term file): with one of them down there is no
                # majority by design (seed 16066: the manager killed meanwhile)
                return self._skip(ob, "a candidate with a lost term file cannot vote yet")
            if self.t > max(ready + [max(fell, default=ts) + e + w]) + slack:
                ob["done"] = True
                self.violation(f"{what}: no manager in office at {self.t:.1f} although the "
                               f"rest of the cluster is healthy")
            return
        m = mgrs[0]
        tm = m.manager_t
        if tm > ts and (not fell or tm > max(fell) + e):
            ob["done"] = True
            return self.violation(
                f"{what}: the manager {m.name} took office at {tm:.1f}, "
                + (f"more than {e:.1f} s after the last down node fell silent at "
                   f"{max(fell):.1f}" if fell else "although no node went down"))
        # a job waits for its requests: until they time out, or are answered (a slow
        # handler may take its time within the timeout)
        stuck = [msg.timeout_at if not msg.answered else msg.t_done for msg in self.requests
                 if msg.src == m.name and msg.proc == m.incarnation and msg.timeout_at >= ts and
                 (not msg.answered or msg.t_done - msg.t_sent > self.SLOW_ANSWER)]
        deadline = max(ready + [tm + w] + stuck) + slack
        if self.t < deadline:
            return
        ob["done"] = True
        for vm, holders in sorted(ob["vms"].items()):
            if failure and not set(holders) - gone:
                continue    # every copy that names H is out of reach: the manager cannot know
            placeable = self._placeable(vm, gone, deadline - hoster_ha.RETRY_MAX - slack)
            live = self.live_since.get(vm)
            if live is not None and (live[0] != h or not failure) and live[1] <= deadline:
                self.recoveries.append((h, vm, ts, deadline,
                                        f"live on {live[0]} at {live[1]:.1f}", tm))
                continue
            # it was live again in time, and lost since to another failure (that one has
            # its own obligation)
            again = [(x, t0) for x, t0 in self.went_live.get(vm, ())
                     if ts <= t0 <= deadline and (x != h or not failure)]
            if again:
                how = f"live on {again[0][0]} at {again[0][1]:.1f}, lost since"
                self.recoveries.append((h, vm, ts, deadline, how, tm))
                continue
            if not placeable or vm in self.failed_starts:
                # told since H went down: a confirmed fence may fail H over before the
                # silence this obligation counts from (a late ping reset it: sim-soak
                # failover 8821, 10928)
                down = self.nodes[h].stopped_t if h in self.nodes else None
                lo = down if down is not None and down <= ts else ts
                told = [x for x in self.vm_events if x[2] == "vm_start_failed" and x[3] == vm
                        and lo <= x[0] <= deadline]
                if told:
                    self.recoveries.append((h, vm, ts, deadline, "vm_start_failed", tm))
                    continue
            where = f"live on {live[0]} since {live[1]:.1f}" if live else "live nowhere"
            others = ", ".join(f"{x} since {self.obligations[x]['t_s']:.1f}"
                               for x in sorted(ob["others"]) if x in self.obligations)
            self.violation(
                f"VM {vm} of {what} is {where} at the deadline {deadline:.1f} = "
                f"max(ready {max(ready):.1f}, t_m {tm:.1f} + W {w:.1f}"
                + (f", down meanwhile: {others}" if others else "")
                + (f", stuck requests until {max(stuck):.1f}" if stuck else "")
                + f") + {slack:g}; manager {m.name}"
                + ("" if placeable else "; no eligible replica, and no vm_start_failed "
                   "event names it"))

    def _ev_watchdog(self, name, inc, pause_id):
        n = self.nodes[name]
        if n.inc != inc or n.state != PAUSED or n.pause_id != pause_id or not n.wd_alive \
                or self._watchdog_verdict(n, alive=True) is None:
            return
        self.emit(f"{name}/watchdog", "EMERG",
                  f"no heartbeat for {n.cfg.watchdog_timeout:g} s while armed: "
                  f"SIGKILL agent, fencing")
        self._fence(n, f"{name}/watchdog", "watchdog_fence")

    def _actions(self, n):
        now = n.now(self.t)
        for a in n.core.take_actions():
            kind = a["kind"]
            if kind == "event":
                self._on_event(n, a, now)
            elif kind == "persist":
                n.disk[a["file"]] = json.loads(json.dumps(a["data"]))
            elif kind == "persist_term":
                if a["term"] <= n.disk.get("term", -1):
                    self.violation(f"{n.name} persisted term {a['term']} after "
                                   f"{n.disk.get('term', 0)}")
                n.disk["term"] = a["term"]
            elif kind == "fence":
                self._fence(n, n.who, a["reason"], agent=True)
            elif kind == "send":
                if n.state == RUNNING:
                    self._send_action(n, a, now)
            elif kind == "demote":
                if n.state == RUNNING:
                    self._demote(n, a["vms"], a.get("keep_live", False))
            elif kind == "restore":
                if n.state == RUNNING:
                    self._restore(n, a["vms"])
            elif kind == "fence_member":
                if n.state == RUNNING:      # the BMC answers after a while
                    delay = hoster_ha.EXTERNAL_FENCE_TIMEOUT if \
                        self.nodes[a["member"]].bmc == "hang" else \
                        self._stream(n.name, a["member"], "bmc").uniform(0.5, 8)
                    self.emit(f"{n.name}/host", "INFO", f"running {' '.join(a['argv'])}")
                    self.at(self.t + delay / n.rate, "bmc", n.name, n.incarnation, a)
            elif kind == "clear_fence_record":
                n.fence_record, n.fence_locked = None, []   # the candidates have it
            elif kind == "restart_watchdog":
                if n.wd_restart_at is None and not n.wd_alive:
                    n.wd_restart_at = self.t + 0.5
                    self.at(n.wd_restart_at, "watchdog_up", n.name, n.incarnation)
            elif kind == "record_running":
                pass    # the running record is exact at a power loss (_cmd_crash)
            elif (n.name, kind) not in self.unhandled:
                self.unhandled.add((n.name, kind))
                self.emit("sim", "WARNING", f"{n.name}: the simulator does not handle "
                          f"actions of kind {kind!r}; ignored")

    def _demote(self, n, vms, keep_live=False):
        """SPEC §3.6: hoster_ha.demotion_steps on n's copies of VMs moved away while it was
        gone (keep_live, once armed: a live copy is left alone and reported)."""
        local = {v["vm_name"]: v for v in self._host_inventory(n)}
        done = {}
        for name, parent, step in hoster_ha.demotion_steps(local, vms, keep_live):
            done[name] = parent
            if step == "keep":
                self.emit(f"{n.name}/host", "WARNING", f"VM {name} is live here; not demoted "
                                                       f"to {parent}")
            elif step in ("demote", "destroy"):
                self._set_live(n, name, False)
                n.vms[name]["parent"] = parent
                self.emit(f"{n.name}/host", "INFO", f"demoted VM {name}: parent_host = {parent}"
                                                    + (" (it was live: destroyed)"
                                                       if step == "destroy" else ""))
        n.core.demote_done(done)

    def _restore(self, n, vms):
        """Issue 11 item 2.2: hoster_ha.restore_steps on n's copies its fence locked while
        they were stopped, that the cluster keeps on n."""
        local = {v["vm_name"]: v for v in self._host_inventory(n)}
        for name, step in hoster_ha.restore_steps(local, vms, n.name):
            if step == "restore":
                n.vms[name]["parent"] = n.name
                self.emit(f"{n.name}/host", "INFO", f"unlocked VM {name}: parent_host = "
                                                    f"{n.name}")
            elif step == "skip":
                self.emit(f"{n.name}/host", "WARNING", f"VM {name} runs or names another "
                                                       "host: not unlocked")
        n.core.restore_done(vms)

    def _on_event(self, n, a, now):
        ev, d = a["event"], a["details"]
        self.emit(n.who, a["level"], a["msg"])
        if isinstance(d.get("vm_name"), str):
            self.vm_events.append((self.t, n.name, ev, d["vm_name"]))
        if ev == "armed":
            n.armed_logged = True
            n.armed_since = self.t
            if self.vm_mode and n.core.fenced_vms:
                self._on_rejoin(n)
        elif ev == "vote":
            self._check_vote(n, d, now)
        elif ev == "manager_elected":
            self._check_term(n, d["term"])
            n.manager_t = self.t
        elif ev == "manager_lost":
            n.manager_t = None
            self.office_lost.append(self.t)

    def _check_vote(self, n, d, now):
        lease = n.cfg.vote_lease
        if now - n.start_local < lease - EPS:
            self.violation(f"{n.name} voted {now - n.start_local:.3f} s after its start "
                           f"(< vote_lease {lease:g})")
        prev = n.vote_holder
        if prev is not None and prev[0] != n.name and n.vote_renewed is not None \
                and now - n.vote_renewed < lease - EPS:
            self.violation(f"{n.name} moved its vote from {prev[0]} to {d['holder']} "
                           f"{now - n.vote_renewed:.3f} s after its last renewal "
                           f"(< vote_lease {lease:g})")
        if d["term"] <= n.max_granted:
            self.violation(f"{n.name} granted term {d['term']} after having granted "
                           f"{n.max_granted}")
        if d["term"] > n.disk.get("term", 0):
            self.violation(f"{n.name} granted term {d['term']} before persisting it")
        n.max_granted = d["term"]
        n.vote_holder = (d["holder"], d["holder_startup"])
        n.vote_renewed = now
        n.vote_inc = n.incarnation

    def _check_term(self, n, term):
        """Terms of successive managers strictly increase (SPEC §3.2), across restarts too."""
        me = (n.name, n.startup_time)
        for t0, name, startup, earlier in self.elections:
            if (name, startup) != me and term <= earlier:
                self.violation(f"{n.name} became manager with term {term}, but {name} was "
                               f"manager with term {earlier} at t={t0:.1f}")
                break
            if (name, startup) == me and term < earlier:
                text = f"{n.name} became manager again with term {term} < {earlier}"
                if self.term_drop == "violation":
                    self.violation(text)
                else:
                    self.term_drops.append(f"t={self.t:.3f}: {text}")
                break
        self.elections.append((self.t, n.name, n.startup_time, term))

    def managers(self):
        return [n.name for n in self.nodes.values()
                if n.alive and n.core.is_manager(n.now(self.t))]

    def _check(self, touched=None):
        """At most one manager.  After a step that touched one node only that node can have
        become manager (between its own steps a node's votes only expire), so the others are
        examined only when it is manager.  A full check also runs every `audit` seconds,
        in case a core ever lets a vote become valid by the mere passing of time."""
        maybe = self.maybe_managers
        if touched is None:
            m = self.managers()
            maybe.clear()
            maybe.update(m)
        else:
            if not (touched.cfg.is_candidate and touched.alive and
                    touched.core.is_manager(touched.now(self.t))):
                maybe.discard(touched.name)
                return
            # another node is manager now only if it was at its own last step: between its
            # steps its votes only expire
            m = [touched.name] + [x for x in sorted(maybe - {touched.name})
                                  if self.nodes[x].alive and
                                  self.nodes[x].core.is_manager(self.nodes[x].now(self.t))]
            maybe.clear()
            maybe.update(m)
            m = [x for x in self.nodes if x in maybe]
        if len(m) > 1:
            views = "; ".join(f"{x}: votes {self.nodes[x].core.valid_votes(self.nodes[x].now(self.t))}"
                              for x in m)
            self.violation(f"{len(m)} managers at once: {', '.join(m)} ({views})")

    # -- commands -----------------------------------------------------------------

    def _ev_cmd(self, text):
        self.emit("sim", "cmd", text)
        if "@manager" in text:     # the node acting as manager now, if any
            m = [x.name for x in self.nodes.values()
                 if x.state == RUNNING and x.core.can_act(x.now(self.t))]
            if len(m) != 1:
                self.emit("sim", "INFO", "no acting manager: command skipped")
                return
            self.emit("sim", "INFO", f"@manager is {m[0]}")
            text = text.replace("@manager", m[0])
            self.last_manager = m[0]
        if "@last" in text:        # the node @manager named last time
            if self.last_manager is None:
                self.emit("sim", "INFO", "@manager was never resolved: command skipped")
                return
            text = text.replace("@last", self.last_manager)
        w = text.split()
        handler = getattr(self, "_cmd_" + w[0], None) if w else None
        if handler is None:
            raise ValueError(f"bad command {text!r}: unknown command")
        try:
            inspect.signature(handler).bind(*w[1:])
        except TypeError as e:
            raise ValueError(f"bad command {text!r}: {e}") from None
        handler(*w[1:])

    def _node(self, name):
        if name not in self.nodes:
            raise ValueError(f"unknown node {name!r}")
        return self.nodes[name]

    def _cmd_start(self, name):
        self._start(self._node(name))

    def _cmd_kill(self, name):
        """The agent dies.  With VMs, the watchdog of an armed node fences it
        watchdog_timeout after the last heartbeat; an unarmed node's VMs keep running."""
        n = self._node(name)
        if n.alive:
            self._stop(n, DOWN)
            if self.vm_mode and n.hb_armed and n.hb_t is not None:
                self.at(max(self.t, n.hb_t + n.cfg.watchdog_timeout / n.rate),
                        "watchdog_kill", name, n.inc)

    def _ev_watchdog_kill(self, name, inc):
        n = self.nodes[name]
        if n.inc != inc or n.state != DOWN or not n.wd_alive or \
                self._watchdog_verdict(n, alive=False) is None:
            return
        self.emit(f"{name}/watchdog", "EMERG",
                  f"no heartbeat for {n.cfg.watchdog_timeout:g} s while armed (agent gone): "
                  f"fencing")
        self._fence(n, f"{name}/watchdog", "watchdog_fence")

    def _cmd_crash(self, name):
        """Power loss: the node is down and its VMs are gone at once.  No fence record,
        but the agent's running record (state_dir/running.json, Core.running_record: the
        production VMs it ran as their parent while armed) survives and is sent like one
        when it starts again.
        (The agent rewrites it from every inventory, every 10 s, and at once when a
        failover starts a VM there; here it is exact.)"""
        n = self._node(name)
        record = n.core.running_record(self._host_inventory(n)) \
            if n.alive and n.core is not None else None
        if record is not None and record[0] == "write" and record[1]:
            n.fence_record = sorted(set(n.fence_record or []) | set(record[1]))
        if n.alive:
            self._stop(n, DOWN)
        n.hb_armed = False      # the watchdog is gone with the power; the next boot's is new
        n.host_epoch += 1
        n.fence_pending = None
        n.fence_confirm = None  # the power went before the fence could be confirmed
        gone = sorted(x for x, v in n.vms.items() if v["live"])
        for x in gone:
            self._set_live(n, x, False)
        if gone:
            self.emit(f"{name}/host", "INFO", f"power lost: VMs gone: {', '.join(gone)}")

    @staticmethod
    def _options(words, allowed):
        opts = {}
        for w in words:
            k, sep, v = w.partition("=")
            if not sep or k not in allowed:
                raise ValueError(f"unknown option {w!r} (allowed: {', '.join(allowed)})")
            opts[k] = v
        return opts

    def _cmd_vm(self, node, name, *words):
        n = self._node(node)
        if not hoster_ha.valid_vm_name(name):
            raise ValueError(f"bad VM name {name!r}")
        o = self._options(words, ("parent", "production", "snapshot", "live", "memory"))
        snap = o.get("snapshot", "none")
        v = {"production": o.get("production", "1") == "1", "parent": o.get("parent", node),
             "snap": None if snap == "none" else int(snap), "live": False,
             "memory": int(float(o.get("memory", 1)) * GIB)}
        self.vm_mode = True
        n.vms[name] = v
        if o.get("live", "0") == "1":
            self._set_live(n, name, True)

    def _cmd_host(self, node, *words):
        n = self._node(node)
        o = self._options(words, ("free", "backup", "confirm", "bmc"))
        if "confirm" in o:      # confirm=0: its fence confirmations never leave the host
            n.confirms = o["confirm"] == "1"
        if "free" in o:
            n.mem = int(float(o["free"]) * GIB)
        if "backup" in o:
            if n.incarnation:
                raise ValueError(f"host {node} backup=...: only before {node} first starts")
            n.extra["backup_node"] = o["backup"] == "1"
            n.cfg = node_config(node, list(self.nodes).index(node), self.timings, n.extra)
        if "bmc" in o:          # an external fence (issue 13 item 5): off, fail or hang
            if o["bmc"] not in ("off", "fail", "hang"):
                raise ValueError(f"host {node} bmc={o['bmc']}: expected off, fail or hang")
            n.bmc = o["bmc"]
            for c in CANDIDATES:    # the candidates' configs name its fence command
                cn = self._node(c)
                if cn.incarnation:
                    raise ValueError(f"host {node} bmc=...: only before {c} first starts")
                cn.extra.setdefault("fence_commands", {})[node] = [BMC, node]
                cn.cfg = node_config(c, list(self.nodes).index(c), self.timings, cn.extra)

    def _cmd_failstart(self, node, name):
        self._node(node).fail_next.add(name)

    def _cmd_leave(self, name):
        """`hoster_ha.py stop` (SPEC §3.7): POST leave (core.leave_body) to the 3 candidates,
        each with the agent's timeout; with 2 acknowledgements (core.leave_result) the
        agent stands its watchdog down and exits, its VMs running on, unprotected; with
        fewer it refuses and runs on."""
        n = self._node(name)
        if n.state != RUNNING:
            return
        body = n.core.leave_body()
        timeout = max(2.0, 2 * n.cfg.ping_timeout)
        self.leaves[(name, n.inc)] = {"acks": [], "open": len(CANDIDATES)}
        for c in CANDIDATES:
            self._transmit(Msg(name, n.inc, c, "leave", body, n.now(self.t),
                               self.t + timeout / n.rate))

    def _leave_answer(self, n, msg, status):
        op = self.leaves.get((n.name, msg.inc))
        if op is None:
            return
        op["open"] -= 1
        if status == 200:
            op["acks"].append(msg.dst)
        if op["open"]:
            return
        del self.leaves[(n.name, msg.inc)]
        acks = sorted(op["acks"])
        if n.core.leave_result(acks):
            self.emit(n.who, "NOTICE", f"left the cluster (acknowledged by {', '.join(acks)}); "
                                       "watchdog stood down, agent stopped")
            n.hb_armed = False
            self._stop(n, DOWN)
        else:
            self.emit(n.who, "ERROR", f"refusing to stop: leave acknowledged by {len(acks)} of "
                                      "3 candidates; 2 are needed")

    def _cmd_maintenance(self, name, state):
        """`hoster_ha.py maintenance on|off` (SPEC §3.7) through core.set_maintenance: `on`
        is given up (set_maintenance(False)) if 2 candidates have not acknowledged it
        within the agent's deadline; either way state_dir/maintenance follows."""
        n = self._node(name)
        if state not in ("on", "off"):
            raise ValueError(f"maintenance {name} {state!r}: on or off")
        if n.state != RUNNING:
            return
        n.core.set_maintenance(state == "on", n.now(self.t))
        self._actions(n)
        if state == "off":
            n.disk.pop("maintenance", None)
            return
        c = n.cfg
        self.at(self.t + (3 * c.ping_interval + c.ping_timeout + 1) / n.rate,
                "maintenance_deadline", name, n.incarnation)

    def _ev_maintenance_deadline(self, name, incarnation):
        n = self.nodes[name]
        if n.incarnation != incarnation or n.state != RUNNING:
            return
        if n.core.maintenance:
            n.disk["maintenance"] = 1
            return
        n.core.set_maintenance(False, n.now(self.t))
        self._actions(n)
        self.emit(n.who, "ERROR", "maintenance not acknowledged by 2 candidates in time; "
                                  "still armed")

    def _cmd_losetermfile(self, name):
        """state_dir/term is lost (disk replaced, fsync lost); the rest of state_dir stays.
        A running agent still knows its term: the loss shows when it next starts."""
        n = self._node(name)
        n.term_lost = True
        if not n.alive:
            self._lose_term(n)

    @staticmethod
    def _lose_term(n):
        n.term_lost = False
        n.max_granted = 0   # its grants can only rise above what it learns back (README)
        n.disk.pop("term", None)
        n.disk.setdefault("lost", 1)     # the state_dir is not a new one

    def _cmd_fastrestart(self, name, delay="1"):
        """The agent is killed (kill -9, a crash) and started again `delay` seconds later,
        under the real watchdog's rules (README, Watchdog pair): an armed node's watchdog
        sees the PID gone within its 1/4 s check and fences (a successor is never adopted
        while armed: the host reboots, and its agent starts at boot: a later `start`); an
        unarmed node's new agent simply runs (with a new startup_time)."""
        n = self._node(name)
        if not n.alive:
            return
        fences = n.wd_alive and self._watchdog_verdict(n, alive=False) is not None
        self._stop(n, DOWN)
        if fences:
            self.at(self.t + 0.25, "fastfence", name, n.inc)
        else:
            self.at(self.t + float(delay), "faststart", name, n.inc)

    def _watchdog_verdict(self, n, alive):
        """hoster_ha.watchdog_verdict, the rule ha_watchdog.py applies, on what n's watchdog
        knows now: its last heartbeat (armed or not, when) and whether the agent runs."""
        since = (self.t - n.hb_t) * n.rate + EPS if n.hb_t is not None else math.inf
        return hoster_ha.watchdog_verdict(n.hb_armed, alive, since, n.cfg.watchdog_timeout,
                                          pid=n.name)

    def _ev_fastfence(self, name, inc):
        n = self.nodes[name]
        if n.inc != inc or n.state != DOWN:
            return
        self.emit(f"{name}/watchdog", "EMERG", "the armed agent's PID is gone: fencing "
                                               "(its successor is not adopted)")
        self._fence(n, f"{name}/watchdog", "watchdog_fence")

    def _ev_faststart(self, name, inc):
        n = self.nodes[name]
        if n.inc == inc and n.state == DOWN:
            self._start(n)

    def _cmd_killwatchdog(self, name):
        """The ha_watchdog companion dies.  The agent sees it gone (Core.check_watchdog, every
        ping_interval): after 3 checks an armed node fences, an unarmed one starts a new
        watchdog (restart_watchdog).  A dead watchdog fences nothing and acknowledges
        nothing."""
        n = self._node(name)
        if n.state != RUNNING:
            # the agent is gone (its watchdog saw the PID gone within 1/4 s and is
            # fencing an armed node already) or the whole host is hung (so is the watchdog)
            self.emit(f"{name}/watchdog", "INFO", f"the agent is {n.state}: the watchdog's "
                                                  "fate changes nothing now")
            return
        if n.wd_alive:
            n.wd_alive = False
            self.emit(f"{name}/watchdog", "INFO", "ha_watchdog died")

    def _ev_bmc(self, name, incarnation, a):
        """A member's fence command ends: `off` powers the member off (a power loss, then
        exit 0), `fail` exits 1, `hang` is killed at EXTERNAL_FENCE_TIMEOUT.  The manager
        that ran it hears the outcome if it still runs."""
        m = self.nodes[a["member"]]
        ok = m.bmc == "off"
        if ok:
            self.emit(f"{m.name}/bmc", "INFO", "powered off")
            self._cmd_crash(m.name)
        self._ev_bmc_done(name, incarnation, a, ok)

    def _ev_bmc_done(self, name, incarnation, a, ok):
        n = self.nodes[name]
        if n.incarnation != incarnation or not n.alive:
            return
        if n.state == PAUSED:       # its thread reports once the process runs again
            self.at(self.t + 0.5, "bmc_done", name, incarnation, a, ok)
            return
        n.core.fence_member_done(a["member"], a["startup_time"], ok,
                                 "exited 0" if ok else "exited 1", n.now(self.t))
        self._actions(n)

    def _ev_watchdog_up(self, name, incarnation):
        n = self.nodes[name]
        n.wd_restart_at = None
        if n.incarnation == incarnation and n.alive:
            n.wd_alive = True
            n.hb_t, n.hb_armed = self.t, False
            self.emit(f"{name}/watchdog", "INFO", "a new ha_watchdog runs")

    def _cmd_latestart(self, node, name, after="10"):
        """The next start of VM `name` on `node` fails (hoster vm start exits non-zero or
        the VM does not appear within start_timeout), but Hoster's supervisor would create
        the VM `after` seconds later: the target kills it before it reports the failure
        (Agent.undo_start), so the VM never comes up there."""
        self._node(node).late_next[name] = float(after)

    def _cmd_restart(self, name):
        n = self._node(name)
        if n.alive:
            self._stop(n, DOWN)
        self._start(n)

    def _cmd_pause(self, name):
        n = self._node(name)
        if n.state != RUNNING:
            return
        n.state = PAUSED
        n.stopped_t = self.t
        n.pause_id += 1
        if n.hb_t is not None:
            self.at(max(self.t, n.hb_t + n.cfg.watchdog_timeout / n.rate),
                    "watchdog", name, n.inc, n.pause_id)

    def _cmd_resume(self, name):
        n = self._node(name)
        if n.state != PAUSED:
            return
        n.state = RUNNING
        n.inc += 1          # pings and answers in flight during the pause are lost
        self.at(self.t, "round", name, n.inc)
        self.at(self.t, "tick", name, n.inc)
        # the core's own requests ("send" actions) did not vanish: their answers, or their
        # timeouts, reach the core when the process runs again
        stash, n.stash = n.stash, []
        for msg, status, answer in stash:
            self.at(self.t, "late", name, n.inc, msg, status, answer)

    def _ev_late(self, name, inc, msg, status, answer):
        n = self.nodes[name]
        if n.inc == inc and n.state == PAUSED:
            n.stash.append((msg, status, answer))   # paused again before it got to them
            return
        if n.inc != inc or n.state != RUNNING:
            return
        n.core.on_response(msg.rid, status, answer, n.now(self.t))
        self._actions(n)
        self._check(n)

    def _set_link(self, a, b, words):
        self._node(a), self._node(b)
        mode = words[0]
        if mode == "up":
            self.links.pop((a, b), None)
        elif mode == "down":
            self.links[(a, b)] = ("down",)
        elif mode == "lossy":
            self.links[(a, b)] = ("lossy", float(words[1]))
        elif mode == "delay":
            self.links[(a, b)] = ("delay", float(words[1]))
        else:
            raise ValueError(f"unknown link mode {mode!r}")

    def _cmd_link(self, spec, *words):
        if ">" in spec:
            a, b = spec.split(">")
            self._set_link(a, b, words)
        else:
            a, b = spec.split("-")
            self._set_link(a, b, words)
            self._set_link(b, a, words)

    def _cmd_isolate(self, name):
        for other in self.nodes:
            if other != name:
                self.links[(name, other)] = ("down",)
                self.links[(other, name)] = ("down",)

    def _cmd_heal(self):
        self.links.clear()

    def _cmd_expect(self, what, *args):
        got = self._expect(what, *args)
        if got is not None:
            text = f"expect {what} {' '.join(args)}".strip() + f": FAILED, {got}"
            self.failures.append(f"t={self.t:.1f}: {text}")
            self.emit("sim", "FAILED", text)

    def _expect(self, what, *args):
        """None if the expectation holds, else what was found instead."""
        if what in ("live", "starts", "event", "no_event"):
            return self._expect_vm(what, *args)
        m = self.managers()
        n = self._node(args[0]) if args else None
        if what == "parent":
            v = n.vms.get(args[1])
            got = None if v is None else v["parent"]
            want = args[2]
            ok = got is not None and (got.startswith(LOCK_PREFIX) if want == "locked"
                                      else got == want)
            return None if ok else f"parent_host of {args[1]} on {n.name} is {got}"
        if what == "manager":
            return None if m == [args[0]] else f"managers: {m}"
        if what == "no_manager":
            return None if not m else f"managers: {m}"
        if what == "one_manager":
            return None if len(m) == 1 else f"managers: {m}"
        if what == "agreed":
            views = {x.name: x.core.manager_view(x.now(self.t))[0]
                     for x in self.nodes.values() if x.state == RUNNING}
            ok = len(m) == 1 and all(v == m[0] for v in views.values())
            return None if ok else f"managers: {m}, views: {views}"
        if what == "fenced":
            return None if n.state == FENCED else f"{n.name} is {n.state}"
        if what == "not_fenced":
            return None if n.state != FENCED else f"{n.name} is fenced"
        if what == "running":
            return None if n.state == RUNNING else f"{n.name} is {n.state}"
        if what == "down":
            return None if n.state == DOWN else f"{n.name} is {n.state}"
        if what == "armed":
            return None if n.alive and n.core.armed else f"{n.name} is {n.state}, not armed"
        if what == "unarmed":
            return None if n.alive and not n.core.armed else f"{n.name} is {n.state}" + (
                ", armed" if n.alive else "")
        if what in ("quorum", "no_quorum"):
            if not n.alive:
                return f"{n.name} is {n.state}"
            r = n.core.reachable(n.now(self.t))
            return None if (len(r) >= 2) == (what == "quorum") else f"reachable: {r}"
        if what == "term":
            if not n.alive:
                return f"{n.name} is {n.state}"
            got = n.core.manager_view(n.now(self.t))
            return None if got[1] == int(args[1]) else f"{n.name} sees manager {got[0]}, term {got[1]}"
        if what == "vote":
            v = n.core.vote if n.alive else None
            holder = v.holder if v else None
            return None if holder == args[1] else f"{n.name} votes for {holder}"
        raise ValueError(f"unknown expectation {what!r}")

    def live_on(self, vm):
        return sorted(x.name for x in self.nodes.values()
                      if vm in x.vms and x.vms[vm]["live"])

    def _expect_vm(self, what, *args):
        if what == "live":
            vm, where = args
            got = self.live_on(vm)
            return None if got == ([] if where == "none" else [where]) else \
                f"{vm} is live on {got or 'no host'}"
        if what == "starts":
            vm, count = args
            got = [f"{h} at {t:.1f}" for t, h, v, _, _ in self.starts if v == vm]
            return None if len(got) == int(count) else f"{len(got)} starts: {got}"
        event, vm = args
        got = [f"{n} at {t:.1f}" for t, n, ev, v in self.vm_events if ev == event and v == vm]
        if what == "event":
            return None if got else f"no {event} event for {vm}"
        return None if not got else f"{event} for {vm} logged by {got}"


# =============================================================================
# Scenarios and random schedules
# =============================================================================

FAULT_END = 150.0
SETTLE = 60.0

# The honest fault model (issue 12) in both random generators: operators (stop/leave and
# maintenance, also the partial cases that reach one candidate), rolling restarts of the
# candidates, fast agent restarts under the watchdog's rules, a dying watchdog, term-file
# loss, starts that fail but come up late, clock rates up to RATE_RATIO apart, and a
# network with jitter, spikes, requests delayed beyond their timeout (up to the signature
# window), replays and slow handlers.  HONEST = False gives the older, kinder schedules.
HONEST = True
RATE_RATIO = 1.1    # README/SPEC: at most one manager while clocks run within 10 %


def honest_rates(rng, nodes):
    """Clock rates at most RATE_RATIO apart; often two candidates exactly at the limit."""
    lo = round(rng.uniform(0.95, 1.0), 4)
    hi = math.floor(lo * RATE_RATIO * 10000) / 10000
    rates = {n: round(rng.uniform(lo, hi), 4) for n in nodes}
    if rng.random() < 0.5:
        a, b = rng.sample(CANDIDATES, 2)
        rates[a], rates[b] = lo, hi
    return rates


def honest_net(rng):
    """The network of one run (Sim's `net`): some runs calm, some rough."""
    return {"jitter": rng.choice([0.002, 0.01, 0.05]), "spike": rng.choice([0, 0.005, 0.03]),
            "late": rng.choice([0, 0.002, 0.01]), "dup": rng.choice([0, 0.005, 0.02]),
            "slow": rng.choice([0, 0.05, 0.2]), "slow_max": 40.0}


def honest_op(rng, kind, t, a, nodes, add, lost=None):
    """Add one operator or host event of `kind` on node `a` at time t; returns the time it
    ends.  Candidates are node1-3; `a` may be any node.  `lost`: a set that remembers the
    one term-file loss of a run (README's rule covers one candidate's lost file: the other
    two hold every acting term)."""
    others = [c for c in CANDIDATES if c != a]
    if lost is not None and kind in ("losetermfile", "rolling"):
        if lost:
            kind = "leave" if kind == "losetermfile" else kind
        elif kind == "losetermfile":
            lost.add(a)
    if kind == "leave":                 # `hoster_ha.py stop`, started again later
        add(t, f"leave {a}")
        back = t + rng.uniform(3, 40)
        add(back, f"start {a}")
        return back
    if kind in ("leave1", "maint1"):    # the request reaches one candidate only
        cut = rng.sample(others, 2) if a in CANDIDATES else rng.sample(list(CANDIDATES), 2)
        arrow = rng.choice([">", "<"])  # the request lost, or its answer
        links = [f"{a}>{c}" if arrow == ">" else f"{c}>{a}" for c in cut]
        for link in links:
            add(t - 0.01, f"link {link} down")
        if kind == "leave1":
            add(t, f"leave {a}")
            up = t + 0.2
        else:
            add(t, f"maintenance {a} on")
            up = t + rng.uniform(7.5, 9.0)   # past the agent's deadline, within survival
        for link in links:
            add(up, f"link {link} up")
        return up
    if kind == "maint":
        add(t, f"maintenance {a} on")
        off = t + rng.uniform(5, 60)
        add(off, f"maintenance {a} off")
        return off
    if kind == "rolling":               # rolling restart (upgrade) of the candidates
        gap = rng.uniform(15, 40)
        order = list(CANDIDATES) if rng.random() < 0.5 else rng.sample(CANDIDATES, 3)
        for i, c in enumerate(order):
            tc = t + i * gap
            add(tc, f"leave {c}")
            if rng.random() < 0.15 and lost is not None and not lost:
                lost.add(c)
                add(tc + 0.5, f"losetermfile {c}")
            add(tc + rng.uniform(1, 6), f"start {c}")
        return t + 3 * gap
    if kind == "fastrestart":           # kill -9 and a new agent; an armed node fences
        add(t, f"fastrestart {a} {rng.choice([0.3, 1, 3])}")
        boot = t + rng.uniform(25, 90)
        add(boot, f"start {a}")
        return boot
    if kind == "killwatchdog":
        add(t, f"killwatchdog {a}")
        return t + 10
    if kind == "losetermfile":          # a candidate's term file is lost, then it restarts
        c = a if a in CANDIDATES else rng.choice(CANDIDATES)
        add(t, f"losetermfile {c}")
        add(t + rng.uniform(0, 20), f"fastrestart {c} 1")
        add(t + rng.uniform(40, 60), f"start {c}")
        return t + 60
    raise ValueError(kind)


def without_double_faults(cmds, timings=TIMINGS):
    """Drop a kill or pause of a node whose ha_watchdog died less than the watchdog-gone
    rule's time before (WATCHDOG_GONE_CHECKS checks, one per ping_interval, + 2 s): the
    agent and its watchdog dying together leaves nobody to fence the host without
    kernel_watchdog (README, Watchdog pair).  That double fault is outside the model;
    tests/test_sim_regressions.py shows what it does."""
    window = hoster_ha.WATCHDOG_GONE_CHECKS * timings["ping_interval"] + 2
    died = [(t, c.split()[1]) for t, c in cmds if c.startswith("killwatchdog ")]
    out = []
    for t, c in cmds:
        w = c.split()
        if w[0] in ("kill", "pause", "fastrestart") and \
                any(n == w[1] and 0 <= t - td <= window for td, n in died):
            continue
        out.append([t, c])
    return out


def honest_restarts(cmds):
    """`restart` (a new agent at once, never fenced) is kinder than the real watchdog,
    which fences an armed node whose agent's PID is gone: the honest schedules use
    `fastrestart` instead, and the host's agent starts again at boot, 30 s later."""
    out = []
    for t, c in cmds:
        w = c.split()
        if w[0] == "restart":
            out += [[t, f"fastrestart {w[1]} 0.3"], [round(t + 30, 3), f"start {w[1]}"]]
        else:
            out.append([t, c])
    return sorted(out, key=lambda x: x[0])


HONEST_OPS = ["leave", "leave1", "maint1", "maint", "rolling", "fastrestart", "killwatchdog",
              "losetermfile"]
# Starts that fail while Hoster's supervisor would still create the VM later
# (`latestart`): the target stops what it launched and confirms the VM stays absent for
# start_confirm before it reports the failure (issue 11 item 2.4, Agent.undo_start).
LATE_STARTS = True


def random_schedule(seed, fault_end=FAULT_END, settle=SETTLE, honest=None):
    """A random fault schedule: {"nodes", "rates", "offsets", "cmds"} (all derived from seed).

    Faults (kills, restarts, pauses, one-way and two-way link faults, lossy and
    delayed links, isolation) happen in [0, fault_end); then everything heals, every
    node is (re)started, and `settle` seconds after the last start exactly one manager
    must exist, and every running node must agree on it.
    """
    honest = HONEST if honest is None else honest
    rng = random.Random(f"hoster_ha-sim-{seed}")
    nodes = list(CANDIDATES) + (["worker1"] if rng.random() < 0.4 else [])
    rates = {n: round(rng.uniform(0.95, 1.05), 4) for n in nodes}
    offsets = {n: round(rng.uniform(0, 1000), 3) for n in nodes}
    cmds = []

    def add(t, c):
        if t < fault_end:
            cmds.append([round(t, 3), c])

    net = None
    if honest:      # a second stream: the kinder schedule's faults stay as they were
        hr = random.Random(f"hoster_ha-sim-honest-{seed}")
        rates = honest_rates(hr, nodes)
        net = honest_net(hr)
        t = hr.uniform(15, 40)
        lost = set()
        while t < fault_end:
            kind = hr.choice(HONEST_OPS)
            honest_op(hr, kind, t, hr.choice(nodes), nodes, add, lost)
            t += hr.expovariate(1 / 30.0)

    for n in nodes:
        add(rng.uniform(0, 15), f"start {n}")
    t = rng.uniform(15, 40)
    while t < fault_end:
        kind = rng.choices(
            ["kill", "restart", "start", "pause", "oneway", "twoway", "lossy", "delay",
             "isolate", "heal"],
            weights=[3, 2, 3, 2, 4, 3, 3, 1, 1, 1])[0]
        a = rng.choice(nodes)
        b = rng.choice([x for x in nodes if x != a])
        dur = rng.uniform(2, 60)
        if kind == "kill":
            add(t, f"kill {a}")
            add(t + rng.uniform(5, 60), f"start {a}")
        elif kind in ("restart", "start"):
            add(t, f"{kind} {a}")
        elif kind == "pause":
            add(t, f"pause {a}")
            add(t + rng.uniform(0.5, 20), f"resume {a}")
        elif kind == "oneway":
            add(t, f"link {a}>{b} down")
            add(t + dur, f"link {a}>{b} up")
        elif kind == "twoway":
            add(t, f"link {a}-{b} down")
            add(t + dur, f"link {a}-{b} up")
        elif kind == "lossy":
            sep = rng.choice(">-")
            add(t, f"link {a}{sep}{b} lossy {rng.choice([0.1, 0.3, 0.5, 0.8])}")
            add(t + dur, f"link {a}{sep}{b} up")
        elif kind == "delay":
            add(t, f"link {a}>{b} delay {rng.choice([0.3, 0.8, 1.4, 2.5])}")
            add(t + dur, f"link {a}>{b} up")
        elif kind == "isolate":
            add(t, f"isolate {a}")
            add(t + dur, "heal")
        else:
            add(t, "heal")
        t += rng.expovariate(1 / 10.0)
    cmds.append([fault_end, "heal"])
    cmds += [[fault_end, f"resume {n}"] for n in nodes]
    cmds += [[fault_end, f"start {n}"] for n in nodes]
    # a node that lost its quorum just before the heal may still fence on stale reachability
    # (survival_window), as a real one would; its host reboots and the agent starts again
    reboot = fault_end + 15.0
    cmds += [[reboot, f"start {n}"] for n in nodes]
    cmds.append([reboot + settle, "expect one_manager"])
    cmds.append([reboot + settle, "expect agreed"])
    cmds.sort(key=lambda x: x[0])
    if honest:
        cmds = without_double_faults(honest_restarts(cmds))
    return {"seed": seed, "nodes": nodes, "rates": rates, "offsets": offsets, "cmds": cmds,
            "net": net}


def run_random(seed, tick=1.0, stop_on_violation=True, term_drop="violation", vms=False,
               **kw):
    """Run one random seed.  Returns (sim, schedule); raises SimViolation on a breach."""
    sch = random_vm_schedule(seed, **kw) if vms else random_schedule(seed, **kw)
    sim = sim_for(sch, tick=tick, stop_on_violation=stop_on_violation, term_drop=term_drop)
    sim.run(sch["cmds"], until=sch.get("until"))
    return sim, sch


def save_schedule(sch, path):
    """Write a random schedule as JSON (a regression keeps it even if the generator
    changes)."""
    with open(path, "w") as f:
        json.dump(sch, f, indent=1, sort_keys=True)
        f.write("\n")


def run_schedule(path, tick=1.0, **kw):
    """Run a schedule saved by save_schedule.  Returns (sim, schedule)."""
    with open(path) as f:
        sch = json.load(f)
    sim = sim_for(sch, tick=tick, **kw)
    sim.run(sch["cmds"], until=sch.get("until"))
    return sim, sch


def sim_for(sch, tick=1.0, **kw):
    """The Sim a random schedule runs in."""
    return Sim(nodes=sch["nodes"], seed=sch["seed"], tick=tick, rates=sch["rates"],
               offsets=sch["offsets"], wire=False, timings=sch.get("timings"),
               net=sch.get("net"), **kw)


# The failover runs use the smallest failover_time SPEC §2 allows for the default
# timings (10 + 10 + 10 + 2*2 + 5 = 39 -> 40): episodes are shorter, and a new manager's
# wait (E + W = 46 s) can exceed failover_time, so both terms of the bound are exercised.
VM_TIMINGS = dict(TIMINGS, failover_time=40)


def random_vm_schedule(seed, episode=64.0, tail=20.0, honest=None):
    """A random failover schedule (all derived from seed): 3 candidates and 2-3 workers
    (sometimes one is a backup node), each worker holding 1-3 VMs (candidates 0-1), the
    first running, the others running 4 times in 5, most of them production, replicated to 0-3 other hosts with older or equal
    snapshots (a few replicas without one), hosts with different free memory.

    Once the cluster is up, one victim (a worker 3 times in 4) fails: kill (the watchdog
    fences an armed node), crash (power loss), pause (hung host; sometimes resumed),
    isolation (sometimes healed), a cut from 2 candidates, or a cut from one candidate
    only (it must never be failed over).  Sometimes the victim's agent starts again
    (rejoin: a fence record, or demotion of VMs moved meanwhile), sometimes the manager
    fails around the time of the victim's failover (kill, crash or pause of @manager),
    and sometimes a second fault hits any node (kill, crash, pause, restart, lossy or
    one-way link).
    `episode` seconds (58 more after a manager fault, whose failure the victim's failover
    may wait for) after the first fault everything heals and every node starts
    again (twice, 8 s apart: a node may still fence on stale reachability); the run
    ends `tail` seconds later.  Liveness of the election is test_sim_random's business;
    these runs check the VM invariants (safety after every step, recovery in bounded
    time, see Sim._check_recovery).
    """
    honest = HONEST if honest is None else honest
    rng = random.Random(f"hoster_ha-vmsim-{seed}")
    # a VM other than a host's first is sometimes stopped (issue 11 item 2.2: a fence
    # locks it too; its lock is lifted on rejoin unless it was moved); its own stream, so
    # every other draw of a seed stays as it was
    stopped = random.Random(f"hoster_ha-vmsim-stopped-{seed}")
    workers = ["worker1", "worker2"] + (["worker3"] if rng.random() < 0.3 else [])
    nodes = list(CANDIDATES) + workers
    rates = {n: round(rng.uniform(0.95, 1.05), 4) for n in nodes}
    offsets = {n: round(rng.uniform(0, 1000), 3) for n in nodes}
    cmds = []

    def add(t, c):
        cmds.append([round(t, 3), c])

    if rng.random() < 0.25:
        add(0, f"host {workers[-1]} backup=1")
    for n in nodes:
        if rng.random() < 0.5:
            add(0, f"host {n} free={rng.choice([4, 16, 32])}")
    # external fencing (issue 13 item 5), its own stream: the other draws stay as they were
    bmc = random.Random(f"hoster_ha-vmsim-bmc-{seed}")
    for n in nodes:
        if bmc.random() < 0.3:
            add(0, f"host {n} bmc={bmc.choice(['off', 'off', 'off', 'fail', 'hang'])}")
    for n in nodes:
        count = rng.choice([1, 2, 2, 3]) if n in workers else rng.choice([0, 0, 1])
        for i in range(count):
            name = f"{n[0]}{n[-1]}{'abc'[i]}"
            prod = i == 0 or rng.random() < 0.8
            snap = rng.randint(1000, 1100)
            live = int(i == 0 or stopped.random() >= 0.2)
            add(0, f"vm {n} {name} production={int(prod)} snapshot={snap} live={live}")
            others = [x for x in nodes if x != n]
            for r in rng.sample(others, rng.choices([0, 1, 2, 3], [1, 5, 5, 2])[0]):
                rs = "none" if rng.random() < 0.1 else snap - rng.choice([0, 0, 5, 20, 60])
                add(0, f"vm {r} {name} parent={n} production={int(prod)} snapshot={rs}")
    for n in nodes:
        add(rng.uniform(0, 4), f"start {n}")

    t1 = rng.uniform(15, 19)
    end = t1 + episode
    victim = rng.choice(workers * 3 + list(CANDIDATES))
    kind = rng.choices(["kill", "crash", "pause", "isolate", "cut2", "cut1"],
                       [5, 5, 3, 3, 2, 2])[0]
    cands = [c for c in CANDIDATES if c != victim]
    base = len(cmds)
    if kind in ("kill", "crash"):
        add(t1, f"{kind} {victim}")
    elif kind == "pause":
        add(t1, f"pause {victim}")
        if rng.random() < 0.5:
            add(t1 + rng.choice([rng.uniform(1, 9), rng.uniform(10, 50)]), f"resume {victim}")
    elif kind == "isolate":
        add(t1, f"isolate {victim}")
        if rng.random() < 0.5:
            add(t1 + rng.uniform(5, 50), "heal")
    elif kind == "cut2":
        for c in rng.sample(cands, 2):
            add(t1, f"link {victim}-{c} down")
    else:
        add(t1, f"link {victim}-{rng.choice(cands)} down")
    late = t1
    net = None
    if honest:      # a second stream: the kinder schedule above stays as it was
        hr = random.Random(f"hoster_ha-vmsim-honest-{seed}")
        rates = honest_rates(hr, nodes)
        net = honest_net(hr)
        lost = set()
        vkind = hr.choices(["none", "killwatchdog", "fastrestart", "leave", "leave1_crash",
                            "maint1_crash", "maint_crash", "leave_crash"],
                           [10, 2, 2, 1, 2, 2, 1, 1])[0]
        if vkind != "none":     # the victim's fault is an operator's or a host's
            del cmds[base:]
            if vkind in ("killwatchdog", "fastrestart", "leave"):
                late = honest_op(hr, vkind, t1, victim, nodes, add, lost)
            elif vkind in ("leave1_crash", "maint1_crash"):   # refused, then it dies
                up = honest_op(hr, vkind.split("_")[0], t1, victim, nodes, add)
                late = up + hr.uniform(0.5, 15)
                add(late, f"{hr.choice(['crash', 'kill'])} {victim}")
            else:           # a real leave or maintenance, then a power loss: not failed over
                add(t1, f"leave {victim}" if vkind == "leave_crash"
                    else f"maintenance {victim} on")
                late = t1 + hr.uniform(10, 20)
                add(late, f"crash {victim}")
        for _ in range(hr.choice([0, 1, 1, 2])):    # more, anywhere
            kind = hr.choice(HONEST_OPS + ["latestart", "latestart"])
            if kind == "latestart" and not LATE_STARTS:
                continue
            t = t1 + hr.uniform(-10, episode - 20)
            if kind == "latestart":     # a start that is reported failed comes up later
                copies = [(c.split()[1], c.split()[2]) for _, c in cmds
                          if c.startswith("vm ") and "parent=" in c]
                if copies:
                    host, vm = hr.choice(copies)
                    add(0, f"latestart {host} {vm} {hr.choice([2, 10, 30])}")
                continue
            late = max(late, honest_op(hr, kind, t, hr.choice(nodes), nodes, add, lost))
        end = max(end, late + 30)
    if rng.random() < 0.35:     # the victim's agent starts again: before or after failover
        back = rng.choice([rng.uniform(5, 30), rng.uniform(30, 55), rng.uniform(55, episode)])
        add(t1 + back, f"start {victim}")
    second = rng.random()
    ft = VM_TIMINGS["failover_time"]
    if second < 0.15:           # the manager fails around the victim's failover
        end = t1 + episode + 58     # failover waits for its failure (SPEC §3.4 step 1)
        t2 = t1 + ft + rng.uniform(-3, 8)
        add(t2, f"{rng.choice(['kill', 'crash', 'pause'])} @manager")
        if rng.random() < 0.3:
            add(t2 + rng.uniform(2, 9), "resume @last")
    elif second < 0.3:          # the manager's links fail around the victim's failover
        t2 = t1 + ft + rng.uniform(-4, 6)
        other = rng.choice([x for x in nodes if x != victim])
        link = rng.choice(["@manager-{}", "@manager>{}", "{}>@manager"]).format(other)
        add(t2, f"link {link} {rng.choice(['down', 'lossy 0.5'])}")
        add(t2 + rng.uniform(3, 20), f"link {link.replace('@manager', '@last')} up")
    elif second < 0.55:         # a second fault, anywhere
        t2 = t1 + rng.uniform(-5, episode - 15)
        a = rng.choice(nodes)
        b = rng.choice([x for x in nodes if x != a])
        k2 = rng.choice(["kill", "crash", "pause", "lossy", "oneway", "restart"])
        if k2 in ("kill", "crash", "restart"):
            add(t2, f"{k2} {a}")
        elif k2 == "pause":
            add(t2, f"pause {a}")
            add(t2 + rng.uniform(1, 20), f"resume {a}")
        elif k2 == "lossy":
            add(t2, f"link {a}-{b} lossy {rng.choice([0.2, 0.5])}")
            add(t2 + rng.uniform(5, 30), f"link {a}-{b} up")
        else:
            add(t2, f"link {a}>{b} down")
            add(t2 + rng.uniform(5, 30), f"link {a}>{b} up")
    if honest:
        end = max(end, max(c[0] for c in cmds) + 30)
    end = round(end, 3)
    cmds.append([end, "heal"])
    cmds += [[end, f"resume {n}"] for n in nodes]
    cmds += [[end, f"start {n}"] for n in nodes]
    cmds += [[end + 8, f"start {n}"] for n in nodes]
    cmds.sort(key=lambda x: x[0])
    if honest:
        cmds = without_double_faults(honest_restarts(cmds), VM_TIMINGS)
    return {"seed": seed, "nodes": nodes, "rates": rates, "offsets": offsets, "cmds": cmds,
            "timings": VM_TIMINGS, "until": end + tail, "net": net}


GENERATORS = ("election", "failover")

# violation text -> kind (the sim_soak table, check_seeds)
KINDS = [("is live on", "vm_on_two_hosts"), ("at the deadline", "vm_not_restarted"),
         ("managers at once", "two_managers"), ("never armed", "unarmed_fence"),
         ("moved its vote", "vote_lease"), ("voted", "vote_lease"),
         ("became manager", "manager_terms"), ("term of the acting manager fell", "manager_terms"),
         ("granted term", "voter_terms"), ("persisted", "voter_terms"),
         ("no manager in office", "no_manager"), ("took office", "no_manager"),
         ("backup node", "bad_target"), ("no snapshot", "bad_target"),
         ("malformed", "malformed")]


def violation_kind(text):
    for key, kind in KINDS:
        if key in text:
            return kind
    return "other"


def check_seed(gen, seed, tick=1.0):
    """Run one seed of a generator ("election": random_schedule, "failover":
    random_vm_schedule).  None if every invariant and expectation held, else (kind, text):
    kind is a KINDS name, "liveness" (an `expect` failed), "sim_error" (the simulator
    broke) or "exception" (an exception in the core or the simulator)."""
    try:
        s, _ = run_random(seed, tick=tick, vms=gen == "failover")
    except SimViolation as e:
        return violation_kind(str(e)), str(e)
    except SimError as e:
        return "sim_error", str(e)
    except Exception as e:      # noqa: BLE001 - a crash is a finding too
        return "exception", f"{type(e).__name__}: {e}"
    if s.failures:
        return "liveness", "; ".join(s.failures)
    return None


def _check_chunk(args):
    gen, seeds, tick = args
    out = []
    for seed in seeds:
        r = check_seed(gen, seed, tick)
        if r is not None:
            out.append((seed,) + r)
    return out


def seed_processes():
    """Processes for a chunk of seeds: 2, or 1 under pytest-xdist (its workers already
    keep both cores busy)."""
    return 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


def check_seeds(gen, seeds, processes=2, chunk=25, tick=1.0):
    """The failing seeds of `seeds` as [(seed, kind, text)], sorted; the seeds run in a
    pool of `processes` worker processes (1: in this process)."""
    seeds = list(seeds)
    parts = [(gen, seeds[i:i + chunk], tick) for i in range(0, len(seeds), chunk)]
    if processes <= 1 or len(parts) <= 1:
        return sorted(x for p in parts for x in _check_chunk(p))
    import multiprocessing
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                      else None)
    with ctx.Pool(processes) as pool:
        return sorted(x for r in pool.imap_unordered(_check_chunk, parts) for x in r)


def format_schedule(sch):
    lines = [f"seed {sch['seed']}: nodes {', '.join(sch['nodes'])}",
             "clock rates: " + ", ".join(f"{n}={r}" for n, r in sch["rates"].items()),
             "clock offsets: " + ", ".join(f"{n}={o}" for n, o in sch["offsets"].items())]
    if sch.get("until"):
        lines.append(f"runs until {sch['until']:.3f}")
    if sch.get("timings"):
        lines.append("timings: " + ", ".join(f"{k}={v:g}" for k, v in sch["timings"].items()))
    if sch.get("net"):
        lines.append("network: " + ", ".join(f"{k}={v:g}" for k, v in sch["net"].items()))
    lines.append("commands:")
    lines += [f"  [{t:8.3f}, {json.dumps(c)}]," for t, c in sch["cmds"]]
    return "\n".join(lines)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, help="replay one seed of the random simulation")
    p.add_argument("--tick", type=float, default=1.0, help="tick of the random run (s)")
    p.add_argument("--vms", action="store_true",
                   help="with --seed: a seed of the failover runs (tests/test_sim_failover.py)")
    p.add_argument("--term-drop", choices=("record", "violation"), default="record",
                   help="whether a falling manager term (a known core bug) is a violation; "
                        "tests/test_sim_random.py records it (default)")
    args = p.parse_args(argv)
    if args.seed is not None:
        sim, sch = run_random(args.seed, tick=args.tick, stop_on_violation=False,
                              term_drop=args.term_drop, vms=args.vms)
        print(format_schedule(sch))
        print()
        sys.stdout.write(sim.log_text())
        bad = sim.violations + sim.failures
        for text in sim.term_drops:
            print(f"known core bug: {text}")
        if args.vms:
            for h, vm, ts, dl, how, _ in sim.recoveries:
                print(f"recovered: VM {vm} of {h} (silent since {ts:.1f}) by {dl:.1f}: {how}")
            for h, ts, why in sim.skipped:
                print(f"not asserted: {h} silent since {ts:.1f}: {why}")
        print(f"\nseed {args.seed}: " + ("OK" if not bad else "FAILED:\n  " + "\n  ".join(bad)))
        return 1 if bad else 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
