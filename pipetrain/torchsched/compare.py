"""torch's schedule priced with pipetrain's cost model, beside the plan's own schedule.

Three simulations of one training step (simpy engine), on the same per-stage costs:

* ``torch``: torch's lowered program as its runtime issues it, with torch's receive posts, in the
  chosen receive mode (:data:`pipetrain.program.RECV_MODES`: ``post`` for gloo, ``in-order`` for an
  NCCL stream);
* ``compute_only``: torch's compute order with pipetrain's own SEND/RECV placement and receive
  prefetch (the order's ideal: what the lowering could reach);
* ``own``: the plan's own schedule (or ``--schedule`` with per-stage flags), as pipetrain runs it.

Costs: with per-stage flags, every stage of a rank takes that rank's time over its stages (as
:func:`pipetrain.program.spec.uniform`). With a plan, torch's schedule keeps the plan's stages where
it has as many on the same ranks; otherwise the plan's model is cut into torch's stage count by the
planner's exact min-max partition of forward + backward time (no memory cap; no recompute, which a
split backward excludes). REDUCE_GRAD is priced as the plan's data-parallel all-reduce, started
with each stage's last backward (torch issues it right after); with dp = 1 there is nothing to reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipetrain.costs import CostModel
from pipetrain.errors import TorchScheduleError
from pipetrain.graph import LayerGraph
from pipetrain.plan import Plan
from pipetrain.program import RECV_MODES, SimInput, StageCosts, lower, placement, rank_device_type, sim_input
from pipetrain.program.spec import uniform
from pipetrain.schedules import Schedule, peak_in_flight
from pipetrain.simulator import SimResult, simulate
from pipetrain.topology import Topology
from pipetrain.torchsched.convert import ImportedSchedule

__all__ = ["Comparison", "rank_peak_memory_bytes", "torch_input", "compare", "flag_inputs", "plan_inputs", "recut_ranges"]


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """The three simulations (module docstring) and what was assumed."""

    imported: ImportedSchedule
    recv_mode: str
    torch: SimResult
    compute_only: SimResult
    own: SimResult
    own_name: str
    own_schedule: Schedule
    notes: tuple[str, ...] = ()

    def rows(self) -> list[tuple[str, str, SimResult, Schedule]]:
        """(schedule, how it runs, result, schedule) in the order the command prints them."""
        return [(self.imported.name, f"torch's program, recv {self.recv_mode}", self.torch, self.imported.lowered),
                (self.imported.name, "its compute order, ideal comms", self.compute_only, self.imported.compute_only),
                (self.own_name, "pipetrain's own", self.own, self.own_schedule)]

    def to_dict(self) -> dict[str, object]:
        return {"torch_schedule": self.imported.name, "recv_mode": self.recv_mode, "notes": list(self.notes),
                "dropped": dict(self.imported.dropped), "own_schedule": self.own_name,
                "torch": self.torch.to_dict(events=False, timeline=False),
                "compute_only": self.compute_only.to_dict(events=False, timeline=False),
                "own": self.own.to_dict(events=False, timeline=False),
                "peak_memory_bytes_per_rank": {name: rank_peak_memory_bytes(res, sched) for name, res, sched in
                                               (("torch", self.torch, self.imported.lowered),
                                                ("compute_only", self.compute_only, self.imported.compute_only),
                                                ("own", self.own, self.own_schedule))}}


def rank_peak_memory_bytes(result: SimResult, schedule: Schedule) -> list[float]:
    """Per rank, the peak of its stages' memory summed over time (a V rank holds two stages);
    without a memory timeline (the fast evaluator), the sum of its stages' peaks."""
    if not result.memory_timeline_per_stage:
        return [sum(result.peak_memory_bytes_per_stage[s] for s in schedule.stages_of(r)) for r in range(schedule.num_ranks)]
    out = []
    for r in range(schedule.num_ranks):
        changes: list[tuple[float, int, float]] = []
        for s in schedule.stages_of(r):
            prev = 0.0
            for t, m in result.memory_timeline_per_stage[s]:
                changes.append((t, s, m - prev))
                prev = m
        total = peak = 0.0
        for _, _, delta in sorted(changes):
            total += delta
            peak = max(peak, total)
        out.append(peak)
    return out


def torch_input(ideal: SimInput, imported: ImportedSchedule, recv_mode: str) -> SimInput:
    """``ideal`` (the compute-only schedule's input) turned into torch's program in ``recv_mode``: same stages and links."""
    if recv_mode not in RECV_MODES:
        raise TorchScheduleError(f"--recv-mode {recv_mode!r} is unknown; choose one of {', '.join(RECV_MODES)}")
    return replace(ideal, schedule=imported.lowered, ops=imported.ops, recv_mode=recv_mode)


def compare(imported: ImportedSchedule, ideal: SimInput, own: SimInput, *, recv_mode: str, own_name: str,
            notes: Sequence[str] = ()) -> Comparison:
    """Simulate the three (module docstring); ``ideal`` is priced for ``imported.compute_only``."""
    return Comparison(imported=imported, recv_mode=recv_mode, torch=simulate(torch_input(ideal, imported, recv_mode)),
                      compute_only=simulate(ideal), own=simulate(own), own_name=own_name, own_schedule=own.schedule,
                      notes=tuple(imported.notes) + tuple(notes))


def flag_inputs(imported: ImportedSchedule, own: str | Schedule, *, t_fwd_s: float, t_bwd_s: float, t_wgrad_s: float = 0.0,
                t_comm_s: float = 0.0, chunks: int = 1, micro_batch_size: int = 1, seq_len: int = 1) -> tuple[SimInput, SimInput]:
    """(torch's compute-only input, the own schedule's input) from one rank's per-micro-batch times."""
    sched = imported.compute_only

    def make(schedule: str | Schedule, v: int) -> SimInput:
        return uniform(sched.num_ranks, sched.num_microbatches, schedule, chunks=v, t_fwd_s=t_fwd_s, t_bwd_s=t_bwd_s, t_wgrad_s=t_wgrad_s,
                       t_comm_s=t_comm_s, micro_batch_size=micro_batch_size, seq_len=seq_len)

    return make(sched, 1), make(own, chunks)


def recut_ranges(tables: StageCosts, topology: Topology, plan: Plan, schedule: Schedule) -> tuple[tuple[int, int], ...]:
    """The plan's model cut into ``schedule``'s stages: exact min-max of forward + backward time per stage."""
    from pipetrain.planner.partition import additive_matrix, partition

    g = tables.graph
    place = placement(topology, plan.pp, plan.dp)
    n = g.num_nodes
    if schedule.num_stages > n:
        raise TorchScheduleError(f"{schedule.name} has {schedule.num_stages} stages but the model has {n} blocks: "
                                 "use fewer ranks or stages per rank (--chunks)")
    mats = []
    for s in range(schedule.num_stages):
        f, b, _ = tables.node_times(rank_device_type(topology, place, schedule.stage_to_rank[s]))
        mats.append(additive_matrix(np.asarray(f) + np.asarray(b)))
    zero = np.zeros((n + 1, n + 1))
    cuts = [c.position for c in g.cuts]
    res = partition(n, schedule.num_stages, stage_time=lambda s: mats[s], stage_memory=lambda s: zero,
                    caps=[float("inf")] * schedule.num_stages, allowed_cuts=cuts)
    return res.ranges


def plan_inputs(plan: Plan, imported: ImportedSchedule, *, graph: LayerGraph, topology: Topology,
                cost: CostModel | None = None) -> tuple[SimInput, SimInput, list[str]]:
    """(torch's compute-only input, the plan's own input, notes) for ``plan`` on its model and topology."""
    sched = imported.compute_only
    if sched.num_ranks != plan.pp or sched.num_microbatches != plan.num_microbatches:
        raise TorchScheduleError(f"torch schedule {imported.name} has {sched.num_ranks} ranks and {sched.num_microbatches} "
                                 f"micro-batches, the plan pp={plan.pp} and {plan.num_microbatches}: make them agree")
    own = lower(plan, topology, cost, graph=graph).sim_input
    assert own is not None
    tables = StageCosts(graph, cost, optimizer=plan.optimizer)
    notes: list[str] = []
    same = sched.stage_to_rank == tuple(st.rank for st in plan.stages)
    if same:
        ranges: Sequence[tuple[int, int]] = [(st.block_start, st.block_end) for st in plan.stages]
        recompute = [st.recompute and not sched.split_backward for st in plan.stages]
    else:
        ranges = recut_ranges(tables, topology, plan, sched)
        recompute = [False] * sched.num_stages
        notes.append(f"the plan's {plan.num_stages} stages re-cut into torch's {sched.num_stages} "
                     f"(blocks {[b - a for a, b in ranges]}), balanced on forward + backward time")
    if plan.dp > 1:
        notes.append(f"REDUCE_GRAD priced as the dp={plan.dp} all-reduce, started with each stage's last backward")
    else:
        notes.append("REDUCE_GRAD dropped: dp=1 has nothing to reduce")
    m = sched.num_microbatches
    # torch's stages keep one receive buffer per micro-batch (their recv buffers are per chunk)
    ideal = sim_input(tables=tables, topology=topology, place=placement(topology, plan.pp, plan.dp), schedule=sched,
                      ranges=ranges, buffers=[m] * sched.num_stages, recompute=recompute, in_flight=peak_in_flight(sched),
                      dp_overlap=True)
    return ideal, own, notes
