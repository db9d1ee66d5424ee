"""A checkpoint resumed under other plans, on real gloo groups through the launcher (tiny-gpt, fp32,
stdlib-text, the same global batch of 4 everywhere).

Six steps at pp=2 write the checkpoint of step 6 (DCP: sharded, under the full model's names, the
tied embedding written once). Two independent runs resume it to step 10: one at pp=1 tp=2 (the
tensor-parallel split of every block, GPT-2's qkv rows permuted), one at pp=4 (other stage
boundaries, the tied copy on another rank). Steps 7-10 and the final weights are those of the
uninterrupted single-process run. A rank killed while saving is in test_executor_run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pipetrain.errors import RunError  # noqa: E402
from pipetrain.executor.config import RunConfig  # noqa: E402
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DATA = "stdlib-text"
SAVE_AT, STEPS = 6, 10
PLANS = {"pp2": {"pp": 2}, "pp1tp2": {"pp": 1, "tp": 2}, "pp4": {"pp": 4}, "pp1": {"pp": 1}}


def _start(plan_path: Path, run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pipetrain.executor.launch", str(plan_path), "--run-dir", str(run_dir), "--dataset", DATA, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(p: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("replan")
    plans = {}
    for name, kw in PLANS.items():
        plans[name] = simple_plan("tiny-gpt", m=4, mbs=1, seq_len=16, **kw)
        plans[name].save(base / f"{name}.json")
    first = base / "first"
    started_first = _start(base / "pp2.json", first, "--steps", str(SAVE_AT), "--checkpoint-every", str(SAVE_AT))
    ref = reference_run(plans["pp1"], steps=STEPS, dataset=DATA)  # while the first run runs (2 ranks: cores to spare)
    rc, _, err = _wait(started_first)
    assert rc == 0, err[-3000:]
    out: dict[str, Any] = {"base": base, "plans": plans, "first": first}
    started = {}
    for name in ("pp1tp2", "pp4"):  # two independent resumes of the same checkpoint, side by side
        out[name] = base / name
        shutil.copytree(first, out[name])
        started[name] = _start(base / f"{name}.json", out[name], "--steps", str(STEPS), "--resume", "--save-final")
    out["ref"] = ref
    for p in started.values():
        rc, stdout, err = _wait(p)
        assert rc == 0, err[-3000:]
        assert f"resuming at step {SAVE_AT}" in stdout
    return out


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "final").glob("rank*.pt")):
        for sd in torch.load(f, weights_only=True).values():
            out.update(sd)
    return out


@pytest.mark.parametrize("name", ["pp1tp2", "pp4"])
def test_resume_under_another_plan_continues_the_uninterrupted_run(runs: dict[str, Any], name: str) -> None:
    ref = runs["ref"]
    res = load_result(runs[name])
    assert res.steps == tuple(range(SAVE_AT, STEPS))  # the steps before the re-plan are kept aside, not mixed in
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(ref.losses[SAVE_AT:]), rtol=1e-5, atol=1e-6)
    final = _final(runs[name])
    assert set(final) == set(ref.state)  # every parameter, the tied head copy included
    for k, want in ref.state.items():
        # summation order differs between splits (the reference's own pp=1 and pp=2 differ by a few 1e-6)
        torch.testing.assert_close(final[k], want, rtol=1e-5, atol=1e-5, msg=k)


def test_first_run_validates_from_its_checkpoint_which_refuses_another_model_or_batch(runs: dict[str, Any]) -> None:
    import dataclasses

    from pipetrain.executor.launch import preflight

    ref = runs["ref"]
    torch.testing.assert_close(torch.tensor(load_result(runs["first"]).losses), torch.tensor(ref.losses[:SAVE_AT]),
                               rtol=1e-5, atol=1e-6)
    from pipetrain.validation.validate import validate_run

    report = validate_run(runs["first"], write=False)  # no final weights: the parameters of the step-6 checkpoint
    assert report.passed and max(report.param_max_abs_diff) <= 1e-5, report.summary
    cfg = RunConfig(plan_path="-", run_dir=str(runs["first"]), resume=True, dataset=DATA)
    other = simple_plan("tiny-llama", pp=2, m=4, mbs=1, seq_len=16)
    with pytest.raises(RunError, match="step 6 .* is of model 'tiny-gpt' .*this plan trains 'tiny-llama'"):
        preflight(cfg, other)
    with pytest.raises(RunError, match="global batch .* 4, this plan has 8"):
        preflight(cfg, dataclasses.replace(runs["plans"]["pp2"], num_microbatches=8))
