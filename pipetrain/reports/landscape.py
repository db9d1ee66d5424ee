"""The planner's landscape: predicted step time over (micro-batches m, pipeline depth p), as a file.

The planner's search already priced every (p, m) point; whoever holds that search result
(``pipetrain plan``, ``pipetrain demo``) turns it into a :class:`Landscape` with
:func:`landscape_from_search` and writes it with :func:`write_landscape` (``landscape.json``).
The reports only read it (:func:`read_landscape`, :func:`find_run_landscape`) and plot it: they
never search. A landscape names the job it was searched for (model, topology, global batch,
seq-len, dtype, optimizer) so a report can refuse one that belongs to another job.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.plan import Plan
from pipetrain.serde import to_dict, write_text_atomic

__all__ = ["LANDSCAPE_FILE", "Landscape", "landscape_from_search", "write_landscape", "read_landscape", "sidecar_path",
           "landscape_mismatch", "find_run_landscape"]

#: the file name in a run directory or a what-if report directory
LANDSCAPE_FILE = "landscape.json"
_DESC = re.compile(r"pp=(\d+).*? m=(\d+)")
#: the job keys a landscape is searched for, compared with the plan a report shows
_JOB_KEYS = ("model", "topology", "global_batch", "seq_len", "dtype", "optimizer")


@dataclass(frozen=True, kw_only=True)
class Landscape:
    ps: tuple[int, ...]
    ms: tuple[int, ...]
    step_time_s: tuple[tuple[float, ...], ...]  # [p][m]; NaN where no feasible point
    status: tuple[tuple[str, ...], ...]  # [p][m]: "ok" | "infeasible" | "pruned" | "not in grid"
    chosen: tuple[int, int] | None  # (m, p)
    source: str = ""
    model: str = ""
    topology: str = ""
    global_batch: int = 0
    seq_len: int = 0
    dtype: str = ""
    optimizer: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = to_dict(self)
        d["step_time_s"] = [[None if math.isnan(x) else x for x in row] for row in self.step_time_s]  # JSON has no NaN
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Landscape:
        chosen = d.get("chosen")
        return cls(ps=tuple(int(p) for p in d["ps"]), ms=tuple(int(m) for m in d["ms"]),
                   step_time_s=tuple(tuple(math.nan if x is None else float(x) for x in row) for row in d["step_time_s"]),
                   status=tuple(tuple(str(s) for s in row) for row in d["status"]),
                   chosen=(int(chosen[0]), int(chosen[1])) if chosen else None, source=str(d.get("source", "")),
                   model=str(d.get("model", "")), topology=str(d.get("topology", "")), global_batch=int(d.get("global_batch", 0)),
                   seq_len=int(d.get("seq_len", 0)), dtype=str(d.get("dtype", "")), optimizer=str(d.get("optimizer", "")))

    @property
    def feasible_points(self) -> int:
        return sum(1 for row in self.status for s in row if s == "ok")


def landscape_from_search(res: Any, *, plan: Plan, source: str = "") -> Landscape:
    """The landscape of a planner ``SearchResult`` already in hand (duck-typed: ``screened``,
    ``infeasible``, ``pruned``): for every (p, m) the best screened step time over the other knobs
    (micro-batch size, dp, schedule), or why the cell has none. ``plan`` is the chosen plan (the
    star) and names the job."""
    best: dict[tuple[int, int], float] = {}
    for e in res.screened:
        k = (e.candidate.pp, e.candidate.num_microbatches)
        best[k] = min(best.get(k, math.inf), float(e.fast.step_time_s))
    bad: set[tuple[int, int]] = set()
    for desc, _why in res.infeasible:
        hit = _DESC.search(desc)
        if hit:
            bad.add((int(hit.group(1)), int(hit.group(2))))
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
    return Landscape(ps=tuple(ps), ms=tuple(ms), step_time_s=tuple(times), status=tuple(status),
                     chosen=(plan.num_microbatches, plan.pp), source=source, model=plan.model, topology=plan.topology,
                     global_batch=plan.global_batch, seq_len=plan.seq_len, dtype=plan.dtype, optimizer=plan.optimizer)


def write_landscape(path: str | Path, land: Landscape) -> Path:
    return write_text_atomic(path, json.dumps(land.to_dict()) + "\n")


def read_landscape(path: str | Path) -> Landscape | None:
    """The landscape at ``path``; None when there is no such file; RunError (with the fix) when it is corrupt."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return Landscape.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise RunError(f"{p} is corrupt ({type(exc).__name__}): delete it, or write it again with `pipetrain plan ... -o PLAN` "
                       f"(or `--report DIR`)") from None


def sidecar_path(plan_path: str | Path) -> Path:
    """Where ``pipetrain plan -o PLAN`` keeps the landscape of PLAN: ``plan.json`` -> ``plan.landscape.json``."""
    p = Path(plan_path)
    return p.with_name(f"{p.stem}.landscape.json")


def landscape_mismatch(land: Landscape, plan: Plan) -> str:
    """Why ``land`` is not the landscape of ``plan``'s job ("" when it is; a file without job keys is trusted)."""
    diffs = [f"{k} {getattr(land, k)!r} (the plan's: {getattr(plan, k)!r})" for k in _JOB_KEYS
             if getattr(land, k) and getattr(land, k) != getattr(plan, k)]
    return "; ".join(diffs)


def find_run_landscape(run_dir: str | Path, plan: Plan, plan_path: str | Path | None) -> tuple[Landscape | None, str]:
    """(landscape, note) for a run: ``RUN_DIR/landscape.json`` (``pipetrain demo``), else the one
    ``pipetrain plan -o PLAN`` left beside the plan file the run used. The note says why there is none;
    a corrupt file is a RunError."""
    candidates = [Path(run_dir) / LANDSCAPE_FILE]
    if plan_path:
        candidates.append(sidecar_path(plan_path))
    skipped = []
    for path in candidates:
        land = read_landscape(path)
        if land is None:
            continue
        why = landscape_mismatch(land, plan)
        if not why:
            return land, ""
        skipped.append(f"{path} belongs to another job: {why}.")
    where = " or ".join(str(p) for p in candidates)
    note = (f"No planner landscape for this plan ({where} not found): the landscape is written by the planner, by "
            f"`pipetrain plan ... -o PLAN` beside PLAN or `pipetrain demo` in its run directory; a plan made by hand has none.")
    return None, " ".join([note, *skipped])
