"""What a finished run directory holds, read as files: the report runs nothing.

``pipetrain report`` reads only what other commands wrote (and imports no runtime, no torch):

* ``plan.json``, ``run_config.json``, ``result.json``: ``pipetrain run`` (:func:`read_run_dir`);
* ``telemetry/rank*.jsonl``: the workers (:func:`pipetrain.timeline.read_telemetry`);
* ``simulation.json``: ``pipetrain run``, which simulates the plan as executed after the run
  (:func:`read_run_simulation`);
* ``fidelity.json``: ``pipetrain run``, simulated against measured (:func:`read_fidelity`);
* ``validation.json``: ``pipetrain validate`` or ``pipetrain run --validate`` (:func:`read_validation`);
* the planner's landscape (:func:`pipetrain.reports.landscape.find_run_landscape`).

A missing optional file comes back as None with a note saying which command writes it; a
missing or corrupt required file, or a corrupt optional one, is a RunError saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipetrain.errors import PipetrainError, RunError
from pipetrain.plan import Plan
from pipetrain.serde import from_dict
from pipetrain.simulator.result import SIMULATION_FILE, SimulationRecord, load_simulation

__all__ = ["MeasuredRun", "RunDir", "ValidationView", "read_run_dir", "read_run_simulation", "read_validation", "read_fidelity",
           "FIDELITY_FILE", "VALIDATION_FILE"]

FIDELITY_FILE = "fidelity.json"
VALIDATION_FILE = "validation.json"


@dataclass(frozen=True, kw_only=True)
class MeasuredRun:
    """The part of ``result.json`` (the executor's RunResult) a report shows."""

    steps: tuple[int, ...]
    losses: tuple[float, ...]
    step_times_s: tuple[float, ...]
    peak_tensor_bytes: tuple[int, ...]  # per global rank
    peak_rss_bytes: tuple[int, ...]
    backend: str = "gloo"

    @property
    def median_step_time_s(self) -> float:
        """Median step after the first (warm-up), as RunResult defines it."""
        xs = sorted(self.step_times_s[1:] or self.step_times_s)
        return xs[len(xs) // 2]


@dataclass(frozen=True, kw_only=True)
class RunDir:
    path: Path
    plan: Plan
    result: MeasuredRun
    plan_path: str  # the plan file the run was started with (run_config.json), "" when not recorded


@dataclass(frozen=True, kw_only=True)
class ValidationView:
    """The part of ``validation.json`` (validation's ValidationReport) a report shows."""

    passed: bool
    steps: int
    tolerances: dict[str, float]
    pipeline_loss: tuple[float, ...]
    reference_loss: tuple[float, ...]
    max_loss_rel_diff: float
    pipeline_stage_grad_norms: tuple[tuple[float, ...], ...]
    reference_stage_grad_norms: tuple[tuple[float, ...], ...]
    param_max_abs_diff: tuple[float, ...]
    param_rel_diff: tuple[float, ...]
    pipeline_tokens_per_s: float
    reference_tokens_per_s: float
    speedup: float
    throughput: str
    first_divergence_step: int | None
    first_divergence_stage: int | None
    messages: tuple[str, ...]


def _read_json(p: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{p} is not readable JSON ({type(exc).__name__}): the {what} is corrupt; {fix}") from None


def _known(cls: type, d: Any, p: Path, what: str, fix: str) -> Any:
    """``cls`` from the keys of ``d`` it names (the file may hold more); RunError naming the file when it does not fit."""
    if not isinstance(d, dict):
        raise RunError(f"{p} is corrupt (not a JSON object): the {what} is unreadable; {fix}")
    names = {f.name for f in fields(cls)}
    try:
        return from_dict(cls, {k: v for k, v in d.items() if k in names}, error=RunError)
    except PipetrainError as exc:
        raise RunError(f"{p} is corrupt ({exc}): {fix}") from None


def read_run_dir(run_dir: str | Path) -> RunDir:
    """Plan and measured result of a finished run, or a RunError saying what is missing or corrupt."""
    d = Path(run_dir)
    if not d.is_dir():
        raise RunError(f"run directory {str(d)!r} does not exist: give the --run-dir of a finished `pipetrain run`")
    for name in ("plan.json", "run_config.json", "result.json"):
        if not (d / name).is_file():
            raise RunError(f"{d} has no {name}: it is not the directory of a finished `pipetrain run` (re-run it with --run-dir {d})")
    try:
        plan = Plan.from_json((d / "plan.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{d / 'plan.json'} is unreadable ({exc})") from None
    rerun = "re-run `pipetrain run`"
    config = _read_json(d / "run_config.json", "run configuration", rerun)
    if not isinstance(config, dict) or "plan_path" not in config:
        raise RunError(f"{d / 'run_config.json'} is corrupt: {rerun}")
    result = _known(MeasuredRun, _read_json(d / "result.json", "run result", rerun), d / "result.json", "run result", rerun)
    if not (len(result.steps) == len(result.losses) == len(result.step_times_s)) or not result.steps:
        raise RunError(f"{d / 'result.json'} is corrupt (steps, losses and step times differ in length or are empty): {rerun}")
    return RunDir(path=d, plan=plan, result=result, plan_path=str(config.get("plan_path") or ""))


def read_run_simulation(run_dir: str | Path, plan: Plan) -> tuple[SimulationRecord | None, str]:
    """(RUN_DIR/simulation.json, note): None and why when the run left none or it is of another plan."""
    p = Path(run_dir) / SIMULATION_FILE
    rec = load_simulation(p, error=RunError)
    if rec is None:
        return None, (f"Not simulated: {p.name} is missing. `pipetrain run` simulates the plan after the run and writes it "
                      f"(runs with --no-telemetry, and runs from before it did, have none): re-run `pipetrain run` to get it.")
    r = rec.result
    if (r.schedule, r.num_stages, r.num_microbatches, r.micro_batch_size) != (plan.schedule, plan.num_stages, plan.num_microbatches,
                                                                             plan.micro_batch_size):
        return None, (f"Not simulated: {p} simulates another plan ({r.schedule}, {r.num_stages} stages, m={r.num_microbatches}, "
                      f"micro-batch {r.micro_batch_size}), left by an earlier run in this directory: re-run `pipetrain run`.")
    return rec, ""


def read_validation(run_dir: str | Path, result: MeasuredRun) -> tuple[ValidationView | None, str]:
    """(RUN_DIR/validation.json, note): None and why when the run was not validated (or validated as an earlier run)."""
    p = Path(run_dir) / VALIDATION_FILE
    how = f"run `pipetrain validate {Path(run_dir)}` (needs the run's final weights: `pipetrain run ... --save-final`)"
    if not p.is_file():
        return None, f"Not validated: {how}."
    fix = f"delete it and {how}"
    v = _known(ValidationView, _read_json(p, "validation result", fix), p, "validation result", fix)
    if tuple(v.pipeline_loss) != tuple(result.losses):
        return None, f"Not validated: {p.name} belongs to an earlier run in this directory (its losses differ): {how}."
    return v, ""


def read_fidelity(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN_DIR/fidelity.json (simulated vs measured, written by ``pipetrain run``) as plain JSON, or None."""
    p = Path(run_dir) / FIDELITY_FILE
    if not p.is_file():
        return None
    d = _read_json(p, "simulated-vs-measured summary", "delete it and re-run `pipetrain run`")
    if not isinstance(d, dict) or not isinstance(d.get("stages"), list):
        raise RunError(f"{p} is corrupt: delete it and re-run `pipetrain run`")
    return d
