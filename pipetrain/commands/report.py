"""Write a run's self-contained HTML report, its PNGs and a JSON summary.

``pipetrain report RUN_DIR [--out DIR] [--check]`` reads the run directory of a finished
``pipetrain run`` (plan.json, result.json, telemetry, validation.json when validated), simulates
the run's plan, and writes ``report.html`` (images embedded, no network needed), one PNG per
figure, ``summary.json`` and Chrome traces of the simulated and measured timelines
(``trace_simulated.json``, ``trace_measured.json``, for Perfetto). ``--check`` opens the page in
headless Chromium, checks every image decodes and is not blank, and keeps a screenshot.
A run that was not validated yet is validated first when it saved its final weights
(``--save-final``); the landscape search is cached in ``RUN_DIR/landscape-<plan hash>.json``.
A missing or corrupt run directory is one line and exit code 2.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --run-dir of a finished `pipetrain run`")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write the report (default: RUN_DIR/report)")
    parser.add_argument("--check", action="store_true", help="render it in headless Chromium: images decode, not blank; screenshot")


def run(args: argparse.Namespace) -> int:
    from pipetrain.reports.report import check_report, write_run_report

    out = write_run_report(args.run_dir, out_dir=args.out, progress=lambda msg: print(msg, flush=True))
    print(f"report: {out.html}")
    if args.check:
        shot = check_report(out.html, screenshot_path=out.html.parent / "screenshot.png")
        print(f"checked in headless Chromium: {len(shot.images)} images decode and are not blank; screenshot {out.html.parent / 'screenshot.png'}")
    return 0
