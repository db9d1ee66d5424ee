"""Pipeline schedules as torch-free data: pipeline rank -> ordered actions.

This module is the one definition of every schedule. The simulator and the executor both
consume a :class:`Schedule`, so what is simulated is exactly what is run.

An :class:`Action` prints and parses as ``"{stage}{kind}{microbatch}"``, e.g. ``"2F0"``
(stage 2, forward, micro-batch 0), ``"1B3"``, ``"1I3"``, ``"0W5"``, ``"1SEND_F3"``, ``"2RECV_B0"``.
``B`` is always the full backward. Zero-bubble schedules split it: ``I`` computes only the input
gradient (what the previous stage waits for) and ``W``, later, the weight gradient; a schedule may
mix both forms (DualPipeV runs some micro-batches' backward whole and splits others). A
micro-batch's backward on a stage is either one ``B`` or an ``I`` and its ``W``.

Paired actions: :attr:`Schedule.overlaps` names (F, B) pairs of different stages of one rank that
run as one ``OVERLAP_F_B`` action (DualPipeV), printed as torch prints it, ``(0F3;3B1)OVERLAP_F_B``
(:meth:`Schedule.to_strings`). In :attr:`Schedule.actions` a pair is its two actions, adjacent,
run one after the other as torch runs them; its SENDs come after both (as torch issues them).

Communication actions, named from the stage that owns them: ``sSEND_Fk`` sends stage ``s``'s
forward output of micro-batch ``k`` to stage ``s+1``, matched by ``(s+1)RECV_Fk`` there;
``sSEND_Bk`` sends stage ``s``'s input gradient to stage ``s-1``, matched by
``(s-1)RECV_Bk``. They appear only between stages on different ranks. Each rank's list is
meant to be executed literally: a SEND is non-blocking (post it and go on), a RECV waits until
its data is there, and it sits right before the compute that needs it; a SEND sits right
after the compute that produced it. :func:`validate` proves that this execution completes.

Generators: :func:`gpipe`, :func:`one_f_one_b`, :func:`interleaved`, :func:`zb_h1`, :func:`zbv`,
:func:`dualpipev`, and :func:`make_schedule` by name. Each schedule carries its stage -> rank map
(:attr:`Schedule.stage_to_rank`): ``s % p`` for the looped placements, the V placement
(:func:`v_stage_to_rank`: rank ``r`` holds stages ``r`` and ``2p-1-r``) for ZB-V and DualPipeV.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipetrain.errors import ScheduleError

__all__ = [
    "COMPUTE_KINDS", "COMM_KINDS", "ACTION_KINDS", "SCHEDULE_NAMES", "SPLIT_BACKWARD_SCHEDULES", "Action", "Schedule",
    "V_SCHEDULES", "gpipe", "one_f_one_b", "interleaved", "zb_h1", "zbv", "dualpipev", "v_stage_to_rank",
    "stage_ranks", "schedule_chunks", "make_schedule", "with_comms",
    "validate", "execution_order", "peak_in_flight", "peak_pending_wgrad", "format_grid",
]

COMPUTE_KINDS = ("F", "B", "I", "W")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
ACTION_KINDS = COMPUTE_KINDS + COMM_KINDS
#: Names accepted by :func:`make_schedule` (``pipetrain.plan.SCHEDULES`` is this tuple).
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv", "dualpipev")
#: Schedules in the V placement: two chunks per rank, rank r holds stages r and 2p-1-r.
V_SCHEDULES = ("zbv", "dualpipev")
#: Schedules whose backward is split into input- and weight-gradient passes (``split_backward``):
#: their executor defers the linear layers' weight gradients, which activation recomputation cannot
#: join, so the planner never gives them recompute (checked against :func:`make_schedule` in tests).
SPLIT_BACKWARD_SCHEDULES = ("zb-h1", "zbv", "dualpipev")

_ACTION_RE = re.compile(r"^\s*(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)\s*$")


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """One step of one rank: ``kind`` on (virtual) ``stage`` for ``microbatch``."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ScheduleError(f"action kind {self.kind!r} is unknown; one of {', '.join(ACTION_KINDS)}")
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(f"action {self.stage}{self.kind}{self.microbatch}: stage and micro-batch must be >= 0")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _ACTION_RE.match(text)
        if m is None:
            raise ScheduleError(f"cannot parse action {text!r}; expected e.g. '2F0', '1B3', '0SEND_F1'")
        return cls(stage=int(m.group(1)), kind=m.group(2), microbatch=int(m.group(3)))


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A complete schedule: for each pipeline rank, its ordered actions.

    ``stage_to_rank[s]`` is the pipeline rank that runs (virtual) stage ``s``. ``actions[r]``
    holds compute actions and, where the generator emits them, the SEND/RECV actions in the
    order rank ``r`` issues them.
    """

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    split_backward: bool = False
    chunks: int = field(default=1)
    #: (F, B) pairs run as one OVERLAP_F_B action (module docstring); :func:`validate` checks them
    overlaps: tuple[tuple[Action, Action], ...] = ()
    # derived counts, computed once per schedule: the planner asks for them many times, and a
    # schedule of 1024 micro-batches takes milliseconds to walk
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.num_ranks < 1 or self.num_stages < 1 or self.num_microbatches < 1:
            raise ScheduleError(f"schedule {self.name}: ranks, stages and micro-batches must be >= 1")
        if len(self.stage_to_rank) != self.num_stages or any(not 0 <= r < self.num_ranks for r in self.stage_to_rank):
            raise ScheduleError(f"schedule {self.name}: stage_to_rank must map {self.num_stages} stages to ranks 0..{self.num_ranks - 1}")
        if len(self.actions) != self.num_ranks:
            raise ScheduleError(f"schedule {self.name}: {len(self.actions)} action lists for {self.num_ranks} ranks")

    def rank_actions(self, rank: int) -> tuple[Action, ...]:
        return self.actions[rank]

    def compute_order(self, rank: int) -> tuple[Action, ...]:
        return tuple(a for a in self.actions[rank] if a.is_compute)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    @property
    def num_compute_actions(self) -> int:
        return sum(1 for acts in self.actions for a in acts if a.is_compute)

    def to_strings(self, *, compute_only: bool = False) -> list[list[str]]:
        """Per-rank action strings (what golden files store); with ``compute_only``, each pair of
        :attr:`overlaps` is one string as torch prints it, ``(0F3;3B1)OVERLAP_F_B``."""
        if not compute_only:
            return [[str(a) for a in acts] for acts in self.actions]
        second = {b: f for f, b in self.overlaps}
        first = {f for f, _ in self.overlaps}
        out = []
        for acts in self.actions:
            row: list[str] = []
            for a in acts:
                if a in second:
                    row[-1] = f"({second[a]};{a})OVERLAP_F_B"
                elif a.is_compute:
                    row.append(str(a))
            out.append(row)
        assert all(f in second.values() for f in first)
        return out


# ---------------------------------------------------------------------------------- generators

def _check_pm(p: int, m: int) -> None:
    if not isinstance(p, int) or p < 1:
        raise ScheduleError(f"number of pipeline stages must be an integer >= 1, got {p!r}")
    if not isinstance(m, int) or m < 1:
        raise ScheduleError(f"number of micro-batches must be an integer >= 1, got {m!r}")


_new_action = object.__new__
_set_field = object.__setattr__


def _act(stage: int, kind: str, microbatch: int) -> Action:
    """An :class:`Action` from this module's generators, right by construction, without
    ``__post_init__``'s checks: the planner builds schedules of half a million actions."""
    a = _new_action(Action)
    _set_field(a, "stage", stage)
    _set_field(a, "kind", kind)
    _set_field(a, "microbatch", microbatch)
    return a


def _buffer_caps(buffers: Sequence[int] | None, n: int) -> list[int]:
    if buffers is None:
        return [1 << 60] * n
    caps = list(buffers)
    if len(caps) != n or any((not isinstance(b, int)) or b < 1 for b in caps):
        raise ScheduleError(f"buffers must be {n} integers >= 1 (one per stage), got {list(buffers)}")
    return caps


def _build(name: str, p: int, m: int, v: int, orders: list[list[Action]], split: bool, *,
           stage_to_rank: tuple[int, ...] | None = None, overlaps: tuple[tuple[Action, Action], ...] = ()) -> Schedule:
    s2r = stage_to_rank if stage_to_rank is not None else tuple(s % p for s in range(p * v))
    compute = tuple(tuple(o) for o in orders)
    return Schedule(name=name, num_ranks=p, num_stages=p * v, num_microbatches=m, stage_to_rank=s2r,
                    actions=with_comms(compute, s2r, overlaps), split_backward=split, chunks=v, overlaps=overlaps)


def v_stage_to_rank(p: int) -> tuple[int, ...]:
    """The V placement of ``2p`` stages on ``p`` ranks: rank ``r`` holds stages ``r`` and ``2p-1-r``
    (stage 0 and the last stage both on rank 0; stages ``p-1`` and ``p`` meet on rank ``p-1``)."""
    return tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))


def gpipe(p: int, m: int, *, buffers: Sequence[int] | None = None) -> Schedule:
    """GPipe (Huang et al. 2019): all forwards, then all backwards in micro-batch order.

    Every stage keeps all ``m`` micro-batches in flight, so ``buffers`` below ``m`` is refused.
    """
    _check_pm(p, m)
    for s, b in enumerate(_buffer_caps(buffers, p)):
        if b < m:
            raise ScheduleError(f"gpipe keeps all {m} micro-batches in flight but stage {s} has {b} buffers: use 1f1b or raise buffers to {m}")
    return _build("gpipe", p, m, 1, [[_act(r, "F", k) for k in range(m)] + [_act(r, "B", k) for k in range(m)]
                                     for r in range(p)], False)


def one_f_one_b(p: int, m: int, *, buffers: Sequence[int] | None = None) -> Schedule:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021): ``min(p-1-s, m)`` warm-up forwards, then F,B pairs.

    ``buffers[s]`` caps the micro-batches stage ``s`` keeps in flight (its activation buffer pool).
    A stage with fewer than ``min(p-s, m)`` buffers gets a shorter warm-up; because a stage may
    not warm up deeper than its upstream neighbour (that would deadlock), the cap propagates
    downstream. Fewer buffers: less activation memory, bigger bubble.
    """
    _check_pm(p, m)
    caps = _buffer_caps(buffers, p)
    orders: list[list[Action]] = []
    prev_warmup = m
    for s in range(p):
        warmup = min(p - 1 - s, m, caps[s] - 1, prev_warmup)
        prev_warmup = warmup
        order = [_act(s, "F", k) for k in range(warmup)]
        for k in range(m - warmup):
            order += [_act(s, "F", warmup + k), _act(s, "B", k)]
        order += [_act(s, "B", k) for k in range(m - warmup, m)]
        orders.append(order)
    return _build("1f1b", p, m, 1, orders, False)


def interleaved(p: int, m: int, v: int, *, buffers: Sequence[int] | None = None) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): ``v`` chunks per rank, stage ``s`` on rank ``s % p``.

    Rank ``r``'s ``k``-th forward runs chunk ``(k mod pv) // p`` on micro-batch
    ``(k // pv)·p + k mod p``; backwards visit chunks in reverse. Warm-up is
    ``min(2(p-1-r) + (v-1)p, mv)`` forwards, then F/B pairs, and all ``mv`` when ``m == p``, as in
    Megatron-LM. (torch.distributed.pipelining's ``ScheduleInterleaved1F1B`` is the same order
    except at ``m == p``, where it keeps the formula; both give the same step time.)
    """
    _check_pm(p, m)
    if not isinstance(v, int) or v < 1:
        raise ScheduleError(f"interleaved needs chunks (virtual stages per rank) >= 1, got {v!r}")
    if m % p != 0:
        raise ScheduleError(f"interleaved needs the number of micro-batches ({m}) to be a multiple of the stages ({p}): use m={((m + p - 1) // p) * p}")
    total = m * v

    def unit(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k % (p * v)) // p
        if not forward:
            chunk = v - 1 - chunk
        return chunk, (k // (p * v)) * p + k % p

    orders = []
    for r in range(p):
        warmup = total if m == p else min(2 * (p - 1 - r) + (v - 1) * p, total)
        fwd = [_act(c * p + r, "F", mb) for c, mb in (unit(k, True) for k in range(total))]
        bwd = [_act(c * p + r, "B", mb) for c, mb in (unit(k, False) for k in range(total))]
        order = fwd[:warmup]
        for k in range(total - warmup):
            order += [fwd[warmup + k], bwd[k]]
        order += bwd[total - warmup:]
        orders.append(order)
    sched = _build("interleaved", p, m, v, orders, False)
    _check_caps(sched, buffers)
    return sched


def zb_h1(p: int, m: int, *, buffers: Sequence[int] | None = None) -> Schedule:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): I (input grad) and W (weight grad) split.

    Built by list scheduling with unit F, B, W times: whenever stage ``s`` is idle it runs, in
    priority, its next F if fewer than ``min(p-s, buffers[s])`` micro-batches hold activations
    (F done, I not: 1F1B's activation memory), else its next I, else its oldest pending W — and
    it must run that W first once more than ``s`` are pending. Deferring W on later stages fills
    the 1F1B cool-down bubbles: with unit times the step takes ``3m + p - 1``, the paper's
    ``(p-1)(tF+tB-tW)`` bubble, against 1F1B's ``3(m + p - 1)``. The order comes from an actual
    execution, so it is deadlock-free for any stage times.
    """
    _check_pm(p, m)
    caps = _buffer_caps(buffers, p)
    limit = [max(1, min(p - s, caps[s])) for s in range(p)]
    f_done = [[-1] * m for _ in range(p)]  # completion time of F(s,k), -1 = not yet
    b_done = [[-1] * m for _ in range(p)]
    nf, nb, nw = [0] * p, [0] * p, [0] * p
    orders: list[list[Action]] = [[] for _ in range(p)]
    t = 0
    while any(nw[s] < m for s in range(p)):
        if t > 4 * (m + p) * max(1, p):
            raise ScheduleError(f"zb-h1 list scheduling did not finish for p={p}, m={m}, buffers={list(caps)}")
        for s in range(p):
            can_w = nw[s] < nb[s] and b_done[s][nw[s]] <= t
            if can_w and nb[s] - nw[s] > s:
                orders[s].append(Action(s, "W", nw[s]))
                nw[s] += 1
            elif nf[s] < m and nf[s] - nb[s] < limit[s] and (s == 0 or 0 <= f_done[s - 1][nf[s]] <= t):
                f_done[s][nf[s]] = t + 1
                orders[s].append(Action(s, "F", nf[s]))
                nf[s] += 1
            elif nb[s] < m and 0 <= f_done[s][nb[s]] <= t and (s == p - 1 or 0 <= b_done[s + 1][nb[s]] <= t):
                b_done[s][nb[s]] = t + 1
                orders[s].append(Action(s, "I", nb[s]))
                nb[s] += 1
            elif can_w:
                orders[s].append(Action(s, "W", nw[s]))
                nw[s] += 1
        t += 1
    return _build("zb-h1", p, m, 1, orders, True)


def _zbv_rank(p: int, m: int, n: int, r: int) -> list[Action]:
    """Rank ``r``'s compute order of :func:`zbv`, laid out for ``n`` micro-batches, cut to ``m``."""
    c0, c1 = r, 2 * p - 1 - r
    cnt = {"f0": 0, "f1": 0, "b0": 0, "b1": 0}
    out: list[Action] = []

    def add(stage: int, kind: str, key: str, mb: int | None = None) -> None:
        k = cnt[key] if mb is None else mb
        out.append(Action(stage, kind, k))
        if mb is None:
            cnt[key] += 1

    for _ in range(2 * (p - r) - 1):
        add(c0, "F", "f0")
    for _ in range(r):
        add(c1, "F", "f1")
        add(c0, "F", "f0")
    for _ in range(p - r):
        add(c1, "F", "f1")
        add(c1, "I", "b1", cnt["b1"])
        add(c1, "W", "b1")
    while cnt["f1"] < cnt["f0"] or cnt["f0"] < n:
        if cnt["f0"] < n:
            add(c0, "F", "f0")
        add(c0, "I", "b0", cnt["b0"])
        add(c0, "W", "b0")
        add(c1, "F", "f1")
        add(c1, "I", "b1", cnt["b1"])
        add(c1, "W", "b1")
    w0, w1 = cnt["b0"], cnt["b1"]
    for _ in range(r):
        add(c0, "I", "b0")
        add(c1, "I", "b1")
    for _ in range(p - r):
        add(c0, "I", "b0")
        out.append(Action(c0, "W", w0))
        w0 += 1
    out += [Action(c1, "W", k) for k in range(w1, cnt["b1"])]
    out += [Action(c0, "W", k) for k in range(w0, cnt["b0"])]
    return [a for a in out if a.microbatch < m]


def zbv(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", section 6): two chunks per rank in
    the V placement, backward split into I and W, the W passes filling the bubbles.

    Rank ``r`` (chunk 0 = stage ``r``, chunk 1 = stage ``2p-1-r``) warms up with ``2(p-r)-1``
    chunk-0 forwards, then ``r`` pairs F1 F0, then ``p-r`` triples F1 I1 W1; the steady phase
    repeats F0 I0 W0 F1 I1 W1; the cool-down runs ``r`` pairs I0 I1, ``p-r`` pairs I0 W0, then the
    remaining Ws. At most ``2p`` micro-batches are in flight per rank (between chunk 0's F and
    its I), which is 1F1B's ``p`` per stage of half the size: the same activation memory. This is
    torch.distributed.pipelining's ``ScheduleZBVZeroBubble`` order (the golden test compares it
    with torch's for every rank); as there, it is laid out for ``max(m, 2p-1)`` micro-batches and
    the actions of the extra ones are dropped, so ``m < 2p-1`` keeps the warm-up shape.
    """
    _check_pm(p, m)
    n = max(2 * p - 1, m)
    orders = [_zbv_rank(p, m, n, r) for r in range(p)]
    return _build("zbv", p, m, 2, orders, True, stage_to_rank=v_stage_to_rank(p))


def _dualpipev_rank(p: int, m: int, r: int, overlaps: list[tuple[Action, Action]]) -> list[Action]:
    """Rank ``r``'s compute order of :func:`dualpipev`; its pairs are appended to ``overlaps``."""
    c0, c1 = r, 2 * p - 1 - r
    nf = {c0: 0, c1: 0}
    nb = {c0: 0, c1: 0}  # backward (B or I) micro-batches issued
    wq: list[Action] = []
    out: list[Action] = []

    def fwd(stage: int) -> Action:
        a = Action(stage, "F", nf[stage])
        nf[stage] += 1
        out.append(a)
        return a

    def bwd(stage: int, split: bool) -> Action:
        a = Action(stage, "I" if split else "B", nb[stage])
        nb[stage] += 1
        out.append(a)
        if split:
            wq.append(Action(stage, "W", a.microbatch))
        return a

    def pair(f_stage: int, b_stage: int) -> None:
        overlaps.append((fwd(f_stage), bwd(b_stage, False)))

    def weight() -> None:
        if wq:
            out.append(wq.pop(0))

    for _ in range(2 * (p - r - 1)):
        fwd(c0)
    for _ in range(r + 1):
        fwd(c0)
        fwd(c1)
    for _ in range(p - r - 1):
        bwd(c1, True)
        weight()
        fwd(c1)
    for i in range(m - 2 * p + r + 1):
        if i == 0 and r == p - 1:  # torch: not overlapped, to shrink the bubble
            fwd(c0)
            bwd(c1, False)
        else:
            pair(c0, c1)
        pair(c1, c0)
    for _ in range(p - r - 1):
        bwd(c1, False)
        pair(c1, c0)
    zb = False
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            zb = True
        bwd(c1, zb)
        if i == (r + 1) // 2 and r % 2 == 0:
            zb = True
        bwd(c0, zb)
    for _ in range(p - r - 1):
        weight()
        bwd(c0, zb)
    for _ in range(r + 1):
        weight()
    out += wq
    return out


def dualpipev(p: int, m: int) -> Schedule:
    """DualPipeV (DeepSeek-V3's DualPipe, "cut in half" into the V placement), as torch's
    ``ScheduleDualPipeV`` orders it: two chunks per rank, and in the steady phase the forward of
    one chunk paired with the full backward of the other (``OVERLAP_F_B``, :attr:`Schedule.overlaps`).

    Rank ``r`` (chunk 0 = stage ``r``, chunk 1 = stage ``2p-1-r``): ``2(p-r-1)`` chunk-0 forwards;
    ``r+1`` pairs F0 F1; ``p-r-1`` rounds I1, the oldest pending W, F1; ``m-2p+r+1`` rounds of
    (F0;B1) (F1;B0) pairs (the last rank runs its first F0 and B1 unpaired); ``p-r-1`` rounds B1
    (F1;B0); ``r+1`` rounds of a chunk-1 and a chunk-0 backward, full until the middle round and
    split into I (and a later W) from there (odd ranks switch one action earlier); ``p-r-1``
    rounds W, backward of chunk 0; then the remaining Ws. torch runs a pair's two actions one
    after the other: the pair costs F + B of compute, its messages overlapping the other half's
    compute. Needs ``m >= 2p`` (torch raises below that).
    """
    _check_pm(p, m)
    if m < 2 * p:
        raise ScheduleError(f"dualpipev needs at least as many micro-batches as stages (2p = {2 * p}), got {m}: use m >= {2 * p}")
    overlaps: list[tuple[Action, Action]] = []
    orders = [_dualpipev_rank(p, m, r, overlaps) for r in range(p)]
    return _build("dualpipev", p, m, 2, orders, True, stage_to_rank=v_stage_to_rank(p), overlaps=tuple(overlaps))


def stage_ranks(name: str, p: int, chunks: int = 1) -> tuple[int, ...]:
    """Schedule ``name``'s stage -> rank map without building it: the V for ZB-V and DualPipeV, else ``s % p``."""
    if name in V_SCHEDULES:
        return v_stage_to_rank(p)
    return tuple(s % p for s in range(p * chunks))


def schedule_chunks(name: str, chunks: int = 1) -> int:
    """Stages per rank of schedule ``name``: 2 for the V schedules, ``chunks`` for interleaved, else 1."""
    return 2 if name in V_SCHEDULES else chunks


def make_schedule(name: str, p: int, m: int, chunks: int = 1, *, buffers: Sequence[int] | None = None) -> Schedule:
    """Build a schedule by name: ``gpipe``, ``1f1b``, ``interleaved`` (``chunks`` = v), ``zb-h1``,
    ``zbv`` or ``dualpipev`` (two chunks per rank: ``chunks`` 1 or 2 both mean the V)."""
    if name not in SCHEDULE_NAMES:
        raise ScheduleError(f"schedule {name!r} is unknown; choose one of {', '.join(SCHEDULE_NAMES)}")
    if name in V_SCHEDULES:
        if chunks not in (1, 2):
            raise ScheduleError(f"schedule {name} runs two chunks per rank in a V; --chunks {chunks} needs the interleaved schedule")
        if buffers is not None and len(buffers) != 2 * p:
            raise ScheduleError(f"{name} has {2 * p} stages (two per rank); got {len(buffers)} buffer counts")
        sched = zbv(p, m) if name == "zbv" else dualpipev(p, m)
        _check_caps(sched, buffers)
        return sched
    if name != "interleaved" and chunks != 1:
        raise ScheduleError(f"schedule {name} runs one chunk per rank; --chunks {chunks} needs the interleaved schedule")
    if name == "gpipe":
        return gpipe(p, m, buffers=buffers)
    if name == "1f1b":
        return one_f_one_b(p, m, buffers=buffers)
    if name == "interleaved":
        return interleaved(p, m, chunks, buffers=buffers)
    return zb_h1(p, m, buffers=buffers)


def _check_caps(sched: Schedule, buffers: Sequence[int] | None) -> None:
    caps = _buffer_caps(buffers, sched.num_stages)
    for s, (need, cap) in enumerate(zip(peak_in_flight(sched), caps)):
        if need > cap:
            raise ScheduleError(f"{sched.name} keeps {need} micro-batches in flight at stage {s} but it has {cap} buffers: raise buffers to {need} or use 1f1b")


def with_comms(compute: Sequence[Sequence[Action]], stage_to_rank: Sequence[int],
               overlaps: Sequence[tuple[Action, Action]] = ()) -> tuple[tuple[Action, ...], ...]:
    """Insert SEND/RECV actions: each RECV right before its compute, each SEND right after (after
    both halves of an overlapped pair, as torch issues them)."""
    n = len(stage_to_rank)
    # does stage s talk to another rank on its input side / its output side
    cross_in = [s > 0 and stage_to_rank[s - 1] != stage_to_rank[s] for s in range(n)]
    cross_out = [s < n - 1 and stage_to_rank[s + 1] != stage_to_rank[s] for s in range(n)]
    firsts = {f for f, _ in overlaps}
    out = []
    for order in compute:
        acts: list[Action] = []
        held: list[Action] = []  # the sends of a pair's first half, issued after its second
        for a in order:
            s, k, kind = a.stage, a.microbatch, a.kind
            sends: list[Action] = []
            if kind == "F":
                if cross_in[s]:
                    acts.append(_act(s, "RECV_F", k))
                acts.append(a)
                if cross_out[s]:
                    sends.append(_act(s, "SEND_F", k))
            elif kind == "B" or kind == "I":
                if cross_out[s]:
                    acts.append(_act(s, "RECV_B", k))
                acts.append(a)
                if cross_in[s]:
                    sends.append(_act(s, "SEND_B", k))
            else:
                acts.append(a)
            if firsts and a in firsts:  # hashing every action of a long schedule costs more than the rest
                held = sends
            else:
                acts += held + sends
                held = []
        out.append(tuple(acts))
    return tuple(out)


# ---------------------------------------------------------------------------------- checking

_NEEDS_BEFORE = {"F": "RECV_F", "B": "RECV_B", "I": "RECV_B"}


def _static_check(sched: Schedule) -> None:
    """Placement, completeness and SEND/RECV pairing (no timing)."""
    m, last, s2r = sched.num_microbatches, sched.num_stages - 1, sched.stage_to_rank
    seen: dict[tuple[int, str, int], int] = {}
    for r, acts in enumerate(sched.actions):
        for i, a in enumerate(acts):
            where = f"rank {r} step {i} ({a})"
            if a.stage > last or s2r[a.stage] != r:
                raise ScheduleError(f"{where}: stage {a.stage} does not run on rank {r}")
            if a.microbatch >= m:
                raise ScheduleError(f"{where}: micro-batch {a.microbatch} >= {m}")
            if a.kind in ("I", "W") and not sched.split_backward:
                raise ScheduleError(f"{where}: I and W actions need split_backward=True")
            key = (a.stage, a.kind, a.microbatch)
            if key in seen:
                raise ScheduleError(f"{where}: appears twice")
            seen[key] = i
            cross_f = a.stage > 0 and s2r[a.stage - 1] != r
            cross_b = a.stage < last and s2r[a.stage + 1] != r
            if a.kind in ("SEND_F", "RECV_B") and not cross_b or a.kind in ("SEND_B", "RECV_F") and not cross_f:
                raise ScheduleError(f"{where}: no other rank to talk to for this action")
            if a.kind == "SEND_F" and seen.get((a.stage, "F", a.microbatch), i + 1) > i or a.kind == "SEND_B" and min(
                    seen.get((a.stage, "B", a.microbatch), i + 1), seen.get((a.stage, "I", a.microbatch), i + 1)) > i:
                raise ScheduleError(f"{where}: sends before its {a.stage}{a.kind[-1]}{a.microbatch} is computed")
            if a.kind in _NEEDS_BEFORE and (cross_f if a.kind == "F" else cross_b):
                if seen.get((a.stage, _NEEDS_BEFORE[a.kind], a.microbatch), i) >= i:
                    raise ScheduleError(f"{where}: no {a.stage}{_NEEDS_BEFORE[a.kind]}{a.microbatch} before it")
    for s in range(sched.num_stages):
        for k in range(m):
            full, split = (s, "B", k) in seen, (s, "I", k) in seen
            kinds = ("F", "B") if full or not split else ("F", "I", "W")
            if full and split:
                raise ScheduleError(f"schedule {sched.name}: {s}B{k} and {s}I{k} both run; a backward is either B or I and W")
            for kind in kinds:
                if (s, kind, k) not in seen:
                    raise ScheduleError(f"schedule {sched.name} is incomplete: {s}{kind}{k} never runs (rank {s2r[s]})")
            if (s, "W", k) in seen and not split:
                raise ScheduleError(f"schedule {sched.name}: {s}W{k} runs but {s}I{k} does not (a full {s}B{k} includes the weight gradient)")
    _check_overlaps(sched, seen)
    for s in range(sched.num_stages):
        for k in range(m):
            if s < last and s2r[s + 1] != s2r[s]:
                for snd, rcv, rs in (("SEND_F", "RECV_F", s + 1), ("SEND_B", "RECV_B", s)):
                    a_s, a_r = (s, snd, k) if snd == "SEND_F" else (s + 1, snd, k), (rs, rcv, k)
                    if (a_s in seen) != (a_r in seen) or a_s not in seen:
                        raise ScheduleError(f"schedule {sched.name}: {a_s[0]}{snd}{k} and {rs}{rcv}{k} must both appear")


def _check_overlaps(sched: Schedule, seen: dict[tuple[int, str, int], int]) -> None:
    """Each OVERLAP_F_B pair: an F and a full B of two different stages of one rank, adjacent in its compute order."""
    for f, b in sched.overlaps:
        what = f"overlapped pair ({f};{b})"
        if f.kind != "F" or b.kind != "B" or f.stage == b.stage:
            raise ScheduleError(f"{what}: must pair an F with a full B of another stage")
        r = sched.stage_to_rank[f.stage]
        if sched.stage_to_rank[b.stage] != r or (f.stage, "F", f.microbatch) not in seen or (b.stage, "B", b.microbatch) not in seen:
            raise ScheduleError(f"{what}: both halves must run on one rank")
        order = sched.compute_order(r)
        i = order.index(f)
        if i + 1 >= len(order) or order[i + 1] != b:
            raise ScheduleError(f"{what}: its halves must be adjacent in rank {r}'s compute order")


def execution_order(sched: Schedule) -> list[tuple[int, int]]:
    """A global order ``[(rank, index), ...]`` in which literal execution runs every action.

    Each rank runs its list in order; SENDs never block; a RECV waits for its SEND; a compute
    waits for its data (the previous stage's F, the next stage's B, its own F/B). Raises
    :class:`ScheduleError` with the stuck ranks and the grid if execution cannot finish.
    """
    _static_check(sched)
    last, m = sched.num_stages - 1, sched.num_microbatches
    kind_ix = {k: i for i, k in enumerate(ACTION_KINDS)}
    nk = len(ACTION_KINDS)
    split = {(a.stage, a.microbatch) for acts in sched.actions for a in acts if a.kind == "I"}

    def bwd_kind(s: int, k: int) -> str:
        return "I" if (s, k) in split else "B"

    def key(s: int, kind: str, k: int) -> int:
        return (s * nk + kind_ix[kind]) * m + k

    def needs(a: Action) -> tuple[tuple[int, str, int], ...]:
        s, kind, k = a.stage, a.kind, a.microbatch
        if kind == "F":
            return ((s - 1, "F", k),) if s > 0 else ()
        if kind in ("B", "I"):
            return ((s, "F", k), (s + 1, bwd_kind(s + 1, k), k)) if s < last else ((s, "F", k),)
        if kind == "W":
            return ((s, "I", k),)
        if kind == "RECV_F":
            return ((s - 1, "SEND_F", k),)
        if kind == "RECV_B":
            return ((s + 1, "SEND_B", k),)
        return ((s, "F", k),) if kind == "SEND_F" else ((s, bwd_kind(s, k), k),)

    done = bytearray(sched.num_stages * nk * m)
    waiting: dict[int, list[int]] = {}
    pos = [0] * sched.num_ranks
    order: list[tuple[int, int]] = []
    ready = list(range(sched.num_ranks - 1, -1, -1))
    while ready:
        r = ready.pop()
        acts = sched.actions[r]
        i = pos[r]
        while i < len(acts):
            a = acts[i]
            blocked = next((kk for kk in (key(*n) for n in needs(a)) if not done[kk]), None)
            if blocked is not None:
                waiting.setdefault(blocked, []).append(r)
                break
            kk = key(a.stage, a.kind, a.microbatch)
            done[kk] = 1
            order.append((r, i))
            i += 1
            if kk in waiting:
                ready.extend(waiting.pop(kk))
        pos[r] = i
    stuck = [r for r in range(sched.num_ranks) if pos[r] < len(sched.actions[r])]
    if stuck:
        lines = []
        for r in stuck:
            a = sched.actions[r][pos[r]]
            missing = ", ".join(f"{s}{k}{mb}" for s, k, mb in needs(a) if not done[key(s, k, mb)])
            lines.append(f"rank {r} at step {pos[r]} ({a}) waits for {missing}")
        first = min(pos[r] for r in stuck)
        grid = format_grid(sched, compute_only=False, start=max(0, first - 4), max_steps=12)
        raise ScheduleError(f"schedule {sched.name} deadlocks: " + "; ".join(lines) + "\n" + grid)
    return order


def validate(sched: Schedule) -> Schedule:
    """Prove ``sched`` complete, its SENDs matched, and deadlock-free; return it unchanged."""
    execution_order(sched)
    return sched


def peak_in_flight(sched: Schedule) -> tuple[int, ...]:
    """Per stage, the most micro-batches whose F ran and whose backward (B or I) has not (activations held).

    With a split backward, what a micro-batch keeps between its I and W is accounted apart
    (``StageSpec.wgrad_stash_bytes`` in the simulator).
    """
    if "peak_in_flight" in sched._memo:
        return sched._memo["peak_in_flight"]  # type: ignore[no-any-return]
    cur = [0] * sched.num_stages
    peak = [0] * sched.num_stages
    for acts in sched.actions:
        for a in acts:
            if a.kind == "F":
                cur[a.stage] += 1
                peak[a.stage] = max(peak[a.stage], cur[a.stage])
            elif a.kind in ("B", "I"):
                cur[a.stage] -= 1
    sched._memo["peak_in_flight"] = out = tuple(peak)
    return out


def peak_pending_wgrad(sched: Schedule) -> tuple[int, ...]:
    """Per stage, the most micro-batches whose I ran and whose W has not (0 without a split backward)."""
    if "peak_pending_wgrad" in sched._memo:
        return sched._memo["peak_pending_wgrad"]  # type: ignore[no-any-return]
    cur = [0] * sched.num_stages
    peak = [0] * sched.num_stages
    if sched.split_backward:
        for acts in sched.actions:
            for a in acts:
                if a.kind == "I":
                    cur[a.stage] += 1
                    peak[a.stage] = max(peak[a.stage], cur[a.stage])
                elif a.kind == "W":
                    cur[a.stage] -= 1
    sched._memo["peak_pending_wgrad"] = out = tuple(peak)
    return out


def format_grid(sched: Schedule, *, compute_only: bool = True, start: int = 0, max_steps: int | None = 40) -> str:
    """The schedule as a step x rank table (rows are steps of each rank's own list)."""
    cols = [[str(a) for a in acts if compute_only is False or a.is_compute] for acts in sched.actions]
    n = max((len(c) for c in cols), default=0)
    stop = n if max_steps is None else min(n, start + max_steps)
    width = max([len(x) for c in cols for x in c[start:stop]] + [len(f"rank {sched.num_ranks - 1}")])
    step_w = max(4, len(str(stop)))
    head = "step".rjust(step_w) + " | " + " | ".join(f"rank {r}".ljust(width) for r in range(sched.num_ranks))
    lines = [head, "-" * len(head)]
    for i in range(start, stop):
        lines.append(str(i).rjust(step_w) + " | " + " | ".join((c[i] if i < len(c) else "").ljust(width) for c in cols))
    if stop < n:
        lines.append(f"... {n - stop} more steps")
    return "\n".join(line.rstrip() for line in lines)
