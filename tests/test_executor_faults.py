"""Failures and Ctrl-C of real gloo runs (tiny-gpt, p=2, CPU); kill-and-resume is in test_executor_run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("faults") / "plan.json"
    simple_plan("tiny-gpt", pp=2, m=4, mbs=2, seq_len=16).save(p)
    return p


def _cmd(plan: Path, run_dir: Path, *extra: str, cli: bool = True) -> list[str]:
    """``pipetrain run``, or its bare launcher (same errors and exit codes, no after-run summaries)."""
    entry = ["pipetrain", "run"] if cli else ["pipetrain.executor.launch"]
    return [sys.executable, "-m", *entry, str(plan), "--run-dir", str(run_dir), *extra]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _pids(run_dir: Path) -> dict[int, int]:
    d = run_dir / "pids"
    return {int(f.stem[4:]): int(f.read_text()) for f in d.glob("rank*")} if d.is_dir() else {}


def _start_and_wait_for_steps(cmd: list[str], run_dir: Path, steps: int, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    deadline = time.time() + 90
    while time.time() < deadline:
        tel = read_telemetry(run_dir) if (run_dir / "telemetry").is_dir() else {}
        if len(tel) == 2 and all(sum(r["type"] == "step" for r in recs) >= steps for recs in tel.values()):
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("run did not reach its steps in 90 s")


def test_killed_rank_stops_every_rank_and_is_named(plan_path: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start_and_wait_for_steps(_cmd(plan_path, run_dir, "--steps", "100000"), run_dir, 3)
    try:
        pids = _pids(run_dir)
        assert sorted(pids) == [0, 1]
        t0 = time.time()
        os.kill(pids[0], signal.SIGKILL)  # mid-run: the first stage, while it computes or waits
        _, err = proc.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed < 60
    assert "error: rank 0 (pipeline rank 0, replica 0) was killed by SIGKILL" in err, err[-2000:]
    assert not any(_alive(p) for p in pids.values())


def test_raising_rank_is_named_with_its_error(plan_path: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PIPETRAIN_FAULT="1:2:3:raise")
    t0 = time.time()
    r = subprocess.run(_cmd(plan_path, tmp_path / "run", "--steps", "50", cli=False), capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert time.time() - t0 < 60
    assert "error: rank 1 (pipeline rank 1, replica 0) failed: RuntimeError: injected fault at step 2, action 3" in r.stderr, r.stderr[-2000:]


def test_ctrl_c_stops_cleanly(plan_path: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start_and_wait_for_steps(_cmd(plan_path, run_dir, "--steps", "100000"), run_dir, 2)
    pids = _pids(run_dir)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted" in out + err
    assert "Traceback" not in err
    assert not any(_alive(p) for p in pids.values())
