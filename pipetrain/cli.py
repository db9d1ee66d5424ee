"""The ``pipetrain`` command line: ``graph | plan | simulate | sweep | run | report | demo ...``.

Each subcommand lives in ``pipetrain/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; command modules import torch lazily, inside ``run``. Every
:class:`~pipetrain.errors.PipetrainError` becomes one line on stderr and exit code 2.
Nothing imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipetrain import __version__
from pipetrain.errors import PipetrainError

__all__ = ["COMMANDS", "build_parser", "main"]

#: name -> (module under pipetrain.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "graph": ("graph", "trace a model on the meta device and print its layer graph"),
    "plan": ("plan", "search the best pipeline plan for a job under memory caps, and explain it"),
    "sweep": ("sweep", "what-if: vary one or two knobs (m, p, bandwidth, device, schedule) and compare plans"),
    "simulate": ("simulate", "simulate one training step of a schedule or a plan"),
    "run": ("run", "run a plan as a real torch.distributed pipeline (torchrun; gloo on CPU, NCCL on CUDA)"),
    "calibrate": ("calibrate", "measure this device and backend (blocks, p2p, optimizer) and fit the cost model"),
    "validate": ("validate", "compare a finished run with single-device training: loss, grad norms, parameters, speed"),
    "report": ("report", "write a run's self-contained HTML report (plan, timelines, memory, convergence) + PNGs + JSON"),
    "demo": ("demo", "plan, simulate, run, validate and report tiny-gpt on this CPU"),
    "ui": ("ui", "open the interactive what-if page of a plan, job config or run (local web page)"),
    "export": ("export", "export a plan to torch.distributed.pipelining, torchtitan, Megatron-LM or DeepSpeed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipetrain", description="Plan, simulate, run and validate pipeline-parallel training.")
    parser.add_argument("--version", action="version", version=f"pipetrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"pipetrain.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except PipetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
