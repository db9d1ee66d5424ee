"""The plan-only what-if report: ``pipetrain plan ... --report DIR`` (no run, no GPU needed).

``pipetrain plan`` writes the planner's outcome into DIR first: ``simulation.json`` (the simpy
simulation of the chosen plan the search already ran, :class:`~pipetrain.simulator.result.SimulationRecord`)
``landscape.json`` (:mod:`pipetrain.reports.landscape`), ``memory.json`` (:data:`MEMORY_FILE`: the
memory model's components per GPU) and ``neighbourhood.json`` (:mod:`pipetrain.reports.neighbourhood`:
throughput against micro-batch count and size around the plan). :func:`write_plan_report` reads those
files, simulates and searches nothing, and writes ``DIR/report.html`` (self-contained), one PNG per
figure, ``summary.json`` and ``trace_simulated.json``: the plan (stage table, alternatives it
beat), the simulated timeline, the simulated per-stage breakdown, memory per stage against the
cap (stacked by component per GPU when ``memory.json`` is there), the planner's landscape over (m, p)
and the throughput curves around the plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.events import write_chrome_trace
from pipetrain.plan import Plan
from pipetrain.reports import charts
from pipetrain.reports.figures import timeline_figure
from pipetrain.reports.html import Markup, Section
from pipetrain.reports.landscape import LANDSCAPE_FILE, landscape_mismatch, read_landscape
from pipetrain.reports.neighbourhood import NEIGHBOURHOOD_FILE, neighbourhood_section, read_neighbourhood
from pipetrain.reports.report import (
    BREAKDOWN_PARTS,
    BREAKDOWN_TEXT,
    FigureSink,
    ReportOutput,
    _finish,
    _mib,
    _ms,
    breakdown_dict,
    breakdown_rows,
    landscape_section,
    plan_section,
)
from pipetrain.reports.units import format_seconds
from pipetrain.serde import write_text_atomic
from pipetrain.simulator.result import SIMULATION_FILE, load_simulation
from pipetrain.timeline import stage_breakdown

__all__ = ["PLAN_SECTIONS", "MEMORY_FILE", "GpuMemory", "write_gpu_memory", "read_gpu_memory", "write_plan_report"]

PLAN_SECTIONS = ("plan", "timelines", "breakdown", "memory", "landscape", "neighbourhood")
#: the memory model's components per GPU, written by ``pipetrain plan --report DIR`` beside ``landscape.json``
MEMORY_FILE = "memory.json"


@dataclass(frozen=True, kw_only=True)
class GpuMemory:
    """The memory model's peak bytes of one pipeline rank (all its virtual stages), by component."""

    rank: int
    device: str
    stages: tuple[int, ...]
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float  # saved activations in flight (and the recompute working set)
    buffers_bytes: float  # receive buffers
    cap_bytes: float
    reserve_bytes: float = 0.0  # left free for the CUDA context, NCCL and fragmentation (on top of the cap)

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes + self.buffers_bytes


def write_gpu_memory(path: str | Path, gpus: list[GpuMemory]) -> Path:
    return write_text_atomic(path, json.dumps({"gpus": [{**vars(g), "stages": list(g.stages)} for g in gpus]}) + "\n")


def read_gpu_memory(path: str | Path) -> list[GpuMemory] | None:
    """The GPUs in ``path``; None when there is no such file; RunError (with the fix) when it is corrupt."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return [GpuMemory(rank=int(g["rank"]), device=str(g["device"]), stages=tuple(int(x) for x in g["stages"]),
                          **{k: float(g[k]) for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                                                      "activations_bytes", "buffers_bytes", "cap_bytes")},
                          reserve_bytes=float(g.get("reserve_bytes", 0.0)))
                for g in json.loads(p.read_text(encoding="utf-8"))["gpus"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{p} is corrupt ({type(exc).__name__}): delete it, or write it again with "
                       f"`pipetrain plan ... --report DIR`") from None


def write_plan_report(plan: Plan, out_dir: str | Path) -> ReportOutput:
    """Write the what-if report of ``plan`` from the planner's files in ``out_dir`` (module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sink = FigureSink(out)
    rerun = "write them again with `pipetrain plan ... --report DIR`"
    simrec = load_simulation(out / SIMULATION_FILE, error=RunError)
    land = read_landscape(out / LANDSCAPE_FILE)
    lnote = ""
    if land is None:
        lnote = f"No planner landscape: {out / LANDSCAPE_FILE} is missing; {rerun}."
    elif why := landscape_mismatch(land, plan):
        land, lnote = None, f"{out / LANDSCAPE_FILE} belongs to another job ({why}); {rerun}."
    sections = [plan_section(plan)]
    n, stage_rank = plan.num_stages, [st.rank for st in plan.stages]
    traces: list[Path] = []
    simulated: dict[str, Any] | None = None
    sim = simrec.result if simrec is not None else None
    if simrec is None or sim is None:
        note = f"Not simulated: {out / SIMULATION_FILE} is missing; {rerun}."
        sections.append(Section(id="timelines", title="Simulated timeline", paragraphs=(note,)))
        sections.append(Section(id="breakdown", title="Per-stage breakdown (simulated)", paragraphs=(note,)))
    else:
        events = list(sim.events)
        trace = write_chrome_trace(events, out / "trace_simulated.json", process_name=f"simulated ({simrec.topology})")
        traces.append(trace)
        br = stage_breakdown(events, n, stage_rank)
        sections.append(Section(
            id="timelines", title="Simulated timeline",
            paragraphs=(Markup("One simulated step on {} ({}): {}, bubble {}%, {} tokens/s. Chrome trace for Perfetto: "
                               "<code>{}</code>.").format(simrec.topology, simrec.cost_source, format_seconds(sim.step_time_s),
                                                          f"{sim.bubble_fraction * 100:.1f}", f"{sim.tokens_per_s:,.0f}", trace.name),),
            figures=(sink("timeline_simulated", "simulated step timeline", timeline_figure(events, title=f"simulated {plan.schedule}")),
                     # interleaved and V schedules put several virtual stages on a GPU: its row shows what it does
                     *((sink("timeline_per_gpu", "simulated step timeline per GPU (its virtual stages together)",
                             timeline_figure(events, title=f"simulated {plan.schedule}, per GPU", rows="rank")),)
                       if len(plan.stages) > plan.pp else ()))))
        sections.append(Section(
            id="breakdown", title="Per-stage breakdown (simulated)",
            paragraphs=(BREAKDOWN_TEXT,),
            tables=((("stage", "compute", "transfer", "collective", "bubble", "busy %"),
                     tuple((str(b.stage), _ms(b.compute_s), _ms(b.transfer_s), _ms(b.collective_s), _ms(b.bubble_s),
                            f"{b.busy_fraction * 100:.0f}") for b in br)),),
            figures=(sink("breakdown", "per-stage compute / transfer / collective / bubble (simulated)",
                          charts.breakdown_figure({"simulated": breakdown_rows(br)}, parts=BREAKDOWN_PARTS)),)))
        simulated = {"topology": simrec.topology, "cost_source": simrec.cost_source, "step_time_s": sim.step_time_s,
                     "tokens_per_s": sim.tokens_per_s, "bubble_fraction": sim.bubble_fraction, "breakdown": [breakdown_dict(b) for b in br]}
    predicted = [st.predicted_peak_memory_bytes or (float(sim.peak_memory_bytes_per_stage[st.index]) if sim is not None else 0.0)
                 for st in plan.stages]
    caps = [st.memory_cap_bytes for st in plan.stages]
    gpus = read_gpu_memory(out / MEMORY_FILE)
    figs = [sink("memory", "memory per stage: predicted and cap", charts.memory_figure(predicted, None, caps if any(caps) else None))]
    paras: tuple[str, ...] = ()
    if gpus is not None:
        parts = {"weights": [g.weights_bytes for g in gpus], "gradients": [g.gradients_bytes for g in gpus],
                 "optimizer": [g.optimizer_bytes for g in gpus], "activations": [g.activations_bytes for g in gpus],
                 "buffers": [g.buffers_bytes for g in gpus]}
        figs.append(sink("memory_components", "memory per GPU by component, against the device cap",
                         charts.memory_stack_figure(parts, [g.cap_bytes for g in gpus])))
        paras = ("Per GPU (pipeline rank, its virtual stages summed): the memory model's weights, gradients, optimizer "
                 "state, activations in flight and receive buffers, from memory.json.",)
    else:
        paras = (f"No per-GPU components: {out / MEMORY_FILE} is missing; {rerun}.",)
    sections.append(Section(
        id="memory", title="Memory per stage", paragraphs=paras,
        tables=((("stage", "predicted peak", "cap", "headroom"),
                 tuple((str(st.index), _mib(p), _mib(c) if c else "-", f"{(1 - p / c) * 100:.0f}%" if c else "-")
                       for st, p, c in zip(plan.stages, predicted, caps))),),
        figures=tuple(figs)))
    sections.append(landscape_section(land, sink, chosen=(plan.num_microbatches, plan.pp), note=lnote))
    near, nnote = read_neighbourhood(out / NEIGHBOURHOOD_FILE, plan)
    sections.append(neighbourhood_section(near, nnote, sink))
    data = {"model": plan.model, "topology": plan.topology, "pp": plan.pp, "dp": plan.dp, "schedule": plan.schedule,
            "num_microbatches": plan.num_microbatches, "micro_batch_size": plan.micro_batch_size, "simulated": simulated,
            "predicted_memory_bytes_per_stage": predicted, "memory_cap_bytes_per_stage": caps,
            "alternatives": [{"description": a.description, "step_time_s": a.step_time_s, "reason": a.reason} for a in plan.alternatives],
            "landscape": None if land is None else land.to_dict(), "neighbourhood": near,
            "memory_per_gpu": None if gpus is None else [{**vars(g), "stages": list(g.stages)} for g in gpus], "sections": [s.id for s in sections]}
    return _finish(out, f"pipetrain plan: {plan.model} on {plan.topology}", "what-if report (planned and simulated, not run)",
                   sections, sink, traces, data)
