"""Two torchrun launchers (``--nnodes 2``, c10d rendezvous on 127.0.0.1) run one p=2 pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pipetrain.executor.launch import free_port  # noqa: E402
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_two_launchers_match_single_process(tmp_path: Path) -> None:
    plan = simple_plan("tiny-gpt", pp=2, m=4, mbs=2, seq_len=16)
    plan.save(tmp_path / "plan.json")
    port, rid = free_port(), uuid.uuid4().hex[:8]
    steps = 10
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rid, "--max-restarts", "0",
           "--local-addr", "127.0.0.1", "-m", "pipetrain.executor", str(tmp_path / "plan.json"),
           "--run-dir", str(tmp_path / "run"), "--steps", str(steps), "--dataset", "stdlib-text"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    res = load_result(tmp_path / "run")
    ref = reference_run(plan, steps=steps, dataset="stdlib-text")
    for got, want in zip(res.losses, ref.losses):
        assert abs(got - want) <= 1e-5 * abs(want)
    assert len(res.losses) == steps
    tel = read_telemetry(tmp_path / "run")
    assert sorted(tel) == [0, 1]
    assert {r["world_size"] for recs in tel.values() for r in recs if r["type"] == "meta"} == {2}
