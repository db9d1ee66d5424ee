"""Write a run's self-contained HTML report, its PNGs and a JSON summary.

``pipetrain report RUN_DIR [--out DIR] [--validate] [--check]`` reads the run directory of a
finished ``pipetrain run`` (plan.json, result.json, telemetry, and what the run and the planner
left for it: ``simulation.json`` and ``fidelity.json`` written by ``pipetrain run``,
``validation.json`` by ``pipetrain validate``, the planner's landscape ``landscape.json`` in
RUN_DIR or ``<plan>.landscape.json`` beside the plan file) and writes ``report.html`` (images
embedded, no network needed), one PNG per figure, ``summary.json`` and Chrome traces of the
simulated and measured timelines (``trace_simulated.json``, ``trace_measured.json``, for
Perfetto). The report itself runs nothing: a section whose file is missing says which command
writes it. ``--validate`` first validates the run against a single device when it has no
current ``validation.json`` (what ``pipetrain validate RUN_DIR`` does; needs ``--save-final``).
``--check`` opens the page in headless Chromium, checks every image decodes and is not blank,
and keeps a screenshot. A missing or corrupt run directory is one line and exit code 2.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --run-dir of a finished `pipetrain run`")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write the report (default: RUN_DIR/report)")
    parser.add_argument("--validate", action="store_true",
                        help="first validate the run against one device unless RUN_DIR/validation.json is current (trains the reference)")
    parser.add_argument("--check", action="store_true", help="render it in headless Chromium: images decode, not blank; screenshot")


def _validate_first(run_dir: str) -> None:
    from pipetrain.validation.validate import load_run, load_validation, validate_run

    art = load_run(run_dir)
    v = load_validation(run_dir)
    if v is not None and tuple(v.pipeline_loss) == tuple(art.result.losses):  # else it belongs to an earlier run here
        print(f"validation.json is current: {'PASSED' if v.passed else 'FAILED'}", flush=True)
        return
    report = validate_run(run_dir, progress=lambda msg: print(msg, flush=True))
    print(report.summary, flush=True)


def run(args: argparse.Namespace) -> int:
    from pipetrain.reports.report import check_report, write_run_report

    if args.validate:
        _validate_first(args.run_dir)
    out = write_run_report(args.run_dir, out_dir=args.out, progress=lambda msg: print(msg, flush=True))
    print(f"report: {out.html}")
    if args.check:
        shot = check_report(out.html, screenshot_path=out.html.parent / "screenshot.png")
        print(f"checked in headless Chromium: {len(shot.images)} images decode and are not blank; screenshot {out.html.parent / 'screenshot.png'}")
    return 0
