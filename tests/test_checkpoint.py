"""Checkpoints in one process: the DCP files, their manifest and checksums, what a resume refuses
(another model, another data position, the old per-rank format), the fallback past a corrupt or
unfinished checkpoint, a full disk; and a resume under another plan on a one-rank gloo group."""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pipetrain.errors import RunError  # noqa: E402
from pipetrain.executor.checkpoint import (  # noqa: E402
    check_resumable,
    find_checkpoint,
    latest_step,
    read_checkpoint,
    read_model_state,
    step_dir,
    write_checkpoint,
)
from pipetrain.executor.config import RunConfig  # noqa: E402
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.stage import build_meta, load_spec  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

PLAN = simple_plan("tiny-gpt", pp=1, m=2, mbs=1, seq_len=16)


def _state(step: int, n: int = 64) -> dict[str, Any]:
    return {"model": {"blocks.0.w": torch.full((n,), float(step))}, "optim": {"state.blocks.0.w.step": torch.tensor(float(step))},
            "step": torch.tensor(step)}


def _save(run_dir: Path, step: int, **kw: Any) -> None:
    write_checkpoint(run_dir, step, _state(step, **kw), PLAN, rank=0)


def _killed(step: int, action: int | str) -> None:
    if action == "save":
        raise KeyboardInterrupt  # as a rank killed after writing its files: no manifest, no rename


def test_roundtrip_manifest_and_what_a_resume_refuses(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 3, _state(3), PLAN, rank=0, fault=_killed)
    assert (tmp_path / "checkpoints" / "step_00000003.tmp").is_dir() and find_checkpoint(tmp_path) is None  # nothing complete
    _save(tmp_path, 3)
    assert not (tmp_path / "checkpoints" / "step_00000003.tmp").exists()
    found = find_checkpoint(tmp_path)
    assert found is not None and found.step == 3 and found.skipped == ()
    m = json.loads((step_dir(tmp_path, 3) / "manifest.json").read_text())
    assert set(m["files"]) == {".metadata", "__0_0.distcp"} and m["resume"]["global_batch"] == 2
    got = {"model": {"blocks.0.w": torch.zeros(64)}, "optim": {"state.blocks.0.w.step": torch.tensor(0.0)}, "step": torch.tensor(0)}
    read_checkpoint(tmp_path, found, got)
    assert torch.equal(got["model"]["blocks.0.w"], torch.full((64,), 3.0)) and int(got["step"]) == 3
    assert torch.equal(read_model_state(tmp_path, 3)["blocks.0.w"], torch.full((64,), 3.0))
    check_resumable(found, dataclasses.replace(PLAN, pp=1, num_microbatches=1, dp=2), tmp_path)  # same global batch: fine
    with pytest.raises(RunError, match="is of model 'tiny-gpt' .*this plan trains 'resmlp'.*resume with a plan of that model"):
        check_resumable(found, dataclasses.replace(PLAN, model="resmlp", graph_fingerprint="f" * 64), tmp_path)
    with pytest.raises(RunError, match="global batch .* 2, this plan has 4: .*re-plan with 2"):
        check_resumable(found, dataclasses.replace(PLAN, num_microbatches=4), tmp_path)
    with pytest.raises(RunError, match="does not fit this run .*start a fresh --run-dir"):  # names the checkpoint lacks
        read_checkpoint(tmp_path, found, {"model": {"blocks.9.w": torch.zeros(64)}})


def test_the_old_per_rank_format_is_one_clear_error(tmp_path: Path) -> None:
    old = tmp_path / "checkpoints" / "step_00000005"
    old.mkdir(parents=True)
    torch.save({"step": 5}, old / "rank0.pt")
    with pytest.raises(RunError, match=r"old per-rank format \(step_00000005/rank0.pt\).*start a fresh run directory"):
        find_checkpoint(tmp_path)


def test_resume_falls_back_past_corrupt_and_unfinished_checkpoints(tmp_path: Path) -> None:
    for step in (5, 10):
        _save(tmp_path, step)
    assert latest_step(tmp_path) == 10
    shard = step_dir(tmp_path, 10) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated after it was written
    found = find_checkpoint(tmp_path)
    assert found is not None and found.step == 5
    assert found.skipped == ((10, "__0_0.distcp does not match its checksum (truncated or changed after it was written)"),)
    assert "skipped the checkpoint of step 10: __0_0.distcp does not match" in found.describe_skipped()
    # a corrupt latest.json is skipped too; a run killed mid-save (an unfinished .tmp directory) as well
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 15, _state(15), PLAN, rank=0, fault=_killed)
    found = find_checkpoint(tmp_path)
    assert found is not None and found.step == 5 and [s for s, _ in found.skipped] == [15, 10]
    assert "step 15: it was not finished (the run stopped while saving it)" in found.describe_skipped()
    # none verifies: one line naming each
    (step_dir(tmp_path, 5) / ".metadata").write_bytes(b"junk")
    (step_dir(tmp_path, 10) / "manifest.json").write_text("[]")
    with pytest.raises(RunError, match="no checkpoint in .* verifies: step 10: its manifest is corrupt.*step 5: .metadata does not"):
        find_checkpoint(tmp_path)
    # a later save of a step that did not verify replaces it
    _save(tmp_path, 10)
    assert latest_step(tmp_path) == 10


def test_a_full_disk_leaves_the_previous_checkpoint_usable(tmp_path: Path) -> None:
    """A save that fails half-way (ENOSPC raised while a rank serializes) leaves no step directory
    and no manifest; the previous checkpoint still verifies."""
    _save(tmp_path, 1)

    class Full:
        def __reduce__(self) -> Any:
            raise OSError(28, "No space left on device")

    with pytest.raises(RunError, match="checkpoint of step 2 .*: No space left on device; the previous checkpoint is kept"):
        write_checkpoint(tmp_path, 2, {**_state(2), "extra": {"x": Full()}}, PLAN, rank=0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step_00000001"]
    assert latest_step(tmp_path) == 1


def test_a_real_full_filesystem(tmp_path: Path) -> None:
    """The same on a 1 MiB tmpfs (needs root and mount; skipped otherwise): the 2 MiB step fails with
    ENOSPC, the small step before it still verifies, and no temporary directory is left."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        _save(mnt, 1, n=16)
        with pytest.raises(RunError, match="could not write the checkpoint of step 2 .*: No space left on device"):
            _save(mnt, 2, n=512 * 1024)
        assert [p.name for p in (mnt / "checkpoints").iterdir() if p.is_dir()] == ["step_00000001"]
        assert latest_step(mnt) == 1
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_resume_under_another_stage_split_on_one_rank(one_rank_group: None, tmp_path: Path) -> None:
    """Two stages on one rank (interleaved: the tied embedding and head are one tensor under two
    names) save at step 2; one stage of 1F1B resumes and steps 3-4 are the uninterrupted run's."""
    from pipetrain.executor.trainer import Trainer

    two = simple_plan("tiny-gpt", pp=1, m=2, mbs=1, seq_len=16, schedule="interleaved", chunks=2)
    one = simple_plan("tiny-gpt", pp=1, m=2, mbs=1, seq_len=16)
    spec = load_spec("tiny-gpt")
    timeout = datetime.timedelta(seconds=30)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = Trainer(RunConfig(plan_path="-", run_dir=str(tmp_path), steps=4), two, spec, build_meta(spec), torch.device("cpu"),
                     timeout, 0, tmp_path)
        for k in range(2):
            tr.train_step(k)
        tr.checkpoint(2)
        tr2 = Trainer(RunConfig(plan_path="-", run_dir=str(tmp_path), steps=4, resume=True), one, spec, build_meta(spec),
                      torch.device("cpu"), timeout, 0, tmp_path)
        assert tr2.start_step == 2
        losses = [tr2.train_step(k) for k in (2, 3)]
    finally:
        torch.set_num_threads(before)
    ref = reference_run(one, steps=4)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref.losses[2:]), rtol=1e-5, atol=1e-6)
    final = tr2.modules[0].state_dict()
    for name, want in ref.state.items():  # (the reference's own two splits differ by a few 1e-6: summation order)
        torch.testing.assert_close(final[name], want, rtol=1e-5, atol=1e-5)


def test_master_weights_are_what_is_saved_and_loaded(one_rank_group: None, tmp_path: Path) -> None:
    """An optimizer stepping fp32 masters of bf16 working weights: the checkpoint holds the masters
    under the model's names (tied pair once) and a load rounds them back into the working weights."""
    from pipetrain.executor.checkpoint import RankState
    from pipetrain.executor.optim import unique_params
    from pipetrain.executor.stage import materialize_blocks, stage_modules, ties_of

    def build(seed: int) -> tuple[Any, Any, Any]:
        model = build_meta(load_spec("tiny-gpt"))
        materialize_blocks(model, range(len(model.blocks)), "cpu", seed)
        mods = stage_modules(model, PLAN.stages)
        working = unique_params(mods.values())
        masters = {id(w): torch.nn.Parameter(w.detach().clone()) for w in working}
        for w in working:
            w.data = w.data.to(torch.bfloat16)
        opt = torch.optim.AdamW(list(masters.values()), lr=1e-2)
        return RankState(mods.values(), opt, ties_of(model), masters=masters), masters, working

    saved, masters, _ = build(0)
    for m in masters.values():
        m.grad = torch.randn_like(m)
    saved.optimizer.step()
    write_checkpoint(tmp_path, 1, saved.state(1, 0), PLAN, rank=0)
    found = find_checkpoint(tmp_path)
    assert found is not None
    state = read_model_state(tmp_path, 1)
    assert all(v.dtype == torch.float32 for v in state.values()) and "blocks.5.wte.weight" not in state
    loaded, masters2, working2 = build(1)
    loaded.load(tmp_path, found, 0, restore_rng=False)
    for (a, b), w in zip(zip(masters.values(), masters2.values()), working2):
        assert torch.equal(a, b) and torch.equal(w, b.to(torch.bfloat16))
    sa, sb = saved.optimizer.state_dict()["state"], loaded.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
