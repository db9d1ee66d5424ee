"""Compare a pipeline run against the single-device run of the same model, data and seed.

Pure functions over plain numbers, so they are tested without running anything:
per-step loss (absolute and relative), per-step per-stage gradient norms, final per-stage
parameter differences and throughput. The verdict names the first step and the stage that
diverged, so an injected bug in one stage's gradient is pinned to that stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipetrain.errors import ConfigError

__all__ = ["Tolerances", "tolerances_for", "StageParamDiff", "Divergence", "Comparison", "compare_runs"]


@dataclass(frozen=True, kw_only=True)
class Tolerances:
    """Stated tolerances. fp32 differs only by summation order (the pipeline and a single
    process sum micro-batch gradients in different orders), so 1e-4 leaves room for 50+ AdamW steps; bf16 autocast
    rounds every matmul to 8 bits of mantissa, so it gets 5e-2 on loss and grad norms."""

    loss_rtol: float
    grad_norm_rtol: float
    param_atol: float
    param_rtol: float

    def __post_init__(self) -> None:
        for name in ("loss_rtol", "grad_norm_rtol", "param_atol", "param_rtol"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"tolerance {name} must be > 0")


def tolerances_for(dtype: str) -> Tolerances:
    if dtype == "fp32":
        return Tolerances(loss_rtol=1e-4, grad_norm_rtol=1e-3, param_atol=1e-4, param_rtol=1e-4)
    if dtype in ("bf16", "fp16"):
        return Tolerances(loss_rtol=5e-2, grad_norm_rtol=2e-1, param_atol=5e-2, param_rtol=5e-2)
    raise ConfigError(f"no validation tolerances for dtype {dtype!r}; use fp32, bf16 or fp16")


@dataclass(frozen=True, kw_only=True)
class StageParamDiff:
    stage: int
    max_abs: float
    rel: float  # ||p_pipe - p_ref|| / ||p_ref||


@dataclass(frozen=True, kw_only=True)
class Divergence:
    step: int  # 1-based
    stage: int | None  # None when only the loss shows it
    what: str


@dataclass(frozen=True, kw_only=True)
class Comparison:
    passed: bool
    tolerances: Tolerances
    loss_abs_diff: tuple[float, ...]
    loss_rel_diff: tuple[float, ...]
    max_loss_rel_diff: float
    params: tuple[StageParamDiff, ...]
    first_divergence: Divergence | None
    speedup: float | None  # pipeline tokens/s over single-device tokens/s
    messages: tuple[str, ...] = field(default_factory=tuple)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare_runs(*, pipeline_loss: Sequence[float], reference_loss: Sequence[float],
                 pipeline_grad_norms: Sequence[Sequence[float]] | None = None,
                 reference_grad_norms: Sequence[Sequence[float]] | None = None,
                 params: Sequence[StageParamDiff] = (), tolerances: Tolerances,
                 pipeline_tokens_per_s: float | None = None, reference_tokens_per_s: float | None = None) -> Comparison:
    """Compare two runs; grad norms are ``[step][stage]``. Checks, per step in order, the
    per-stage gradient norms (which name the stage), then the loss; then final parameters."""
    if len(pipeline_loss) != len(reference_loss) or not pipeline_loss:
        raise ConfigError(f"cannot compare runs of {len(pipeline_loss)} and {len(reference_loss)} steps: run both for the same number of steps")
    abs_d = tuple(abs(a - b) for a, b in zip(pipeline_loss, reference_loss))
    rel_d = tuple(_rel(a, b) for a, b in zip(pipeline_loss, reference_loss))
    first: Divergence | None = None
    for i in range(len(pipeline_loss)):
        if pipeline_grad_norms is not None and reference_grad_norms is not None and i < len(pipeline_grad_norms):
            gp, gr = pipeline_grad_norms[i], reference_grad_norms[i]
            bad = [s for s, (a, b) in enumerate(zip(gp, gr)) if not math.isfinite(a) or _rel(a, b) > tolerances.grad_norm_rtol]
            if bad:  # several stages off at once (e.g. through a tied weight): name the one off the most
                s = max(bad, key=lambda k: (not math.isfinite(gp[k]), _rel(gp[k], gr[k]) if math.isfinite(gp[k]) else 0.0))
                first = Divergence(step=i + 1, stage=s, what=f"stage {s} gradient norm {gp[s]:.6g} vs {gr[s]:.6g} single-device "
                                                             f"(rel {_rel(gp[s], gr[s]):.2e} > {tolerances.grad_norm_rtol:g})")
                break
        if not math.isfinite(pipeline_loss[i]) or rel_d[i] > tolerances.loss_rtol:
            first = Divergence(step=i + 1, stage=None,
                               what=f"loss {pipeline_loss[i]:.6g} vs {reference_loss[i]:.6g} single-device (rel {rel_d[i]:.2e} > {tolerances.loss_rtol:g})")
            break
    msgs: list[str] = []
    if first is not None:
        where = f"stage {first.stage}" if first.stage is not None else "the loss"
        msgs.append(f"diverged first at step {first.step} in {where}: {first.what}")
    for p in params:
        if p.max_abs > tolerances.param_atol and p.rel > tolerances.param_rtol:
            msgs.append(f"stage {p.stage} final parameters differ: max-abs {p.max_abs:.2e}, rel {p.rel:.2e}")
            if first is None:
                first = Divergence(step=len(pipeline_loss), stage=p.stage, what=msgs[-1])
    speedup = None
    if pipeline_tokens_per_s and reference_tokens_per_s:
        speedup = pipeline_tokens_per_s / reference_tokens_per_s
    return Comparison(passed=not msgs, tolerances=tolerances, loss_abs_diff=abs_d, loss_rel_diff=rel_d,
                      max_loss_rel_diff=max(rel_d), params=tuple(params), first_divergence=first, speedup=speedup,
                      messages=tuple(msgs))
