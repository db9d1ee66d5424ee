"""The executor's own overhead over the profiled blocks, measured on one rank.

A block profile times each block alone, in a tight loop. The executor runs the same blocks with
more around them: saved-tensor accounting, autograd bookkeeping of a stage's input, fresh data
every micro-batch, telemetry, the clip-norm and optimizer bookkeeping. :func:`measure_runtime_overhead`
runs the real executor with one rank (``pp = dp = 1``: no transfers, no other rank) at two
micro-batch counts ``m1 < m2`` and splits its median step time ``T(m)`` into a part that grows
with the micro-batches and a fixed one: ``factor = (T(m2) - T(m1)) / ((m2 - m1) x sum(F + B))``
(the executor's cost of a micro-batch over the profile's) and ``fixed_s = T(m1) - m1 x factor x
sum(F + B) - optimizer step`` (per-step work besides the update: batches, norms, bookkeeping).
The calibration stores both per model and shape; :class:`~pipetrain.executor.calibration.MeasuredCostModel`
scales the profiled block times by ``factor`` and adds ``fixed_s`` to each rank's end-of-step
work. Nothing in it is fitted to a pipeline: it is measured without one.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import ConfigError

__all__ = ["RuntimeOverhead", "measure_runtime_overhead", "MessageHostCost", "measure_message_host_s"]


@dataclass(frozen=True, kw_only=True)
class RuntimeOverhead:
    """Executor step time over the profile's prediction, one rank, for one model and shape."""

    model: str
    micro_batch_size: int
    seq_len: int
    factor: float
    fixed_s: float
    measured_step_s: tuple[float, float]
    profiled_microbatch_s: float
    num_microbatches: tuple[int, int]
    steps: int

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ConfigError(f"runtime overhead factor of {self.model} must be > 0, got {self.factor}")


def measure_runtime_overhead(profile: Any, optimizer_cost: Any, *, num_microbatches: tuple[int, int] = (2, 8), steps: int = 10,
                             warmup: int = 2, threads: int = 1, timeout_s: float = 120.0) -> RuntimeOverhead:
    """One-rank executor run of ``profile``'s model and shape (module docstring)."""
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.plans import simple_plan
    from pipetrain.planner.trace import trace_graph

    if steps <= warmup:
        raise ConfigError(f"runtime overhead needs more steps ({steps}) than warm-up steps ({warmup})")
    m1, m2 = num_microbatches
    if not 1 <= m1 < m2:
        raise ConfigError(f"runtime overhead needs two micro-batch counts 1 <= m1 < m2, got {num_microbatches}")
    p = profile
    graph = trace_graph(p.model, micro_batch_size=p.micro_batch_size, seq_len=p.seq_len, dtype=p.dtype)
    params = sum(n.param_count for n in graph.nodes)
    per_mb = sum(b.fwd_s + b.bwd_s for b in p.blocks)
    t_opt = optimizer_cost.time_s(params) if optimizer_cost else 0.0
    times = []
    for m in (m1, m2):
        plan = simple_plan(p.model, pp=1, m=m, mbs=p.micro_batch_size, seq_len=p.seq_len, dtype=p.dtype)
        with tempfile.TemporaryDirectory(prefix="pipetrain-overhead-") as tmp:
            plan_path = plan.save(Path(tmp) / "plan.json")
            res = launch(RunConfig(plan_path=str(plan_path), run_dir=str(Path(tmp) / "run"), steps=steps, threads=threads,
                                   timeout_s=timeout_s))
        times.append(statistics.median(res.step_times_s[warmup:]))
    factor = max((times[1] - times[0]) / ((m2 - m1) * per_mb), 1e-3)
    fixed = max(0.0, times[0] - m1 * factor * per_mb - t_opt)
    return RuntimeOverhead(model=p.model, micro_batch_size=p.micro_batch_size, seq_len=p.seq_len, factor=factor, fixed_s=fixed,
                           measured_step_s=(times[0], times[1]), profiled_microbatch_s=per_mb, num_microbatches=(m1, m2), steps=steps)


@dataclass(frozen=True, kw_only=True)
class MessageHostCost:
    """Host CPU seconds per point-to-point message a rank sends or receives (see :func:`measure_message_host_s`)."""

    model: str
    micro_batch_size: int
    seq_len: int
    host_s: float
    #: per rank and step: (CPU outside the compute spans with one rank, with two), seconds
    outside_one_rank_s: float
    outside_two_ranks_s: tuple[float, ...]
    messages_per_rank: int


def _outside_spans_s(run_dir: Path, warmup: int) -> list[float]:
    """Per rank: median over the steps after ``warmup`` of the process's CPU time outside its compute spans."""
    from pipetrain.executor.telemetry import read_telemetry

    out = []
    for _rank, recs in sorted(read_telemetry(run_dir).items()):
        spans: dict[int, float] = {}
        for e in recs:
            if e["type"] == "event" and e["kind"] in ("F", "B", "W", "OPT"):
                spans[e["step"]] = spans.get(e["step"], 0.0) + e["end_s"] - e["start_s"]
        gaps = [r["cpu_process_s"] - spans.get(r["step"], 0.0) for r in recs
                if r["type"] == "step" and r["step"] >= warmup and "cpu_process_s" in r]
        if not gaps:
            raise ConfigError(f"{run_dir}: no step records with CPU times after step {warmup}")
        out.append(statistics.median(gaps))
    return out


def measure_message_host_s(profile: Any, *, num_microbatches: int = 8, steps: int = 10, warmup: int = 2, threads: int = 1,
                           timeout_s: float = 120.0) -> MessageHostCost:
    """Host CPU per message: the executor on one rank and on two (a 1F1B pipeline of the same model,
    shape and ``m``), each rank's CPU time (all its threads) outside its F/B/OPT spans per step.

    With two ranks each rank runs ``m`` F and ``m`` B, as the single rank does, and in addition
    sends ``m`` messages and receives ``m``; so ``host_s = (outside(two) - outside(one)) / 2m``,
    averaged over the two ranks. It is the posting, copying and completing of messages that gloo's
    and the executor's host code do, which holds a CPU core (:attr:`SimInput.t_message_host_s`).
    """
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.plans import simple_plan

    if steps <= warmup:
        raise ConfigError(f"message host cost needs more steps ({steps}) than warm-up steps ({warmup})")
    p = profile
    outside = []
    for pp in (1, 2):
        plan = simple_plan(p.model, pp=pp, m=num_microbatches, mbs=p.micro_batch_size, seq_len=p.seq_len, dtype=p.dtype)
        with tempfile.TemporaryDirectory(prefix="pipetrain-msgcost-") as tmp:
            plan_path = plan.save(Path(tmp) / "plan.json")
            launch(RunConfig(plan_path=str(plan_path), run_dir=str(Path(tmp) / "run"), steps=steps, threads=threads,
                             timeout_s=timeout_s))
            outside.append(_outside_spans_s(Path(tmp) / "run", warmup))
    one, two = outside[0][0], tuple(outside[1])
    msgs = 2 * num_microbatches
    host = max(0.0, statistics.mean(t - one for t in two) / msgs)
    return MessageHostCost(model=p.model, micro_batch_size=p.micro_batch_size, seq_len=p.seq_len, host_s=host,
                           outside_one_rank_s=one, outside_two_ranks_s=two, messages_per_rank=msgs)
