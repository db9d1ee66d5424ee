"""`pipetrain simulate`: table, JSON, trace and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipetrain.cli import main

BASE = ["simulate", "--stages", "4", "--microbatches", "8", "--t-fwd", "1", "--t-bwd", "2"]


def test_prints_step_time_bubble_and_samples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(BASE + ["--schedule", "1f1b", "--microbatch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "33 ms" in out  # (8 + 4 - 1) * 3 ms
    assert "27.3 %" in out  # 3 / 11
    assert "121.2" in out  # 2 * 8 / 0.033 / 4 samples/s per device


def test_grid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "-p", "2", "-m", "2", "--t-fwd", "1", "--t-bwd", "1", "--grid"]) == 0
    out = capsys.readouterr().out
    assert "   1 | 0F1    | 1B0" in out and "   3 | 0B1    | 1B1" in out


def test_json_stdout_and_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(BASE + ["--schedule", "interleaved", "--chunks", "2", "--json", "-"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["step_time_s"] == pytest.approx(8 * 3e-3 + 3 * 3e-3 / 2, rel=1e-9)
    assert d["num_stages"] == 8 and d["events"]
    trace = tmp_path / "trace.json"
    assert main(BASE + ["--schedule", "zb-h1", "--t-wgrad", "1", "--json", str(tmp_path / "r.json"), "--trace", str(trace)]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["schedule"] == "zb-h1"
    assert any(e.get("cat") == "W" for e in json.loads(trace.read_text())["traceEvents"])


def test_recv_mode_blocking_is_a_what_if(capsys: pytest.CaptureFixture[str]) -> None:
    """Megatron's blocking sends on the same program (tests/test_simulator.py has the timeline)."""
    argv = ["simulate", "-p", "2", "-m", "2", "--t-fwd", "1", "--t-bwd", "2", "--t-comm", "0.5", "--schedule", "gpipe", "--json", "-"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["step_time_s"] == pytest.approx(10e-3)
    assert main([*argv, "--recv-mode", "blocking"]) == 0
    assert json.loads(capsys.readouterr().out)["step_time_s"] == pytest.approx(11e-3)


def test_fast_evaluator_and_comm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(BASE + ["--t-comm", "0.5", "--evaluator", "fast", "--json", "-"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main(BASE + ["--t-comm", "0.5", "--json", "-"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert fast["step_time_s"] == pytest.approx(sim["step_time_s"], rel=1e-9) and sim["step_time_s"] > 0.033


def test_fewer_buffers_is_slower(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(BASE + ["--buffers", "1", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["step_time_s"] == pytest.approx(8 * 4 * 3e-3, rel=1e-9)  # one micro-batch at a time


@pytest.mark.parametrize("argv,msg", [
    (BASE[:-1] + ["-2"], "--t-bwd must be a time >= 0 ms, got -2.0"),
    (["simulate", "--stages", "4", "--microbatches", "8", "--t-fwd", "-1", "--t-bwd", "2"], "--t-fwd must be a time >= 0 ms"),
    (["simulate", "--stages", "0", "--microbatches", "8", "--t-fwd", "1", "--t-bwd", "2"], "--stages must be >= 1, got 0"),
    (BASE + ["--schedule", "pipedream"], "schedule 'pipedream' is unknown; choose one of gpipe, 1f1b, interleaved, zb-h1"),
    (BASE + ["--schedule", "interleaved", "--chunks", "2", "--microbatches", "6"], "multiple of the stages"),
    (["simulate", "--stages", "4"], "simulate needs --microbatches, --t-fwd, --t-bwd"),
    (BASE + ["--evaluator", "magic"], "--evaluator 'magic' is unknown"),
])
def test_bad_input_is_one_line_exit_2(argv: list[str], msg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and msg in err


@pytest.mark.slow
def test_simulating_a_plan_reproduces_its_prediction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    plan = tmp_path / "plan.json"
    assert main(["plan", str(root / "examples" / "tiny-gpt-cpu.yaml"), "-o", str(plan)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(plan), "--json", "-"]) == 0
    sim = json.loads(capsys.readouterr().out)
    predicted = json.loads(plan.read_text())["predicted"]
    assert sim["step_time_s"] == pytest.approx(predicted["step_time_s"], rel=1e-9)
    assert sim["peak_memory_bytes_per_stage"] == pytest.approx(predicted["peak_memory_bytes"], rel=1e-9)
    assert main(["simulate", str(plan), "--stages", "2"]) == 2
    assert "not both" in capsys.readouterr().err
