"""pipetrain.program: the one torch-free lowering of a plan into what is simulated and run.

- :func:`lower` (:mod:`.lower`): Plan + topology + cost model -> :class:`Program`: the schedule
  with its SEND/RECV actions, each rank's operations with its receive posts (prefetch) and waits,
  and the simulator's input. :func:`lower_schedule` lowers a bare schedule.
- :mod:`.spec`: what the simulator is told (:class:`SimInput`, :class:`StageSpec`, :class:`Link`, ...).
- :mod:`.catalog`: the runnable and auto-chosen schedules, in-flight counts and receive pools.
"""

from __future__ import annotations

from pipetrain.program.catalog import (
    AUTO_SCHEDULES,
    AUTO_SCHEDULES_CPU,
    EXECUTOR_COMBINATIONS,
    RUNNABLE_SCHEDULES,
    ExecutorCombination,
    auto_schedules,
    executor_supports,
    held_in_flight,
    pool_sizes,
)
from pipetrain.program.lower import (
    POST,
    RUN,
    Op,
    Placement,
    Program,
    StageCosts,
    compute_groups,
    lower,
    lower_ops,
    lower_schedule,
    placement,
    plan_stage_memory,
    rank_device_type,
    sim_input,
)
from pipetrain.program.spec import (
    RECV_MODES,
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

__all__ = [
    "AUTO_SCHEDULES", "AUTO_SCHEDULES_CPU", "EXECUTOR_COMBINATIONS", "ExecutorCombination", "POST", "RECV_MODES", "RUN",
    "RUNNABLE_SCHEDULES", "BoundarySpec", "ComputeGroup",
    "DataParallelSpec", "Link", "Op", "Placement", "Program", "SimInput", "StageCosts", "StageSpec", "TieSpec", "auto_schedules",
    "compute_groups", "executor_supports", "held_in_flight", "lower", "lower_ops", "lower_schedule", "placement", "plan_stage_memory", "pool_sizes",
    "rank_device_type", "ring_allreduce_time_s", "sim_input", "uniform",
]
