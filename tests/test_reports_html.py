from __future__ import annotations

import math
import os

import pytest
from matplotlib.figure import Figure

from pipetrain.events import Event, to_chrome_trace
from pipetrain.reports import charts
from pipetrain.reports.browser import check_page, find_chromium, screenshot
from pipetrain.reports.figures import timelines_side_by_side
from pipetrain.reports.html import Section, figure_png, write_report

needs_chromium = pytest.mark.skipif(find_chromium() is None and not os.environ.get("CI"),
                                    reason="Debian chromium not installed (CI installs it)")


def _events() -> list[Event]:
    return [Event(stage=s, rank=s, kind=k, microbatch=m, start_s=(t + m + s) / 1e3, end_s=(t + m + s + 1) / 1e3)
            for s in range(2) for m in range(3) for k, t in (("F", 0), ("B", 5))]


def test_chrome_trace_has_one_complete_event_per_event_in_microseconds() -> None:
    tr = to_chrome_trace(_events())
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 12
    f = next(e for e in xs if e["name"] == "1F2")
    assert f["ts"] == pytest.approx(3000.0) and f["dur"] == pytest.approx(1000.0) and f["tid"] == 1
    assert "cpu_ms" not in f["args"]
    # a measured CPU span carries its thread CPU time into the trace (and through to_dict / from_dict)
    e = Event.from_dict(dict(_events()[0].to_dict(), cpu_s=0.0007))
    assert e.cpu_s == 0.0007 and e.to_dict()["cpu_s"] == 0.0007 and "cpu_s" not in _events()[0].to_dict()
    (x,) = [t for t in to_chrome_trace([e])["traceEvents"] if t["ph"] == "X"]
    assert x["args"]["cpu_ms"] == pytest.approx(0.7)


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path) -> None:
    blank = Figure(figsize=(2, 2))
    blank.add_subplot().set_axis_off()
    sections = [
        Section(id="timelines", title="Timelines", figures=(("sim vs run", figure_png(timelines_side_by_side(_events(), _events()))),)),
        Section(id="landscape", title="Landscape", figures=(("m x p", figure_png(charts.landscape_figure([2, 4], [1, 2], [[1.0, math.nan], [0.5, 0.4]]))),)),
        Section(id="blank", title="Blank", figures=(("white", figure_png(blank)),)),
    ]
    page = write_report(tmp_path / "report.html", "test report", sections)
    got = check_page(page)
    assert got.sections == ("timelines", "landscape", "blank")
    assert [i["alt"] for i in got.images] == ["sim vs run", "m x p", "white"]
    # the probe really measures pixels: the all-white figure is caught as blank, the charts are not
    assert got.blank_images == ("white",)
    assert all(i["width"] > 100 for i in got.images)
    shot = screenshot(page, tmp_path / "report.png", height=800)
    assert shot.stat().st_size > 5000


@pytest.mark.timeout(240)
def test_plan_report_what_if(tmp_path, capsys) -> None:
    """`pipetrain plan ... --report DIR`: the plan-only report, with a simulated trace and the landscape."""
    import json

    from pipetrain.cli import main
    from pipetrain.reports.plan_report import PLAN_SECTIONS

    out = tmp_path / "whatif"
    rc = main(["plan", "--model", "tiny-gpt", "--topology", "local-cpu:2", "--global-batch", "8", "--seq-len", "32",
               "--dtype", "fp32", "--pp", "2", "--report", str(out)])
    assert rc == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert tuple(summary["sections"]) == PLAN_SECTIONS
    land = summary["landscape"]
    assert land["chosen"][1] == 2 and 1 in land["ps"] and 2 in land["ps"]  # every knob free: p=1 is in the landscape
    ok = [(p, m) for i, p in enumerate(land["ps"]) for j, m in enumerate(land["ms"]) if land["status"][i][j] == "ok"]
    assert len(ok) >= 3 and all(land["step_time_s"][land["ps"].index(p)][land["ms"].index(m)] > 0 for p, m in ok)
    assert summary["simulated"]["step_time_s"] > 0 and summary["alternatives"]
    trace = json.loads((out / "trace_simulated.json").read_text())
    assert sum(1 for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "F") == 2 * summary["num_microbatches"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "https://" not in html
    if find_chromium() is not None:
        got = check_page(out / "report.html")
        assert set(PLAN_SECTIONS) <= set(got.sections) and got.blank_images == () and len(got.images) == 4
