"""Build a runnable :class:`~pipetrain.plan.Plan` without the planner (tests, benchmarks, quick runs).

:func:`simple_plan` splits the model's blocks evenly (or at the given boundaries), fills the
boundary :class:`~pipetrain.plan.TensorSpec` from a meta forward pass, the activation buffers
from the schedule's peak in-flight count, and the graph fingerprint; ``tp``, ``sequence_parallel``
and ``zero`` go into the plan as given (the boundary tensors are the full ones whatever ``tp``:
stages exchange replicated activations). The planner produces the same type.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipetrain.errors import PlanError
from pipetrain.plan import Plan, StagePlan

__all__ = ["simple_plan", "even_boundaries"]


def even_boundaries(num_blocks: int, num_stages: int) -> tuple[int, ...]:
    """Cut positions splitting ``num_blocks`` into ``num_stages`` near-equal contiguous runs."""
    if num_stages > num_blocks:
        raise PlanError(f"cannot split {num_blocks} blocks into {num_stages} stages: lower pp (or chunks)")
    base, extra = divmod(num_blocks, num_stages)
    cuts, pos = [], 0
    for s in range(num_stages - 1):
        pos += base + (1 if s < extra else 0)
        cuts.append(pos)
    return tuple(cuts)


def simple_plan(model: str, *, pp: int, dp: int = 1, m: int, mbs: int, seq_len: int, schedule: str = "1f1b",
                boundaries: Sequence[int] | None = None, chunks: int = 1, dtype: str = "fp32",
                optimizer: str = "adamw", seed: int = 0, recompute: Sequence[int] = (),
                buffers: Sequence[int] | None = None, device: str = "cpu", tp: int = 1, sequence_parallel: bool = False,
                zero: int = 0, recompute_mode: str = "full", recompute_layers: int = 0, precision: str = "") -> Plan:
    """``recompute``: the stages that recompute, ``recompute_mode`` how (full or selective) and
    ``recompute_layers`` how many of each such stage's first blocks (0: all; at most its blocks);
    ``precision`` "" is the dtype's default (:func:`pipetrain.plan.precision_for_dtype`)."""
    from pipetrain.executor.stage import boundary_specs, build_meta, load_spec
    from pipetrain.planner.trace import model_fingerprint
    from pipetrain.schedules import make_schedule, peak_in_flight, schedule_chunks

    spec = load_spec(model)
    chunks = schedule_chunks(schedule, chunks)
    sched = make_schedule(schedule, pp, m, chunks)
    meta = build_meta(spec)
    n = len(meta.blocks)
    num_stages = pp * chunks
    cuts = tuple(boundaries) if boundaries is not None else even_boundaries(n, num_stages)
    if len(cuts) != num_stages - 1 or list(cuts) != sorted(set(cuts)) or (cuts and (cuts[0] <= 0 or cuts[-1] >= n)):
        raise PlanError(f"boundaries {list(cuts)} must be {num_stages - 1} increasing cut positions in 1..{n - 1}")
    specs = boundary_specs(spec, meta, mbs, seq_len, cuts, dtype) if cuts else []
    if buffers is None:
        buffers = list(peak_in_flight(sched))
    starts = (0, *cuts)
    ends = (*cuts, n)
    stages = []
    for s in range(num_stages):
        stages.append(StagePlan(
            index=s, block_start=starts[s], block_end=ends[s], rank=sched.stage_to_rank[s], device=device,
            buffers=max(1, int(buffers[s])), recompute=s in set(recompute),
            recompute_layers=min(recompute_layers, ends[s] - starts[s]) if s in set(recompute) else 0,
            inputs=(specs[s - 1],) if s > 0 else (), outputs=(specs[s],) if s < num_stages - 1 else ()))
    return Plan(model=model, graph_fingerprint=model_fingerprint(spec), topology="local", pp=pp, dp=dp,
                micro_batch_size=mbs, num_microbatches=m, seq_len=seq_len, schedule=schedule, stages=tuple(stages),
                chunks=chunks, dtype=dtype, optimizer=optimizer, seed=seed, tp=tp, sequence_parallel=sequence_parallel, zero=zero,
                recompute=recompute_mode if recompute else "none", precision=precision)
