"""Processor sharing for a compute group: what an OS scheduler does with more runnable ranks than cores.

With ``k`` ranks computing on ``c`` cores, each progresses at ``min(1, c / k)`` of full speed
(egalitarian processor sharing, the fluid model of round-robin time slicing: Kleinrock 1967,
"Time-shared systems: a theoretical treatment", JACM 14(2)), or at a measured ``rate(k)`` (the
same model with a state-dependent service rate: co-running ranks also share caches and memory
bandwidth). An action of ``d`` seconds of compute therefore ends when it has received ``d``
seconds of full-speed work, however many others came and went meanwhile. torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["SharedCores", "shared_finish_times"]

_EPS = 1e-15

Rate = Callable[[int], float]


def _rate_fn(capacity: int | Rate) -> Rate:
    """``rate(k)``: a callable as given, or for ``capacity`` cores the fair share ``min(1, capacity / k)``."""
    if callable(capacity):
        return capacity
    return lambda k: min(1.0, capacity / k) if k > 0 else 1.0


class SharedCores:
    """``run(d)`` returns a simpy event that fires when ``d`` seconds of full-speed work have been done;
    ``rate(k)`` is each job's speed while ``k`` run (default: the fair share of ``capacity`` cores)."""

    def __init__(self, env: Any, capacity: int, rate: Rate | None = None) -> None:
        self.env = env
        self.capacity = capacity
        self.rate = rate or _rate_fn(capacity)
        self.jobs: dict[int, list[Any]] = {}  # id -> [remaining core seconds, event]
        self.last = env.now
        self.generation = 0
        self._next_id = 0

    def _rate(self) -> float:
        return self.rate(len(self.jobs))

    def _advance(self) -> None:
        now = self.env.now
        if self.jobs and now > self.last:
            done = (now - self.last) * self._rate()
            for job in self.jobs.values():
                job[0] -= done
        self.last = now

    def _schedule(self) -> None:
        self.generation += 1
        if not self.jobs:
            return
        first = min(job[0] for job in self.jobs.values())
        gen = self.generation
        wake = self.env.timeout(max(0.0, first) / self._rate())
        wake.callbacks.append(lambda _ev: self._wake(gen))

    def _wake(self, gen: int) -> None:
        if gen != self.generation:  # an arrival or departure rescheduled since
            return
        self._advance()
        for key in [k for k, job in self.jobs.items() if job[0] <= _EPS * max(1.0, self.env.now)]:
            self.jobs.pop(key)[1].succeed()
        self._schedule()

    def run(self, seconds: float) -> Any:
        self._advance()
        ev = self.env.event()
        if seconds <= 0:
            ev.succeed()
            return ev
        self.jobs[self._next_id] = [seconds, ev]
        self._next_id += 1
        self._schedule()
        return ev


def shared_finish_times(starts: list[float], works: list[float], capacity: int | Rate) -> list[float]:
    """When each job ends: job ``i`` needs ``works[i]`` seconds of full-speed work from ``starts[i]``
    on, and the jobs present share ``capacity`` cores (or progress at ``capacity(k)`` each) as
    :class:`SharedCores` does (the fluid model, computed directly: for the analytic end of a step,
    outside simpy)."""
    rate_of = _rate_fn(capacity)
    n = len(starts)
    left = [max(0.0, w) for w in works]
    end = [starts[i] if left[i] <= 0 else math.inf for i in range(n)]
    order = sorted((i for i in range(n) if left[i] > 0), key=lambda i: starts[i])
    active: list[int] = []
    t = starts[order[0]] if order else 0.0
    k = 0
    while k < len(order) or active:
        while k < len(order) and starts[order[k]] <= t + _EPS:
            active.append(order[k])
            k += 1
        if not active:
            t = starts[order[k]]
            continue
        rate = rate_of(len(active))
        least = min(left[i] for i in active)
        done_at = t + least / rate
        nxt = starts[order[k]] if k < len(order) else math.inf
        if nxt < done_at:  # an arrival first: everyone progresses until then
            for i in active:
                left[i] -= (nxt - t) * rate
            t = nxt
            continue
        # the least-remaining jobs finish now (exactly: no rounding residue keeps them alive)
        for i in [i for i in active if left[i] <= least * (1 + 1e-12)]:
            end[i] = done_at
            active.remove(i)
        for i in active:
            left[i] -= least
        t = done_at
    return end
