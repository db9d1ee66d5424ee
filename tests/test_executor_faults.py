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


def test_stalled_rank_blames_the_frozen_one() -> None:
    from pipetrain.executor.heartbeat import stalled_rank

    now = 1000.0
    beats = {0: {"rank": 0, "step": 2, "action": "0RECV_B1", "progress_at": 990.0, "beat_at": 999.8},  # waiting, alive
             1: {"rank": 1, "step": 2, "action": "1F3", "progress_at": 992.0, "beat_at": 992.1}}  # frozen
    assert stalled_rank(beats, now, 20.0) is None
    s = stalled_rank(beats, now, 5.0)
    assert s is not None and (s.rank, s.step, s.action) == (1, 2, "1F3") and s.idle_s == pytest.approx(8.0)
    assert s.describe() == "rank 1 stopped making progress at step 2, action 1F3: no progress for 8 s"
    # the waiting peer crosses the limit first (10 s idle), the frozen rank is still to blame (4 s idle, no beat for 4 s)
    beats[1].update(progress_at=996.0, beat_at=996.0)
    s = stalled_rank(beats, now, 6.0)
    assert s is not None and s.rank == 1 and s.idle_s == pytest.approx(4.0)
    beats[1]["beat_at"] = 999.9  # both alive (a deadlock): the one that stopped first
    s = stalled_rank(beats, now, 5.0)
    assert s is not None and s.rank == 0
    assert stalled_rank(beats, now, 6.0, world_size=3) is None  # a rank has not even started
    waiting_for_start = {**beats, 2: {"rank": 2, "step": -1, "action": "start", "progress_at": 990.0, "beat_at": 995.0}}
    assert stalled_rank(waiting_for_start, now, 6.0, startup_timeout_s=60.0) is None  # its peers wait for it
    starting = {0: {"rank": 0, "step": -1, "action": "start", "progress_at": 980.0, "beat_at": 999.9}}
    assert stalled_rank(starting, now, 5.0, startup_timeout_s=30.0) is None  # start-up gets the longer allowance
    s = stalled_rank(starting, now, 5.0, startup_timeout_s=15.0)
    assert s is not None and s.describe() == "rank 0 stopped making progress at start-up (start): no progress for 20 s"


def test_hung_rank_is_named_and_the_run_ends(plan_path: Path, tmp_path: Path) -> None:
    """Rank 1 SIGSTOPs itself before its 4th compute action of step 2; with --progress-timeout 4 the
    run ends with exit 2 naming it, long before the 120 s distributed timeout, and no worker is left."""
    from pipetrain.plan import Plan
    from pipetrain.program import POST, lower

    ops = [op for op in lower(Plan.load(plan_path)).rank_ops(1) if op.verb != POST and op.action.is_compute]
    env = dict(os.environ, PIPETRAIN_FAULT="1:2:3:stop")
    run_dir = tmp_path / "run"
    t0 = time.time()
    r = subprocess.run(_cmd(plan_path, run_dir, "--steps", "50", "--progress-timeout", "4", "--timeout", "120", cli=False),
                       capture_output=True, text=True, timeout=150, env=env)
    elapsed = time.time() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"error: rank 1 stopped making progress at step 2, action {ops[3].action}: no progress for" in r.stderr, r.stderr[-2000:]
    assert "(pipeline rank 1, replica 0)" in r.stderr
    assert elapsed < 60, elapsed
    pids = _pids(run_dir)
    assert sorted(pids) == [0, 1] and not any(_alive(p) for p in pids.values())
