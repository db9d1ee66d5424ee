"""pipetrain.simulator: one training step of a schedule, simulated (simpy) or evaluated (longest path).

Build a :class:`SimInput` (or :func:`uniform` for equal stages), then :func:`simulate` (simpy:
shared compute, link contention, buffer back-pressure, DP all-reduce, memory over time) or
:func:`fast_evaluate` (longest path of the dependency DAG; equal to simpy wherever nothing contends).
Both return a :class:`SimResult`. Imports no torch.
"""

from __future__ import annotations

from pipetrain.program.spec import (
    BoundarySpec,
    ComputeGroup,
    DataParallelSpec,
    Link,
    SimInput,
    StageSpec,
    TieSpec,
    ring_allreduce_time_s,
    uniform,
)
from pipetrain.simulator.engine import simulate
from pipetrain.simulator.fast import compile_schedule, fast_evaluate, fast_step_time
from pipetrain.simulator.result import SimResult

__all__ = [
    "BoundarySpec", "ComputeGroup", "DataParallelSpec", "Link", "SimInput", "SimResult", "StageSpec", "TieSpec",
    "compile_schedule", "fast_evaluate", "fast_step_time", "ring_allreduce_time_s", "simulate", "uniform",
]
