"""Tensor parallelism, ZeRO-1/2/3, recompute and bf16-mixed in the executor, on real gloo process
groups, against the reference.

Each configuration is launched once (the bare launcher -> torch's elastic launcher -> pp*dp*tp
workers, a device mesh, ``parallelize_module`` and FSDP2) for a few steps and compared with the
single-process reference (fp32): losses and gradient norms to ``rtol=1e-5, atol=1e-6``. Tensor
parallelism changes the order of the row-parallel sums, ZeRO-2/3 sum the micro-batches' reduced
shards instead of reducing the summed gradient, and the global norm is summed over all ranks
rather than per pipeline rank, so equality is not bitwise in general. bf16-mixed runs are compared
with the fp32 reference at :data:`BF16_RTOL`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pipetrain.errors import PlanError, RunError  # noqa: E402
from pipetrain.executor.config import RunConfig  # noqa: E402
from pipetrain.executor.launch import preflight  # noqa: E402
from pipetrain.executor.plans import simple_plan  # noqa: E402
from pipetrain.executor.result import load_result  # noqa: E402
from pipetrain.executor.telemetry import read_telemetry  # noqa: E402
from pipetrain.plan import RECOMPUTE_MODES, ZERO_STAGES  # noqa: E402
from pipetrain.program import EXECUTOR_COMBINATIONS, executor_supports  # noqa: E402
from pipetrain.schedules import SCHEDULE_NAMES  # noqa: E402
from pipetrain.validation.fidelity import executor_sim_input  # noqa: E402
from pipetrain.validation.reference import reference_run  # noqa: E402

STEPS = 3
DATA = "stdlib-text"
M, MBS, SEQ = 4, 2, 16
#: bf16-mixed against the fp32 reference, relative, per step's loss: bf16 keeps 8 significant
#: bits (a rounding is up to 2**-9 = 0.2% of a value); the loss averages the rounding of many
#: logits but 3 steps of updates from bf16 gradients compound it, so 1%, not 0.2%
BF16_RTOL = 1e-2


@dataclass(frozen=True)
class Cfg:
    """One launch: the plan's shape, which stages recompute and how, its precision."""

    model: str
    pp: int
    dp: int
    tp: int
    zero: int
    sp: bool = False
    rc: tuple[int, ...] = ()  # stages that recompute
    mode: str = "full"  # how (full or selective)
    layers: int = 0  # their first `layers` blocks (0: all)
    precision: str = ""  # "" -> fp32
    schedule: str = "1f1b"

    @property
    def id(self) -> str:
        rc = f"-rc{self.mode[0]}{self.layers or ''}" if self.rc else ""
        return (f"{self.model}-p{self.pp}d{self.dp}t{self.tp}z{self.zero}{'-sp' if self.sp else ''}{rc}"
                f"{'-' + self.precision if self.precision else ''}{'-' + self.schedule if self.schedule != '1f1b' else ''}")


#: fp32 runs, compared with the reference to rtol=1e-5; 4 ranks at most per run (the machine may have 2 cores)
CONFIGS = [
    Cfg("tiny-gpt", 1, 1, 2, 0, rc=(0,)),
    # the tied embedding/head across pipeline ranks, under tp; two stages per rank (interleaved)
    Cfg("tiny-gpt", 2, 1, 2, 0, sp=True, schedule="interleaved"),
    Cfg("tiny-gpt", 1, 2, 2, 1),  # FSDP2 over dp on tp-sharded parameters (one stage holds the tied pair)
    Cfg("tiny-gpt", 2, 2, 1, 1, rc=(1,), layers=2),  # ZeRO-1 (pp=2 dp=2); the last stage's 2 transformer blocks recompute whole, its head not
    Cfg("tiny-llama", 1, 2, 2, 0, sp=True),  # grouped-query attention (4 query heads, 2 KV heads); dp all-reduce of tp shards
    Cfg("tiny-gpt", 2, 2, 1, 3, rc=(0, 1), mode="selective"),  # ZeRO-3; every block's attention core recomputed
    Cfg("tiny-bert", 1, 1, 2, 0),  # post-LN blocks; the tied MLM decoder and its bias vocabulary-parallel (no sp)
]
#: bf16-mixed: without ZeRO (fp32 master copies in the optimizer) and with (FSDP2's mixed precision)
BF16_CONFIGS = [
    Cfg("tiny-gpt", 2, 1, 1, 0, precision="bf16-mixed"),
    Cfg("tiny-gpt", 1, 2, 1, 2, precision="bf16-mixed"),  # ZeRO-2: FSDP2 reduce-scatters every micro-batch
]
ALL = CONFIGS + BF16_CONFIGS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _plan(c: Cfg) -> Any:
    return simple_plan(c.model, pp=c.pp, dp=c.dp, m=M, mbs=MBS, seq_len=SEQ, schedule=c.schedule, chunks=2 if c.schedule == "interleaved" else 1,
                       tp=c.tp, zero=c.zero,
                       sequence_parallel=c.sp, recompute=c.rc, recompute_mode=c.mode, recompute_layers=c.layers,
                       dtype="bf16" if c.precision == "bf16-mixed" else "fp32", precision=c.precision)


#: the launch's arguments (tests/test_collectives.py reads the tp=2 x dp=2 ZeRO-1 run's telemetry: one launch for both)
LAUNCH_ARGS = ("--steps", str(STEPS), "--dataset", DATA, "--save-final")


@pytest.fixture(scope="module")
def runs(launches: Any, request: pytest.FixtureRequest) -> Any:
    """``get(cfg)``: the launch of ``cfg`` and its fp32 reference. From the first request on, every
    configuration this module's selected tests use is queued, in test order (``launches`` runs two
    at once); a test waits for its own launch only, and computes its reference while it runs."""
    cache: dict[Cfg, dict[str, Any]] = {}
    selected = []  # the configurations of this module's selected tests, in the order they run
    for it in request.session.items:
        cs = getattr(it, "callspec", None)
        if getattr(it, "module", None) is request.module and cs is not None and "cfg" in cs.params:
            selected.append(cs.params["cfg"])

    def get(cfg: Cfg) -> dict[str, Any]:
        if cfg not in cache:
            for c in [cfg, *selected]:
                launches.start(_plan(c), *LAUNCH_ARGS)
            plan = _plan(cfg)
            fp32 = plan if not cfg.precision else _plan(replace(cfg, precision=""))
            ref = reference_run(fp32, steps=STEPS, dataset=DATA)  # while the launches run
            run_dir = launches.wait(plan, *LAUNCH_ARGS)
            cache[cfg] = {"plan": plan, "dir": run_dir, "result": load_result(run_dir), "ref": ref}
        return cache[cfg]

    return get


def _t(xs: Any) -> Any:
    return torch.tensor(list(xs), dtype=torch.float64)


def _activation_peaks(run_dir: Path) -> dict[int, int]:
    return {r: max(x["memory"]["activation_bytes_peak"] for x in recs if x["type"] == "step") for r, recs in read_telemetry(run_dir).items()}


def _planned_activation_bytes(plan: Any) -> tuple[float, ...]:
    """Per pipeline rank, the plan's activation figure: each stage's bytes per micro-batch
    (``memory.stage_memory`` via the lowering) replayed in the rank's own order of the executed
    schedule (an interleaved rank holds two stages' micro-batches at once)."""
    from pipetrain.program.catalog import rank_peak_activation_bytes
    from pipetrain.schedules import make_schedule

    inp, _ = executor_sim_input(plan)
    sched = make_schedule(plan.schedule, plan.pp, plan.num_microbatches, plan.chunks)
    return rank_peak_activation_bytes(sched, [st.activation_bytes for st in inp.stages])


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id for c in CONFIGS])
def test_matches_single_process(runs: Any, cfg: Cfg) -> None:
    pp, dp, tp, rc = cfg.pp, cfg.dp, cfg.tp, cfg.rc
    run = runs(cfg)
    plan = run["plan"]
    assert plan.recompute == (cfg.mode if rc else "none")
    assert executor_supports(cfg.schedule, tp, cfg.zero, plan.recompute) is None  # the table says the executor runs what it ran
    res, ref = run["result"], run["ref"]
    assert res.steps == tuple(range(STEPS))
    torch.testing.assert_close(_t(res.losses), _t(ref.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_t(res.grad_norms), _t(ref.grad_norms), rtol=1e-5, atol=1e-6)
    assert ref.grad_norms[0] > 1.0  # clipping (at 1.0) acted, so the global norm steered the update
    tel = read_telemetry(run["dir"])
    assert sorted(tel) == list(range(pp * dp * tp))
    metas = {r: next(x for x in recs if x["type"] == "meta") for r, recs in tel.items()}
    for r, m in metas.items():  # the rank layout: tp innermost, then pp, then dp
        assert (m["tp_rank"], m["pp_rank"], m["dp_rank"]) == (r % tp, (r // tp) % pp, r // (tp * pp))
    peaks = _activation_peaks(run["dir"])
    # a stage recomputing all its blocks whole keeps only their inputs (token ids, then one [2, 16, 64]
    # fp32 tensor of 8 KiB per block and micro-batch) and one block's working set: well under a
    # non-recomputing tiny-gpt stage's hundreds of KiB
    for r, m in metas.items():
        if m["pp_rank"] in rc and cfg.mode == "full" and not cfg.layers:
            assert peaks[r] < 96 << 10, peaks
    # the saved-tensor hooks' bytes (a DTensor's local shard under tp) are the plan's figure
    # (memory.stage_memory), under tp, sequence parallelism and ZeRO too
    planned = _planned_activation_bytes(plan)
    for r, m in metas.items():
        p = m["pp_rank"]
        if p in rc and p == plan.num_stages - 1 and cfg.mode == "full" and not cfg.layers:
            continue  # whole-stage full recompute counts the loss's tensors once, as working memory
        assert abs(peaks[r] - planned[p]) <= 0.05 * planned[p], (r, peaks[r], planned)
    # every rank's final weights, gathered to full tensors in the model's layout, are the reference's
    # (Adam divides by sqrt(v): a last-bit difference in a tiny gradient moves a weight by up to ~lr)
    for f in sorted((run["dir"] / "final").glob("rank*.pt")):
        for sd in torch.load(f, weights_only=True).values():
            for k, v in sd.items():
                assert (v - ref.state[k]).abs().max().item() <= 1e-4, (f.name, k)


@pytest.mark.parametrize("cfg", BF16_CONFIGS, ids=[c.id for c in BF16_CONFIGS])
def test_bf16_mixed_trains_near_fp32_with_fp32_masters(runs: Any, cfg: Cfg) -> None:
    """bf16 working weights (what the stages' linear layers computed with), fp32 master weights (what
    the optimizer updated), losses within bf16's tolerance of the fp32 reference, not equal to them."""
    run = runs(cfg)
    res, ref = run["result"], run["ref"]
    assert run["plan"].precision == "bf16-mixed" and executor_supports("1f1b", 1, cfg.zero, "none") is None
    torch.testing.assert_close(_t(res.losses), _t(ref.losses), rtol=BF16_RTOL, atol=0.0)
    torch.testing.assert_close(_t(res.grad_norms), _t(ref.grad_norms), rtol=5 * BF16_RTOL, atol=0.0)  # a norm of bf16 gradients
    assert res.losses != ref.losses  # it really computed in bf16
    for recs in read_telemetry(run["dir"]).values():
        for step in (x for x in recs if x["type"] == "step"):
            assert step["param_dtypes"] == {"master": ["float32"], "working": ["bfloat16"]}, step["param_dtypes"]
    if cfg.pp > 1:  # bf16 activations cross the pipeline: 2 bytes per element
        sends = [e for e in read_telemetry(run["dir"])[0] if e["type"] == "event" and e["kind"] == "SEND"]
        assert sends and all(e["bytes"] == MBS * SEQ * 64 * 2 for e in sends)
    planned = _planned_activation_bytes(run["plan"])  # bf16 saved tensors, as the traced bf16 graph counts them
    for r, recs in read_telemetry(run["dir"]).items():
        p = next(x for x in recs if x["type"] == "meta")["pp_rank"]
        assert abs(_activation_peaks(run["dir"])[r] - planned[p]) <= 0.05 * planned[p]


def test_tensor_parallel_shards_the_blocks(runs: Any) -> None:
    """tp=2: each rank holds half of every transformer block and of the vocabulary (the embedding
    table, which the head shares); the norms, the row-parallel biases and the positions stay whole.
    The tied table counts once: vocabulary-parallel, it is still one Parameter in both blocks."""
    run = runs(CONFIGS[0])
    whole = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "c_proj.bias", "mlp_proj.bias", "wpe.weight",
             "ln_f.weight", "ln_f.bias")  # replicated over tp
    want = 0
    for k, v in run["ref"].state.items():
        if k == "blocks.5.wte.weight":  # the head's tied copy of blocks.0.wte.weight: one parameter
            continue
        want += v.numel() if k.endswith(whole) else v.numel() // 2
    for recs in read_telemetry(run["dir"]).values():
        step = next(x for x in recs if x["type"] == "step")
        assert step["memory"]["param_bytes"] == 4 * want


def test_tensor_parallel_refuses_sequence_parallel_for_post_ln() -> None:
    """BERT's post-LN blocks split over tp without sequence parallelism only: the planner does not
    pick it for them and the executor refuses a plan that asks for it, before any worker starts."""
    from pipetrain.planner.job import job_from_mapping
    from pipetrain.planner.search import search

    for model, sp in (("tiny-bert", False), ("tiny-llama", True)):
        job = job_from_mapping({"model": model, "topology": "dgx-h100:1", "global_batch": 8, "seq_len": 16, "tp": 2, "pp": 1, "dp": 1},
                               source="test")
        c = search(job, top_k=1, explain=False).best.candidate
        assert c.tp == 2 and c.sequence_parallel is sp, (model, c.describe())
    cfg = RunConfig(plan_path="unused", dataset=DATA)
    preflight(cfg, simple_plan("tiny-bert", pp=1, m=2, mbs=1, seq_len=8, tp=2))
    with pytest.raises(PlanError, match="BertBlock.*re-plan with sequence_parallel off"):
        preflight(cfg, simple_plan("tiny-bert", pp=1, m=2, mbs=1, seq_len=8, tp=2, sequence_parallel=True))


@pytest.mark.parametrize("cfg", [BF16_CONFIGS[1], CONFIGS[5]], ids=["zero2", "zero3"])
def test_zero_shards_optimizer_state(runs: Any, cfg: Cfg) -> None:
    """dp=2 at zero=2 (bf16-mixed, pp=1) or zero=3 (pp=2): a rank's AdamW state is half of its stage's
    two fp32 moments (FSDP2 shards)."""
    run = runs(cfg)
    plan, ref = run["plan"], run["ref"]
    tel = read_telemetry(run["dir"])
    for r, recs in tel.items():
        st = plan.stages[(r % plan.pp)]
        numel = sum(v.numel() for k, v in ref.state.items() if st.block_start <= int(k.split(".")[1]) < st.block_end)
        opt = next(x for x in recs if x["type"] == "step")["memory"]["optimizer_bytes"]
        assert 0.45 * 8 * numel < opt < 0.55 * 8 * numel, (r, opt, numel)


def test_table_is_data_and_refuses_with_the_fix() -> None:
    for c in EXECUTOR_COMBINATIONS:
        assert set(c.schedules) <= set(SCHEDULE_NAMES) and set(c.zero) <= set(ZERO_STAGES) and set(c.recompute) <= set(RECOMPUTE_MODES)
    for s in SCHEDULE_NAMES:  # every schedule runs plain, as before tensor parallelism
        assert executor_supports(s, 1, 0, "none") is None
    for z in ZERO_STAGES:  # ZeRO-0..3 and every recompute with 1F1B and GPipe, with and without tp
        for rc in RECOMPUTE_MODES:
            assert executor_supports("1f1b", 2, z, rc) is None and executor_supports("gpipe", 1, z, rc) is None
    assert executor_supports("interleaved", 1, 0, "selective") is None and executor_supports("interleaved", 2, 0, "full") is None
    assert "gpipe or 1f1b" in (executor_supports("interleaved", 2, 1, "none") or "")  # one FSDP unit per rank
    assert "gpipe or 1f1b" in (executor_supports("interleaved", 1, 2, "none") or "")
    assert executor_supports("zb-h1", 1, 0, "full") is not None and executor_supports("zbv", 1, 0, "selective") is not None
    assert "ZeRO-4 is not implemented; use zero 0, 1, 2, 3" in (executor_supports("1f1b", 1, 4, "none") or "")
    cfg = RunConfig(plan_path="unused", dataset=DATA)
    with pytest.raises(RunError, match="with tp=2 use schedule gpipe or 1f1b or interleaved"):
        preflight(cfg, simple_plan("tiny-gpt", pp=2, m=4, mbs=1, seq_len=8, schedule="zbv", tp=2))
    with pytest.raises(PlanError, match="re-plan with tp 1"):
        preflight(cfg, simple_plan("resmlp", pp=1, m=2, mbs=1, seq_len=8, tp=2))


def test_cli_refuses_tp_with_zbv_before_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipetrain.cli import main

    plan = simple_plan("tiny-gpt", pp=2, m=4, mbs=1, seq_len=8, schedule="zbv", tp=2)
    plan.save(tmp_path / "plan.json")
    assert main(["run", str(tmp_path / "plan.json"), "--run-dir", str(tmp_path / "run"), "--steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "with tp=2 use schedule gpipe or 1f1b or interleaved" in lines[0], lines
    assert not (tmp_path / "run" / "telemetry").exists()  # no worker started


def test_cli_refuses_fp16_without_a_loss_scaler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipetrain.cli import main

    simple_plan("tiny-gpt", pp=1, m=2, mbs=1, seq_len=8, dtype="fp16").save(tmp_path / "plan.json")
    assert main(["run", str(tmp_path / "plan.json"), "--run-dir", str(tmp_path / "run"), "--steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fp16 training needs loss scaling"), lines
