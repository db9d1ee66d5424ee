"""Reports at real scale: a 32-stage, 512-micro-batch step draws fast and every label stays readable."""

from __future__ import annotations

import itertools
import math
import time

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from pipetrain.reports import charts
from pipetrain.reports.figures import is_large, phase_windows, timeline_figure, timelines_side_by_side
from pipetrain.reports.report import BREAKDOWN_PARTS, breakdown_rows
from pipetrain.simulator import fast_evaluate, uniform
from pipetrain.timeline import stage_breakdown

P, M = 32, 512
T_F, T_B = 10e-3, 20e-3


@pytest.fixture(scope="module")
def events():
    return list(fast_evaluate(uniform(P, M, "1f1b", t_fwd_s=T_F, t_bwd_s=T_B, t_comm_s=0.15e-3), events=True).events)


def _render(fig: Figure) -> RendererAgg:
    """Draw ``fig`` as the report's PNG is drawn (Agg), so text extents are the real ones."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _tick_labels(fig: Figure) -> dict[str, list[Text]]:
    """The visible, non-empty tick labels of every axis of ``fig`` (drawn), by axes and axis."""
    out = {}
    for i, ax in enumerate(fig.axes):
        for name, labels in (("x", ax.get_xticklabels()), ("y", ax.get_yticklabels())):
            lim = ax.get_xlim() if name == "x" else ax.get_ylim()
            lo, hi = min(lim), max(lim)
            ticks = ax.get_xticks() if name == "x" else ax.get_yticks()
            # labels of ticks outside the view are not drawn
            out[f"{i}{name}"] = [t for t, v in zip(labels, ticks) if t.get_text() and t.get_visible() and lo <= v <= hi]
    return out


def _assert_no_overlap(fig: Figure) -> int:
    renderer = _render(fig)
    n = 0
    for where, labels in _tick_labels(fig).items():
        boxes = [t.get_window_extent(renderer) for t in labels]
        for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels), 2):
            assert not a.overlaps(b), f"axis {where}: tick labels {ta.get_text()!r} and {tb.get_text()!r} overlap"
        n += len(labels)
    return n


def test_the_timeline_is_three_readable_phases_and_fast(events) -> None:
    assert is_large(events)
    wins = phase_windows(events)
    assert [w[0] for w in wins] == ["warm-up", "steady state (window)", "cool-down"]
    # 1F1B: the last stage's first backward starts after P forwards and P - 1 transfers: the fill ends there
    fill = P * T_F + (P - 1) * 0.15e-3
    warm, steady, cool = wins
    assert warm[1] == 0.0 and fill < warm[2] < 1.2 * fill  # the warm-up panel shows the turn into steady state
    assert warm[2] <= steady[1] < steady[2] <= cool[1] < cool[2]
    assert cool[2] == pytest.approx(max(e.end_s for e in events if e.kind not in ("SEND", "RECV")))
    t = time.perf_counter()
    fig = timeline_figure(events, title="1f1b 32 x 512")
    assert _assert_no_overlap(fig) >= 3 * 5  # three panels, each with its own time ticks
    assert len(fig.axes) == 3
    # one collection per stage and kind in each panel, never one artist per event
    assert all(len(ax.collections) <= P * 2 for ax in fig.axes)
    assert time.perf_counter() - t < 10.0


def test_the_run_reports_pair_is_two_rows_of_phases(events) -> None:
    """Simulated and measured at scale: each source its own row of three phase panels, cut at its own turns."""
    from dataclasses import replace

    slower = [replace(e, start_s=e.start_s * 1.3, end_s=e.end_s * 1.3) for e in events]  # a "measured" step 30% longer
    fig = timelines_side_by_side(events, slower, title="1f1b 32 x 512")
    assert len(fig.axes) == 6 and _assert_no_overlap(fig) >= 6 * 5
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["simulated: warm-up", "simulated: steady state (window)", "simulated: cool-down",
                      "measured: warm-up", "measured: steady state (window)", "measured: cool-down"]
    # each row's cool-down panel ends at its own step's end (in ms from its own first event)
    assert fig.axes[2].get_xlim()[1] * 1.3 == pytest.approx(fig.axes[5].get_xlim()[1], rel=1e-9)
    assert all(len(ax.collections) <= P * 2 for ax in fig.axes)


def test_breakdown_and_memory_labels_do_not_overlap(events) -> None:
    br = stage_breakdown(events, P, list(range(P)))
    # uniform stages: every stage computes M forwards and M backwards
    assert all(b.compute_s == pytest.approx(M * (T_F + T_B)) for b in br)
    # each middle stage receives 2 M transfers of 0.15 ms: at most that is on the wire, and never the wait for the sender
    assert all(b.transfer_s <= 2 * M * 0.15e-3 + 1e-9 for b in br)
    assert br[0].bubble_s > 10 * br[0].transfer_s
    _assert_no_overlap(charts.breakdown_figure({"simulated": breakdown_rows(br)}, parts=BREAKDOWN_PARTS))
    _assert_no_overlap(charts.memory_figure([36e9] * P, [35e9] * P, [80e9] * P))
    parts = {p: [float(i + 1) * 2**30 for i in range(P)] for p in charts.MEMORY_PARTS}
    _assert_no_overlap(charts.memory_stack_figure(parts, [80 * 2**30] * P))


def test_landscape_cell_text_fits_its_cell() -> None:
    ps = [1, 2, 4, 8, 16, 32, 64]
    ms = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    times = [[math.nan if (p * m) % 3 == 0 else 92.83 * p / (1 + m) + 1e-4 for m in ms] for p in ps]
    labels = [["ok" if not math.isnan(x) else "infeasible" for x in row] for row in times]
    fig = charts.landscape_figure(ms, ps, times, chosen=(512, 32), labels=labels)
    _assert_no_overlap(fig)
    ax = fig.axes[0]
    renderer = _render(fig)
    cells = [t for t in ax.texts]
    assert len(cells) >= len(ps) * len(ms) // 2  # most cells are annotated
    for t in cells:
        x, y = t.get_position()
        (x0, y0), (x1, y1) = ax.transData.transform([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)])
        box = t.get_window_extent(renderer)
        assert x0 <= box.x0 and box.x1 <= x1 and y0 <= box.y0 and box.y1 <= y1, f"{t.get_text()!r} overflows its cell"
        assert "e+" not in t.get_text() and "e-" not in t.get_text()
    # the "chosen" legend is outside the grid
    (leg,) = fig.legends
    assert not leg.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_gpipe_has_phases_too() -> None:
    evs = list(fast_evaluate(uniform(P, 128, "gpipe", t_fwd_s=T_F, t_bwd_s=T_B), events=True).events)
    assert is_large(evs)
    warm, steady, cool = phase_windows(evs)
    # GPipe fills in P forwards; the last stage starts its last backward after its 128 forwards and 127 backwards
    fill = P * T_F
    assert fill < warm[2] <= 1.1 * fill + 1e-12
    assert cool[1] == pytest.approx((P - 1) * T_F + 128 * T_F + 127 * T_B)
    assert warm[2] <= steady[1] < steady[2] <= cool[1]


def test_interleaved_timeline_has_a_row_per_gpu() -> None:
    """An interleaved step drawn per GPU: one row per rank, holding both of its virtual stages' bars."""
    p, v = 4, 2
    evs = list(fast_evaluate(uniform(p, 8, "interleaved", chunks=v, t_fwd_s=T_F, t_bwd_s=T_B, t_comm_s=0.15e-3), events=True).events)
    by_stage = timeline_figure(evs, title="interleaved")
    per_gpu = timeline_figure(evs, title="interleaved, per GPU", rows="rank")
    _assert_no_overlap(per_gpu)
    stage_rows = [t.get_text() for t in by_stage.axes[0].get_yticklabels()]
    gpu_rows = [t.get_text() for t in per_gpu.axes[0].get_yticklabels()]
    assert stage_rows == [f"stage {s}" for s in range(p * v)] and gpu_rows == [f"GPU {r}" for r in range(p)]
    # every rank row holds F and B of both its stages: as many bars as the stage rows together
    bars: dict[int, int] = {}
    for c in per_gpu.axes[0].collections:  # one collection per (row, kind)
        row = int(c.get_paths()[0].vertices[:, 1].mean() + 0.5)
        bars[row] = bars.get(row, 0) + len(c.get_paths())
    compute = [e for e in evs if e.kind in ("F", "B")]
    assert sum(bars.values()) == len(compute) and len(bars) == p
