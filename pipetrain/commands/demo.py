"""Plan, simulate, run, validate and report tiny-gpt on this CPU, end to end, in one command.

``pipetrain demo [--run-dir runs/demo] [--steps 50] [--check]``:
1. plans ``tiny-gpt`` on ``local-cpu:2`` with 2 pipeline stages (fp32, global batch 8, seq-len 32),
   and keeps the planner's landscape over (m, p) in ``RUN_DIR/landscape.json``;
2. simulates the plan;
3. runs it as a real 2-process gloo pipeline on the stdlib-text corpus, with the live view, then
   simulates it as executed and compares, as ``pipetrain run`` does (``simulation.json``, ``fidelity.json``);
4. validates it against the same training on one device (``validation.json``);
5. writes the report (``RUN_DIR/report/report.html``) from those files and prints its path.
``--check`` also renders the report in headless Chromium and keeps a screenshot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pipetrain.errors import ConfigError

__all__ = ["add_arguments", "run", "DEMO_JOB"]

#: the demo's job: what `pipetrain plan --model tiny-gpt --topology local-cpu:2 --pp 2 ...` would get
DEMO_JOB = {"model": "tiny-gpt", "topology": "local-cpu:2", "global_batch": 8, "seq_len": 32, "dtype": "fp32",
            "optimizer": "adamw", "pp": 2, "dp": 1, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where the demo writes its results (default runs/demo)")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
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
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.monitor import LiveMonitor
    from pipetrain.planner.explain import make_plan, plan_sim_input
    from pipetrain.planner.job import job_from_mapping
    from pipetrain.planner.search import _tracer, search
    from pipetrain.reports.landscape import LANDSCAPE_FILE, landscape_from_search, write_landscape
    from pipetrain.reports.report import check_report, write_run_report
    from pipetrain.simulator import simulate
    from pipetrain.validation.fidelity import report_run_fidelity
    from pipetrain.validation.validate import validate_run

    if args.steps < 2:
        raise ConfigError(f"--steps must be >= 2 for a demo, got {args.steps}")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "validation.json").unlink(missing_ok=True)
    pr = _Progress(5)

    job = job_from_mapping(DEMO_JOB, source="demo")
    with pr.phase("planning tiny-gpt on local-cpu:2 with 2 stages"):
        graph_for = _tracer(job)
        res = search(job, graph_for=graph_for, top_k=3)
        unpinned = search(job.unpinned(), graph_for=graph_for, top_k=64, explain=False)  # prices the pins; the landscape
        plan = make_plan(res, unpinned=unpinned)
        plan_path = plan.save(run_dir / "plan.json")
        # the report reads the landscape from here: it never searches
        write_landscape(run_dir / LANDSCAPE_FILE, landscape_from_search(
            unpinned, plan=plan, source=f"Planner search over {job.topology}, global batch {job.global_batch}, every knob free."))
    p = plan.predicted
    pr.say(f"plan: pp={plan.pp} dp={plan.dp} {plan.schedule} m={plan.num_microbatches} x mb={plan.micro_batch_size}, "
           f"stages {[f'{st.block_start}-{st.block_end - 1}' for st in plan.stages]}, buffers {[st.buffers for st in plan.stages]}; "
           f"{len(plan.alternatives)} alternatives -> {plan_path}")

    with pr.phase("simulating the plan (simpy)"):
        sim = simulate(plan_sim_input(plan, graph=res.graph()))
    pr.say(f"simulated step {sim.step_time_s * 1e3:.3g} ms, bubble {sim.bubble_fraction * 100:.1f}%, "
           f"{sim.tokens_per_s:,.0f} tokens/s" + (f" (planner predicted {p.step_time_s * 1e3:.3g} ms)" if p else ""))

    pr.phase(f"running {args.steps} steps on 2 gloo processes (stdlib-text corpus)")
    cfg = RunConfig(plan_path=str(plan_path), run_dir=str(run_dir), steps=args.steps, dataset="stdlib-text", save_final=True,
                    timeout_s=120.0)
    with LiveMonitor(run_dir, plan, args.steps, console=pr.console, plain_interval_s=2.0, title="pipetrain demo"):
        res = launch(cfg, plan=plan)
    pr.say(f"measured median step {res.median_step_time_s * 1e3:.3g} ms "
           f"({plan.global_batch * plan.seq_len / res.median_step_time_s:,.0f} tokens/s), loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}")
    report_run_fidelity(run_dir, plan, echo=pr.say)  # as `pipetrain run`: simulation.json and fidelity.json for the report

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
