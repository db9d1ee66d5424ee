"""`pipetrain demo` as a user runs it: plan -> simulate -> run -> validate -> report, under 3 minutes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_demo_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    t0 = time.perf_counter()
    script = Path(sys.executable).parent / "pipetrain"  # the console script the README's command runs
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipetrain"]
    r = subprocess.run([*cmd, "demo", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=200, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert elapsed < 180, f"demo took {elapsed:.0f} s"
    for phase in ("[1/5] planning", "[2/5] simulating", "[3/5] running 50 steps", "[4/5] validating", "[5/5] writing the report"):
        assert phase in r.stdout
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
