"""The what-if model behind ``pipetrain ui``: a plan, its knobs, and one evaluation per edit.

A :class:`WhatIf` holds what does not change while the page is open (the plan the ui was given,
its layer graph, topology and cost model). Each edit of the page is a :class:`Knobs` value
(micro-batch count, schedule, stage boundaries, buffers and recompute per stage);
:meth:`WhatIf.evaluate` turns it into the edited :class:`~pipetrain.plan.Plan`, lowers it with
the one lowering (:func:`pipetrain.program.lower`), simulates it and checks every stage's memory
against its cap with :mod:`pipetrain.memory`. A mistake in the edit (a boundary out of range,
buffers fewer than the schedule keeps in flight, a stage over its memory cap) comes back as the
reason the planner or the lowering gives, for the page to show beside the knob.

Torch-free: the layer graph comes from the caller (``commands/ui.py`` traces it, or a graph
JSON written by ``pipetrain graph MODEL --json PATH``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from pipetrain.costs import CostModel
from pipetrain.errors import ConfigError, InfeasibleError, PipetrainError, PlanError
from pipetrain.graph import LayerGraph
from pipetrain.memory import check_stage_memory
from pipetrain.plan import Plan, PredictedMetrics
from pipetrain.planner.build import rank_caps
from pipetrain.planner.explain import stage_tensors
from pipetrain.program import RUNNABLE_SCHEDULES, lower, placement, plan_stage_memory
from pipetrain.program.shard import shard_graph
from pipetrain.schedules import SCHEDULE_NAMES, peak_in_flight
from pipetrain.simulator import SimResult, fast_evaluate, simulate
from pipetrain.topology import Topology, resolve_topology
from pipetrain.ui.svg import timeline_svg

__all__ = ["Knobs", "Evaluation", "WhatIf", "SIMPY_MAX_ACTIONS", "format_step_time", "plan_topology"]

#: Above this many compute actions the page uses the fast (longest-path) evaluator instead of simpy:
#: simpy's cost grows with the actions (with the lowering, about half a second at 64 stages x 64
#: micro-batches of 1F1B, 8192 actions), and the page must answer an edit in under a second on a
#: small machine. The fast evaluator equals simpy wherever nothing contends (no shared cores or
#: links), and the page says which one answered.
SIMPY_MAX_ACTIONS = 4096
_MAX_MEMORY_REASONS = 3


def format_step_time(seconds: float) -> str:
    """The step time as the page shows it (and tests compare): ``'4.532 ms'``, ``'9163 ms'``, ``'14.83 s'``."""
    if seconds >= 10:
        return f"{seconds:.4g} s"
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 1000 else f"{ms:.4g} ms"


def plan_topology(plan: Plan) -> Topology:
    """The plan's topology; ``local`` (a plan built without the planner) is ``local-cpu:pp*dp``, as
    ``pipetrain run`` reads it."""
    name = plan.topology if plan.topology not in ("", "local") else f"local-cpu:{plan.world_size}"
    return resolve_topology(name)


@dataclass(frozen=True, kw_only=True)
class Knobs:
    """What the page lets one edit; ``boundaries[i]`` is the first block of stage ``i + 1``."""

    num_microbatches: int
    schedule: str
    boundaries: tuple[int, ...]
    buffers: tuple[int, ...]
    recompute: tuple[bool, ...]

    @classmethod
    def of(cls, plan: Plan) -> Knobs:
        return cls(num_microbatches=plan.num_microbatches, schedule=plan.schedule, boundaries=plan.boundaries,
                   buffers=tuple(st.buffers for st in plan.stages), recompute=tuple(st.recompute for st in plan.stages))

    @classmethod
    def from_json(cls, d: Any, num_stages: int) -> Knobs:
        """The page's JSON; a malformed request (not a user's edit) is a ConfigError naming the field."""
        if not isinstance(d, dict):
            raise ConfigError("knobs must be a JSON object")

        def ints(key: str, n: int) -> tuple[int, ...]:
            v = d.get(key)
            if not isinstance(v, list) or len(v) != n or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ConfigError(f"knobs.{key} must be a list of {n} integers, got {v!r}")
            return tuple(v)

        m = d.get("num_microbatches")
        if not isinstance(m, int) or isinstance(m, bool):
            raise ConfigError(f"knobs.num_microbatches must be an integer, got {m!r}")
        sched = d.get("schedule")
        if not isinstance(sched, str):
            raise ConfigError(f"knobs.schedule must be a string, got {sched!r}")
        rec = d.get("recompute")
        if not isinstance(rec, list) or len(rec) != num_stages or not all(isinstance(x, bool) for x in rec):
            raise ConfigError(f"knobs.recompute must be a list of {num_stages} booleans, got {rec!r}")
        return cls(num_microbatches=m, schedule=sched, boundaries=ints("boundaries", num_stages - 1),
                   buffers=ints("buffers", num_stages), recompute=tuple(rec))

    def to_json(self) -> dict[str, Any]:
        return {"num_microbatches": self.num_microbatches, "schedule": self.schedule, "boundaries": list(self.boundaries),
                "buffers": list(self.buffers), "recompute": list(self.recompute)}


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """One edit, evaluated: the edited plan and its simulation, or the reason it is infeasible.

    ``plan`` is None when the edit does not make a plan at all (``error`` says why); with a plan,
    ``result`` is None when the lowering refused it. A plan over a memory cap is simulated and
    still carries ``error`` (``error_kind`` "memory").
    """

    knobs: Knobs
    plan: Plan | None
    result: SimResult | None
    error: str = ""
    error_kind: str = ""  # "plan" | "schedule" | "memory" | ""
    need_buffers: tuple[int, ...] = ()  # per stage: micro-batches the schedule keeps in flight
    memory_bytes: tuple[float, ...] = ()
    caps_bytes: tuple[float, ...] = ()
    svg: str = ""
    elapsed_s: float = 0.0

    @property
    def feasible(self) -> bool:
        return not self.error and self.result is not None

    def to_json(self) -> dict[str, Any]:
        """What the page's JSON API returns for an edit."""
        r = self.result
        out: dict[str, Any] = {"ok": self.feasible, "error": self.error, "error_kind": self.error_kind, "knobs": self.knobs.to_json(),
                               "elapsed_s": self.elapsed_s, "need_buffers": list(self.need_buffers),
                               "memory_bytes": list(self.memory_bytes), "caps_bytes": list(self.caps_bytes), "svg": self.svg}
        if r is not None:
            out["metrics"] = {"evaluator": r.evaluator, "step_time_s": r.step_time_s, "step_time_text": format_step_time(r.step_time_s),
                              "pipeline_time_s": r.pipeline_time_s, "bubble_fraction": r.bubble_fraction,
                              "samples_per_s": r.samples_per_s, "tokens_per_s": r.tokens_per_s, "mfu": r.mfu,
                              "busy_s_per_stage": list(r.busy_s_per_stage),
                              "bubble_fraction_per_stage": list(r.bubble_fraction_per_stage),
                              "peak_in_flight_per_stage": list(r.peak_in_flight_per_stage),
                              "num_compute_actions": r.num_compute_actions}
        if self.plan is not None:
            out["stages"] = [{"index": st.index, "rank": st.rank, "device": st.device, "block_start": st.block_start,
                              "block_end": st.block_end} for st in self.plan.stages]
        return out


class WhatIf:
    """The plan the ui was given, with what its evaluations need (see module docstring)."""

    def __init__(self, plan: Plan, graph: LayerGraph, *, topology: Topology | None = None, cost: CostModel | None = None) -> None:
        plan.check_graph(graph.fingerprint, graph.model)
        if graph.micro_batch_size != plan.micro_batch_size or graph.seq_len != plan.seq_len:
            raise PlanError(f"the layer graph was traced at micro-batch {graph.micro_batch_size} x seq {graph.seq_len}, the plan uses "
                            f"{plan.micro_batch_size} x {plan.seq_len}: trace it with those (`pipetrain graph {plan.model} "
                            f"--micro-batch-size {plan.micro_batch_size} --seq-len {plan.seq_len} --json PATH`)")
        self.plan = plan
        self.graph = graph
        self.topology = topology or plan_topology(plan)
        self.cost = cost
        self.knobs = Knobs.of(plan)
        place = placement(self.topology, plan.pp, plan.dp)
        device_caps = rank_caps(self.topology, place)
        # the planner's cap where the plan records one (it may be below the device: --max-memory), else the device's
        self.caps = tuple(st.memory_cap_bytes if st.memory_cap_bytes > 0 else device_caps[st.rank] for st in plan.stages)
        # evaluations are pure functions of the knobs: a page re-sending the same edit (or going back) costs nothing
        self._cache: dict[Knobs, Evaluation] = {}
        # a stage's boundary tensors come from the graph's cuts (a networkx walk each): one per block range
        self._tensors: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()

    @property
    def schedules(self) -> tuple[str, ...]:
        """The schedules the page offers: with chunks > 1 only the interleaved schedule has that many stages."""
        return ("interleaved",) if self.plan.chunks > 1 else tuple(s for s in SCHEDULE_NAMES if s != "interleaved")

    def edited_plan(self, knobs: Knobs) -> Plan:
        """The plan with ``knobs`` applied (PlanError naming the knob when they make no plan)."""
        base = self.plan
        n = self.graph.num_nodes
        cuts = knobs.boundaries
        for i, c in enumerate(cuts):
            lo = cuts[i - 1] + 1 if i else 1
            if not lo <= c <= n - (len(cuts) - i):
                raise PlanError(f"boundary {i + 1} (first block of stage {i + 1}) is {c}: it must lie in {lo}..{n - (len(cuts) - i)} "
                                f"so that every stage keeps at least one of the {n} blocks")
        if knobs.num_microbatches < 1:
            raise PlanError(f"micro-batches must be >= 1, got {knobs.num_microbatches}")
        for s, b in enumerate(knobs.buffers):
            if b < 1:
                raise PlanError(f"stage {s}: buffers must be >= 1, got {b}")
        starts, ends = (0, *cuts), (*cuts, n)
        stages = []
        last = len(base.stages) - 1
        for s, old in enumerate(base.stages):
            key = (starts[s], ends[s])
            if key not in self._tensors:
                self._tensors[key] = stage_tensors(self.graph, *key)
            ins, outs = self._tensors[key]
            # the model's own input and output do not move with the boundaries: keep the plan's (the planner
            # writes them, simple_plan leaves them empty), and take the graph's cut tensors in between
            ins, outs = (old.inputs if s == 0 else ins), (old.outputs if s == last else outs)
            stages.append(replace(old, block_start=starts[s], block_end=ends[s], buffers=knobs.buffers[s], recompute=knobs.recompute[s],
                                  inputs=ins, outputs=outs))
        return replace(base, num_microbatches=knobs.num_microbatches, schedule=knobs.schedule, stages=tuple(stages), predicted=None,
                       alternatives=(), simulation_only=base.simulation_only or knobs.schedule not in RUNNABLE_SCHEDULES)

    def evaluate(self, knobs: Knobs) -> Evaluation:
        with self._lock:
            hit = self._cache.get(knobs)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        ev = self._evaluate(knobs)
        ev = replace(ev, elapsed_s=time.perf_counter() - t0)
        with self._lock:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[knobs] = ev
        return ev

    def _evaluate(self, knobs: Knobs) -> Evaluation:
        try:
            plan = self.edited_plan(knobs)
        except PipetrainError as exc:
            return Evaluation(knobs=knobs, plan=None, result=None, error=str(exc), error_kind="plan")
        try:
            prog = lower(plan, self.topology, self.cost, graph=self.graph)
        except PlanError as exc:
            return Evaluation(knobs=knobs, plan=plan, result=None, error=str(exc), error_kind="plan")
        except PipetrainError as exc:  # ScheduleError: buffers fewer than in flight; impossible schedule arguments
            return Evaluation(knobs=knobs, plan=plan, result=None, error=str(exc), error_kind="schedule")
        inp = prog.sim_input
        assert inp is not None
        sched = inp.schedule
        result = simulate(inp) if sched.num_compute_actions <= SIMPY_MAX_ACTIONS else fast_evaluate(inp, events=True)
        errors = []
        near = [st for st in plan.stages if result.peak_memory_bytes_per_stage[st.index] >= 0.5 * self.caps[st.index]]
        # the simulated peak is the memory model's (the lowering builds it from pipetrain.memory); the
        # memory model itself, which names what to change, is asked only near the cap (it walks the graph's cuts)
        mems = plan_stage_memory(plan, shard_graph(self.graph, plan.tp, sequence_parallel=plan.sequence_parallel), sched) if near else ()
        for st in near:
            mem = mems[st.index]
            try:
                check_stage_memory(mem, self.caps[st.index], stage=st.index, device=st.device)
            except InfeasibleError as exc:
                errors.append(str(exc))
        svg = timeline_svg(result.raw_events, num_ranks=sched.num_ranks, span_s=result.step_time_s)
        if len(errors) > _MAX_MEMORY_REASONS:  # one reason per line; past a few, the rest by stage number only
            over = [st.index for st in plan.stages if any(e.startswith(f"stage {st.index} needs") for e in errors)]
            errors = errors[:_MAX_MEMORY_REASONS] + [f"and {len(over) - _MAX_MEMORY_REASONS} more stages over their memory caps: "
                                                     f"{', '.join(map(str, over[_MAX_MEMORY_REASONS:]))}"]
        return Evaluation(knobs=knobs, plan=plan, result=result, error="\n".join(errors), error_kind="memory" if errors else "",
                          need_buffers=tuple(peak_in_flight(sched)), memory_bytes=tuple(result.peak_memory_bytes_per_stage),
                          caps_bytes=self.caps, svg=svg)

    def plan_to_save(self, knobs: Knobs) -> Plan:
        """The edited plan with the simulation's predictions, as ``pipetrain plan`` would write it;
        PlanError with the reason when the edit is infeasible (an infeasible plan is not saved)."""
        ev = self.evaluate(knobs)
        if not ev.feasible or ev.plan is None or ev.result is None:
            raise PlanError(f"not saved: the edited plan is infeasible: {ev.error}")
        r = ev.result
        stages = tuple(replace(st, predicted_peak_memory_bytes=float(r.peak_memory_bytes_per_stage[st.index]),
                               memory_cap_bytes=float(self.caps[st.index])) for st in ev.plan.stages)
        predicted = PredictedMetrics(step_time_s=float(r.step_time_s), samples_per_s=float(r.samples_per_s), tokens_per_s=float(r.tokens_per_s),
                                     mfu=float(r.mfu or 0.0), bubble_fraction=float(min(1.0, max(0.0, r.bubble_fraction))),
                                     peak_memory_bytes=tuple(float(x) for x in r.peak_memory_bytes_per_stage))
        return replace(ev.plan, stages=stages, predicted=predicted)

    def describe(self) -> dict[str, Any]:
        """What the page shows of the plan that does not change with the knobs."""
        p, g = self.plan, self.graph
        return {"model": p.model, "topology": self.topology.name, "pp": p.pp, "dp": p.dp, "chunks": p.chunks,
                "micro_batch_size": p.micro_batch_size, "seq_len": p.seq_len, "dtype": p.dtype, "optimizer": p.optimizer,
                "num_blocks": g.num_nodes, "block_names": [nd.name for nd in g.nodes], "schedules": list(self.schedules),
                "simulation_only": p.simulation_only, "knobs": self.knobs.to_json(),
                "stages": [{"index": st.index, "rank": st.rank, "device": st.device} for st in p.stages],
                "predicted_step_time_s": p.predicted.step_time_s if p.predicted is not None else None}

