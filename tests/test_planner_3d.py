"""Plans a GPU practitioner would launch: tensor parallelism, ZeRO, per-layer recompute, idle GPUs.

Analytic cost model on the datasheet GPU presets; every search traces on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipetrain.errors import InfeasibleError
from pipetrain.graph import LayerGraph
from pipetrain.planner.explain import plan_job
from pipetrain.planner.job import job_from_mapping
from pipetrain.planner.search import _tracer, search
from pipetrain.topology import resolve_topology

LLAMA70 = {"model": "llama2-70b", "topology": "dgx-h100:8", "global_batch": 1024, "seq_len": 4096}


@pytest.fixture(scope="module")
def llama70_graphs():
    return _tracer(job_from_mapping(LLAMA70, source="test"))


def test_llama2_70b_plans_tp_inside_a_node_and_beats_the_public_recipes(llama70_graphs) -> None:
    """The planner picks tp > 1 within a node and ZeRO >= 1 where dp > 1, and its plan simulates no
    slower than the public recipes (tp 8 x pp 4 and tp 8 x pp 8, the distributed optimizer, full
    recompute), each pinned and simulated in the same run."""
    topo = resolve_topology("dgx-h100:8")
    free = search(job_from_mapping(LLAMA70, source="test"), graph_for=llama70_graphs, topology=topo).best
    c = free.candidate
    assert 1 < c.tp <= 8 and (c.dp == 1 or c.zero >= 1), c.describe()
    rows = [("planner", c.describe(), free.step_time_s)]
    for pp in (4, 8):
        pins = {**LLAMA70, "tp": 8, "pp": pp, "dp": 64 // (8 * pp), "zero": 1, "recompute": "full", "schedule": "1f1b"}
        recipe = search(job_from_mapping(pins, source="test"), graph_for=llama70_graphs, topology=topo, top_k=1).best
        assert recipe.candidate.tp == 8 and all(recipe.recompute)
        rows.append((f"tp8 pp{pp} recipe", recipe.candidate.describe(), recipe.step_time_s))
    for name, desc, t in rows:
        print(f"{name:16s} {t:8.2f} s  {desc}")
    assert all(free.step_time_s <= t * (1 + 1e-9) for _, _, t in rows[1:]), rows


def test_llama2_7b_data_parallel_on_one_node_fits_with_zero() -> None:
    """Pure data parallelism of llama2-7b on 8 H100s does not fit with a replicated Adam state
    (about 16 bytes per parameter), and does with ZeRO-1; the error says so."""
    base = {"model": "llama2-7b", "topology": "dgx-h100:1", "global_batch": 64, "seq_len": 2048, "pp": 1, "dp": 8, "tp": 1,
            "recompute": "full"}
    gf = _tracer(job_from_mapping(base, source="test"))
    with pytest.raises(InfeasibleError, match=r"unpin zero \(=0\).*zero=1"):
        search(job_from_mapping({**base, "zero": 0}, source="test"), graph_for=gf)
    best = search(job_from_mapping(base, source="test"), graph_for=gf, top_k=1).best
    assert best.candidate.zero >= 1 and best.fits()


GPT2_XL_64 = {"model": "gpt2-xl", "topology": "dgx-a100-80g:8", "global_batch": 960, "seq_len": 1024, "tp": 1}


@pytest.fixture(scope="module")
def gpt2_xl_graphs() -> Callable[[int], LayerGraph]:
    """One tracer (graphs cached per micro-batch size) for the three pinned gpt2-xl jobs below: the
    model, sequence and dtype are theirs, so each traces the same graphs (tracing is a good part of a search)."""
    return _tracer(job_from_mapping(GPT2_XL_64, source="test"))


@pytest.mark.parametrize("pins", [{"pp": 20, "dp": 3}, {"pp": 12, "dp": 5}, {"pp": 16, "dp": 4}])
def test_non_divisor_depths_are_searched_and_pins_never_cost_less_than_nothing(pins: dict, gpt2_xl_graphs: Callable[[int], LayerGraph]) -> None:
    """Depths that leave GPUs idle are in the search: a pinned pp=20 dp=3 on 64 GPUs (4 idle) is one
    of its points, so the free search is at least as good -- found by the search itself, not by
    falling back on the pinned plan -- and no "pins cost" is negative."""
    job = job_from_mapping({**GPT2_XL_64, **pins}, source="test")
    out = plan_job(job, top_k=2, graph_for=gpt2_xl_graphs)
    assert out.plan.idle_gpus == 64 - pins["pp"] * pins["dp"]
    assert out.unpinned is not None and out.unpinned is not out.result, "the free search missed the pinned point"
    assert out.pin_cost_fraction is not None and out.pin_cost_fraction >= 0.0


def test_interleaved_memory_is_per_gpu_in_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    """An interleaved plan's GPU holds all its virtual stages: the table's per-GPU total and cap are
    the sums over them, not one stage's against a per-stage share."""
    from pipetrain.commands.plan import gpu_memory, print_plan

    job = job_from_mapping({"model": "gpt2-medium", "topology": "dgx-h100:1", "global_batch": 32, "seq_len": 1024, "pp": 4,
                            "schedule": "interleaved", "chunks": 2, "tp": 1, "dp": 1}, source="test")
    out = plan_job(job, price_pins=False)
    gpus = gpu_memory(out.plan, out.result.graph(), out.result.topology)
    assert len(gpus) == 4 and all(len(g.stages) == 2 for g in gpus)
    for g in gpus:
        stages = [out.plan.stages[s] for s in g.stages]
        assert g.cap_bytes == pytest.approx(sum(st.memory_cap_bytes for st in stages))
        assert g.total_bytes == pytest.approx(sum(st.predicted_peak_memory_bytes for st in stages), rel=1e-6)
        assert g.reserve_bytes > 0  # a GPU keeps room for the CUDA context, NCCL and fragmentation
    print_plan(out)
    assert "memory per GPU" in capsys.readouterr().out


def test_bigger_micro_batches_cost_less_per_token_at_an_equal_bubble() -> None:
    """With pp and m held (so the bubble fraction), a bigger micro-batch runs its GEMMs closer to peak
    (pipetrain.gemm): the simulated step costs less per token on an H100 and on an A100."""
    for topology in ("dgx-h100:1", "dgx-a100-80g:1"):
        per_token = []
        for b in (1, 4):
            job = job_from_mapping({"model": "gpt2-medium", "topology": topology, "global_batch": 8 * b, "seq_len": 1024,
                                    "pp": 4, "dp": 1, "tp": 1, "microbatches": 8, "schedule": "1f1b"}, source="test")
            best = search(job, top_k=1).best
            per_token.append(best.step_time_s / (8 * b * 1024))
        assert per_token[1] < 0.8 * per_token[0], (topology, per_token)
