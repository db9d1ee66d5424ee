"""Turn a search result into a :class:`~pipetrain.plan.Plan` that explains itself, and back.

* :func:`plan_job`: search, then build the Plan: stage table with boundary tensor shapes (from
  the graph's cuts), placement, buffers, recomputation, simulated peak memory against each
  cap, predicted metrics (simpy), the alternatives and why they lost, and -- when knobs were
  pinned -- what the pins cost against the unpinned optimum.
* :func:`plan_sim_input`: a Plan (e.g. loaded from ``plan.json``) back to the simulator's
  input through the one lowering (:func:`pipetrain.program.lower`), refusing a graph other than
  the one the plan was made for. ``pipetrain simulate PLAN.json`` calls this.

Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipetrain.costs import CostModel
from pipetrain.errors import PipetrainError
from pipetrain.graph import LayerGraph
from pipetrain.plan import Alternative, Plan, PredictedMetrics, StagePlan, TensorSpec
from pipetrain.planner.job import Job
from pipetrain.planner.search import Evaluated, SearchResult, _tracer, job_precision, search
from pipetrain.program import SimInput, lower, placement
from pipetrain.program.catalog import executor_supports
from pipetrain.schedules import stage_ranks
from pipetrain.topology import Topology, resolve_topology

__all__ = ["PlanOutcome", "plan_job", "make_plan", "plan_sim_input", "stage_tensors"]

_MAX_ALTERNATIVES = 12


@dataclass(frozen=True, kw_only=True)
class PlanOutcome:
    """The plan plus what the CLI prints beside it."""

    plan: Plan
    result: SearchResult
    unpinned: SearchResult | None = None  # the optimum without the user's pins (None: nothing pinned)

    @property
    def pin_cost_fraction(self) -> float | None:
        """Relative step-time cost of the pins against the unpinned optimum (0.05 = 5% slower)."""
        if self.unpinned is None:
            return None
        base = self.unpinned.best.step_time_s
        return self.result.best.step_time_s / base - 1.0


def stage_tensors(graph: LayerGraph, start: int, end: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Shapes and dtypes entering and leaving blocks ``[start, end)`` (the graph's cut tensors)."""
    ins: tuple[TensorSpec, ...]
    outs: tuple[TensorSpec, ...]
    if start == 0:
        ins = (TensorSpec(shape=tuple(graph.input_shape), dtype=graph.input_dtype),) if graph.input_shape else ()
    else:
        ins = tuple(TensorSpec(shape=tuple(t.shape), dtype=t.dtype) for t in graph.cut(start).tensors)
    if end >= graph.num_nodes:
        last = graph.nodes[-1]
        outs = (TensorSpec(shape=tuple(last.output_shape), dtype=last.output_dtype),) if last.output_shape else ()
    else:
        outs = tuple(TensorSpec(shape=tuple(t.shape), dtype=t.dtype) for t in graph.cut(end).tensors)
    return ins, outs


def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1.0) * 100:+.1f}%"


def _alternatives(res: SearchResult, unpinned: SearchResult | None, job: Job) -> tuple[Alternative, ...]:
    best = res.best
    t_best = best.step_time_s
    out: list[Alternative] = []
    seen = {best.candidate}
    for e in res.confirmed[1:]:
        seen.add(e.candidate)
        out.append(Alternative(description=e.candidate.describe(), step_time_s=float(e.step_time_s),
                               reason=f"simulated {_pct(e.step_time_s, t_best)} slower ({e.step_time_s:.4g} s vs {t_best:.4g} s)"))
    classes = set()
    for e in res.screened:  # best screened point of every other (pp, schedule) class
        key = (e.candidate.pp, e.candidate.schedule, e.candidate.chunks)
        if e.candidate in seen or key in classes or key == (best.candidate.pp, best.candidate.schedule, best.candidate.chunks):
            continue
        classes.add(key)
        out.append(Alternative(description=e.candidate.describe(), step_time_s=float(e.fast.step_time_s),
                               reason=f"screened out: fast evaluator {_pct(e.fast.step_time_s, best.fast.step_time_s)} slower"))
    if res.pruned:
        why = ("pruned: their lower bound on step time exceeded the screened best" if res.method == "bnb"
               else "not sampled by differential evolution")
        out.append(Alternative(description=f"{res.pruned} more grid point(s)", step_time_s=None, reason=why))
    reasons = set()
    # memory verdicts first (they explain the choice of pp), one per (pp, dp); then the rest
    ranked = sorted(res.infeasible, key=lambda d: (0 if any(u in d[1] for u in ("KiB", "MiB", "GiB", "TiB")) else 1))
    for desc, why in ranked:
        config = desc.split(" mb=")[0]
        if config in reasons:
            continue
        reasons.add(config)
        out.append(Alternative(description=desc, step_time_s=None, reason=f"infeasible: {why}"))
    out = out[:_MAX_ALTERNATIVES]
    if unpinned is not None:
        u = unpinned.best
        pins = ", ".join(f"{k}={v if not isinstance(v, tuple) else ','.join(str(x).lower() for x in v)}" for k, v in job.pinned.items())
        out.append(Alternative(description=f"unpinned optimum: {u.candidate.describe()}", step_time_s=float(u.step_time_s),
                               reason=f"your pins ({pins}) cost {_pct(t_best, u.step_time_s)} step time against it"))
    return tuple(out)


def make_plan(res: SearchResult, *, unpinned: SearchResult | None = None) -> Plan:
    """Build the Plan of ``res.best`` (see module docstring)."""
    job = res.job
    assert job is not None and res.topology is not None
    ev: Evaluated = res.best
    c = ev.candidate
    graph = res.graph()
    sim = ev.sim or ev.fast
    place = placement(res.topology, c.pp, c.dp, c.tp)
    stages = []
    for s, (a, b) in enumerate(ev.split.ranges):
        r = stage_ranks(c.schedule, c.pp, c.chunks)[s]
        ins, outs = stage_tensors(graph, a, b)
        stages.append(StagePlan(index=s, block_start=a, block_end=b, rank=r, device=res.topology.devices[place.devices[0][r]].id,
                                buffers=int(ev.buffers[s]), recompute=bool(ev.recompute[s]),
                                recompute_layers=ev.recompute_layers[s] if ev.recompute_layers else 0, inputs=ins, outputs=outs,
                                predicted_peak_memory_bytes=float(sim.peak_memory_bytes_per_stage[s]),
                                memory_cap_bytes=float(ev.stage_caps_bytes[s])))
    predicted = PredictedMetrics(step_time_s=float(sim.step_time_s), samples_per_s=float(sim.samples_per_s),
                                 tokens_per_s=float(sim.tokens_per_s),
                                 mfu=float(sim.mfu or 0.0), bubble_fraction=float(min(1.0, max(0.0, sim.bubble_fraction))),
                                 peak_memory_bytes=tuple(float(x) for x in sim.peak_memory_bytes_per_stage))
    return Plan(model=job.model, graph_fingerprint=graph.fingerprint, topology=job.topology,
                pp=c.pp, dp=c.dp, micro_batch_size=c.micro_batch_size, num_microbatches=c.num_microbatches,
                seq_len=graph.seq_len, schedule=c.schedule, stages=tuple(stages), chunks=c.chunks, dtype=job.dtype,
                optimizer=job.optimizer, seed=job.seed, predicted=predicted, alternatives=_alternatives(res, unpinned, job),
                simulation_only=job.simulation_only or executor_supports(
                    c.schedule, tp=c.tp, zero=c.zero, recompute=c.recompute_mode if any(ev.recompute) else "none") is not None,
                tp=c.tp, sequence_parallel=c.sequence_parallel, zero=c.zero, precision=job_precision(job, res.topology),
                recompute=c.recompute_mode if any(ev.recompute) else "none", idle_gpus=place.idle)


def plan_job(job: Job, *, graph_for: Callable[[int], LayerGraph] | None = None, topology: Topology | None = None,
             cost: CostModel | None = None, top_k: int = 3, price_pins: bool = True) -> PlanOutcome:
    """Search ``job`` and build its Plan; with pinned knobs also search without them to price the pins."""
    topo = topology or resolve_topology(job.topology)
    if graph_for is None:
        graph_for = _tracer(job)
    res = search(job, graph_for=graph_for, topology=topo, cost=cost, top_k=top_k)
    unpinned = None
    if price_pins and job.pinned:
        try:
            unpinned = search(job.unpinned(), graph_for=graph_for, topology=topo, cost=cost, top_k=top_k, explain=False)
        except PipetrainError:
            unpinned = None
        if unpinned is not None and unpinned.best.step_time_s > res.best.step_time_s:
            # The pinned plan is a point of the unpinned space, so the unpinned optimum is at least as
            # fast; the free search's heuristics (pruning bounds, top-k confirmation, local polish)
            # missed it. Report the better plan as the optimum rather than a negative cost.
            unpinned = res
    return PlanOutcome(plan=make_plan(res, unpinned=unpinned), result=res, unpinned=unpinned)


def plan_sim_input(plan: Plan, *, graph: LayerGraph | None = None, topology: Topology | None = None,
                   cost: CostModel | None = None) -> SimInput:
    """The simulator's input for a saved plan as the planner priced it (traces ``plan.model`` when no
    graph is given): :func:`pipetrain.program.lower` with ``as_executed=False``."""
    if graph is None:
        from pipetrain.planner.trace import trace_graph

        graph = trace_graph(plan.model, micro_batch_size=plan.micro_batch_size, seq_len=plan.seq_len, dtype=plan.dtype)
    prog = lower(plan, topology or resolve_topology(plan.topology, world_size=plan.world_size), cost, graph=graph)
    assert prog.sim_input is not None
    return prog.sim_input
