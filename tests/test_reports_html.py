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
    # memory.json: one GPU per pipeline rank, whose components add up to the plan's predicted peak of its stage
    gpus = summary["memory_per_gpu"]
    assert [g["rank"] for g in gpus] == [0, 1] and [g["stages"] for g in gpus] == [[0], [1]]
    for g, peak in zip(gpus, summary["predicted_memory_bytes_per_stage"]):
        parts = sum(g[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "buffers_bytes"))
        assert parts == pytest.approx(peak, rel=1e-3) and g["weights_bytes"] > 0 and g["optimizer_bytes"] == 2 * g["weights_bytes"]
    trace = json.loads((out / "trace_simulated.json").read_text())
    assert sum(1 for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "F") == 2 * summary["num_microbatches"]
    # neighbourhood.json: the m curve keeps the global batch (8 = m x micro-batch), one point is the plan
    near = summary["neighbourhood"]
    curve = [p for p in near if p["axis"] == "microbatches"]
    assert [p["num_microbatches"] * p["micro_batch_size"] for p in curve] == [8] * len(curve) and len(curve) >= 3
    assert sum(p["chosen"] for p in curve) == 1 and {p["micro_batch_size"] for p in curve} == {1, 2, 4, 8}
    for p in near:
        if p["step_time_s"] is not None:
            assert p["tokens_per_s"] == pytest.approx(p["global_batch"] * 32 / p["step_time_s"], rel=1e-9)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "https://" not in html
    if find_chromium() is not None:
        got = check_page(out / "report.html")
        assert set(PLAN_SECTIONS) <= set(got.sections) and got.blank_images == () and len(got.images) == 6


# ----- the run report reads files only; names are escaped --------------------------------------------
EVIL_MODEL = "<script>alert(1)</script>"
EVIL_TOPOLOGY = "<img src=x onerror=alert(2)>"


def _evil_plan(m: int = 2):  # -> Plan
    from pipetrain.plan import Plan, StagePlan

    stages = tuple(StagePlan(index=s, block_start=s, block_end=s + 1, rank=s, device=f"cpu{s}", buffers=2,
                             predicted_peak_memory_bytes=float(4 << 20)) for s in range(2))
    return Plan(model=EVIL_MODEL, graph_fingerprint="x", topology=EVIL_TOPOLOGY, pp=2, dp=1, micro_batch_size=2,
                num_microbatches=m, seq_len=16, schedule="gpipe", stages=stages)


def _fake_run(d, steps: int = 3):  # -> Path
    """A run directory as `pipetrain run --no-telemetry`-free runs leave it, written by hand: no torch needed.
    GPipe, 2 stages, 2 micro-batches; F = 2 ms, B = 4 ms; every step starts 30 ms after the previous one."""
    import json

    plan = _evil_plan()
    d.mkdir(parents=True, exist_ok=True)
    plan.save(d / "plan.json")
    (d / "run_config.json").write_text(json.dumps({"plan_path": str(d / "plan.json"), "steps": steps}))
    times = [0.025, 0.021, 0.022][:steps]
    (d / "result.json").write_text(json.dumps({
        "model": plan.model, "pp": 2, "dp": 1, "schedule": "gpipe", "num_microbatches": 2, "global_batch": 4,
        "steps": list(range(steps)), "losses": [3.0 - 0.1 * s for s in range(steps)], "step_times_s": times, "grad_norms": [1.0] * steps,
        "peak_tensor_bytes": [5 << 20, 6 << 20], "peak_rss_bytes": [100 << 20, 100 << 20], "peak_activation_bytes": [0, 0],
        "events": [], "backend": "gloo"}))
    tel = d / "telemetry"
    tel.mkdir()
    for r in range(2):
        lines = []
        for step in range(steps):
            b = 30.0 * step
            spans = ([("F", 0, 0, 2), ("F", 1, 2, 4), ("B", 0, 12, 16), ("B", 1, 16, 20)] if r == 0 else
                     [("F", 0, 3, 5), ("F", 1, 5, 7), ("B", 0, 7, 11), ("B", 1, 11, 15)])
            for kind, mb, a, e in spans:
                lines.append({"type": "event", "stage": r, "rank": r, "kind": kind, "microbatch": mb, "start_s": (b + a) / 1e3,
                              "end_s": (b + e) / 1e3, "bytes": 0, "step": step})
            lines.append({"type": "step", "rank": r, "step": step, "step_time_s": times[step], "memory": {}})
        (tel / f"rank{r}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def _sim(m: int = 2):  # -> SimResult
    from pipetrain.simulator import simulate, uniform

    return simulate(uniform(2, m, "gpipe", t_fwd_s=2e-3, t_bwd_s=4e-3, t_comm_s=1e-3, micro_batch_size=2, seq_len=16,
                            activation_bytes=1 << 20, static_bytes=2 << 20))


def test_run_report_imports_no_runtime_and_says_what_is_missing(tmp_path) -> None:
    """Without simulation.json, validation.json and a landscape the report is still written, runs nothing
    (no torch, executor, validation, planner or calibration module is even imported) and says which command writes each."""
    import json
    import subprocess
    import sys

    run = _fake_run(tmp_path / "run")
    code = ("import json, sys\n"
            "from pipetrain.reports.report import write_run_report\n"
            f"write_run_report({str(run)!r})\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'pipetrain.executor', "
            "'pipetrain.validation', 'pipetrain.planner', 'pipetrain.calibration', 'pipetrain.commands', 'pipetrain.cli')))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["simulated"] is None and summary["validation"] is None and summary["landscape"] is None
    assert summary["traces"] == ["trace_measured.json"]  # no simulated trace without a simulation
    assert summary["measured"]["median_step_time_s"] == pytest.approx(0.022)  # median of the steps after the warm-up
    assert summary["measured"]["breakdown"][0]["compute_s"] == pytest.approx(0.012)  # 2 x (2 ms F + 4 ms B)
    html = (run / "report" / "report.html").read_text()
    assert "Not simulated: simulation.json is missing" in html
    assert f"Not validated: run `pipetrain validate {run}`" in html
    assert "No planner landscape for this plan" in html
    for sid in ("plan", "timelines", "breakdown", "step-time", "memory", "convergence", "parameters", "landscape"):
        assert f"<section id='{sid}'>" in html


def test_run_report_shows_the_files_the_run_wrote_and_escapes_names(tmp_path) -> None:
    import json

    from pipetrain.reports.landscape import LANDSCAPE_FILE, Landscape, write_landscape
    from pipetrain.reports.report import write_run_report
    from pipetrain.simulator.result import SIMULATION_FILE, SimulationRecord, save_simulation

    run = _fake_run(tmp_path / "run")
    sim = _sim()
    save_simulation(run / SIMULATION_FILE, SimulationRecord(result=sim, topology=EVIL_TOPOLOGY, cost_source="unit test costs"))
    (run / "validation.json").write_text(json.dumps({
        "passed": True, "steps": 3, "dtype": "fp32", "tolerances": {"loss_rtol": 1e-4, "grad_norm_rtol": 1e-3, "param_atol": 1e-5,
                                                                    "param_rtol": 1e-4},
        "pipeline_loss": [3.0, 2.9, 2.8], "reference_loss": [3.0, 2.9, 2.8], "loss_abs_diff": [0, 0, 0], "loss_rel_diff": [0, 0, 0],
        "max_loss_rel_diff": 0.0, "pipeline_stage_grad_norms": [], "reference_stage_grad_norms": [], "param_max_abs_diff": [0.0, 0.0],
        "param_rel_diff": [0.0, 0.0], "pipeline_tokens_per_s": 2000.0, "reference_tokens_per_s": 1000.0, "speedup": 2.0,
        "throughput": "a speedup of 2.00x <b>", "first_divergence_step": None, "first_divergence_stage": None, "messages": [],
        "elapsed_reference_s": 1.0}))
    nan = float("nan")
    write_landscape(run / LANDSCAPE_FILE, Landscape(ps=(1, 2), ms=(1, 2), step_time_s=((0.04, 0.03), (nan, 0.02)),
                                                    status=(("ok", "ok"), ("infeasible", "ok")), chosen=(2, 2), source="unit test",
                                                    model=EVIL_MODEL, topology=EVIL_TOPOLOGY, global_batch=4, seq_len=16, dtype="fp32"))
    out = write_run_report(run)
    d = out.data
    assert d["simulated"]["step_time_s"] == sim.step_time_s  # the run's simulation as written, not simulated again
    assert d["simulated"]["breakdown"][0]["compute_s"] == pytest.approx(0.012)  # 2 x (2 ms F + 4 ms B)
    assert d["measured_over_simulated_step_time"] == pytest.approx(0.022 / sim.step_time_s)
    assert d["validation"]["passed"] is True and d["landscape"]["chosen"] == [2, 2]
    assert {"timelines.png", "convergence.png", "parameters.png", "landscape.png"} <= set(d["pngs"])
    trace = json.loads((out.html.parent / "trace_simulated.json").read_text())
    assert sum(1 for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "F") == 4  # 2 stages x m=2
    html = out.html.read_text()
    assert "PASSED" in html and "Timelines: simulated vs measured" in html
    # every user-chosen string is escaped, in the title, the paragraphs and the tables; the report's own markup is not
    assert "<script>" not in html and "<img src=x" not in html and "speedup of 2.00x <b>" not in html
    assert f"<title>pipetrain report: {EVIL_MODEL.replace('<', '&lt;').replace('>', '&gt;')}, pp=2" in html
    assert "<b>&lt;script&gt;alert(1)&lt;/script&gt;</b> on <b>&lt;img src=x onerror=alert(2)&gt;</b>" in html
    assert "Simulated on &lt;img src=x onerror=alert(2)&gt; (unit test costs)" in html
    assert "<span class='pass'>PASSED</span>" in html


def test_run_report_refuses_a_simulation_of_another_plan_and_a_corrupt_one(tmp_path) -> None:
    from pipetrain.errors import RunError
    from pipetrain.reports.report import write_run_report
    from pipetrain.simulator.result import SIMULATION_FILE, SimulationRecord, save_simulation

    run = _fake_run(tmp_path / "run")
    save_simulation(run / SIMULATION_FILE, SimulationRecord(result=_sim(m=4), topology="t", cost_source="c"))
    out = write_run_report(run)
    assert out.data["simulated"] is None and "simulates another plan (gpipe, 2 stages, m=4" in out.data["notes"]["simulation"]
    (run / SIMULATION_FILE).write_text('{"format": "pipetrain.simulation/1", "result": {"step_time_s": ')  # torn write
    with pytest.raises(RunError, match="corrupt.*delete it and re-run"):
        write_run_report(run)


def test_sim_result_round_trips_through_json() -> None:
    import json

    from pipetrain.simulator import SimResult

    sim = _sim()
    back = SimResult.from_dict(json.loads(json.dumps(sim.to_dict())))
    assert back == sim and back.events == sim.events and back.memory_timeline_per_stage == sim.memory_timeline_per_stage


def test_render_escapes_everything_but_markup() -> None:
    from pipetrain.reports.html import Markup, render_html

    page = render_html("<u1>", [Section(id="a'b", title="<u2>", paragraphs=("x < y", Markup("<code>{}</code>").format("<z>")),
                                        tables=((("<u3>",), (("<u4>",),)),), figures=(("<u5>", b"\x89PNG"),))], subtitle="<u6>")
    assert "<u" not in page and all(f"&lt;u{i}&gt;" in page for i in range(1, 7))
    assert "<p>x &lt; y</p>" in page and "<p><code>&lt;z&gt;</code></p>" in page and "id='a&#39;b'" in page
    assert "src='data:image/png;base64,iVBORw=='" in page  # images stay embedded: the page is self-contained


def test_plan_report_escapes_names(tmp_path) -> None:
    from pipetrain.reports.plan_report import write_plan_report
    from pipetrain.simulator.result import SIMULATION_FILE, SimulationRecord, save_simulation

    plan = _evil_plan()
    save_simulation(tmp_path / SIMULATION_FILE, SimulationRecord(result=_sim(), topology=plan.topology, cost_source="unit test"))
    out = write_plan_report(plan, tmp_path)
    html = out.html.read_text()
    assert "<script>" not in html and "<img src=x" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert out.data["landscape"] is None and "No planner landscape" in html  # no landscape.json: said, not searched
    assert out.data["simulated"]["step_time_s"] > 0
