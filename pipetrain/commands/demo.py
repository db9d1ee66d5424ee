"""Plan, simulate, run, validate and report tiny-gpt on this CPU (not built yet)."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where the demo writes its results")


def run(args: argparse.Namespace) -> int:
    print("pipetrain demo: PLACEHOLDER. The end-to-end demo (plan -> simulate -> run -> validate -> report)")
    print("is not built yet; this command does nothing else. Until then try `pipetrain graph tiny-gpt`")
    print("and `pipetrain simulate --stages 4 --microbatches 8 --schedule 1f1b --t-fwd 1 --t-bwd 2`.")
    return 0
