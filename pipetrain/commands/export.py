"""Export a plan to torch.distributed.pipelining, torchtitan, Megatron-LM or DeepSpeed.

``pipetrain export PLAN.json --to torch|torchtitan|megatron|deepspeed [-o DIR]`` writes the
target's files into DIR (default ``<plan name>.<target>`` beside the plan) and lists them:
``torch``: ``schedule.csv`` (what ``_PipelineScheduleRuntime._load_csv`` reads) and ``stages.json``
(module FQNs per stage); ``torchtitan``: ``torchtitan_config.py`` (its Trainer.Config fields) and
``schedule.csv``; ``megatron``: ``megatron_args.txt``; ``deepspeed``: ``ds_config.json`` and
``pipeline_module.py``. What the target cannot express is printed as ``warning: ...`` lines on
stderr (and listed in ``export.json``). The model is built on the meta device to read its blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipetrain.export import ModelBlocks
    from pipetrain.plan import Plan

__all__ = ["add_arguments", "run", "model_blocks"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipetrain.export import TARGETS

    parser.add_argument("plan", metavar="PLAN.json", help="a plan file from `pipetrain plan`")
    parser.add_argument("--to", required=True, metavar="TARGET", help=f"one of {', '.join(TARGETS)}")
    parser.add_argument("-o", "--out", default=None, metavar="DIR",
                        help="directory to write into (default: <plan name>.<target> beside the plan)")


def model_blocks(plan: Plan) -> ModelBlocks:
    """The plan's model, built on the meta device (no memory): its blocks' names, kinds, classes,
    which declare a transformer layer shape, and its tied parameters. Refuses another model's plan."""
    from pipetrain.export import ModelBlocks
    from pipetrain.planner.trace import model_fingerprint
    from pipetrain.planner.zoo import get_model_spec, tied_parameters

    spec = get_model_spec(plan.model)
    plan.check_graph(model_fingerprint(spec), plan.model)
    model = spec.build("meta")
    return ModelBlocks(names=model.block_names, kinds=model.block_kinds, classes=tuple(type(b).__name__ for b in model.blocks),
                       layer_shaped=tuple(getattr(b, "layer_shape", None) is not None for b in model.blocks),
                       ties=tied_parameters(model))


def run(args: argparse.Namespace) -> int:
    from pipetrain.errors import ConfigError
    from pipetrain.export import TARGETS, export_plan
    from pipetrain.plan import Plan
    from pipetrain.serde import write_text_atomic

    if args.to not in TARGETS:  # before reading the plan or building the model
        raise ConfigError(f"export target {args.to!r} is unknown; choose one of {', '.join(TARGETS)}")
    plan = Plan.load(args.plan)
    result = export_plan(plan, args.to, model_blocks(plan))
    plan_path = Path(args.plan)
    out = Path(args.out) if args.out else plan_path.with_name(f"{plan_path.stem}.{args.to}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out} is a file; give a directory to write the {args.to} files into")
    for f in result.files:
        write_text_atomic(out / f.name, f.text)
        print(out / f.name)
    summary = {"target": result.target, "plan": str(plan_path), "files": [f.name for f in result.files], "warnings": list(result.warnings)}
    write_text_atomic(out / "export.json", json.dumps(summary, indent=2) + "\n")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0
