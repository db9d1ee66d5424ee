"""`pipetrain plan -o` -> `pipetrain run` -> `pipetrain report` on a real (short) gloo run: sections, real numbers,
the files the run and the planner left (the report runs nothing), Chromium rendering, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.reports.browser import find_chromium  # noqa: E402
from pipetrain.reports.report import RUN_SECTIONS  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
STEPS = 4


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipetrain", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("report")
    # the planner pins every knob: a plan like simple_plan's, plus the landscape it leaves beside the plan file
    r = _cli("plan", "--model", "tiny-gpt", "--topology", "local-cpu:2", "--global-batch", "8", "--seq-len", "16", "--dtype", "fp32",
             "--pp", "2", "--dp", "1", "--microbatches", "4", "--microbatch-size", "2", "--schedule", "1f1b", "-o", str(d / "plan.json"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (d / "plan.landscape.json").is_file()
    run_dir = d / "run"
    r = _cli("run", str(d / "plan.json"), "--run-dir", str(run_dir), "--steps", str(STEPS), "--dataset", "stdlib-text", "--validate")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = _cli("report", str(run_dir))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"report: {run_dir / 'report' / 'report.html'}" in r.stdout
    return run_dir


def test_report_files_and_measured_numbers(reported: Path) -> None:
    out = reported / "report"
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    for sid in RUN_SECTIONS:
        assert f"<section id='{sid}'>" in html
    summary = json.loads((out / "summary.json").read_text())
    res = load_result(reported)
    assert summary["measured"]["median_step_time_s"] == pytest.approx(res.median_step_time_s)
    assert summary["measured"]["losses"] == pytest.approx(list(res.losses))
    assert f"{res.median_step_time_s * 1e3:.3g} ms" in html  # the real measured number is on the page
    assert all(b["compute_s"] > 0 for b in summary["measured"]["breakdown"])
    assert all(b["compute_s"] > 0 for b in summary["simulated"]["breakdown"])
    assert summary["simulated"]["step_time_s"] > 0 and summary["validation"]["passed"] is True
    # the simulation is the one `pipetrain run` wrote, not simulated again by the report
    written = json.loads((reported / "simulation.json").read_text())
    assert summary["simulated"]["step_time_s"] == written["result"]["step_time_s"]
    assert summary["simulated"]["cost_source"] == written["cost_source"] == json.loads((reported / "fidelity.json").read_text())["cost_source"]
    assert "fidelity" in summary["sections"]
    # the landscape is the one `pipetrain plan -o` left beside the plan file (every knob free: p=1 is in it)
    assert summary["landscape"] is not None and summary["landscape"]["chosen"] == [4, 2] and 1 in summary["landscape"]["ps"]
    assert summary["landscape"] == json.loads((reported.parent / "plan.landscape.json").read_text())
    for png in summary["pngs"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"timelines.png", "breakdown.png", "step_time.png", "memory.png", "convergence.png", "parameters.png",
            "landscape.png"} <= set(summary["pngs"])
    for name in ("trace_simulated.json", "trace_measured.json"):
        tr = json.loads((out / name).read_text())
        kinds = {e.get("cat") for e in tr["traceEvents"] if e["ph"] == "X"}
        assert {"F", "B"} <= kinds
    measured = json.loads((out / "trace_measured.json").read_text())["traceEvents"]
    assert len([e for e in measured if e["ph"] == "X" and e["cat"] == "F"]) == STEPS * 4 * 2  # steps x m x stages


def test_report_never_validates_simulates_or_searches(reported: Path, tmp_path: Path) -> None:
    """A copy of the run without validation.json, simulation.json and a landscape: the report says so and writes none of them."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reported, run, ignore=shutil.ignore_patterns("report", "final", "checkpoints"))
    for name in ("validation.json", "simulation.json", "fidelity.json"):
        (run / name).unlink()
    cfg = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**cfg, "plan_path": str(tmp_path / "elsewhere.json")}))  # no landscape there
    r = _cli("report", str(run), timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not any((run / n).exists() for n in ("validation.json", "simulation.json", "fidelity.json", "landscape.json"))
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["simulated"] is None and summary["validation"] is None and summary["landscape"] is None
    html = (run / "report" / "report.html").read_text()
    assert f"Not validated: run `pipetrain validate {run}`" in html and "Not simulated: simulation.json is missing" in html
    assert "No planner landscape for this plan" in html


@pytest.mark.skipif(find_chromium() is None and not os.environ.get("CI"), reason="Debian chromium not installed (CI installs it)")
def test_report_renders_in_headless_chromium(reported: Path) -> None:
    from pipetrain.reports.browser import check_page, screenshot

    page = check_page(reported / "report" / "report.html")
    assert set(RUN_SECTIONS) <= set(page.sections)
    assert len(page.images) >= 8 and page.blank_images == ()
    assert all(i["width"] > 200 and i["variance"] > 0 for i in page.images)
    shot = screenshot(reported / "report" / "report.html", reported / "report" / "screenshot.png", height=6000)
    assert shot.stat().st_size > 20000  # kept in the run directory as the test artifact


def test_missing_or_corrupt_run_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    r = _cli("report", str(tmp_path / "missing"), timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("report", str(empty), timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "plan.json" in r.stderr
    bad = tmp_path / "corrupt"
    bad.mkdir()
    simple_plan("tiny-gpt", pp=2, m=2, mbs=1, seq_len=8).save(bad / "plan.json")
    (bad / "run_config.json").write_text(json.dumps({"plan_path": str(bad / "plan.json"), "steps": 2}))
    (bad / "result.json").write_text('{"model": "tiny-gpt", "pp": 2,')  # torn write
    r = _cli("report", str(bad), timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "corrupt" in r.stderr and "Traceback" not in r.stderr
