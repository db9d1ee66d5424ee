"""torch's own pipeline schedules built offline: their ``pipeline_order`` and lowered program. Imports torch.

torch's schedule classes compute ``pipeline_order`` in their constructors from the stages' shape
attributes alone (``num_stages``, ``group_size``, ``group_rank``, ``stage_index``, ``is_first``,
``is_last``, ``submod``), so stand-in objects with those attributes build them without a process
group or a model; the multi-stage classes (``_PipelineScheduleRuntime``) lower it in the constructor
too (``_add_unshard_reshard``, ``_add_reduce_grad``, ``_add_send_recv``, and ``_defer_recv_ops`` with
``defer_pp_recv=True``) into ``pipeline_order_with_comms``. The single-stage classes (GPipe, 1F1B)
run a hand-written loop instead; their IR is lowered here with torch's own ``_add_send_recv`` (what
``_PipelineScheduleRuntime`` would run from their CSV).

These are private APIs: :func:`check_torch` accepts only the torch versions in :data:`TESTED_TORCH`
(and checks the names it uses exist) and raises :class:`~pipetrain.errors.TorchScheduleError`
otherwise. What was verified on 2.13: every class in :data:`TORCH_SCHEDULES` builds offline, with
and without ``defer_pp_recv``, converts into a schedule :func:`~pipetrain.schedules.validate` proves
complete and deadlock-free, and simulates in both receive modes, for p in {2, 3, 4}, m in
{p, 2p, 4p} and 2 or 3 stages per rank (DualPipeV: m >= 2p); GPipe's, interleaved 1F1B's, ZB-V's
and DualPipeV's orders equal pipetrain's own (``tests/test_schedules_vs_torch.py``); torch's 1F1B
IR has the last-rank numbering fault that test documents, which :func:`torch_orders` corrects
(with a note). A CSV is read, validated and lowered by torch's own ``_load_csv``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from pipetrain.errors import TorchScheduleError
from pipetrain.torchsched.convert import parse_cell

__all__ = ["TESTED_TORCH", "TORCH_SCHEDULES", "V_TORCH_SCHEDULES", "SINGLE_TORCH_SCHEDULES", "INTERLEAVED_TORCH_SCHEDULES",
           "TorchOrders", "check_torch", "torch_orders", "torch_stubs"]

#: torch versions (major.minor) whose private pipelining APIs this module was tested against
TESTED_TORCH = ("2.13",)
TORCH_SCHEDULES = ("Schedule1F1B", "ScheduleGPipe", "ScheduleInterleaved1F1B", "ScheduleLoopedBFS",
                   "ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble", "ScheduleDualPipeV")
#: one stage per rank; torch runs them with a hand-written loop, not the lowered IR
SINGLE_TORCH_SCHEDULES = ("Schedule1F1B", "ScheduleGPipe")
#: two stages per rank in a V (rank r holds stages r and 2p-1-r)
V_TORCH_SCHEDULES = ("ScheduleZBVZeroBubble", "ScheduleDualPipeV")
#: several stages per rank, stage s on rank s % p (``chunks`` of them)
INTERLEAVED_TORCH_SCHEDULES = ("ScheduleInterleaved1F1B", "ScheduleLoopedBFS", "ScheduleInterleavedZeroBubble")
_PRIVATE = ("_Action", "_add_send_recv", "_defer_recv_ops", "_PipelineScheduleRuntime", "generate_stage_to_rank_mapping")


@dataclass(frozen=True, kw_only=True)
class TorchOrders:
    """torch's compute-only order and lowered program, as action strings per rank (``str(_Action)``)."""

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    compute: tuple[tuple[str, ...], ...]
    lowered: tuple[tuple[str, ...], ...]
    torch_version: str
    notes: tuple[str, ...] = ()


def check_torch() -> ModuleType:
    """``torch.distributed.pipelining.schedules`` if this torch is a tested version and has the private names used."""
    import torch

    version = str(torch.__version__)
    major_minor = ".".join(version.split("+")[0].split(".")[:2])
    if major_minor not in TESTED_TORCH:
        raise TorchScheduleError(f"torch {version}: importing torch's schedules uses private APIs of torch.distributed.pipelining "
                                 f"tested with torch {', '.join(TESTED_TORCH)} only; install torch {TESTED_TORCH[-1]} "
                                 f"(pip install 'torch=={TESTED_TORCH[-1]}.*') or simulate pipetrain's own schedules (--schedule)")
    try:
        from torch.distributed.pipelining import schedules
    except ImportError as e:  # a torch built without distributed
        raise TorchScheduleError(f"torch {version} has no torch.distributed.pipelining ({e}): install a torch with distributed support") from e
    missing = [n for n in _PRIVATE + TORCH_SCHEDULES if not hasattr(schedules, n)]
    if missing:
        raise TorchScheduleError(f"torch {version} lacks {', '.join(missing)} in torch.distributed.pipelining.schedules: "
                                 f"install torch {TESTED_TORCH[-1]}")
    return schedules


def torch_stubs(p: int, num_stages: int, stage_ids: tuple[int, ...]) -> list[SimpleNamespace]:
    """Stand-ins for rank 0's stages: what torch's schedule constructors read (no model, no process group)."""
    return [SimpleNamespace(num_stages=num_stages, group_size=p, group_rank=0, stage_index=s, is_first=s == 0,
                            is_last=s == num_stages - 1, submod=None) for s in stage_ids]


def _rows(order: dict[int, list[Any]], p: int) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(str(a) for a in order[r] if a is not None) for r in range(p))


def _fix_1f1b_last_rank(S: ModuleType, order: dict[int, list[Any]], p: int, m: int) -> str | None:
    """torch 2.13's ``Schedule1F1B._get_pipeline_order`` numbers the last rank's forwards 1..m (its
    runtime loop runs 0..m-1; tests/test_schedules_vs_torch.py): renumber them, say so."""
    fwd = [a for a in order[p - 1] if a is not None and a.computation_type == S.FORWARD]
    if sorted(a.microbatch_index for a in fwd) != list(range(1, m + 1)):
        return None
    order[p - 1] = [S._Action(a.stage_index, a.computation_type, a.microbatch_index - 1)
                    if a is not None and a.computation_type == S.FORWARD else a for a in order[p - 1]]
    return (f"torch's Schedule1F1B IR numbers rank {p - 1}'s forwards 1..{m}; renumbered 0..{m - 1}, "
            "as its runtime loop runs them")


def _lower_single(S: ModuleType, order: dict[int, list[Any]], p: int, defer: bool) -> dict[int, list[Any]]:
    compute = {r: [a for a in order[r] if a is not None] for r in range(p)}
    lowered: dict[int, list[Any]] = S._add_send_recv(compute, stage_to_rank=lambda s: s, num_stages=p)
    if defer:
        lowered = S._defer_recv_ops(lowered, stage_to_rank=lambda s: s)
    return lowered


def _build(S: ModuleType, name: str, p: int, m: int, chunks: int, defer: bool) -> tuple[Any, list[str]]:
    cls = getattr(S, name)
    notes: list[str] = []
    if name in SINGLE_TORCH_SCHEDULES:
        sched = cls(torch_stubs(p, p, (0,))[0], n_microbatches=m)
        notes.append(f"torch runs {name} with its own loop (a receive posted right before the compute that needs it); "
                     "its IR is lowered here with torch's _add_send_recv, as _PipelineScheduleRuntime would run it")
        return sched, notes
    v = 2 if name in V_TORCH_SCHEDULES else chunks
    n = p * v
    ids = (0, n - 1) if name in V_TORCH_SCHEDULES else tuple(c * p for c in range(v))
    return cls(torch_stubs(p, n, ids), n_microbatches=m, defer_pp_recv=defer), notes


def torch_orders(schedule: str, p: int | None = None, m: int | None = None, *, chunks: int = 2,
                 defer_pp_recv: bool = False) -> TorchOrders:
    """torch's schedule ``schedule`` (a name in :data:`TORCH_SCHEDULES`, or a CSV file as
    ``_PipelineScheduleRuntime._load_csv`` reads it) for ``p`` ranks and ``m`` micro-batches
    (a CSV carries its own; given ones must match), ``chunks`` stages per rank for the interleaved
    classes; ``defer_pp_recv``: torch's deferral of each RECV to just before its consumer."""
    S = check_torch()
    import torch

    if schedule not in TORCH_SCHEDULES:
        if schedule.lower().endswith(".csv") or Path(schedule).is_file():
            return _from_csv(S, Path(schedule), p, m, defer_pp_recv, str(torch.__version__))
        raise TorchScheduleError(f"torch schedule {schedule!r} is unknown: name one of {', '.join(TORCH_SCHEDULES)}, or a CSV file")
    if p is None or m is None or p < 1 or m < 1:
        raise TorchScheduleError(f"torch schedule {schedule} needs the pipeline ranks p >= 1 and micro-batches m >= 1, got p={p}, m={m}")
    if schedule == "ScheduleDualPipeV" and m < 2 * p:
        raise TorchScheduleError(f"ScheduleDualPipeV needs at least 2p = {2 * p} micro-batches, got {m}: use m >= {2 * p}")
    if schedule in INTERLEAVED_TORCH_SCHEDULES and chunks < 1:
        raise TorchScheduleError(f"{schedule} needs chunks (stages per rank) >= 1, got {chunks}")
    try:
        sched, notes = _build(S, schedule, p, m, chunks, defer_pp_recv)
    except (ValueError, AssertionError, RuntimeError, TypeError) as e:  # torch refuses these arguments
        raise TorchScheduleError(f"torch's {schedule} refuses p={p}, m={m}" + (f", {chunks} stages per rank" if schedule in
                                 INTERLEAVED_TORCH_SCHEDULES else "") + f": {e}") from e
    order: dict[int, list[Any]] = {r: list(sched.pipeline_order[r]) for r in range(p)}
    if schedule in SINGLE_TORCH_SCHEDULES:
        fixed = _fix_1f1b_last_rank(S, order, p, m) if schedule == "Schedule1F1B" else None
        if fixed:
            notes.append(fixed)
        lowered = _lower_single(S, order, p, defer_pp_recv)
        s2r = tuple(range(p))
    else:
        lowered = sched.pipeline_order_with_comms
        s2r = tuple(sched.stage_index_to_group_rank[s] for s in range(sched._num_stages))
    return TorchOrders(name=schedule, num_ranks=p, num_stages=len(s2r), num_microbatches=m, stage_to_rank=s2r,
                       compute=_rows(order, p), lowered=_rows(lowered, p), torch_version=str(torch.__version__), notes=tuple(notes))


def _from_csv(S: ModuleType, path: Path, p: int | None, m: int | None, defer: bool, version: str) -> TorchOrders:
    """A CSV as ``_PipelineScheduleRuntime._load_csv`` reads it: one row per rank; compute-only, or
    compute+comms when any cell is a SEND or RECV. torch itself loads, validates and lowers it."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f)]
    except OSError as e:
        raise TorchScheduleError(f"cannot read torch schedule CSV {path}: {e}") from e
    parsed = [[parse_cell(c) for c in row] for row in rows]
    acts = [a for row in parsed for _, aa in row for a in aa]
    if not rows or not acts:
        raise TorchScheduleError(f"torch schedule CSV {path} has no actions: one row per rank of actions such as 0F0,0B0")
    ranks, n, mb = len(rows), max(a.stage for a in acts) + 1, max(a.microbatch for a in acts) + 1
    if p is not None and p != ranks or m is not None and m != mb:
        raise TorchScheduleError(f"torch schedule CSV {path} has {ranks} ranks and {mb} micro-batches; the plan or flags say "
                                 f"{p} and {m}: make them agree")
    fmt = "compute_comms" if any(not a.is_compute for a in acts) else "compute_only"
    try:
        rt = S._PipelineScheduleRuntime(torch_stubs(ranks, n, (0,)), n_microbatches=mb, defer_pp_recv=defer)
        rt._load_csv(str(path), format=fmt)
    except (ValueError, AssertionError, RuntimeError, KeyError) as e:
        raise TorchScheduleError(f"torch refuses the schedule CSV {path} ({fmt}): {e}") from e
    lowered: dict[int, list[Any]] = rt.pipeline_order_with_comms
    notes = []
    if fmt == "compute_comms":
        compute = {r: [a for a in lowered[r] if a.is_compute_op] for r in range(ranks)}
        if defer:  # torch defers only when it lowers a compute-only CSV itself
            lowered = S._defer_recv_ops(lowered, stage_to_rank=lambda s: rt.stage_index_to_group_rank[s])
            notes.append("the CSV's receives deferred with torch's _defer_recv_ops")
    else:
        compute = rt.pipeline_order
    s2r = tuple(rt.stage_index_to_group_rank[s] for s in range(n))
    return TorchOrders(name=path.name, num_ranks=ranks, num_stages=n, num_microbatches=mb, stage_to_rank=s2r,
                       compute=_rows(compute, ranks), lowered=_rows(lowered, ranks), torch_version=version, notes=tuple(notes))
