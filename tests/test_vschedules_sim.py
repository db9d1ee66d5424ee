"""ZB-V and DualPipeV in the simulator and the fast evaluator: closed forms with equal F = I = W,
a hand-computed timeline, and the in-flight counts the memory model uses.

Times are per chunk: ``uniform`` gives each of a rank's two stages half of the rank's ``t_fwd_s``,
``t_bwd_s`` (the input-gradient part) and ``t_wgrad_s``; with 2, 2, 2 every F, I and W of a chunk
takes 1 and a full B 2. The ideal step is a rank's work, ``2m (F + I + W) = 6m``.
"""

from __future__ import annotations

import pytest

from pipetrain.program.catalog import held_in_flight, rank_peak_in_flight
from pipetrain.program.spec import uniform
from pipetrain.schedules import dualpipev, one_f_one_b, peak_in_flight, zbv
from pipetrain.simulator import simulate
from pipetrain.simulator.fast import fast_evaluate

pytestmark = pytest.mark.timeout(60)


def _both(name: str, p: int, m: int) -> tuple[float, float]:
    inp = uniform(p, m, name, t_fwd_s=2.0, t_bwd_s=2.0, t_wgrad_s=2.0)
    return simulate(inp).pipeline_time_s, fast_evaluate(inp).pipeline_time_s


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_zbv_bubble_closed_form(p: int) -> None:
    # rank r waits r units for its first forward and is never idle again (W fills every gap):
    # the bubble is p - 1 units for m >= 2p; at m = p the warm-up is cut short and it doubles
    for m, bubble in ((2 * p, p - 1), (3 * p, p - 1), (4 * p, p - 1), (p, 2 * (p - 1))):
        assert _both("zbv", p, m) == (6 * m + bubble, 6 * m + bubble)


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_dualpipev_bubble_closed_form(p: int) -> None:
    # torch's DualPipeV order at m in {2p, 3p}: 2(p-1) units, ZB-H1's bubble on half-size stages
    # (the pairs run serially, so with free communication they buy nothing over ZB-V)
    for m in (2 * p, 3 * p, 4 * p):
        assert _both("dualpipev", p, m) == (6 * m + 2 * (p - 1),) * 2


def test_zbv_hand_timeline_p2_m4() -> None:
    # hand-computed (unit F, I, W): rank 0 runs 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 ... back
    # to back from 0 to 24; rank 1 waits for 0F0 (1 unit), then runs its 24 units without a gap
    inp = uniform(2, 4, "zbv", t_fwd_s=2.0, t_bwd_s=2.0, t_wgrad_s=2.0)
    r = fast_evaluate(inp, events=True)
    starts = {(e[1], e[0], e[2], e[3]): e[4] for e in r.raw_events if e[2] in ("F", "B", "W")}
    assert [starts[(1, 1, "F", 0)], starts[(1, 2, "F", 0)], starts[(1, 2, "B", 0)], starts[(1, 1, "B", 0)]] == [1, 2, 5, 8]
    assert starts[(0, 0, "W", 3)] == 23 and starts[(1, 1, "W", 3)] == 24
    assert r.pipeline_time_s == 25 == simulate(inp).pipeline_time_s


def test_dualpipev_pair_costs_f_plus_b() -> None:
    # (0F3;3B1) on rank 0 at p=2, m=4: F 1 then the full B 2 (I + W), one after the other
    r = fast_evaluate(uniform(2, 4, "dualpipev", t_fwd_s=2.0, t_bwd_s=2.0, t_wgrad_s=2.0), events=True)
    ev = {(e[0], e[2], e[3]): (e[4], e[5]) for e in r.raw_events if e[1] == 0}
    assert ev[(0, "F", 3)] == (7, 8) and ev[(3, "B", 1)] == (8, 10)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 12), (8, 16)])
def test_v_memory_in_flight_per_rank(p: int, m: int) -> None:
    # per rank, micro-batch-chunks whose F ran and whose backward has not, at the same instant:
    # ZB-V holds 2p half-size chunks at rank 0, 1F1B's p full micro-batches (the same bytes)
    z, d = zbv(p, m), dualpipev(p, m)
    assert rank_peak_in_flight(z)[0] == 2 * p == 2 * rank_peak_in_flight(one_f_one_b(p, m))[0]
    for s in (z, d):
        assert all(a <= b for a, b in zip(rank_peak_in_flight(s), [peak_in_flight(s)[r] + peak_in_flight(s)[2 * p - 1 - r]
                                                                    for r in range(p)]))
        assert held_in_flight(s) == tuple(a + b for a, b in zip(peak_in_flight(s), _pending(s)))
    # the simulator's peak per stage is the schedule's own count
    for name in ("zbv", "dualpipev"):
        inp = uniform(p, m, name, t_fwd_s=2.0, t_bwd_s=2.0, t_wgrad_s=2.0)
        assert simulate(inp).peak_in_flight_per_stage == peak_in_flight(inp.schedule)


def _pending(s: object) -> tuple[int, ...]:
    from pipetrain.schedules import peak_pending_wgrad

    return peak_pending_wgrad(s)  # type: ignore[arg-type]
