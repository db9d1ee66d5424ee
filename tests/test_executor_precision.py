"""Recomputation and bf16 on real gloo runs (tiny-gpt, p=2, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
DATA = "stdlib-text"
#: bf16 pipeline vs bf16 single-process reference, per-step relative loss difference allowed
BF16_REL_TOL = 1e-2


def _start(plan_path: Path, run_dir: Path, steps: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipetrain.executor.launch", str(plan_path), "--run-dir", str(run_dir), "--steps",
                             str(steps), "--dataset", DATA], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(p: subprocess.Popen[str]) -> None:
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    assert p.returncode == 0, err[-3000:]


def _stage_activation_peak(run_dir: Path, rank: int) -> int:
    steps = [r for r in read_telemetry(run_dir)[rank] if r["type"] == "step"]
    peaks = {s["memory"]["activation_bytes_peak"] for s in steps}
    # counted by saved-tensor hooks in the first step, then reused (static shapes): every step agrees
    assert len(peaks) == 1, peaks
    return peaks.pop()


def test_recompute_same_losses_less_activation_memory(tmp_path: Path) -> None:
    kw = dict(pp=2, m=4, mbs=4, seq_len=64)
    plain = simple_plan("tiny-gpt", **kw)
    recomp = simple_plan("tiny-gpt", recompute=(0,), **kw)
    assert recomp.stages[0].recompute and not recomp.stages[1].recompute
    plain.save(tmp_path / "plain.json")
    recomp.save(tmp_path / "recomp.json")
    # side by side: a launch is mostly interpreters starting, which leaves the cores partly idle
    started = [_start(tmp_path / "plain.json", tmp_path / "plain", 6), _start(tmp_path / "recomp.json", tmp_path / "recomp", 6)]
    for p in started:
        _wait(p)
    a, b = load_result(tmp_path / "plain"), load_result(tmp_path / "recomp")
    assert a.losses == b.losses  # recomputation replays the same forward: bit-identical
    act_plain = _stage_activation_peak(tmp_path / "plain", 0)
    act_recomp = _stage_activation_peak(tmp_path / "recomp", 0)
    # stage 0 (embed, layer.0, layer.1) recomputes layer by layer: per in-flight micro-batch (2) it
    # keeps each block's input, the 4 x 64 int64 ids and two [4, 64, 64] fp32 hidden states
    assert act_recomp == 2 * (4 * 64 * 8 + 2 * 4 * 64 * 64 * 4)
    assert act_plain > 3 * act_recomp, (act_plain, act_recomp)
    # the stage without recomputation is unchanged
    assert _stage_activation_peak(tmp_path / "plain", 1) == _stage_activation_peak(tmp_path / "recomp", 1)


def test_bf16_trains_and_tracks_single_device_bf16(tmp_path: Path) -> None:
    plan = simple_plan("tiny-gpt", pp=2, m=4, mbs=2, seq_len=32, dtype="bf16")
    assert plan.stages[0].outputs[0].dtype == "bfloat16"
    plan.save(tmp_path / "plan.json")
    steps = 20
    started = _start(tmp_path / "plan.json", tmp_path / "run", steps)
    ref = reference_run(plan, steps=steps, dataset=DATA)  # while the launch runs
    fp32 = reference_run(simple_plan("tiny-gpt", pp=2, m=4, mbs=2, seq_len=32), steps=steps, dataset=DATA)
    _wait(started)
    res = load_result(tmp_path / "run")
    assert res.losses[-1] < res.losses[0] - 0.5  # it trains
    worst = max(abs(a - b) / abs(b) for a, b in zip(res.losses, ref.losses))
    assert worst <= BF16_REL_TOL, (worst, res.losses, ref.losses)
    assert res.losses != fp32.losses  # bf16 really ran in bf16
    tel = read_telemetry(tmp_path / "run")
    sends = [e for e in tel[0] if e["type"] == "event" and e["kind"] == "SEND"]
    assert sends and all(e["bytes"] == 2 * 32 * 64 * 2 for e in sends)  # bf16 boundary: 2 bytes per element
