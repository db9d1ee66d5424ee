"""The planner's landscape: predicted step time over (micro-batches m, pipeline depth p).

:func:`landscape_from_search` reads a planner ``SearchResult`` (duck-typed: ``screened``,
``infeasible``, ``best``) into a :class:`Landscape`: for every (p, m) the best screened step time
over the other knobs (micro-batch size, dp, schedule), or why the cell has none ("infeasible",
"pruned" by the branch and bound, or "not in grid"). :func:`landscape_for_plan` runs that
search for a plan's model, topology and global batch. The JSON form is what reports embed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pipetrain.serde import to_dict

__all__ = ["Landscape", "landscape_from_search", "landscape_for_plan"]

_DESC = re.compile(r"pp=(\d+).*? m=(\d+)")


@dataclass(frozen=True, kw_only=True)
class Landscape:
    ps: tuple[int, ...]
    ms: tuple[int, ...]
    step_time_s: tuple[tuple[float, ...], ...]  # [p][m]; NaN where no feasible point
    status: tuple[tuple[str, ...], ...]  # [p][m]: "ok" | "infeasible" | "pruned" | "not in grid"
    chosen: tuple[int, int] | None  # (m, p)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = to_dict(self)
        d["step_time_s"] = [[None if math.isnan(x) else x for x in row] for row in self.step_time_s]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Landscape":
        return cls(ps=tuple(d["ps"]), ms=tuple(d["ms"]),
                   step_time_s=tuple(tuple(math.nan if x is None else float(x) for x in row) for row in d["step_time_s"]),
                   status=tuple(tuple(row) for row in d["status"]),
                   chosen=tuple(d["chosen"]) if d.get("chosen") else None, source=str(d.get("source", "")))  # type: ignore[arg-type]

    @property
    def feasible_points(self) -> int:
        return sum(1 for row in self.status for s in row if s == "ok")


def landscape_from_search(res: Any, *, chosen: tuple[int, int] | None = None, source: str = "") -> Landscape:
    best: dict[tuple[int, int], float] = {}
    for e in res.screened:
        k = (e.candidate.pp, e.candidate.num_microbatches)
        best[k] = min(best.get(k, math.inf), float(e.fast.step_time_s))
    bad: set[tuple[int, int]] = set()
    for desc, _why in res.infeasible:
        m = _DESC.search(desc)
        if m:
            bad.add((int(m.group(1)), int(m.group(2))))
    ps = sorted({k[0] for k in best} | {k[0] for k in bad})
    ms = sorted({k[1] for k in best} | {k[1] for k in bad})
    pruned_any = getattr(res, "pruned", 0) > 0
    times, status = [], []
    for p in ps:
        trow, srow = [], []
        for m in ms:
            if (p, m) in best:
                trow.append(best[(p, m)])
                srow.append("ok")
            else:
                trow.append(math.nan)
                srow.append("infeasible" if (p, m) in bad else ("pruned" if pruned_any else "not in grid"))
        times.append(tuple(trow))
        status.append(tuple(srow))
    if chosen is None and getattr(res, "best", None) is not None:
        chosen = (res.best.candidate.num_microbatches, res.best.candidate.pp)
    return Landscape(ps=tuple(ps), ms=tuple(ms), step_time_s=tuple(times), status=tuple(status), chosen=chosen, source=source)


def landscape_for_plan(plan: Any, *, topology: str | None = None, graph_for: Any = None, top_k: int = 64) -> Landscape:
    """Search the plan's job with every knob free (dtype, optimizer, global batch, seq-len kept)."""
    from pipetrain.planner.job import job_from_mapping
    from pipetrain.planner.search import search

    job = job_from_mapping({"model": plan.model, "topology": topology or plan.topology, "global_batch": plan.global_batch,
                            "seq_len": plan.seq_len, "dtype": plan.dtype, "optimizer": plan.optimizer}, source="plan")
    res = search(job, graph_for=graph_for, top_k=top_k, explain=False)
    return landscape_from_search(res, chosen=(plan.num_microbatches, plan.pp),
                                 source=f"planner search over {job.topology}, global batch {job.global_batch}, top_k={top_k}")
