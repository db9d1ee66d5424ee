"""The executor's own overhead over the profiled blocks, measured on one rank.

A block profile times each block alone, in a tight loop. The executor runs the same blocks with
more around them: saved-tensor accounting, autograd bookkeeping of a stage's input, fresh data
every micro-batch, telemetry, the clip-norm and optimizer bookkeeping. :func:`measure_runtime_overhead`
runs the real executor with one rank (``pp = dp = 1``: no transfers, no other rank) at two
micro-batch counts ``m1 < m2`` and splits each step of its telemetry into the compute spans, the
end of step and the rest: ``factor`` = the spans' median share per micro-batch over the profile's
``sum(F + B)``, plus the growth of the rest with ``m`` (the host work between a micro-batch's
actions) over ``sum(F + B)``; ``end_of_step_s``: the median time from
the end of a step's last backward to the end of its optimizer step, from the run's telemetry
(gradient norms, clip, update, zeroing, in place: there the parameters, gradients and optimizer
state come from memory after a backward pass, not from the caches a loop over the same calls keeps
warm, so the update in a run is slower than such a loop; figures: benchmarks/RESULTS.md) and
``fixed_s``, the rest at ``m1``
less its per-micro-batch growth (per-step work besides: batches, bookkeeping). The host work at
the step boundary, from the end of a step's optimizer update to the first action of the next
(the loss, zeroing, telemetry records, the next batches, posting receives), is measured apart:
``between_steps_s`` at ``m1`` and ``between_steps_per_microbatch_s``, its growth with ``m``. In a
pipeline it is on the critical path whole (the first stage does it before its first forward and
every later stage waits), where work spread over the micro-batches would partly hide in the
bubbles, so the cost model adds it to each rank's step, not to the blocks. Medians over
steps, not of whole step times, so one slow step moves nothing.
The calibration stores them per model and shape; :class:`~pipetrain.calibration.measured.MeasuredCostModel`
scales the profiled block times by ``factor``, the optimizer fit by ``end_of_step_s`` over the
fit's own prediction for the model, and adds ``fixed_s`` to each rank's end-of-step work.
Nothing in it is fitted to a pipeline: it is measured without one.
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
    #: in the run: median seconds from the last backward's end to the optimizer step's end (0: not measured)
    end_of_step_s: float = 0.0
    param_count: int = 0  # the model's parameters, all on the one rank
    #: median seconds from the end of a step's optimizer update to the next step's first action, at m1,
    #: and its growth per micro-batch (0: not measured, an older calibration)
    between_steps_s: float = 0.0
    between_steps_per_microbatch_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.end_of_step_s >= 0 and self.param_count >= 0 and self.between_steps_s >= 0
                and self.between_steps_per_microbatch_s >= 0):
            raise ConfigError(f"runtime overhead of {self.model}: end of step and parameter count must be >= 0")
        if not self.factor > 0:
            raise ConfigError(f"runtime overhead factor of {self.model} must be > 0, got {self.factor}")


def measure_runtime_overhead(profile: Any, *, num_microbatches: tuple[int, int] = (2, 8), steps: int = 20,
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
    runs = []
    for m in (m1, m2):
        plan = simple_plan(p.model, pp=1, m=m, mbs=p.micro_batch_size, seq_len=p.seq_len, dtype=p.dtype)
        with tempfile.TemporaryDirectory(prefix="pipetrain-overhead-") as tmp:
            plan_path = plan.save(Path(tmp) / "plan.json")
            res = launch(RunConfig(plan_path=str(plan_path), run_dir=str(Path(tmp) / "run"), steps=steps, threads=threads,
                                   timeout_s=timeout_s))
            runs.append((m, _step_parts(Path(tmp) / "run", warmup), statistics.median(res.step_times_s[warmup:])))
    # (period, busy, end of step, between steps) per step: the spans' share per micro-batch, pooled over both runs
    span_factor = statistics.median(b / (m * per_mb) for m, parts, _ in runs for _, b, _, _ in parts)
    end = statistics.median(e for _, parts, _ in runs for _, _, e, _ in parts)
    between = [statistics.median(w for _, _, _, w in parts) for _, parts, _ in runs]
    outside = [statistics.median(t - b - e - w for t, b, e, w in parts) for _, parts, _ in runs]
    gap = max(0.0, (outside[1] - outside[0]) / (m2 - m1))  # between a micro-batch's actions: grows with m
    factor = max(span_factor + gap / per_mb, 1e-3)
    fixed = max(0.0, outside[0] - m1 * gap)
    grow = max(0.0, (between[1] - between[0]) / (m2 - m1))
    return RuntimeOverhead(model=p.model, micro_batch_size=p.micro_batch_size, seq_len=p.seq_len, factor=factor, fixed_s=fixed,
                           measured_step_s=(runs[0][2], runs[1][2]), profiled_microbatch_s=per_mb, num_microbatches=(m1, m2),
                           steps=steps, end_of_step_s=end, param_count=params, between_steps_s=max(0.0, between[0] - m1 * grow),
                           between_steps_per_microbatch_s=grow)


def _step_parts(run_dir: Path, warmup: int) -> list[tuple[float, float, float, float]]:
    """Per step after ``warmup`` with a next step: (its period: first action to the next step's first
    action, seconds in F/B/W spans, from the end of the last of them to the end of the OPT event,
    from the end of the OPT event to the next step's first action)."""
    from pipetrain.executor.telemetry import read_telemetry

    out = []
    for _rank, recs in read_telemetry(run_dir).items():
        busy: dict[int, float] = {}
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        opt: dict[int, float] = {}
        for e in recs:
            if e["type"] != "event" or e.get("step", -1) < warmup:
                continue
            k = e["step"]
            first[k] = min(first.get(k, e["start_s"]), e["start_s"])
            if e["kind"] in ("F", "B", "W"):
                busy[k] = busy.get(k, 0.0) + e["end_s"] - e["start_s"]
                last[k] = max(last.get(k, 0.0), e["end_s"])
            elif e["kind"] == "OPT":
                opt[k] = e["end_s"]
        out += [(first[k + 1] - first[k], busy[k], opt[k] - last[k], first[k + 1] - opt[k])
                for k in sorted(opt) if k in last and k + 1 in first]
    if not out:
        raise ConfigError(f"{run_dir}: no two complete steps after step {warmup}")
    return out


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
