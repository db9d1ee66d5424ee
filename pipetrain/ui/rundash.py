"""The measured run beside the simulation: what a RUN_DIR holds, for the page.

Reads files only, through the report's torch-free readers (:mod:`pipetrain.reports.rundir`):
``result.json`` (the pipeline's losses and step times), ``validation.json`` (the single-device
reference's losses), ``fidelity.json`` (simulated against measured, per stage). A missing
optional file is a note saying which command writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipetrain.reports.rundir import RunDir, read_fidelity, read_validation
from pipetrain.ui.svg import loss_svg

__all__ = ["run_dashboard"]


def run_dashboard(run: RunDir) -> dict[str, Any]:
    """The run's dashboard as the page's JSON: measured step, loss curves (SVG), per-stage errors."""
    res = run.result
    val, val_note = read_validation(run.path, res)
    series: list[tuple[str, str, tuple[float, ...]]] = [("pipeline (measured)", "#d62728", res.losses)]
    if val is not None:
        series.append(("single device (reference)", "#1f77b4", val.reference_loss))
    fid = read_fidelity(run.path)
    stages = []
    if fid is not None:
        for s in fid["stages"]:
            stages.append({k: s.get(k) for k in ("stage", "rank", "sim_busy_s", "meas_busy_s", "busy_error", "sim_bubble", "meas_bubble",
                                                 "sim_activation_bytes", "meas_activation_bytes", "activation_error")})
    return {
        "run_dir": str(Path(run.path)),
        "steps": len(res.steps),
        "backend": res.backend,
        "median_step_time_s": res.median_step_time_s,
        "losses": list(res.losses),
        "reference_losses": list(val.reference_loss) if val is not None else None,
        "validation": None if val is None else {"passed": val.passed, "max_loss_rel_diff": val.max_loss_rel_diff,
                                                "speedup": val.speedup, "messages": list(val.messages)},
        "validation_note": val_note,
        "loss_svg": loss_svg(series),
        "fidelity": None if fid is None else {k: fid.get(k) for k in ("sim_step_s", "meas_step_s", "step_error", "sim_bubble",
                                                                     "meas_bubble", "cost_source")},
        "fidelity_note": "" if fid is not None else "No fidelity.json: `pipetrain run` writes it (runs with --no-telemetry have none).",
        "fidelity_stages": stages,
    }
