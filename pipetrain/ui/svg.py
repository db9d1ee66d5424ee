"""SVGs the page shows, built as strings on the server: the simulated timeline and loss curves.

Why SVG strings and not matplotlib PNGs: one ``<path>`` per (rank, kind) holding every rectangle
of that kind keeps a 64-stage, 64-micro-batch timeline (about 8,000 compute spans) to a few
hundred elements and a few tens of milliseconds to build, where a figure costs a renderer's
start-up on every edit. No script, no external reference: the page inserts it as markup.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

__all__ = ["KIND_COLORS", "timeline_svg", "loss_svg"]

#: Fill per event kind (forward, input-gradient backward, weight gradient, the step's tail).
KIND_COLORS = {"F": "#4c8bd6", "B": "#e0853a", "W": "#5aa55a", "ALLREDUCE": "#9b6cc4", "OPT": "#8c8c8c"}
_LEGEND = {"F": "forward", "B": "backward", "W": "weight grad", "ALLREDUCE": "all-reduce", "OPT": "optimizer"}


def timeline_svg(events: Sequence[tuple[int, int, str, int, float, float, int]], *, num_ranks: int, span_s: float,
                 width: int = 1100) -> str:
    """One row per pipeline rank, one rectangle per compute event (simulator's raw event tuples:
    stage, rank, kind, micro-batch, start, end, bytes); SEND/RECV are not drawn (they overlap compute)."""
    left, top, bottom = 64, 8, 34
    row = max(6, min(26, 640 // max(1, num_ranks)))
    height = top + row * num_ranks + bottom
    plot_w = width - left - 36  # room for the last tick's label
    scale = plot_w / span_s if span_s > 0 else 0.0
    paths: dict[tuple[int, str], list[str]] = {}
    for _s, r, kind, _mb, a, b, _n in events:
        if kind not in KIND_COLORS:
            continue
        x = left + a * scale
        w = max(0.5, (b - a) * scale)  # a sub-pixel span stays visible (and survives rounding to 0.1 px)
        y = top + r * row + 1
        paths.setdefault((r, kind), []).append(f"M{x:.1f} {y}h{w:.1f}v{row - 2}h-{w:.1f}z")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline-svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{row * num_ranks}" fill="#f4f4f4"/>']
    label_every = max(1, num_ranks // 32)
    for r in range(0, num_ranks, label_every):
        out.append(f'<text x="{left - 4}" y="{top + r * row + row / 2 + 4:.1f}" text-anchor="end">rank {r}</text>')
    for (r, kind), ds in sorted(paths.items()):
        out.append(f'<path fill="{KIND_COLORS[kind]}" d="{"".join(ds)}"><title>rank {r}: {_LEGEND[kind]}</title></path>')
    y_axis = top + row * num_ranks
    for i in range(6):
        t = span_s * i / 5
        x = left + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{y_axis}" x2="{x:.1f}" y2="{y_axis + 4}" stroke="#333"/>'
                   f'<text x="{x:.1f}" y="{y_axis + 15}" text-anchor="middle">{t * 1e3:.4g} ms</text>')
    lx = left
    for kind, color in KIND_COLORS.items():
        out.append(f'<rect x="{lx}" y="{height - 11}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{height - 2}">{_LEGEND[kind]}</text>')
        lx += 110
    out.append("</svg>")
    return "".join(out)


def loss_svg(series: Sequence[tuple[str, str, Sequence[float]]], *, width: int = 560, height: int = 260) -> str:
    """Loss per step, one polyline per ``(label, color, values)``."""
    vals = [v for _, _, ys in series for v in ys]
    if not vals:
        return ""
    left, right, top, bottom = 56, 12, 10, 40
    lo, hi = min(vals), max(vals)
    if hi <= lo:
        hi = lo + 1.0
    n = max(len(ys) for _, _, ys in series)
    pw, ph = width - left - right, height - top - bottom

    def xy(i: int, v: float) -> str:
        x = left + (pw * i / (n - 1) if n > 1 else pw / 2)
        return f"{x:.1f},{top + ph * (1 - (v - lo) / (hi - lo)):.1f}"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#f8f8f8" stroke="#ccc"/>']
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        y = top + ph * (1 - frac)
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v:.4g}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 22}" text-anchor="middle">step (1..{n})</text>')
    lx = left
    for label, color, ys in series:
        pts = " ".join(xy(i, v) for i, v in enumerate(ys))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{pts}"/>'
                   f'<rect x="{lx}" y="{height - 12}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{height - 3}">{escape(label)}</text>')
        lx += 180
    out.append("</svg>")
    return "".join(out)
