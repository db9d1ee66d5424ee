"""Calibrate, plan, simulate, run, validate and report tiny-gpt on this CPU, end to end, in one command.

``pipetrain demo [--run-dir runs/demo] [--steps 50] [--recalibrate] [--check]``:
1. calibrates this machine for the demo's shape (tiny-gpt, micro-batch 1, seq-len 32 on
   ``local-cpu:2``; fewer repeats than ``pipetrain calibrate``), or reuses the calibration a
   previous demo left in the profile cache (:mod:`pipetrain.calibration.cache`: keyed by CPU,
   cores and torch version; ``--recalibrate`` measures again);
2. plans ``tiny-gpt`` on ``local-cpu:2`` with 2 pipeline stages and a pinned 1F1B schedule (fp32,
   global batch 8, seq-len 32), prints what the unpinned planner would choose and what the pins
   cost, and keeps the planner's landscape over (m, p) in ``RUN_DIR/landscape.json``;
3. predicts the step twice: with the analytic roofline (what ``pipetrain plan`` predicts without a
   calibration) and with this machine's calibration (the plan as the executor runs it);
4. runs it as a real 2-process gloo pipeline on the stdlib-text corpus, with the live view, then
   compares both predictions with the measured median step (``simulation.json``, ``fidelity.json``,
   ``predictions.json``);
5. validates it against the same training on one device (``validation.json``);
6. writes the report (``RUN_DIR/report/report.html``) from those files and prints its path.
``--check`` also renders the report in headless Chromium and keeps a screenshot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pipetrain.errors import ConfigError

__all__ = ["add_arguments", "run", "DEMO_JOB", "DEMO_CALIBRATION_REPEATS", "DEMO_CALIBRATION_ROUNDS", "demo_calibration_key"]

#: the demo's job: what `pipetrain plan --model tiny-gpt --topology local-cpu:2 --pp 2 --schedule 1f1b ...` would get.
#: 1F1B is pinned because it is the schedule people run; the micro-batch size is pinned so that the
#: calibration, measured before planning, is of the shape the plan runs
DEMO_JOB = {"model": "tiny-gpt", "topology": "local-cpu:2", "global_batch": 8, "seq_len": 32, "dtype": "fp32",
            "optimizer": "adamw", "pp": 2, "dp": 1, "schedule": "1f1b", "microbatch_size": 1, "seed": 0}

#: the demo's quick calibration: 3 rounds of 3 repeats instead of 5 of 7 keeps the typical speed
#: (the median over rounds) at a third of the profiling time; only the demo's optimizer is timed.
#: The probes of the link, the shared cores and the executor's overheads all stay: on 2 shared
#: cores they are most of what the analytic model misses.
DEMO_CALIBRATION_REPEATS, DEMO_CALIBRATION_ROUNDS = 3, 3


def demo_calibration_key(torch_version: str | None = None) -> Any:
    """The cache key of the demo's calibration on this machine (:class:`pipetrain.calibration.cache.CalibrationKey`)."""
    from pipetrain.calibration.cache import calibration_key

    model, mbs, seq = DEMO_JOB["model"], DEMO_JOB["microbatch_size"], DEMO_JOB["seq_len"]
    assert isinstance(model, str) and isinstance(mbs, int) and isinstance(seq, int)
    return calibration_key(str(DEMO_JOB["topology"]), ((model, mbs, seq),), dtype=str(DEMO_JOB["dtype"]), threads=1,
                           torch_version=torch_version)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where the demo writes its results (default runs/demo)")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure this machine again instead of reusing the cached calibration of an earlier demo")
    parser.add_argument("--check", action="store_true", help="also render the report in headless Chromium and keep a screenshot")


class _Progress:
    """Numbered phases with elapsed time; a spinner on a terminal, plain lines otherwise."""

    def __init__(self, total: int) -> None:
        from rich.console import Console

        self.console = Console()
        if not self.console.is_terminal:
            self.console = Console(width=200)  # logs: long lines, not wrapped at 80
        self.total = total
        self.n = 0
        self.t0 = time.perf_counter()

    def phase(self, what: str) -> Any:
        self.n += 1
        self.console.print(f"[bold cyan][{self.n}/{self.total}][/] {what}  [dim](t={time.perf_counter() - self.t0:.1f} s)[/]",
                           highlight=False)
        if self.console.is_terminal:
            return self.console.status(what)
        import contextlib

        return contextlib.nullcontext()

    def say(self, msg: str) -> None:
        self.console.print(f"      {msg}", highlight=False)


def run(args: argparse.Namespace) -> int:
    from pipetrain.calibration.cache import cached_calibration
    from pipetrain.calibration.run import run_calibration
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.monitor import LiveMonitor
    from pipetrain.planner.explain import PlanOutcome, make_plan, plan_sim_input
    from pipetrain.planner.job import job_from_mapping
    from pipetrain.planner.search import _tracer, search
    from pipetrain.reports.landscape import LANDSCAPE_FILE, landscape_from_search, write_landscape
    from pipetrain.reports.report import check_report, write_run_report
    from pipetrain.simulator import simulate
    from pipetrain.validation.fidelity import report_run_fidelity, simulate_plan
    from pipetrain.validation.validate import validate_run

    if args.steps < 2:
        raise ConfigError(f"--steps must be >= 2 for a demo, got {args.steps}")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "validation.json").unlink(missing_ok=True)
    pr = _Progress(6)
    job = job_from_mapping(DEMO_JOB, source="demo")

    key = demo_calibration_key()
    with pr.phase(f"calibrating this machine for {job.model} micro-batch {job.microbatch_size} on {job.topology}"):
        def measure() -> Any:
            return run_calibration(job.topology, models=(job.model,), micro_batch_sizes=(int(job.microbatch_size or 1),),
                                   seq_len=job.seq_len, dtype=job.dtype, threads=1, repeats=DEMO_CALIBRATION_REPEATS,
                                   rounds=DEMO_CALIBRATION_ROUNDS, optimizers=(job.optimizer,), progress=pr.say)

        got = cached_calibration(key, measure, refresh=bool(args.recalibrate))
    cal = got.calibration
    if got.reused:
        cal_note = (f"Calibration reused from {got.path} (measured {cal.created_utc} in {cal.elapsed_s:.0f} s; "
                    "`pipetrain demo --recalibrate` measures again).")
        pr.say(f"reused the cached calibration (measured {cal.created_utc}; --recalibrate measures again):")
    else:
        cal_note = f"Calibration measured by this demo in {cal.elapsed_s:.0f} s ({got.why_new}), cached in {got.path}."
        pr.say(f"calibrated in {cal.elapsed_s:.1f} s ({got.why_new}); cached for the next demo in:")
        import os

        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:  # other processes slow every probe: the co-run speed and host costs come out several times too slow
            busy = (f"The machine was busy while calibrating (load average {load:.1f} on {cores} cores): the calibration may "
                    "predict too slow a step; run `pipetrain demo --recalibrate` on a quiet machine.")
            cal_note += " " + busy
            pr.say(f"[yellow]{busy}[/]")
    pr.say(f"  {got.path}")

    with pr.phase(f"planning {job.model} on {job.topology} with 2 stages, 1F1B pinned"):
        graph_for = _tracer(job)
        res = search(job, graph_for=graph_for, top_k=3)
        unpinned = search(job.unpinned(), graph_for=graph_for, top_k=64, explain=False)  # prices the pins; the landscape
        plan = make_plan(res, unpinned=unpinned)
        outcome = PlanOutcome(plan=plan, result=res, unpinned=unpinned)
        plan_path = plan.save(run_dir / "plan.json")
        # the report reads the landscape from here: it never searches
        write_landscape(run_dir / LANDSCAPE_FILE, landscape_from_search(
            unpinned, plan=plan, source=f"Planner search over {job.topology}, global batch {job.global_batch}, every knob free."))
    pr.say(f"plan: pp={plan.pp} dp={plan.dp} {plan.schedule} m={plan.num_microbatches} x mb={plan.micro_batch_size}, "
           f"stages {[f'{st.block_start}-{st.block_end - 1}' for st in plan.stages]}, buffers {[st.buffers for st in plan.stages]}; "
           f"{len(plan.alternatives)} alternatives -> {plan_path}")
    frac = outcome.pin_cost_fraction
    pin_note = ""
    if frac is not None:
        u = unpinned.best
        pin_note = (f"Pinned: pp=2, 1F1B, micro-batch {job.microbatch_size}. Unpinned, the planner would choose "
                    f"{u.candidate.describe()}: predicted {u.step_time_s * 1e3:.3g} ms against {res.best.step_time_s * 1e3:.3g} ms "
                    f"for the pinned plan, the pins cost {frac * 100:+.1f}% (analytic model).")
        pr.say(f"unpinned, the planner would choose {u.candidate.describe()}: predicted {u.step_time_s * 1e3:.3g} ms, "
               f"the pins cost {frac * 100:+.1f}% step time (analytic model)")

    with pr.phase("predicting the step: analytic model and this machine's calibration (simpy)"):
        sim = simulate(plan_sim_input(plan, graph=res.graph()))
        _inp, csim, csource = simulate_plan(plan, calibration=cal, graph=res.graph())
    analytic_source = "analytic roofline (what `pipetrain plan` predicts without --calibration)"
    pr.say(f"analytic model:   step {sim.step_time_s * 1e3:.3g} ms, bubble {sim.bubble_fraction * 100:.1f}%, {sim.tokens_per_s:,.0f} tokens/s")
    sampled = (f"; the median of {csim.sampled_steps} steps with the measured message latencies drawn, quartiles "
               f"{csim.step_time_quartiles_s[0] * 1e3:.3g}-{csim.step_time_quartiles_s[1] * 1e3:.3g} ms") if csim.sampled_steps > 1 else ""
    pr.say(f"calibrated model: step {csim.step_time_s * 1e3:.3g} ms, bubble {csim.bubble_fraction * 100:.1f}%, "
           f"{csim.tokens_per_s:,.0f} tokens/s ({csource}, the plan as the executor runs it{sampled})")

    pr.phase(f"running {args.steps} steps on 2 gloo processes (stdlib-text corpus)")
    cfg = RunConfig(plan_path=str(plan_path), run_dir=str(run_dir), steps=args.steps, dataset="stdlib-text", save_final=True,
                    timeout_s=120.0)
    with LiveMonitor(run_dir, plan, args.steps, console=pr.console, plain_interval_s=2.0, title="pipetrain demo"):
        rres = launch(cfg, plan=plan)
    pr.say(f"measured median step {rres.median_step_time_s * 1e3:.3g} ms "
           f"({plan.global_batch * plan.seq_len / rres.median_step_time_s:,.0f} tokens/s), loss {rres.losses[0]:.3f} -> {rres.losses[-1]:.3f}")
    # as `pipetrain run --calibration`: simulation.json and fidelity.json for the report; predictions.json beside them
    f = report_run_fidelity(run_dir, plan, cal, echo=pr.say, analytic=(sim.step_time_s, analytic_source),
                            notes=[n for n in (cal_note, pin_note) if n])
    if f is not None:
        for label, t in (("predicted, analytic model", sim.step_time_s), ("predicted, calibrated", f.sim_step_s)):
            pr.say(f"{label + ':':<28}{t * 1e3:8.3g} ms  error {(t - f.meas_step_s) / f.meas_step_s * 100:+.1f}% vs measured")
        pr.say(f"{'measured median step:':<28}{f.meas_step_s * 1e3:8.3g} ms  ({f.steps_measured} steps after warm-up)")

    with pr.phase("validating against a single device (same data, seed, steps)"):
        val = validate_run(run_dir)
    pr.say(val.summary.replace("\n", "\n      "))

    with pr.phase("writing the report"):
        out = write_run_report(run_dir)
        if args.check:
            check_report(out.html, screenshot_path=out.html.parent / "screenshot.png")
    pr.say(f"PNGs, summary.json and Chrome traces (trace_simulated.json, trace_measured.json) in {out.html.parent}")
    pr.console.print(f"[bold]done in {time.perf_counter() - pr.t0:.1f} s.[/] report: {out.html}", highlight=False)
    return 0 if val.passed else 1
