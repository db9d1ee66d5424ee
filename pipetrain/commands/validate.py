"""Validate a finished pipeline run against single-device training of the same model, data, seed and steps.

``pipetrain validate RUN_DIR`` compares per-step loss (absolute, relative), per-step per-stage
gradient norms, final per-stage parameters and throughput; writes ``RUN_DIR/validation.json``;
exits 0 when every difference is within the plan dtype's tolerances, 1 when validation fails
(naming the first step and stage that diverged), 2 on a missing or corrupt run directory.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --run-dir of a finished `pipetrain run` (with --save-final)")


def run(args: argparse.Namespace) -> int:
    from pipetrain.validation.validate import validate_run

    report = validate_run(args.run_dir, progress=lambda msg: print(msg, flush=True))
    print(report.summary)
    print(f"wrote {args.run_dir}/validation.json")
    return 0 if report.passed else 1
