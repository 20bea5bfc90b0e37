#!/usr/bin/env python3
"""Soak: randomized fault schedules against a hoster_ha cluster in network namespaces.

    make soak                                  # 10 minutes (SOAK_MINUTES, SOAK_COUNT,
    python3 tools/soak.py --minutes 10         #  SOAK_SEED, SOAK_FAULTS work too)
    python3 tools/soak.py --count 3 --seed 42 --keep /tmp/soak --faults isolate,cut

Needs root and `ip` (tests/netns.py).  Three candidates and two workers run the real
hoster_ha.py in PRODUCTION mode with fake host commands (tools/fake_host_cmd.py); every
host owns two production VMs with replicas on two other hosts.  Each schedule starts
from a healthy cluster (every host armed, a manager, every VM live exactly once), injects
1-3 overlapping faults drawn at random --

    isolate     a host's bridge port down for 1-12 s (silent drops)
    cut         one pair a<->b for 1-12 s, "timeout" or "blackhole" routes
    flap        a host's port down 0.5-1.5 s, 2-4 times
    blip        the whole bridge down 0.5-1.5 s (shorter than survival_window)
    outage      the whole bridge down 4-8 s (every armed node fences: the price)
    hang        SIGSTOP a host's agent for 1-15 s (its watchdog fences it)
    stall       SIGSTOP agent and watchdog for 1-6 s (less than failover_time minus the
                fence: longer stalls of a host with VMs need kernel_watchdog)
    kill-agent  SIGKILL the agent only (the watchdog fences)
    kill-wd     SIGKILL the watchdog only (the agent fences)
    crash       the host loses power (agent, watchdog and VMs gone at once)

-- heals the network, restarts every host that goes down (0-8 s after it is seen down; a
crashed host only failover_time + 10 s after the crash, as a real reboot takes a while;
--quick-crash-restart drops that), and waits until the cluster is healthy again, at most
failover_time + 25 s after the last restart.
After every schedule the invariant is checked over every record since the start
(tests/invariants.py): a VM live on two hosts at once is a safety violation; a VM still
live nowhere when every host is armed again is a recovery violation (the operator then
starts it on its parent host, logged in faults.log, and the soak goes on).  --faults
limits the kinds drawn.  The summary: schedules run, faults injected, fences, failovers,
violations (must be 0).  Exit status 0 only with 0 violations.
"""

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import invariants  # noqa: E402
import netns  # noqa: E402

HOSTS = ("c1", "c2", "c3", "w1", "w2")
WEIGHTS = {"isolate": 4, "cut": 4, "flap": 2, "blip": 1, "outage": 1, "hang": 2,
           "stall": 1, "kill-agent": 2, "kill-wd": 1, "crash": 2}
CAUSES = ("isolate", "cut", "switch_down", "hang", "kill", "kill_one")


def draw(rng, kinds=tuple(WEIGHTS)):
    """1-3 faults of the given kinds: [(start offset s, kind, args, duration s)]."""
    out = []
    kinds = list(kinds)
    for _ in range(rng.choice((1, 1, 2, 2, 3))):
        kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
        at = round(rng.uniform(0, 6), 2)
        h = rng.choice(HOSTS)
        if kind == "isolate":
            out.append((at, kind, (h,), round(rng.uniform(1, 12), 2)))
        elif kind == "cut":
            a, b = rng.sample(HOSTS, 2)
            out.append((at, kind, (a, b, rng.choice(("timeout", "blackhole"))),
                        round(rng.uniform(1, 12), 2)))
        elif kind == "flap":
            out.append((at, kind, (h, rng.randint(2, 4)), round(rng.uniform(0.5, 1.5), 2)))
        elif kind == "blip":
            out.append((at, kind, (), round(rng.uniform(0.5, 1.5), 2)))
        elif kind == "outage":
            out.append((at, kind, (), round(rng.uniform(4, 8), 2)))
        elif kind == "hang":
            out.append((at, kind, (h,), round(rng.uniform(1, 15), 2)))
        elif kind == "stall":
            out.append((at, kind, (h,), round(rng.uniform(1, 6), 2)))
        else:
            out.append((at, kind, (h,), 0.0))
    return sorted(out)


def describe(f):
    at, kind, args, dur = f
    what = " ".join([kind, *map(str, args)])
    return f"{what} @{at:g}s" + (f" for {dur:g}s" if dur else "")


class Soak:
    def __init__(self, net, base, rng, out, quick_crash_restart=False, kinds=tuple(WEIGHTS),
                 settle=0.0):
        self.rng, self.out, self.quick = rng, out, quick_crash_restart
        self.kinds, self.settle = kinds, settle
        self.c = netns.NetCluster(base, net)
        self.t = self.c.timings
        self.stats = {"schedules": 0, "faults": 0, "fences": 0, "crashes": 0,
                      "failovers": 0, "moved": 0, "violations": 0, "safety_violations": 0,
                      "recovery_violations": 0}
        self.fence_times, self.gaps, self.converge = [], [], []
        self.seen = set()
        self.began = None

    def say(self, msg):
        print(msg, file=self.out, flush=True)

    def setup(self):
        self.c.spread_vms()
        self.c.start_all()
        self.c.wait_armed(timeout=60)
        self.c.wait_manager(30)
        self.began = time.time()

    def healthy(self):
        c = self.c
        return (all(h.armed() for h in c.hosts.values()) and c.manager()[0] is not None
                and all(len(w) == 1 for vm, w in c.where().items() if vm in c.vms))

    # -- one schedule ------------------------------------------------------------

    def inject(self, faults, t0):
        """Run the faults' start and end actions in time order."""
        c = self.c
        actions = []
        for at, kind, args, dur in faults:
            if kind == "isolate":
                actions += [(at, c.isolate, args), (at + dur, c.rejoin, args)]
            elif kind == "cut":
                actions += [(at, c.cut, args), (at + dur, c.uncut, args[:2])]
            elif kind == "flap":
                h, n = args
                for i in range(n):
                    s = at + i * (dur + 1.5)
                    actions += [(s, c.isolate, (h,)), (s + dur, c.rejoin, (h,))]
            elif kind in ("blip", "outage"):
                actions += [(at, c.switch_down, ()), (at + dur, c.switch_up, ())]
            elif kind in ("hang", "stall"):
                actions.append((at, self._hang, (args[0], dur, kind)))
            elif kind == "kill-agent":
                actions.append((at, c.kill_one, (args[0], "hoster_ha")))
            elif kind == "kill-wd":
                actions.append((at, c.kill_one, (args[0], "ha_watchdog")))
            elif kind == "crash":
                actions.append((at, c.kill, (args[0],)))
        for at, fn, args in sorted(actions, key=lambda a: a[0]):
            delay = t0 + at - time.time()
            if delay > 0:
                time.sleep(delay)
            fn(*args)
        while c.hung:                       # every hang has ended (resumed)
            time.sleep(0.1)

    def _hang(self, host, seconds, kind):
        if self.c[host].alive():
            self.c.hang(host, seconds, which="agent" if kind == "hang" else "both")

    def recover(self):
        """Restart hosts as they go down (a fence can come seconds after the heal) and wait
        until the cluster is healthy.  A host is restarted 0-8 s after it is seen down; a
        crashed one not before failover_time + 10 s after the crash (a real reboot takes
        that long; --quick-crash-restart drops it).  Gives up failover_time + 25 s after
        the last restart (300 s at most).  Returns (healthy, time of the last restart)."""
        c = self.c
        start = last = time.time()
        due = {}                     # host -> when to restart it
        while True:
            now = time.time()
            for n, h in c.hosts.items():
                if n in due or h.alive():
                    continue
                when = now + self.rng.uniform(0, 8)
                down = netns._read(h.path("down")).split()
                if down and "power" in down and not self.quick:
                    when = max(when, float(down[0]) + self.t["failover_time"] + 10)
                due[n] = when
            for n, when in sorted(due.items(), key=lambda x: x[1]):
                if when <= now:
                    if not c[n].alive():
                        c.restart(n)
                        last = time.time()
                    del due[n]
            if not due and self.healthy():
                return True, last
            if not due and now > last + self.t["failover_time"] + 25 or now > start + 300:
                return False, last
            time.sleep(0.25)

    def schedule(self, number):
        c = self.c
        faults = draw(self.rng, self.kinds)
        t0 = time.time() + 0.2
        self.inject(faults, t0)
        c.heal()
        time.sleep(self.rng.uniform(0, 3))
        ok, last = self.recover()
        took = time.time() - t0
        problems = []
        if not ok:
            problems.append(self.unhealthy(number, time.time() - last, t0))
        records = c.records()
        mine = [r for r in records if r.t >= t0]
        fences = [r for r in mine if r.kind == "down" and "power" not in r.text]
        crashes = [r for r in mine if r.kind == "down" and "power" in r.text]
        starts = [r for r in mine if r.kind == "start"]
        ivs = invariants.live_intervals(records)
        moved = [r for r in starts if _previous_host(ivs.get(r.vm, []), r) not in (None, r.host)]
        rep = invariants.check(records, self.began)
        safety = [v for v in rep.violations if v.split("\n", 1)[0] not in self.seen]
        self.seen.update(v.split("\n", 1)[0] for v in safety)
        for vm in c.vms:
            self.gaps += _gaps(ivs.get(vm, []), t0)
        for r in fences:   # latency from the latest fault that concerned that host
            cause = [f for f in mine if f.kind == "fault" and f.t <= r.t and
                     f.text.split()[0] in CAUSES and
                     (r.host in f.text.split() or f.text.startswith("switch_down"))]
            if cause:
                self.fence_times.append(r.t - cause[-1].t)
        if ok:
            self.converge.append(took)
        st = self.stats
        st["schedules"] += 1
        st["faults"] += len(faults)
        st["fences"] += len(fences)
        st["crashes"] += len(crashes)
        st["failovers"] += len(starts)
        st["moved"] += len(moved)
        st["safety_violations"] += len(safety)
        st["recovery_violations"] += len(problems)
        st["violations"] += len(safety) + len(problems)
        self.say(f"#{number:<3} {time.time() - self.began:7.1f}s  "
                 f"{'; '.join(describe(f) for f in faults)}\n"
                 f"      -> fences: {', '.join(sorted(r.host for r in fences)) or 'none'}"
                 f"{'  crashes: ' + ', '.join(r.host for r in crashes) if crashes else ''}"
                 f"  VM starts: {len(starts)} ({len(moved)} on another host)"
                 f"  {'healthy again after %.1fs' % took if ok else 'NOT healthy'}"
                 f"  violations: {len(safety) + len(problems)}")
        for v in safety + problems:
            self.say(v)
        if not ok:
            self.repair(number)
        if self.settle:
            time.sleep(self.settle)

    def unhealthy(self, number, waited, t0):
        """A NOT RECOVERED violation: what is wrong, and the timeline since t0."""
        c = self.c
        where = c.where()
        wrong = {vm: where.get(vm, []) for vm in c.vms if len(where.get(vm, [])) != 1}
        return (f"NOT RECOVERED: schedule {number}, {waited:.0f} s after the last restart: "
                f"VMs not live exactly once: {wrong or 'none'}; hosts not armed: "
                f"{[n for n, h in c.hosts.items() if not h.armed()] or 'none'}; manager "
                f"{c.manager()[0]}\n" + invariants.format_timeline(c.records(), t0, t0 - 2))

    def repair(self, number):
        """After a NOT RECOVERED violation, do what an operator would, so that the soak
        goes on with every host and VM: start every host whose agent is gone, wait for
        the cluster, then start each VM still live nowhere on the host that holds it as
        parent (a fence lock is undone first).  Logged in faults.log."""
        c = self.c
        for n, h in c.hosts.items():
            if not h.alive():
                c.restart(n)
        c.wait_for(lambda: all(h.armed() for h in c.hosts.values()) and c.manager()[0],
                   60, interval=0.25)
        if c.wait_for(self.healthy, self.t["failover_time"] + 15, interval=0.25):
            return
        where = c.where()
        for vm in [v for v in c.vms if not where.get(v)]:
            parent = [n for n, h in c.hosts.items() if h.vm_config(vm).get("parent_host") == n]
            locked = [n for n, h in c.hosts.items()
                      if str(h.vm_config(vm).get("parent_host", "")).startswith("__HA_LOCKED_")]
            host = (parent or locked or [None])[0]
            if host is None:
                raise RuntimeError(f"schedule {number}: lost VM {vm} has no parent copy")
            c.fault("operator_start", vm, host)
            if not parent:
                cfg = c[host].vm_config(vm)
                cfg["parent_host"] = host
                with open(c[host].path("vms", vm, "vm_config.json"), "w") as f:
                    json.dump(cfg, f)
            c[host].fake("hoster", "vm", "start", vm)
        if not c.wait_for(self.healthy, 15, interval=0.25):
            raise RuntimeError(f"schedule {number}: not healthy after the operator's repair:"
                               f" {self.unhealthy(number, 0, time.time()).splitlines()[0]}")

    def summary(self):
        s = dict(self.stats)

        def dist(xs):
            if not xs:
                return "-"
            return (f"min {min(xs):.1f} / median {statistics.median(xs):.1f} / "
                    f"max {max(xs):.1f} s (n={len(xs)})")
        s["fence_after_fault"] = dist(self.fence_times)
        s["vm_down_time"] = dist(self.gaps)
        s["schedule_time"] = dist(self.converge)
        return s


def _previous_host(ivs, start):
    """The host where the VM was live before the interval that `start` (a record) opened."""
    before = [iv for iv in ivs if iv.start < start.t]
    return max(before, key=lambda iv: iv.start).host if before else None


def _gaps(ivs, after):
    """Lengths of the periods (starting at or after `after`) in which a VM was live
    nowhere and then live again."""
    out = []
    ivs = sorted(ivs, key=lambda i: i.start)
    for iv in ivs:
        if iv.end is None or iv.end < after:
            continue
        if any(o.start <= iv.end and (o.end is None or o.end > iv.end) for o in ivs
               if o is not iv):
            continue
        nxt = [o.start for o in ivs if o.start >= iv.end]
        if nxt:
            out.append(min(nxt) - iv.end)
    return out


def run(net=None, base=None, count=None, minutes=None, seed=None, out=sys.stdout,
        quick_crash_restart=False, keep=False, faults=None, settle=0.0):
    """Run schedules until `count` are done or `minutes` have passed.  faults: the fault
    kinds to draw from (default: all of WEIGHTS).  Returns the summary dict (schedules,
    faults, fences, crashes, failovers, moved, violations, ...)."""
    kinds = tuple(faults or WEIGHTS)
    unknown = [k for k in kinds if k not in WEIGHTS]
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(WEIGHTS)}")
    if count is None and minutes is None:
        minutes = 10
    seed = seed if seed is not None else random.randrange(1, 10**6)
    rng = random.Random(seed)
    own_net = net is None
    if own_net:
        netns.cleanup_leftovers()
        net = netns.Network(HOSTS)
    tmp = None
    if base is None:
        tmp = base = tempfile.mkdtemp(prefix="hoster_ha_soak_")
    soak = None
    print(f"soak: seed {seed}, {'%d schedules' % count if count else '%g minutes' % minutes}, "
          f"faults {','.join(kinds)}, folder {base}", file=out, flush=True)
    try:
        soak = Soak(net, base, rng, out, quick_crash_restart, kinds, settle)
        soak.setup()
        end = time.time() + minutes * 60 if minutes else None
        n = 0
        while (count is None or n < count) and (end is None or time.time() < end):
            n += 1
            soak.schedule(n)
    except RuntimeError as e:
        print(f"soak: {e}", file=out, flush=True)
    finally:
        if soak is not None:
            soak.c.close(keep=True)
        if own_net:
            net.close()
    s = soak.summary() if soak else {"schedules": 0, "violations": 1}
    s["seed"] = seed
    print("\nsoak summary", file=out)
    for k in ("seed", "schedules", "faults", "fences", "crashes", "failovers", "moved",
              "violations", "safety_violations", "recovery_violations",
              "fence_after_fault", "vm_down_time", "schedule_time"):
        if k in s:
            print(f"  {k:<24} {s[k]}", file=out)
    if tmp and not keep and s.get("violations") == 0:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"  records kept in {base} (python3 tests/invariants.py {base})", file=out)
    out.flush()
    return s


def main(argv=None):
    env = os.environ
    p = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=float(env.get("SOAK_MINUTES", 0)) or None,
                   help="run for this long (default 10, or SOAK_MINUTES)")
    p.add_argument("--count", type=int, default=int(env.get("SOAK_COUNT", 0)) or None,
                   help="run this many schedules (SOAK_COUNT)")
    p.add_argument("--seed", type=int, default=int(env.get("SOAK_SEED", 0)) or None)
    p.add_argument("--keep", metavar="DIR", help="keep every record in DIR")
    p.add_argument("--faults", default=env.get("SOAK_FAULTS"),
                   help="comma-separated fault kinds (default all: %s; SOAK_FAULTS)"
                   % ",".join(WEIGHTS))
    p.add_argument("--settle", type=float, default=0.0,
                   help="seconds of calm after each schedule (default 0)")
    p.add_argument("--quick-crash-restart", action="store_true",
                   help="restart crashed hosts 0-8 s after the crash, like fenced ones")
    a = p.parse_args(argv)
    why = netns.unavailable()
    if why:
        print(f"soak: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    s = run(base=a.keep, count=a.count, minutes=a.minutes, seed=a.seed,
            quick_crash_restart=a.quick_crash_restart, keep=bool(a.keep),
            faults=a.faults.split(",") if a.faults else None, settle=a.settle)
    return 0 if s.get("violations") == 0 and s.get("schedules") else 1


if __name__ == "__main__":
    sys.exit(main())
