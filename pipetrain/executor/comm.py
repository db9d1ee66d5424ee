"""Process groups, rank layout and persistent receive buffers of one pipeline rank.

Global rank ``g = (replica * pp + pipeline_rank) * tp + tp_rank``: tensor-parallel ranks
innermost, so with ``tp == 1`` replica ``d`` of the pipeline owns ranks ``d*pp .. d*pp+pp-1``
as before tensor parallelism existed. Every rank creates the same groups in the same order
(``dist.new_group`` is collective): one pipeline group per (replica, tp rank) (for global-norm
clipping and the loss), one data-parallel group per (pipeline rank, tp rank) (gradient
all-reduce of that rank's stages), and one group per (tied parameter, replica, tp rank) whose
owner and users sit on different ranks. A plan with ``tp > 1`` or ZeRO takes its pipeline,
data- and tensor-parallel groups from the device mesh instead
(:func:`pipetrain.executor.parallel.make_mesh`, dims ``dp, pp, tp``: the same rank order). With
``p2p_groups`` (always on NCCL, which matches point-to-point messages by issue order and
serializes a communicator's operations on one stream), two 2-rank groups per stage boundary
(activations, gradients) per (replica, tp rank), so each carries one stream posted in
micro-batch order on both ends; gloo matches by tag and uses the default group. Point-to-point
messages run between the same tp rank of adjacent pipeline ranks: each carries the full
(replicated over tp) boundary tensor.
"""

from __future__ import annotations

import datetime
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipetrain.plan import Plan, TensorSpec

__all__ = ["RankLayout", "Groups", "TieGroup", "make_groups", "agree_max", "BufferPool", "torch_dtype", "tag_of"]


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        from pipetrain.errors import PlanError

        raise PlanError(f"dtype {name!r} in the plan is not a torch dtype (e.g. float32, bfloat16, int64)")
    return dt


def tag_of(kind: int, stage: int, microbatch: int, num_stages: int, num_microbatches: int) -> int:
    """Message tag of an activation (kind 0) or gradient (kind 1) sent TO ``stage``."""
    return (kind * num_stages + stage) * num_microbatches + microbatch


@dataclass(frozen=True, kw_only=True)
class RankLayout:
    """Where global rank ``rank`` sits: ``rank = (dp_rank * pp + pp_rank) * tp + tp_rank``."""

    pp: int
    dp: int
    rank: int
    tp: int = 1

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def global_rank(self, pp_rank: int, dp_rank: int | None = None, tp_rank: int | None = None) -> int:
        d = self.dp_rank if dp_rank is None else dp_rank
        t = self.tp_rank if tp_rank is None else tp_rank
        return (d * self.pp + pp_rank) * self.tp + t


@dataclass(frozen=True, kw_only=True)
class TieGroup:
    """A tied parameter whose owner and users are on different pipeline ranks of this replica."""

    name: str
    blocks_here: tuple[int, ...]
    owner_rank: int  # global rank that owns (initializes) it
    group: Any


@dataclass(frozen=True, kw_only=True)
class Groups:
    pp_group: Any  # None when pp == 1
    dp_group: Any  # None when dp == 1
    ties: tuple[TieGroup, ...]
    #: (boundary b between stages b and b+1, "act" | "grad") -> 2-rank group, for this replica
    p2p: dict[tuple[int, str], Any] = field(default_factory=dict)
    tp_group: Any = None  # None when tp == 1
    #: the device mesh (dims dp, pp, tp) of a plan with tensor parallelism or ZeRO, else None
    mesh: Any = None


def make_groups(plan: Plan, layout: RankLayout, ties: tuple[tuple[str, int, tuple[int, ...]], ...],
                timeout: datetime.timedelta, *, p2p_groups: bool = False, mesh: Any = None) -> Groups:
    """Create every group on every rank, in one fixed order; return the ones this rank is in.

    With ``mesh`` (built by every rank before this call) the pipeline, data- and tensor-parallel
    groups are the mesh's; the tie and point-to-point groups are created here either way."""
    block_rank = {}
    for st in plan.stages:
        for b in range(st.block_start, st.block_end):
            block_rank[b] = st.rank
    me = layout.rank
    tp = layout.tp
    g_of = layout.global_rank
    pp_group = dp_group = tp_group = None
    if mesh is not None:
        pp_group = mesh.get_group("pp") if plan.pp > 1 else None
        dp_group = mesh.get_group("dp") if plan.dp > 1 else None
        tp_group = mesh.get_group("tp") if tp > 1 else None
    else:
        for d in range(plan.dp):
            ranks = [g_of(r, d, 0) for r in range(plan.pp)]
            if plan.pp > 1:
                g = dist.new_group(ranks, timeout=timeout)
                if me in ranks:
                    pp_group = g
        for r in range(plan.pp):
            ranks = [g_of(r, d, 0) for d in range(plan.dp)]
            if plan.dp > 1:
                g = dist.new_group(ranks, timeout=timeout)
                if me in ranks:
                    dp_group = g
    tie_groups: list[TieGroup] = []
    for name, owner, users in ties:
        pranks = sorted({block_rank[owner], *(block_rank[u] for u in users)})
        if len(pranks) < 2:
            continue
        for d in range(plan.dp):
            for t in range(tp):
                ranks = [g_of(r, d, t) for r in pranks]
                g = dist.new_group(ranks, timeout=timeout)
                if me in ranks:
                    here = tuple(b for b in (owner, *users) if block_rank[b] == layout.pp_rank)
                    tie_groups.append(TieGroup(name=name, blocks_here=here, owner_rank=g_of(block_rank[owner], d, t), group=g))
    p2p: dict[tuple[int, str], Any] = {}
    for b in range(len(plan.stages) - 1 if p2p_groups else 0):
        ra, rb = plan.stages[b].rank, plan.stages[b + 1].rank
        if ra == rb:
            continue
        for d in range(plan.dp):
            for t in range(tp):
                ranks = sorted({g_of(ra, d, t), g_of(rb, d, t)})
                for direction in ("act", "grad"):
                    g = dist.new_group(ranks, timeout=timeout)
                    if me in ranks:
                        p2p[(b, direction)] = g
    return Groups(pp_group=pp_group, dp_group=dp_group, ties=tuple(tie_groups), p2p=p2p, tp_group=tp_group, mesh=mesh)


def agree_max(t: torch.Tensor, device: Any) -> int:
    """The maximum over all ranks of the one-element integer tensor ``t`` (an all-reduce on ``device``)."""
    x = t.to(device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.cpu()[0])


class BufferPool:
    """``count`` tensors of one boundary spec, allocated once and reused every step.

    ``acquire`` hands out a free buffer index (or None when all are in flight); ``release``
    returns it. ``allocations`` counts tensors ever allocated; ``used_ptrs`` the distinct
    storages handed out, so telemetry can prove reuse.
    """

    def __init__(self, spec: TensorSpec, count: int, device: torch.device, *, what: str) -> None:
        self.spec = spec
        self.what = what
        self.buffers = [torch.empty(spec.shape, dtype=torch_dtype(spec.dtype), device=device) for _ in range(count)]
        self.allocations = count
        self.free: deque[int] = deque(range(count))
        self.used_ptrs: set[int] = set()

    def __len__(self) -> int:
        return len(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def acquire(self) -> int | None:
        if not self.free:
            return None
        i = self.free.popleft()
        self.used_ptrs.add(self.buffers[i].data_ptr())
        return i

    def release(self, i: int) -> None:
        self.free.append(i)
