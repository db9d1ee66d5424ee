"""The run report: one self-contained ``report.html`` + PNGs + ``summary.json`` + Chrome traces.

:func:`write_run_report` reads a finished run directory and simulates the run's plan with the
simulator, then writes sections (ids in :data:`RUN_SECTIONS`): the plan (stage table and the
alternatives it beat), timelines (simulated and measured side by side), per-stage breakdown
(compute, communication, bubble; simulated against measured, definitions in
:mod:`pipetrain.reports.analysis`), step time, memory per stage (predicted, measured, cap),
convergence (pipeline vs single-device loss, difference on a log scale, per-stage gradient
norms), parameter consistency per stage, and the planner's landscape over (m, p). The plan-only
what-if report lives in :mod:`pipetrain.reports.plan_report` and shares the helpers here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipetrain.errors import PipetrainError, RunError
from pipetrain.events import write_chrome_trace
from pipetrain.reports.html import Section, figure_png, write_report

__all__ = ["RUN_SECTIONS", "ReportOutput", "write_run_report", "check_report", "simulate_plan", "plan_section",
           "landscape_section", "landscape_path", "FigureSink"]

RUN_SECTIONS = ("plan", "timelines", "breakdown", "step-time", "memory", "convergence", "parameters", "landscape")
_MIB = float(1 << 20)


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

    def __call__(self, name: str, caption: str, fig: Any) -> tuple[str, bytes]:
        png = figure_png(fig)
        p = self.out_dir / f"{name}.png"
        p.write_bytes(png)
        self.paths.append(p)
        return caption, png


def _mib(x: float) -> str:
    return f"{x / _MIB:.2f} MiB"


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.3g} ms"


def simulate_plan(plan: Any) -> tuple[Any, str]:
    """SimResult of the plan (simpy) on its topology, or on ``local-cpu:N`` when the plan names none."""
    from pipetrain.planner.explain import plan_sim_input
    from pipetrain.planner.topology import resolve_topology
    from pipetrain.simulator import simulate

    try:
        topo = resolve_topology(plan.topology)
        where = plan.topology
    except PipetrainError:
        where = f"local-cpu:{plan.world_size}"
        topo = resolve_topology(where)
    return simulate(plan_sim_input(plan, topology=topo)), where


def plan_section(plan: Any, *, note: str = "") -> Section:
    rows = []
    for st in plan.stages:
        rows.append((str(st.index), str(st.rank), st.device, f"{st.block_start}-{st.block_end - 1}", str(st.num_blocks),
                     str(st.buffers), "yes" if st.recompute else "no",
                     _mib(st.predicted_peak_memory_bytes) if st.predicted_peak_memory_bytes else "-",
                     _mib(st.memory_cap_bytes) if st.memory_cap_bytes else "-"))
    tables = [(("stage", "rank", "device", "blocks", "# blocks", "buffers", "recompute", "predicted peak", "cap"), tuple(rows))]
    if plan.alternatives:
        tables.append((("alternative", "step time", "why it lost"),
                       tuple((a.description, "-" if a.step_time_s is None else f"{a.step_time_s * 1e3:.3g} ms", a.reason)
                             for a in plan.alternatives)))
    sched = f"interleaved (v={plan.chunks})" if plan.schedule == "interleaved" else plan.schedule
    paras = [f"<b>{plan.model}</b> on <b>{plan.topology}</b>: pp={plan.pp} x dp={plan.dp}, {sched}, micro-batch "
             f"{plan.micro_batch_size} x m={plan.num_microbatches} (global batch {plan.global_batch}), seq-len {plan.seq_len}, "
             f"{plan.dtype}, {plan.optimizer}, seed {plan.seed}."]
    if plan.predicted is not None:
        p = plan.predicted
        paras.append(f"Planner's prediction: step {p.step_time_s * 1e3:.4g} ms, {p.tokens_per_s:,.0f} tokens/s, "
                     f"bubble {p.bubble_fraction * 100:.1f}%, MFU {p.mfu * 100:.1f}%.")
    paras.append("Alternatives it beat are listed below." if plan.alternatives else
                 "This plan was not made by the planner's search, so it records no alternatives.")
    if note:
        paras.append(note)
    return Section(id="plan", title="The plan", paragraphs=tuple(paras), tables=tuple(tables))


def landscape_section(land: Any, sink: FigureSink, *, note: str = "") -> Section:
    from pipetrain.reports.charts import landscape_figure

    if land is None:
        return Section(id="landscape", title="Planner landscape",
                       paragraphs=(note or "The planner's search could not be run for this plan.",))
    fig = landscape_figure(land.ms, land.ps, land.step_time_s, chosen=land.chosen, labels=land.status)
    paras = [f"Predicted step time (fast evaluator, best over micro-batch size, dp and schedule) for every pipeline depth p "
             f"and micro-batch count m; hatched cells have no step time (infeasible: no plan fits; pruned: skipped by the search's "
             f"branch and bound, as its lower bound already exceeded the best, or not a point of the grid); the star is this plan. "
             f"{land.feasible_points} feasible (p, m) points. {land.source}"]
    if note:
        paras.append(note)
    return Section(id="landscape", title="Planner landscape", paragraphs=tuple(paras),
                   figures=(sink("landscape", "planner landscape: predicted step time vs m and p", fig),))


def _load_landscape(run_dir: Path, plan: Any, say: Callable[[str], None]) -> tuple[Any, str]:
    from pipetrain.reports.landscape import Landscape, landscape_for_plan

    p = landscape_path(run_dir, plan)
    if p.is_file():
        try:
            return Landscape.from_dict(json.loads(p.read_text())), ""
        except (ValueError, KeyError, TypeError):
            pass
    say("searching the planner's landscape over (m, p)")
    try:
        land = landscape_for_plan(plan)
    except PipetrainError as exc:
        try:
            land = landscape_for_plan(plan, topology=f"local-cpu:{plan.world_size}")
        except PipetrainError:
            return None, f"The planner's search failed for this plan: {exc}"
    p.write_text(json.dumps(land.to_dict()))
    return land, ""


def landscape_path(run_dir: str | Path, plan: Any) -> Path:
    """Where a run directory caches the landscape of its plan (keyed by the plan's content)."""
    import hashlib

    return Path(run_dir) / f"landscape-{hashlib.sha256(plan.to_json().encode()).hexdigest()[:12]}.json"


def _validation(run_dir: Path, res: Any, say: Callable[[str], None]) -> tuple[Any, str]:
    from pipetrain.executor.validate import load_validation, validate_run

    v = load_validation(run_dir)
    if v is not None and tuple(v.pipeline_loss) == tuple(res.losses):  # else it belongs to an earlier run here
        return v, ""
    try:
        say("no validation.json: validating against a single device first")
        return validate_run(run_dir, progress=say), ""
    except RunError as exc:
        return None, f"Not validated: {exc}"


def write_run_report(run_dir: str | Path, *, out_dir: str | Path | None = None,
                     progress: Callable[[str], None] | None = None) -> ReportOutput:
    """Write the run report of ``run_dir`` (module docstring); RunError on a missing/corrupt run dir."""
    from pipetrain.executor.telemetry import read_telemetry
    from pipetrain.executor.validate import load_run
    from pipetrain.reports import charts
    from pipetrain.reports.analysis import events_from_records, events_of_step, pick_step, stage_breakdown
    from pipetrain.reports.figures import timelines_side_by_side

    say = progress or (lambda _m: None)
    art = load_run(run_dir)
    rd, plan, res = art.run_dir, art.plan, art.result
    tel = read_telemetry(rd)
    if not tel:
        raise RunError(f"{rd} has no telemetry/rank*.jsonl: re-run `pipetrain run` (without --no-telemetry)")
    out = Path(out_dir) if out_dir is not None else rd / "report"
    out.mkdir(parents=True, exist_ok=True)
    sink = FigureSink(out)
    measured_all = [e for recs in tel.values() for e in events_from_records(recs)]
    k = pick_step(res.step_times_s)
    step_id = res.steps[k] if res.steps else 0
    measured = [e for e in events_of_step(measured_all, step_id) if e.rank < plan.pp]
    say("simulating the plan")
    sim, sim_topo = simulate_plan(plan)
    sim_events = list(sim.events)
    traces = (write_chrome_trace(sim_events, out / "trace_simulated.json", process_name=f"simulated ({sim_topo})"),
              write_chrome_trace(measured_all, out / "trace_measured.json", process_name=f"measured ({res.backend})"))
    validation, vnote = _validation(rd, res, say)
    land, lnote = _load_landscape(rd, plan, say)
    n, stage_rank = plan.num_stages, [st.rank for st in plan.stages]
    br_sim = stage_breakdown(sim_events, n, stage_rank)
    br_run = stage_breakdown(measured, n, stage_rank)
    med = res.median_step_time_s
    tokens = plan.global_batch * plan.seq_len

    sections = [plan_section(plan)]
    ratio = med / sim.step_time_s
    sections.append(Section(
        id="timelines", title="Timelines: simulated vs measured",
        paragraphs=(f"One step, one row per stage, F/B/W coloured, micro-batches labelled, on a shared time axis. Simulated on "
                    f"{sim_topo}: {sim.step_time_s * 1e3:.3g} ms. Measured (step {step_id + 1}, the median step after warm-up): "
                    f"{res.step_times_s[k] * 1e3:.3g} ms. The measured median step is {ratio:.2f}x the simulated one.",
                    f"Chrome traces for Perfetto: <code>{traces[0].name}</code> (simulated step) and <code>{traces[1].name}</code> "
                    f"(every measured step, every rank)."),
        figures=(sink("timelines", "simulated (left) and measured (right) step timelines",
                      timelines_side_by_side(sim_events, measured, title=f"{plan.schedule}, pp={plan.pp}, m={plan.num_microbatches}")),)))
    rows = {"simulated": [(b.compute_s, b.comm_s, b.bubble_s) for b in br_sim],
            "measured": [(b.compute_s, b.comm_s, b.bubble_s) for b in br_run]}
    sections.append(Section(
        id="breakdown", title="Per-stage breakdown",
        paragraphs=("Compute is the stage's F/B/W time; communication the in-flight time of the transfers it received (send "
                    "posted to receive completed), capped at its idle time; bubble the rest of its rank's idle time in the step.",),
        tables=((("stage", "compute sim", "compute meas", "comm sim", "comm meas", "bubble sim", "bubble meas", "busy % sim", "busy % meas"),
                 tuple((str(s), _ms(a.compute_s), _ms(b.compute_s), _ms(a.comm_s), _ms(b.comm_s), _ms(a.bubble_s), _ms(b.bubble_s),
                        f"{a.busy_fraction * 100:.0f}", f"{b.busy_fraction * 100:.0f}") for s, (a, b) in enumerate(zip(br_sim, br_run)))),),
        figures=(sink("breakdown", "per-stage compute / communication / bubble, simulated vs measured",
                      charts.breakdown_figure(rows, parts=("compute", "communication", "bubble"))),)))
    sections.append(Section(
        id="step-time", title="Step time",
        paragraphs=(f"Measured median {med * 1e3:.3g} ms ({tokens / med:,.0f} tokens/s) against simulated {sim.step_time_s * 1e3:.3g} ms "
                    f"({sim.tokens_per_s:,.0f} tokens/s): the simulator is {'optimistic' if sim.step_time_s < med else 'pessimistic'} "
                    f"by {max(ratio, 1 / ratio):.2f}x on this machine. The first step includes warm-up.",),
        figures=(sink("step_time", "step time per step: measured vs simulated", charts.step_time_figure(res.step_times_s, sim.step_time_s)),)))
    from pipetrain.executor.fidelity import fidelity_report_section  # RUN_DIR/fidelity.json, written by `pipetrain run`

    fid = fidelity_report_section(rd)
    if fid is not None:
        sections.append(Section(id="fidelity", **fid))
    predicted = [st.predicted_peak_memory_bytes or sim.peak_memory_bytes_per_stage[st.index] for st in plan.stages]
    measured_mem = [float(res.peak_tensor_bytes[st.rank]) if st.rank < len(res.peak_tensor_bytes) else 0.0 for st in plan.stages]
    caps = [st.memory_cap_bytes for st in plan.stages]
    sections.append(Section(
        id="memory", title="Memory per stage",
        paragraphs=("Predicted: the plan's (simulated) peak per stage. Measured: the executor's count of tensor bytes on the "
                    "stage's rank (weights, gradients, optimizer state, receive buffers, peak saved activations); the "
                    "process RSS (interpreter, libraries) is listed too. Cap: the device memory the planner allowed.",),
        tables=((("stage", "predicted", "measured", "measured/predicted", "cap", "rank RSS"),
                 tuple((str(st.index), _mib(p), _mib(m), f"{m / p:.2f}x" if p else "-", _mib(c) if c else "-",
                        _mib(res.peak_rss_bytes[st.rank]) if st.rank < len(res.peak_rss_bytes) else "-")
                       for st, p, m, c in zip(plan.stages, predicted, measured_mem, caps))),),
        figures=(sink("memory", "memory per stage: predicted, measured, cap", charts.memory_figure(predicted, measured_mem, caps if any(caps) else None)),)))
    if validation is not None:
        v = validation
        verdict = "<span class='pass'>PASSED</span>" if v.passed else "<span class='fail'>FAILED</span>"
        paras = [f"Validation {verdict} against one device trained on the same data, seed and {v.steps} steps: max loss "
                 f"relative difference {v.max_loss_rel_diff:.2e} (tolerance {v.tolerances['loss_rtol']:g}), gradient norms "
                 f"within {v.tolerances['grad_norm_rtol']:g}.", f"Throughput: {v.throughput} "
                 f"({v.pipeline_tokens_per_s:,.0f} vs {v.reference_tokens_per_s:,.0f} tokens/s)."]
        paras.extend(v.messages)
        figs = [sink("convergence", "loss: pipeline vs single device, and |difference| (log scale)",
                     charts.convergence_figure(v.pipeline_loss, v.reference_loss))]
        if v.pipeline_stage_grad_norms:
            figs.append(sink("grad_norms", "per-stage gradient norms: pipeline vs single device",
                             charts.grad_norm_figure(v.pipeline_stage_grad_norms, v.reference_stage_grad_norms)))
        sections.append(Section(id="convergence", title="Convergence", paragraphs=tuple(paras), figures=tuple(figs)))
        tol = v.tolerances["param_atol"]
        sections.append(Section(
            id="parameters", title="Parameter consistency per stage",
            paragraphs=(f"Final weights of every stage against the single-device run (a stage fails when both max-abs > "
                        f"{tol:g} and relative > {v.tolerances['param_rtol']:g}).",),
            tables=((("stage", "max |Δ|", "relative ‖Δ‖/‖p‖"),
                     tuple((str(s), f"{a:.3e}", f"{r:.3e}") for s, (a, r) in enumerate(zip(v.param_max_abs_diff, v.param_rel_diff)))),),
            figures=(sink("parameters", "final parameters vs single device, per stage",
                          charts.param_consistency_figure(v.param_max_abs_diff, v.param_rel_diff, tol)),)))
    else:
        sections.append(Section(id="convergence", title="Convergence", paragraphs=(vnote,),
                                figures=(sink("convergence", "pipeline loss (no single-device run)",
                                              charts.convergence_figure(res.losses, [])),)))
        sections.append(Section(id="parameters", title="Parameter consistency per stage", paragraphs=(vnote,)))
    sections.append(landscape_section(land, sink, note=lnote))

    data = {
        "run_dir": str(rd), "model": plan.model, "topology": plan.topology, "pp": plan.pp, "dp": plan.dp, "schedule": plan.schedule,
        "num_microbatches": plan.num_microbatches, "micro_batch_size": plan.micro_batch_size, "steps": len(res.steps),
        "measured": {"median_step_time_s": med, "tokens_per_s": tokens / med, "step_times_s": list(res.step_times_s),
                     "losses": list(res.losses), "timeline_step": step_id,
                     "peak_tensor_bytes_per_stage": measured_mem, "peak_rss_bytes_per_rank": list(res.peak_rss_bytes),
                     "breakdown": [vars(b) for b in br_run]},
        "simulated": {"topology": sim_topo, "step_time_s": sim.step_time_s, "tokens_per_s": sim.tokens_per_s,
                      "bubble_fraction": sim.bubble_fraction, "peak_memory_bytes_per_stage": list(map(float, sim.peak_memory_bytes_per_stage)),
                      "breakdown": [vars(b) for b in br_sim]},
        "measured_over_simulated_step_time": ratio,
        "predicted_memory_bytes_per_stage": predicted, "memory_cap_bytes_per_stage": caps,
        "validation": None if validation is None else {
            "passed": validation.passed, "max_loss_rel_diff": validation.max_loss_rel_diff, "speedup": validation.speedup,
            "throughput": validation.throughput, "param_max_abs_diff": list(validation.param_max_abs_diff),
            "first_divergence_step": validation.first_divergence_step, "first_divergence_stage": validation.first_divergence_stage},
        "landscape": None if land is None else land.to_dict(),
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
    from pipetrain.errors import ConfigError
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

