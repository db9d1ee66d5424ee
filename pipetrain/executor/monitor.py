"""Live view of a running pipeline, fed by tailing ``RUN_DIR/telemetry/rank*.jsonl``.

The launcher process (``pipetrain run``, ``pipetrain demo``) wraps the launch in
:class:`LiveMonitor`; a background thread reads the lines the ranks append (each rank flushes
its events and one ``step`` record at the end of every step) and shows:

* the step, the loss (last stage) and tokens/s (global batch x seq-len over the step's time,
  the slowest rank's);
* per stage: busy % and bubble % of the latest complete step, p2p latency p50/p95 over the
  last :data:`WINDOW` steps (definitions in :mod:`pipetrain.timeline`);
* memory per stage: the rank's measured tensor bytes (peak so far) against the plan's prediction.

On a terminal this is a ``rich.live.Live`` table; when stdout is not a terminal (CI, logs) it
prints one plain line per step instead (at most one per ``plain_interval_s``, always the last).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.events import Event
from pipetrain.plan import Plan

__all__ = ["WINDOW", "StageStats", "Snapshot", "TelemetryTail", "Aggregator", "format_plain", "render_rich", "LiveMonitor"]

#: steps of transfers the p2p percentiles cover
WINDOW = 10


@dataclass(frozen=True, kw_only=True)
class StageStats:
    stage: int
    rank: int
    busy_fraction: float
    bubble_fraction: float
    p2p_p50_s: float | None
    p2p_p95_s: float | None
    memory_bytes: int
    predicted_memory_bytes: float


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    step: int  # 1-based count of completed steps
    total_steps: int
    loss: float | None
    step_time_s: float
    tokens_per_s: float
    stages: tuple[StageStats, ...]


class TelemetryTail:
    """Reads the records appended to every ``rank*.jsonl`` since the last poll.

    Keeps a byte offset per file and only consumes complete lines; a file that was replaced
    (new inode) or truncated is read again from the start.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / "telemetry"
        self._pos: dict[Path, tuple[int, int]] = {}  # path -> (inode, offset)

    def poll(self) -> list[dict[str, Any]]:
        import json

        out: list[dict[str, Any]] = []
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.glob("rank*.jsonl")):
            try:
                st = p.stat()
                ino, off = self._pos.get(p, (st.st_ino, 0))
                if ino != st.st_ino or st.st_size < off:
                    off = 0
                if st.st_size == off:
                    self._pos[p] = (st.st_ino, off)
                    continue
                with open(p, "rb") as f:
                    f.seek(off)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                self._pos[p] = (st.st_ino, off)
                continue
            for line in data[:end].splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
            self._pos[p] = (st.st_ino, off + end + 1)
        return out


class Aggregator:
    """Turns telemetry records into :class:`Snapshot` s (pure; fed by :class:`TelemetryTail`)."""

    def __init__(self, plan: Plan, total_steps: int) -> None:
        self.plan = plan
        self.total_steps = total_steps
        self.world = plan.world_size
        self.steps: dict[int, dict[int, dict[str, Any]]] = {}  # step -> rank -> step record
        self.events: dict[int, list[Event]] = {}  # step -> events (recent steps only)
        self.mem_peak: dict[int, int] = {}  # global rank -> peak tensor bytes so far

    def add(self, rec: Mapping[str, Any]) -> None:
        t = rec.get("type")
        if t == "event":
            try:
                e = Event.from_dict(dict(rec))
            except Exception:  # noqa: BLE001 - a malformed line is skipped, never fatal to the run
                return
            self.events.setdefault(e.step, []).append(e)
        elif t == "step":
            r, s = int(rec.get("rank", 0)), int(rec.get("step", 0))
            self.steps.setdefault(s, {})[r] = dict(rec)
            mem = int((rec.get("memory") or {}).get("tensor_bytes", 0))
            self.mem_peak[r] = max(self.mem_peak.get(r, 0), mem)

    def add_all(self, recs: list[dict[str, Any]]) -> None:
        for r in recs:
            self.add(r)

    def complete_steps(self) -> list[int]:
        return sorted(s for s, ranks in self.steps.items() if len(ranks) >= self.world)

    def snapshot(self) -> Snapshot | None:
        from pipetrain.timeline import match_transfers, percentile, stage_breakdown

        done = self.complete_steps()
        if not done:
            return None
        last = done[-1]
        for s in [s for s in self.events if s < last - WINDOW]:  # bounded memory on long runs
            del self.events[s]
        recs = self.steps[last]
        loss = next((r["loss"] for r in recs.values() if r.get("loss") is not None), None)
        step_time = max(float(r.get("step_time_s", 0.0)) for r in recs.values())
        tokens = self.plan.global_batch * self.plan.seq_len
        plan = self.plan
        n = plan.num_stages
        stage_rank = [st.rank for st in plan.stages]
        replica0 = [e for e in self.events.get(last, []) if e.rank < plan.pp]
        br = stage_breakdown(replica0, n, stage_rank)
        window = [e for s in done[-WINDOW:] for e in self.events.get(s, []) if e.rank < plan.pp]
        lat: dict[int, list[float]] = {}
        for tr in match_transfers(window, n):
            lat.setdefault(tr.dst_stage, []).append(tr.latency_s)
        pred_rank: dict[int, float] = {}
        for st in plan.stages:
            pred_rank[st.rank] = pred_rank.get(st.rank, 0.0) + st.predicted_peak_memory_bytes
        stages = tuple(StageStats(stage=s, rank=stage_rank[s], busy_fraction=br[s].busy_fraction,
                                  bubble_fraction=br[s].bubble_fraction, p2p_p50_s=percentile(lat.get(s, []), 50),
                                  p2p_p95_s=percentile(lat.get(s, []), 95), memory_bytes=self.mem_peak.get(stage_rank[s], 0),
                                  predicted_memory_bytes=pred_rank.get(stage_rank[s], 0.0)) for s in range(n))
        return Snapshot(step=last + 1, total_steps=self.total_steps, loss=loss, step_time_s=step_time,
                        tokens_per_s=tokens / step_time if step_time > 0 else 0.0, stages=stages)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f} ms"


def _mib(x: float) -> str:
    return f"{x / (1 << 20):.1f} MiB"


def format_plain(s: Snapshot) -> str:
    """One log line: step, loss, tokens/s, then per stage busy/bubble/p2p/memory."""
    loss = "-" if s.loss is None else f"{s.loss:.4f}"
    head = f"step {s.step}/{s.total_steps}  loss {loss}  {s.tokens_per_s:,.0f} tok/s  {s.step_time_s * 1e3:.1f} ms"
    parts = [f"s{st.stage} busy {st.busy_fraction * 100:.0f}% bubble {st.bubble_fraction * 100:.0f}% "
             f"p2p p50 {_ms(st.p2p_p50_s)} p95 {_ms(st.p2p_p95_s)} mem {_mib(st.memory_bytes)}/{_mib(st.predicted_memory_bytes)} pred"
             for st in s.stages]
    return "  | ".join([head, *parts])


def render_rich(s: Snapshot, title: str = "pipetrain run") -> Any:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    loss = "-" if s.loss is None else f"{s.loss:.4f}"
    head = Text.from_markup(f"[bold]{title}[/]  step [bold]{s.step}[/]/{s.total_steps}   loss [bold]{loss}[/]   "
                            f"[bold]{s.tokens_per_s:,.0f}[/] tokens/s   step {s.step_time_s * 1e3:.1f} ms")
    t = Table(show_edge=False)
    for col in ("stage", "rank", "busy %", "bubble %", "p2p p50", "p2p p95", "memory", "predicted", "meas/pred"):
        t.add_column(col, justify="right")
    for st in s.stages:
        ratio = f"{st.memory_bytes / st.predicted_memory_bytes:.2f}x" if st.predicted_memory_bytes > 0 else "-"
        t.add_row(str(st.stage), str(st.rank), f"{st.busy_fraction * 100:.0f}", f"{st.bubble_fraction * 100:.0f}",
                  _ms(st.p2p_p50_s), _ms(st.p2p_p95_s), _mib(st.memory_bytes), _mib(st.predicted_memory_bytes), ratio)
    bar = Table.grid()
    bar.add_row(ProgressBar(total=max(1, s.total_steps), completed=s.step, width=60))
    return Group(head, bar, t)


class LiveMonitor:
    """Context manager showing the live view while the block runs (see module docstring)."""

    def __init__(self, run_dir: str | Path, plan: Plan, total_steps: int, *, console: Any = None,
                 interactive: bool | None = None, interval_s: float = 0.5, plain_interval_s: float = 1.0,
                 title: str = "pipetrain run") -> None:
        from rich.console import Console

        self.console = console or Console()
        self.interactive = self.console.is_terminal if interactive is None else interactive
        if os.environ.get("CI"):
            self.interactive = False if interactive is None else interactive
        self.tail = TelemetryTail(run_dir)
        self.agg = Aggregator(plan, total_steps)
        self.interval_s = interval_s
        self.plain_interval_s = plain_interval_s
        self.title = title
        self.lines_printed = 0
        self.last: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None
        self._last_plain_step = 0
        self._last_plain_t = 0.0

    def update(self, *, final: bool = False) -> Snapshot | None:
        """Read new telemetry and refresh the view (called by the thread; safe to call directly)."""
        self.agg.add_all(self.tail.poll())
        snap = self.agg.snapshot()
        if snap is None:
            return None
        new = self.last is None or snap.step != self.last.step
        self.last = snap
        if self._live is not None:
            self._live.update(render_rich(snap, self.title))
        elif not self.interactive and snap.step > self._last_plain_step:
            now = time.monotonic()
            if final or now - self._last_plain_t >= self.plain_interval_s or snap.step == snap.total_steps:
                self.console.print(format_plain(snap), soft_wrap=True, highlight=False)
                self.lines_printed += 1
                self._last_plain_step = snap.step
                self._last_plain_t = now
        return snap if new else None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update()
            except Exception:  # noqa: BLE001 - the view must never take the run down
                continue

    def __enter__(self) -> LiveMonitor:
        if self.interactive:
            from rich.live import Live
            from rich.text import Text

            self._live = Live(Text(f"{self.title}: starting workers ..."), console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        self._thread = threading.Thread(target=self._loop, name="pipetrain-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.update(final=True)
        finally:
            if self._live is not None:
                self._live.__exit__(None, None, None)
                self._live = None
