"""The CUDA path: plans on GPU topologies run on CUDA with NCCL (tier 4, marked ``gpu``).

Without a GPU only the first two tests run: a GPU plan is recognised as one, and running it on
a CPU-only machine is refused before any process starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402
from pipetrain.plan import StagePlan  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

DATA = "stdlib-text"
#: fp32 on CUDA: same kernels in the same order in both runs; TF32 is off by default for matmuls
CUDA_REL_TOL = 1e-5


@pytest.mark.parametrize("device,gpu", [("node0/gpu3", True), ("cuda", True), ("cuda:1", True), ("node0/cpu0", False),
                                        ("cpu", False), ("node1/gpux", False)])
def test_stage_device_kind(device: str, gpu: bool) -> None:
    st = StagePlan(index=0, block_start=0, block_end=1, rank=0, device=device, buffers=1)
    assert st.on_gpu is gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_plan_on_cpu_machine_is_refused_before_launch(tmp_path: Path) -> None:
    from pipetrain.cli import main

    plan = tmp_path / "plan.json"
    # the plan in process (the same CLI entry point; a second interpreter would only add its start-up);
    # the refused run below is a subprocess, whose stderr must hold no traceback
    assert main(["plan", "--model", "tiny-gpt", "--topology", "dgx-h100:1", "--pp", "2", "--dp", "1", "--global-batch", "8",
                 "--seq-len", "64", "--no-pin-cost", "-o", str(plan)]) == 0
    assert json.loads(plan.read_text())["stages"][0]["device"] == "node0/gpu0"
    r = subprocess.run([sys.executable, "-m", "pipetrain.cli", "run", str(plan), "--run-dir", str(tmp_path / "run"), "--steps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr and "local-cpu" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "telemetry").exists()


def _run(plan_path: Path, run_dir: Path, steps: int) -> None:
    r = subprocess.run([sys.executable, "-m", "pipetrain.executor.launch", str(plan_path), "--run-dir", str(run_dir), "--steps",
                        str(steps), "--dataset", DATA], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _check_against_reference(plan_kw: dict, tmp_path: Path, steps: int = 10) -> None:
    plan = simple_plan("tiny-gpt", device="cuda", **plan_kw)
    plan.save(tmp_path / "plan.json")
    _run(tmp_path / "plan.json", tmp_path / "run", steps)
    res = load_result(tmp_path / "run")
    ref = reference_run(plan, steps=steps, dataset=DATA, device="cuda")
    assert res.losses[-1] < res.losses[0]
    worst = max(abs(a - b) / abs(b) for a, b in zip(res.losses, ref.losses, strict=True))
    assert worst <= CUDA_REL_TOL, (worst, res.losses, ref.losses)
    tel = read_telemetry(tmp_path / "run")
    meta = [r for r in tel[0] if r["type"] == "meta"][0]
    assert meta["backend"] == "nccl" and meta["device"].startswith("cuda")
    steps_rec = [r for r in tel[0] if r["type"] == "step"]
    assert all(s["memory"]["cuda_max_allocated_bytes"] > 0 for s in steps_rec)
    fwd = [e for e in tel[0] if e["type"] == "event" and e["kind"] == "F"]
    assert fwd and all(e["end_s"] > e["start_s"] for e in fwd)  # CUDA-event spans resolved to host time


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_p1_on_cuda_matches_single_device(tmp_path: Path) -> None:
    _check_against_reference(dict(pp=1, m=4, mbs=4, seq_len=64), tmp_path)


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="p=2 on NCCL needs 2 GPUs")
def test_p2_nccl_matches_single_device(tmp_path: Path) -> None:
    _check_against_reference(dict(pp=2, m=4, mbs=4, seq_len=64), tmp_path)
