"""The executor on real gloo process groups vs the single-process reference (tiny-gpt, CPU).

Each configuration is launched once per session (``pipetrain run`` -> torch's elastic launcher
-> pp*dp workers) and shared by the tests that read it: losses, final weights, tied weights,
telemetry (buffers, events).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

STEPS = 20
DATA = "stdlib-text"
M, MBS, SEQ = 4, 2, 16
#: (GPipe at p=4 runs in tests/test_program_comm.py, which checks its communication against the lowering)
CONFIGS = [(2, 1, "1f1b"), (2, 1, "gpipe"), (4, 1, "1f1b"), (2, 2, "1f1b"), (2, 2, "gpipe"),
           (2, 1, "interleaved"), (2, 1, "zb-h1")]
#: per configuration: optimizer (SGD with momentum on one DPxPP run, AdamW elsewhere), chunks
OPTIMIZER = {(2, 2, "gpipe"): "sgd"}
CHUNKS = {(2, 1, "interleaved"): 2}
#: run with NCCL's layout (two 2-rank groups per boundary, messages in micro-batch order) on gloo
P2P_GROUPS = {(2, 1, "interleaved")}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def run_cli(plan_path: Path, run_dir: Path, *extra: str, timeout: float = 120, cli: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``pipetrain run`` when ``cli``, else its bare launcher (no live view / after-run summaries: faster)."""
    entry = ["pipetrain", "run"] if cli else ["pipetrain.executor.launch"]
    cmd = [sys.executable, "-m", *entry, str(plan_path), "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int, str], dict[str, Any]]:
    cache: dict[tuple[int, int, str], dict[str, Any]] = {}
    base = tmp_path_factory.mktemp("exec")

    def get(pp: int, dp: int, sched: str) -> dict[str, Any]:
        key = (pp, dp, sched)
        if key not in cache:
            d = base / f"p{pp}d{dp}{sched}"
            plan = simple_plan("tiny-gpt", pp=pp, dp=dp, m=M, mbs=MBS, seq_len=SEQ, schedule=sched,
                               chunks=CHUNKS.get(key, 1), optimizer=OPTIMIZER.get(key, "adamw"))
            plan.save(d / "plan.json")
            env = dict(os.environ, PIPETRAIN_P2P_GROUPS="1") if key in P2P_GROUPS else None
            r = run_cli(d / "plan.json", d / "run", "--steps", str(STEPS), "--save-final", "--dataset", DATA, *_opt_args(key),
                        cli=key == (2, 1, "1f1b"), env=env)
            assert r.returncode == 0, r.stderr[-3000:]
            cache[key] = {"plan": plan, "dir": d / "run", "result": load_result(d / "run"), "stdout": r.stdout}
        return cache[key]

    return get  # type: ignore[return-value]


def _opt_args(key: tuple[int, int, str]) -> list[str]:
    return ["--lr", "0.1", "--momentum", "0.9"] if OPTIMIZER.get(key) == "sgd" else []


def _ref_kwargs(key: tuple[int, int, str]) -> dict[str, float]:
    return {"lr": 0.1, "momentum": 0.9} if OPTIMIZER.get(key) == "sgd" else {}


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "final").glob("rank*.pt")):
        for sd in torch.load(f, weights_only=True).values():
            out.update({f"{f.stem}/{k}": v for k, v in sd.items()})
    return out


@pytest.mark.parametrize("pp,dp,sched", CONFIGS, ids=[f"p{p}d{d}-{s}" for p, d, s in CONFIGS])
def test_matches_single_process(runs: Any, pp: int, dp: int, sched: str) -> None:
    run = runs(pp, dp, sched)
    res = run["result"]
    ref = reference_run(run["plan"], steps=STEPS, dataset=DATA, **_ref_kwargs((pp, dp, sched)))
    assert res.steps == tuple(range(STEPS))
    assert len(ref.losses) == STEPS
    for got, want in zip(res.losses, ref.losses):
        assert abs(got - want) <= 1e-5 * abs(want), (res.losses, ref.losses)
    assert ref.losses[-1] < ref.losses[0] - 0.5  # it trains (byte-level text)
    for got, want in zip(res.grad_norms, ref.grad_norms):
        assert abs(got - want) <= 1e-5 * want
    final = _final(run["dir"])
    assert final, "no final weights written"
    seen = set()
    for key, v in final.items():
        name = key.split("/", 1)[1]
        seen.add(name)
        assert (v - ref.state[name]).abs().max().item() <= 1e-5, name
    # every parameter of the model lives on some rank (replicas hold copies)
    assert seen == set(ref.state)


def test_tied_weights_identical_across_stages(runs: Any) -> None:
    """tiny-gpt ties embedding (block 0, stage 0) and head (block 5, last stage): copies stay equal."""
    run = runs(4, 1, "1f1b")
    final = _final(run["dir"])
    emb = [v for k, v in final.items() if k.startswith("rank0/blocks.0.") and k.endswith("wte.weight")]
    head = [v for k, v in final.items() if k.startswith("rank3/blocks.5.") and k.endswith("wte.weight")]
    assert len(emb) == 1 and len(head) == 1
    assert torch.equal(emb[0], head[0])
    ref = reference_run(run["plan"], steps=STEPS, dataset=DATA)
    init = reference_run(run["plan"], steps=1, lr=1e-12, dataset=DATA)
    name = next(k for k in ref.state if k.startswith("blocks.0.") and k.endswith("wte.weight"))
    assert not torch.equal(ref.state[name], init.state[name])  # it was trained, not frozen


def test_buffers_and_in_flight(runs: Any) -> None:
    """1F1B: at most min(p-s, m) in flight at stage s (telemetry), no new receive buffers after step 1."""
    pp = 4
    run = runs(pp, 1, "1f1b")
    tel = read_telemetry(run["dir"])
    assert sorted(tel) == list(range(pp))
    for rank, recs in tel.items():
        steps = [r for r in recs if r["type"] == "step"]
        assert len(steps) == STEPS
        s = rank
        want = min(pp - s, M)
        assert all(r["in_flight_peak"][str(s)] == want for r in steps), [r["in_flight_peak"] for r in steps]
        # same as counted from the F/B events themselves
        evs = sorted((e for e in recs if e["type"] == "event" and e["kind"] in ("F", "B") and e["step"] == 3),
                     key=lambda e: e["start_s"])
        cur = peak = 0
        for e in evs:
            cur += 1 if e["kind"] == "F" else -1
            peak = max(peak, cur)
        assert peak == want
        alloc = {r["recv_buffer_allocations"] for r in steps}
        storages = [r["recv_buffer_storages"] for r in steps]
        plan_buffers = run["plan"].stages[s].buffers
        n_pools = 1 + (1 if s < pp - 1 else 0)
        assert alloc == {plan_buffers * n_pools}
        assert storages[0] <= plan_buffers * n_pools and len(set(storages)) == 1, storages


def test_telemetry_events_and_clock(runs: Any) -> None:
    run = runs(2, 1, "1f1b")
    tel = read_telemetry(run["dir"])
    f0 = [e for e in tel[0] if e["type"] == "event" and e["kind"] == "F" and e["step"] == 5]
    b1 = [e for e in tel[1] if e["type"] == "event" and e["kind"] == "B" and e["step"] == 5]
    sends = [e for e in tel[0] if e["type"] == "event" and e["kind"] == "SEND" and e["step"] == 5]
    recvs = [e for e in tel[1] if e["type"] == "event" and e["kind"] == "RECV" and e["step"] == 5]
    assert len(f0) == M and len(b1) == M and len(sends) == M  # stage 0 sends only activations
    assert all(s["bytes"] == MBS * SEQ * 64 * 4 for s in sends)
    assert len(recvs) == M and all(r["bytes"] == MBS * SEQ * 64 * 4 for r in recvs)
    # aligned clocks: stage 1's forward of mb k starts after stage 0's forward of mb k ended
    f1 = {e["microbatch"]: e for e in tel[1] if e["type"] == "event" and e["kind"] == "F" and e["step"] == 5}
    for e in f0:
        assert f1[e["microbatch"]]["start_s"] >= e["end_s"] - 1e-4
    # on CPU every compute span carries its thread's CPU time: positive, and no more than the span
    # (plus one clock read) since one thread runs it
    for e in f0 + b1:
        assert 0 < e["cpu_s"] <= e["end_s"] - e["start_s"] + 1e-4
    assert all("cpu_s" not in e for e in sends + recvs)
    steps = [r for r in tel[1] if r["type"] == "step"]
    assert steps[0]["memory"]["rss_bytes"] > 10 << 20 and steps[0]["memory"]["tensor_bytes"] > 0


def test_cli_output_and_result_json(runs: Any) -> None:
    run = runs(2, 1, "1f1b")
    assert "loss" in run["stdout"] and "median step" in run["stdout"]
    data = json.loads((run["dir"] / "result.json").read_text())
    assert len(data["losses"]) == STEPS and data["pp"] == 2 and data["backend"] == "gloo"


def test_nccl_layout_of_p2p_groups_was_used(runs: Any) -> None:
    run = runs(2, 1, "interleaved")
    metas = [r for recs in read_telemetry(run["dir"]).values() for r in recs if r["type"] == "meta"]
    assert [m["p2p_groups"] for m in metas] == [6, 6]  # 3 boundaries x 2 directions, both ranks in each


def test_kill_while_saving_step_10_then_resume_from_step_5_is_identical(runs: Any, tmp_path: Path) -> None:
    """Rank 1 SIGKILLs itself while saving the step-10 checkpoint (its shard written, the checkpoint
    not complete); --resume goes back to step 5 and reproduces the uninterrupted run's steps 6..20
    exactly."""
    full = runs(2, 1, "1f1b")
    run_dir = tmp_path / "killed"
    env = dict(os.environ, PIPETRAIN_FAULT="1:10:save:kill")
    plan_path = full["dir"].parent / "plan.json"
    killed = run_cli(plan_path, run_dir, "--steps", str(STEPS), "--checkpoint-every", "5", "--dataset", DATA, cli=True, env=env)
    assert killed.returncode == 2 and "rank 1 (pipeline rank 1, replica 0) was killed by SIGKILL" in killed.stderr
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "step_00000010").exists()  # (rank 0 removes step_00000010.tmp if it sees the failure first)
    assert json.loads((ckpts / "step_00000005" / "manifest.json").read_text())["step"] == 5
    resumed = run_cli(plan_path, run_dir, "--steps", str(STEPS), "--checkpoint-every", "5", "--dataset", DATA, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 5" in resumed.stdout
    a, b = full["result"], load_result(run_dir)
    assert b.steps == tuple(range(STEPS))
    assert b.losses[5:] == a.losses[5:]  # bit-identical trajectory after the resume
    assert b.losses[:5] == a.losses[:5]
    assert json.loads((ckpts / "step_00000010" / "manifest.json").read_text())["step"] == 10  # written again, complete
    metas = [r for r in read_telemetry(run_dir)[0] if r["type"] == "meta"]
    assert [m["start_step"] for m in metas] == [0, 5]
