"""The planner's inner problem: contiguous min-max partitioning under memory caps, exactly.

``n`` blocks are cut into ``p`` contiguous, non-empty stages. Stage ``s`` runs on its own
device (speed and memory may differ per stage), so both its time and its memory depend on
the block range *and* on the stage index: under 1F1B stage ``s`` keeps ``min(p - s, m)``
micro-batches in flight, so the same range needs more memory early in the pipeline.

The caller supplies, per stage ``s``, two ``(n+1) x (n+1)`` matrices ``T_s[i, j]`` (seconds)
and ``M_s[i, j]`` (bytes) for the range ``[i, j)`` (only ``i < j`` is read) and a cap per
stage. :func:`partition` then solves

    minimise   max_s T_s[b_s, b_{s+1}]          (the bottleneck stage time)
    subject to M_s[b_s, b_{s+1}] <= cap_s for every s,  0 = b_0 < b_1 < ... < b_p = n,
               every inner b_s an allowed cut position,

exactly, by dynamic programming over (stage, block): ``f_s(j) = min_i max(f_{s-1}(i),
T_s[i, j])`` over feasible ranges, ``O(p n^2)`` numpy operations. Ties are broken
deterministically: among bottleneck-optimal partitions the one with the least total time
``sum_s T_s`` (a second DP constrained to ``T_s <= bottleneck``), then the lexicographically
smallest boundaries. This is the linear-partition DP (Skiena, *The Algorithm Design
Manual*, 2nd ed., sec. 8.5) with per-stage feasibility added; it is exact, not greedy.

When no partition fits, a third DP finds the split whose worst stage is least over its cap
(min-max of ``M_s / cap_s``) and :class:`PartitionInfeasibleError` names that stage, e.g.
``"p=2: stage 0 needs 92.4 GiB > 80 GiB"``.

Torch-free; numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipetrain.errors import InfeasibleError

__all__ = [
    "PartitionResult",
    "PartitionInfeasibleError",
    "partition",
    "evaluate_partition",
    "additive_matrix",
    "matrix_from_function",
    "format_bytes",
]

GiB = float(1 << 30)

#: A per-stage matrix provider: ``stage -> (n+1, n+1)`` array over ranges ``[i, j)``.
StageMatrix = Callable[[int], np.ndarray]


def format_bytes(num_bytes: float) -> str:
    """``1.2 TiB``, ``92.4 GiB``, ``512.0 MiB``, ``3.0 KiB`` or ``17 B``."""
    b = float(num_bytes)
    for unit, size in (("TiB", GiB * 1024), ("GiB", GiB), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if abs(b) >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


@dataclass(frozen=True, kw_only=True)
class PartitionResult:
    """An optimal split: stage ``s`` holds blocks ``[starts[s], ends[s])``."""

    num_blocks: int
    boundaries: tuple[int, ...]  # inner cut positions b_1 < ... < b_{p-1}
    bottleneck_s: float
    total_s: float
    stage_times_s: tuple[float, ...]
    stage_memory_bytes: tuple[float, ...]
    memory_caps_bytes: tuple[float, ...]

    def __post_init__(self) -> None:
        edges = (0, *self.boundaries, self.num_blocks)
        if any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"boundaries {self.boundaries} are not strictly increasing inside (0, {self.num_blocks})")

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) + 1

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        edges = (0, *self.boundaries, self.num_blocks)
        return tuple(zip(edges[:-1], edges[1:]))

    @property
    def blocks_per_stage(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.ranges)


class PartitionInfeasibleError(InfeasibleError):
    """No split fits; ``stage``/``need_bytes``/``cap_bytes`` describe the least-bad split."""

    def __init__(self, message: str, *, num_stages: int, stage: int | None = None, need_bytes: float = 0.0,
                 cap_bytes: float = 0.0, boundaries: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.num_stages = num_stages
        self.stage = stage
        self.need_bytes = need_bytes
        self.cap_bytes = cap_bytes
        self.boundaries = boundaries

    @property
    def overflow_ratio(self) -> float:
        """``need / cap`` of the worst stage in the least-bad split (inf when no split exists)."""
        return self.need_bytes / self.cap_bytes if self.cap_bytes > 0 else float("inf")


def additive_matrix(values: Sequence[float] | np.ndarray, *, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """``A[i, j] = scale * sum(values[i:j]) + offset`` for ``i < j`` (``inf`` elsewhere)."""
    v = np.asarray(values, dtype=float)
    pre = np.concatenate(([0.0], np.cumsum(v)))
    a = (pre[None, :] - pre[:, None]) * scale + offset
    n1 = len(pre)
    a[np.tril_indices(n1)] = np.inf
    return a


def matrix_from_function(n: int, fn: Callable[[int, int], float]) -> np.ndarray:
    """Build a range matrix from a scalar ``fn(start, end)`` (``O(n^2)`` calls; for tests and small n)."""
    a = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        for j in range(i + 1, n + 1):
            a[i, j] = fn(i, j)
    return a


def _check_inputs(n: int, p: int, caps: Sequence[float]) -> None:
    if n < 1:
        raise InfeasibleError(f"cannot partition {n} blocks")
    if p < 1:
        raise InfeasibleError(f"p={p}: need at least one stage")
    if len(caps) != p:
        raise ValueError(f"caps has {len(caps)} entries for p={p} stages")


def _allowed_mask(n: int, allowed_cuts: Sequence[int] | None) -> np.ndarray:
    ok = np.zeros(n + 1, dtype=bool)
    if allowed_cuts is None:
        ok[1:n] = True
    else:
        for c in allowed_cuts:
            if 1 <= c < n:
                ok[c] = True
    return ok


def _stage_mats(n: int, p: int, stage_time: StageMatrix, stage_memory: StageMatrix, caps: Sequence[float],
                allowed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per stage: (T, M, feasible) with start/end positions restricted to legal ones."""
    out = []
    upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), k=1)
    for s in range(p):
        t = np.asarray(stage_time(s), dtype=float)
        m = np.asarray(stage_memory(s), dtype=float)
        if t.shape != (n + 1, n + 1) or m.shape != (n + 1, n + 1):
            raise ValueError(f"stage {s}: cost matrices must be {(n + 1, n + 1)}, got {t.shape} and {m.shape}")
        legal = upper.copy()
        start_ok = np.zeros(n + 1, dtype=bool)
        end_ok = np.zeros(n + 1, dtype=bool)
        if s == 0:
            start_ok[0] = True
        else:
            start_ok |= allowed
        if s == p - 1:
            end_ok[n] = True
        else:
            end_ok |= allowed
        legal &= start_ok[:, None] & end_ok[None, :]
        legal &= np.isfinite(t)
        out.append((t, m, legal))
    return out


def _least_overflow(n: int, p: int, mats: list, caps: Sequence[float]) -> tuple[tuple[int, ...], int, float, float]:
    """The split minimising ``max_s M_s / cap_s``; returns (boundaries, worst stage, need, cap)."""
    ratios = []
    for s, (_, m, legal) in enumerate(mats):
        cap = float(caps[s])
        r = np.where(legal, m / cap if cap > 0 else np.where(m > 0, np.inf, 0.0), np.inf)
        ratios.append(r)
    f = np.full(n + 1, np.inf)
    f[0] = 0.0
    arg = []
    for s in range(p):
        cand = np.maximum(f[:, None], ratios[s])
        idx = np.argmin(cand, axis=0)
        f = cand[idx, np.arange(n + 1)]
        arg.append(idx)
    if not np.isfinite(f[n]) and np.all(np.isinf(f)):
        return (), -1, float("inf"), 0.0
    ends = [n]
    j = n
    for s in range(p - 1, 0, -1):
        j = int(arg[s][j])
        ends.append(j)
    bounds = tuple(reversed(ends[1:]))
    edges = (0, *bounds, n)
    worst, worst_r = 0, -1.0
    for s in range(p):
        ratio = float(ratios[s][edges[s], edges[s + 1]])
        if ratio > worst_r:
            worst, worst_r = s, ratio
    _, m, _ = mats[worst]
    return bounds, worst, float(m[edges[worst], edges[worst + 1]]), float(caps[worst])


def _infeasible(n: int, p: int, mats: list, caps: Sequence[float], allowed: np.ndarray) -> PartitionInfeasibleError:
    legal_cuts = int(allowed.sum())
    if p - 1 > legal_cuts:
        return PartitionInfeasibleError(
            f"p={p}: the model has only {legal_cuts + 1} cuttable pieces ({n} blocks): lower pp to at most {legal_cuts + 1}",
            num_stages=p)
    bounds, worst, need, cap = _least_overflow(n, p, mats, caps)
    if worst < 0 or not np.isfinite(need):
        return PartitionInfeasibleError(f"p={p}: no split of {n} blocks is possible", num_stages=p)
    return PartitionInfeasibleError(
        f"p={p}: stage {worst} needs {format_bytes(need)} > {format_bytes(cap)}",
        num_stages=p, stage=worst, need_bytes=need, cap_bytes=cap, boundaries=bounds)


def evaluate_partition(boundaries: Sequence[int], *, num_blocks: int, stage_time: StageMatrix,
                       stage_memory: StageMatrix, caps: Sequence[float], check_memory: bool = True) -> PartitionResult:
    """Score a given (e.g. pinned or heuristic) split; raise if it breaks a cap and ``check_memory``."""
    n, p = num_blocks, len(boundaries) + 1
    _check_inputs(n, p, caps)
    edges = (0, *[int(b) for b in boundaries], n)
    if any(a >= b for a, b in zip(edges, edges[1:])):
        raise InfeasibleError(f"boundaries {list(boundaries)} must be strictly increasing inside 1..{n - 1}")
    times, mems = [], []
    for s in range(p):
        t = float(np.asarray(stage_time(s))[edges[s], edges[s + 1]])
        m = float(np.asarray(stage_memory(s))[edges[s], edges[s + 1]])
        if check_memory and m > float(caps[s]):
            raise PartitionInfeasibleError(
                f"p={p}: stage {s} (blocks {edges[s]}..{edges[s + 1] - 1}) needs {format_bytes(m)} > {format_bytes(caps[s])}",
                num_stages=p, stage=s, need_bytes=m, cap_bytes=float(caps[s]), boundaries=tuple(edges[1:-1]))
        times.append(t)
        mems.append(m)
    return PartitionResult(num_blocks=n, boundaries=tuple(edges[1:-1]), bottleneck_s=max(times), total_s=float(sum(times)),
                           stage_times_s=tuple(times), stage_memory_bytes=tuple(mems),
                           memory_caps_bytes=tuple(float(c) for c in caps))


def partition(num_blocks: int, num_stages: int, *, stage_time: StageMatrix, stage_memory: StageMatrix,
              caps: Sequence[float], allowed_cuts: Sequence[int] | None = None) -> PartitionResult:
    """Exact min-max contiguous split of ``num_blocks`` blocks into ``num_stages`` stages.

    ``stage_time(s)`` / ``stage_memory(s)`` return ``(n+1, n+1)`` matrices over ranges ``[i, j)``
    for stage ``s`` (so both may depend on the stage's position and device); ``caps[s]`` is stage
    ``s``'s memory cap in bytes; ``allowed_cuts`` restricts inner cut positions (default: all of
    ``1..n-1``). Raises :class:`PartitionInfeasibleError` when nothing fits.
    """
    n, p = num_blocks, num_stages
    _check_inputs(n, p, caps)
    allowed = _allowed_mask(n, allowed_cuts)
    mats = _stage_mats(n, p, stage_time, stage_memory, caps, allowed)
    feas = [legal & (m <= float(caps[s])) for s, (_, m, legal) in enumerate(mats)]
    cost = [np.where(feas[s], mats[s][0], np.inf) for s in range(p)]

    # Phase 1: optimal bottleneck. f[j] = best bottleneck covering blocks [0, j) with s+1 stages.
    f = np.full(n + 1, np.inf)
    f[0] = 0.0
    for s in range(p):
        f = np.min(np.maximum(f[:, None], cost[s]), axis=0)
    best = float(f[n])
    if not np.isfinite(best):
        raise _infeasible(n, p, mats, caps, allowed)

    # Phase 2: least total time among bottleneck-optimal splits. h[s][i] = min sum of stages s..p-1 over [i, n).
    # a relative tolerance: range sums come from prefix-sum differences, so two stages of equal
    # content can differ in the last bits, and a split that ties the bottleneck must stay eligible
    limit = best * (1 + 1e-9)
    capped = [np.where(c <= limit, c, np.inf) for c in cost]
    h = [np.full(n + 1, np.inf) for _ in range(p + 1)]
    h[p][n] = 0.0
    for s in range(p - 1, -1, -1):
        h[s] = np.min(capped[s] + h[s + 1][None, :], axis=1)
    # Reconstruct front to back, taking the smallest end position that stays optimal (lexicographic).
    bounds: list[int] = []
    i = 0
    for s in range(p - 1):
        vals = capped[s][i] + h[s + 1]
        target = h[s][i]
        ok = np.flatnonzero(vals <= target + abs(target) * 1e-12)
        j = int(ok[0])
        bounds.append(j)
        i = j
    return evaluate_partition(bounds, num_blocks=n, stage_time=lambda s: mats[s][0], stage_memory=lambda s: mats[s][1],
                              caps=caps)
