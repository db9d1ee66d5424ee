"""The planner's neighbourhood curves price each point as a pinned search screens the same candidate."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from pipetrain.planner.explain import plan_job  # noqa: E402
from pipetrain.planner.job import job_from_mapping  # noqa: E402
from pipetrain.planner.neighbourhood import NeighbourPoint, neighbourhood  # noqa: E402
from pipetrain.planner.search import search  # noqa: E402

JOB = {"model": "tiny-gpt", "topology": "local-cpu:2", "global_batch": 16, "seq_len": 32, "dtype": "fp32", "pp": 2,
       "schedule": "1f1b"}


def test_points_equal_the_pinned_searchs_screening() -> None:
    out = plan_job(job_from_mapping(JOB))
    best = out.result.best.candidate
    pts = neighbourhood(out.result)
    curve = [p for p in pts if p.axis == "microbatches"]
    assert {p.micro_batch_size for p in curve} == {1, 2, 4, 8, 16} and all(p.global_batch == 16 for p in curve)
    assert [p.chosen for p in curve].count(True) == 1
    sizes = [p for p in pts if p.axis == "microbatch_size"]
    assert all(p.num_microbatches == best.num_microbatches for p in sizes)
    assert [p.global_batch for p in sizes] == [best.dp * p.micro_batch_size * best.num_microbatches for p in sizes]
    for p in curve + sizes:
        # an independent search with the point pinned screens the same candidate (its exact split, before polishing)
        pinned = search(job_from_mapping({**JOB, "global_batch": p.global_batch, "microbatches": p.num_microbatches}))
        same = [e for e in pinned.screened if (e.candidate.micro_batch_size, e.candidate.schedule) == (p.micro_batch_size, "1f1b")]
        assert len(same) == 1 and p.step_time_s == same[0].fast.step_time_s
        assert p.tokens_per_s == pytest.approx(p.global_batch * 32 / p.step_time_s, rel=1e-12)
    # more micro-batches of the same batch: a smaller bubble (1F1B at p=2: (p-1)/(m+p-1) of a balanced step)
    by_m = sorted(curve, key=lambda p: p.num_microbatches)
    assert by_m[0].bubble_fraction is not None and by_m[-1].bubble_fraction is not None
    assert by_m[-1].bubble_fraction < by_m[0].bubble_fraction


def test_a_point_is_a_time_or_a_reason() -> None:
    with pytest.raises(ValueError, match="either a step time or the reason"):
        NeighbourPoint(axis="microbatches", num_microbatches=2, micro_batch_size=1, global_batch=2, chosen=False)
    with pytest.raises(ValueError, match="axis"):
        NeighbourPoint(axis="m", num_microbatches=2, micro_batch_size=1, global_batch=2, chosen=False, reason="x")
