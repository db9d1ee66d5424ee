"""Our GPipe and 1F1B compute orders against torch.distributed.pipelining's ``pipeline_order``.

torch builds ``pipeline_order`` in the schedule's constructor from the stages' shape attributes alone,
so stand-in objects are enough (no process group, no model): :func:`pipetrain.torchsched.torch_stubs`,
which ``simulate --torch-schedule`` uses too. torch's lists carry
``None`` idle slots and a trailing REDUCE_GRAD action; both are bookkeeping, not compute, and are
dropped before comparing.

GPipe: equal on every rank. Interleaved 1F1B against ``ScheduleInterleaved1F1B``: equal on every
rank for m > p; for m == p ours follows Megatron-LM (every forward, then every backward) where
torch keeps its warm-up formula on the later ranks. Intended: the brief names Megatron's
schedule, and the step time is the same (the closed form holds for both).

1F1B: equal on every rank but the last. One documented difference, which is torch's, not ours:
``Schedule1F1B._get_pipeline_order`` (torch 2.13) starts the last rank's steady phase with
``forward_mb += 1`` from 0 when it had no warm-up forward, so that rank's IR reads
``F1 B0 F2 B1 ... Fm B(m-1)``: micro-batch 0's forward is missing and a non-existent ``Fm``
appears. torch's runtime (``Schedule1F1B._step_microbatches``) runs ``F0 B0 F1 B1 ...`` there,
which is our order. The test asserts exactly that shift, so any other difference fails.

ZB-V and DualPipeV against ``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV``: equal on every
rank (I, W and the OVERLAP_F_B pairs included) for p in {2, 4, 8}, m in {p, 2p} (and 3p for
DualPipeV); torch pads ZB-V's later ranks with ``None`` idle slots, which are dropped. Below
m = 2p both refuse DualPipeV.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipetrain.errors import ScheduleError
from pipetrain.schedules import dualpipev, gpipe, interleaved, one_f_one_b, validate, zbv
from pipetrain.torchsched import torch_stubs

pipelining = pytest.importorskip("torch.distributed.pipelining.schedules")

CASES = [(p, m) for p in (2, 4, 8) for m in (p, 2 * p, 3 * p)]


def _torch_order(cls: type, p: int, m: int) -> list[list[str]]:
    sched = cls(torch_stubs(p, p, (0,))[0], n_microbatches=m)
    out = []
    for rank in range(p):
        acts = [a for a in sched.pipeline_order[rank] if a is not None and a.is_compute_op]
        out.append([str(a) for a in acts])
    return out


@pytest.mark.parametrize("p,m", CASES)
def test_gpipe_matches_torch(p: int, m: int) -> None:
    ours = gpipe(p, m).to_strings(compute_only=True)
    assert ours == _torch_order(pipelining.ScheduleGPipe, p, m)


@pytest.mark.parametrize("p,m", CASES)
def test_1f1b_matches_torch(p: int, m: int) -> None:
    ours = one_f_one_b(p, m).to_strings(compute_only=True)
    theirs = _torch_order(pipelining.Schedule1F1B, p, m)
    assert ours[:-1] == theirs[:-1]
    # the last rank: torch's IR numbers forwards one too high (see module docstring)
    shifted = [f"{p - 1}F{int(a.split('F')[1]) + 1}" if "F" in a else a for a in ours[-1]]
    assert shifted == theirs[-1]
    assert ours[-1][:2] == [f"{p - 1}F0", f"{p - 1}B0"]


@pytest.mark.parametrize("p,m", CASES)
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_matches_torch(p: int, m: int, v: int) -> None:
    # ScheduleInterleaved1F1B computes every rank's order from its first stage's shape attributes
    sched = pipelining.ScheduleInterleaved1F1B(torch_stubs(p, p * v, tuple(c * p for c in range(v))), n_microbatches=m)
    theirs = [[str(a) for a in sched.pipeline_order[r] if a is not None and a.is_compute_op] for r in range(p)]
    ours = interleaved(p, m, v).to_strings(compute_only=True)
    if m > p:
        assert ours == theirs
    else:  # m == p: Megatron-LM (ours) runs every forward before any backward; torch keeps its warm-up formula
        assert ours[0] == theirs[0]  # rank 0's formula already covers all forwards
        for r in range(p):
            assert sorted(ours[r]) == sorted(theirs[r])
            assert ours[r] == [a for a in ours[r] if "F" in a] + [a for a in ours[r] if "B" in a]


def test_comparison_can_fail() -> None:
    # GPipe and 1F1B differ for p >= 2, so the helper really distinguishes orders.
    assert gpipe(4, 8).to_strings(compute_only=True) != _torch_order(pipelining.Schedule1F1B, 4, 8)


# ----- the V schedules: ZB-V and DualPipeV against torch's own pipeline_order ----------------------
V_CASES = [(p, m) for p in (2, 4, 8) for m in (p, 2 * p)]


def _v_stubs(p: int) -> list[SimpleNamespace]:
    # torch builds every rank's order from rank 0's two stages (the V: stages 0 and 2p-1)
    return torch_stubs(p, 2 * p, (0, 2 * p - 1))


def _v_torch_order(cls: type, p: int, m: int) -> list[list[str]]:
    sched = cls(_v_stubs(p), n_microbatches=m)
    return [[str(a) for a in sched.pipeline_order[r] if a is not None] for r in range(p)]


@pytest.mark.parametrize("p,m", V_CASES)
def test_zbv_matches_torch(p: int, m: int) -> None:
    # equal on every rank, I and W included; torch's leading None idle slots are dropped
    ours = zbv(p, m)
    assert validate(ours).to_strings(compute_only=True) == _v_torch_order(pipelining.ScheduleZBVZeroBubble, p, m)
    assert ours.stage_to_rank == tuple(pipelining.generate_stage_to_rank_mapping(p, 2 * p, style="v")[s] for s in range(2 * p))


@pytest.mark.parametrize("p,m", V_CASES)
def test_dualpipev_matches_torch(p: int, m: int) -> None:
    if m < 2 * p:  # torch refuses too, with the same condition
        with pytest.raises(ValueError):
            pipelining.ScheduleDualPipeV(_v_stubs(p), n_microbatches=m)
        with pytest.raises(ScheduleError, match="m >= "):
            dualpipev(p, m)
        return
    ours = validate(dualpipev(p, m))
    theirs = _v_torch_order(pipelining.ScheduleDualPipeV, p, m)
    assert ours.to_strings(compute_only=True) == theirs  # pairs print as torch prints them: (0F3;3B1)OVERLAP_F_B
    assert any("OVERLAP_F_B" in a for row in theirs for a in row)


@pytest.mark.parametrize("p", [2, 4])
def test_dualpipev_3p_matches_torch(p: int) -> None:
    m = 3 * p
    assert validate(dualpipev(p, m)).to_strings(compute_only=True) == _v_torch_order(pipelining.ScheduleDualPipeV, p, m)


def test_v_comparison_can_fail() -> None:
    assert zbv(4, 8).to_strings(compute_only=True) != _v_torch_order(pipelining.ScheduleDualPipeV, 4, 8)
