"""The chosen plan's neighbourhood as a file and a figure: throughput against micro-batch count and size.

``pipetrain plan --report DIR`` prices the points (:func:`pipetrain.planner.neighbourhood.neighbourhood`)
and writes them to ``DIR/neighbourhood.json`` (:data:`NEIGHBOURHOOD_FILE`) with
:func:`write_neighbourhood`; the report reads the file (:func:`read_neighbourhood`) and draws it
(:func:`neighbourhood_figure`). Like the landscape, the file names its job so that a report can
refuse one written for another.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from pipetrain.errors import RunError
from pipetrain.plan import Plan
from pipetrain.reports.html import Section
from pipetrain.reports.units import format_seconds, seconds_unit
from pipetrain.serde import write_text_atomic

__all__ = ["NEIGHBOURHOOD_FILE", "write_neighbourhood", "read_neighbourhood", "neighbourhood_figure", "neighbourhood_section"]

NEIGHBOURHOOD_FILE = "neighbourhood.json"
_AXES = ("microbatches", "microbatch_size")
_FIX = "write it again with `pipetrain plan ... --report DIR`"


def write_neighbourhood(path: str | Path, *, plan: Plan, points: Sequence[Mapping[str, Any]]) -> Path:
    """``points``: dicts with the fields of :class:`pipetrain.planner.neighbourhood.NeighbourPoint`."""
    data = {"model": plan.model, "topology": plan.topology, "seq_len": plan.seq_len, "dtype": plan.dtype, "pp": plan.pp,
            "dp": plan.dp, "schedule": plan.schedule, "chunks": plan.chunks, "points": [dict(p) for p in points]}
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def read_neighbourhood(path: str | Path, plan: Plan) -> tuple[list[dict[str, Any]] | None, str]:
    """(points, note): None and why when the file is missing or belongs to another plan; RunError when corrupt."""
    p = Path(path)
    if not p.is_file():
        return None, f"No neighbourhood curves: {p} is missing; {_FIX}."
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        pts = [dict(x) for x in d["points"]]
        for x in pts:
            if x["axis"] not in _AXES or int(x["num_microbatches"]) < 1 or int(x["micro_batch_size"]) < 1:
                raise ValueError(f"bad point {x}")
            if x.get("step_time_s") is None and not x.get("reason"):
                raise ValueError(f"point without a step time or a reason: {x}")
            if x.get("step_time_s") is not None and not math.isfinite(float(x["step_time_s"]) + float(x["tokens_per_s"])):
                raise ValueError(f"point with a non-finite time: {x}")
        mine = {k: getattr(plan, k) for k in ("model", "topology", "seq_len", "dtype", "pp", "dp", "schedule", "chunks")}
        other = {k: d[k] for k in mine}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{p} is corrupt ({type(exc).__name__}): delete it, or {_FIX}") from None
    if other != mine:
        diff = ", ".join(f"{k} {other[k]!r} (the plan's: {mine[k]!r})" for k in mine if other[k] != mine[k])
        return None, f"{p} belongs to another plan ({diff}); {_FIX}."
    return pts, ""


def neighbourhood_figure(points: Sequence[Mapping[str, Any]]) -> Figure:
    """Two panels: tokens/s and step time against m (global batch held), and against the micro-batch
    size (m held). Infeasible points are crosses on the axis; the chosen plan is a star."""
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, axis, xkey, xlabel in ((axes[0], "microbatches", "num_microbatches", "micro-batches m (global batch held)"),
                                   (axes[1], "microbatch_size", "micro_batch_size", "micro-batch size (m held)")):
        pts = sorted((p for p in points if p["axis"] == axis), key=lambda p: int(p[xkey]))
        ok = [p for p in pts if p.get("step_time_s") is not None]
        bad = [p for p in pts if p.get("step_time_s") is None]
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 64, not 2^6 or 64.0
        if bad:
            ax.scatter([int(p[xkey]) for p in bad], [0.0] * len(bad), marker="x", color="#C44E52", clip_on=False, zorder=4,
                       label="no plan fits")
        if ok:
            x = np.array([int(p[xkey]) for p in ok], dtype=float)
            ax.plot(x, [float(p["tokens_per_s"]) for p in ok], marker="o", color="#4C72B0", label="tokens/s")
            top = max(float(p["step_time_s"]) for p in ok)
            unit, uname = seconds_unit(top)
            ax2 = ax.twinx()
            ax2.plot(x, [float(p["step_time_s"]) / unit for p in ok], marker=".", ls="--", color="#DD8452", label="step time")
            ax2.set_ylabel(f"step time ({uname})")
            for p in ok:
                if p.get("chosen"):
                    ax.scatter([int(p[xkey])], [float(p["tokens_per_s"])], marker="*", s=220, color="gold", edgecolor="black",
                               zorder=4, label="this plan")
            h2, l2 = ax2.get_legend_handles_labels()
        else:
            h2, l2 = [], []
        h1, l1 = ax.get_legend_handles_labels()
        if h1 or h2:
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
        ax.set_ylim(bottom=0)
        ax.set_title("throughput vs " + ("micro-batch count" if axis == "microbatches" else "micro-batch size"), fontsize=10)
    return fig


def _row(p: Mapping[str, Any]) -> tuple[str, ...]:
    ok = p.get("step_time_s") is not None
    return (p["axis"].replace("_", " "), str(p["num_microbatches"]), str(p["micro_batch_size"]), str(p["global_batch"]),
            format_seconds(float(p["step_time_s"])) if ok else "-",
            f"{float(p['tokens_per_s']):,.0f}" if ok else "-",
            f"{float(p['bubble_fraction']) * 100:.1f}%" if ok and p.get("bubble_fraction") is not None else "-",
            ("this plan; " if p.get("chosen") else "") + (str(p.get("detail", "")) if ok else str(p["reason"])))


def neighbourhood_section(points: list[dict[str, Any]] | None, note: str, sink: Any) -> Section:
    """The report's section (``sink`` is the report's FigureSink)."""
    title = "Throughput against micro-batch count and size"
    if points is None:
        return Section(id="neighbourhood", title=title, paragraphs=(note,))
    finite = [p for p in points if p.get("tokens_per_s") is not None and math.isfinite(float(p["tokens_per_s"]))]
    best = max(finite, key=lambda p: float(p["tokens_per_s"]), default=None)
    paras = ["The chosen plan with everything but the micro-batching held (pp, dp, schedule, pinned knobs), each point "
             "priced as the planner's search prices its candidates: the exact stage split under the memory caps, then the "
             "fast evaluator. Left: the global batch held, cut into m micro-batches. Right: m held, bigger or smaller "
             "micro-batches (the global batch changes with them)."]
    if best is not None:
        paras.append(f"Highest throughput here: m={best['num_microbatches']}, micro-batch {best['micro_batch_size']} "
                     f"({float(best['tokens_per_s']):,.0f} tokens/s).")
    head = ("curve", "m", "micro-batch", "global batch", "step", "tokens/s", "bubble", "note / why infeasible")
    return Section(id="neighbourhood", title=title, paragraphs=tuple(paras), tables=((head, tuple(_row(p) for p in points)),),
                   figures=(sink("neighbourhood", "throughput and step time against micro-batch count and size",
                                 neighbourhood_figure(points)),))
