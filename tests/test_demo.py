"""`pipetrain demo` as a user runs it: calibrate -> plan -> predict -> run -> validate -> report, under 3 minutes.

The calibration is a small one seeded into the profile cache (the demo's own takes a minute or two;
its cache logic is tests/test_calibration_cache.py's): the demo must find and reuse it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _seed_calibration(cache_dir: Path) -> Path:
    """A quick calibration of the demo's shape (one round, no probes) where the demo looks for its own."""
    from pipetrain.calibration.cache import cache_path
    from pipetrain.calibration.run import run_calibration
    from pipetrain.commands.demo import DEMO_JOB, demo_calibration_key

    cal = run_calibration(str(DEMO_JOB["topology"]), models=(str(DEMO_JOB["model"]),), micro_batch_sizes=(1,), seq_len=32,
                          repeats=1, rounds=1, optimizers=("adamw",), probe=False, runtime=False)
    return cal.save(cache_path(demo_calibration_key(), cache_dir))


def test_demo_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    cal_path = _seed_calibration(tmp_path / "cache")
    t0 = time.perf_counter()
    script = Path(sys.executable).parent / "pipetrain"  # the console script the README's command runs
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipetrain"]
    r = subprocess.run([*cmd, "demo", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=200, cwd=tmp_path,
                       env={**os.environ, "PIPETRAIN_PROFILE_CACHE": str(tmp_path / "cache")})
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert elapsed < 180, f"demo took {elapsed:.0f} s"
    for phase in ("[1/6] calibrating", "[2/6] planning", "[3/6] predicting", "[4/6] running 50 steps", "[5/6] validating",
                  "[6/6] writing the report"):
        assert phase in r.stdout
    assert "reused the cached calibration" in r.stdout and str(cal_path) in r.stdout
    html = run_dir / "report" / "report.html"
    assert f"report: {html}" in r.stdout
    v = json.loads((run_dir / "validation.json").read_text())
    assert v["passed"] is True and v["steps"] == 50
    assert v["pipeline_loss"][-1] < v["pipeline_loss"][0] - 1.0  # it learned
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    med = summary["measured"]["median_step_time_s"]
    assert 0 < med < 5 and med in sorted(result["step_times_s"][1:])  # a real measured step, not the simulation
    assert summary["simulated"]["step_time_s"] != med
    page = html.read_text()
    assert f"{med * 1e3:.3g} ms" in page and "PASSED" in page
    assert summary["pp"] == 2 and summary["model"] == "tiny-gpt" and summary["steps"] == 50
    # the report shows what the demo's phases wrote: the run's simulation, the fidelity table, the planner's landscape
    sim = json.loads((run_dir / "simulation.json").read_text())
    assert summary["simulated"]["step_time_s"] == sim["result"]["step_time_s"] and "fidelity" in summary["sections"]
    land = json.loads((run_dir / "landscape.json").read_text())
    assert summary["landscape"] == land and land["chosen"] == [summary["num_microbatches"], 2] and 1 in land["ps"]
    # 1F1B pinned; the unpinned planner's choice and the pins' price printed
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["schedule"] == "1f1b" and plan["micro_batch_size"] == 1
    assert "unpinned, the planner would choose pp=" in r.stdout and "the pins cost" in r.stdout
    # three labelled numbers: both predictions beside the measurement, the same in predictions.json and the report
    pred = json.loads((run_dir / "predictions.json").read_text())
    fid = json.loads((run_dir / "fidelity.json").read_text())
    by = {p["label"]: p for p in pred["predictions"]}
    assert pred["measured_step_s"] == fid["meas_step_s"] and by["calibrated"]["step_time_s"] == sim["result"]["step_time_s"]
    assert by["analytic"]["step_time_s"] == pytest.approx(plan["predicted"]["step_time_s"])  # the planner's own prediction
    assert by["analytic"]["step_time_s"] != by["calibrated"]["step_time_s"] and fid["cost_source"] == "calibration"
    for p in by.values():
        assert p["error"] == pytest.approx((p["step_time_s"] - pred["measured_step_s"]) / pred["measured_step_s"])
    for label, key in (("predicted, analytic model:", "analytic"), ("predicted, calibrated:", "calibrated")):
        line = next(ln for ln in r.stdout.splitlines() if label in ln)
        assert f"{by[key]['step_time_s'] * 1e3:.3g} ms" in line and f"{by[key]['error'] * 100:+.1f}% vs measured" in line
    line = next(ln for ln in r.stdout.splitlines() if "measured median step:" in ln)
    assert f"{pred['measured_step_s'] * 1e3:.3g} ms" in line
    assert "predictions" in summary["sections"] and "Predictions vs measured" in page
    assert f"{by['calibrated']['step_time_s'] * 1e3:.3g} ms" in page and f"{by['analytic']['error'] * 100:+.1f}%" in page
    assert "Calibration reused from" in page and "Unpinned, the planner would choose" in page


def test_predictions_file_name_is_the_same_on_both_sides() -> None:
    # validation writes it, reports reads it; neither may import the other
    from pipetrain.reports.predictions import PREDICTIONS_FILE as read
    from pipetrain.validation.fidelity import PREDICTIONS_FILE as written

    assert read == written
