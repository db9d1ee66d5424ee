"""Schedules: generators, golden orders, validator, grid, buffers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipetrain.errors import ScheduleError
from pipetrain.schedules import (
    SCHEDULE_NAMES,
    V_SCHEDULES,
    Action,
    Schedule,
    execution_order,
    format_grid,
    gpipe,
    interleaved,
    make_schedule,
    one_f_one_b,
    peak_in_flight,
    v_stage_to_rank,
    validate,
    zb_h1,
)

GOLDEN = Path(__file__).parent / "golden" / "schedules.json"
GOLDEN_CASES = {
    "zbv-p2-m4-comms": ("zbv", 2, 4, 2, False),
    "dualpipev-p2-m4": ("dualpipev", 2, 4, 2, True),
    "dualpipev-p2-m4-comms": ("dualpipev", 2, 4, 2, False),
    "gpipe-p4-m4": ("gpipe", 4, 4, 1, True),
    "1f1b-p4-m8": ("1f1b", 4, 8, 1, True),
    "1f1b-p2-m3-comms": ("1f1b", 2, 3, 1, False),
    "interleaved-p4-m8-v2": ("interleaved", 4, 8, 2, True),
    "interleaved-p2-m4-v2-comms": ("interleaved", 2, 4, 2, False),
    "zb-h1-p4-m8": ("zb-h1", 4, 8, 1, True),
}


def _golden_now() -> dict[str, list[str]]:
    return {k: [" ".join(r) for r in make_schedule(n, p, m, v).to_strings(compute_only=c)]
            for k, (n, p, m, v, c) in GOLDEN_CASES.items()}


def test_golden_orders() -> None:
    if os.environ.get("PIPETRAIN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(_golden_now(), indent=1) + "\n")
    assert _golden_now() == json.loads(GOLDEN.read_text())


def test_1f1b_p4_m8_by_hand() -> None:
    # typed from Narayanan et al. 2021, fig. 4: warm-up p-1-s forwards, then F/B pairs, then cool-down
    want = [
        "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7",
        "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 1B6 1B7",
        "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7",
        "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7",
    ]
    assert [" ".join(r) for r in one_f_one_b(4, 8).to_strings(compute_only=True)] == want


def test_comms_layout_p2() -> None:
    s = one_f_one_b(2, 2)
    assert [str(a) for a in s.actions[0]] == ["0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0", "0RECV_B1", "0B1"]
    assert [str(a) for a in s.actions[1]] == ["1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1", "1B1", "1SEND_B1"]


def test_action_roundtrip_and_errors() -> None:
    for text in ("2F0", "1B13", "0W5", "1SEND_F3", "2RECV_B0"):
        assert str(Action.parse(text)) == text
    with pytest.raises(ScheduleError, match="cannot parse"):
        Action.parse("F0")
    with pytest.raises(ScheduleError, match="unknown"):
        Action(0, "X", 0)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_validates(name: str) -> None:
    for p in (1, 2, 3, 4, 5, 8):
        for m in (1, 2, 3, 4, 7, 8, 16):
            v_list = (1, 2, 3) if name == "interleaved" else (1,)
            for v in v_list:
                if name == "interleaved" and m % p or name == "dualpipev" and m < 2 * p:
                    continue
                s = validate(make_schedule(name, p, m, v))
                if name in V_SCHEDULES:
                    v = 2
                    assert s.stage_to_rank == v_stage_to_rank(p)
                    assert all(s.stages_of(r) == (r, 2 * p - 1 - r) for r in range(p))
                else:
                    assert s.stage_to_rank == tuple(i % p for i in range(p * v))
                assert s.num_stages == p * v
                # every (stage, micro-batch) runs F and either one full B or an I and a W
                full = sum(1 for acts in s.actions for a in acts if a.kind == "B")
                assert s.num_compute_actions == 2 * p * v * m + 2 * (p * v * m - full) - (p * v * m - full)
                assert len(execution_order(s)) == sum(len(a) for a in s.actions)


def test_bad_arguments() -> None:
    with pytest.raises(ScheduleError, match="gpipe, 1f1b, interleaved, zb-h1, zbv, dualpipev"):
        make_schedule("pipedream", 4, 8)
    with pytest.raises(ScheduleError, match="micro-batches"):
        make_schedule("1f1b", 4, 0)
    with pytest.raises(ScheduleError, match="stages"):
        make_schedule("gpipe", 0, 4)
    with pytest.raises(ScheduleError, match="multiple of the stages.*m=8"):
        interleaved(4, 6, 2)
    with pytest.raises(ScheduleError, match="interleaved"):
        make_schedule("1f1b", 4, 8, 2)


def test_peak_in_flight_closed_forms() -> None:
    for p in range(1, 7):
        for m in range(1, 11):
            assert peak_in_flight(one_f_one_b(p, m)) == tuple(min(p - s, m) for s in range(p))
            assert peak_in_flight(gpipe(p, m)) == (m,) * p
            assert peak_in_flight(zb_h1(p, m)) == tuple(min(p - s, m) for s in range(p))


def test_buffers_shape_1f1b() -> None:
    s = one_f_one_b(4, 8, buffers=[2, 4, 4, 4])
    # stage 0 keeps at most 2; downstream stages cannot warm up deeper than upstream
    assert peak_in_flight(validate(s)) == (2, 2, 2, 1)
    assert one_f_one_b(4, 8, buffers=[9, 9, 9, 9]).actions == one_f_one_b(4, 8).actions
    caps = (2, 1, 2, 1)
    assert all(a <= b for a, b in zip(peak_in_flight(validate(zb_h1(4, 8, buffers=caps))), caps))
    with pytest.raises(ScheduleError, match="stage 1 has 3 buffers"):
        gpipe(4, 4, buffers=[4, 3, 4, 4])
    with pytest.raises(ScheduleError, match="buffers"):
        interleaved(2, 4, 2, buffers=[1, 1, 1, 1])


def _sched(actions: list[list[str]], p: int = 2, m: int = 1) -> Schedule:
    return Schedule(name="hand", num_ranks=p, num_stages=p, num_microbatches=m, stage_to_rank=tuple(range(p)),
                    actions=tuple(tuple(Action.parse(x) for x in r) for r in actions))


def test_validator_finds_deadlock() -> None:
    bad = _sched([["0F0", "0RECV_B0", "0B0", "0SEND_F0"], ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]])
    with pytest.raises(ScheduleError,
                       match=r"deadlocks: rank 0 at step 1 \(0RECV_B0\) waits for 1SEND_B0; rank 1 at step 0 \(1RECV_F0\) waits for 0SEND_F0") as e:
        validate(bad)
    assert "rank 0" in str(e.value).splitlines()[1]  # the grid follows


def test_validator_finds_incomplete_and_unmatched() -> None:
    good = [["0F0", "0SEND_F0", "0RECV_B0", "0B0"], ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]]
    validate(_sched(good))
    with pytest.raises(ScheduleError, match="1B0 never runs"):
        validate(_sched([good[0], ["1RECV_F0", "1F0"]]))
    with pytest.raises(ScheduleError, match="no 1RECV_F0 before it"):
        validate(_sched([good[0], ["1F0", "1B0", "1SEND_B0"]]))
    with pytest.raises(ScheduleError, match="sends before"):
        validate(_sched([["0SEND_F0", "0F0", "0RECV_B0", "0B0"], good[1]]))
    with pytest.raises(ScheduleError, match="does not run on rank 0"):
        validate(_sched([good[0] + ["1F0"], good[1]]))


def test_format_grid() -> None:
    g = format_grid(one_f_one_b(2, 2))
    assert g.splitlines() == [
        "step | rank 0 | rank 1", "-" * 22,
        "   0 | 0F0    | 1F0", "   1 | 0F1    | 1B0", "   2 | 0B0    | 1F1", "   3 | 0B1    | 1B1"]
    assert format_grid(one_f_one_b(2, 8), max_steps=3).splitlines()[-1] == "... 13 more steps"


def test_schedule_shape_is_checked() -> None:
    with pytest.raises(ScheduleError, match="stage_to_rank must map 2 stages"):
        Schedule(name="x", num_ranks=2, num_stages=2, num_microbatches=1, stage_to_rank=(0, 2), actions=((), ()))
    with pytest.raises(ScheduleError, match="1 action lists for 2 ranks"):
        Schedule(name="x", num_ranks=2, num_stages=2, num_microbatches=1, stage_to_rank=(0, 1), actions=((),))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(["1f1b", "zb-h1"]), p=st.integers(1, 8), m=st.integers(1, 16), data=st.data())
def test_buffer_shaped_schedules_are_valid_and_fit(name: str, p: int, m: int, data: st.DataObject) -> None:
    caps = data.draw(st.lists(st.integers(1, 9), min_size=p, max_size=p))
    s = validate(make_schedule(name, p, m, buffers=caps))
    peaks = peak_in_flight(s)
    assert all(n <= min(c, m) for n, c in zip(peaks, caps))
    assert peaks[0] == min(caps[0], p, m)  # the first stage uses what it is given, up to what 1F1B would
