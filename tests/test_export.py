"""``pipetrain export``: golden files per target, a 3D plan (uneven split, tp=2, zero=1, sequence
parallel, two virtual stages per rank) in each target's fields, DeepSpeed's partitioner, and the
command's errors. The torch round trip on real process groups is tests/test_export_torch.py.

Golden files: tests/golden/export_<target>/ (``PIPETRAIN_UPDATE_GOLDEN=1`` rewrites them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipetrain.cli import main
from pipetrain.export import TARGETS, ModelBlocks, export_plan
from pipetrain.export.deepspeed import deepspeed_config, partition_balanced, partition_method
from pipetrain.export.megatron import layout_string, megatron_args
from pipetrain.export.torchtitan import torchtitan_fields
from pipetrain.plan import Plan, StagePlan

GOLDEN = Path(__file__).parent / "golden"


# ----- golden files, through the command ---------------------------------------------------------------
@pytest.fixture(scope="module")
def golden_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-gpt (embedding, 4 layers, head tied to the embedding), cut unevenly after block 2,
    pp=2 x dp=2, ZB-H1 (I and W in the CSV), bf16."""
    pytest.importorskip("torch")
    from pipetrain.executor.plans import simple_plan

    path = tmp_path_factory.mktemp("golden") / "plan.json"
    simple_plan("tiny-gpt", pp=2, dp=2, m=4, mbs=2, seq_len=16, schedule="zb-h1", boundaries=[2], dtype="bf16").save(path)
    return path


@pytest.mark.parametrize("target", TARGETS)
def test_golden_files(golden_plan: Path, tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / target
    assert main(["export", str(golden_plan), "--to", target, "-o", str(out)]) == 0
    summary = json.loads((out / "export.json").read_text())
    got = {name: (out / name).read_text() for name in summary["files"]}
    got["warnings.txt"] = "".join(w + "\n" for w in summary["warnings"])
    err = capsys.readouterr().err
    # every warning is on stderr, one line each, and nothing else is
    assert err.splitlines() == [f"warning: {w}" for w in summary["warnings"]]
    gdir = GOLDEN / f"export_{target}"
    if os.environ.get("PIPETRAIN_UPDATE_GOLDEN"):
        gdir.mkdir(parents=True, exist_ok=True)
        for name, text in got.items():
            (gdir / name).write_text(text)
    assert sorted(got) == sorted(p.name for p in gdir.iterdir())
    for name, text in got.items():
        assert text == (gdir / name).read_text(), f"{target}/{name} differs from {gdir / name}"
    for name, text in got.items():  # what it writes is valid in its language
        if name.endswith(".py"):
            compile(text, name, "exec")
        elif name.endswith(".json"):
            json.loads(text)


def test_megatron_args_as_bash_reads_them(golden_plan: Path, tmp_path: Path) -> None:
    assert main(["export", str(golden_plan), "--to", "megatron", "-o", str(tmp_path)]) == 0
    r = subprocess.run(["bash", "-c", 'source "$1"; printf "%s\\n" "${MEGATRON_ARGS[@]}"', "_", str(tmp_path / "megatron_args.sh")],
                       capture_output=True, text=True, timeout=30)
    words = r.stdout.splitlines()
    # the layout reaches Megatron as one word, its '|' and '*' unexpanded
    assert words[words.index("--pipeline-model-parallel-layout") + 1] == "Et|t*3L"
    assert words[:4] == ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]


def test_torchtitan_snippet_sets_the_fields(golden_plan: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    assert main(["export", str(golden_plan), "--to", "torchtitan", "-o", str(tmp_path)]) == 0
    ns: dict[str, object] = {}
    exec((tmp_path / "torchtitan_config.py").read_text(), ns)
    cfg = SimpleNamespace(parallelism=SimpleNamespace(), training=SimpleNamespace(), activation_checkpoint="selective-default")
    ns["apply_plan"](cfg)  # type: ignore[operator]
    assert cfg.parallelism.module_fqns_per_model_part == [["blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "blocks.4", "blocks.5"]]
    assert cfg.parallelism.data_parallel_replicate_degree == 2 and cfg.training.num_tokens_per_train_step == 2 * 4 * 2 * 16
    assert cfg.activation_checkpoint is None  # torchtitan's default is SelectiveAC: the plan recomputes nothing


def test_golden_torch_csv_is_pipetrains_order(golden_plan: Path) -> None:
    """The CSV is the lowered schedule's compute order, I and W as torch spells them."""
    from pipetrain.program import lower

    rows = (GOLDEN / "export_torch" / "schedule.csv").read_text().splitlines()
    assert [r.split(",") for r in rows] == lower(Plan.load(golden_plan)).schedule.to_strings(compute_only=True)
    assert rows[1].startswith("1F0,1I0,1F1,1I1,1W0")  # the last stage defers its first W (zero bubble)


# ----- a 3D plan built by hand: uneven, tp=2, zero=1, sequence parallel, interleaved ----------------------
#: gpt2's 14 blocks: embedding, 12 transformer layers, head
GPT2 = ModelBlocks(names=("embed", *(f"layer.{i}" for i in range(12)), "head"),
                   kinds=("embedding", *["transformer"] * 12, "head"),
                   classes=("GPTEmbedding", *["GPTBlock"] * 12, "GPTHead"),
                   layer_shaped=(False, *[True] * 12, False), ties=(("wte.weight", 0, (13,)),))
#: four virtual stages on two ranks: [0,4) [4,8) [8,11) [11,14) -> E+3 layers, 4 layers, 3 layers, 2 layers+L
RANGES = [(0, 4), (4, 8), (8, 11), (11, 14)]


def _plan_3d(**kw: object) -> Plan:
    recompute = kw.pop("stage_recompute", (False,) * 4)
    stages = tuple(StagePlan(index=i, block_start=a, block_end=b, rank=i % 2, device=f"node0/gpu{i % 2}", buffers=4,
                             recompute=bool(recompute[i]))  # type: ignore[index]
                   for i, (a, b) in enumerate(RANGES))
    fields: dict[str, object] = dict(model="gpt2", graph_fingerprint="f" * 64, topology="dgx-h100:1", pp=2, dp=2,
                                     micro_batch_size=1, num_microbatches=8, seq_len=1024, schedule="interleaved",
                                     stages=stages, chunks=2, dtype="bf16", precision="bf16-mixed", tp=2,
                                     sequence_parallel=True, zero=1)
    fields.update(kw)
    return Plan(**fields)  # type: ignore[arg-type]


def test_3d_plan_megatron() -> None:
    args, warn = megatron_args(_plan_3d(), GPT2)
    assert args == ["--tensor-model-parallel-size 2", "--pipeline-model-parallel-size 2", "--num-layers 12",
                    '--pipeline-model-parallel-layout "Et*3|t*4|t*3|t*2L"', "--micro-batch-size 1",
                    "--global-batch-size 16", "--seq-length 1024", "--sequence-parallel", "--use-distributed-optimizer", "--bf16"]
    assert warn == []  # all of it is Megatron's own vocabulary
    # full recompute on stages 0 and 3 only: one count for every stage (block method), and the difference said
    args, warn = megatron_args(_plan_3d(recompute="full", stage_recompute=(True, False, False, True)), GPT2)
    assert args[-3:] == ["--recompute-granularity full", "--recompute-method block", "--recompute-num-layers 3"]
    assert len(warn) == 1 and "[3, 0, 0, 2]" in warn[0]
    args, warn = megatron_args(_plan_3d(recompute="full", stage_recompute=(True,) * 4), GPT2)
    assert args[-3:] == ["--recompute-granularity full", "--recompute-method uniform", "--recompute-num-layers 1"] and not warn
    args, warn = megatron_args(_plan_3d(zero=2, schedule="zbv", stage_recompute=(True,) * 4, recompute="selective"), GPT2)
    assert args[-1] == "--recompute-granularity selective"
    assert [w.split(":")[0] for w in warn] == ["zero=2", "schedule zbv"]


def test_megatron_layout_syntax() -> None:
    # Megatron's parse_str_to_list unrolls x*n and splits stages at '|'
    assert layout_string(["Ettt", "tttt", "ttL"]) == "Et*3|t*4|t*2L"
    assert layout_string(["Et", "L"]) == "Et|L"
    unrolled = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), "Et*3|t*4|t*3|t*2L").split("|")
    assert [len(s) for s in unrolled] == [b - a for a, b in RANGES]  # one character per block: E and L are gpt2's blocks 0 and 13


def test_3d_plan_torchtitan() -> None:
    sections, ac, warn = torchtitan_fields(_plan_3d(), GPT2)
    par, train = sections["parallelism"], sections["training"]
    assert par["pipeline_parallel_degree"] == 2 and par["tensor_parallel_degree"] == 2
    assert par["enable_sequence_parallel"] is True and par["num_pp_microbatches"] == 8
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B" and par["pipeline_parallel_schedule_csv"] == "schedule.csv"
    # one FQN list per model part (virtual stage), in stage order: torchtitan places part s on rank s % pp
    assert par["module_fqns_per_model_part"] == [[f"blocks.{b}" for b in range(a, z)] for a, z in RANGES]
    # zero=1 is FSDP2 over the data-parallel ranks, parameters kept gathered through the step, and said
    assert (par["data_parallel_replicate_degree"], par["data_parallel_shard_degree"], par["fsdp_reshard_after_forward"]) == (1, 2, "never")
    assert any(w.startswith("zero=1: torchtitan has no ZeRO-1") for w in warn)
    assert train == {"num_tokens_per_microbatch_per_dp_rank": 1024, "num_tokens_per_train_step": 16 * 1024,
                     "max_context_length": 1024, "mixed_precision_param": "bfloat16"}
    assert ac is None
    sections, ac, warn = torchtitan_fields(_plan_3d(zero=0, sequence_parallel=False, schedule="zbv",
                                                    stages=tuple(StagePlan(index=i, block_start=a, block_end=b, rank=(0, 1, 1, 0)[i],
                                                                           device="cpu", buffers=4) for i, (a, b) in enumerate(RANGES))), GPT2)
    assert sections["parallelism"]["pipeline_parallel_schedule"] == "ZBVZeroBubble"  # torchtitan's V placement
    assert not any("tied" in w for w in warn)  # the V puts embedding (stage 0) and head (stage 3) both on rank 0
    assert sections["parallelism"]["enable_sequence_parallel"] is False  # torchtitan defaults to True
    assert (sections["parallelism"]["data_parallel_replicate_degree"], sections["parallelism"]["data_parallel_shard_degree"]) == (2, 1)


def test_3d_plan_deepspeed() -> None:
    plan = _plan_3d()
    res = export_plan(plan, "deepspeed", GPT2)
    assert json.loads(res.file("ds_config.json")) == {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8,
        "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    module = res.file("pipeline_module.py")
    # one stage per rank: the plan's virtual stages merged pairwise at its own cut 8
    assert "PARTS = [0, 8, 14]" in module
    assert "PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)" in module
    assert [w.split(":")[0] for w in res.warnings] == ["schedule interleaved", "2 stages per rank (interleaved)", "tp=2",
                                                       "sequence_parallel", "tied parameter blocks.0.wte.weight is held by stages [0, 1]"]
    assert deepspeed_config(_plan_3d(zero=3))["zero_optimization"] == {"stage": 1}
    assert any("ZeRO-2 and ZeRO-3 are incompatible" in w for w in export_plan(_plan_3d(zero=3), "deepspeed", GPT2).warnings)


def test_deepspeed_partition_methods() -> None:
    """Which of DeepSpeed's own methods reproduces a split, by its partitioners (ported)."""
    # 14 blocks in 2: uniform gives 7 | 7
    assert partition_method([0, 7, 14], GPT2) == "uniform"
    # 6 layers each side of the middle: balancing the GPTBlock layers alone; DeepSpeed's ties put
    # the zero-weight embedding and head where its DP's '>=' lands them
    parts = partition_balanced([1.0 if c == "GPTBlock" else 0.0 for c in GPT2.classes], 2)
    assert parts == [0, 7, 14] and partition_method([0, 8, 14], GPT2) is None
    three = partition_balanced([1.0 if c == "GPTBlock" else 0.0 for c in GPT2.classes], 3)
    assert partition_method(three, GPT2) == "type:^GPTBlock$" and three == [0, 5, 9, 14]
    # no method gives it: the snippet overrides _partition_layers with the plan's parts
    res = export_plan(_plan_3d(tp=1, sequence_parallel=False), "deepspeed", GPT2)
    assert "class PlannedPipelineModule(PipelineModule):" in res.file("pipeline_module.py")
    assert "def _partition_layers(self, method='uniform'):" in res.file("pipeline_module.py")


def test_export_refuses_a_plan_for_other_blocks() -> None:
    from pipetrain.errors import PlanError

    with pytest.raises(PlanError, match="plan covers 14 blocks but model 'gpt2' has 6"):
        export_plan(_plan_3d(), "megatron", ModelBlocks(names=("a",) * 6, kinds=("x",) * 6, classes=("X",) * 6, layer_shaped=(False,) * 6))


# ----- the command's errors: exit 2, one line --------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "corrupt", "target", "other-model"])
def test_cli_errors(tmp_path: Path, case: str, golden_plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = {"missing": tmp_path / "none.json", "corrupt": tmp_path / "bad.json", "target": golden_plan,
            "other-model": tmp_path / "other.json"}[case]
    if case == "corrupt":
        plan.write_text('{"model": "tiny-gpt", "pp": 2')
    if case == "other-model":  # a plan whose graph is not the model's: the split would name other modules
        plan.write_text(golden_plan.read_text().replace(Plan.load(golden_plan).graph_fingerprint, "0" * 64))
    to = "nemo" if case == "target" else "torch"
    assert main(["export", str(plan), "--to", to, "-o", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    want = {"missing": "does not exist", "corrupt": "plan file", "target": "export target 'nemo' is unknown; choose one of torch, torchtitan",
            "other-model": "plan was made for model 'tiny-gpt' (graph 000000000000)"}
    assert want[case] in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_entry_point(tmp_path: Path) -> None:
    """``python -m pipetrain export`` itself: the same one line and exit code 2 from a fresh process."""
    r = subprocess.run([sys.executable, "-m", "pipetrain", "export", str(tmp_path / "none.json"), "--to", "torch"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: plan file"), r.stderr
