"""Executor pieces in one process: plans, boundary checks, schedules it refuses, local hand-over
and failure naming (a one-rank gloo group where a group is needed)."""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from pipetrain.errors import PlanError, RunError, ScheduleError  # noqa: E402
from pipetrain.executor.config import RunConfig  # noqa: E402
from pipetrain.executor.launch import describe_failure  # noqa: E402
from pipetrain.executor.plans import even_boundaries, simple_plan  # noqa: E402
from pipetrain.executor.stage import build_meta, check_boundaries, load_spec  # noqa: E402
from pipetrain.plan import TensorSpec  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402


def test_simple_plan_split_specs_and_buffers() -> None:
    assert even_boundaries(6, 4) == (2, 4, 5)
    plan = simple_plan("tiny-gpt", pp=4, m=8, mbs=2, seq_len=16)
    assert [st.buffers for st in plan.stages] == [4, 3, 2, 1]  # 1F1B: min(p - s, m)
    assert plan.stages[1].inputs == (TensorSpec(shape=(2, 16, 64), dtype="float32"),)
    assert [st.buffers for st in simple_plan("tiny-gpt", pp=2, m=5, mbs=1, seq_len=8, schedule="gpipe").stages] == [5, 5]
    with pytest.raises(PlanError, match="cannot split 6 blocks into 8 stages"):
        simple_plan("tiny-gpt", pp=8, m=8, mbs=1, seq_len=8)


def test_boundary_mismatch_names_both() -> None:
    plan = simple_plan("tiny-gpt", pp=2, m=2, mbs=2, seq_len=16)
    spec = load_spec("tiny-gpt")
    check_boundaries(plan, spec, build_meta(spec))  # the plan's own shapes pass
    bad_stage = dataclasses.replace(plan.stages[1], inputs=(TensorSpec(shape=(2, 16, 32), dtype="float32"),))
    bad = dataclasses.replace(plan, stages=(plan.stages[0], bad_stage))
    with pytest.raises(PlanError) as exc:
        check_boundaries(bad, spec, build_meta(spec))
    msg = str(exc.value)
    assert "[2, 16, 32]" in msg and "[2, 16, 64]" in msg and "stage 1 inputs" in msg
    bad_dtype = dataclasses.replace(plan.stages[0], outputs=(TensorSpec(shape=(2, 16, 64), dtype="bfloat16"),))
    with pytest.raises(PlanError, match="bfloat16"):
        check_boundaries(dataclasses.replace(plan, stages=(bad_dtype, plan.stages[1])), spec, build_meta(spec))


def test_split_backward_equals_full_backward() -> None:
    """ZB's B (input grad) then W (weight grads) give bit-identical gradients to one full backward."""
    from pipetrain.executor.splitbw import backward_input, backward_weight
    from pipetrain.executor.stage import StageModule, materialize_blocks

    spec = load_spec("tiny-gpt")

    def stage() -> StageModule:
        m = build_meta(spec)
        materialize_blocks(m, range(len(m.blocks)), "cpu", 0)
        return StageModule({i: m.blocks[i] for i in (2, 3, 4, 5)})

    a, b = stage(), stage()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 16, 64, generator=gen)
    y = torch.randint(0, 256, (2, 16), generator=gen)
    xa = x0.clone().requires_grad_()
    (spec.loss(a(xa), y) * 0.25).backward()
    xb = x0.clone().requires_grad_()
    dx, state = backward_input(spec.loss(b(xb), y) * 0.25, None, xb)
    assert torch.equal(dx, xa.grad)
    assert all(p.grad is None for p in b.parameters())  # B computed no weight gradient
    assert len(state.nodes) > 10
    backward_weight(state)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert q.grad is not None and torch.equal(p.grad, q.grad), name


def test_zero_bubble_runnable_but_not_with_recompute() -> None:
    from pipetrain.executor.runtime import PipelineRuntime
    from pipetrain.program import RUNNABLE_SCHEDULES, lower_schedule
    from pipetrain.schedules import make_schedule

    assert "zb-h1" in RUNNABLE_SCHEDULES
    sched = make_schedule("zb-h1", 2, 4)
    st = SimpleNamespace(recompute=True)
    with pytest.raises(ScheduleError, match="recomputation"):
        PipelineRuntime(stages={0: st}, ops=lower_schedule(sched, [4, 4]).ops[0], num_stages=2, num_microbatches=4, loss_fn=None,  # type: ignore[arg-type, dict-item]
                        loss_scale=1.0, telemetry=None, timeout=datetime.timedelta(seconds=1))  # type: ignore[arg-type]


def test_two_stages_on_one_rank_hand_over_in_memory(one_rank_group: None, tmp_path: Path) -> None:
    """Interleaved with p=1: stage 0 and 1 share the rank; tied embedding/head share the submodule."""
    from pipetrain.executor.trainer import Trainer

    plan = simple_plan("tiny-gpt", pp=1, m=4, mbs=2, seq_len=16, schedule="interleaved", chunks=2)
    cfg = RunConfig(plan_path="-", run_dir=str(tmp_path), steps=5)
    spec = load_spec("tiny-gpt")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = Trainer(cfg, plan, spec, build_meta(spec), torch.device("cpu"), datetime.timedelta(seconds=30), 0, tmp_path)
        losses = [tr.train_step(k) for k in range(5)]
    finally:
        torch.set_num_threads(before)
    ref = reference_run(plan, steps=5)
    assert tr.runtimes[0].next_local and tr.runtimes[1].prev_local
    for got, want in zip(losses, ref.losses):
        assert abs(got - want) <= 1e-5 * want


def test_failure_naming_prefers_the_root_cause(tmp_path: Path) -> None:
    fdir = tmp_path / "failures"
    fdir.mkdir()
    killed = SimpleNamespace(exitcode=-9, signal_name=lambda: "SIGKILL")
    peer = SimpleNamespace(exitcode=3)
    (fdir / "rank0.txt").write_text("peer RuntimeError: Connection reset by peer\n")
    assert describe_failure(tmp_path, {0: peer, 3: killed}, pp=2) == "rank 3 (pipeline rank 1, replica 1) was killed by SIGKILL"
    (fdir / "rank2.txt").write_text("root ValueError: bad thing\n")
    os.utime(fdir / "rank2.txt", (1, 1))
    assert describe_failure(tmp_path, {0: peer, 3: killed}, pp=2) == "rank 2 (pipeline rank 0, replica 1) failed: ValueError: bad thing"


def test_preflight_rejects_bad_runs_before_starting_processes(tmp_path: Path) -> None:
    from pipetrain.errors import ConfigError
    from pipetrain.executor.launch import preflight

    plan = simple_plan("tiny-gpt", pp=2, m=2, mbs=2, seq_len=16)
    preflight(RunConfig(plan_path="-", run_dir=str(tmp_path)), plan)  # a good run passes
    with pytest.raises(ConfigError, match="--dataset 'imagenet' is unknown"):
        preflight(RunConfig(plan_path="-", run_dir=str(tmp_path), dataset="imagenet"), plan)
    with pytest.raises(RunError, match="no complete checkpoint"):
        preflight(RunConfig(plan_path="-", run_dir=str(tmp_path), resume=True), plan)
    with pytest.raises(RunError, match="fp16"):
        preflight(RunConfig(plan_path="-", run_dir=str(tmp_path)), dataclasses.replace(plan, dtype="fp16", precision="amp-autocast"))
    from pipetrain.errors import PlanError

    with pytest.raises(PlanError, match="plan was made for model 'resmlp'"):  # a plan for another model, before any process
        preflight(RunConfig(plan_path="-", run_dir=str(tmp_path)), dataclasses.replace(plan, model="resmlp"))
