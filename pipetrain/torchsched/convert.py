"""torch's schedule IR, as action strings, converted to pipetrain's Schedule and program. Torch-free.

torch prints (``str(_Action)``) and its CSV files store each action as ``2F0``, ``1I3``, ``0W5``,
``1SEND_F3``, ``2RECV_B0``, ``(0F3;3B1)OVERLAP_F_B``, ``0UNSHARD``, ``0RESHARD`` or
``1REDUCE_GRAD``; an empty cell is an idle slot. :func:`convert` takes torch's compute-only order
(``pipeline_order``) and its lowered compute+comms program (``pipeline_order_with_comms``, from
``_add_send_recv``, and ``_defer_recv_ops`` with ``defer_pp_recv=True``) and returns both as
pipetrain data:

* the compute-only order as a :class:`~pipetrain.schedules.Schedule` with pipetrain's own
  SEND/RECV placement (:func:`~pipetrain.schedules.with_comms`), simulated with pipetrain's receive
  prefetch: the order's ideal, communication hidden wherever the data dependencies allow;
* the lowered program as a Schedule whose RECV actions are the *waits* and an op list
  (:class:`~pipetrain.program.spec.Op`) whose ``post`` ops sit where torch's program issues each
  ``RECV`` (torch's runtime posts the irecv at the RECV action and waits on it right before the
  compute that reads it, ``_PipelineScheduleRuntime._step_microbatches``); SENDs stay where torch
  issues them (after the compute, after both halves of an OVERLAP_F_B pair).

UNSHARD and RESHARD (FSDP) are dropped: pipetrain models no FSDP. REDUCE_GRAD is dropped from the
action lists and priced by the caller as the data-parallel all-reduce (nothing with dp = 1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipetrain.errors import ScheduleError, TorchScheduleError
from pipetrain.program.spec import POST, RUN, Op
from pipetrain.schedules import Action, Schedule, validate, with_comms

__all__ = ["DROPPED_KINDS", "ImportedSchedule", "parse_cell", "convert"]

#: torch action kinds pipetrain drops (FSDP's unshard and reshard, the gradient reduction: priced apart)
DROPPED_KINDS = ("UNSHARD", "RESHARD", "REDUCE_GRAD")
_CELL = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|UNSHARD|RESHARD|REDUCE_GRAD|F|B|I|W)(\d*)$")
_PAIR = re.compile(r"^\((.*)\)OVERLAP_F_B$")


@dataclass(frozen=True, kw_only=True)
class ImportedSchedule:
    """torch's schedule in pipetrain's terms (module docstring).

    ``compute_only`` and ``lowered`` have the same compute order per rank and stage -> rank map;
    ``ops`` is ``lowered``'s program with torch's receive posts; ``dropped`` counts the dropped
    actions by kind; ``notes`` say what was changed or assumed.
    """

    name: str
    compute_only: Schedule
    lowered: Schedule
    ops: tuple[tuple[Op, ...], ...]
    dropped: tuple[tuple[str, int], ...]
    notes: tuple[str, ...] = ()

    @property
    def dropped_count(self) -> dict[str, int]:
        return dict(self.dropped)


def parse_cell(text: str) -> tuple[str, tuple[Action, ...]]:
    """One torch action string -> (``"compute"``, ``"comm"``, ``"drop"`` or ``"idle"``, its pipetrain actions).

    A dropped action returns its kind name and no action; an OVERLAP_F_B pair its two halves.
    """
    cell = text.strip()
    if not cell or cell == "None":
        return "idle", ()
    pair = _PAIR.match(cell)
    if pair is not None:
        halves = tuple(parse_cell(part)[1] for part in pair.group(1).split(";"))
        acts = tuple(a for h in halves for a in h)
        if len(acts) != 2 or any(not a.is_compute for a in acts):
            raise TorchScheduleError(f"torch action {cell!r}: an OVERLAP_F_B pair must hold two compute actions, e.g. (0F3;3B1)OVERLAP_F_B")
        return "compute", acts
    m = _CELL.match(cell)
    if m is None:
        raise TorchScheduleError(f"cannot read torch action {cell!r}; expected e.g. 2F0, 1I3, 0W5, 1SEND_F3, 2RECV_B0, "
                                 "(0F3;3B1)OVERLAP_F_B, 0UNSHARD, 1REDUCE_GRAD")
    stage, kind, mb = int(m.group(1)), m.group(2), m.group(3)
    if kind in DROPPED_KINDS:
        return kind, ()
    if not mb:
        raise TorchScheduleError(f"torch action {cell!r} names no micro-batch; write e.g. {stage}{kind}0")
    act = Action(stage=stage, kind=kind, microbatch=int(mb))
    return ("compute" if act.is_compute else "comm"), (act,)


def _compute_rows(rows: Sequence[Sequence[str]]) -> tuple[list[list[Action]], list[tuple[Action, Action]]]:
    orders: list[list[Action]] = []
    overlaps: list[tuple[Action, Action]] = []
    for row in rows:
        order: list[Action] = []
        for cell in row:
            what, acts = parse_cell(cell)
            if what == "compute":
                order += acts
                if len(acts) == 2:
                    overlaps.append((acts[0], acts[1]))
        orders.append(order)
    return orders, overlaps


def _needs_recv(a: Action, s2r: Sequence[int]) -> str | None:
    """The RECV kind compute ``a`` waits on (its input from another rank), or None."""
    last = len(s2r) - 1
    if a.kind == "F" and a.stage > 0 and s2r[a.stage - 1] != s2r[a.stage]:
        return "RECV_F"
    if a.kind in ("B", "I") and a.stage < last and s2r[a.stage + 1] != s2r[a.stage]:
        return "RECV_B"
    return None


def _lowered_rank(r: int, row: Sequence[str], s2r: Sequence[int], dropped: dict[str, int]) -> tuple[list[Action], list[Op]]:
    """Rank ``r``'s lowered torch row -> its schedule actions (RECVs as waits) and its ops (posts where torch issues them)."""
    acts: list[Action] = []
    ops: list[Op] = []
    posted: set[Action] = set()
    for cell in row:
        what, parsed = parse_cell(cell)
        if what in DROPPED_KINDS:
            dropped[what] = dropped.get(what, 0) + 1
            continue
        for a in parsed:
            if a.kind in ("RECV_F", "RECV_B"):
                if a in posted:
                    raise TorchScheduleError(f"torch's program posts {a} twice on rank {r}")
                posted.add(a)
                ops.append(Op(verb=POST, action=a))
                continue
            need = _needs_recv(a, s2r) if a.is_compute else None
            if need is not None:  # torch waits on the posted receive right before the compute that reads it
                wait = Action(stage=a.stage, kind=need, microbatch=a.microbatch)
                if wait not in posted:
                    raise TorchScheduleError(f"torch's program runs {a} on rank {r} before posting {wait}: not a program torch's "
                                             "runtime can run (it asserts 'Computing ... before receiving input')")
                acts.append(wait)
                ops.append(Op(verb=RUN, action=wait))
            acts.append(a)
            ops.append(Op(verb=RUN, action=a))
    return acts, ops


def convert(*, name: str, num_microbatches: int, stage_to_rank: Sequence[int], compute: Sequence[Sequence[str]],
            lowered: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> ImportedSchedule:
    """torch's compute-only order and lowered program (action strings per rank) -> :class:`ImportedSchedule`.

    Both schedules are proven complete and deadlock-free (:func:`~pipetrain.schedules.validate`:
    each RECV's wait after its SEND); raises :class:`TorchScheduleError` where torch's program
    cannot be what its runtime runs.
    """
    p = len(compute)
    s2r = tuple(int(r) for r in stage_to_rank)
    if len(lowered) != p or not s2r or max(s2r) >= p:
        raise TorchScheduleError(f"torch schedule {name}: {p} compute rows, {len(lowered)} lowered rows and stages on ranks "
                                 f"{sorted(set(s2r))}: every rank needs one row of each")
    orders, overlaps = _compute_rows(compute)
    split = any(a.kind in ("I", "W") for o in orders for a in o)

    def make(actions: tuple[tuple[Action, ...], ...]) -> Schedule:
        return validate(Schedule(name=f"torch:{name}", num_ranks=p, num_stages=len(s2r), num_microbatches=num_microbatches,
                                 stage_to_rank=s2r, actions=actions, split_backward=split, chunks=max(1, len(s2r) // p),
                                 overlaps=tuple(overlaps)))

    try:
        ideal = make(with_comms(orders, s2r, overlaps))
        dropped: dict[str, int] = {}
        rows = [_lowered_rank(r, row, s2r, dropped) for r, row in enumerate(lowered)]
        prog = make(tuple(tuple(a) for a, _ in rows))
    except ScheduleError as e:  # pipetrain's checks: torch's IR is not a complete, runnable schedule
        raise TorchScheduleError(f"torch schedule {name} does not convert into a complete pipetrain schedule: {e}") from e
    if any(prog.compute_order(r) != ideal.compute_order(r) for r in range(p)):
        raise TorchScheduleError(f"torch schedule {name}: its lowered program computes in another order than its pipeline_order")
    return ImportedSchedule(name=name, compute_only=ideal, lowered=prog, ops=tuple(tuple(o) for _, o in rows),
                            dropped=tuple(sorted(dropped.items())), notes=tuple(notes))
