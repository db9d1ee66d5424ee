"""Simulator speed: compute actions per second on 1F1B, p=64, m=1024 (131,072 F/B actions).

Measured in one run, interleaved, each the median of ``--repeats``:

* ``naive``: a deliberately straightforward simpy model written here — one simpy process per
  compute action, waiting on events of its rank predecessor and of its data dependency (plus a
  timeout for the transfer latency). The baseline the issue refers to (~30k actions/s).
* ``simpy``: :func:`pipetrain.simulator.simulate` (one process per rank over plain op tuples),
  on a fresh schedule object each time, so lowering the schedule is included.
* ``fast cold``: :func:`pipetrain.simulator.fast_evaluate` on a fresh schedule object (compiling
  the DAG included); ``fast warm``: the same schedule again (compiled DAG cached), the planner's
  case when it screens many cost variants of one schedule.

All three must give the same step time (checked). Targets: simpy >= 60,000 actions/s, fast
>= 1,000,000 actions/s. Reproduce:

    .venv/bin/python benchmarks/sim_speed.py [--stages 64] [--microbatches 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import simpy

from pipetrain.schedules import Schedule, one_f_one_b
from pipetrain.simulator import SimInput, fast_evaluate, simulate, uniform

__all__ = ["naive_simpy", "main"]

SIMPY_TARGET = 60_000
FAST_TARGET = 1_000_000


def naive_simpy(inp: SimInput) -> float:
    """One simpy process per compute action; returns the makespan (contention-free model)."""
    sched: Schedule = inp.schedule
    env = simpy.Environment()
    last = sched.num_stages - 1
    lat_f = [b.link.latency_s for b in inp.boundaries]
    lat_b = [b.bwd_link.latency_s for b in inp.boundaries]  # type: ignore[union-attr]
    done: dict[tuple[int, str, int], simpy.Event] = {}
    end: dict[tuple[int, str, int], float] = {}
    for acts in sched.actions:
        for a in acts:
            if a.is_compute:
                done[(a.stage, a.kind, a.microbatch)] = env.event()

    def action(key: tuple[int, str, int], prev: tuple[int, str, int] | None, dep: tuple[int, str, int] | None,
               delay: float, dur: float):  # type: ignore[no-untyped-def]
        if prev is not None:
            yield done[prev]
        if dep is not None:
            yield done[dep]
            wait = end[dep] + delay - env.now
            if wait > 0:
                yield env.timeout(wait)
        yield env.timeout(dur)
        end[key] = env.now
        done[key].succeed()

    for acts in sched.actions:
        prev = None
        for a in acts:
            if not a.is_compute:
                continue
            s, kind, k = a.stage, a.kind, a.microbatch
            dep, delay = None, 0.0
            if kind == "F" and s > 0:
                dep, delay = (s - 1, "F", k), lat_f[s - 1]
            elif kind == "B" and s < last:
                dep, delay = (s + 1, "B", k), lat_b[s]
            key = (s, kind, k)
            env.process(action(key, prev, dep, delay, inp.stages[s].duration_s(kind, sched.split_backward)))
            prev = key
    env.run()
    return max(end.values())


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    p, m = args.stages, args.microbatches
    kw = dict(t_fwd_s=1e-3, t_bwd_s=2e-3, t_comm_s=1e-4)

    def fresh() -> SimInput:
        return uniform(p, m, one_f_one_b(p, m), **kw)  # type: ignore[arg-type]

    t0 = time.perf_counter()
    n = fresh().schedule.num_compute_actions
    t_build = time.perf_counter() - t0
    warm_inp = fresh()
    fast_evaluate(warm_inp)  # compile once for the warm case
    times: dict[str, list[float]] = {"naive": [], "simpy": [], "fast cold": [], "fast warm": []}
    steps: dict[str, float] = {}
    for _ in range(args.repeats):
        # inputs are built outside the timed calls, each on a fresh schedule object (no cache)
        a, b, c = fresh(), fresh(), fresh()
        # the lambdas run within this iteration (late binding is harmless)
        for name, fn in (("naive", lambda: naive_simpy(a)),  # noqa: B023
                         ("simpy", lambda: simulate(b).step_time_s),  # noqa: B023
                         ("fast cold", lambda: fast_evaluate(c).step_time_s),  # noqa: B023
                         ("fast warm", lambda: fast_evaluate(warm_inp).step_time_s)):
            dt, step = _timed(fn)
            times[name].append(dt)
            steps[name] = step
    want = (m + p - 1) * 3e-3
    ok_steps = all(math.isclose(v, steps["simpy"], rel_tol=1e-9) for v in steps.values())
    print(f"1F1B p={p} m={m}: {n} compute actions; building the schedule took {t_build:.2f} s")
    print(f"step time: simpy {steps['simpy']:.6f} s, fast {steps['fast cold']:.6f} s, naive {steps['naive']:.6f} s "
          f"(all equal: {ok_steps}; no-latency closed form {want:.6f} s)")
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"{'evaluator':<10} {'median s':>9} {'actions/s':>12} {'x naive':>8}")
    for k in times:
        print(f"{k:<10} {statistics.median(times[k]):>9.3f} {rate[k]:>12,.0f} {rate[k] / rate['naive']:>8.2f}")
    ok = rate["simpy"] >= SIMPY_TARGET and rate["fast warm"] >= FAST_TARGET and ok_steps
    print(f"targets: simpy >= {SIMPY_TARGET:,} ({'met' if rate['simpy'] >= SIMPY_TARGET else 'MISSED'}), "
          f"fast >= {FAST_TARGET:,} warm ({'met' if rate['fast warm'] >= FAST_TARGET else 'MISSED'}), "
          f"cold {rate['fast cold']:,.0f}")
    print(f"reproduce: .venv/bin/python benchmarks/sim_speed.py --stages {p} --microbatches {m} --repeats {args.repeats}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
