"""The chosen plan's neighbourhood: step time and throughput as the micro-batching changes.

The landscape (:mod:`pipetrain.reports.landscape`) shows the best of every (p, m) cell; an
engineer tuning a launch asks the narrower question "with this plan, what if I cut the batch into
more or fewer micro-batches, or used bigger ones?". :func:`neighbourhood` answers it with two
curves around the search's best plan, everything else (pp, dp, schedule, virtual stages, pinned
knobs) held:

* ``"microbatches"``: the global batch held, the micro-batch count m swept over the divisors of
  the per-replica batch (the micro-batch size is then the batch / m): the bubble against the
  per-micro-batch cost, the trade-off the planner itself makes;
* ``"microbatch_size"``: m held, the micro-batch size swept (so the global batch changes): how
  throughput grows with bigger micro-batches at a fixed bubble.

Each point is priced as the search priced its candidates: the exact stage split under the memory
caps (with recompute and buffers chosen the same way), then the fast evaluator. A point where no
split fits carries the search's reason instead of a time. Nothing here is simulated in simpy,
so the curves agree with the landscape, not with the chosen plan's simpy confirmation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipetrain.planner.grid import Candidate, spread
from pipetrain.planner.search import Evaluated, SearchResult, _Searcher, _tracer

__all__ = ["AXES", "NeighbourPoint", "neighbourhood"]

#: the two curves, as :class:`NeighbourPoint.axis` names them
AXES = ("microbatches", "microbatch_size")


@dataclass(frozen=True, kw_only=True)
class NeighbourPoint:
    axis: str  # one of AXES
    num_microbatches: int
    micro_batch_size: int
    global_batch: int
    chosen: bool  # the search's best plan
    step_time_s: float | None = None  # None: infeasible (``reason`` says why)
    tokens_per_s: float | None = None
    bubble_fraction: float | None = None
    detail: str = ""  # what the split needed to fit: recomputed stages, fewer buffers than in flight
    reason: str = ""

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if min(self.num_microbatches, self.micro_batch_size, self.global_batch) < 1:
            raise ValueError(f"micro-batches, micro-batch size and global batch must be >= 1: {self}")
        if (self.step_time_s is None) == (not self.reason):
            raise ValueError("a point has either a step time or the reason it has none")


def _sizes_around(b: int, limit: int) -> list[int]:
    """Micro-batch sizes at 1/4 .. 4x of ``b`` (powers of two), within 1..``limit``."""
    return sorted({x for x in (b // 4, b // 2, b, b * 2, b * 4) if 1 <= x <= limit} | {b})


def neighbourhood(res: SearchResult, *, max_points: int = 8, max_microbatch_size: int = 64) -> tuple[NeighbourPoint, ...]:
    """The two curves around ``res.best`` (module docstring), at most ``max_points`` on the first."""
    if res.job is None or res.topology is None:
        raise ValueError("neighbourhood needs the SearchResult of planner.search (it names the job and topology)")
    best = res.best.candidate
    graph_for = res.graph_for or _tracer(res.job)
    job0 = res.job
    out: list[NeighbourPoint] = []

    def key(c: Candidate) -> tuple:
        return (c.pp, c.dp, c.micro_batch_size, c.num_microbatches, c.schedule, c.chunks)

    # the search's own screening of a candidate, where it screened it (the same split and evaluator):
    # a 512-micro-batch schedule costs about a second to build and compile, so this is most of the work
    seen: dict[tuple, Evaluated] = {}
    for e in res.screened:
        seen.setdefault(key(e.candidate), e)
    schedules = res.schedules  # the search's, shared by every searcher below: a schedule does not depend on the batch

    def price(axis: str, c: Candidate, global_batch: int) -> NeighbourPoint:
        chosen = (c.num_microbatches, c.micro_batch_size) == (best.num_microbatches, best.micro_batch_size)

        def point(**result: float | str | None) -> NeighbourPoint:
            return NeighbourPoint(axis=axis, num_microbatches=c.num_microbatches, micro_batch_size=c.micro_batch_size,
                                  global_batch=global_batch, chosen=chosen, **result)  # type: ignore[arg-type]

        if c.schedule == "interleaved" and c.num_microbatches % c.pp:
            return point(reason=f"interleaved needs m a multiple of pp={c.pp}")
        ev = seen.get(key(c)) if global_batch == job0.global_batch else None
        if ev is None:
            s = searchers.get(global_batch)
            if s is None:  # the job at this batch; the search's traced tables and the shared schedules
                job = replace(job0, global_batch=global_batch, microbatches=None, microbatch_size=None)
                s = searchers[global_batch] = _Searcher(job, res.topology, graph_for, res.cost, 1)  # type: ignore[arg-type]
                s.tables.update(res.tables)
                s._schedules = schedules
            n_bad = len(s.infeasible)
            sp = s.split_any(c)
            if sp is None:
                return point(reason=s.infeasible[-1][1] if len(s.infeasible) > n_bad else "no split fits")
            ev = s.screen(sp)
        notes = []
        if any(ev.recompute):
            notes.append(f"recompute on {sum(ev.recompute)} of {len(ev.recompute)} stages")
        if ev.candidate.buffer_level is not None:
            notes.append(f"buffers <= {ev.candidate.buffer_level}")
        return point(step_time_s=ev.fast.step_time_s, tokens_per_s=ev.fast.tokens_per_s,
                     bubble_fraction=ev.fast.bubble_fraction, detail=", ".join(notes))

    searchers: dict[int, _Searcher] = {}
    per = job0.global_batch // best.dp
    sizes = [b for b in range(1, min(per, max_microbatch_size) + 1) if per % b == 0]
    sizes = sorted(set(spread(sizes, max_points)) | {best.micro_batch_size})
    for b in sizes:
        out.append(price("microbatches", replace(best, micro_batch_size=b, num_microbatches=per // b, buffer_level=None),
                         job0.global_batch))
    m = best.num_microbatches
    for b in _sizes_around(best.micro_batch_size, max_microbatch_size):
        out.append(price("microbatch_size", replace(best, micro_batch_size=b, buffer_level=None), best.dp * b * m))
    return tuple(out)
