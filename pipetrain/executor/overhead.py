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

__all__ = ["RuntimeOverhead", "measure_runtime_overhead"]


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
