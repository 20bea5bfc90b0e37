"""The safety invariant, checked from the fake hosts' own records.

Every host folder has calls.log, written by tools/fake_host_cmd.py ("<unix time> <argv>"):

    T hoster vm start NAME            NAME is live here from T (written just before the
                                      vmm entry is created)
    T bhyvectl --destroy --vm=NAME    ... until T (written just after it is removed)
    T vm gone NAME                    ... until T (a reboot or power loss removed it)
    T shutdown -r now | reboot -nq    a fence reboot was asked for
    T down REASON / T up power on     the host went down / was powered on again
    T refused hoster vm start NAME    a start that never happened (host down)

and the harness writes BASE/faults.log ("<unix time> <verb> <args>").

    records = load({"c1": "/tmp/x/c1", ...}, "/tmp/x/faults.log")
    ivs = live_intervals(records)           # {vm: [Interval(host, start, end)]}
    problems = overlaps(ivs)                # the invariant: never live on two hosts
    t = recovery(ivs, "vm-w1a", after=t0)   # seconds until it was live again

A violation comes with the timeline around it (format_timeline).  Run as a script on a
kept test folder:  python3 tests/invariants.py BASE
"""

import collections
import os
import sys

Record = collections.namedtuple("Record", "t host kind vm text")
Interval = collections.namedtuple("Interval", "host start end end_why")

REBOOT_CMDS = ("shutdown", "reboot")


def parse_calls(text, host):
    """calls.log text -> [Record] in file order."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            t = float(parts[0])
        except ValueError:
            continue
        cmd, args = parts[1], parts[2:]
        rest = " ".join(parts[1:])
        if cmd == "hoster" and args[:2] == ["vm", "start"] and len(args) == 3:
            out.append(Record(t, host, "start", args[2], rest))
        elif cmd == "bhyvectl" and args[:1] == ["--destroy"] and len(args) == 2 and \
                args[1].startswith("--vm="):
            out.append(Record(t, host, "destroy", args[1][5:], rest))
        elif cmd == "vm" and args[:1] == ["gone"] and len(args) == 2:
            out.append(Record(t, host, "gone", args[1], rest))
        elif cmd in REBOOT_CMDS:
            out.append(Record(t, host, "reboot", None, rest))
        elif cmd == "down":
            out.append(Record(t, host, "down", None, rest))
        elif cmd == "up":
            out.append(Record(t, host, "up", None, rest))
        elif cmd in ("refused", "pending"):
            out.append(Record(t, host, cmd, args[-1] if cmd == "pending" else
                              (args[3] if len(args) > 3 else None), rest))
    return out


def parse_faults(text):
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            t = float(parts[0])
        except ValueError:
            continue
        out.append(Record(t, "harness", "fault", None, " ".join(parts[1:])))
    return out


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def load(host_dirs, faults_log=None):
    """Every record of every host (and the harness's faults), in time order.  Within a
    host, file order is kept (it is causal: the fake writes under the host lock)."""
    records = []
    for host, d in sorted(host_dirs.items()):
        for i, r in enumerate(parse_calls(_read(os.path.join(d, "calls.log")), host)):
            records.append((r.t, host, i, r))
    if faults_log:
        for i, r in enumerate(parse_faults(_read(faults_log))):
            records.append((r.t, "~", i, r))
    records.sort(key=lambda x: (x[0], x[1], x[2]))
    return [r for *_, r in records]


def live_intervals(records):
    """{vm: [Interval(host, start, end or None, why it ended)]}, by start time.

    Per host, in record order: a start opens an interval (a start while the host is
    down opens none); destroy, vm gone or the host going down closes it."""
    hosts = sorted({r.host for r in records if r.host != "harness"})
    by_host = {h: [r for r in records if r.host == h] for h in hosts}
    out = collections.defaultdict(list)
    for h, recs in by_host.items():
        open_ = {}
        down = False
        for r in recs:
            if r.kind == "start" and not down:
                if r.vm not in open_:
                    open_[r.vm] = r.t
            elif r.kind in ("destroy", "gone") and r.vm in open_:
                out[r.vm].append(Interval(h, open_.pop(r.vm), r.t, r.kind))
            elif r.kind == "down":
                for vm, t in sorted(open_.items()):
                    out[vm].append(Interval(h, t, r.t, "down"))
                open_.clear()
                down = True
            elif r.kind == "up":
                down = False
        for vm, t in open_.items():
            out[vm].append(Interval(h, t, None, None))
    return {vm: sorted(ivs, key=lambda i: i.start) for vm, ivs in out.items()}


def overlaps(intervals):
    """[(vm, interval_a, interval_b, from, to)]: the same VM live on two hosts at once."""
    bad = []
    inf = float("inf")
    for vm, ivs in sorted(intervals.items()):
        for i, a in enumerate(ivs):
            for b in ivs[i + 1:]:
                if a.host == b.host:
                    continue
                lo = max(a.start, b.start)
                hi = min(a.end if a.end is not None else inf, b.end if b.end is not None else inf)
                if lo < hi:
                    bad.append((vm, a, b, lo, hi))
    return bad


def live_at(intervals, vm, t):
    """Hosts where vm is live at time t."""
    return [iv.host for iv in intervals.get(vm, ())
            if iv.start <= t and (iv.end is None or t < iv.end)]


def recovery(intervals, vm, after):
    """Seconds from `after` until vm was live again: if it is live nowhere at `after`,
    until its next start; if it is live then, until the next start after the first
    moment (at or after `after`) it is live nowhere.  0.0 if it never stops being live;
    None if it never comes back."""
    ivs = intervals.get(vm, [])
    if live_at(intervals, vm, after):
        lost = None
        for end in sorted(iv.end for iv in ivs if iv.end is not None and iv.end >= after):
            if not live_at(intervals, vm, end):
                lost = end
                break
        if lost is None:
            return 0.0
    else:
        lost = after
    nxt = [iv.start for iv in ivs if iv.start >= lost]
    return (min(nxt) - after) if nxt else None


def first_start_after(intervals, vm, after, host_not=None):
    """(time, host) of the first start of vm at or after `after` (on another host)."""
    c = [(iv.start, iv.host) for iv in intervals.get(vm, [])
         if iv.start >= after and iv.host != host_not]
    return min(c) if c else None


def format_timeline(records, t0, lo=None, hi=None, vm=None):
    """Readable lines "+12.345  host  what", relative to t0, optionally limited to the
    window [lo, hi] and to one VM (host-wide events such as reboots are always kept)."""
    lines = []
    for r in records:
        if lo is not None and r.t < lo or hi is not None and r.t > hi:
            continue
        if vm is not None and r.vm is not None and r.vm != vm:
            continue
        lines.append(f"{r.t - t0:+9.3f}  {r.host:<8} {r.text}")
    return "\n".join(lines)


class Report:
    """The result of check(): violations (texts with their timelines) and counts."""

    def __init__(self):
        self.violations = []
        self.counts = collections.Counter()

    def add(self, text):
        self.violations.append(text)

    def __bool__(self):
        return not self.violations

    def __str__(self):
        return "\n\n".join(self.violations) if self.violations else "no violations"


def check(records, t0=None, recover=(), bound=None, final=None):
    """Check the invariant over every record; optionally recovery bounds.

    recover: [(vm, after)] -- vm must be live again within `bound` s of `after`;
    final:   a time at which every VM in `recover` must be live on exactly one host.
    Returns a Report (true when there are no violations)."""
    rep = Report()
    t0 = records[0].t if t0 is None and records else (t0 or 0.0)
    ivs = live_intervals(records)
    for vm, a, b, lo, hi in overlaps(ivs):
        end = "still live" if hi == float("inf") else f"until {hi - t0:+.3f}"
        rep.add(f"VIOLATION: {vm} live on {a.host} and {b.host} at once from {lo - t0:+.3f} "
                f"{end}\n" + format_timeline(records, t0, lo - 15, (lo if hi == float('inf')
                                                                     else hi) + 5, vm=vm))
    for vm, after in recover:
        took = recovery(ivs, vm, after)
        if took is None or (bound is not None and took > bound):
            what = "never live again" if took is None else f"live again only after {took:.1f} s"
            rep.add(f"RECOVERY: {vm} {what} (bound {bound} s after {after - t0:+.3f})\n"
                    + format_timeline(records, t0, after - 5, None, vm=vm))
    if final is not None:
        for vm, _ in recover:
            where = live_at(ivs, vm, final)
            if len(where) != 1:
                rep.add(f"FINAL: {vm} live on {where or 'no host'} at {final - t0:+.3f}")
    rep.counts.update(r.kind for r in records)
    return rep


def main(argv):
    if len(argv) != 2:
        print("usage: invariants.py BASE   (a kept netns test or soak folder)", file=sys.stderr)
        return 2
    base = argv[1]
    dirs = {d: os.path.join(base, d) for d in sorted(os.listdir(base))
            if os.path.exists(os.path.join(base, d, "calls.log"))}
    records = load(dirs, os.path.join(base, "faults.log"))
    rep = check(records)
    print(format_timeline(records, records[0].t if records else 0.0))
    print()
    print(rep)
    return 0 if rep else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
