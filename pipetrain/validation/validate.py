"""Validate a finished pipeline run against single-device training of the same model.

:func:`validate_run` reads ``RUN_DIR`` (``plan.json``, ``run_config.json``, ``result.json``, the
per-stage gradient norms in ``telemetry/rank*.jsonl`` and the final per-stage weights in
``final/rank*.pt`` or the last checkpoint), trains the same model on one device with the same
data, seed, micro-batching and steps (:func:`~pipetrain.validation.reference.reference_run`), and
compares them with :func:`~pipetrain.validation.compare.compare_runs` against the plan's dtype
tolerances. The verdict, every per-step number and the honest throughput ratio go to
``RUN_DIR/validation.json``; a failure names the first step and the stage that diverged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.plan import Plan
from pipetrain.serde import to_dict

__all__ = ["ValidationReport", "RunArtifacts", "load_run", "validate_run", "load_validation", "throughput_statement"]


@dataclass(frozen=True, kw_only=True)
class RunArtifacts:
    """What a run directory holds that validation and the report read."""

    run_dir: Path
    plan: Plan
    config: Any  # RunConfig
    result: Any  # RunResult


@dataclass(frozen=True, kw_only=True)
class ValidationReport:
    passed: bool
    steps: int
    dtype: str
    tolerances: dict[str, float]
    pipeline_loss: tuple[float, ...]
    reference_loss: tuple[float, ...]
    loss_abs_diff: tuple[float, ...]
    loss_rel_diff: tuple[float, ...]
    max_loss_rel_diff: float
    pipeline_stage_grad_norms: tuple[tuple[float, ...], ...]  # [step][stage]; () if the run did not record them
    reference_stage_grad_norms: tuple[tuple[float, ...], ...]
    param_max_abs_diff: tuple[float, ...]  # per stage
    param_rel_diff: tuple[float, ...]
    pipeline_tokens_per_s: float
    reference_tokens_per_s: float
    speedup: float  # pipeline tokens/s over single-device tokens/s (< 1: a slowdown)
    throughput: str
    first_divergence_step: int | None
    first_divergence_stage: int | None
    messages: tuple[str, ...]
    elapsed_reference_s: float

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        head = (f"validation {verdict}: {self.steps} steps, max loss rel diff {self.max_loss_rel_diff:.2e} "
                f"(tol {self.tolerances['loss_rtol']:g}), max param diff {max(self.param_max_abs_diff, default=0.0):.2e}; "
                f"{self.throughput}")
        return head if self.passed else head + "\n  " + "\n  ".join(self.messages)


def _read_json(p: Path, what: str) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{p} is not readable JSON ({type(exc).__name__}): the {what} is corrupt; re-run `pipetrain run`") from None


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Plan, run options and result of a run directory, or a RunError saying what is missing."""
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.result import RunResult

    d = Path(run_dir)
    if not d.is_dir():
        raise RunError(f"run directory {str(d)!r} does not exist: give the --run-dir of a finished `pipetrain run`")
    for name in ("plan.json", "run_config.json", "result.json"):
        if not (d / name).is_file():
            raise RunError(f"{d} has no {name}: it is not the directory of a finished `pipetrain run` (re-run it with --run-dir {d})")
    try:
        plan = Plan.from_json((d / "plan.json").read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{d / 'plan.json'} is unreadable ({exc})") from None
    raw = _read_json(d / "run_config.json", "run configuration")
    known = {f.name for f in fields(RunConfig)}
    if not isinstance(raw, dict) or "plan_path" not in raw:
        raise RunError(f"{d / 'run_config.json'} is corrupt: re-run `pipetrain run`")
    config = RunConfig(**{k: v for k, v in raw.items() if k in known})
    result = RunResult.from_dict(_read_json(d / "result.json", "run result"))
    return RunArtifacts(run_dir=d, plan=plan, config=config, result=result)


def _pipeline_stage_norms(run_dir: Path, plan: Plan) -> tuple[tuple[float, ...], ...]:
    """[step][stage] gradient norms from replica 0's telemetry (empty if not recorded)."""
    from pipetrain.executor.telemetry import read_rank_file

    per_step: dict[int, dict[int, float]] = {}
    for r in range(plan.pp):  # replica 0 holds every stage; replicas hold identical (all-reduced) gradients
        for rec in read_rank_file(run_dir, r)["steps"]:
            norms = rec.get("stage_grad_norms")
            if not norms:
                return ()
            per_step.setdefault(int(rec["step"]), {}).update({int(k): float(v) for k, v in norms.items()})
    out = []
    for step in sorted(per_step):
        row = per_step[step]
        if sorted(row) != list(range(plan.num_stages)):
            return ()
        out.append(tuple(row[s] for s in range(plan.num_stages)))
    return tuple(out)


def _checkpoint_stage_states(art: RunArtifacts) -> dict[int, list[dict[str, Any]]]:
    """The final weights from the checkpoint of the last step (a sharded DCP checkpoint holds each
    tensor once, under the full model's names: one state dict per stage, a tied copy under its own name)."""
    from pipetrain.executor.checkpoint import latest_step, read_model_state
    from pipetrain.executor.stage import build_meta, load_spec, ties_of

    d = art.run_dir
    step = latest_step(d)
    if step is None or step != art.config.steps:
        raise RunError(f"{d} has no final weights: run with `pipetrain run ... --save-final` (or --validate) to validate parameters")
    state = read_model_state(d, step)
    for name, owner, users in ties_of(build_meta(load_spec(art.plan.model))):
        for u in users:
            state[f"blocks.{u}.{name}"] = state[f"blocks.{owner}.{name}"]
    out: dict[int, list[dict[str, Any]]] = {}
    for st in art.plan.stages:
        blocks = {str(b) for b in range(st.block_start, st.block_end)}
        out[st.index] = [{k: v for k, v in state.items() if k.split(".")[1] in blocks}]
    return out


def _final_stage_states(art: RunArtifacts) -> dict[int, list[dict[str, Any]]]:
    """Stage index -> that stage's final state dicts (one per replica)."""
    import torch

    d = art.run_dir
    files = sorted((d / "final").glob("rank*.pt"))
    if not files:
        return _checkpoint_stage_states(art)
    out: dict[int, list[dict[str, Any]]] = {}
    for f in files:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file is a corrupt run dir
            raise RunError(f"{f} is not a readable weights file ({type(exc).__name__}): re-run with --save-final") from None
        for s, sd in obj.items():
            out.setdefault(int(s), []).append(sd)
    return out


def _param_diffs(stage_states: dict[int, list[dict[str, Any]]], ref_state: dict[str, Any], num_stages: int) -> list[Any]:
    from pipetrain.validation.compare import StageParamDiff

    diffs = []
    for s in range(num_stages):
        if s not in stage_states:
            raise RunError(f"the run's final weights lack stage {s}: the run directory is incomplete; re-run with --save-final")
        max_abs, num2, den2 = 0.0, 0.0, 0.0
        for sd in stage_states[s]:
            for name, v in sd.items():
                if name not in ref_state or not v.is_floating_point():
                    continue
                d = (v.double() - ref_state[name].double())
                max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
                num2 += float(d.pow(2).sum())
                den2 += float(ref_state[name].double().pow(2).sum())
        diffs.append(StageParamDiff(stage=s, max_abs=max_abs, rel=math.sqrt(num2) / max(math.sqrt(den2), 1e-30)))
    return diffs


def _median(xs: tuple[float, ...] | list[float]) -> float:
    ys = sorted(xs[1:] if len(xs) > 1 else xs)  # the first step warms up
    return ys[len(ys) // 2] if ys else float("nan")


def throughput_statement(speedup: float, world_size: int) -> str:
    if speedup >= 1.0:
        return (f"the pipeline on {world_size} processes trains {speedup:.2f}x the tokens/s of one device "
                f"(a speedup of {speedup:.2f}x)")
    return (f"the pipeline on {world_size} processes trains {speedup:.2f}x the tokens/s of one device: "
            f"a slowdown of {1 / speedup:.2f}x")


def validate_run(run_dir: str | Path, *, progress: Callable[[str], None] | None = None, write: bool = True) -> ValidationReport:
    """Train the single-device reference for the run in ``run_dir`` and compare (module docstring)."""
    import time

    from pipetrain.validation.compare import compare_runs, tolerances_for
    from pipetrain.validation.reference import reference_run

    say = progress or (lambda _msg: None)
    art = load_run(run_dir)
    plan, cfg, res = art.plan, art.config, art.result
    stage_states = _final_stage_states(art)
    pipe_norms = _pipeline_stage_norms(art.run_dir, plan)
    say(f"training the single-device reference: {len(res.losses)} steps of {plan.model}")
    t0 = time.perf_counter()
    import torch

    device = "cuda" if plan.stages[0].on_gpu and torch.cuda.is_available() else "cpu"  # the device the pipeline ran on
    ref = reference_run(plan, steps=len(res.losses), dataset=cfg.dataset, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        momentum=cfg.momentum, clip_norm=cfg.clip_norm, device=device, threads=cfg.threads)
    elapsed = time.perf_counter() - t0
    params = _param_diffs(stage_states, ref.state, plan.num_stages)
    tokens = plan.global_batch * plan.seq_len
    pipe_tps = tokens / _median(res.step_times_s)
    ref_tps = tokens / _median(ref.step_times_s)
    tol = tolerances_for(plan.dtype)
    use_norms = bool(pipe_norms) and len(pipe_norms) == len(ref.stage_grad_norms)
    cmp = compare_runs(pipeline_loss=res.losses, reference_loss=ref.losses,
                       pipeline_grad_norms=pipe_norms if use_norms else None,
                       reference_grad_norms=ref.stage_grad_norms if use_norms else None,
                       params=params, tolerances=tol, pipeline_tokens_per_s=pipe_tps, reference_tokens_per_s=ref_tps)
    speedup = float(cmp.speedup or pipe_tps / ref_tps)
    fd = cmp.first_divergence
    report = ValidationReport(
        passed=cmp.passed, steps=len(res.losses), dtype=plan.dtype,
        tolerances={"loss_rtol": tol.loss_rtol, "grad_norm_rtol": tol.grad_norm_rtol, "param_atol": tol.param_atol,
                    "param_rtol": tol.param_rtol},
        pipeline_loss=tuple(res.losses), reference_loss=tuple(ref.losses), loss_abs_diff=cmp.loss_abs_diff,
        loss_rel_diff=cmp.loss_rel_diff, max_loss_rel_diff=cmp.max_loss_rel_diff,
        pipeline_stage_grad_norms=pipe_norms, reference_stage_grad_norms=tuple(ref.stage_grad_norms),
        param_max_abs_diff=tuple(p.max_abs for p in params), param_rel_diff=tuple(p.rel for p in params),
        pipeline_tokens_per_s=pipe_tps, reference_tokens_per_s=ref_tps, speedup=speedup,
        throughput=throughput_statement(speedup, plan.world_size),
        first_divergence_step=fd.step if fd else None, first_divergence_stage=fd.stage if fd else None,
        messages=cmp.messages if use_norms else cmp.messages + ("per-stage gradient norms were not recorded by this run",),
        elapsed_reference_s=elapsed)
    if write:
        out = art.run_dir / "validation.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        tmp.replace(out)
    return report


def load_validation(run_dir: str | Path) -> ValidationReport | None:
    """``RUN_DIR/validation.json`` if present (None otherwise; RunError if corrupt)."""
    from pipetrain.serde import from_dict

    p = Path(run_dir) / "validation.json"
    if not p.is_file():
        return None
    return from_dict(ValidationReport, _read_json(p, "validation result"), error=RunError)
