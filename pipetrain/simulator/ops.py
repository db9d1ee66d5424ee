"""A schedule lowered to per-rank operation tuples, shared by the simpy engine and the fast evaluator.

The *skeleton* depends only on the schedule (cached per :class:`Schedule` object): each action
becomes a plain tuple naming a duration slot or a boundary slot. The *tables* depend on the
SimInput: durations per (stage, kind), and per boundary direction the link, wire time, latency
and bytes. Both evaluators finish the step with the same :func:`end_of_step` (data-parallel
all-reduce and optimizer step), so they agree exactly wherever nothing contends.

Skeleton op tuples:

* ``(COMPUTE, stage, kind, microbatch, dur_slot, acquires, kind_slot, grad_final)``:
  ``dur_slot = 4·stage + kind_slot`` with ``kind_slot`` F 0, B 1, I 2, W 3; ``acquires`` for F (takes
  an activation buffer; B or I gives it back); ``grad_final`` for the stage's last
  gradient-producing action (its last B or W). ``kind`` is the event kind: an ``I`` is recorded
  as ``B`` (the input-gradient part of the backward; events know F, B and W).
* ``(SEND, stage, microbatch, message, link_slot)`` and ``(RECV, stage, microbatch, message, link_slot)``,
  ``link_slot = 2·boundary + (0 forward, 1 backward)``; ``message`` pairs a SEND with its RECV.
* ``(POST, stage, microbatch, message, link_slot)``: the receive of ``message`` is posted (a buffer
  of the stage's pool taken), where the lowered program (:func:`pipetrain.program.lower_ops`)
  posts it; a transfer starts only once its receive is posted. :func:`posted_skeleton` adds them;
  :func:`explicit_skeleton` takes them from an imported program (``SimInput.ops``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipetrain.errors import ScheduleError
from pipetrain.program import POST as _POST_VERB
from pipetrain.program import lower_ops
from pipetrain.program.spec import Op, SimInput, ring_allreduce_time_s
from pipetrain.schedules import Schedule
from pipetrain.simulator.sharing import shared_finish_times

__all__ = ["COMPUTE", "SEND", "RECV", "POST", "EVENT_KIND", "EventTuple", "Tables", "check_comms", "check_comm_counts",
           "skeleton", "posted_skeleton", "explicit_skeleton",
           "sim_skeleton", "tables",
           "end_of_step", "drop_when_collected"]

COMPUTE, SEND, RECV, POST = 0, 1, 2, 3
#: (stage, rank, kind, microbatch, start_s, end_s, bytes)
EventTuple = tuple[int, int, str, int, float, float, int]
_KIND_SLOT = {"F": 0, "B": 1, "I": 2, "W": 3}
#: the event kind of each compute kind (an I is the backward's input-gradient part)
EVENT_KIND = {"F": "F", "B": "B", "I": "B", "W": "W"}

_CACHE: dict[int, tuple[weakref.ref, tuple[tuple[tuple, ...], ...]]] = {}


def drop_when_collected(cache: dict[Any, Any], key: Any) -> Callable[[weakref.ref], None]:
    """A weakref callback removing ``cache[key]`` once its schedule is garbage-collected (caches keyed by ``id``)."""
    def drop(_ref: weakref.ref) -> None:
        cache.pop(key, None)

    return drop


def check_comms(sched: Schedule) -> None:
    """Cheap guard: a schedule without its SEND/RECV actions would simulate with no data flow.

    (Full proof of completeness and deadlock-freedom: :func:`pipetrain.schedules.validate`.)
    """
    sends = sum(1 for acts in sched.actions for a in acts if a.kind in ("SEND_F", "SEND_B"))
    recvs = sum(1 for acts in sched.actions for a in acts if a.kind in ("RECV_F", "RECV_B"))
    check_comm_counts(sched, sends, recvs)


def check_comm_counts(sched: Schedule, sends: int, recvs: int) -> None:
    """:func:`check_comms` given the counts (a caller that walks the actions anyway counts them)."""
    s2r = sched.stage_to_rank
    cuts = sum(1 for s in range(sched.num_stages - 1) if s2r[s] != s2r[s + 1])
    want = 2 * sched.num_microbatches * cuts
    if sends != want or recvs != want:
        raise ScheduleError(f"schedule {sched.name} has {sends} sends and {recvs} receives where its {cuts} cross-rank cuts need "
                            f"{want} of each: add them with pipetrain.schedules.with_comms and check with validate()")


def skeleton(sched: Schedule) -> tuple[tuple[tuple, ...], ...]:
    """Per-rank op tuples of ``sched`` (see the module docstring); cached per schedule object."""
    hit = _CACHE.get(id(sched))
    if hit is not None and hit[0]() is sched:
        return hit[1]
    check_comms(sched)
    m = sched.num_microbatches
    out = []
    for acts in sched.actions:
        final = {a.stage: i for i, a in enumerate(acts) if a.kind in ("B", "W")}
        ops: list[tuple] = []
        for i, a in enumerate(acts):
            s, kind, k = a.stage, a.kind, a.microbatch
            slot = _KIND_SLOT.get(kind)
            if slot is not None:
                ops.append((COMPUTE, s, EVENT_KIND[kind], k, 4 * s + slot, slot == 0, slot, final.get(s) == i))
            elif kind == "SEND_F":
                ops.append((SEND, s, k, (2 * s) * m + k, 2 * s))
            elif kind == "SEND_B":
                ops.append((SEND, s, k, (2 * s + 1) * m + k, 2 * (s - 1) + 1))
            elif kind == "RECV_F":
                ops.append((RECV, s, k, (2 * (s - 1)) * m + k, 2 * (s - 1)))
            else:
                ops.append((RECV, s, k, (2 * (s + 1) + 1) * m + k, 2 * s + 1))
        out.append(tuple(ops))
    result = tuple(out)
    key = id(sched)
    _CACHE[key] = (weakref.ref(sched, drop_when_collected(_CACHE, key)), result)
    return result


_POSTED: dict[tuple[int, tuple[int, ...]], tuple[weakref.ref, tuple[tuple[tuple, ...], ...]]] = {}


def posted_skeleton(sched: Schedule, buffers: tuple[int | None, ...]) -> tuple[tuple[tuple, ...], ...]:
    """:func:`skeleton` with the receive posts of the lowered program inserted (``buffers[s]`` None:
    the stage has a buffer for every receive, all posted at the start); cached per schedule and buffers."""
    unlimited = 1 << 30
    slots = tuple(unlimited if b is None else int(b) for b in buffers)
    key = (id(sched), slots)
    hit = _POSTED.get(key)
    if hit is not None and hit[0]() is sched:
        return hit[1]
    from pipetrain.program.catalog import pool_sizes

    act, grad = pool_sizes(sched, list(slots))
    base = skeleton(sched)
    out = []
    for r, prog in enumerate(lower_ops(sched, act, grad)):
        ops: list[tuple] = []
        i = 0
        for op in prog:
            if op.verb == _POST_VERB:
                recv = base[r][_index_of(sched, r, op.action)]
                ops.append((POST, *recv[1:]))
            else:
                ops.append(base[r][i])
                i += 1
        out.append(tuple(ops))
    result = tuple(out)
    _POSTED[key] = (weakref.ref(sched, drop_when_collected(_POSTED, key)), result)
    return result


def explicit_skeleton(sched: Schedule, program: tuple[tuple[Op, ...], ...]) -> tuple[tuple[tuple, ...], ...]:
    """:func:`skeleton` with the receive posts where ``program`` (``SimInput.ops``, checked there) issues them."""
    base = skeleton(sched)
    out = []
    for r, rank_ops in enumerate(program):
        ops: list[tuple] = []
        i = 0
        for op in rank_ops:
            if op.verb == _POST_VERB:
                ops.append((POST, *base[r][_index_of(sched, r, op.action)][1:]))
            else:
                ops.append(base[r][i])
                i += 1
        out.append(tuple(ops))
    return tuple(out)


def sim_skeleton(inp: SimInput) -> tuple[tuple[tuple, ...], ...]:
    """The op tuples the engine runs for ``inp``: its explicit program, else pipetrain's lowering."""
    if inp.ops is not None:
        return explicit_skeleton(inp.schedule, inp.ops)
    return posted_skeleton(inp.schedule, tuple(spec.buffers for spec in inp.stages))


def _index_of(sched: Schedule, rank: int, action: object) -> int:
    idx = _ACTION_INDEX.get(id(sched))
    if idx is None or idx[0]() is not sched:
        idx = (weakref.ref(sched), [{a: i for i, a in enumerate(acts)} for acts in sched.actions])
        _ACTION_INDEX[id(sched)] = idx
    return idx[1][rank][action]


_ACTION_INDEX: dict[int, tuple[weakref.ref, list[dict]]] = {}


@dataclass(frozen=True)
class Tables:
    """Per-input lookups by slot: ``dur[dur_slot]``; ``link/wire/latency/nbytes/jitter[link_slot]``
    (``jitter``: the link's latency multipliers, empty where its latency is fixed)."""

    dur: list[float]
    link: list[str]
    wire: list[float]
    latency: list[float]
    nbytes: list[int]
    jitter: list[tuple[float, ...]]


def tables(inp: SimInput) -> Tables:
    dur = [spec.duration_s(k) for spec in inp.stages for k in ("F", "B", "I", "W")]
    link: list[str] = []
    wire: list[float] = []
    lat: list[float] = []
    nbytes: list[int] = []
    jitter: list[tuple[float, ...]] = []
    for b in inp.boundaries:
        bwd = b.bwd_link
        assert bwd is not None  # BoundarySpec.__post_init__ sets it
        for lk, n in ((b.link, b.fwd_bytes), (bwd, b.bwd_bytes)):
            link.append(lk.name)
            wire.append(lk.wire_time_s(n))
            lat.append(lk.latency_s)
            nbytes.append(int(n))
            jitter.append(lk.latency_jitter)
    return Tables(dur=dur, link=link, wire=wire, latency=lat, nbytes=nbytes, jitter=jitter)


def end_of_step(inp: SimInput, rank_end_s: list[float], grad_start_s: list[float],
                grad_end_s: list[float]) -> tuple[float, list[EventTuple]]:
    """Data-parallel all-reduce of every stage's gradients, then the all-reduce of tied weights'
    gradients among their ranks (``inp.ties``), then each rank's optimizer steps.

    ``rank_end_s[r]``: when rank ``r`` finished its list; ``grad_start_s[s]`` / ``grad_end_s[s]``:
    start and end of stage ``s``'s last gradient-producing action. A rank's all-reduces run one
    after another on its data-parallel link (ring, :func:`ring_allreduce_time_s`): with overlap from
    the start of that action (and not ending before it ends), else after the rank's last compute.
    Then the rank's optimizer steps run one after another; with ``inp.clip_sync_link`` (global
    gradient-norm clipping) they start only after one scalar has been all-reduced over every rank,
    once all ranks are done with the above; ranks of a time-sliced compute group share its cores
    for them (:func:`~pipetrain.simulator.sharing.shared_finish_times`). Returns the step time and
    the events.
    """
    sched, dp = inp.schedule, inp.data_parallel
    events: list[EventTuple] = []
    step = 0.0
    ready: list[float] = []
    for r in range(sched.num_ranks):
        stages = sorted(sched.stages_of(r), key=lambda s: (grad_end_s[s], s))
        link_free = 0.0
        t = rank_end_s[r]
        for s in stages:
            spec = inp.stages[s]
            t_ar = ring_allreduce_time_s(spec.grad_bytes, dp.width, dp.link, dp.fits)
            if t_ar <= 0.0:
                continue
            start = max(link_free, grad_start_s[s] if dp.overlap else rank_end_s[r])
            end = start + t_ar
            if dp.overlap and end < grad_end_s[s]:
                end = grad_end_s[s]
            link_free = end
            t = max(t, end)
            events.append((s, r, "ALLREDUCE", -1, start, end, int(spec.grad_bytes)))
        ready.append(t)
    for tie in inp.ties:  # a tied weight's gradient: all-reduced among its ranks once each of them is there
        arrive = [ready[r] for r in tie.ranks]
        end = max(arrive) + ring_allreduce_time_s(tie.nbytes, len(tie.ranks), tie.link, tie.fits)
        for r, t0 in zip(tie.ranks, arrive):
            events.append((min(sched.stages_of(r)), r, "ALLREDUCE", -1, t0, end, int(tie.nbytes)))
            ready[r] = end
    if inp.clip_sync_link is not None:  # global-norm clipping: one scalar all-reduced over every rank first
        t_sync = max(ready) + ring_allreduce_time_s(8.0, sched.num_ranks * dp.width, inp.clip_sync_link, inp.clip_sync_fits)
        ready = [t_sync] * len(ready)
    # ranks of a time-sliced compute group share its cores for their optimizer steps too (after the
    # clip barrier they all start at once): each rank's steps stretch by its share
    work = [sum(inp.stages[s].t_optimizer_s for s in sched.stages_of(r)) for r in range(sched.num_ranks)]
    done = [ready[r] + work[r] for r in range(sched.num_ranks)]
    for g in inp.compute_groups:
        if g.sharing == "time-slice" and g.contends:
            for r, end in zip(g.ranks, shared_finish_times([ready[r] for r in g.ranks], [work[r] for r in g.ranks], g.rate)):
                done[r] = end
    for r in range(sched.num_ranks):
        stretch = (done[r] - ready[r]) / work[r] if work[r] > 0 else 1.0
        t = ready[r]
        for s in sorted(sched.stages_of(r)):
            t_opt = inp.stages[s].t_optimizer_s * stretch
            if t_opt > 0.0:
                events.append((s, r, "OPT", -1, t, t + t_opt, 0))
                t += t_opt
        step = max(step, t)
    return step, events
