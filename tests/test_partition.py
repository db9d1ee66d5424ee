"""Exactness of the inner partitioner against brute force, and its infeasibility messages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipetrain.errors import InfeasibleError
from pipetrain.planner.partition import PartitionInfeasibleError, additive_matrix, evaluate_partition, matrix_from_function, partition

GiB = float(1 << 30)


def _instance(seed: int):
    """A random heterogeneous instance: per-block times, per-device speed, 1F1B-style memory."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 15))
    p = int(rng.integers(1, min(4, n) + 1))
    m = int(rng.integers(1, 9))
    times = rng.uniform(0.1, 5.0, n)
    speeds = rng.choice([0.5, 1.0, 2.0], p)
    params = rng.uniform(0.5, 4.0, n) * GiB
    acts = rng.uniform(0.1, 2.0, n) * GiB
    inflight = [min(p - s, m) for s in range(p)]
    # caps between "barely anything fits" and "everything fits", per device
    total = params.sum() * 4 + acts.sum() * m
    caps = rng.uniform(0.15, 0.9, p) * total / max(1, p - 1) if p > 1 else [rng.uniform(0.5, 1.5) * total]
    time_fn = lambda s: additive_matrix(times, scale=1.0 / speeds[s])  # noqa: E731
    mem_fn = lambda s: additive_matrix(params * 4 + acts * inflight[s])  # noqa: E731
    return n, p, times, speeds, params, acts, inflight, [float(c) for c in caps], time_fn, mem_fn


def _brute(n, p, time_fn, mem_fn, caps):
    best = None
    tmats = [time_fn(s) for s in range(p)]
    mmats = [mem_fn(s) for s in range(p)]
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        if any(mmats[s][edges[s], edges[s + 1]] > caps[s] for s in range(p)):
            continue
        b = max(tmats[s][edges[s], edges[s + 1]] for s in range(p))
        if best is None or b < best[0]:
            best = (b, cuts)
    return best


def test_exact_against_brute_force_on_random_instances() -> None:
    feasible = infeasible = 0
    for seed in range(120):
        n, p, *_rest, caps, time_fn, mem_fn = _instance(seed)
        brute = _brute(n, p, time_fn, mem_fn, caps)
        if brute is None:
            infeasible += 1
            with pytest.raises(PartitionInfeasibleError) as ei:
                partition(n, p, stage_time=time_fn, stage_memory=mem_fn, caps=caps)
            e = ei.value
            if e.stage is not None:  # the named stage really is over its cap in the least-bad split
                assert e.need_bytes > e.cap_bytes == caps[e.stage]
                assert f"p={p}: stage {e.stage} needs" in str(e)
            continue
        feasible += 1
        res = partition(n, p, stage_time=time_fn, stage_memory=mem_fn, caps=caps)
        assert res.bottleneck_s == brute[0], (seed, res, brute)
        assert res.num_stages == p and all(k >= 1 for k in res.blocks_per_stage)
        for s, (a, b) in enumerate(res.ranges):
            assert mem_fn(s)[a, b] <= caps[s]
            assert res.stage_memory_bytes[s] <= caps[s]
    assert feasible >= 50 and infeasible >= 5, (feasible, infeasible)


def test_tie_break_is_least_total_then_lexicographic() -> None:
    # 4 equal blocks, 2 stages, stage 1 twice as fast: bottleneck 2 reached by (2|2)? no:
    # cuts at 1: max(1, 1.5)=1.5 ; at 2: max(2, 1)=2 ; at 3: max(3, .5)=3 -> cut at 1.
    t = [1.0, 1.0, 1.0, 1.0]
    speeds = [1.0, 2.0]
    res = partition(4, 2, stage_time=lambda s: additive_matrix(t, scale=1 / speeds[s]),
                    stage_memory=lambda s: additive_matrix(np.zeros(4)), caps=[1.0, 1.0])
    assert res.boundaries == (1,) and res.bottleneck_s == 1.5
    # All-equal bottleneck: 5 blocks of 1.0 and one of 3.0 -> bottleneck is 3 for many splits;
    # the least total (constant here) then the lexicographically smallest boundaries win.
    t2 = [1.0, 1.0, 3.0, 1.0, 1.0]
    # p=4: (1,2,3) -> 1,1,3,2 and (2,3,4) -> 2,3,1,1 both reach 3 with total 7.
    res2 = partition(5, 4, stage_time=lambda s: additive_matrix(t2), stage_memory=lambda s: additive_matrix(np.zeros(5)),
                     caps=[1.0] * 4)
    assert res2.bottleneck_s == 3.0 and res2.boundaries == (1, 2, 3)
    again = partition(5, 4, stage_time=lambda s: additive_matrix(t2), stage_memory=lambda s: additive_matrix(np.zeros(5)),
                      caps=[1.0] * 4)
    assert again == res2


def test_memory_depends_on_stage_position() -> None:
    # 1F1B: stage 0 keeps p=2 micro-batches in flight, stage 1 keeps 1. Equal times would cut at 2,
    # but stage 0 cannot hold 2 blocks x 2 micro-batches of 10 GiB under a 30 GiB cap.
    act = np.full(4, 10 * GiB)
    mem = lambda s: additive_matrix(act * (2 - s))  # noqa: E731
    res = partition(4, 2, stage_time=lambda s: additive_matrix(np.ones(4)), stage_memory=mem, caps=[30 * GiB, 30 * GiB])
    assert res.boundaries == (1,) and res.stage_memory_bytes == (20 * GiB, 30 * GiB)


def test_infeasible_names_stage_and_bytes() -> None:
    params = np.array([40.0, 52.4, 10.0]) * GiB
    with pytest.raises(PartitionInfeasibleError, match=r"^p=2: stage 0 needs 92.4 GiB > 80.0 GiB$") as ei:
        # blocks 0 and 1 must share stage 0 for stage 1 (cap 12 GiB) to hold block 2 alone
        partition(3, 2, stage_time=lambda s: additive_matrix(np.ones(3)), stage_memory=lambda s: additive_matrix(params),
                  caps=[80 * GiB, 12 * GiB])
    assert ei.value.boundaries == (2,) and isinstance(ei.value, InfeasibleError)
    with pytest.raises(PartitionInfeasibleError, match="lower pp"):
        partition(3, 5, stage_time=lambda s: additive_matrix(np.ones(3)), stage_memory=lambda s: additive_matrix(params),
                  caps=[1e15] * 5)


def test_allowed_cuts_and_scalar_callbacks() -> None:
    t = [1.0, 2.0, 3.0, 4.0]
    tm = matrix_from_function(4, lambda i, j: float(sum(t[i:j])))
    assert np.allclose(tm[np.triu_indices(5, 1)], additive_matrix(t)[np.triu_indices(5, 1)])
    res = partition(4, 2, stage_time=lambda s: tm, stage_memory=lambda s: np.zeros((5, 5)), caps=[1, 1], allowed_cuts=[1, 2])
    assert res.boundaries == (2,) and res.bottleneck_s == 7.0  # cut 3 (6 vs 4) is not allowed
    ev = evaluate_partition((3,), num_blocks=4, stage_time=lambda s: tm, stage_memory=lambda s: np.zeros((5, 5)), caps=[1, 1])
    assert ev.bottleneck_s == 6.0
