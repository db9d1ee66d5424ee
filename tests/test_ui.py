"""``pipetrain ui``: the what-if page's JSON API (urllib, no browser) and the page in headless Chromium.

The server runs in this process, in a thread, on a free port, over tiny-gpt at pp=2 (6 blocks,
traced here). Expected step times come from the lowering and the simulator called directly on a
plan built independently of the page (``simple_plan`` at the edited knobs).
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from pipetrain.errors import PlanError  # noqa: E402
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.graph import LayerGraph  # noqa: E402
from pipetrain.plan import Plan  # noqa: E402
from pipetrain.planner.trace import trace_graph  # noqa: E402
from pipetrain.program import lower  # noqa: E402
from pipetrain.reports.rundir import read_run_dir  # noqa: E402
from pipetrain.simulator import simulate  # noqa: E402
from pipetrain.topology import resolve_topology  # noqa: E402
from pipetrain.ui import UiApp, UiServer, WhatIf, format_step_time, start_server  # noqa: E402

KW: dict[str, Any] = {"pp": 2, "m": 4, "mbs": 2, "seq_len": 16}


@pytest.fixture(scope="module")
def plan_and_graph() -> tuple[Plan, LayerGraph]:
    plan = simple_plan("tiny-gpt", **KW)
    return plan, trace_graph(plan.model, micro_batch_size=KW["mbs"], seq_len=KW["seq_len"], dtype=plan.dtype)


def _expected_step_s(graph: LayerGraph, **kw: Any) -> float:
    plan = simple_plan("tiny-gpt", **{**KW, **kw})
    prog = lower(plan, resolve_topology(f"local-cpu:{plan.world_size}"), None, graph=graph)
    assert prog.sim_input is not None
    return simulate(prog.sim_input).step_time_s


def _write_run_dir(d: Path, plan: Plan) -> None:
    """A finished run's files as `pipetrain run` and `pipetrain validate` leave them (the fields the readers use)."""
    d.mkdir(parents=True, exist_ok=True)
    plan.save(d / "plan.json")
    (d / "run_config.json").write_text(json.dumps({"plan_path": str(d / "plan.json")}))
    losses = [6.0, 5.5, 5.1, 4.8]
    (d / "result.json").write_text(json.dumps({"steps": [0, 1, 2, 3], "losses": losses, "step_times_s": [0.05, 0.02, 0.021, 0.019],
                                               "peak_tensor_bytes": [1, 1], "peak_rss_bytes": [1, 1], "backend": "gloo"}))
    (d / "validation.json").write_text(json.dumps({
        "passed": True, "steps": 4, "tolerances": {"loss": 1e-4}, "pipeline_loss": losses, "reference_loss": [6.0, 5.5, 5.2, 4.9],
        "max_loss_rel_diff": 2e-2, "pipeline_stage_grad_norms": [], "reference_stage_grad_norms": [], "param_max_abs_diff": [],
        "param_rel_diff": [], "pipeline_tokens_per_s": 1.0, "reference_tokens_per_s": 1.0, "speedup": 1.0, "throughput": "",
        "first_divergence_step": None, "first_divergence_stage": None, "messages": []}))
    (d / "fidelity.json").write_text(json.dumps({
        "sim_step_s": 0.02, "meas_step_s": 0.021, "step_error": -0.05, "sim_bubble": 0.2, "meas_bubble": 0.25, "cost_source": "test",
        "stages": [{"stage": s, "rank": s, "sim_busy_s": 0.01, "meas_busy_s": 0.0125, "busy_error": -0.2, "sim_bubble": 0.2,
                    "meas_bubble": 0.25, "sim_activation_bytes": 1e6, "meas_activation_bytes": 1.1e6, "activation_error": -0.09}
                   for s in range(2)]}))


@pytest.fixture
def served(tmp_path: Path, plan_and_graph: tuple[Plan, LayerGraph]) -> Iterator[tuple[UiServer, Path]]:
    """The page of a plan file in tmp_path/work (its directory is the only one the server may touch)."""
    plan, graph = plan_and_graph
    work = tmp_path / "work"
    work.mkdir()
    plan.save(work / "plan.json")
    (tmp_path / "secret.txt").write_text("outside")
    app = UiApp(whatif=WhatIf(plan, graph), save_dir=work, roots=(work,), source="plan.json", source_plan=work / "plan.json")
    server = start_server(app)
    try:
        yield server, work
    finally:
        server.close()


def _post(server: UiServer, path: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(server.url + path.lstrip("/"), data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _raw_get(server: UiServer, path: str) -> int:
    """GET with the path sent exactly as written (urllib and browsers would normalise ``..``)."""
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _state(server: UiServer) -> Any:
    with urllib.request.urlopen(server.url + "api/state", timeout=30) as r:
        return json.loads(r.read())


# ----- the JSON API ----------------------------------------------------------------------------------
def test_simulate_endpoint_returns_the_simulators_step_time(served: tuple[UiServer, Path], plan_and_graph: tuple[Plan, LayerGraph]) -> None:
    server, _ = served
    graph = plan_and_graph[1]
    state = _state(server)
    base_s = _expected_step_s(graph)
    assert state["evaluation"]["metrics"]["step_time_s"] == pytest.approx(base_s, rel=1e-12)
    knobs = dict(state["plan"]["knobs"], num_microbatches=8, boundaries=[2])
    status, ev = _post(server, "/api/simulate", {"knobs": knobs})
    want = _expected_step_s(graph, m=8, boundaries=[2], buffers=[2, 1])
    assert status == 200 and ev["ok"], ev
    assert ev["metrics"]["step_time_s"] == pytest.approx(want, rel=1e-12)
    assert ev["metrics"]["step_time_text"] == format_step_time(want) != format_step_time(base_s)
    assert [(s["block_start"], s["block_end"]) for s in ev["stages"]] == [(0, 2), (2, 6)]
    assert ev["metrics"]["evaluator"] == "simpy" and ev["svg"].startswith("<svg") and ev["svg"].count("<path") >= 4


def test_infeasible_edits_say_why(served: tuple[UiServer, Path], plan_and_graph: tuple[Plan, LayerGraph]) -> None:
    server, _ = served
    knobs = _state(server)["plan"]["knobs"]
    # GPipe keeps all 4 micro-batches in flight; stage 0 has 2 buffers: the lowering's ScheduleError
    _, ev = _post(server, "/api/simulate", {"knobs": dict(knobs, schedule="gpipe")})
    assert not ev["ok"] and ev["error_kind"] == "schedule" and "raise buffers to 4" in ev["error"]
    _, ev = _post(server, "/api/simulate", {"knobs": dict(knobs, schedule="gpipe", buffers=[4, 4])})
    assert ev["ok"], ev["error"]
    _, ev = _post(server, "/api/simulate", {"knobs": dict(knobs, boundaries=[6])})  # tiny-gpt has 6 blocks
    assert not ev["ok"] and ev["error_kind"] == "plan" and "must lie in 1..5" in ev["error"]
    status, err = _post(server, "/api/simulate", {"knobs": dict(knobs, buffers=[1])})  # a malformed request, not an edit
    assert status == 400 and "knobs.buffers" in err["error"]
    # a stage over its memory cap: simulated, and the memory model's reason
    plan, graph = plan_and_graph
    capped = replace(plan, stages=(replace(plan.stages[0], memory_cap_bytes=1e5), plan.stages[1]))
    ev2 = WhatIf(capped, graph).evaluate(WhatIf(capped, graph).knobs)
    assert ev2.result is not None and not ev2.feasible and ev2.error_kind == "memory"
    assert ev2.error.startswith("stage 0 needs") and "enable recompute" in ev2.error
    with pytest.raises(PlanError, match="infeasible"):
        WhatIf(capped, graph).plan_to_save(WhatIf(capped, graph).knobs)


def test_paths_outside_the_given_directories_are_refused(served: tuple[UiServer, Path]) -> None:
    server, work = served
    assert _raw_get(server, "/files/plan.json") == 200
    assert _raw_get(server, "/static/app.js") == 200
    for path in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files//etc/passwd", "/static/../server.py",
                 "/static/%2e%2e/%2e%2e/plan.py", "/files/../../../../etc/passwd"):
        assert _raw_get(server, path) == 403, path
    assert _raw_get(server, "/files/missing.json") == 404
    knobs = _state(server)["plan"]["knobs"]
    for name in ("../escaped.json", "/tmp/escaped.json"):
        status, _ = _post(server, "/api/save", {"knobs": knobs, "name": name})
        assert status == 403
    assert not (work.parent / "escaped.json").exists()
    status, err = _post(server, "/api/save", {"knobs": knobs, "name": "plan.json"})  # the plan it was opened with
    assert status == 400 and "another name" in err["error"]


def test_saved_plan_loads_and_passes_run_preflight(served: tuple[UiServer, Path], plan_and_graph: tuple[Plan, LayerGraph]) -> None:
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import preflight

    server, work = served
    knobs = dict(_state(server)["plan"]["knobs"], num_microbatches=6, boundaries=[4], recompute=[True, False])
    status, out = _post(server, "/api/save", {"knobs": knobs, "name": "edited.json"})
    assert status == 200, out
    saved = Plan.load(work / "edited.json")
    assert (saved.num_microbatches, saved.boundaries, [s.recompute for s in saved.stages]) == (6, (4,), [True, False])
    want = simple_plan("tiny-gpt", **{**KW, "m": 6, "boundaries": [4], "recompute": [0], "buffers": [2, 1]})
    assert [(s.inputs, s.outputs) for s in saved.stages] == [(s.inputs, s.outputs) for s in want.stages]
    assert saved.predicted is not None and saved.predicted.step_time_s == pytest.approx(out["step_time_s"])
    preflight(RunConfig(plan_path=str(work / "edited.json"), run_dir=str(work / "run"), steps=1), saved)


def test_run_dir_shows_the_measured_run(tmp_path: Path, plan_and_graph: tuple[Plan, LayerGraph]) -> None:
    plan, graph = plan_and_graph
    _write_run_dir(tmp_path / "run", plan)
    run = read_run_dir(tmp_path / "run")
    server = start_server(UiApp(whatif=WhatIf(run.plan, graph), save_dir=run.path, roots=(run.path,), run=run))
    try:
        dash = _state(server)["run"]
    finally:
        server.close()
    assert dash["losses"] == [6.0, 5.5, 5.1, 4.8] and dash["reference_losses"] == [6.0, 5.5, 5.2, 4.9]
    assert dash["loss_svg"].count("<polyline") == 2 and dash["validation"]["passed"] is True
    assert [s["busy_error"] for s in dash["fidelity_stages"]] == [-0.2, -0.2]
    assert dash["median_step_time_s"] == pytest.approx(0.02)  # the median after the warm-up step


# ----- the page in headless Chromium -------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_missing() -> str:
    if not os.path.exists(CHROMIUM):
        return f"Debian chromium not installed ({CHROMIUM})"
    if not os.path.exists(CHROMEDRIVER):
        return f"chromium-driver not installed ({CHROMEDRIVER}: apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[dev]')"
    return ""


@pytest.mark.skipif(bool(_browser_missing()) and not os.environ.get("CI"), reason=_browser_missing() or "browser present")
def test_page_edits_simulate_save_in_headless_chromium(tmp_path: Path, plan_and_graph: tuple[Plan, LayerGraph],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium manager must not download a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    plan, graph = plan_and_graph
    _write_run_dir(tmp_path / "run", plan)
    run = read_run_dir(tmp_path / "run")
    server = start_server(UiApp(whatif=WhatIf(run.plan, graph), save_dir=run.path, roots=(run.path,), source="run",
                                source_plan=run.path / "plan.json", run=run))
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

        def text(id_: str) -> str:
            return str(driver.find_element(By.ID, id_).text)

        assert text("step-time") == format_step_time(_expected_step_s(graph))
        assert driver.find_element(By.ID, "run-panel").is_displayed() and len(driver.find_elements(By.CSS_SELECTOR, "#fidelity-body tr")) == 2
        # micro-batches 4 -> 8 (typed), then the boundary 3 -> 2 (dragged on the block strip)
        mb = driver.find_element(By.ID, "microbatches")
        mb.clear()
        mb.send_keys("8")
        want = format_step_time(_expected_step_s(graph, m=8, buffers=[2, 1]))
        wait.until(lambda d: text("step-time") == want)
        # drag the handle between stage 0 and stage 1 one block to the left (6 blocks across the strip)
        handle = driver.find_element(By.ID, "handle-1")
        width = driver.find_element(By.ID, "blockstrip").size["width"]
        ActionChains(driver).click_and_hold(handle).move_by_offset(-width / 12, 0).move_by_offset(-width / 12, 0).release().perform()
        want = format_step_time(_expected_step_s(graph, m=8, boundaries=[2], buffers=[2, 1]))
        wait.until(lambda d: text("step-time") == want)
        assert text("blocks-0") == "0..1 (2)" and text("error") == ""
        assert driver.find_element(By.ID, "boundary-1").get_attribute("value") == "2"
        assert [driver.find_element(By.ID, f"blk-{i}").get_attribute("data-stage") for i in range(6)] == list("001111")
        # and back and forth with the "+" and "-" buttons beside the boundary's input
        driver.find_element(By.ID, "boundary-1-plus").click()
        wait.until(lambda d: text("blocks-0") == "0..2 (3)")
        driver.find_element(By.ID, "boundary-1-minus").click()
        wait.until(lambda d: text("step-time") == want and text("blocks-0") == "0..1 (2)")
        # infeasible: GPipe with 2 buffers on stage 0, then a boundary past the last block
        Select(driver.find_element(By.ID, "schedule")).select_by_value("gpipe")
        wait.until(lambda d: "raise buffers to 8" in text("error"))
        Select(driver.find_element(By.ID, "schedule")).select_by_value("1f1b")
        wait.until(lambda d: text("error") == "" and text("step-time") == want)
        b = driver.find_element(By.ID, "boundary-1")
        b.clear()
        b.send_keys("9")
        wait.until(lambda d: "must lie in 1..5" in text("error"))
        shot = tmp_path / "ui-infeasible.png"
        driver.save_screenshot(str(shot))
        b.clear()
        b.send_keys("2")
        wait.until(lambda d: text("error") == "" and text("step-time") == want)
        name = driver.find_element(By.ID, "save-name")
        name.clear()
        name.send_keys("whatif.json")
        driver.find_element(By.ID, "save").click()
        wait.until(lambda d: text("save-status").startswith("saved "))
        shot2 = tmp_path / "ui.png"
        driver.save_screenshot(str(shot2))
    finally:
        driver.quit()
        server.close()
    for s in (shot, shot2):
        assert s.is_file() and s.stat().st_size > 10_000 and s.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = Plan.load(run.path / "whatif.json")
    assert (saved.num_microbatches, saved.boundaries) == (8, (2,))
    assert saved.predicted is not None and format_step_time(saved.predicted.step_time_s) == want
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import preflight

    preflight(RunConfig(plan_path=str(run.path / "whatif.json"), run_dir=str(tmp_path / "run2"), steps=1), saved)


def test_cli_refuses_a_bad_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipetrain.cli import main

    (tmp_path / "x.txt").write_text("")
    assert main(["ui", str(tmp_path / "x.txt"), "--no-browser"]) == 2
    assert main(["ui", str(tmp_path / "missing.json"), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
