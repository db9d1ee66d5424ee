from __future__ import annotations

import json

import pytest

from pipetrain.errors import PlanError
from pipetrain.plan import SCHEMA_VERSION, Alternative, Plan, PredictedMetrics, StagePlan, TensorSpec


def _plan(**kw) -> Plan:
    stages = (
        StagePlan(index=0, block_start=0, block_end=3, rank=0, device="cpu:0", buffers=2, outputs=(TensorSpec(shape=(2, 16, 64), dtype="float32"),)),
        StagePlan(index=1, block_start=3, block_end=5, rank=1, device="cpu:1", buffers=1, recompute=True,
                  inputs=(TensorSpec(shape=(2, 16, 64), dtype="float32"),)),
    )
    base = dict(model="tiny-gpt", graph_fingerprint="f" * 64, topology="local-cpu:2", pp=2, dp=2, micro_batch_size=2,
                num_microbatches=4, seq_len=16, schedule="1f1b", stages=stages,
                predicted=PredictedMetrics(step_time_s=0.5, samples_per_s=32.0, tokens_per_s=512.0, mfu=0.1, bubble_fraction=0.2, peak_memory_bytes=(1e6, 2e6)),
                alternatives=(Alternative(description="gpipe", step_time_s=0.7, reason="slower by 40%"),))
    base.update(kw)
    return Plan(**base)


def test_round_trip_is_exact_and_derived_fields() -> None:
    p = _plan()
    q = Plan.from_json(p.to_json())
    assert q == p
    assert json.loads(p.to_json())["schema_version"] == SCHEMA_VERSION
    assert p.global_batch == 2 * 4 * 2
    assert p.boundaries == (3,)
    assert p.world_size == 4
    assert p.num_blocks == 5


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["stages"][1].update(bufers=2), "unknown key 'bufers'"),
        (lambda d: d.update(schedule="zigzag"), "schedule 'zigzag' is unknown"),
        (lambda d: d.update(pp=3), "pp*chunks = 3"),
        (lambda d: d["stages"][1].update(block_start=4), "must be contiguous"),
        (lambda d: d.update(schema_version=99), "schema_version 99"),
        (lambda d: d["stages"][0].update(buffers=0), "buffers must be >= 1"),
        (lambda d: d.update(zero=4), "zero must be one of"),
        (lambda d: d.update(tp=0), "tp must be >= 1"),
        (lambda d: d.update(sequence_parallel=True), "sequence_parallel needs tp > 1"),
        (lambda d: d.update(recompute="some"), "recompute 'some' is unknown"),
        (lambda d: d.update(precision="bf16-mixed"), "needs a 16-bit compute dtype"),
        (lambda d: d["stages"][1].update(recompute_layers=3), "recompute_layers must be in [0, 2]"),
        (lambda d: d.update(micro_batch_size="2"), "micro_batch_size: expected an integer"),
    ],
)
def test_bad_plans_name_the_field(edit, needle) -> None:
    d = json.loads(_plan().to_json())
    edit(d)
    with pytest.raises(PlanError, match=None) as info:
        Plan.from_dict(d)
    assert needle in str(info.value)


def test_plan_refuses_another_graph() -> None:
    p = _plan()
    p.check_graph("f" * 64)
    with pytest.raises(PlanError, match="re-run `pipetrain plan`"):
        p.check_graph("0" * 64, model="gpt2")


def test_median_merge_takes_medians_field_by_field() -> None:
    from dataclasses import dataclass, field

    from pipetrain.errors import ConfigError
    from pipetrain.serde import median_merge

    @dataclass(frozen=True)
    class M:
        name: str
        t_s: float
        n: int
        xs: tuple[float, ...]
        by: dict[str, float] = field(default_factory=dict)
        when: str = ""

    items = [M(name="a", t_s=3.0, n=1, xs=(1.0, 9.0), by={"k": 5.0}, when="t0"),
             M(name="a", t_s=1.0, n=4, xs=(2.0, 8.0), by={"k": 1.0}, when="t1"),
             M(name="a", t_s=2.0, n=2, xs=(3.0, 7.0), by={"k": 3.0}, when="t2")]
    got = median_merge(items, "m", last=("when",))
    assert got == M(name="a", t_s=2.0, n=2, xs=(2.0, 8.0), by={"k": 3.0}, when="t2")
    assert median_merge(items[:2], "m", last=("when",)).n == 2  # ints: the median, rounded down
    with pytest.raises(ConfigError, match=r"m\.name: values differ"):
        median_merge([items[0], M(name="b", t_s=1.0, n=1, xs=(1.0, 9.0))], "m")


def test_schema_1_plans_read_as_their_precision_and_whole_layer_recompute() -> None:
    d = json.loads(_plan(dtype="bf16").to_json())
    d["schema_version"] = 1
    for k in ("tp", "sequence_parallel", "zero", "recompute", "precision", "idle_gpus"):
        del d[k]
    for st in d["stages"]:
        del st["recompute_layers"]
    p = Plan.from_dict(d)
    assert (p.schema_version, p.tp, p.zero, p.precision, p.recompute) == (SCHEMA_VERSION, 1, 0, "amp-autocast", "full")
    assert p.world_size == 2 * 2


def test_tp_counts_in_the_world_size() -> None:
    p = _plan(tp=4, sequence_parallel=True, zero=1, dtype="bf16", precision="bf16-mixed")
    assert p.world_size == 2 * 2 * 4
    assert Plan.from_json(p.to_json()) == p
