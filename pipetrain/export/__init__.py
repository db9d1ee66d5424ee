"""Export a plan to another pipeline-parallel framework: ``torch`` (torch.distributed.pipelining's
schedule CSV and stage FQNs), ``torchtitan`` (its Trainer.Config parallelism and batch fields),
``megatron`` (Megatron-LM's command-line arguments) and ``deepspeed`` (a PipelineModule partition
and its JSON config).

Torch-free, one module per target; each returns an :class:`ExportResult`: the files, and a warning
for everything of the plan the target cannot express (``pipetrain export`` prints them on stderr).
The field names each exporter writes were read in the target's source at the commit its module
docstring cites.
"""

from __future__ import annotations

from collections.abc import Callable

from pipetrain.errors import ConfigError
from pipetrain.export.common import ExportFile, ExportResult, ModelBlocks
from pipetrain.export.deepspeed import export_deepspeed
from pipetrain.export.megatron import export_megatron
from pipetrain.export.torch_pp import export_torch
from pipetrain.export.torchtitan import export_torchtitan
from pipetrain.plan import Plan

__all__ = ["TARGETS", "ExportFile", "ExportResult", "ModelBlocks", "export_plan"]

_EXPORTERS: dict[str, Callable[[Plan, ModelBlocks], ExportResult]] = {
    "torch": export_torch,
    "torchtitan": export_torchtitan,
    "megatron": export_megatron,
    "deepspeed": export_deepspeed,
}
#: Export targets, as ``pipetrain export --to`` names them.
TARGETS = tuple(_EXPORTERS)


def export_plan(plan: Plan, target: str, blocks: ModelBlocks) -> ExportResult:
    """Export ``plan`` (of the model whose blocks are ``blocks``) to ``target``."""
    if target not in _EXPORTERS:
        raise ConfigError(f"export target {target!r} is unknown; choose one of {', '.join(TARGETS)}")
    return _EXPORTERS[target](plan, blocks)
