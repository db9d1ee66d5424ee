"""pipetrain.torchsched: torch's own pipeline schedules in pipetrain's simulator.

- :mod:`.orders` (the one module here that imports torch, inside its functions): torch's schedule
  classes built offline from stand-in stages, their ``pipeline_order`` and lowered compute+comms
  program (or a CSV as ``_PipelineScheduleRuntime._load_csv`` reads it), guarded by torch version;
- :mod:`.convert`: those action strings -> pipetrain's :class:`~pipetrain.schedules.Schedule` and
  program (torch's receive posts as ``post`` ops);
- :mod:`.compare`: torch's program, its compute order and the plan's own schedule simulated on
  the same costs.

``pipetrain simulate --torch-schedule NAME|CSV`` is the command.
"""

from __future__ import annotations

from pipetrain.torchsched.compare import (
    Comparison,
    compare,
    flag_inputs,
    plan_inputs,
    rank_peak_memory_bytes,
    recut_ranges,
    torch_input,
)
from pipetrain.torchsched.convert import DROPPED_KINDS, ImportedSchedule, convert, parse_cell
from pipetrain.torchsched.orders import (
    INTERLEAVED_TORCH_SCHEDULES,
    SINGLE_TORCH_SCHEDULES,
    TESTED_TORCH,
    TORCH_SCHEDULES,
    V_TORCH_SCHEDULES,
    TorchOrders,
    check_torch,
    torch_orders,
    torch_stubs,
)

__all__ = [
    "DROPPED_KINDS", "INTERLEAVED_TORCH_SCHEDULES", "SINGLE_TORCH_SCHEDULES", "TESTED_TORCH", "TORCH_SCHEDULES", "V_TORCH_SCHEDULES",
    "Comparison", "ImportedSchedule", "TorchOrders", "check_torch", "compare", "convert", "flag_inputs", "import_torch_schedule",
    "parse_cell", "plan_inputs", "rank_peak_memory_bytes", "recut_ranges", "torch_input", "torch_orders", "torch_stubs",
]


def import_torch_schedule(schedule: str, p: int | None = None, m: int | None = None, *, chunks: int = 2,
                          defer_pp_recv: bool = False) -> ImportedSchedule:
    """torch's schedule (name or CSV) for ``p`` ranks and ``m`` micro-batches, converted (:func:`torch_orders`, :func:`convert`)."""
    o = torch_orders(schedule, p, m, chunks=chunks, defer_pp_recv=defer_pp_recv)
    return convert(name=o.name, num_microbatches=o.num_microbatches, stage_to_rank=o.stage_to_rank, compute=o.compute,
                   lowered=o.lowered, notes=o.notes)
