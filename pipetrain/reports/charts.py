"""Report charts other than timelines: convergence, memory, per-stage breakdown, landscape.

Every function takes plain numbers (no runtime objects) and returns a matplotlib ``Figure``,
so ``reports`` imports no runtime and the charts are testable on their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipetrain.reports.units import format_seconds, seconds_unit

__all__ = [
    "convergence_figure",
    "memory_figure",
    "breakdown_figure",
    "step_time_figure",
    "param_consistency_figure",
    "landscape_figure",
    "scatter_figure",
    "grad_norm_figure",
    "memory_stack_figure",
    "MEMORY_PARTS",
]

_GIB = float(1 << 30)
#: at most this many category labels on an axis: 32 "stage N" labels at 7 pt run together in 9 inches
_MAX_LABELS = 16
#: the components of a GPU's memory, bottom to top, as memory.json names them
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "buffers")


def _category_ticks(ax: Axes, positions: Sequence[float] | np.ndarray, labels: Sequence[str], *, axis: str = "x") -> None:
    """Every k-th label so that at most ``_MAX_LABELS`` show (the bars stay; only their labels thin out)."""
    k = max(1, math.ceil(len(labels) / _MAX_LABELS))
    pos, lab = list(positions)[::k], list(labels)[::k]
    if axis == "x":
        ax.set_xticks(pos, lab, fontsize=7)
    else:
        ax.set_yticks(pos, lab, fontsize=7)


def convergence_figure(pipeline_loss: Sequence[float], reference_loss: Sequence[float]) -> Figure:
    """Loss curves of the pipeline and the single-device run, and |difference| on a log scale."""
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax, axd = fig.subplots(1, 2)
    steps = np.arange(1, len(pipeline_loss) + 1)
    ax.plot(steps, pipeline_loss, label="pipeline", lw=2)
    ax.plot(np.arange(1, len(reference_loss) + 1), reference_loss, "--", label="single device", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend()
    n = min(len(pipeline_loss), len(reference_loss))
    diff = np.abs(np.asarray(pipeline_loss[:n], dtype=float) - np.asarray(reference_loss[:n], dtype=float))
    axd.semilogy(steps[:n], np.maximum(diff, 1e-12), marker=".", color="#C44E52")
    if n and not diff.any():
        axd.text(0.5, 0.6, "identical at every step (difference exactly 0)", ha="center", transform=axd.transAxes)
    axd.set_xlabel("step")
    axd.set_ylabel("|pipeline - single device| (floor 1e-12)")
    axd.set_title("loss difference")
    return fig


def memory_figure(predicted_bytes: Sequence[float], measured_bytes: Sequence[float] | None,
                  cap_bytes: Sequence[float] | None) -> Figure:
    """Memory per stage: predicted vs measured bars, with the device cap as a marker.

    Units follow the bars (MiB or GiB); when the cap dwarfs them (> 20x) the axis is logarithmic
    so both the bars and the cap stay readable.
    """
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.add_subplot()
    n = len(predicted_bytes)
    x = np.arange(n)
    top = max(list(predicted_bytes) + list(measured_bytes or []) + [1.0])
    unit, name = (_GIB, "GiB") if top >= _GIB else (float(1 << 20), "MiB")
    w = 0.38 if measured_bytes is not None else 0.6
    ax.bar(x - (w / 2 if measured_bytes is not None else 0), np.asarray(predicted_bytes) / unit, w, label="predicted")
    if measured_bytes is not None:
        ax.bar(x + w / 2, np.asarray(measured_bytes) / unit, w, label="measured")
    if cap_bytes is not None and any(c > 0 for c in cap_bytes):
        ax.scatter(x, np.asarray(cap_bytes) / unit, marker="_", s=900, color="black", label="device cap", zorder=3)
        if max(cap_bytes) > 20 * top:
            ax.set_yscale("log")
            low = min([v for v in list(predicted_bytes) + list(measured_bytes or []) if v > 0] or [top])
            ax.set_ylim(bottom=low / unit / 10)
    _category_ticks(ax, x, [str(i) for i in range(n)])
    ax.set_xlabel("stage")
    ax.set_ylabel(name + (" (log)" if ax.get_yscale() == "log" else ""))
    ax.set_title("memory per stage")
    ax.legend(fontsize=8)
    return fig


def breakdown_figure(rows: Mapping[str, Sequence[Sequence[float]]], *, parts: Sequence[str]) -> Figure:
    """Stacked bars per stage for each source (e.g. 'simulated', 'measured'): one value per part, in seconds
    (e.g. compute, transfer, collective, bubble as :func:`pipetrain.timeline.stage_breakdown` splits a step)."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    sources = list(rows)
    n = max(len(v) for v in rows.values())
    top = max((sum(r) for v in rows.values() for r in v), default=0.0)
    unit, uname = seconds_unit(top) if top > 0 else (1e-3, "ms")
    width = 0.8 / max(1, len(sources))
    colors = ["#4C72B0", "#8172B3", "#C44E52", "#CCCCCC", "#55A868"]
    many = n * len(sources) > 64  # white edges between thin bars would hide them
    for si, src in enumerate(sources):
        bottoms = np.zeros(n)
        for pi, part in enumerate(parts):
            vals = np.array([row[pi] for row in rows[src]]) / unit
            ax.bar(np.arange(n) + si * width, vals, width, bottom=bottoms, color=colors[pi % len(colors)],
                   edgecolor="none" if many else ("black" if si else "white"), hatch="//" if si else None,
                   label=f"{part} ({src})" if len(sources) > 1 else part)
            bottoms += vals
    _category_ticks(ax, np.arange(n) + width * (len(sources) - 1) / 2, [str(i) for i in range(n)])
    ax.set_xlabel("stage")
    ax.set_ylabel(f"{uname} per step")
    ax.set_title("per-stage breakdown")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def memory_stack_figure(parts: Mapping[str, Sequence[float]], cap_bytes: Sequence[float] | None, *,
                        label: str = "GPU") -> Figure:
    """Stacked memory per GPU (pipeline rank): ``parts[name][gpu]`` bytes, bottom to top in :data:`MEMORY_PARTS`
    order where named so, with each GPU's cap as a marker."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    names = [p for p in MEMORY_PARTS if p in parts] + [p for p in parts if p not in MEMORY_PARTS]
    n = max((len(v) for v in parts.values()), default=0)
    totals = np.sum([np.asarray(parts[p], dtype=float) for p in names], axis=0) if names else np.zeros(n)
    top = max([float(totals.max()) if n else 0.0] + list(cap_bytes or []) + [1.0])
    unit, uname = (_GIB, "GiB") if top >= _GIB else (float(1 << 20), "MiB")
    colors = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "activations": "#C44E52",
              "buffers": "#8172B3"}
    x = np.arange(n)
    bottoms = np.zeros(n)
    for p in names:
        vals = np.asarray(parts[p], dtype=float) / unit
        ax.bar(x, vals, 0.8, bottom=bottoms, color=colors.get(p, "#8C8C8C"), label=p, edgecolor="none")
        bottoms += vals
    if cap_bytes is not None and any(c > 0 for c in cap_bytes):
        ax.scatter(x, np.asarray(cap_bytes, dtype=float) / unit, marker="_", s=max(20.0, 6000.0 / max(n, 1)), color="black",
                   label="device cap", zorder=3)
    _category_ticks(ax, x, [str(i) for i in range(n)])
    ax.set_xlabel(label)
    ax.set_ylabel(uname)
    ax.set_title(f"memory per {label}: components against the cap")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def step_time_figure(measured_s: Sequence[float], simulated_s: float | None) -> Figure:
    """Measured step time per step, with the simulated step as a line (None: the run has no simulation)."""
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(measured_s) + 1), np.asarray(measured_s) * 1e3, marker=".", label="measured")
    if simulated_s is not None:
        ax.axhline(simulated_s * 1e3, color="#C44E52", ls="--", label=f"simulated {simulated_s * 1e3:.1f} ms")
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms)")
    ax.set_title("step time")
    ax.legend(fontsize=8)
    return fig


def param_consistency_figure(max_abs: Sequence[float], rel: Sequence[float], tol: float) -> Figure:
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(max_abs))
    ax.bar(x - 0.2, np.maximum(np.asarray(max_abs), 1e-16), 0.4, label="max |Δparam|")
    ax.bar(x + 0.2, np.maximum(np.asarray(rel), 1e-16), 0.4, label="relative ‖Δ‖/‖p‖")
    ax.axhline(tol, color="black", ls="--", label=f"tolerance {tol:g}")
    ax.set_yscale("log")
    ax.set_xticks(x, [f"stage {i}" for i in x])
    ax.set_title("final parameters vs single device (floor 1e-16)")
    if len(max_abs) and not np.any(np.asarray(max_abs)):
        ax.text(0.5, 0.5, "identical to the single-device run (difference exactly 0)", ha="center", transform=ax.transAxes)
    ax.legend(fontsize=8)
    return fig


def landscape_figure(ms: Sequence[int], ps: Sequence[int], step_time_s: Sequence[Sequence[float]],
                     chosen: tuple[int, int] | None = None, labels: Sequence[Sequence[str]] | None = None) -> Figure:
    """Predicted step time over (m, p); NaN cells are hatched and labelled (``labels[p][m]``, default "infeasible").

    Cell text is compact ("92.8 s") and sized to its cell; a cell too small for 4-point text is left
    bare (the colour bar still reads it). The "chosen" legend sits outside the grid.
    """
    fig = Figure(figsize=(max(7.0, 0.45 * len(ms) + 2.5), max(3.8, 0.3 * len(ps) + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    z = np.asarray(step_time_s, dtype=float)  # rows = p, cols = m; seconds
    masked = np.ma.masked_invalid(z)
    lo, hi = (float(masked.min()), float(masked.max())) if masked.count() else (0.0, 0.0)
    unit, uname = seconds_unit(hi) if hi > 0 else (1e-3, "ms")
    im = ax.imshow(masked / unit, aspect="auto", origin="lower", cmap="viridis_r")
    # the cell's size in points, from the figure size before layout (a slight over-estimate: the colour bar takes some)
    w_in, h_in = fig.get_size_inches()
    cell_w = (w_in - 2.2) * 72 / max(1, z.shape[1])
    cell_h = (h_in - 1.2) * 72 / max(1, z.shape[0])
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            if math.isnan(z[i, j]):
                ax.add_patch(_hatch(j, i))
                text, color = (labels[i][j] if labels is not None else "infeasible"), "black"
            else:  # dark text on the light (fast) end of viridis_r, white on the dark end
                dark = (z[i, j] - lo) / (hi - lo) > 0.5 if hi > lo else False
                text, color = format_seconds(float(z[i, j])), "white" if dark else "black"
            size = _fit_font(text, cell_w, cell_h)
            if size is not None:
                ax.text(j, i, text, ha="center", va="center", fontsize=size, color=color, clip_on=True)
    if chosen is not None and chosen[0] in ms and chosen[1] in ps:
        ax.scatter([list(ms).index(chosen[0]) + 0.3], [list(ps).index(chosen[1]) + 0.25], marker="*", s=160, color="red",
                   edgecolors="black", label="chosen plan")
        fig.legend(fontsize=8, loc="outside lower right", frameon=False)
    _category_ticks(ax, range(len(ms)), [str(m) for m in ms])
    _category_ticks(ax, range(len(ps)), [str(p) for p in ps], axis="y")
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("pipeline depth p")
    ax.set_title("planner landscape: predicted step time")
    fig.colorbar(im, ax=ax, label=uname)
    return fig


def _fit_font(text: str, cell_w_pt: float, cell_h_pt: float, *, largest: float = 8.0, smallest: float = 4.0) -> float | None:
    """The largest font size (points) at which ``text`` fits its cell with a margin; None below ``smallest``.
    A DejaVu Sans character is at most about 0.65 em wide on average over digits and letters."""
    size = min(largest, 0.8 * cell_w_pt / (0.65 * max(1, len(text))), 0.7 * cell_h_pt)
    return size if size >= smallest else None


def _hatch(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="xx", edgecolor="#999")


def scatter_figure(predicted: Sequence[float], measured: Sequence[float], labels: Sequence[str], *, title: str) -> Figure:
    """Predicted vs measured with the y = x line (for simulator-accuracy results)."""
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    pr, me = np.asarray(predicted) * 1e3, np.asarray(measured) * 1e3
    ax.scatter(me, pr)
    for x, y, lab in zip(me, pr, labels):
        ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    lo, hi = float(min(pr.min(), me.min())) * 0.9, float(max(pr.max(), me.max())) * 1.1
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("simulated (ms)")
    ax.set_title(title)
    ax.legend()
    return fig


def grad_norm_figure(pipeline: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> Figure:
    """Per-stage gradient-norm curves ``[step][stage]``: pipeline solid, single device dashed."""
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
    n = max((len(r) for r in list(pipeline) + list(reference)), default=0)
    for s in range(n):
        c = colors[s % len(colors)]
        if pipeline:
            ax.plot(np.arange(1, len(pipeline) + 1), [r[s] for r in pipeline], color=c, lw=2, label=f"stage {s} pipeline")
        if reference:
            ax.plot(np.arange(1, len(reference) + 1), [r[s] for r in reference], color="black", ls="--", lw=0.8,
                    label=f"stage {s} single device" if s == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm (before clipping)")
    ax.set_title("per-stage gradient norms")
    ax.legend(fontsize=7)
    return fig
