"""The plan-only what-if report: ``pipetrain plan ... --report DIR`` (no run, no GPU needed).

:func:`write_plan_report` takes the planner's outcome (the Plan and the SearchResult it came
from) and writes ``DIR/report.html`` (self-contained), one PNG per figure, ``summary.json`` and
``trace_simulated.json``: the plan (stage table, alternatives it beat), the simulated timeline,
the simulated per-stage breakdown, memory per stage against the cap, and the planner's
landscape over (m, p).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipetrain.events import write_chrome_trace
from pipetrain.reports.html import Section

__all__ = ["PLAN_SECTIONS", "write_plan_report"]

PLAN_SECTIONS = ("plan", "timelines", "breakdown", "memory", "landscape")


def write_plan_report(outcome: Any, out_dir: str | Path) -> Any:
    """Write the what-if report of ``outcome`` (a PlanOutcome: ``.plan``, ``.result``, ``.unpinned``)."""
    from pipetrain.planner.explain import plan_sim_input
    from pipetrain.reports import charts
    from pipetrain.reports.analysis import stage_breakdown
    from pipetrain.reports.figures import timeline_figure
    from pipetrain.reports.landscape import landscape_from_search
    from pipetrain.reports.report import FigureSink, _finish, _mib, _ms, landscape_section, plan_section
    from pipetrain.simulator import simulate

    plan, res = outcome.plan, outcome.result
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sink = FigureSink(out)
    sim = simulate(plan_sim_input(plan, graph=res.graph(), topology=res.topology))
    events = list(sim.events)
    trace = write_chrome_trace(events, out / "trace_simulated.json", process_name=f"simulated ({plan.topology})")
    n, stage_rank = plan.num_stages, [st.rank for st in plan.stages]
    br = stage_breakdown(events, n, stage_rank)
    search = outcome.unpinned or res
    land = landscape_from_search(search, chosen=(plan.num_microbatches, plan.pp),
                                 source="planner search with every knob free" if outcome.unpinned is not None else
                                 "planner search under your pinned knobs")
    sections = [plan_section(plan)]
    sections.append(Section(
        id="timelines", title="Simulated timeline",
        paragraphs=(f"One simulated step on {plan.topology}: {sim.step_time_s * 1e3:.4g} ms, bubble {sim.bubble_fraction * 100:.1f}%, "
                    f"{sim.tokens_per_s:,.0f} tokens/s. Chrome trace for Perfetto: <code>{trace.name}</code>.",),
        figures=(sink("timeline_simulated", "simulated step timeline", timeline_figure(events, title=f"simulated {plan.schedule}")),)))
    sections.append(Section(
        id="breakdown", title="Per-stage breakdown (simulated)",
        tables=((("stage", "compute", "communication", "bubble", "busy %"),
                 tuple((str(b.stage), _ms(b.compute_s), _ms(b.comm_s), _ms(b.bubble_s), f"{b.busy_fraction * 100:.0f}") for b in br)),),
        figures=(sink("breakdown", "per-stage compute / communication / bubble (simulated)",
                      charts.breakdown_figure({"simulated": [(b.compute_s, b.comm_s, b.bubble_s) for b in br]},
                                              parts=("compute", "communication", "bubble"))),)))
    predicted = [st.predicted_peak_memory_bytes or sim.peak_memory_bytes_per_stage[st.index] for st in plan.stages]
    caps = [st.memory_cap_bytes for st in plan.stages]
    sections.append(Section(
        id="memory", title="Memory per stage",
        tables=((("stage", "predicted peak", "cap", "headroom"),
                 tuple((str(st.index), _mib(p), _mib(c) if c else "-", f"{(1 - p / c) * 100:.0f}%" if c else "-")
                       for st, p, c in zip(plan.stages, predicted, caps))),),
        figures=(sink("memory", "memory per stage: predicted and cap", charts.memory_figure(predicted, None, caps if any(caps) else None)),)))
    sections.append(landscape_section(land, sink))
    data = {"model": plan.model, "topology": plan.topology, "pp": plan.pp, "dp": plan.dp, "schedule": plan.schedule,
            "num_microbatches": plan.num_microbatches, "micro_batch_size": plan.micro_batch_size,
            "simulated": {"step_time_s": sim.step_time_s, "tokens_per_s": sim.tokens_per_s, "bubble_fraction": sim.bubble_fraction,
                          "breakdown": [vars(b) for b in br]},
            "predicted_memory_bytes_per_stage": predicted, "memory_cap_bytes_per_stage": caps,
            "alternatives": [{"description": a.description, "step_time_s": a.step_time_s, "reason": a.reason} for a in plan.alternatives],
            "landscape": land.to_dict(), "sections": [s.id for s in sections]}
    return _finish(out, f"pipetrain plan: {plan.model} on {plan.topology}", "what-if report (planned and simulated, not run)",
                   sections, sink, (trace,), data)
