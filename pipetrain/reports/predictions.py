"""The run report's "Predictions vs measured" section, from ``RUN_DIR/predictions.json``.

``pipetrain demo`` predicts its step twice, with the analytic roofline the planner uses by default and
with this machine's calibration (:func:`pipetrain.validation.fidelity.report_run_fidelity` writes both
beside the measured median step). This section puts the numbers side by side, so that a reader sees
how far each cost model is from the machine. A run without the file (``pipetrain run``) gets no section.
Reads the file only; never simulates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.reports.html import Section

__all__ = ["PREDICTIONS_FILE", "read_predictions", "predictions_section", "predictions_sections"]

#: written by pipetrain.validation.fidelity (same name there: reports may not import validation)
PREDICTIONS_FILE = "predictions.json"


def read_predictions(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN_DIR/predictions.json as plain JSON, or None when absent; RunError naming the file when corrupt."""
    p = Path(run_dir) / PREDICTIONS_FILE
    if not p.is_file():
        return None
    fix = "delete it and re-run `pipetrain demo`"
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{p} is not readable JSON ({type(exc).__name__}): {fix}") from None
    if not isinstance(d, dict) or not isinstance(d.get("predictions"), list) or not isinstance(d.get("measured_step_s"), (int, float)):
        raise RunError(f"{p} is corrupt (no predictions or measured_step_s): {fix}")
    return d


def predictions_section(d: dict[str, Any], *, where: str = PREDICTIONS_FILE) -> Section:
    try:
        meas = float(d["measured_step_s"])
        rows = [(str(p["label"]), str(p["cost_source"]), f"{p['step_time_s'] * 1e3:.3g} ms", f"{p['error'] * 100:+.1f}%")
                for p in d["predictions"]]
        rows.append(("measured", f"median of {int(d['steps_measured'])} steps after warm-up", f"{meas * 1e3:.3g} ms", ""))
        notes = tuple(str(n) for n in d.get("notes", ()))
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{where} is corrupt ({type(exc).__name__}: {exc}): delete it and re-run `pipetrain demo`") from None
    para = ("The step time predicted before the run by each cost model, against the measured median step. Error is "
            "(predicted - measured) / measured. The analytic model knows only the device's datasheet; the calibration "
            "measured this machine's blocks, link, optimizer step, executor overheads and shared cores.")
    return Section(id="predictions", title="Predictions vs measured", paragraphs=(para, *notes),
                   tables=((("prediction", "cost model", "step time", "error"), tuple(rows)),))


def predictions_sections(run_dir: str | Path) -> list[Section]:
    """The section as a list: empty for a run without predictions.json (the hook in report.py extends with it)."""
    p = Path(run_dir)
    d = read_predictions(p)
    return [] if d is None else [predictions_section(d, where=str(p / PREDICTIONS_FILE))]
