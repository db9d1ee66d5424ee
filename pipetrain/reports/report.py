"""The run report: one self-contained ``report.html`` + PNGs + ``summary.json`` + Chrome traces.

:func:`write_run_report` only reads what a finished run directory holds (:mod:`pipetrain.reports.rundir`):
it never trains, validates, searches or simulates. It writes sections (ids in :data:`RUN_SECTIONS`):
the plan (stage table and the alternatives it beat), timelines (simulated and measured side by
side), per-stage breakdown (compute, transfer, collective, bubble; simulated against measured,
definitions in :mod:`pipetrain.timeline`), step time, the simulator's accuracy for the run
(``fidelity.json``, when there), memory per stage (predicted, measured, cap), convergence
(pipeline vs single-device loss, difference on a log scale, per-stage gradient norms), parameter
consistency per stage, and the planner's landscape over (m, p). A file the run lacks
(``simulation.json``, ``validation.json``, the landscape) turns its section into a note naming
the command that writes it. The plan-only what-if report lives in
:mod:`pipetrain.reports.plan_report` and shares the helpers here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from pipetrain.errors import ConfigError, RunError
from pipetrain.events import write_chrome_trace
from pipetrain.plan import Plan
from pipetrain.reports import charts
from pipetrain.reports.figures import timeline_figure, timelines_side_by_side
from pipetrain.reports.html import Markup, Section, figure_png, write_report
from pipetrain.reports.landscape import Landscape, find_run_landscape
from pipetrain.reports.rundir import FIDELITY_FILE, ValidationView, read_fidelity, read_run_dir, read_run_simulation, read_validation
from pipetrain.reports.units import format_bytes, format_seconds
from pipetrain.timeline import events_from_records, events_of_step, pick_step, read_telemetry, stage_breakdown

__all__ = ["RUN_SECTIONS", "ReportOutput", "write_run_report", "check_report", "plan_section", "landscape_section",
           "fidelity_section", "FigureSink"]

RUN_SECTIONS = ("plan", "timelines", "breakdown", "step-time", "memory", "convergence", "parameters", "landscape")
_MIB = float(1 << 20)
#: the parts of a stage's step, as :func:`pipetrain.timeline.stage_breakdown` splits it
BREAKDOWN_PARTS = ("compute", "transfer", "collective", "bubble")
BREAKDOWN_TEXT = ("Compute is the stage's F/B/W time; transfer the idle time while a transfer to it was on the wire (both "
                  "ends engaged: not the wait for the sender to compute, which a receive posted early also spans); "
                  "collective the idle time in an all-reduce; bubble the rest of its rank's idle time in the step, waiting "
                  "for a peer.")


def breakdown_rows(br: Sequence[Any]) -> list[tuple[float, float, float, float]]:
    """The chart's rows of a :func:`~pipetrain.timeline.stage_breakdown`, in :data:`BREAKDOWN_PARTS` order."""
    return [(b.compute_s, b.transfer_s, b.collective_s, b.bubble_s) for b in br]


def breakdown_dict(b: Any) -> dict[str, Any]:
    """One stage's breakdown for summary.json (``comm_s`` too: transfer + collective, as before the split)."""
    return {**vars(b), "comm_s": b.comm_s}


@dataclass(frozen=True, kw_only=True)
class ReportOutput:
    html: Path
    summary: Path
    pngs: tuple[Path, ...]
    traces: tuple[Path, ...]
    data: dict[str, Any]


class FigureSink:
    """Renders each figure once: PNG file in the output directory and bytes for the HTML."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.paths: list[Path] = []

    def __call__(self, name: str, caption: str, fig: Figure) -> tuple[str, bytes]:
        png = figure_png(fig)
        p = self.out_dir / f"{name}.png"
        p.write_bytes(png)
        self.paths.append(p)
        return caption, png


def _mib(x: float) -> str:
    """Bytes in the unit that suits them ("35.6 GiB", "512 MiB"): the name predates the units module."""
    return format_bytes(x)


def _ms(x: float | None) -> str:
    """Seconds in the unit that suits them ("92.8 s", "12.3 ms"): the name predates the units module."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format_seconds(x)


def plan_section(plan: Plan, *, note: str = "") -> Section:
    rows = []
    for st in plan.stages:
        rows.append((str(st.index), str(st.rank), st.device, f"{st.block_start}-{st.block_end - 1}", str(st.num_blocks),
                     str(st.buffers), "yes" if st.recompute else "no",
                     _mib(st.predicted_peak_memory_bytes) if st.predicted_peak_memory_bytes else "-",
                     _mib(st.memory_cap_bytes) if st.memory_cap_bytes else "-"))
    head = ("stage", "rank", "device", "blocks", "# blocks", "buffers", "recompute", "predicted peak", "cap")
    tables: list[tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]] = [(head, tuple(rows))]
    if plan.alternatives:
        tables.append((("alternative", "step time", "why it lost"),
                       tuple((a.description, _ms(a.step_time_s), a.reason)
                             for a in plan.alternatives)))
    sched = f"interleaved (v={plan.chunks})" if plan.schedule == "interleaved" else plan.schedule
    # Markup.format escapes every value it formats in: the model and topology names are the user's
    paras: list[str] = [Markup("<b>{}</b> on <b>{}</b>: pp={} x dp={}, {}, micro-batch {} x m={} (global batch {}), seq-len {}, "
                               "{}, {}, seed {}.").format(plan.model, plan.topology, plan.pp, plan.dp, sched, plan.micro_batch_size,
                                                          plan.num_microbatches, plan.global_batch, plan.seq_len, plan.dtype,
                                                          plan.optimizer, plan.seed)]
    if plan.predicted is not None:
        p = plan.predicted
        paras.append(f"Planner's prediction: step {_ms(p.step_time_s)}, {p.tokens_per_s:,.0f} tokens/s, "
                     f"bubble {p.bubble_fraction * 100:.1f}%, MFU {p.mfu * 100:.1f}%.")
    paras.append("Alternatives it beat are listed below." if plan.alternatives else
                 "This plan was not made by the planner's search, so it records no alternatives.")
    if note:
        paras.append(note)
    return Section(id="plan", title="The plan", paragraphs=tuple(paras), tables=tuple(tables))


def landscape_section(land: Landscape | None, sink: FigureSink, *, chosen: tuple[int, int] | None = None, note: str = "") -> Section:
    """The planner's landscape, starred at ``chosen`` (m, p) (default: the plan the landscape was written with)."""
    if land is None:
        return Section(id="landscape", title="Planner landscape", paragraphs=(note or "The planner wrote no landscape for this plan.",))
    fig = charts.landscape_figure(land.ms, land.ps, land.step_time_s, chosen=chosen or land.chosen, labels=land.status)
    paras = [f"Predicted step time (fast evaluator, best over micro-batch size, dp and schedule) for every pipeline depth p "
             f"and micro-batch count m, as the planner's search priced them; hatched cells have no step time (infeasible: no plan "
             f"fits; pruned: skipped by the search's branch and bound, as its lower bound already exceeded the best, or not a point "
             f"of the grid); the star is this plan. {land.feasible_points} feasible (p, m) points. {land.source}"]
    if note:
        paras.append(note)
    return Section(id="landscape", title="Planner landscape", paragraphs=tuple(paras),
                   figures=(sink("landscape", "planner landscape: predicted step time vs m and p", fig),))


def fidelity_section(d: dict[str, Any], *, where: str = FIDELITY_FILE) -> Section:
    """Simulated against measured per stage, from ``fidelity.json`` (written by ``pipetrain run``)."""
    head: tuple[str, ...] = ("stage", "rank", "busy sim", "busy meas", "error", "bubble sim", "bubble meas", "diff", "activations sim",
                             "activations meas", "error")
    # tensor parallelism / ZeRO: their collectives per step (older fidelity files have no such columns)
    stages = d.get("stages") if isinstance(d, dict) else None
    comm = [w for w in ("tp", "zero") if stages and isinstance(stages[0], dict) and f"sim_{w}_comm_s" in stages[0]]
    for w in comm:
        head += (f"{w} comm sim", f"{w} comm meas", "error")
    try:
        rows = tuple((str(s["stage"]), str(s["rank"]), f"{s['sim_busy_s'] * 1e3:.2f} ms", f"{s['meas_busy_s'] * 1e3:.2f} ms",
                      f"{s['busy_error'] * 100:+.1f}%", f"{s['sim_bubble'] * 100:.1f}%", f"{s['meas_bubble'] * 100:.1f}%",
                      f"{(s['sim_bubble'] - s['meas_bubble']) * 100:+.1f} pp", f"{s['sim_activation_bytes'] / 2**20:.2f} MiB",
                      f"{s['meas_activation_bytes'] / 2**20:.2f} MiB", f"{s['activation_error'] * 100:+.1f}%")
                     + tuple(f"{s[f'{side}_{what}_comm_s'] * 1e3:.2f} ms" if side != "err" else f"{s[f'{what}_comm_error'] * 100:+.1f}%"
                             for what in comm for side in ("sim", "meas", "err"))
                     for s in d["stages"])
        para = (f"Simulated with {d['cost_source']} against the median of {d['steps_measured']} measured steps after warm-up: "
                f"step time {d['sim_step_s'] * 1e3:.2f} ms simulated vs {d['meas_step_s'] * 1e3:.2f} ms measured "
                f"(error {d['step_error'] * 100:+.1f}%); pipeline span {d['sim_pipeline_s'] * 1e3:.2f} vs "
                f"{d['meas_pipeline_s'] * 1e3:.2f} ms; bubble {d['sim_bubble'] * 100:.1f}% vs {d['meas_bubble'] * 100:.1f}%. "
                "Errors are (simulated - measured) / measured; activations are the bytes autograd saves for backward at the "
                "stage's peak of micro-batches in flight.")
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{where} is corrupt ({type(exc).__name__}: {exc}): delete it and re-run `pipetrain run`") from None
    return Section(id="fidelity", title="Simulator accuracy for this run", paragraphs=(para,), tables=((head, rows),))


def _validation_sections(v: ValidationView | None, vnote: str, losses: Sequence[float], sink: FigureSink) -> list[Section]:
    if v is None:
        return [Section(id="convergence", title="Convergence", paragraphs=(vnote,),
                        figures=(sink("convergence", "pipeline loss (no single-device run)", charts.convergence_figure(losses, [])),)),
                Section(id="parameters", title="Parameter consistency per stage", paragraphs=(vnote,))]
    verdict = Markup("<span class='pass'>PASSED</span>") if v.passed else Markup("<span class='fail'>FAILED</span>")
    paras: list[str] = [
        Markup("Validation {} against one device trained on the same data, seed and {} steps: max loss relative difference {} "
               "(tolerance {}), gradient norms within {}.").format(verdict, v.steps, f"{v.max_loss_rel_diff:.2e}",
                                                                   f"{v.tolerances['loss_rtol']:g}", f"{v.tolerances['grad_norm_rtol']:g}"),
        f"Throughput: {v.throughput} ({v.pipeline_tokens_per_s:,.0f} vs {v.reference_tokens_per_s:,.0f} tokens/s)."]
    paras.extend(v.messages)
    figs = [sink("convergence", "loss: pipeline vs single device, and |difference| (log scale)",
                 charts.convergence_figure(v.pipeline_loss, v.reference_loss))]
    if v.pipeline_stage_grad_norms:
        figs.append(sink("grad_norms", "per-stage gradient norms: pipeline vs single device",
                         charts.grad_norm_figure(v.pipeline_stage_grad_norms, v.reference_stage_grad_norms)))
    tol = v.tolerances["param_atol"]
    return [
        Section(id="convergence", title="Convergence", paragraphs=tuple(paras), figures=tuple(figs)),
        Section(id="parameters", title="Parameter consistency per stage",
                paragraphs=(f"Final weights of every stage against the single-device run (a stage fails when both max-abs > "
                            f"{tol:g} and relative > {v.tolerances['param_rtol']:g}).",),
                tables=((("stage", "max |Δ|", "relative ‖Δ‖/‖p‖"),
                         tuple((str(s), f"{a:.3e}", f"{r:.3e}") for s, (a, r) in enumerate(zip(v.param_max_abs_diff, v.param_rel_diff)))),),
                figures=(sink("parameters", "final parameters vs single device, per stage",
                              charts.param_consistency_figure(v.param_max_abs_diff, v.param_rel_diff, tol)),))]


def write_run_report(run_dir: str | Path, *, out_dir: str | Path | None = None,
                     progress: Callable[[str], None] | None = None) -> ReportOutput:
    """Write the run report of ``run_dir`` (module docstring); RunError on a missing/corrupt run dir."""
    say = progress or (lambda _m: None)
    run = read_run_dir(run_dir)
    rd, plan, res = run.path, run.plan, run.result
    tel = read_telemetry(rd)
    if not tel:
        raise RunError(f"{rd} has no telemetry/rank*.jsonl: re-run `pipetrain run` (without --no-telemetry)")
    simrec, snote = read_run_simulation(rd, plan)
    validation, vnote = read_validation(rd, res)
    fidelity = read_fidelity(rd)
    land, lnote = find_run_landscape(rd, plan, run.plan_path)
    out = Path(out_dir) if out_dir is not None else rd / "report"
    out.mkdir(parents=True, exist_ok=True)
    say(f"writing the report of {rd} to {out}")
    sink = FigureSink(out)
    measured_all = [e for recs in tel.values() for e in events_from_records(recs)]
    k = pick_step(res.step_times_s)
    step_id = res.steps[k] if res.steps else 0
    measured = [e for e in events_of_step(measured_all, step_id) if e.rank < plan.pp]
    sim = simrec.result if simrec is not None else None
    sim_events = list(sim.events) if sim is not None else []
    traces: list[Path] = []
    if simrec is not None:
        traces.append(write_chrome_trace(sim_events, out / "trace_simulated.json", process_name=f"simulated ({simrec.topology})"))
    traces.append(write_chrome_trace(measured_all, out / "trace_measured.json", process_name=f"measured ({res.backend})"))
    n, stage_rank = plan.num_stages, [st.rank for st in plan.stages]
    br_sim = stage_breakdown(sim_events, n, stage_rank) if sim is not None else []
    br_run = stage_breakdown(measured, n, stage_rank)
    med = res.median_step_time_s
    tokens = plan.global_batch * plan.seq_len
    ratio = med / sim.step_time_s if sim is not None and sim.step_time_s > 0 else None
    title = f"{plan.schedule}, pp={plan.pp}, m={plan.num_microbatches}"
    measured_line = (f"Measured (step {step_id + 1}, the median step after warm-up): {_ms(res.step_times_s[k])}.")

    sections = [plan_section(plan)]
    if simrec is not None and sim is not None:
        sections.append(Section(
            id="timelines", title="Timelines: simulated vs measured",
            paragraphs=(f"One step, one row per stage, F/B/W coloured, micro-batches labelled, on a shared time axis. Simulated on "
                        f"{simrec.topology} ({simrec.cost_source}): {_ms(sim.step_time_s)}. {measured_line} "
                        f"The measured median step is {med / sim.step_time_s:.2f}x the simulated one.",
                        Markup("Chrome traces for Perfetto: <code>{}</code> (simulated step) and <code>{}</code> (every measured "
                               "step, every rank).").format(traces[0].name, traces[1].name)),
            figures=(sink("timelines", "simulated (left) and measured (right) step timelines",
                          timelines_side_by_side(sim_events, measured, title=title)),)))
    else:
        sections.append(Section(
            id="timelines", title="Timelines: measured",
            paragraphs=(snote, f"One measured step, one row per stage, F/B/W coloured, micro-batches labelled. {measured_line}",
                        Markup("Chrome trace for Perfetto: <code>{}</code> (every measured step, every rank).").format(traces[0].name)),
            figures=(sink("timelines", "measured step timeline", timeline_figure(measured, title=f"measured {title}")),)))
    sources = (("simulated", br_sim), ("measured", br_run)) if sim is not None else (("measured", br_run),)
    short = {"simulated": "sim", "measured": "meas"}
    head = ["stage"] + [f"{part} {short[src]}" for part in ("compute", "transfer", "collective", "bubble", "busy %")
                        for src, _ in sources]
    body = []
    for s in range(n):
        row = [str(s)]
        for get in (lambda b: _ms(b.compute_s), lambda b: _ms(b.transfer_s), lambda b: _ms(b.collective_s),
                    lambda b: _ms(b.bubble_s), lambda b: f"{b.busy_fraction * 100:.0f}"):
            row.extend(get(br[s]) for _src, br in sources)
        body.append(tuple(row))
    sections.append(Section(
        id="breakdown", title="Per-stage breakdown",
        paragraphs=(BREAKDOWN_TEXT
                    + ("" if sim is not None else " Measured only: the run has no simulation."),),
        tables=((tuple(head), tuple(body)),),
        figures=(sink("breakdown", "per-stage compute / transfer / collective / bubble"
                      + (", simulated vs measured" if sim is not None else ""),
                      charts.breakdown_figure({src: breakdown_rows(br) for src, br in sources}, parts=BREAKDOWN_PARTS)),)))
    if sim is not None and ratio is not None:
        step_para = (f"Measured median {_ms(med)} ({tokens / med:,.0f} tokens/s) against simulated {_ms(sim.step_time_s)} "
                     f"({sim.tokens_per_s:,.0f} tokens/s): the simulator is {'optimistic' if sim.step_time_s < med else 'pessimistic'} "
                     f"by {max(ratio, 1 / ratio):.2f}x on this machine. The first step includes warm-up.")
    else:
        step_para = f"Measured median {_ms(med)} ({tokens / med:,.0f} tokens/s). The first step includes warm-up. {snote}"
    sections.append(Section(
        id="step-time", title="Step time", paragraphs=(step_para,),
        figures=(sink("step_time", "step time per step: measured" + (" vs simulated" if sim is not None else ""),
                      charts.step_time_figure(res.step_times_s, sim.step_time_s if sim is not None else None)),)))
    if fidelity is not None:
        sections.append(fidelity_section(fidelity, where=str(rd / FIDELITY_FILE)))
    from pipetrain.reports.predictions import predictions_sections  # pipetrain demo: analytic and calibrated vs measured
    sections.extend(predictions_sections(rd))
    predicted = [st.predicted_peak_memory_bytes or (float(sim.peak_memory_bytes_per_stage[st.index]) if sim is not None else 0.0)
                 for st in plan.stages]
    measured_mem = [float(res.peak_tensor_bytes[st.rank]) if st.rank < len(res.peak_tensor_bytes) else 0.0 for st in plan.stages]
    caps = [st.memory_cap_bytes for st in plan.stages]
    sections.append(Section(
        id="memory", title="Memory per stage",
        paragraphs=("Predicted: the plan's peak per stage (the simulation's where the plan records none). Measured: the executor's "
                    "count of tensor bytes on the stage's rank (weights, gradients, optimizer state, receive buffers, peak saved "
                    "activations); the process RSS (interpreter, libraries) is listed too. Cap: the device memory the planner allowed.",),
        tables=((("stage", "predicted", "measured", "measured/predicted", "cap", "rank RSS"),
                 tuple((str(st.index), _mib(p) if p else "-", _mib(m), f"{m / p:.2f}x" if p else "-", _mib(c) if c else "-",
                        _mib(res.peak_rss_bytes[st.rank]) if st.rank < len(res.peak_rss_bytes) else "-")
                       for st, p, m, c in zip(plan.stages, predicted, measured_mem, caps))),),
        figures=(sink("memory", "memory per stage: predicted, measured, cap", charts.memory_figure(predicted, measured_mem, caps if any(caps) else None)),)))
    sections.extend(_validation_sections(validation, vnote, res.losses, sink))
    sections.append(landscape_section(land, sink, chosen=(plan.num_microbatches, plan.pp), note=lnote))

    data = {
        "run_dir": str(rd), "model": plan.model, "topology": plan.topology, "pp": plan.pp, "dp": plan.dp, "schedule": plan.schedule,
        "num_microbatches": plan.num_microbatches, "micro_batch_size": plan.micro_batch_size, "steps": len(res.steps),
        "measured": {"median_step_time_s": med, "tokens_per_s": tokens / med, "step_times_s": list(res.step_times_s),
                     "losses": list(res.losses), "timeline_step": step_id,
                     "peak_tensor_bytes_per_stage": measured_mem, "peak_rss_bytes_per_rank": list(res.peak_rss_bytes),
                     "breakdown": [breakdown_dict(b) for b in br_run]},
        "simulated": None if simrec is None or sim is None else {
            "topology": simrec.topology, "cost_source": simrec.cost_source, "step_time_s": sim.step_time_s,
            "tokens_per_s": sim.tokens_per_s, "bubble_fraction": sim.bubble_fraction,
            "peak_memory_bytes_per_stage": list(map(float, sim.peak_memory_bytes_per_stage)), "breakdown": [breakdown_dict(b) for b in br_sim]},
        "measured_over_simulated_step_time": ratio,
        "predicted_memory_bytes_per_stage": predicted, "memory_cap_bytes_per_stage": caps,
        "fidelity": fidelity,
        "validation": None if validation is None else {
            "passed": validation.passed, "max_loss_rel_diff": validation.max_loss_rel_diff, "speedup": validation.speedup,
            "throughput": validation.throughput, "param_max_abs_diff": list(validation.param_max_abs_diff),
            "first_divergence_step": validation.first_divergence_step, "first_divergence_stage": validation.first_divergence_stage},
        "landscape": None if land is None else land.to_dict(),
        "notes": {"simulation": snote, "validation": vnote, "landscape": lnote},
        "sections": [s.id for s in sections],
    }
    return _finish(out, f"pipetrain report: {plan.model}, pp={plan.pp} dp={plan.dp} {plan.schedule}",
                   f"run {rd}, {len(res.steps)} steps on {res.backend}", sections, sink, traces, data)


def _finish(out: Path, title: str, subtitle: str, sections: Sequence[Section], sink: FigureSink, traces: Sequence[Path],
            data: dict[str, Any]) -> ReportOutput:
    data = {**data, "pngs": [p.name for p in sink.paths], "traces": [p.name for p in traces], "html": "report.html"}
    summary = out / "summary.json"
    summary.write_text(json.dumps(data, indent=1, default=float) + "\n")
    html = write_report(out / "report.html", title, sections, subtitle=subtitle)
    return ReportOutput(html=html, summary=summary, pngs=tuple(sink.paths), traces=tuple(traces), data=data)


def check_report(html: str | Path, *, screenshot_path: str | Path | None = None, sections: Sequence[str] = RUN_SECTIONS) -> Any:
    """Render in headless Chromium: every image decodes and is not blank, every section is there."""
    from pipetrain.reports.browser import check_page, screenshot

    page = check_page(html)
    missing = [s for s in sections if s not in page.sections]
    if missing:
        raise ConfigError(f"{html} lacks section(s) {', '.join(missing)}")
    if page.blank_images or not page.images:
        raise ConfigError(f"{html}: blank or undecodable image(s): {', '.join(page.blank_images) or 'no images'}")
    if screenshot_path is not None:
        screenshot(html, screenshot_path, height=6000)  # the whole page
    return page
