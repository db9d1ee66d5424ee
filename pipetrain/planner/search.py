"""The planner's outer search: the best :class:`~pipetrain.plan.Plan` for a :class:`Job`.

Decision variables: tensor-parallel width ``tp`` (with sequence parallelism), pipeline depth
``pp``, data-parallel width ``dp``, the ZeRO stage, micro-batch size ``b`` (and so the count
``m = global_batch / (dp * b)``), the schedule (GPipe, 1F1B, interleaved with ``v`` chunks, ZB-H1,
ZB-V, DualPipeV; only the combinations the executor runs unless simulation-only), activation
buffers per stage, recomputation per stage, the stage boundaries and the placement.

How (an integer-aware search, exact on its grid):

1. **Enumerate** the discrete grid of (tp, pp, dp, zero, b, schedule, v, buffer level)
   (:func:`pipetrain.planner.grid.grid`): tp divides a node's GPUs, any pp up to the block
   count with the widest dp that fits (some GPUs may idle), b divides the per-replica batch, v
   is 2 or 4 -- thousands of points for 64 GPUs, visited in order of a bound that needs no
   split (:meth:`_Searcher.bound`) and cut off once it exceeds the k-th best screened step.
   A continuous relaxation
   (e.g. ``scipy.optimize.differential_evolution`` with ``integrality``) would sample the
   same points with no optimality guarantee; enumeration with a bound is exact and cheaper.
   ``method="de"`` runs that DE instead, for comparison (benchmarks/planner_speed.py, and a
   test that branch and bound is never worse).
2. **Inner problem** per point: the exact min-max partition under per-device memory caps
   (:func:`pipetrain.planner.partition.partition`). Recomputation is decided per stage inside
   it: a range runs without recompute when that fits, else with it (recompute only costs
   time, so this is the per-range optimum). Buffers: the schedule's full demand; lower
   levels (4, 2, 1 micro-batches in flight) are tried only when the full one does not fit,
   since fewer buffers never make a step faster.
3. **Bound, then screen** with the simulator's fast longest-path evaluator, in order of a
   lower bound on the step (stage ``k`` cannot start before micro-batch 0 went forward
   through stages ``< k`` and then does ``m`` units of its own work; a rank does ``m`` times
   its stages' work): a point whose bound exceeds the k-th best screened time is skipped.
   Points and splits share one best-first queue, so the splits with the smallest bounds are
   screened first and the cut tightens fastest.
4. **Polish** the top ``k``: a local search moves one block between stages while the fast
   evaluator says the step gets shorter (the bottleneck is a proxy; see :meth:`_Searcher.polish`).
5. **Confirm** them in the simpy simulator (link contention, shared cores, buffer
   back-pressure; skipped for a point whose contention-free time already exceeds the confirmed
   best, since simpy only adds waits); the final plan is simpy's best whose simulated peak
   memory fits every cap (within 0.1% of the fastest, the one needing less memory).

Infeasible points are recorded with their reason; when nothing fits, the error names the
smallest change that would make a plan fit. Torch-free at import (tracing a model by name
imports torch lazily).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipetrain.costs import CostModel
from pipetrain.errors import InfeasibleError, PipetrainError, ScheduleError
from pipetrain.graph import LayerGraph
from pipetrain.planner.build import StageTables, rank_caps
from pipetrain.planner.grid import BUFFER_LEVELS, Candidate, Parallelism, grid
from pipetrain.planner.job import Job
from pipetrain.planner.partition import PartitionInfeasibleError, PartitionResult, evaluate_partition, format_bytes, partition
from pipetrain.program.catalog import (
    RUNNABLE_SCHEDULES,
    auto_schedules,
    executor_supports,
    held_in_flight,
    in_flight_1f1b,
    interleaved_in_flight,
    interleaved_rule,
    zb_h1_held_bounds,
)
from pipetrain.program.lower import Placement, dp_link, placement, rank_device_type, sim_input, tp_link
from pipetrain.program.shard import shard_graph, tp_block
from pipetrain.program.spec import Link
from pipetrain.schedules import SPLIT_BACKWARD_SCHEDULES, Schedule, make_schedule, peak_in_flight, peak_pending_wgrad, stage_ranks
from pipetrain.sharding import collective_time_s, dp_allreduce_bytes_per_param, precision_for_dtype
from pipetrain.simulator import SimInput, SimResult, fast_evaluate, simulate
from pipetrain.topology import DeviceType, Topology, resolve_topology

__all__ = ["Candidate", "Evaluated", "SearchResult", "search", "job_precision"]


@dataclass(frozen=True, kw_only=True)
class Evaluated:
    """A feasible point with its optimal split and its screened (and maybe simulated) step time."""

    candidate: Candidate
    split: PartitionResult
    recompute: tuple[bool, ...]
    buffers: tuple[int, ...]
    in_flight: tuple[int, ...]
    recompute_layers: tuple[int, ...] = ()  # per stage that recomputes: its first that many layers (0: all)
    stage_caps_bytes: tuple[float, ...]  # per (virtual) stage; per rank it is the sum over chunks
    rank_caps_bytes: tuple[float, ...]
    fast: SimResult
    sim: SimResult | None = None
    inp: SimInput | None = field(default=None, repr=False, compare=False)
    state: _Split | None = field(default=None, repr=False, compare=False)  # the search's working data (matrices)

    @property
    def step_time_s(self) -> float:
        return (self.sim or self.fast).step_time_s

    def rank_peaks_bytes(self) -> tuple[float, ...]:
        res = self.sim or self.fast
        c = self.candidate
        out = [0.0] * c.pp
        s2r = stage_ranks(c.schedule, c.pp, c.chunks)
        for s, b in enumerate(res.peak_memory_bytes_per_stage):
            out[s2r[s]] += b
        return tuple(out)

    def fits(self) -> bool:
        return all(p <= c * (1 + 1e-12) for p, c in zip(self.rank_peaks_bytes(), self.rank_caps_bytes))


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    best: Evaluated
    confirmed: tuple[Evaluated, ...]  # simpy-confirmed, best first
    screened: tuple[Evaluated, ...]  # every feasible point, by fast step time
    infeasible: tuple[tuple[str, str], ...]  # (description, reason)
    tables: dict = field(default_factory=dict, repr=False, compare=False)  # b -> StageTables
    topology: Topology | None = field(default=None, repr=False, compare=False)
    job: Job | None = None
    elapsed_s: float = 0.0
    pruned: int = 0
    method: str = "bnb"
    # what the search priced with, so that points beside its best can be priced the same way later
    # (:mod:`pipetrain.planner.neighbourhood`)
    cost: CostModel | None = field(default=None, repr=False, compare=False)
    graph_for: Callable[[int], LayerGraph] | None = field(default=None, repr=False, compare=False)
    # the schedules it built, by (name, p, m, chunks, buffer caps): building and compiling a long one takes seconds
    schedules: dict = field(default_factory=dict, repr=False, compare=False)

    def stage_tables(self, b: int | None = None) -> StageTables:
        """The range matrices the search priced the best plan's parallelism with, at micro-batch size
        ``b`` (default: the best plan's)."""
        c = self.best.candidate
        b = b or c.micro_batch_size
        for key, tab in self.tables.items():
            if key[:4] == (b, c.tp, c.sequence_parallel, c.zero):
                return tab
        raise KeyError(f"the search priced no tables at micro-batch size {b} for {c.describe()}")

    def graph(self, b: int | None = None) -> LayerGraph:
        """The model's layer graph at micro-batch size ``b`` (default: the best plan's), whole: not a
        tensor-parallel rank's view."""
        assert self.graph_for is not None
        return self.graph_for(b or self.best.candidate.micro_batch_size)


#: Micro-batches per pipeline rank beyond which a schedule's in-flight counts stop growing.
SATURATION = 2


class _Searcher:
    def __init__(self, job: Job, topology: Topology, graph_for: Callable[[int], LayerGraph], cost: CostModel | None,
                 top_k: int) -> None:
        self.job, self.topo, self.graph_for, self.cost, self.top_k = job, topology, graph_for, cost, top_k
        self.tables: dict[tuple, StageTables] = {}
        self._tp_links: dict[tuple[int, int, int], Link | None] = {}
        self._bounds: dict[Candidate, float] = {}
        self._dp_links: dict[tuple[int, int, int], Link] = {}
        self.precision = job_precision(job, topology)
        self.infeasible: list[tuple[str, str]] = []
        self.overflows: list[tuple[float, str, PartitionInfeasibleError]] = []
        self._schedules: dict[tuple, Schedule] = {}
        self._cuts: dict[int, list[int]] = {}
        self._layouts: dict[tuple[int, int, int], tuple[Placement, list[DeviceType], list[float]]] = {}

    def tables_for(self, c: Candidate | int) -> StageTables:
        """The range matrices of a candidate: the model at its micro-batch size, as one of its
        tensor-parallel ranks sees it, with its ZeRO stage over its dp (an int: the whole model)."""
        if isinstance(c, int):
            c = Candidate(pp=1, dp=1, micro_batch_size=c, num_microbatches=1, schedule="gpipe")
        link = self.tp_link(c)
        key = (c.micro_batch_size, c.tp, c.sequence_parallel, c.zero, c.dp if c.zero else 1, link)
        if key not in self.tables:
            graph = shard_graph(self.graph_for(c.micro_batch_size), c.tp, sequence_parallel=c.sequence_parallel)
            self.tables[key] = StageTables(graph, self.cost, optimizer=self.job.optimizer, precision=self.precision, zero=c.zero,
                                           dp=c.dp if c.zero else 1, tp_link=link)
        return self.tables[key]

    def layout(self, c: Candidate) -> tuple[Placement, list[DeviceType], list[float]]:
        """The placement of ``c``'s (pp, dp, tp), each pipeline rank's pacing device type and its
        memory cap: the same for every schedule and micro-batch size, so worked out once."""
        key = (c.pp, c.dp, c.tp)
        if key not in self._layouts:
            place = placement(self.topo, c.pp, c.dp, c.tp)
            job = self.job
            self._layouts[key] = (place, [rank_device_type(self.topo, place, r) for r in range(c.pp)],
                                  rank_caps(self.topo, place, max_memory_bytes=job.max_memory_bytes,
                                            max_memory_fraction=job.max_memory_fraction, reserve_bytes=job.memory_reserve_bytes))
        return self._layouts[key]

    def tp_link(self, c: Candidate) -> Link | None:
        key = (c.pp, c.dp, c.tp)
        if key not in self._tp_links:
            self._tp_links[key] = tp_link(self.topo, placement(self.topo, c.pp, c.dp, c.tp)) if c.tp > 1 else None
        return self._tp_links[key]

    def bound(self, c: Candidate) -> float:
        if c not in self._bounds:
            self._bounds[c] = self._bound(c)
        return self._bounds[c]

    def _bound(self, c: Candidate) -> float:
        """A cheap lower bound on ``c``'s step, before any split: a rank does at least 1/pp of a
        micro-batch's work m times, and a schedule with a pipeline bubble (GPipe, 1F1B) adds at
        least (pp - 1) stage times to that -- (m - 1) x the slowest stage + one pass through all
        of them, the slowest stage being at least the mean; interleaving divides the bubble by the
        virtual stages (Narayanan et al. 2021, sec. 2.2), zero-bubble schedules may fill it."""
        tab = self.tables_for(c)
        dt = max(self.layout(c)[1], key=lambda d: d.achievable_flops("bf16"))
        total = float(tab.time_matrix(dt, recompute=False)[0, tab.n])
        bubble = 0.0 if c.schedule in SPLIT_BACKWARD_SCHEDULES else (c.pp - 1) / (c.chunks if c.schedule == "interleaved" else 1)
        # and the data-parallel traffic after the last backward: some rank holds at least 1/pp of the parameters
        return (c.num_microbatches + bubble) * total / c.pp + self.dp_time_s(c, float(tab.params.sum()) / c.pp)

    def dp_time_s(self, c: Candidate, params: float) -> float:
        """The data-parallel collectives of a rank holding ``params`` parameters, as the simulator
        prices them (:func:`pipetrain.sharding.dp_allreduce_bytes_per_param`, one ring over the
        replicas' slowest hop)."""
        if c.dp == 1:
            return 0.0
        key = (c.pp, c.dp, c.tp)
        if key not in self._dp_links:
            self._dp_links[key] = dp_link(self.topo, placement(self.topo, c.pp, c.dp, c.tp))
        per = dp_allreduce_bytes_per_param(zero=c.zero, precision=self.precision, num_microbatches=c.num_microbatches)
        return collective_time_s("all_reduce", params * per, c.dp, self._dp_links[key])

    def _per_stage(self, values: tuple | None, n: int, name: str) -> tuple | None:
        if values is None:
            return None
        if len(values) == 1:
            return tuple(values) * n
        if len(values) != n:
            raise InfeasibleError(f"{name} lists {len(values)} values but the plan has {n} stages; give one value or {n}")
        return tuple(values)

    def schedule(self, c: Candidate, caps: list[int] | None) -> Schedule:
        key = (c.schedule, c.pp, c.num_microbatches, c.chunks, tuple(caps) if caps else None)
        if key not in self._schedules:
            self._schedules[key] = make_schedule(c.schedule, c.pp, c.num_microbatches, c.chunks, buffers=caps)
        return self._schedules[key]

    def in_flight(self, c: Candidate, caps: list[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per stage, the peak micro-batches between F and B (I with a split backward), and with a
        split backward those between I and W, which hold only what W needs
        (:func:`pipetrain.memory.wgrad_held_bytes`): closed forms for GPipe/1F1B, else from the schedule."""
        p, m = c.pp, c.num_microbatches
        none = (0,) * (p * c.chunks)
        if c.schedule == "gpipe":
            if caps and min(caps) < m:
                raise ScheduleError(f"gpipe keeps all {m} micro-batches in flight but a stage has {min(caps)} buffers")
            return (m,) * p, none
        if c.schedule == "1f1b":
            return in_flight_1f1b(p, m, caps), none
        if c.schedule == "interleaved" and m % p == 0 and interleaved_rule() is not None:
            return interleaved_in_flight(p, m, c.chunks), none
        if c.schedule == "zb-h1":  # upper bounds; screen() uses the schedule's own counts
            return zb_h1_held_bounds(p, m, caps)
        # ZB-V and DualPipeV hold no more at any m beyond 2p than at 2p (their steady state repeats;
        # tests/test_search.py checks it for p = 2, 4, 8): the short schedule gives the same counts,
        # without building one of m = 512 micro-batches per point
        sched = self.schedule(replace(c, num_microbatches=min(m, SATURATION * p)), caps)
        return peak_in_flight(sched), (peak_pending_wgrad(sched) if sched.split_backward else none)

    def split(self, c: Candidate) -> _Split | None:
        """Phase A: memory pre-check, then the exact partition; None (reason recorded) if nothing fits."""
        job, S = self.job, c.pp * c.chunks
        tab = self.tables_for(c)
        n = tab.n
        if S > n:
            self.infeasible.append((c.describe(), f"{S} stages but the model has only {n} blocks"))
            return None
        place, rank_types, caps_rank = self.layout(c)
        state = float(tab.model_state[0, n])
        if min(caps_rank) <= 0:
            self.infeasible.append((c.describe(), f"the memory reserve ({format_bytes(self.topo.devices[0].type.memory_bytes)} devices) "
                                    "leaves no memory: lower --memory-reserve"))
            return None
        if state > sum(caps_rank):
            self.infeasible.append((c.describe(), f"pp={c.pp}: weights+grads+optimizer state alone need {format_bytes(state)} "
                                    f"> {c.pp} x {format_bytes(min(caps_rank))}"))
            self.overflows.append((state / sum(caps_rank), c.describe(), PartitionInfeasibleError(
                f"pp={c.pp}: weights+grads+optimizer state need {format_bytes(state / c.pp)} per device "
                f"> {format_bytes(min(caps_rank))}", num_stages=S, stage=0, need_bytes=state / c.pp, cap_bytes=min(caps_rank))))
            return None
        try:
            pinned_buf = self._per_stage(job.buffers, S, "buffers")
            pinned_rec = self._per_stage(job.recompute, S, "recompute")
        except InfeasibleError as exc:
            self.infeasible.append((c.describe(), str(exc)))
            return None
        # the executor's table (program.catalog) says which schedules recompute, and how
        no_recompute = c.schedule in SPLIT_BACKWARD_SCHEDULES or (
            not job.simulation_only and executor_supports(c.schedule, tp=c.tp, zero=c.zero, recompute=c.recompute_mode) is not None)
        if c.schedule in SPLIT_BACKWARD_SCHEDULES and pinned_rec is not None and any(pinned_rec):
            self.infeasible.append((c.describe(), f"{c.schedule} splits the backward into input- and weight-gradient passes, "
                                    "which does not combine with recompute: unpin recompute, or pin another schedule"))
            return None
        caps = list(pinned_buf) if pinned_buf else ([c.buffer_level] * S if c.buffer_level else None)
        try:
            inflight, wheld = self.in_flight(c, caps)
        except ScheduleError as exc:
            self.infeasible.append((c.describe(), str(exc)))
            return None
        buffers = tuple(pinned_buf) if pinned_buf else tuple(max(1, k) for k in inflight)
        s2r = stage_ranks(c.schedule, c.pp, c.chunks)
        dts = [rank_types[s2r[st]] for st in range(S)]
        caps_stage = [caps_rank[s2r[st]] / c.chunks for st in range(S)]
        mode = c.recompute_mode
        tm, mm, rec_choice, layer_choice = [], [], [], []
        for st in range(S):
            inf = max(1, inflight[st])
            t0 = tab.time_matrix(dts[st], recompute=False)
            m0 = tab.memory_matrix(in_flight=inf, buffers=buffers[st], recompute=False, wgrad_held=wheld[st])
            zeros = np.zeros(m0.shape, dtype=int)
            if no_recompute or (pinned_rec is not None and not pinned_rec[st]):
                tm.append(t0)
                mm.append(m0)
                rec_choice.append(zeros.astype(bool))
                layer_choice.append(zeros)
                continue
            if pinned_rec is not None or mode == "selective":  # pinned: every layer; selective: every layer's core
                lay, t1 = zeros, tab.time_matrix(dts[st], recompute=mode)
                m1 = tab.memory_matrix(in_flight=inf, buffers=buffers[st], recompute=mode)
            else:  # the fewest leading layers that fit (Megatron's --recompute-num-layers)
                lay, t1, m1 = tab.partial_recompute(dts[st], in_flight=inf, buffers=buffers[st], cap=caps_stage[st])
            if pinned_rec is not None:
                tm.append(t1)
                mm.append(m1)
                rec_choice.append(np.ones(m0.shape, dtype=bool))
                layer_choice.append(lay)
            else:
                use1 = m0 > caps_stage[st]
                tm.append(np.where(use1, t1, t0))
                mm.append(np.where(use1, m1, m0))
                rec_choice.append(use1)
                layer_choice.append(np.where(use1, lay, 0))
        try:
            if job.boundaries is not None:
                if len(job.boundaries) != S - 1:
                    raise InfeasibleError(f"boundaries {list(job.boundaries)} give {len(job.boundaries) + 1} stages but "
                                          f"{c.describe()} has {S}")
                if job.boundaries[-1] >= n:
                    raise InfeasibleError(f"boundaries {list(job.boundaries)}: the model has blocks 0..{n - 1}")
                sp = evaluate_partition(job.boundaries, num_blocks=n, stage_time=lambda k: tm[k],
                                        stage_memory=lambda k: mm[k], caps=caps_stage)
            else:
                sp = partition(n, S, stage_time=lambda k: tm[k], stage_memory=lambda k: mm[k], caps=caps_stage,
                               allowed_cuts=self.cuts(tab))
        except PartitionInfeasibleError as exc:
            reason = str(exc) + (f" (cap per chunk = rank cap / {c.chunks})" if c.chunks > 1 else "")
            self.infeasible.append((c.describe(), reason))
            self.overflows.append((exc.overflow_ratio, c.describe(), exc))
            return None
        except InfeasibleError as exc:
            self.infeasible.append((c.describe(), str(exc)))
            return None
        rec = tuple(bool(rec_choice[k][a, b]) for k, (a, b) in enumerate(sp.ranges))
        fwd = [float(tab.node_times(dts[k])[0][a:b].sum()) for k, (a, b) in enumerate(sp.ranges)]
        # the input-gradient part of each stage's backward: what must flow back through stages < k
        back = [float((tab.node_times(dts[k])[1][a:b] - tab.node_times(dts[k])[2][a:b]).sum())
                for k, (a, b) in enumerate(sp.ranges)]
        m = c.num_microbatches
        per_rank = [0.0] * c.pp
        for k, t in enumerate(sp.stage_times_s):
            per_rank[s2r[k]] += t
        # Stage k cannot start before micro-batch 0 has gone forward through stages < k, and does
        # m units of its own work; after its last micro-batch's input gradient (all its work but
        # that micro-batch's deferred W, with a split backward; all of it otherwise), that gradient
        # still goes back through stages < k. A lower bound on any schedule's makespan (so is every
        # rank's work): for equal stages, 1F1B's own (m + p - 1) stage times.
        wg = [float(tab.node_times(dts[k])[2][a:b].sum()) for k, (a, b) in enumerate(sp.ranges)]
        tail = [t - (wg[k] if c.schedule in SPLIT_BACKWARD_SCHEDULES else 0.0) for k, t in enumerate(sp.stage_times_s)]
        lb = max(max(sum(fwd[:k]) + (m - 1) * t + tail[k] + sum(back[:k]) for k, t in enumerate(sp.stage_times_s)),
                 m * max(per_rank))
        rank_params = [0.0] * c.pp
        for k, (a, b) in enumerate(sp.ranges):
            rank_params[s2r[k]] += float(tab.stage_params[a, b])
        lb += self.dp_time_s(c, max(rank_params))  # after the rank's last backward (no overlap: the simulator's default)
        return _Split(candidate=c, place=place, split=sp, recompute=rec, buffers=buffers, in_flight=tuple(inflight),
                      caps=caps, stage_caps=tuple(caps_stage), rank_caps=tuple(caps_rank), lower_bound_s=lb,
                      time_mats=tm, mem_mats=mm, rec_mats=rec_choice, layer_mats=layer_choice)

    def split_any(self, c: Candidate) -> _Split | None:
        """:meth:`split`, and when the schedule's full buffer demand does not fit, fewer buffers."""
        sp = self.split(c)
        if sp is None and self.job.buffers is None and c.schedule in ("1f1b", "zb-h1"):
            for level in BUFFER_LEVELS:  # fewer buffers: less memory, never faster
                if level < min(c.pp, c.num_microbatches):
                    sp = self.split(replace(c, buffer_level=level))
                    if sp is not None:
                        break
        return sp

    def selective_twin(self, sp: _Split) -> _Split | None:
        """The same point with selective instead of full recompute, where ``sp`` recomputes, the
        granularity is not pinned and the executor runs it: recomputing every layer's attention core
        costs less time than whole layers and may fit where whole layers were needed (Korthikanti et
        al. 2023, sec. 5). None otherwise."""
        c = sp.candidate
        job = self.job
        if not any(sp.recompute) or c.recompute_mode != "full" or job.recompute_mode or job.recompute is not None or (
                not job.simulation_only and executor_supports(c.schedule, tp=c.tp, zero=c.zero, recompute="selective")):
            return None  # (recompute pinned on without a granularity: whole layers, as plans always meant it)
        if not self.tables_for(c).dropped.any():
            return None  # no layer keeps an attention core to drop (no layer shapes, or nothing beyond Q, K, V)
        # at the same buffer level: with fewer buffers the point needs no recompute, and the full
        # twin's own search of the buffer levels finds that plan
        twin = self.split(replace(c, recompute_mode="selective"))
        return twin if twin is not None and any(twin.recompute) else None

    def cuts(self, tab: StageTables) -> list[int]:
        key = id(tab)
        if key not in self._cuts:
            self._cuts[key] = list(tab.legal_cuts)
        return self._cuts[key]

    def screen(self, sp: _Split, split: PartitionResult | None = None) -> Evaluated:
        """Phase B: build the simulator input of ``split`` (default: the exact one) and run the fast evaluator."""
        c = sp.candidate
        split = split or sp.split
        rec = tuple(bool(sp.rec_mats[k][a, b]) for k, (a, b) in enumerate(split.ranges))
        # a stage recomputing its first k of its b - a layers; k = b - a is all of them (0 in the plan)
        layers = tuple(int(sp.layer_mats[k][a, b]) % (b - a) if rec[k] else 0 for k, (a, b) in enumerate(split.ranges))
        tab = self.tables_for(c)
        sched = self.schedule(c, sp.caps)
        held, buffers = sp.in_flight, sp.buffers
        if sched.split_backward:  # planned with a bound: the exact counts of this schedule now
            held = held_in_flight(sched)
            if self.job.buffers is None:
                buffers = tuple(max(1, k) for k in peak_in_flight(sched))
        inp = sim_input(tables=tab, topology=self.topo, place=sp.place, schedule=sched, ranges=split.ranges,
                        buffers=buffers, recompute=rec, in_flight=held, recompute_mode=c.recompute_mode, recompute_layers=layers)
        return Evaluated(candidate=c, split=split, recompute=rec, recompute_layers=layers, buffers=buffers, in_flight=held,
                         stage_caps_bytes=sp.stage_caps, rank_caps_bytes=sp.rank_caps, fast=fast_evaluate(inp), inp=inp,
                         state=sp)

    def polish(self, ev: Evaluated, max_actions: float) -> Evaluated:
        """Local search around the min-max split, judged by the fast evaluator (first improvement).

        The bottleneck objective is a proxy: 1F1B's steady state also couples neighbouring
        stages (a B waits for the next stage's B, an F for the previous stage's F), and the
        gradient all-reduce and optimizer step grow with a stage's parameters. So a nearby split
        -- one block moved from one stage to another, still within every cap -- can simulate
        faster. Stops at a local optimum or after ``max_actions`` simulated actions.
        """
        sp = ev.state
        if self.job.boundaries is not None or sp is None or sp.candidate.pp * sp.candidate.chunks < 2:
            return ev
        n, S = sp.split.num_blocks, len(sp.split.ranges)
        allowed = set(self.cuts(self.tables_for(sp.candidate)))
        per_eval = max(1, ev.fast.num_compute_actions)
        budget = int(max_actions // per_eval)
        best, tried = ev, set()
        improved = True
        while improved and budget > 0:
            improved = False
            bounds = list(best.split.boundaries)
            nbound = len(bounds)
            # moves: shift boundaries i..j by one block (i == j: one boundary; else one block hops from
            # stage i to stage j+1 or back), shortest spans first
            moves = [(i, i + span, d) for span in range(nbound) for i in range(nbound - span) for d in (-1, 1)]
            for i, j, d in moves:
                nb = bounds.copy()
                for k in range(i, j + 1):
                    nb[k] += d
                edges = (0, *nb, n)
                if (tuple(nb) in tried or any(nb[k] not in allowed for k in range(i, j + 1))
                        or any(a >= b for a, b in zip(edges, edges[1:]))):
                    continue
                if any(sp.mem_mats[k][edges[k], edges[k + 1]] > sp.stage_caps[k] for k in range(S)):
                    continue
                tried.add(tuple(nb))
                split = evaluate_partition(nb, num_blocks=n, stage_time=lambda k: sp.time_mats[k],
                                           stage_memory=lambda k: sp.mem_mats[k], caps=sp.stage_caps)
                cand = self.screen(sp, split)
                budget -= 1
                if cand.fast.step_time_s < best.fast.step_time_s * (1 - 1e-9):
                    best, improved = cand, True
                    break
                if budget <= 0:
                    break
        return best


@dataclass(frozen=True, kw_only=True)
class _Split:
    candidate: Candidate
    place: Placement
    split: PartitionResult
    recompute: tuple[bool, ...]
    buffers: tuple[int, ...]
    in_flight: tuple[int, ...]
    caps: list[int] | None
    stage_caps: tuple[float, ...]
    rank_caps: tuple[float, ...]
    lower_bound_s: float
    time_mats: list = field(default_factory=list, repr=False)
    mem_mats: list = field(default_factory=list, repr=False)
    rec_mats: list = field(default_factory=list, repr=False)
    layer_mats: list = field(default_factory=list, repr=False)  # recompute_layers per range (0: all)


def search(job: Job, *, graph_for: Callable[[int], LayerGraph] | None = None, topology: Topology | None = None,
           cost: CostModel | None = None, top_k: int = 3, max_microbatch_size: int = 32, max_sizes: int = 6,
           explain: bool = True, polish_actions: float = 2e6, method: str = "bnb") -> SearchResult:
    """Search the best plan for ``job`` (see module docstring); raise InfeasibleError when nothing fits.

    ``graph_for(b)`` returns the layer graph at micro-batch size ``b`` (default: trace ``job.model``);
    ``explain`` False skips working out the smallest fix when nothing fits (used for that work itself);
    ``polish_actions`` bounds the local search around the top splits (simulated actions, all of them);
    ``method`` "bnb" (default: exhaustive with the lower bound, exact on the grid) or "de" (scipy's
    differential evolution over the grid's integer coordinates, for comparison; see :func:`_de_screen`).
    """
    with _gc_paused():
        return _search(job, graph_for=graph_for, topology=topology, cost=cost, top_k=top_k, max_microbatch_size=max_microbatch_size,
                       max_sizes=max_sizes, explain=explain, polish_actions=polish_actions, method=method)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """CPython's cyclic collector paused for the search. The search allocates millions of small,
    acyclic objects (a 64-rank schedule of 1024 micro-batches holds half a million actions), and
    every few hundred allocations the collector rescans the young ones, and now and then all of
    them: a large share of the search's CPU time (benchmarks/RESULTS.md). Nothing
    is leaked: reference counting frees the acyclic objects, and the collector, switched back on
    afterwards, finds any cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _search(job: Job, *, graph_for: Callable[[int], LayerGraph] | None, topology: Topology | None, cost: CostModel | None,
            top_k: int, max_microbatch_size: int, max_sizes: int, explain: bool, polish_actions: float, method: str) -> SearchResult:
    t0 = time.perf_counter()
    topo = topology or resolve_topology(job.topology)
    if graph_for is None:
        graph_for = _tracer(job)
    allowed = RUNNABLE_SCHEDULES
    if job.schedule and job.schedule not in allowed and not job.simulation_only:
        raise InfeasibleError(f"schedule {job.schedule!r} is simulation-only (the executor runs {', '.join(allowed)}): "
                              f"add --simulation-only (simulation_only: true) for a what-if, or pick one of those")
    s = _Searcher(job, topo, graph_for, cost, top_k)
    base = graph_for(job.microbatch_size or 1)
    n_blocks = base.num_nodes
    # CPU ranks whose costs lack the executor's measured overheads: see grid.AUTO_SCHEDULES
    kind = "cpu" if all(d.type.kind == "cpu" for d in topo.devices) and not getattr(cost, "models_executor_overhead", False) else "gpu"
    par = _parallelism(job, topo, base, kind)
    points, bad = grid(job, topo.num_devices, n_blocks, auto_schedules(allowed, kind), max_microbatch_size, max_sizes, par)
    points, refused = _runnable(job, points)
    s.infeasible.extend(bad)
    if not points and refused:
        raise InfeasibleError(f"no plan fits: {refused[0][0]}: {refused[0][1]}")
    if method == "de":
        screened, evaluated = _de_screen(s, points, seed=job.seed)
        pruned = len(points) - evaluated
        if not screened:
            raise _nothing_fits(job, s, explain)
    elif method == "bnb":
        # Best first over two kinds of entries: grid points keyed by a bound that needs no split,
        # and their splits keyed by the split's own (tighter) bound. The smallest key is taken
        # next: a point is split (phase A), a split screened by the fast evaluator (phase B). Once
        # the smallest key exceeds the k-th best screened step, nothing left can enter the top k.
        # Screening the most promising splits first tightens that cut fastest (a schedule of 1024
        # micro-batches costs a second to build and compile).
        order = sorted(points, key=lambda c: (s.bound(c), c))
        heap: list[tuple[float, int, int, Any]] = [(s.bound(c), 0, i, c) for i, c in enumerate(order)]
        heapq.heapify(heap)
        tie = itertools.count(len(order))
        screened = []
        pruned = 0
        while heap:
            kth = sorted(e.fast.step_time_s for e in screened)[top_k - 1] if len(screened) >= top_k else math.inf
            if heap[0][0] > kth:
                pruned = len(heap)
                break
            key, entry, _, item = heapq.heappop(heap)
            if entry == 1:
                screened.append(s.screen(item))
                continue
            first = s.split_any(item)  # the exact split under the memory caps
            if first is None:
                continue
            for sp in (first, s.selective_twin(first)):
                if sp is not None:
                    heapq.heappush(heap, (max(key, sp.lower_bound_s), 1, next(tie), sp))
        if not screened:
            raise _nothing_fits(job, s, explain)
    else:
        raise ValueError(f"method must be 'bnb' or 'de', got {method!r}")
    screened.sort(key=lambda e: (e.fast.step_time_s, e.candidate))
    top = screened[:max(1, top_k)]
    top = sorted((s.polish(ev, polish_actions / len(top)) for ev in top), key=lambda e: (e.fast.step_time_s, e.candidate))
    confirmed: list[Evaluated] = []
    best_sim = math.inf
    for ev in top:
        # simpy only adds waits (contention, shared compute, back-pressure) to the longest path, so a
        # point whose contention-free time already exceeds the confirmed best cannot win
        if ev.fast.step_time_s > best_sim * 1.001:  # (0.1%: the tie band of the final choice)
            continue
        assert ev.inp is not None  # screened points keep their input until here
        sim = simulate(ev.inp)
        done = replace(ev, sim=sim, state=None)
        confirmed.append(done)
        if done.fits():
            best_sim = min(best_sim, sim.step_time_s)
    screened = [replace(e, state=None, inp=None) for e in screened]  # drop the working matrices
    fitting = [e for e in confirmed if e.fits()]
    for e in confirmed:
        if not e.fits():
            worst = max(range(e.candidate.pp), key=lambda r: e.rank_peaks_bytes()[r] / e.rank_caps_bytes[r])
            s.infeasible.append((e.candidate.describe(), f"simulated peak of rank {worst} "
                                 f"{format_bytes(e.rank_peaks_bytes()[worst])} > {format_bytes(e.rank_caps_bytes[worst])}"))
    if not fitting:
        raise _nothing_fits(job, s, explain)
    fastest = min(e.step_time_s for e in fitting)  # confirmed: the simulated time
    # within 0.1% of the fastest (a tie, given the model's accuracy) the plan needing less memory wins
    fitting.sort(key=lambda e: (math.floor((e.step_time_s / fastest - 1.0) * 1000), max(e.rank_peaks_bytes()), e.step_time_s, e.candidate))
    return SearchResult(best=fitting[0], confirmed=tuple(fitting), screened=tuple(screened), infeasible=tuple(s.infeasible),
                        tables=s.tables, topology=topo, job=job, elapsed_s=time.perf_counter() - t0, pruned=pruned,
                        method=method, cost=cost, graph_for=graph_for, schedules=s._schedules)


def _de_screen(s: _Searcher, points: list[Candidate], *, seed: int) -> tuple[list[Evaluated], int]:
    """Screen the grid with ``scipy.optimize.differential_evolution`` (``integrality``) instead.

    Coordinates: index of pp, of the micro-batch size and of the (schedule, chunks) option;
    the objective is the fast evaluator's step time of the point's exact split (1e30 where the
    point is off the grid or does not fit), memoised. Kept to compare with branch and bound:
    on these grids DE samples most points and has no optimality guarantee (see planner_speed).
    """
    from scipy.optimize import differential_evolution

    pps = sorted({c.pp for c in points})
    sizes = sorted({c.micro_batch_size for c in points})
    kinds = sorted({(c.schedule, c.chunks) for c in points})
    index = {(c.pp, c.micro_batch_size, (c.schedule, c.chunks)): c for c in points}
    cache: dict[Candidate, Evaluated | None] = {}

    def objective(x: np.ndarray) -> float:
        c = index.get((pps[int(round(x[0]))], sizes[int(round(x[1]))], kinds[int(round(x[2]))]))
        if c is None:
            return 1e30
        if c not in cache:
            sp = s.split_any(c)
            cache[c] = s.screen(sp) if sp is not None else None
        ev = cache[c]
        return ev.fast.step_time_s if ev is not None else 1e30

    bounds = [(0, len(pps) - 1), (0, len(sizes) - 1), (0, len(kinds) - 1)]
    if all(hi > lo for lo, hi in bounds):
        differential_evolution(objective, bounds, integrality=[True] * 3, seed=seed, popsize=4, maxiter=10, tol=0.0,
                               polish=False, updating="immediate")
    else:  # a degenerate axis: DE needs a range on every one; evaluate the (tiny) grid
        for c in points:
            objective(np.array([pps.index(c.pp), sizes.index(c.micro_batch_size), kinds.index((c.schedule, c.chunks))]))
    return [e for e in cache.values() if e is not None], len(cache)


def job_precision(job: Job, topology: Topology) -> str:
    """The job's precision: its own, else on GPUs bf16 working weights with fp32 master weights
    and gradients (Megatron's and torchtitan's layout), else what the dtype meant for the executor."""
    if job.precision is not None:
        return job.precision
    if job.dtype != "fp32" and all(d.type.kind == "gpu" for d in topology.devices):
        return "bf16-mixed"
    return precision_for_dtype(job.dtype)


def _gpus_per_node(topology: Topology) -> int:
    counts: dict[int, int] = {}
    for d in topology.devices:
        counts[d.node] = counts.get(d.node, 0) + 1
    return min(counts.values())


def _parallelism(job: Job, topology: Topology, graph: LayerGraph, device_kind: str) -> Parallelism:
    """The tp, sequence-parallel, ZeRO and recompute-granularity values the search tries.

    tp: the divisors of a node's GPU count that split the model's heads and MLP (Megatron keeps a
    tp group inside a node, where its per-layer collectives run over NVLink), on GPUs, for models
    whose blocks the executor splits (not Hugging Face modules, unless simulation-only); CPU ranks
    only when pinned. Sequence parallelism with every tp > 1: it moves the same bytes as tp alone
    and keeps less memory and element-wise work (Korthikanti et al. 2023, sec. 4.2.2); without it
    for post-LN models (BERT), which the executor splits without it. ZeRO 0 and 1
    (Megatron's distributed optimizer) where dp > 1; 2 and 3, which pipeline engines do not
    combine with pipelining, only for what-ifs. Recompute: whole layers (as few as fit), or the
    attention core of every layer (selective), whichever the search finds faster."""
    if job.tp is not None:
        tps: tuple[int, ...] = (job.tp,)
    elif device_kind == "gpu" and (job.simulation_only or _spec_allows(job.model, "tensor_parallel")):
        per = _gpus_per_node(topology)
        tps = tuple(t for t in range(1, per + 1) if per % t == 0 and tp_block(graph, t) is None)
    else:
        tps = (1,)
    if job.sequence_parallel is not None:
        sp: tuple[bool, ...] = (job.sequence_parallel,)
    else:  # (the grid tries sp only where tp > 1: no model look-up otherwise)
        sp = (max(tps) == 1 or _spec_allows(job.model, "sequence_parallel"),)
    if job.zero is not None:
        zeros: tuple[int, ...] = (job.zero,)
    else:
        zeros = (0, 1, 2, 3) if job.simulation_only else (0, 1)
    # the grid holds one granularity; unpinned, the search tries the selective twin of each point
    # that needs recompute (_Searcher.selective_twin)
    modes: tuple[str, ...] = (job.recompute_mode,) if job.recompute_mode else ("full",)
    return Parallelism(tps=tps, sequence_parallel=sp, zeros=zeros, recompute_modes=modes)


def _spec_allows(model: str, what: str) -> bool:
    """Whether the executor splits the model's blocks so (its spec's ``tensor_parallel`` or
    ``sequence_parallel``: not Hugging Face modules over tp, not BERT's post-LN blocks over the
    sequence). A model the zoo cannot name (a graph given directly) is assumed to allow both, as
    the activation model assumes a pre-LN layer."""
    from pipetrain.errors import ModelError
    from pipetrain.planner.zoo import get_model_spec

    try:
        return bool(getattr(get_model_spec(model), what))
    except ModelError:
        return True


def _runnable(job: Job, points: list[Candidate]) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """The points the executor runs (:func:`pipetrain.program.catalog.executor_supports`); all of
    them for a simulation-only job. A recompute granularity the executor lacks is checked when
    a stage recomputes (:meth:`_Searcher.split`)."""
    if job.simulation_only:
        return points, []
    keep, refused = [], []
    for c in points:
        why = executor_supports(c.schedule, tp=c.tp, zero=c.zero)
        if why is None:
            keep.append(c)
        else:
            refused.append((c.describe(), why))
    return keep, refused


def _tracer(job: Job) -> Callable[[int], LayerGraph]:
    cache: dict[int, LayerGraph] = {}

    def graph_for(b: int) -> LayerGraph:
        if b not in cache:
            from pipetrain.planner.trace import trace_graph

            cache[b] = trace_graph(job.model, micro_batch_size=b, seq_len=job.seq_len, dtype=job.dtype)
        return cache[b]

    return graph_for


def _nothing_fits(job: Job, s: _Searcher, explain: bool) -> InfeasibleError:
    """The smallest change that would make a plan fit: an unpinned knob, or the memory it needs."""
    hints: list[str] = []
    for knob, value in job.pinned.items() if explain else ():
        if knob == "boundaries":
            continue
        try:
            free: dict[str, Any] = {knob: None}
            trial = search(replace(job, **free), graph_for=s.graph_for, topology=s.topo, cost=s.cost, top_k=1,
                           explain=False)
        except PipetrainError:
            continue
        hints.append(f"unpin {knob} (={_fmt(value)}): {trial.best.candidate.describe()} fits")
    if s.overflows:
        ratio, desc, exc = min(s.overflows, key=lambda o: (o[0], o[1]))
        if math.isfinite(ratio):
            phys = min(d.type.memory_bytes for d in s.topo.devices)
            limited = job.max_memory_bytes is not None or job.max_memory_fraction is not None
            if limited and exc.need_bytes <= phys:
                fix = f"raise max_memory to at least {format_bytes(exc.need_bytes)}"
            else:
                fix = (f"it needs {ratio:.2f}x the memory: use devices with >= {format_bytes(exc.need_bytes)} "
                       f"or about {math.ceil(ratio * s.topo.num_devices)} devices")
            if job.recompute is not None and not all(job.recompute):
                fix += ", or allow recompute"
            hints.append(f"closest is {desc}: {exc}; {fix}")
    if not s.overflows and s.infeasible:  # no memory figure to give: say why the first point failed
        hints.insert(0, s.infeasible[0][0] + ": " + s.infeasible[0][1])
    return InfeasibleError("no plan fits: " + ("; ".join(hints[:3]) if hints else "no candidate configuration"))


def _fmt(v: object) -> str:
    if isinstance(v, tuple):
        return ",".join(str(x).lower() for x in v)
    return str(v)
