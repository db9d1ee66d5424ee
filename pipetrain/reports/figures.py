"""Timeline figures from lists of Events, simulated or measured (matplotlib Figure API).

Both ``SimResult`` and ``RunResult`` are lists of :class:`~pipetrain.events.Event`, so one
function draws either; :func:`timelines_side_by_side` puts a simulated and a measured step
on a shared time axis, one row per stage, F/B/W coloured and micro-batches labelled.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipetrain.events import Event

__all__ = ["KIND_COLORS", "draw_timeline", "timeline_figure", "timelines_side_by_side"]

KIND_COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868", "SEND": "#8172B3", "RECV": "#937860",
               "ALLREDUCE": "#C44E52", "OPT": "#8C8C8C"}
_COMPUTE = ("F", "B", "W", "ALLREDUCE", "OPT")


def draw_timeline(ax: Axes, events: Sequence[Event], *, title: str, label_microbatches: bool = True,
                  time_unit_s: float = 1e-3) -> None:
    """Draw compute events (one row per stage, stage 0 on top) into ``ax``; times in ms."""
    evs = [e for e in events if e.kind in _COMPUTE]
    if not evs:
        ax.text(0.5, 0.5, "no events", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    t0 = min(e.start_s for e in evs)
    stages = sorted({e.stage for e in evs})
    row = {s: i for i, s in enumerate(stages)}
    span = max(e.end_s for e in evs) - t0
    for e in evs:
        x = (e.start_s - t0) / time_unit_s
        w = max(e.duration_s / time_unit_s, 1e-9)
        y = row[e.stage]
        ax.broken_barh([(x, w)], (y - 0.4, 0.8), facecolors=KIND_COLORS[e.kind], edgecolors="white", linewidth=0.4)
        if label_microbatches and e.microbatch >= 0 and e.duration_s > span / 60:
            ax.text(x + w / 2, y, str(e.microbatch), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(stages)), [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    handles = [ax.bar(0, 0, color=KIND_COLORS[k], label=k) for k in _COMPUTE if any(e.kind == k for e in evs)]
    if handles:
        ax.legend(loc="upper right", fontsize=7, ncols=len(handles))


def timeline_figure(events: Sequence[Event], *, title: str) -> Figure:
    fig = Figure(figsize=(10, 1.2 + 0.5 * max(1, len({e.stage for e in events}))), layout="constrained")
    draw_timeline(fig.add_subplot(), events, title=title)
    return fig


def timelines_side_by_side(simulated: Sequence[Event], measured: Sequence[Event], *, title: str = "") -> Figure:
    """Simulated (left) and measured (right) step timelines with a shared time axis."""
    n = max(1, len({e.stage for e in list(simulated) + list(measured)}))
    fig = Figure(figsize=(14, 1.4 + 0.55 * n), layout="constrained")
    ax_sim, ax_run = fig.subplots(1, 2, sharex=True, sharey=False)
    draw_timeline(ax_sim, simulated, title="simulated")
    draw_timeline(ax_run, measured, title="measured")
    if title:
        fig.suptitle(title)
    return fig
