"""Timeline figures from lists of Events, simulated or measured (matplotlib Figure API).

Both ``SimResult`` and ``RunResult`` are lists of :class:`~pipetrain.events.Event`, so one
function draws either; :func:`timelines_side_by_side` puts a simulated and a measured step
on a shared time axis, one row per stage, F/B/W coloured and micro-batches labelled.

Drawing cost is one ``broken_barh`` (one PolyCollection) per stage and event kind, never one
artist per event: each separate bar re-ran the axes' autoscaling, so a 32-stage, 512-micro-batch
step cost time quadratic in its events. A step that large (:func:`is_large`) is also unreadable
as one strip, so :func:`timeline_figure` draws it as three panels: warm-up, a window of the
steady state, cool-down (:func:`phase_windows`); the whole step stays in the Chrome trace. The
run report's simulated-and-measured pair does the same, a row of phases per source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipetrain.events import Event
from pipetrain.reports.units import seconds_unit

__all__ = ["KIND_COLORS", "LARGE_EVENTS", "draw_timeline", "is_large", "phase_windows", "timeline_figure",
           "timelines_side_by_side"]

KIND_COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868", "SEND": "#8172B3", "RECV": "#937860",
               "ALLREDUCE": "#C44E52", "OPT": "#8C8C8C"}
_COMPUTE = ("F", "B", "W", "ALLREDUCE", "OPT")
#: above this many compute events (or 16 stages x 64 micro-batches) one strip is a grey hash: draw phases
LARGE_EVENTS = 2000
#: micro-batch numbers only where a bar is wide enough to hold one and there are few enough to read
_LABEL_MAX_EVENTS = 400
#: at most this many stage labels on the y axis (about one per 0.2 inch at the heights used here)
_MAX_STAGE_LABELS = 16


def _compute(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if e.kind in _COMPUTE]


def is_large(events: Sequence[Event]) -> bool:
    """Whether a step is too dense for one strip (module docstring)."""
    evs = _compute(events)
    stages = len({e.stage for e in evs})
    mbs = len({e.microbatch for e in evs if e.microbatch >= 0})
    return len(evs) > LARGE_EVENTS or (stages > 16 and mbs > 64)


def phase_windows(events: Sequence[Event]) -> list[tuple[str, float, float]]:
    """(name, start_s, end_s) of warm-up, a steady-state window and cool-down, from the schedule's events.

    Warm-up ends where the last stage starts its first backward (before that the pipeline fills);
    cool-down starts where the first stage starts its last forward (after that it drains). A
    schedule that runs every forward before any backward (GPipe) has no such turn; there the fill
    ends with the last stage's first forward and the drain starts with its last backward. The
    steady window is as long as the shorter of the two, centred between them, so its bars are as
    wide as theirs. A step without that structure (no backward) gets one window, the whole step.
    """
    evs = _compute(events)
    if not evs:
        return []
    t0, t1 = min(e.start_s for e in evs), max(e.end_s for e in evs)
    last, first = max(e.stage for e in evs), min(e.stage for e in evs)
    b_last = [e.start_s for e in evs if e.stage == last and e.kind == "B"]
    f_first = [e.start_s for e in evs if e.stage == first and e.kind == "F"]
    if not b_last or not f_first:
        return [("step", t0, t1)]
    warm_end, cool_start = min(b_last), max(f_first)
    if not t0 < warm_end < cool_start < t1:
        # all forwards before any backward (GPipe): the fill ends when the last stage finishes its first
        # forward, the drain starts when it starts its last backward
        warm_end = min(e.end_s for e in evs if e.stage == last and e.kind == "F") if any(
            e.stage == last and e.kind == "F" for e in evs) else t0
        cool_start = max(b_last)
        if not t0 < warm_end < cool_start < t1:
            return [("step", t0, t1)]
    width = min(warm_end - t0, t1 - cool_start)
    mid = (warm_end + cool_start) / 2
    lo, hi = max(warm_end, mid - width / 2), min(cool_start, mid + width / 2)
    # warm-up shows the first backward on the last stage too, so the turn from fill to steady state is visible
    return [("warm-up", t0, min(warm_end + width * 0.1, cool_start)), ("steady state (window)", lo, hi),
            ("cool-down", cool_start, t1)]


def draw_timeline(ax: Axes, events: Sequence[Event], *, title: str, label_microbatches: bool = True,
                  time_unit_s: float | None = None, window: tuple[float, float] | None = None,
                  origin_s: float | None = None, legend: bool = True, rows: str = "stage") -> None:
    """Draw compute events (one row per stage, stage 0 on top; ``rows="rank"``: one row per GPU,
    which for interleaved and V schedules holds several virtual stages) into ``ax``.

    ``window`` (absolute start, end in seconds) limits the drawing to the events inside it; times
    are shown from ``origin_s`` (default: the first event) in ``time_unit_s`` (default: a unit that
    suits the span).
    """
    if rows not in ("stage", "rank"):
        raise ValueError(f"rows must be 'stage' or 'rank', got {rows!r}")
    key = (lambda e: e.rank) if rows == "rank" else (lambda e: e.stage)
    label = "GPU" if rows == "rank" else "stage"
    evs = _compute(events)
    if not evs:
        ax.text(0.5, 0.5, "no events", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    t0 = min(e.start_s for e in evs) if origin_s is None else origin_s
    stages = sorted({key(e) for e in evs})
    row = {s: i for i, s in enumerate(stages)}
    lo, hi = window if window is not None else (min(e.start_s for e in evs), max(e.end_s for e in evs))
    shown = [e for e in evs if e.end_s >= lo and e.start_s <= hi]
    unit, uname = seconds_unit(hi - lo) if time_unit_s is None else (time_unit_s, _unit_name(time_unit_s))
    groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in shown:
        groups.setdefault((key(e), e.kind), []).append(((e.start_s - t0) / unit, max(e.duration_s / unit, 1e-9)))
    lw = 0.4 if len(shown) <= _LABEL_MAX_EVENTS else 0.0  # white edges on thousands of bars would grey them out
    for (stage, kind), bars in groups.items():
        ax.broken_barh(bars, (row[stage] - 0.4, 0.8), facecolors=KIND_COLORS[kind], edgecolors="white", linewidth=lw)
    if label_microbatches and len(shown) <= _LABEL_MAX_EVENTS:
        for e in shown:
            if e.microbatch >= 0 and e.duration_s > (hi - lo) / 60:
                ax.text((e.start_s + e.end_s) / 2 / unit - t0 / unit, row[key(e)], str(e.microbatch), ha="center",
                        va="center", fontsize=6, color="white", clip_on=True)
    ax.set_xlim((lo - t0) / unit, (hi - t0) / unit)
    ax.set_ylim(len(stages) - 0.5, -0.5)  # stage 0 on top
    k = max(1, math.ceil(len(stages) / _MAX_STAGE_LABELS))
    ax.set_yticks(range(0, len(stages), k), [f"{label} {stages[i]}" for i in range(0, len(stages), k)], fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(f"time ({uname})")
    ax.set_title(title, fontsize=9)
    if legend:
        kinds = [k_ for k_ in _COMPUTE if any(e.kind == k_ for e in evs)]
        handles = [ax.bar(0, 0, color=KIND_COLORS[k_], label=k_) for k_ in kinds]
        fig = ax.get_figure()
        if handles and isinstance(fig, Figure):  # above the axes, not over the bars
            fig.legend(handles=handles, loc="outside upper right", fontsize=7, ncols=len(handles), frameon=False)


def _unit_name(scale: float) -> str:
    return {1.0: "s", 1e-3: "ms", 1e-6: "us", 1e-9: "ns"}.get(scale, f"x{scale:g} s")


def timeline_figure(events: Sequence[Event], *, title: str, rows: str = "stage") -> Figure:
    """One step's timeline (a row per stage, or per GPU: ``rows``); a large step (:func:`is_large`)
    as three phase panels (module docstring)."""
    n = max(1, len({e.rank if rows == "rank" else e.stage for e in events if e.kind in _COMPUTE}))
    height = 1.6 + min(0.5 * n, 7.0)
    if not is_large(events):
        fig = Figure(figsize=(10, height), layout="constrained")
        draw_timeline(fig.add_subplot(), events, title=title, rows=rows)
        return fig
    wins = phase_windows(events)
    fig = Figure(figsize=(15, height), layout="constrained")
    axes = fig.subplots(1, len(wins), sharey=True, squeeze=False)[0]
    t0 = min(e.start_s for e in _compute(events))
    for i, (ax, (name, lo, hi)) in enumerate(zip(axes, wins)):
        draw_timeline(ax, events, title=name, window=(lo, hi), origin_s=t0, legend=i == 0, rows=rows)
    fig.suptitle(f"{title} (full step in the Chrome trace)", fontsize=10)
    return fig


def timelines_side_by_side(simulated: Sequence[Event], measured: Sequence[Event], *, title: str = "") -> Figure:
    """Simulated (left) and measured (right) step timelines with a shared time axis; a large step
    (:func:`is_large`) as two rows, simulated over measured, of the three phase panels of each."""
    if is_large(simulated) or is_large(measured):
        return _phase_rows({"simulated": simulated, "measured": measured}, title=title)
    n = max(1, len({e.stage for e in list(simulated) + list(measured)}))
    fig = Figure(figsize=(14, 1.6 + min(0.55 * n, 7.0)), layout="constrained")
    ax_sim, ax_run = fig.subplots(1, 2, sharex=True, sharey=False)
    evs = _compute(list(simulated) + list(measured))
    span = max((e.end_s for e in evs), default=1.0) - min((e.start_s for e in evs), default=0.0)
    unit = seconds_unit(span)[0]  # one unit for both: the axis is shared
    draw_timeline(ax_sim, simulated, title="simulated", time_unit_s=unit)
    draw_timeline(ax_run, measured, title="measured", time_unit_s=unit, legend=False)
    # each panel set its own limits; the shared axis must hold the longer of the two steps
    ax_sim.set_xlim(0.0, max(ax_sim.get_xlim()[1], ax_run.get_xlim()[1]))
    if title:
        fig.suptitle(title)
    return fig


def _phase_rows(sources: dict[str, Sequence[Event]], *, title: str) -> Figure:
    """One row per source, each cut into its own phase windows (:func:`phase_windows`: the simulated
    and the measured step turn from fill to steady state at different times) and timed from its
    own first event."""
    rows = {k: v for k, v in sources.items() if _compute(v)}
    n = max(1, max((len({e.stage for e in _compute(v)}) for v in rows.values()), default=1))
    per_row = 1.2 + min(0.45 * n, 6.0)
    cols = max((len(phase_windows(v)) for v in rows.values()), default=1)
    fig = Figure(figsize=(15, 0.6 + per_row * max(1, len(rows))), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), cols, squeeze=False)
    for r, (name, evs) in enumerate(rows.items()):
        wins = phase_windows(evs)
        t0 = min(e.start_s for e in _compute(evs))
        unit = seconds_unit(max(e.end_s for e in _compute(evs)) - t0)[0]  # one unit along a row: it is one step
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(wins):
                ax.set_axis_off()
                continue
            phase, lo, hi = wins[c]
            draw_timeline(ax, evs, title=f"{name}: {phase}", window=(lo, hi), origin_s=t0, time_unit_s=unit,
                          legend=r == 0 and c == 0)
    fig.suptitle(f"{title} (full steps in the Chrome traces)".strip(), fontsize=10)
    return fig
