"""Simulator: closed forms, hand-computed timelines, contention, buffers, data parallelism, results."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from pipetrain.errors import ConfigError, ScheduleError
from pipetrain.schedules import one_f_one_b
from pipetrain.simulator import (
    BoundarySpec,
    ComputeGroup,
    DataParallelSpec,
    Link,
    SimInput,
    StageSpec,
    fast_evaluate,
    simulate,
    uniform,
)

REL = 1e-9


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


def both(inp: SimInput) -> tuple[float, float]:
    return simulate(inp).step_time_s, fast_evaluate(inp).step_time_s


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_closed_form_gpipe_1f1b(name: str) -> None:
    for p in (1, 2, 3, 4, 7):
        for m in (1, 2, 5, 8, 13):
            for tf, tb in ((1.0, 2.0), (0.37e-3, 0.81e-3)):
                want = (m + p - 1) * (tf + tb)
                got = both(uniform(p, m, name, t_fwd_s=tf, t_bwd_s=tb))
                assert close(got[0], want) and close(got[1], want), (p, m, tf, tb, got, want)


def test_closed_form_interleaved() -> None:
    for p in (1, 2, 3, 4):
        for v in (1, 2, 3, 4):
            for m in (p, 2 * p, 3 * p):
                for tf, tb in ((1.0, 2.0), (0.3e-3, 0.7e-3)):
                    want = m * (tf + tb) + (p - 1) * (tf + tb) / v
                    got = both(uniform(p, m, "interleaved", chunks=v, t_fwd_s=tf, t_bwd_s=tb))
                    assert close(got[0], want) and close(got[1], want), (p, v, m, got, want)


def test_zb_h1_beats_1f1b_by_the_papers_bubble() -> None:
    # Qi et al. 2024: with tF = tB = tW, ZB-H1's bubble is (p-1)(tF+tB-tW) = (p-1)t, 1F1B's (p-1)(tF+tB+tW)
    t = 1.5e-3
    for p in (2, 4, 8):
        for m in (p, 2 * p):
            zb = both(uniform(p, m, "zb-h1", t_fwd_s=t, t_bwd_s=t, t_wgrad_s=t))
            ofob = simulate(uniform(p, m, "1f1b", t_fwd_s=t, t_bwd_s=t, t_wgrad_s=t)).step_time_s
            assert close(zb[0], (3 * m + p - 1) * t) and close(zb[1], zb[0])
            assert close(ofob, 3 * (m + p - 1) * t)


def test_peak_in_flight_and_bubble() -> None:
    for p in (1, 3, 4, 6):
        for m in (1, 2, 4, 9):
            r = simulate(uniform(p, m, "1f1b", t_fwd_s=1.0, t_bwd_s=2.0))
            assert r.peak_in_flight_per_stage == tuple(min(p - s, m) for s in range(p))
            assert close(r.bubble_fraction, (p - 1) / (m + p - 1))
            assert fast_evaluate(uniform(p, m, "1f1b", t_fwd_s=1.0, t_bwd_s=2.0)).peak_in_flight_per_stage == r.peak_in_flight_per_stage
            g = simulate(uniform(p, m, "gpipe", t_fwd_s=1.0, t_bwd_s=2.0))
            assert g.peak_in_flight_per_stage == (m,) * p


def _timeline(r, kinds=("F", "B", "SEND", "RECV")) -> list[tuple]:
    return sorted((e.rank, e.start_s, e.kind, e.stage, e.microbatch, e.end_s) for e in r.events if e.kind in kinds)


def test_hand_computed_1f1b_timeline() -> None:
    # p=2, m=2, F 1 s, B 2 s, each transfer 0.5 s of latency
    r = simulate(uniform(2, 2, "1f1b", t_fwd_s=1.0, t_bwd_s=2.0, t_comm_s=0.5))
    assert _timeline(r) == sorted([
        (0, 0.0, "F", 0, 0, 1.0), (0, 1.0, "SEND", 0, 0, 1.5), (0, 1.0, "F", 0, 1, 2.0), (0, 2.0, "SEND", 0, 1, 2.5),
        (0, 2.0, "RECV", 0, 0, 5.0), (0, 5.0, "B", 0, 0, 7.0), (0, 7.0, "RECV", 0, 1, 8.0), (0, 8.0, "B", 0, 1, 10.0),
        (1, 0.0, "RECV", 1, 0, 1.5), (1, 1.5, "F", 1, 0, 2.5), (1, 2.5, "B", 1, 0, 4.5), (1, 4.5, "SEND", 1, 0, 5.0),
        (1, 4.5, "RECV", 1, 1, 4.5), (1, 4.5, "F", 1, 1, 5.5), (1, 5.5, "B", 1, 1, 7.5), (1, 7.5, "SEND", 1, 1, 8.0),
    ])
    assert r.step_time_s == 10.0 and fast_evaluate(r_inp := uniform(2, 2, "1f1b", t_fwd_s=1.0, t_bwd_s=2.0, t_comm_s=0.5)).step_time_s == 10.0
    assert [(e.kind, e.start_s, e.end_s) for e in fast_evaluate(r_inp, events=True).events if e.rank == 1] == [
        ("F", 1.5, 2.5), ("B", 2.5, 4.5), ("F", 4.5, 5.5), ("B", 5.5, 7.5)]


def test_hand_computed_zb_h1_timeline() -> None:
    # p=2, m=2, F = B = W = 1 s: rank 1 runs F0 B0 F1 B1 W0 W1, rank 0 F0 F1 B0 W0 B1 W1
    r = simulate(uniform(2, 2, "zb-h1", t_fwd_s=1.0, t_bwd_s=1.0, t_wgrad_s=1.0))
    got = sorted((e.rank, e.start_s, e.kind, e.microbatch, e.end_s) for e in r.events if e.kind in "FBW")
    assert got == [
        (0, 0.0, "F", 0, 1.0), (0, 1.0, "F", 1, 2.0), (0, 3.0, "B", 0, 4.0), (0, 4.0, "W", 0, 5.0), (0, 5.0, "B", 1, 6.0), (0, 6.0, "W", 1, 7.0),
        (1, 1.0, "F", 0, 2.0), (1, 2.0, "B", 0, 3.0), (1, 3.0, "F", 1, 4.0), (1, 4.0, "B", 1, 5.0), (1, 5.0, "W", 0, 6.0), (1, 6.0, "W", 1, 7.0),
    ]
    assert r.step_time_s == 7.0


def test_link_contention_queues_transfers() -> None:
    # two 150 MB activations on one 100 MB/s link: the second waits for the first (FIFO)
    stage = StageSpec(t_fwd_s=1.0, t_bwd_s=1.0)
    inp = SimInput(schedule=one_f_one_b(2, 2), stages=(stage, stage),
                   boundaries=(BoundarySpec(fwd_bytes=150e6, link=Link(name="l", bandwidth_bytes_per_s=100e6)),))
    r = simulate(inp)
    sends = [(e.start_s, e.end_s) for e in r.events if e.kind == "SEND" and e.rank == 0]
    assert sends == [(1.0, 2.5), (2.5, 4.0)]
    f1 = [e for e in r.events if e.kind == "F" and e.rank == 1]
    assert [(e.start_s, e.end_s) for e in f1] == [(2.5, 3.5), (4.5, 5.5)]  # 1F1 also waits for 1B0
    # the fast evaluator ignores contention: it lets the second transfer start at 2.0
    assert fast_evaluate(inp).step_time_s <= r.step_time_s


def test_shared_compute_group_serializes() -> None:
    stage = StageSpec(t_fwd_s=1.0, t_bwd_s=1.0)
    base = dict(schedule=one_f_one_b(2, 2), stages=(stage, stage))
    alone = simulate(SimInput(**base))
    shared = simulate(SimInput(**base, compute_groups=(ComputeGroup(ranks=(0, 1), capacity=1),)))
    roomy = simulate(SimInput(**base, compute_groups=(ComputeGroup(ranks=(0, 1), capacity=2),)))
    assert alone.step_time_s == 6.0 and roomy.step_time_s == 6.0
    assert shared.step_time_s == 8.0  # all 8 s of work on one core, never idle
    spans = sorted((e.start_s, e.end_s) for e in shared.events if e.kind in "FB")
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once


def _with_buffers(p: int, m: int, caps: list[int] | None, t_comm_s: float) -> SimInput:
    base = uniform(p, m, t_fwd_s=1.0, t_bwd_s=2.0, t_comm_s=t_comm_s)
    return SimInput(schedule=one_f_one_b(p, m, buffers=caps), boundaries=base.boundaries,
                    stages=tuple(StageSpec(t_fwd_s=1.0, t_bwd_s=2.0, buffers=None if caps is None else caps[s]) for s in range(p)))


def test_buffer_back_pressure_both_directions() -> None:
    p, m = 4, 16
    exact = [p - s for s in range(p)]  # what 1F1B keeps in flight
    for comm in (0.0, 0.1):
        free = simulate(_with_buffers(p, m, None, comm))
        fewer = simulate(_with_buffers(p, m, [2] * p, comm))
        assert fewer.step_time_s > free.step_time_s * 1.5 and max(fewer.peak_in_flight_per_stage) == 2
        more = simulate(_with_buffers(p, m, [b + 1 for b in exact], comm))
        assert more.step_time_s == free.step_time_s and _timeline(more) == _timeline(free)
        assert simulate(_with_buffers(p, m, [b + 5 for b in exact], comm)).step_time_s == free.step_time_s
        just = simulate(_with_buffers(p, m, exact, comm))
        if comm == 0.0:
            # computes are unchanged; only the (zero-latency) sends start later, when posted
            assert just.step_time_s == free.step_time_s and _timeline(just, ("F", "B")) == _timeline(free, ("F", "B"))
        else:  # no spare buffer to prefetch into: each stage's receive is posted late, latency shows
            assert just.step_time_s > free.step_time_s + 0.2


def test_back_pressure_hand_timeline() -> None:
    # p=2, m=2, F 1 s, B 2 s, latency 0.5 s; stage 1 has one input buffer: its receive of
    # micro-batch 1 is posted only when 1B0 frees the buffer (4.5), so 0's send of F1 waits.
    r = simulate(_with_buffers(2, 2, [2, 1], 0.5))
    sends = sorted((e.start_s, e.end_s, e.stage, e.microbatch) for e in r.events if e.kind == "SEND")
    assert sends == [(1.0, 1.5, 0, 0), (4.5, 5.0, 0, 1), (4.5, 5.0, 1, 0), (8.0, 8.5, 1, 1)]
    assert [(e.kind, e.start_s, e.end_s) for e in r.events if e.rank == 1 and e.kind in "FB"] == [
        ("F", 1.5, 2.5), ("B", 2.5, 4.5), ("F", 5.0, 6.0), ("B", 6.0, 8.0)]
    assert r.step_time_s == 10.5
    assert simulate(_with_buffers(2, 2, [2, 2], 0.5)).step_time_s == 10.0  # a spare buffer hides it
    assert fast_evaluate(_with_buffers(2, 2, [2, 1], 0.5)).step_time_s == 10.0  # fast ignores buffers


def test_too_few_buffers_for_the_schedule_is_reported() -> None:
    # stage 1 keeps 3 micro-batches in flight with 2 receive buffers: the lowering refuses it before simulating
    tight = SimInput(schedule=one_f_one_b(4, 8), stages=tuple(StageSpec(t_fwd_s=1.0, t_bwd_s=2.0, buffers=2) for _ in range(4)))
    with pytest.raises(ScheduleError, match="1RECV_F2 is needed before a receive buffer of stage 1 is free"):
        simulate(tight)
    # stage 0 has no receives: its cap is checked at each F while simulating
    first = SimInput(schedule=one_f_one_b(4, 8), stages=tuple(StageSpec(t_fwd_s=1.0, t_bwd_s=2.0, buffers=2 if s == 0 else 4)
                                                                for s in range(4)))
    with pytest.raises(ScheduleError, match="rank 0 waits for a free activation buffer of stage 0 \\(it has 2\\)"):
        simulate(first)


def test_data_parallel_allreduce_and_optimizer() -> None:
    link = Link(name="dp", latency_s=1e-3, bandwidth_bytes_per_s=1e9)
    t_ar = 2 * 3 / 4 * 1e9 / 1e9 + 2 * 3 * 1e-3
    stage = StageSpec(t_fwd_s=1.0, t_bwd_s=2.0, grad_bytes=1e9, t_optimizer_s=0.25)
    for overlap in (False, True):
        inp = SimInput(schedule=one_f_one_b(2, 4), stages=(stage, stage),
                       data_parallel=DataParallelSpec(width=4, link=link, overlap=overlap), micro_batch_size=3, seq_len=128)
        r = simulate(inp)
        assert close(r.step_time_s, fast_evaluate(inp).step_time_s)
        assert r.pipeline_time_s == 15.0  # (4 + 1) * 3
        ar = {e.rank: e for e in r.events if e.kind == "ALLREDUCE"}
        # rank 1's last B runs [11, 13]; rank 0's [13, 15]
        if overlap:
            assert close(ar[1].start_s, 11.0) and close(ar[1].end_s, 13.0)  # hidden behind the B
            assert close(ar[0].end_s, 15.0)
            assert close(r.step_time_s, 15.25)
        else:
            assert close(ar[1].start_s, 13.0) and close(ar[1].end_s, 13.0 + t_ar)
            assert close(r.step_time_s, 15.0 + t_ar + 0.25)
        assert close(r.samples_per_s, 3 * 4 * 4 / r.step_time_s) and close(r.tokens_per_s, r.samples_per_s * 128)
        assert {e.kind for e in r.events} == {"F", "B", "SEND", "RECV", "ALLREDUCE", "OPT"}


def test_throughput_tflops_mfu() -> None:
    inp = uniform(4, 8, "1f1b", t_fwd_s=1e-3, t_bwd_s=2e-3, micro_batch_size=2, seq_len=512,
                  model_flops_per_sample=6e12, peak_flops_per_device=1e15, dp=2)
    r = simulate(inp)
    step = 11 * 3e-3
    assert close(r.step_time_s, step)
    assert close(r.samples_per_s, 2 * 8 * 2 / step) and close(r.samples_per_s_per_device, 2 * 8 * 2 / step / 8)
    assert close(r.tflops_per_device, 6e12 * 32 / step / 8 / 1e12) and close(r.mfu, r.tflops_per_device * 1e12 / 1e15)
    assert simulate(uniform(2, 2, t_fwd_s=1.0, t_bwd_s=1.0)).mfu is None


def test_memory_timeline() -> None:
    stage = StageSpec(t_fwd_s=1.0, t_bwd_s=2.0, activation_bytes=10.0, static_bytes=100.0)
    r = simulate(SimInput(schedule=one_f_one_b(2, 2), stages=(stage, stage)))
    assert r.peak_memory_bytes_per_stage == (120.0, 110.0)
    assert r.memory_timeline_per_stage[0] == ((0.0, 100.0), (0.0, 110.0), (1.0, 120.0), (6.0, 110.0), (9.0, 100.0))
    assert fast_evaluate(SimInput(schedule=one_f_one_b(2, 2), stages=(stage, stage))).peak_memory_bytes_per_stage == (120.0, 110.0)
    # zero-bubble: what W still needs is held from B to W
    zb = StageSpec(t_fwd_s=1.0, t_bwd_s=1.0, t_wgrad_s=1.0, activation_bytes=10.0, wgrad_stash_bytes=3.0)
    inp = uniform(4, 8, "zb-h1", t_fwd_s=1.0, t_bwd_s=1.0, t_wgrad_s=1.0)
    inp = SimInput(schedule=inp.schedule, stages=(zb,) * 4)
    sim, fast = simulate(inp), fast_evaluate(inp)
    assert all(a <= b for a, b in zip(sim.peak_memory_bytes_per_stage, fast.peak_memory_bytes_per_stage))
    # stage s holds p-s activations at its peak, or p-s-1 of them plus s W stashes
    assert sim.peak_memory_bytes_per_stage == tuple(10.0 * (4 - s) + 3.0 * s for s in range(4))


def test_recompute_lengthens_backward() -> None:
    s = StageSpec(t_fwd_s=1.0, t_bwd_s=2.0, t_recompute_s=1.0, recompute=True)
    r = simulate(SimInput(schedule=one_f_one_b(3, 6), stages=(s,) * 3))
    assert close(r.step_time_s, 8 * 4.0)


def test_result_json_and_trace(tmp_path: Path) -> None:
    r = simulate(uniform(2, 3, "1f1b", t_fwd_s=1e-3, t_bwd_s=2e-3, t_comm_s=1e-4))
    d = json.loads(r.to_json(tmp_path / "r.json"))
    assert d["step_time_s"] == r.step_time_s and len(d["events"]) == len(r.events) == 2 * 2 * 3 + 2 * 2 * 3
    trace = json.loads(r.write_chrome_trace(tmp_path / "t.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(r.events) and max(e["ts"] + e["dur"] for e in xs) == pytest.approx(r.step_time_s * 1e6)


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="t_fwd_s must be a number >= 0"):
        uniform(2, 2, t_fwd_s=-1.0, t_bwd_s=1.0)
    with pytest.raises(ConfigError, match="needs 3 stage specs"):
        SimInput(schedule=one_f_one_b(3, 3), stages=(StageSpec(t_fwd_s=1.0, t_bwd_s=1.0),))
    with pytest.raises(ConfigError, match="two compute groups"):
        SimInput(schedule=one_f_one_b(2, 2), stages=(StageSpec(t_fwd_s=1.0, t_bwd_s=1.0),) * 2,
                 compute_groups=(ComputeGroup(ranks=(0, 1)), ComputeGroup(ranks=(1,))))


def test_schedule_without_comms_is_refused() -> None:
    from pipetrain.schedules import Schedule

    full = one_f_one_b(2, 2)
    bare = Schedule(name="bare", num_ranks=2, num_stages=2, num_microbatches=2, stage_to_rank=(0, 1),
                    actions=tuple(full.compute_order(r) for r in range(2)))
    for fn in (simulate, fast_evaluate):
        with pytest.raises(ScheduleError, match="0 sends and 0 receives where its 1 cross-rank cuts need 4"):
            fn(SimInput(schedule=bare, stages=(StageSpec(t_fwd_s=1.0, t_bwd_s=1.0),) * 2))


def test_host_work_per_message_holds_the_rank() -> None:
    """Each send and each landed receive holds its rank for t_message_host_s (CPU ranks: gloo's host work):
    with p=2, m=1 the four messages sit on the critical path; none of it is busy time."""
    from dataclasses import replace

    base = uniform(2, 1, "1f1b", t_fwd_s=1.0, t_bwd_s=2.0)
    r0 = simulate(base)
    r = simulate(replace(base, t_message_host_s=0.1))
    assert close(r0.step_time_s, 6.0) and close(r.step_time_s, 6.4)
    assert r.busy_s_per_stage == r0.busy_s_per_stage
    spans = {(e.kind, e.rank, e.microbatch): (e.start_s, e.end_s) for e in r.events if e.kind in ("F", "B")}
    assert close(spans[("F", 1, 0)][0], 1.2) and close(spans[("B", 0, 0)][0], 4.4)
    # sharing one core: the host work competes with the other rank's compute
    shared = replace(base, t_message_host_s=0.1, compute_groups=(ComputeGroup(ranks=(0, 1), capacity=1),))
    assert close(simulate(shared).step_time_s, 6.4)


def test_blocked_receive_waits_for_a_core_when_all_are_busy() -> None:
    """ComputeGroup.wakeup_s: a receive that blocked resumes that much after its message lands if
    every core of its time-sliced group computes at that moment; with a core free, at once."""
    from dataclasses import replace

    base = uniform(2, 2, "gpipe", t_fwd_s=1.0, t_bwd_s=2.0)
    one_core = ComputeGroup(ranks=(0, 1), capacity=1, sharing="time-slice")

    def recv_end(inp: SimInput, rank: int, mb: int) -> float:
        return next(e.end_s for e in simulate(inp).events if e.kind == "RECV" and e.rank == rank and e.microbatch == mb)

    # 0F0 ends at 1.0 and lands at once; rank 0 then computes 0F1, so rank 1's core is taken
    assert close(recv_end(replace(base, compute_groups=(one_core,)), 1, 0), 1.0)
    assert close(recv_end(replace(base, compute_groups=(replace(one_core, wakeup_s=0.25),)), 1, 0), 1.25)
    # two cores: rank 1 has its own, no wait, and the step is what it was without a group
    two = replace(base, compute_groups=(ComputeGroup(ranks=(0, 1), capacity=2, sharing="time-slice", wakeup_s=0.25),))
    assert close(simulate(two).step_time_s, simulate(base).step_time_s)
    # m=1: whenever a message lands the other rank is idle, so the wait never applies
    solo = uniform(2, 1, "gpipe", t_fwd_s=1.0, t_bwd_s=2.0)
    assert close(simulate(replace(solo, compute_groups=(replace(one_core, wakeup_s=0.25),))).step_time_s, simulate(solo).step_time_s)
    with pytest.raises(ConfigError, match="wakeup_s"):
        ComputeGroup(ranks=(0, 1), wakeup_s=-1.0)


def test_optimizer_steps_share_the_cores_of_a_time_sliced_group() -> None:
    """After the clip barrier every rank's optimizer step starts at once: on one shared core two 1 s
    steps take 2 s each (fluid sharing), on two cores 1 s; a queue group keeps them whole."""
    from dataclasses import replace

    from pipetrain.simulator.sharing import shared_finish_times

    assert shared_finish_times([0.0, 1.0], [2.0, 2.0], 1) == pytest.approx([3.0, 4.0])
    assert shared_finish_times([0.0, 0.0, 3.0], [1.0, 0.0, 1.0], 1) == pytest.approx([1.0, 0.0, 4.0])
    stage = StageSpec(t_fwd_s=1.0, t_bwd_s=1.0, t_optimizer_s=1.0)
    base = SimInput(schedule=one_f_one_b(2, 2), stages=(stage, stage), clip_sync_link=Link(name="c"))
    alone = simulate(base)
    one = simulate(replace(base, compute_groups=(ComputeGroup(ranks=(0, 1), capacity=1, sharing="time-slice"),)))
    assert close(alone.step_time_s, 6.0 + 1.0)
    opt = sorted((e.start_s, e.end_s) for e in one.events if e.kind == "OPT")
    end = max(e.end_s for e in one.events if e.kind in "FB")
    assert opt == [pytest.approx((end, end + 2.0))] * 2 and close(one.step_time_s, end + 2.0)


def test_measured_corun_speed_slows_ranks_that_compute_together() -> None:
    """ComputeGroup.speed: each of k computing ranks progresses at speed[k - 1] (time-slice only).
    GPipe p=2 m=2, F 1 s, B 2 s, two cores, speed (1, 0.8): 0F1 and 1F0 overlap from 1 s and end at
    1 + 1/0.8; the first backward of rank 1 runs alone; rank 1's second and rank 0's first overlap
    (2 s of work each at 0.8); rank 0's last backward runs alone: 9.75 s against 9 s alone."""
    from dataclasses import replace

    from pipetrain.simulator.sharing import shared_finish_times

    base = uniform(2, 2, "gpipe", t_fwd_s=1.0, t_bwd_s=2.0)
    g = ComputeGroup(ranks=(0, 1), capacity=2, sharing="time-slice", speed=(1.0, 0.8))
    assert g.contends and g.rate(1) == 1.0 and g.rate(2) == 0.8
    assert close(simulate(base).step_time_s, 9.0)
    r = simulate(replace(base, compute_groups=(g,)))
    assert close(r.step_time_s, 1.0 + 1.25 + 1.0 + 2.0 + 2.5 + 2.0)
    spans = {(e.kind, e.rank, e.microbatch): (e.start_s, e.end_s) for e in r.events if e.kind in ("F", "B")}
    assert spans[("F", 0, 1)] == pytest.approx((1.0, 2.25)) and spans[("F", 1, 0)] == pytest.approx((1.0, 2.25))
    # a queue group of two on two cores never holds anyone back: the table is for time-slicing
    assert not replace(g, sharing="queue").contends
    assert close(simulate(replace(base, compute_groups=(replace(g, sharing="queue"),))).step_time_s, 9.0)
    # the same fluid model, computed directly, for the optimizer steps
    assert shared_finish_times([0.0, 0.0], [1.0, 1.0], g.rate) == pytest.approx([1.25, 1.25])
    assert shared_finish_times([0.0, 0.5], [1.0, 1.0], lambda k: (1.0, 0.5)[k - 1]) == pytest.approx([1.5, 2.0])
    # past the table the group's throughput stays at the last entry's; without one, the fair share
    six = ComputeGroup(ranks=tuple(range(6)), capacity=2, sharing="time-slice", speed=(1.0, 0.9, 0.7, 0.45))
    assert six.rate(6) == pytest.approx(0.45 * 4 / 6) and six.rate(3) == 0.7
    assert ComputeGroup(ranks=(0, 1, 2), capacity=2).rate(3) == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="speed entries"):
        ComputeGroup(ranks=(0, 1), speed=(1.0, 0.0))


def test_an_action_after_a_wait_needs_more_compute() -> None:
    """ComputeGroup.resume_s: the first action after a wait of at least resume_after_s needs that
    many seconds more. GPipe p=2 m=2, F 1 s, B 2 s, +0.5 s: rank 1 waited 1 s for 0F0, so its F0
    runs 1.0-2.5; rank 0 waited for the first gradient until 5.5 s, so that B runs 5.5-8.0, and
    its B1 (gradient landed at 7.5, no wait) 8.0-10.0."""
    from dataclasses import replace

    base = uniform(2, 2, "gpipe", t_fwd_s=1.0, t_bwd_s=2.0)
    assert close(simulate(base).step_time_s, 9.0)
    g = ComputeGroup(ranks=(0, 1), capacity=2, sharing="time-slice", resume_s=0.5, resume_after_s=0.5)
    assert g.contends and g.resume_cost_s(1.0) == 0.5 and g.resume_cost_s(0.2) == 0.0
    r = simulate(replace(base, compute_groups=(g,)))
    spans = sorted((e.rank, e.start_s, e.end_s) for e in r.events if e.kind in ("F", "B"))
    assert [s for s in spans if s[0] == 1][0] == pytest.approx((1, 1.0, 2.5))
    assert [x for s in spans if s[0] == 0 for x in s[1:]][4:] == pytest.approx([5.5, 8.0, 8.0, 10.0])
    assert close(r.step_time_s, 10.0)
    # waits shorter than resume_after_s leave the caches warm: only rank 0's long wait counts
    assert close(simulate(replace(base, compute_groups=(replace(g, resume_after_s=2.0),))).step_time_s, 9.5)
    for bad in (dict(resume_s=-0.1), dict(switch_s=1.5)):
        with pytest.raises(ConfigError, match="resume_s and switch_s"):
            ComputeGroup(ranks=(0, 1), **bad)


def test_an_action_after_another_rank_ran_on_its_core() -> None:
    """ComputeGroup.switch_s applies after any wait, and only where ranks outnumber the cores.
    GPipe p=2 m=2 on one core, F 1 s, B 2 s, +0.25 s: rank 1's F0 (after a 1 s wait) shares the
    core with rank 0's F1 from 1.0 (each at half speed): F1 ends at 3.0, F0 at 3.25; rank 1 then
    runs F1 3.25-4.25 and B0 4.25-6.25 alone; rank 0's B0 (after a wait) shares with rank 1's B1
    from 6.25: B1 ends at 10.25, B0 at 10.5; rank 0's B1 10.5-12.5. Without it: 12.0."""
    from dataclasses import replace

    base = uniform(2, 2, "gpipe", t_fwd_s=1.0, t_bwd_s=2.0)
    one = ComputeGroup(ranks=(0, 1), capacity=1, sharing="time-slice")
    assert close(simulate(replace(base, compute_groups=(one,))).step_time_s, 12.0)
    r = simulate(replace(base, compute_groups=(replace(one, switch_s=0.25),)))
    spans = sorted((e.rank, e.start_s, e.end_s) for e in r.events if e.kind in ("F", "B"))
    assert [x for s in spans for x in s] == pytest.approx([0, 0.0, 1.0, 0, 1.0, 3.0, 0, 6.25, 10.5, 0, 10.5, 12.5,
                                                          1, 1.0, 3.25, 1, 3.25, 4.25, 1, 4.25, 6.25, 1, 6.25, 10.25])
    assert close(r.step_time_s, 12.5)
    # two cores for two ranks: no other rank ran on a waiting rank's core, so no switch cost
    two = ComputeGroup(ranks=(0, 1), capacity=2, sharing="time-slice", switch_s=0.25, resume_s=0.1, resume_after_s=5.0)
    assert two.contends and two.resume_cost_s(3.0) == 0.0
    assert close(simulate(replace(base, compute_groups=(two,))).step_time_s, 9.0)


def test_tied_weight_allreduce_waits_for_both_ranks_exact() -> None:
    """GPT-2's tie across ranks: after the backward pass both ranks all-reduce the tied gradient, so
    the first to finish waits for the other; then the transfer (ring over 2 ranks: bytes/bw + 2 latency),
    or the calibration's measured all-reduce where there is one, for the tie and the clip barrier."""
    from dataclasses import replace

    from pipetrain.program import Link, TieSpec

    base = uniform(2, 4, "1f1b", t_fwd_s=1.0, t_bwd_s=2.0, t_optimizer_s=0.5)
    plain = simulate(base)
    # 1F1B at p=2, m=4, F=1, B=2: rank 0 ends its last B at (m+p-1)(F+B) = 15, rank 1 at 13; then the update
    assert plain.pipeline_time_s == pytest.approx(15.0) and plain.step_time_s == pytest.approx(15.5)
    link = Link(name="tie", latency_s=0.25, bandwidth_bytes_per_s=8.0)
    tied = replace(base, ties=(TieSpec(ranks=(0, 1), nbytes=4.0, link=link),))
    for res in (simulate(tied), fast_evaluate(tied, events=True)):
        assert res.step_time_s == pytest.approx(15.0 + 4.0 / 8.0 + 2 * 0.25 + 0.5)
        ar = sorted((e.rank, e.start_s, e.end_s) for e in res.events if e.kind == "ALLREDUCE")
        assert ar == [(0, pytest.approx(15.0), pytest.approx(16.0)), (1, pytest.approx(13.0), pytest.approx(16.0))]
    # a calibration's measured all-reduce of 2 ranks replaces the ring for the tie (2 s at 4 bytes)
    # and for the clip barrier's scalar (1.5 s, its smallest measured size); one of 4 ranks is ignored
    from pipetrain.sharding import CollectiveFit

    fit = CollectiveFit(kind="all_reduce", ranks=2, backend="gloo", latency_s=1.5, per_byte_s=0.125)
    other = CollectiveFit(kind="all_reduce", ranks=4, backend="gloo", latency_s=100.0, per_byte_s=0.0)
    measured = replace(tied, ties=(TieSpec(ranks=(0, 1), nbytes=4.0, link=link, fits=(other, fit)),))
    for res in (simulate(measured), fast_evaluate(measured, events=True)):
        assert res.step_time_s == pytest.approx(15.0 + 2.0 + 0.5)
    clipped = replace(measured, clip_sync_link=link, clip_sync_fits=(fit,))
    for res in (simulate(clipped), fast_evaluate(clipped, events=True)):
        assert res.step_time_s == pytest.approx(15.0 + 2.0 + (1.5 + 8 * 0.125) + 0.5)
        opt = sorted(e.start_s for e in res.events if e.kind == "OPT")
        assert opt == [pytest.approx(19.5)] * 2


def test_blocking_sends_hold_the_sender_until_the_data_arrived() -> None:
    """recv_mode "blocking" (Megatron's p2p waits on its send where it issues it): 2 stages, GPipe,
    m=2, F 1 s, B 2 s, 0.5 s per transfer. Each send holds its rank 0.5 s, so rank 0's second F and
    everything after it slip: 11 s against 10 s with asynchronous sends; 1F1B 10.5 s."""
    from dataclasses import replace

    from pipetrain.simulator import simulate, uniform

    for sched, post_s, blocking_s in (("gpipe", 10.0, 11.0), ("1f1b", 10.0, 10.5)):
        inp = uniform(2, 2, sched, t_fwd_s=1.0, t_bwd_s=2.0, t_comm_s=0.5)
        assert simulate(inp).step_time_s == pytest.approx(post_s)
        got = simulate(replace(inp, recv_mode="blocking"))
        assert got.step_time_s == pytest.approx(blocking_s)
        comp = {(e[0], e[2], e[3]): (e[4], e[5]) for e in got.raw_events if e[2] in ("F", "B")}
        assert comp[(0, "F", 1)] == pytest.approx((1.5, 2.5))  # after its first send arrived, not at 1.0
        if sched == "1f1b":  # rank 1 sends B0's gradient (4.5 .. 5.0) before it may run F1
            assert comp[(1, "F", 1)] == pytest.approx((5.0, 6.0))


def _jittered(inp: SimInput, jitter: tuple[float, ...]) -> SimInput:
    """``inp`` with every boundary link's latency drawn from ``jitter`` (both directions)."""
    bounds = tuple(replace(b, link=replace(b.link, latency_jitter=jitter), bwd_link=None) for b in inp.boundaries)
    return replace(inp, boundaries=bounds)


def test_latency_distribution_samples_steps_closed_form() -> None:
    # GPipe p=2 m=1: F0 (1) -> 0.5·j1 -> F1 (1) B1 (2) -> 0.5·j2 -> B0 (2); every step is 6 + 0.5(j1 + j2)
    base = uniform(2, 1, "gpipe", t_fwd_s=1.0, t_bwd_s=2.0, t_comm_s=0.5)
    assert simulate(base).step_time_s == pytest.approx(7.0) and simulate(base).sampled_steps == 1
    res = simulate(_jittered(base, (0.0, 2.0)))
    # j1 + j2 in {0, 2, 4} with probabilities 1/4, 1/2, 1/4: steps 6, 7, 8; the median is 7, the quartiles
    # of 63 draws at 6 or 7 and 7 or 8
    assert res.sampled_steps == 63 and res.step_time_s == pytest.approx(7.0)
    lo, hi = res.step_time_quartiles_s
    assert 6.0 <= lo <= 7.0 <= hi <= 8.0 and lo < hi
    # the result is the median step's own timeline: its last optimizer event ends at the step time
    assert max(e.end_s for e in res.events) == pytest.approx(res.step_time_s)
    # rank 1 waited 1 + 0.5·j1 for F0's output (j1 = 0 or 2), rank 0 from F0's end to the gradient's arrival
    waits = {e.rank: e.end_s - e.start_s for e in res.events if e.kind == "RECV"}
    assert waits[1] in (pytest.approx(1.0), pytest.approx(2.0)) and waits[0] == pytest.approx(res.step_time_s - 3.0)
    # reproducible (seeded), and another seed draws other latencies
    assert simulate(_jittered(base, (0.0, 2.0))).to_dict() == res.to_dict()
    seeds = {simulate(_jittered(base, (0.0, 2.0)), steps=1, seed=s).step_time_s for s in range(12)}
    assert seeds == {6.0, 7.0, 8.0}
    # a distribution of one value is the fixed latency
    assert simulate(_jittered(base, (1.0,))).step_time_s == pytest.approx(7.0)


def test_latency_distribution_lengthens_the_median_1f1b_step() -> None:
    # 1F1B p=2 m=8: each steady-state micro-batch waits for the later of two messages (Jensen): a
    # latency of 0.5 now 0.1, now 0.9 makes the median step longer than one at a fixed 0.5
    base = uniform(2, 8, "1f1b", t_fwd_s=1.0, t_bwd_s=2.0, t_comm_s=0.5)
    fixed = simulate(base).step_time_s
    assert fixed == pytest.approx(31.0)
    sampled = simulate(_jittered(base, (0.2, 1.8)))
    assert sampled.step_time_s > fixed + 0.5
    assert fast_evaluate(_jittered(base, (0.2, 1.8))).step_time_s == pytest.approx(fixed)  # the fast evaluator: the mean latency


def test_latency_distribution_is_validated_and_sized() -> None:
    with pytest.raises(ConfigError, match="average 1"):
        Link(name="x", latency_s=1e-3, latency_jitter=(0.5, 0.6))
    with pytest.raises(ConfigError, match=">= 0"):
        Link(name="x", latency_s=1e-3, latency_jitter=(-1.0, 3.0))
    from pipetrain.simulator.engine import SAMPLED_ACTIONS, sampled_steps

    assert sampled_steps(uniform(2, 8, "1f1b", t_fwd_s=1.0, t_bwd_s=1.0)) == 63
    big = uniform(8, 512, "1f1b", t_fwd_s=1.0, t_bwd_s=1.0)  # 8192 compute actions a step
    assert sampled_steps(big) == 11 and 11 * big.schedule.num_compute_actions <= SAMPLED_ACTIONS + big.schedule.num_compute_actions
    assert sampled_steps(uniform(8, 4096, "1f1b", t_fwd_s=1.0, t_bwd_s=1.0)) == 9
