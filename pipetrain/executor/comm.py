"""Process groups, rank layout and persistent receive buffers of one pipeline rank.

Global rank ``g = replica * pp + pipeline_rank``: replica ``d`` of the pipeline owns ranks
``d*pp .. d*pp+pp-1``. Every rank creates the same groups in the same order (``dist.new_group``
is collective): one pipeline group per replica (for global-norm clipping and the loss), one
data-parallel group per pipeline rank (gradient all-reduce of that rank's stages), and one
group per (tied parameter, replica) whose owner and users sit on different ranks. With
``p2p_groups`` (always on NCCL, which matches point-to-point messages by issue order and
serializes a communicator's operations on one stream), two 2-rank groups per stage boundary
(activations, gradients), so each carries one stream posted in micro-batch order on both ends;
gloo matches by tag and uses the default group.
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
    pp: int
    dp: int
    rank: int

    @property
    def pp_rank(self) -> int:
        return self.rank % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.pp

    def global_rank(self, pp_rank: int, dp_rank: int | None = None) -> int:
        return (self.dp_rank if dp_rank is None else dp_rank) * self.pp + pp_rank


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


def make_groups(plan: Plan, layout: RankLayout, ties: tuple[tuple[str, int, tuple[int, ...]], ...],
                timeout: datetime.timedelta, *, p2p_groups: bool = False) -> Groups:
    """Create every group on every rank, in one fixed order; return the ones this rank is in."""
    block_rank = {}
    for st in plan.stages:
        for b in range(st.block_start, st.block_end):
            block_rank[b] = st.rank
    me = layout.rank
    pp_group = dp_group = None
    for d in range(plan.dp):
        ranks = [d * plan.pp + r for r in range(plan.pp)]
        if plan.pp > 1:
            g = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                pp_group = g
    for r in range(plan.pp):
        ranks = [d * plan.pp + r for d in range(plan.dp)]
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
            ranks = [d * plan.pp + r for r in pranks]
            g = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                here = tuple(b for b in (owner, *users) if block_rank[b] == layout.pp_rank)
                tie_groups.append(TieGroup(name=name, blocks_here=here,
                                           owner_rank=d * plan.pp + block_rank[owner], group=g))
    p2p: dict[tuple[int, str], Any] = {}
    for b in range(len(plan.stages) - 1 if p2p_groups else 0):
        ra, rb = plan.stages[b].rank, plan.stages[b + 1].rank
        if ra == rb:
            continue
        for d in range(plan.dp):
            ranks = sorted({d * plan.pp + ra, d * plan.pp + rb})
            for direction in ("act", "grad"):
                g = dist.new_group(ranks, timeout=timeout)
                if me in ranks:
                    p2p[(b, direction)] = g
    return Groups(pp_group=pp_group, dp_group=dp_group, ties=tuple(tie_groups), p2p=p2p)


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
