"""The per-stage breakdown separates waiting for a peer (bubble) from the wire and collectives."""

from __future__ import annotations

import pytest

from pipetrain.events import Event
from pipetrain.simulator import simulate, uniform
from pipetrain.timeline import match_transfers, stage_breakdown

MS = 1e-3


def _e(stage: int, kind: str, mb: int, a: float, b: float) -> Event:
    return Event(stage=stage, rank=stage, kind=kind, microbatch=mb, start_s=a * MS, end_s=b * MS,
                 bytes=1 << 20 if kind in ("SEND", "RECV") else 0)


def _two_stage_step() -> list[Event]:
    """Stage 1 posts its receive at 0 and waits 10 ms for stage 0's forward, then 1 ms on the wire;
    the gradient comes back the same way (stage 0 waits for stage 1's F and B, then 1 ms of wire);
    then both ranks all-reduce for 3 ms."""
    return [
        _e(0, "F", 0, 0, 10), _e(0, "SEND", 0, 10, 11), _e(0, "RECV", 0, 10, 42), _e(0, "B", 0, 42, 62),
        _e(1, "RECV", 0, 0, 11), _e(1, "F", 0, 11, 21), _e(1, "B", 0, 21, 41), _e(1, "SEND", 0, 41, 42),
        _e(1, "ALLREDUCE", -1, 50, 53),
    ]


def test_waiting_for_the_sender_is_not_communication() -> None:
    br = stage_breakdown(_two_stage_step(), 2, [0, 1])
    # span 0..62 ms. Stage 1: compute 30, idle 0..11 and 41..62 (32 ms): 1 ms wire (10..11), 3 ms all-reduce,
    # 28 ms waiting (10 for stage 0's forward, the rest for stage 0's backward at the end)
    s1 = br[1]
    assert s1.span_s == pytest.approx(62 * MS)
    assert s1.compute_s == pytest.approx(30 * MS)
    assert s1.transfer_s == pytest.approx(1 * MS)
    assert s1.collective_s == pytest.approx(3 * MS)
    assert s1.bubble_s == pytest.approx(28 * MS)
    assert s1.comm_s == pytest.approx(4 * MS)
    # stage 0: compute 30, idle 10..42: its receive was posted at 10 but the gradient was on the wire 41..42 only
    s0 = br[0]
    assert s0.transfer_s == pytest.approx(1 * MS) and s0.collective_s == 0.0 and s0.bubble_s == pytest.approx(31 * MS)
    for b in br:
        assert b.compute_s + b.transfer_s + b.collective_s + b.bubble_s == pytest.approx(b.span_s)


def test_a_send_done_before_the_receiver_posted_has_no_wire_time() -> None:
    # stage 0 sends 10..11, but stage 1 posts its receive at 30 (its buffer was busy): the bytes waited, stage 1 did not
    evs = [_e(0, "F", 0, 0, 10), _e(0, "SEND", 0, 10, 11), _e(1, "F", 9, 0, 30), _e(1, "RECV", 0, 30, 30),
           _e(1, "F", 0, 30, 40)]
    (t,) = match_transfers(evs, 2)
    assert t.latency_s == pytest.approx(20 * MS) and t.wire_s == 0.0
    assert stage_breakdown(evs, 2, [0, 1])[1].transfer_s == 0.0


def test_simulated_wire_time_is_the_link_time() -> None:
    # 4 stages, 8 micro-batches, 0.5 ms per transfer: each middle stage receives 16 transfers; in 1F1B it waits on
    # every one of them except those that arrive while it computes, so its wire time is at most 16 x 0.5 ms
    r = simulate(uniform(4, 8, "1f1b", t_fwd_s=10 * MS, t_bwd_s=20 * MS, t_comm_s=0.5 * MS))
    br = stage_breakdown(list(r.events), 4, [0, 1, 2, 3])
    for b in br:
        assert b.transfer_s <= 16 * 0.5 * MS + 1e-12
    # the first stage's first gradient arrives after waiting for the whole pipeline's forward: bubble, not wire
    assert br[0].bubble_s > 10 * br[0].transfer_s
