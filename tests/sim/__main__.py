"""Figures, shrinking and traces, outside pytest.

    python -m tests.sim figures --runs 20000      # what the properties saw, by scenario
    python -m tests.sim shrink failed_joins       # the shortest schedule that breaks one
    python -m tests.sim trace 'Schedule(starts=(0.0, 2.0, 9.0))'
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable

from hypothesis import HealthCheck, Phase, find, given, seed, settings

from tests.sim import schedule as sched
from tests.sim.outcome import Outcome
from tests.sim.schedule import Schedule
from tests.sim.strategies import schedules
from tests.sim.world import World

BROKEN: dict[str, Callable[[Outcome], bool]] = {
    "split_brain": lambda o: o.split_brain and o.guaranteed,
    "split_beyond_bound": lambda o: o.split_brain and not o.guaranteed,
    "servers": lambda o: o.servers_max > o.schedule.servers,
    "failed_joins": lambda o: bool(o.failed_joins),
    "degraded_joins": lambda o: bool(o.degraded_joins),
    "ineligible": lambda o: bool(o.ineligible_released or o.ineligible_k3s),
    "liveness": lambda o: o.liveness_failed,
}


def figures(runs: int, seed_: int) -> None:
    by: dict[str, list[Outcome]] = defaultdict(list)
    started = time.perf_counter()

    @seed(seed_)
    @settings(max_examples=runs, database=None, deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(schedules())
    def collect(schedule: Schedule) -> None:
        o = World(schedule).run()
        for label in ["all", *schedule.labels()]:
            by[label].append(o)

    collect()
    elapsed = time.perf_counter() - started
    print(f"{len(by['all'])} schedules in {elapsed:.1f} s")
    print(f"{'scenario':20} {'runs':>6} " + " ".join(f"{k[:8]:>8}" for k in BROKEN)
          + "  excused  released: median max   formed: median max")
    for label in sorted(by, key=lambda k: (k != "all", k)):
        outs = by[label]
        counts = " ".join(f"{sum(f(o) for o in outs):8d}" for f in BROKEN.values())
        rel = [o.released_in for o in outs if o.released_in is not None]
        formed = [o.formed_in for o in outs if o.formed_in is not None]
        print(f"{label:20} {len(outs):6d} {counts} {sum(bool(o.excused) for o in outs):8d}"
              f"  {_stats(rel)}  {_stats(formed)}")
    excuses = Counter(o.excused.split(" n")[0] for o in by["all"] if o.excused)
    print("excused:", dict(excuses))


def _stats(values: list[float]) -> str:
    if not values:
        return f"{'-':>14} {'-':>5}"
    return f"{statistics.median(values):14.1f} {max(values):5.0f}"


def shrink(prop: str, runs: int) -> None:
    broken = BROKEN[prop]
    found = find(
        schedules(), lambda s: broken(World(s).run()),
        settings=settings(max_examples=runs, database=None, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )
    print(found)
    print(World(found).run().problems())


def trace(text: str) -> None:
    names = {k: getattr(sched, k) for k in dir(sched) if not k.startswith("_")}
    schedule = eval(text, names)  # a Schedule(...) as hypothesis prints it
    o = World(schedule, trace=True).run()
    print("\n".join(o.trace or []))
    print(o.problems(), o.cas, o.excused, f"released_in={o.released_in} formed_in={o.formed_in}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fig = sub.add_parser("figures")
    fig.add_argument("--runs", type=int, default=2000)
    fig.add_argument("--seed", type=int, default=1)
    shr = sub.add_parser("shrink")
    shr.add_argument("property", choices=sorted(BROKEN))
    shr.add_argument("--runs", type=int, default=5000)
    tr = sub.add_parser("trace")
    tr.add_argument("schedule")
    args = parser.parse_args(argv)
    if args.cmd == "figures":
        figures(args.runs, args.seed)
    elif args.cmd == "shrink":
        shrink(args.property, args.runs)
    else:
        trace(args.schedule)


if __name__ == "__main__":
    main(sys.argv[1:])
