#!/usr/bin/env python3
"""Many random schedules of the deterministic simulator (tests/sim.py), on every core.

    make sim-soak                          100,000 schedules, half of each generator
    SIM_SOAK_SEEDS=20000 make sim-soak     another count
    python3 tools/sim_soak.py --seeds 20000 --minutes 30 --start 0 --processes 2

Both random generators run (election: tests/test_sim_random.py's schedules; failover:
tests/test_sim_failover.py's), with the honest fault model (sim.HONEST), seeds start..
start+N/2-1 of each, in chunks on a multiprocessing pool.  --minutes bounds the run
time: the chunks done by then are counted, the rest are not run.  The table gives per
generator the seeds run, the violations by kind (sim.KINDS, "liveness", "sim_error",
"exception") and seeds per minute; every failing seed is listed with its replay command.
Exit status 1 if any seed failed.
"""

import argparse
import collections
import multiprocessing
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import sim

CHUNK = 50


def chunks(start, count):
    """(generator, seeds) chunks, the two generators interleaved."""
    per = count // len(sim.GENERATORS)
    for lo in range(start, start + per, CHUNK):
        for gen in sim.GENERATORS:
            yield gen, range(lo, min(lo + CHUNK, start + per))


def run_chunk(args):
    gen, seeds = args
    t0 = time.monotonic()
    bad = sim._check_chunk((gen, seeds, 1.0))
    return gen, len(seeds), bad, time.monotonic() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=int(os.environ.get("SIM_SOAK_SEEDS", "100000")),
                   help="schedules in all, split evenly between the generators "
                        "(default 100000; env SIM_SOAK_SEEDS)")
    p.add_argument("--start", type=int, default=int(os.environ.get("SIM_SOAK_START", "0")),
                   help="first seed of each generator (default 0)")
    p.add_argument("--minutes", type=float,
                   default=float(os.environ.get("SIM_SOAK_MINUTES", "0")) or None,
                   help="stop after this long (env SIM_SOAK_MINUTES; default: no bound)")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60 if args.minutes else None
    done = collections.Counter()
    busy = collections.Counter()    # generator -> CPU seconds of its chunks
    kinds = collections.defaultdict(collections.Counter)
    failures = []
    timed_out = False
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ctx.Pool(args.processes)
    interrupted = False
    next_note = t0 + 600
    try:
        for gen, n, bad, took in pool.imap_unordered(run_chunk, chunks(args.start, args.seeds)):
            done[gen] += n
            busy[gen] += took
            for seed, kind, text in bad:
                kinds[gen][kind] += 1
                failures.append((gen, seed, kind, text))
                print(f"FAILED {gen} seed {seed}: {kind}: {text}", flush=True)
            if time.monotonic() >= next_note:   # a partial run still says how far it got
                next_note += 600
                print(f"... {sum(done.values())} schedules, {len(failures)} violation(s), "
                      f"{(time.monotonic() - t0) / 60:.0f} min", flush=True)
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
    except KeyboardInterrupt:   # SIGINT: the table of what ran
        interrupted = True
    finally:
        pool.terminate()
        pool.join()
    wall = time.monotonic() - t0
    total = sum(done.values())
    print()
    print(f"sim-soak: {total} schedules in {wall / 60:.1f} min on {args.processes} processes "
          f"({os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()})"
          + (", stopped by --minutes" if timed_out else "")
          + (", interrupted" if interrupted else ""))
    rows = [("generator", "seeds", "violations", "by kind", "seeds/min (wall)",
             "seeds/min/core")]
    for gen in sim.GENERATORS:
        by = ", ".join(f"{k} {v}" for k, v in sorted(kinds[gen].items())) or "-"
        per_core = done[gen] / busy[gen] * 60 if busy[gen] else 0
        rows.append((gen, str(done[gen]), str(sum(kinds[gen].values())), by,
                     f"{done[gen] / wall * 60:.0f}", f"{per_core:.0f}"))
    rows.append(("all", str(total), str(len(failures)), "", f"{total / wall * 60:.0f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if failures:
        print("\nreplay:")
        for gen, seed, kind, _ in sorted(failures):
            flag = "--vms " if gen == "failover" else ""
            print(f"  python3 tests/sim.py {flag}--seed {seed}    # {kind}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
