"""A pipeline run's own actions and messages as the calibration reads them (pure, hand-made telemetry):
what a wait costs the next action, the speed of two ranks computing at once, the latency to a blocked
receiver, and the calibration preferring these over its one-process probes."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest

from calibration_data import block_profile, make_calibration  # (tests/)
from pipetrain.calibration.commprobe import WakeupCost
from pipetrain.calibration.corun import CoRunSpeed, ResumeCost
from pipetrain.calibration.measured import Calibration, calibrated_topology
from pipetrain.calibration.overhead import (
    MessageHostCost,
    PipelineActions,
    RuntimeOverhead,
    latency_jitter,
    pipeline_action_costs,
    pipeline_allreduce,
    pipeline_message_latency,
)
from pipetrain.graph import LayerGraph
from pipetrain.topology import topology_preset

MS = 1e-3


def _ev(kind: str, stage: int, mb: int, start_ms: float, end_ms: float, step: int = 1) -> dict[str, Any]:
    return {"type": "event", "kind": kind, "stage": stage, "microbatch": mb, "start_s": start_ms * MS, "end_s": end_ms * MS,
            "step": step}


#: profiled seconds of each stage's F and B
PROFILED = {(0, "F"): 1 * MS, (0, "B"): 2 * MS, (1, "F"): 1 * MS, (1, "B"): 2 * MS}

#: rank 0 runs stage 0, rank 1 stage 1; step 0 is warm-up
RECORDS = {
    0: [
        _ev("F", 0, 0, 0.0, 50.0, step=0),  # warm-up: left out however slow
        _ev("F", 0, 0, 100.0, 101.0),  # the step's first action: follows the boundary work, left out
        _ev("F", 0, 1, 101.05, 102.15),  # right after another, alone: 1.1 x profile
        _ev("B", 0, 0, 106.0, 108.5),  # after a 3.85 ms wait, alone: 2.5 ms for 2 ms of profile
        _ev("F", 0, 2, 108.55, 109.65),  # right after another, alone: 1.1 x
        _ev("B", 0, 1, 112.0, 115.05),  # after a wait, fully under rank 1's F: 3.05 ms for 2 ms of profile
        _ev("OPT", -1, -1, 116.0, 117.0),
    ],
    1: [
        _ev("F", 1, 0, 103.0, 104.1),  # the step's first action
        _ev("B", 1, 0, 104.15, 105.95),  # right after another, alone: 1.8 ms for 2 ms
        _ev("F", 1, 1, 112.0, 120.0),  # after a wait, 38% under rank 0's B: neither alone nor co-running
    ],
}


def test_wait_cost_and_corun_speed_from_the_pipelines_actions() -> None:
    got = pipeline_action_costs(RECORDS, PROFILED, warmup=1, min_corun=1)
    assert got is not None
    # the actions back to back, alone: total span over total profile, (1.1 + 1.1 + 1.8) / (1 + 1 + 2)
    assert got.hot_ratio == pytest.approx(1.0)
    assert got.resume_s == pytest.approx(0.5 * MS)  # the wait's cost: 2.5 ms after it, 2 ms back to back
    assert (got.hot_actions, got.waited_actions, got.corun_actions) == (3, 1, 1)
    # fully overlapped, after a wait: 3.05 ms less 0.5 ms of the wait is 2.55 ms for 2 ms of work
    assert got.corun_speed == pytest.approx(2.0 / 2.55)
    # too few co-running actions: no speed (the probe's stays); no waited action: nothing
    assert pipeline_action_costs(RECORDS, PROFILED, warmup=1, min_corun=2) == replace(got, corun_speed=0.0, corun_actions=0)
    back_to_back = {0: [_ev("F", 0, 0, 100.0, 101.0), _ev("F", 0, 1, 101.05, 102.15), _ev("B", 0, 0, 102.2, 104.4)]}
    assert pipeline_action_costs(back_to_back, PROFILED, warmup=1, min_corun=1) is None


def test_latency_to_a_blocked_receiver() -> None:
    recs = {
        0: [_ev("F", 0, 0, 0.0, 1.0), _ev("SEND", 0, 0, 1.0, 1.5), _ev("SEND", 0, 1, 2.0, 2.7), _ev("RECV", 0, 0, 0.1, 3.6),
            _ev("F", 0, 1, 1.1, 1.9)],
        1: [_ev("B", 1, 9, 0.0, 0.5),
            _ev("RECV", 1, 0, 0.2, 1.4),  # blocked since 0.5, sent at 1.0: 0.4 ms
            _ev("F", 1, 0, 1.45, 2.6),
            _ev("RECV", 1, 1, 0.3, 2.65),  # computing when it was sent (at 2.0): left out
            _ev("SEND", 1, 0, 3.0, 3.2)],  # the gradient to rank 0, idle since 1.9: 0.6 ms
    }
    mean, count, ratios = pipeline_message_latency(recs, warmup=1)
    assert (mean, count) == (pytest.approx(0.5 * MS), 2)
    assert sorted(ratios) == [pytest.approx(0.8), pytest.approx(1.2)]  # 0.4 and 0.6 ms over their mean
    assert pipeline_message_latency(recs, warmup=2) == (0.0, 0, ())


def test_latency_distribution_kept_as_quantiles_of_mean_one() -> None:
    # five fast messages and one slow one (a descheduled receiver), as ratios to their mean
    ratios = [0.1] * 5 + [5.5]
    # 4 quantiles at the midpoints 1/8, 3/8, 5/8, 7/8 of 6 sorted values: ranks 0, 2, 3, 5
    q = latency_jitter(ratios, k=4)
    assert q == (pytest.approx(0.1 / 1.45, abs=1e-4),) * 3 + (pytest.approx(5.5 / 1.45, abs=1e-4),)
    assert sum(q) / 4 == pytest.approx(1.0, abs=1e-3)
    assert len(latency_jitter(ratios)) == 32  # fewer messages than quantiles: ranks repeat
    assert latency_jitter([]) == () and latency_jitter([0.0, 0.0]) == ()


#: the one-rank run: its spans 2.5 x the profile (a busy machine), 0.2 of host work between actions
RUNTIME = RuntimeOverhead(model="tiny-gpt", micro_batch_size=1, seq_len=32, factor=2.7, fixed_s=0.0, measured_step_s=(0.03, 0.08),
                          profiled_microbatch_s=3e-3, num_microbatches=(2, 8), steps=20, span_factor=2.5)


def _cal(messages: tuple[MessageHostCost, ...]) -> Calibration:
    prof = block_profile("tiny-gpt", 1, 32, (("b0", "linear", 1e-3, 2e-3),))
    return make_calibration((prof,), latency_s=2e-5,
                            messages=messages, runtime=(RUNTIME,), wakeup=WakeupCost(nbytes=1000, busy_processes=2, idle_one_way_s=4e-3, busy_one_way_s=8e-3),
                            corun=(CoRunSpeed(model="tiny-gpt", micro_batch_size=1, seq_len=32, cores=2, speed=(1.0, 0.35, 0.3), alone_s=3e-3),),
                            resume=(ResumeCost(model="tiny-gpt", micro_batch_size=1, seq_len=32, gap_s=3e-3, hot_s=1e-3, cold_s=1.25e-3,
                                               pairs=10),))


def test_calibration_prefers_the_pipelines_own_measurements() -> None:
    plain = MessageHostCost(model="tiny-gpt", micro_batch_size=1, seq_len=32, host_s=1e-4, outside_one_rank_s=1e-3,
                            outside_two_ranks_s=(2e-3, 2e-3), messages_per_rank=16)
    probes = _cal((plain,))  # an older calibration: the probes' numbers
    assert probes.pipeline_latency_s() == pytest.approx(4e-3 - 1000 / 1e9)
    assert probes.resume_s() == pytest.approx(0.25e-3) and probes.corun_speed() == (1.0, 0.35, 0.3)
    graph = cast(LayerGraph, SimpleNamespace(model="tiny-gpt", micro_batch_size=1, seq_len=32))  # all overhead_for reads
    assert probes.overhead_for(graph) == pytest.approx(2.7)
    acts = PipelineActions(hot_ratio=1.1, resume_s=6e-5, hot_actions=100, waited_actions=120, corun_speed=0.97, corun_actions=80)
    piped = replace(plain, pipeline_hot_ratio=acts.hot_ratio, pipeline_resume_s=acts.resume_s, pipeline_hot_actions=acts.hot_actions,
                    pipeline_waited_actions=acts.waited_actions, pipeline_corun_speed=acts.corun_speed,
                    pipeline_corun_actions=acts.corun_actions, pipeline_latency_s=1.5e-3, pipeline_latency_messages=120)
    cal = _cal((piped,))
    assert cal.pipeline_latency_s() == pytest.approx(1.5e-3)
    assert replace(cal, p2p=replace(cal.p2p, latency_s=5e-3)).pipeline_latency_s() == pytest.approx(1.5e-3)  # not the ping-pong's
    assert cal.resume_s() == pytest.approx(6e-5)
    assert cal.corun_speed() == (1.0, 0.97, 0.3)  # two ranks from the pipeline; more from the probe
    assert cal.overhead_for(graph) == pytest.approx(2.7 - 2.5 + 1.1)  # the pipeline's spans, the one rank's host work
    assert _cal((replace(piped, model="gpt2"),)).overhead_for(graph) == pytest.approx(2.7)  # another model's pipeline: not this one's
    node = calibrated_topology(topology_preset("local-cpu:2"), cal).nodes[0]
    assert (node.link.latency_s, node.resume_s, node.corun_speed) == (pytest.approx(1.5e-3), pytest.approx(6e-5), (1.0, 0.97, 0.3))
    assert node.link.latency_jitter == () and probes.pipeline_latency_jitter() == ()  # no distribution measured: a fixed latency
    # with the distribution: two models' quantiles, quantile by quantile their median, scaled to average 1
    jit = replace(piped, pipeline_latency_jitter=(0.2, 0.2, 2.6))
    other = replace(piped, model="gpt2", pipeline_latency_jitter=(0.4, 0.4, 2.2))
    both = _cal((jit, other, replace(piped, model="bert", pipeline_latency_jitter=(0.3, 0.3, 2.4))))
    assert both.pipeline_latency_jitter() == pytest.approx((0.3, 0.3, 2.4))
    link = calibrated_topology(topology_preset("local-cpu:2"), _cal((jit,))).nodes[0].link
    assert link.latency_jitter == pytest.approx((0.2, 0.2, 2.6)) and link.latency_s == pytest.approx(1.5e-3)
    # a machine twice as slow: the wait's cost doubles, the speed and the latency stay
    slow = cal.rescaled(2.0)
    assert slow.resume_s() == pytest.approx(1.2e-4) and slow.corun_speed() == cal.corun_speed()
    assert slow.pipeline_latency_s() == pytest.approx(1.5e-3)


def _ar(rank_stage: int, start_ms: float, end_ms: float, step: int, nbytes: int = 65536) -> dict[str, Any]:
    return {**_ev("ALLREDUCE", rank_stage, -1, start_ms, end_ms, step=step), "bytes": nbytes}


def test_allreduce_as_the_pipeline_ran_it_prices_two_rank_allreduces() -> None:
    from pipetrain.sharding import CollectiveFit, collective_time_s

    recs = {
        0: [_ar(0, 0.0, 9.0, step=0), _ar(0, 10.0, 10.5, step=1), _ar(0, 20.0, 23.0, step=2), _ar(0, 30.0, 30.9, step=3)],
        # rank 1 enters first in steps 1 and 3 (it waits for rank 0), last in step 2
        1: [_ar(1, 0.0, 9.0, step=0), _ar(1, 8.0, 10.5, step=1), _ar(1, 22.0, 23.0, step=2), _ar(1, 29.0, 30.9, step=3)],
    }
    # the last to enter: 0.5, 1.0, 0.9 ms (step 0 is warm-up) -> the median 0.9 ms at 64 KiB over 3 steps
    assert pipeline_allreduce(recs, warmup=1) == (pytest.approx(0.9 * MS), 3, 65536)
    assert pipeline_allreduce({0: recs[0]}, warmup=1) == (0.0, 0, 0)  # one rank: no collective to read
    mixed = {0: recs[0], 1: [_ar(1, 8.0, 10.5, step=1, nbytes=4)]}
    assert pipeline_allreduce(mixed, warmup=1) == (0.0, 0, 0)  # sizes differ: not one collective
    probe = CollectiveFit(kind="all_reduce", ranks=2, backend="gloo", latency_s=1.5e-3, per_byte_s=1e-9,
                          sizes_bytes=(16384, 1 << 20), seconds=(3.1e-3, 2.6e-3))
    gather = CollectiveFit(kind="all_gather", ranks=2, backend="gloo", latency_s=3e-4, per_byte_s=6e-10)
    plain = MessageHostCost(model="tiny-gpt", micro_batch_size=1, seq_len=32, host_s=1e-4, outside_one_rank_s=1e-3,
                            outside_two_ranks_s=(2e-3, 2e-3), messages_per_rank=16)
    cal = replace(_cal((replace(plain, pipeline_allreduce_s=0.9e-3, pipeline_allreduce_bytes=65536, pipeline_allreduce_steps=3),)),
                  collectives=(probe, gather))
    fits = cal.collectives_as_run()
    # the probe's other collectives stay; the two-rank all-reduce is the pipeline's at its size plus the probe's per byte
    assert fits[0] == gather and len(fits) == 2
    link = topology_preset("local-cpu:2").nodes[0].link
    assert collective_time_s("all_reduce", 65536, 2, link, fits) == pytest.approx(0.9e-3)
    assert collective_time_s("all_reduce", 8, 2, link, fits) == pytest.approx(0.9e-3 - 65528 * 1e-9)  # the clipping's scalar
    assert collective_time_s("all_reduce", 1 << 20, 2, link, fits) == pytest.approx(0.9e-3 + ((1 << 20) - 65536) * 1e-9)
    assert _cal((plain,)).collectives_as_run() == ()  # nothing measured in a pipeline: the probe's (none here)
    assert replace(_cal((plain,)), collectives=(probe,)).collectives_as_run() == (probe,)

