"""What every exporter shares: the model's blocks as the target sees them, the result type, the
stage split and the plan's schedule.

Torch-free: the command module builds the model on the meta device and hands the exporters a
:class:`ModelBlocks` (names, kinds, class names, which blocks declare a transformer layer shape,
tied parameters), as the ui gets its layer graph. The schedule comes from the one lowering
(:func:`pipetrain.program.lower`), so an export names the same actions pipetrain runs.
"""

from __future__ import annotations

import csv
import io
import textwrap
from dataclasses import dataclass

from pipetrain.errors import PlanError
from pipetrain.plan import Plan
from pipetrain.program import lower
from pipetrain.schedules import Schedule

__all__ = ["BLOCKS_ATTR", "ModelBlocks", "ExportFile", "ExportResult", "plan_schedule", "stage_fqns", "schedule_csv",
           "rank_parts", "tied_across_stages", "warning_lines"]

#: The attribute of a :class:`~pipetrain.planner.zoo.common.PipelineModel` holding its blocks (a
#: ModuleList), so block ``i``'s module FQN is ``blocks.i``.
BLOCKS_ATTR = "blocks"


@dataclass(frozen=True, kw_only=True)
class ModelBlocks:
    """The model's blocks, in order, as an exporter needs them.

    ``kinds`` are the PipelineModel's labels ("embedding", "transformer", "head", ...);
    ``classes`` the blocks' Python class names (DeepSpeed partitions by class name);
    ``layer_shaped`` whether a block declares a transformer ``layer_shape``, which is what a tensor-
    parallel plan needs to know about it; ``ties`` (parameter name, owner block, user blocks).
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    classes: tuple[str, ...]
    layer_shaped: tuple[bool, ...]
    ties: tuple[tuple[str, int, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0 or not (len(self.kinds) == len(self.classes) == len(self.layer_shaped) == n):
            raise PlanError(f"model blocks: names, kinds, classes and layer_shaped must all have one entry per block "
                            f"(got {n}, {len(self.kinds)}, {len(self.classes)}, {len(self.layer_shaped)})")

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(f"{BLOCKS_ATTR}.{i}" for i in range(len(self.names)))

    def check(self, plan: Plan) -> None:
        if plan.num_blocks != len(self.names):
            raise PlanError(f"plan covers {plan.num_blocks} blocks but model {plan.model!r} has {len(self.names)}: "
                            "re-run `pipetrain plan` for this model")


@dataclass(frozen=True, kw_only=True)
class ExportFile:
    """One file an export writes: its name relative to the output directory, and its text."""

    name: str
    text: str


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """An export: the files, and what the target cannot express of the plan (one sentence each)."""

    target: str
    files: tuple[ExportFile, ...]
    warnings: tuple[str, ...] = ()

    def file(self, name: str) -> str:
        for f in self.files:
            if f.name == name:
                return f.text
        raise KeyError(name)


def plan_schedule(plan: Plan) -> Schedule:
    """The schedule pipetrain runs for ``plan`` (buffers included: they shorten 1F1B's warm-up)."""
    return lower(plan).schedule


def stage_fqns(plan: Plan, blocks: ModelBlocks) -> list[list[str]]:
    """Per (virtual) stage, the module FQNs of the blocks it owns."""
    fq = blocks.fqns
    return [list(fq[st.block_start:st.block_end]) for st in plan.stages]


def schedule_csv(sched: Schedule) -> str:
    """The compute-only CSV torch's ``_PipelineScheduleRuntime._load_csv`` reads: one row per rank,
    one action per cell (``0F0``, ``1I0``, ``0W0``, ``1B2``, ``(0F3;3B1)OVERLAP_F_B``). Compute only,
    because that is the runtime's default format and it then adds its own SEND/RECV and REDUCE_GRAD
    (its gradient scaling by the micro-batch count lives in REDUCE_GRAD, which a compute+comms file
    would have to spell out)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in sched.to_strings(compute_only=True):
        writer.writerow(row)
    return out.getvalue()


def rank_parts(plan: Plan) -> list[int]:
    """Block boundaries of a one-stage-per-rank split: ``[0, c1, ..., num_blocks]`` with ``pp + 1``
    entries. A plan with several (virtual) stages per rank is merged into consecutive groups of
    ``chunks``: every ``chunks``-th of the plan's own cuts, so each part is as balanced as the stages
    it merges (the planner balances virtual stages); which stages shared a rank cannot be kept
    without interleaving, and the exporters say so."""
    v = len(plan.stages) // plan.pp
    return [0] + [plan.stages[(r + 1) * v - 1].block_end for r in range(plan.pp)]


def tied_across_stages(plan: Plan, blocks: ModelBlocks, parts: list[int] | None = None) -> list[tuple[str, list[int]]]:
    """Tied parameters whose blocks sit on more than one pipeline rank: (FQN, those ranks). Two
    stages of one rank (the V puts the embedding and the head both on rank 0) share the one
    parameter and need no all-reduce. ``parts``: a one-stage-per-rank split (:func:`rank_parts`)
    instead of the plan's placement."""
    if parts is None:
        rank_of = {b: st.rank for st in plan.stages for b in range(st.block_start, st.block_end)}
    else:
        rank_of = {b: r for r in range(len(parts) - 1) for b in range(parts[r], parts[r + 1])}
    out = []
    for name, owner, users in blocks.ties:
        ranks = sorted({rank_of[b] for b in (owner, *users)})
        if len(ranks) > 1:
            out.append((f"{BLOCKS_ATTR}.{owner}.{name}", ranks))
    return out


def warning_lines(warnings: tuple[str, ...] | list[str], prefix: str = "") -> list[str]:
    """``warning: ...`` lines for a generated file's header, wrapped so the file stays readable
    (and within the line length linters allow)."""
    out = []
    for w in warnings:
        out += textwrap.wrap(f"warning: {w}", width=100, initial_indent=prefix, subsequent_indent=prefix + "  ")
    return out
