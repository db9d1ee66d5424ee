"""Multi-node faults on two network-namespace "nodes" (tests/netns.py), and elastic restart.

Each test launches ``python -m pipetrain.executor.launch`` (``pipetrain run``'s launcher, same
options and errors) once per node with ``--nnodes 2 --rdzv-endpoint 10.213.0.1:29500``; the port is
free by construction, the namespaces being new. tiny-gpt, p=2, CPU, gloo: one rank per node.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from netns import TwoNodes, launch_cmd, run_two  # noqa: E402 - the two_nodes fixture is tests/conftest.py's
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STEPS, EVERY, KILL_STEP = 12, 3, 7  # rank 1 dies in step 7, after the checkpoint of step 6


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("netfaults") / "plan.json"
    simple_plan("tiny-gpt", pp=2, m=4, mbs=2, seq_len=16).save(p)
    return p


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _worker_pids(run_dir: Path) -> dict[int, int]:
    d = run_dir / "pids"
    return {int(f.stem[4:]): int(f.read_text()) for f in d.glob("rank*")}


def _assert_nothing_half_written(run_dir: Path) -> None:
    """No temporary file left, every JSON file parses, every telemetry line is a whole record."""
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    for p in run_dir.rglob("*.json"):
        if p.parent.name != "heartbeat":  # fixed-size memory-mapped records, read tolerantly by design
            json.loads(p.read_text())
    for p in (run_dir / "telemetry").glob("*.jsonl"):
        for line in p.read_text().splitlines():
            json.loads(line)


def test_hung_rank_on_two_nodes_is_named_and_nothing_is_left(two_nodes: TwoNodes, plan_path: Path, tmp_path: Path) -> None:
    """Rank 1 SIGSTOPs itself in step 2; with --progress-timeout 4 both launchers end with exit 2
    naming it (each watches the shared run directory's heartbeats, each kills its own workers)."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PIPETRAIN_FAULT="1:2:3:stop")
    t0 = time.time()
    out = run_two(two_nodes, launch_cmd(plan_path, run_dir, "--steps", "50", "--progress-timeout", "4", "--timeout", "60"), tmp_path, env=env)
    elapsed = time.time() - t0
    for code, log in out:
        assert code == 2, log[-3000:]
        assert "error: rank 1 stopped making progress at step 2, action" in log, log[-3000:]
    assert elapsed < 45, elapsed  # the distributed timeout (60 s) never came into it
    pids = _worker_pids(run_dir)
    assert sorted(pids) == [0, 1] and not any(_alive(p) for p in pids.values())
    print(f"\nhung rank on two nodes: both launchers ended {elapsed:.1f} s after the start (--progress-timeout 4)")


def test_cut_link_ends_every_rank_within_the_timeout(two_nodes: TwoNodes, plan_path: Path, tmp_path: Path) -> None:
    """`ip link set down` mid-run: every rank on both nodes fails within --timeout (8 s) of the cut,
    both launchers exit 2 naming a rank, its node and the lost contact, and the run directory holds
    no half-written file."""
    run_dir, timeout_s = tmp_path / "run", 8
    cmd = launch_cmd(plan_path, run_dir, "--steps", "100000", "--checkpoint-every", "20", "--timeout", str(timeout_s), "--progress-timeout", "120")
    procs = [two_nodes.popen(i, cmd, log=tmp_path / f"node{i}.log") for i in range(2)]
    deadline = time.time() + 90
    while time.time() < deadline:  # until both ranks ran 30 steps (a checkpoint is written)
        tel = read_telemetry(run_dir) if (run_dir / "telemetry").is_dir() else {}
        if len(tel) == 2 and all(sum(r["type"] == "step" for r in recs) >= 30 for recs in tel.values()):
            break
        assert all(p.poll() is None for p in procs), [(tmp_path / f"node{i}.log").read_text()[-2000:] for i in range(2)]
        time.sleep(0.2)
    else:
        raise AssertionError("the run did not reach step 30 in 90 s")
    cut_at = time.time()
    two_nodes.cut()
    for p in procs:
        p.wait(timeout=3 * timeout_s + 20)
    ended = time.time() - cut_at
    logs = [(tmp_path / f"node{i}.log").read_text() for i in range(2)]
    fails = {int(f.stem[4:]): f.stat().st_mtime - cut_at for f in (run_dir / "failures").glob("rank*.txt")}
    assert sorted(fails) == [0, 1], logs  # each rank wrote its failure and exited non-zero ...
    assert all(t <= timeout_s + 3 for t in fails.values()), fails  # ... within the timeout (+ a poll's slack)
    for p, log in zip(procs, logs):
        assert p.returncode == 2, log[-3000:]
        assert "lost contact with the other node(s)" in log and " at 10.213.0." in log, log[-3000:]
    assert not any(_alive(p) for p in _worker_pids(run_dir).values())
    _assert_nothing_half_written(run_dir)
    print(f"\ncut link: ranks failed {max(fails.values()):.1f} s after the cut, launchers ended after {ended:.1f} s (--timeout {timeout_s})")


@pytest.fixture(scope="module")
def uninterrupted(plan_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    r = subprocess.run(launch_cmd(plan_path, run_dir, "--steps", str(STEPS), nodes=1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_result(run_dir)


def _check_restarted(run_dir: Path, full: Any, logs: str) -> float:
    """Same losses as the uninterrupted run, bit for bit; a restart happened (rank 1 began twice, the
    second time at step 6; the agent's log need not name the SIGKILL, a peer's exit may be seen first) and resumed at the step-6
    checkpoint; return the seconds from rank 1's last step before its death to the first resumed step."""
    res = load_result(run_dir)
    assert res.steps == tuple(range(STEPS))
    assert res.losses == full.losses, (res.losses, full.losses)
    assert "resuming at step 6" in logs
    tel = read_telemetry(run_dir)
    metas = [r for r in tel[1] if r["type"] == "meta"]
    assert [m["start_step"] for m in metas] == [0, 6]
    died_after, resumed = sorted(r["end_unix_s"] for r in tel[1] if r["type"] == "step" and r["step"] == KILL_STEP - 1)
    return float(resumed - died_after)


def test_elastic_restart_on_one_node_resumes_the_same_trajectory(uninterrupted: Any, plan_path: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, PIPETRAIN_FAULT=f"1:{KILL_STEP}:3:kill")
    r = subprocess.run(launch_cmd(plan_path, run_dir, "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--max-restarts", "1",
                            "--timeout", "30", nodes=1), capture_output=True, text=True, timeout=150, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    took = _check_restarted(run_dir, uninterrupted, r.stdout)
    print(f"\nelastic restart, one node: {took:.1f} s from rank 1's last step to the first resumed step")


def test_elastic_restart_across_two_nodes(two_nodes: TwoNodes, uninterrupted: Any, plan_path: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, PIPETRAIN_FAULT=f"1:{KILL_STEP}:3:kill")
    out = run_two(two_nodes, launch_cmd(plan_path, run_dir, "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--max-restarts", "1",
                                   "--timeout", "30"), tmp_path, env=env)
    for code, log in out:
        assert code == 0, log[-3000:]
    logs = "".join(log for _, log in out)
    took = _check_restarted(run_dir, uninterrupted, logs)
    print(f"\nelastic restart, two nodes: {took:.1f} s from rank 1's last step to the first resumed step")
