"""The sweep report: ``pipetrain sweep ... --report DIR`` (what-if over one or two knobs).

``pipetrain sweep`` writes its table to ``DIR/sweep.json`` first (:data:`SWEEP_FILE`: the job, the
topology, the swept knobs with their values, one row per point; the same object ``--json``
prints). :func:`write_sweep_report` reads that file only (no planning, no simulation, no torch)
and writes ``DIR/report.html`` (self-contained, figures embedded), one PNG per figure and
``summary.json``: a line plot of the predicted step time and throughput over one knob, or a heat
map of the step time over two (an infeasible point is an empty cell; the table says why), and the
table itself. :func:`sweep_table` formats the table for the terminal and the page alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipetrain.errors import RunError
from pipetrain.reports.html import Section
from pipetrain.reports.report import FigureSink, ReportOutput, _finish
from pipetrain.serde import write_text_atomic

__all__ = ["SWEEP_FILE", "SWEEP_COLUMNS", "write_sweep_file", "read_sweep", "sweep_table", "line_figure", "heatmap_figure",
           "write_sweep_report"]

SWEEP_FILE = "sweep.json"
#: the table's columns after the swept knobs
SWEEP_COLUMNS = ("step s", "samples/s", "MFU", "bubble", "peak", "plan / why infeasible")


def write_sweep_file(path: str | Path, data: Mapping[str, Any]) -> Path:
    """``data``: {"job", "topology", "vary": [knob, ...], "values": [[v, ...], ...], "rows": [...]} (``pipetrain sweep``)."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_sweep(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    fix = "write it again with `pipetrain sweep ... --report DIR`"
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{p} does not exist: {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{p} is not readable JSON ({type(exc).__name__}): {fix}") from None
    ok = (isinstance(d, dict) and isinstance(d.get("vary"), list) and 1 <= len(d["vary"]) <= 2 and isinstance(d.get("rows"), list)
          and all(isinstance(r, dict) and all(k in r for k in d["vary"]) for r in d["rows"]))
    if not ok:
        raise RunError(f"{p} is corrupt (needs 'vary' with one or two knobs and 'rows' naming them): {fix}")
    if not isinstance(d.get("values"), list) or len(d["values"]) != len(d["vary"]):
        # an older file without the values: their order of first appearance is the sweep's order
        d["values"] = [list(dict.fromkeys(r[k] for r in d["rows"])) for k in d["vary"]]
    return d


def _bytes(n: float) -> str:
    for unit, size in (("TiB", float(1 << 40)), ("GiB", float(1 << 30)), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def sweep_table(knobs: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(header, cells) of the sweep's table: the terminal's and the report's (one format)."""
    head = (*knobs, *SWEEP_COLUMNS)
    cells = []
    for r in rows:
        keys = tuple(str(r[k]) for k in knobs)
        if r.get("error"):
            cells.append((*keys, "-", "-", "-", "-", "-", str(r["error"])))
        else:
            cells.append((*keys, f"{r['step_time_s']:.4g}", f"{r['samples_per_s']:.4g}", f"{(r['mfu'] or 0) * 100:.1f}%",
                          f"{r['bubble_fraction'] * 100:.1f}%", _bytes(r["peak_memory_bytes"]), str(r["plan"])))
    return head, cells


def _value(r: Mapping[str, Any], key: str) -> float:
    v = r.get(key)
    return float(v) if isinstance(v, (int, float)) and not r.get("error") else math.nan


def _is_numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def line_figure(knob: str, values: Sequence[Any], rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Step time and throughput over one knob; numbers on a numeric axis (log when they span 8x), names as categories."""
    by = {str(r[knob]): r for r in rows}
    step = [_value(by.get(str(v), {}), "step_time_s") for v in values]
    thr = [_value(by.get(str(v), {}), "samples_per_s") for v in values]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axs = fig.subplots(1, 2)
    numeric = _is_numeric(values)
    x = [float(v) for v in values] if numeric else list(range(len(values)))
    for ax, ys, label in ((axs[0], step, "predicted step time (s)"), (axs[1], thr, "samples / s")):
        ax.plot(x, ys, "o-", lw=2)
        for xi, yi in zip(x, ys):
            if math.isnan(yi):  # infeasible: marked at the axis so the gap is not read as a missing value
                ax.axvline(xi, color="tab:red", ls=":", lw=1)
        ax.set_xlabel(knob)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if numeric and min(x) > 0 and max(x) / min(x) >= 8:
            ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in values) else 10)
        if not numeric or (numeric and len(x) <= 12):
            ax.set_xticks(x, [str(v) for v in values], rotation=30 if not numeric else 0)
    axs[0].set_title(f"step time over {knob}" + (" (red: infeasible)" if any(math.isnan(s) for s in step) else ""))
    axs[1].set_title(f"throughput over {knob}")
    return fig


def heatmap_figure(knobs: Sequence[str], values: Sequence[Sequence[Any]], rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Predicted step time over two knobs (rows: the first knob, columns: the second); empty cells are infeasible."""
    k0, k1 = knobs
    by = {(str(r[k0]), str(r[k1])): r for r in rows}
    grid = np.array([[_value(by.get((str(a), str(b)), {}), "step_time_s") for b in values[1]] for a in values[0]], dtype=float)
    fig = Figure(figsize=(max(5.0, 1.1 * len(values[1]) + 3), max(3.2, 0.55 * len(values[0]) + 2)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", aspect="auto")  # reversed: the fastest point is the brightest
    fig.colorbar(im, ax=ax, label="predicted step time (s)")
    ax.set_xticks(range(len(values[1])), [str(v) for v in values[1]])
    ax.set_yticks(range(len(values[0])), [str(v) for v in values[0]])
    ax.set_xlabel(k1)
    ax.set_ylabel(k0)
    finite = grid[np.isfinite(grid)]
    best = float(finite.min()) if finite.size else math.nan
    worst = float(finite.max()) if finite.size else math.nan
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = float(grid[i, j])
            txt = "infeasible" if math.isnan(v) else f"{v:.3g}" + (" *" if v == best else "")
            # the bright (fast) half of viridis_r needs dark text
            light = math.isnan(v) or worst == best or (v - best) / (worst - best) < 0.5
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="black" if light else "white")
    ax.set_title(f"predicted step time over {k0} x {k1} (* fastest)")
    return fig


def write_sweep_report(out_dir: str | Path) -> ReportOutput:
    """Write the sweep report from ``out_dir/sweep.json`` (module docstring)."""
    out = Path(out_dir)
    d = read_sweep(out / SWEEP_FILE)
    knobs, values, rows = list(d["vary"]), d["values"], d["rows"]
    sink = FigureSink(out)
    if len(knobs) == 1:
        fig = sink("sweep", f"predicted step time and throughput over {knobs[0]}", line_figure(knobs[0], values[0], rows))
    else:
        fig = sink("sweep", f"predicted step time over {knobs[0]} x {knobs[1]}", heatmap_figure(knobs, values, rows))
    head, cells = sweep_table(knobs, rows)
    feasible = [r for r in rows if not r.get("error")]
    best = min(feasible, key=lambda r: r["step_time_s"], default=None)
    para = (f"Each point is a full planner search of {d.get('job', '?')} on {d.get('topology', '?')} with "
            f"{' and '.join(knobs)} pinned to the point's values; the figures are the planner's simulated predictions. "
            f"{len(feasible)} of {len(rows)} points fit.")
    if best is not None:
        para += " Fastest: " + ", ".join(f"{k}={best[k]}" for k in knobs) + f" ({best['step_time_s']:.4g} s per step: {best['plan']})."
    sections = [Section(id="sweep", title="Sweep", paragraphs=(para,), figures=(fig,)),
                Section(id="table", title="Table", paragraphs=(f"The rows are in {SWEEP_FILE} beside this page.",),
                        tables=((head, tuple(cells)),))]
    data = {"job": d.get("job"), "topology": d.get("topology"), "vary": knobs, "values": values, "rows": rows,
            "sections": [s.id for s in sections]}
    return _finish(out, f"pipetrain sweep: {d.get('job', '?')} on {d.get('topology', '?')}", f"varying {' x '.join(knobs)}",
                   sections, sink, (), data)
