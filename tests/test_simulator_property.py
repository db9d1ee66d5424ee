"""Property: wherever nothing contends, the simpy engine and the fast longest path agree."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipetrain.schedules import make_schedule
from pipetrain.simulator import (
    BoundarySpec,
    DataParallelSpec,
    Link,
    SimInput,
    StageSpec,
    fast_evaluate,
    simulate,
)

times = st.floats(min_value=1e-4, max_value=5e-3, allow_nan=False)


@st.composite
def contention_free_inputs(draw: st.DrawFn) -> SimInput:
    name = draw(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1", "zbv", "dualpipev"]))
    p = draw(st.integers(1, 8))
    v = draw(st.integers(1, 3)) if name == "interleaved" else 1
    m = p * draw(st.integers(1, max(1, 16 // p))) if name == "interleaved" else draw(st.integers(1, 16))
    if name == "dualpipev":
        m = max(m, 2 * p)
    sched = make_schedule(name, p, m, v)
    n = sched.num_stages
    stages = tuple(StageSpec(t_fwd_s=draw(times), t_bwd_s=draw(times), t_wgrad_s=draw(st.sampled_from([0.0, 1e-3])) or draw(times),
                             grad_bytes=draw(st.sampled_from([0.0, 1e8])), t_optimizer_s=draw(st.sampled_from([0.0, 2e-4])))
                   for _ in range(n))
    bounds = []
    for s in range(n - 1):
        # each cut has its own links; a transfer's wire time stays below the compute between two
        # sends of the same cut, so transfers never queue (contention-free)
        bw = 1e9
        fwd = draw(st.floats(0.0, 1.0)) * stages[s].t_fwd_s * bw
        bwd = draw(st.floats(0.0, 1.0)) * stages[s + 1].duration_s("I" if sched.split_backward else "B") * bw
        lat = draw(st.floats(0.0, 2e-3))
        bounds.append(BoundarySpec(fwd_bytes=fwd, bwd_bytes=bwd, link=Link(name=f"f{s}", latency_s=lat, bandwidth_bytes_per_s=bw),
                                   bwd_link=Link(name=f"b{s}", latency_s=draw(st.floats(0.0, 2e-3)), bandwidth_bytes_per_s=bw)))
    dp = DataParallelSpec(width=draw(st.integers(1, 4)), link=Link(name="dp", latency_s=1e-5, bandwidth_bytes_per_s=1e11),
                          overlap=draw(st.booleans()))
    return SimInput(schedule=sched, stages=stages, boundaries=tuple(bounds), data_parallel=dp)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contention_free_inputs())
def test_simpy_equals_longest_path(inp: SimInput) -> None:
    a, b = simulate(inp), fast_evaluate(inp, events=True)
    assert math.isclose(a.step_time_s, b.step_time_s, rel_tol=1e-9)
    assert math.isclose(a.pipeline_time_s, b.pipeline_time_s, rel_tol=1e-9)
    assert a.peak_in_flight_per_stage == b.peak_in_flight_per_stage
    sim = sorted((e.rank, e.stage, e.kind, e.microbatch, e.start_s, e.end_s) for e in a.events if e.kind in ("F", "B", "W"))
    fast = sorted((e.rank, e.stage, e.kind, e.microbatch, e.start_s, e.end_s) for e in b.events if e.kind in ("F", "B", "W"))
    assert len(sim) == len(fast) == a.num_compute_actions
    for x, y in zip(sim, fast):
        assert x[:4] == y[:4]
        assert math.isclose(x[4], y[4], rel_tol=1e-9, abs_tol=1e-15) and math.isclose(x[5], y[5], rel_tol=1e-9, abs_tol=1e-15)


@st.composite
def contended_inputs(draw: st.DrawFn) -> SimInput:
    """Shared links, shared compute, tight buffers: the things only the simpy engine models."""
    from pipetrain.schedules import peak_in_flight
    from pipetrain.simulator import ComputeGroup

    name = draw(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]))
    p = draw(st.integers(1, 6))
    v = draw(st.integers(1, 3)) if name == "interleaved" else 1
    m = p * draw(st.integers(1, max(1, 12 // p))) if name == "interleaved" else draw(st.integers(1, 12))
    if name in ("1f1b", "zb-h1"):
        caps = draw(st.lists(st.integers(1, p + 1), min_size=p, max_size=p))
        sched = make_schedule(name, p, m, v, buffers=caps)
    else:
        sched = make_schedule(name, p, m, v)
        caps = [n + draw(st.integers(0, 1)) for n in peak_in_flight(sched)]
    n = sched.num_stages
    stages = tuple(StageSpec(t_fwd_s=draw(times), t_bwd_s=draw(times), t_wgrad_s=draw(times), buffers=caps[s]) for s in range(n))
    n_links = draw(st.integers(1, 3))  # few names: transfers of different cuts share them
    bounds = tuple(BoundarySpec(fwd_bytes=draw(st.floats(0, 5e6)), bwd_bytes=draw(st.floats(0, 5e6)),
                                link=Link(name=f"l{draw(st.integers(0, n_links - 1))}", latency_s=draw(st.floats(0, 1e-3)),
                                          bandwidth_bytes_per_s=1e9),
                                bwd_link=Link(name=f"l{draw(st.integers(0, n_links - 1))}", latency_s=1e-4, bandwidth_bytes_per_s=1e9))
                   for _ in range(n - 1))
    groups = ()
    if p >= 2 and draw(st.booleans()):
        groups = (ComputeGroup(ranks=tuple(range(p)), capacity=draw(st.integers(1, p))),)
    return SimInput(schedule=sched, stages=stages, boundaries=bounds, compute_groups=groups)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contended_inputs())
def test_contention_only_delays(inp: SimInput) -> None:
    # every rank keeps its order, so sharing links, cores or buffers can only add waits: the simpy
    # step is never shorter than the contention-free longest path, and the buffers are respected
    a, b = simulate(inp), fast_evaluate(inp)
    assert a.step_time_s >= b.step_time_s * (1 - 1e-9)
    assert all(n <= spec.buffers for n, spec in zip(a.peak_in_flight_per_stage, inp.stages))
    busy = sorted((e.start_s, e.end_s) for e in a.events if e.kind in ("F", "B", "W"))
    if inp.compute_groups and inp.compute_groups[0].capacity == 1:
        assert all(x[1] <= y[0] + 1e-12 for x, y in zip(busy, busy[1:]))  # one core: never two at once


@settings(max_examples=200, deadline=None)
@given(jobs=st.lists(st.tuples(st.floats(0, 5), st.floats(0, 3)), min_size=1, max_size=6), capacity=st.integers(1, 3))
def test_shared_finish_times_bounds(jobs: list[tuple[float, float]], capacity: int) -> None:
    """Fluid sharing never beats a job running alone, never idles a core with work waiting:
    every job ends at or after start + work, and the last one no later than the latest start
    plus all the work spread over the cores it can use."""
    from pipetrain.simulator.sharing import shared_finish_times

    starts, works = [s for s, _ in jobs], [w for _, w in jobs]
    ends = shared_finish_times(starts, works, capacity)
    assert all(e >= s + w - 1e-9 for e, s, w in zip(ends, starts, works))
    assert max(ends) <= max(starts) + sum(works) / min(capacity, len(jobs)) + max(works) + 1e-9
