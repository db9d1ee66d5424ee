"""Export to ``torch.distributed.pipelining``: the schedule as the CSV its ``_PipelineScheduleRuntime``
loads, and the stage split as module FQNs per stage.

Actions map one to one: pipetrain's ``F`` is torch's ``F``, the full backward ``B`` is ``B``, the
zero-bubble input-gradient pass ``I`` is torch's ``I`` (BACKWARD_INPUT) and ``W`` its ``W``
(BACKWARD_WEIGHT); DualPipeV's paired actions are torch's ``(0F3;3B1)OVERLAP_F_B``. The CSV carries
pipetrain's order, so what torch runs is what pipetrain simulated and ran (for 1F1B this is also
torch's own runtime order; ``Schedule1F1B``'s printed IR numbers the last rank's forwards one too
high, see ``tests/test_schedules_vs_torch.py``).

Read in torch 2.13's ``torch/distributed/pipelining/schedules.py``: ``_Action.from_str`` parses
``[stage][F|I|B|W|...][microbatch]`` and ``(a;b)OVERLAP_F_B``; ``_PipelineScheduleRuntime._load_csv``
reads one row per rank (``format="compute_only"`` by default) and lowers it with its own
``_add_send_recv`` and ``_add_reduce_grad``.
"""

from __future__ import annotations

import json

from pipetrain.export.common import ExportFile, ExportResult, ModelBlocks, plan_schedule, schedule_csv, stage_fqns, tied_across_stages
from pipetrain.plan import Plan

__all__ = ["CSV_NAME", "STAGES_NAME", "export_torch", "torch_warnings"]

CSV_NAME = "schedule.csv"
STAGES_NAME = "stages.json"


def torch_warnings(plan: Plan, blocks: ModelBlocks) -> list[str]:
    """What torch's pipelining runtime does not take from the plan (torchtitan shares most of them)."""
    w = []
    if plan.tp > 1:
        has_plan = any(blocks.layer_shaped)
        w.append(f"tp={plan.tp}: torch.distributed.pipelining does not shard a stage; apply a tensor-parallel plan "
                 "(torch.distributed.tensor.parallel.parallelize_module) to each stage module yourself"
                 + ("" if has_plan else f"; model {plan.model!r} declares no transformer layer shape, so it has no TP plan"))
    if plan.sequence_parallel:
        w.append("sequence_parallel: not part of the pipeline schedule; it belongs to the tensor-parallel plan of each stage")
    if plan.zero:
        w.append(f"zero={plan.zero}: torch has no ZeRO stage switch; FSDP2 (fully_shard) on each stage module shards "
                 "parameters, gradients and optimizer state (ZeRO-3), and the runtime's UNSHARD/RESHARD actions drive it")
    if plan.dp > 1:
        w.append(f"dp={plan.dp}: the CSV is one pipeline's schedule; every data-parallel replica runs it and its "
                 "gradients need DDP or FSDP around the stage modules")
    if plan.recompute != "none":
        which = [st.index for st in plan.stages if st.recompute]
        w.append(f"recompute={plan.recompute} on stages {which}: not in the schedule; wrap those stages' blocks in "
                 "torch.utils.checkpoint (checkpoint_wrapper) yourself"
                 + ("; selective recompute (attention core only) needs a per-op policy (create_selective_checkpoint_contexts)"
                    if plan.recompute == "selective" else ""))
    if plan.precision != "fp32":
        w.append(f"precision {plan.precision} ({plan.dtype}): the runtime runs the stage modules as given; set their "
                 "dtype (or autocast, or FSDP2's MixedPrecisionPolicy) yourself")
    for name, ranks in tied_across_stages(plan, blocks):
        w.append(f"tied parameter {name} is held by ranks {ranks}: torch's runtime does not all-reduce tied weights "
                 "between stages; sum their gradients across those ranks after each step")
    return w


def export_torch(plan: Plan, blocks: ModelBlocks) -> ExportResult:
    blocks.check(plan)
    sched = plan_schedule(plan)
    fqns = stage_fqns(plan, blocks)
    stages = {
        "format": "torch.distributed.pipelining",
        "schedule_csv": CSV_NAME,
        "csv_format": "compute_only",
        "schedule": plan.schedule,
        "pp": plan.pp,
        "num_stages": plan.num_stages,
        "n_microbatches": plan.num_microbatches,
        "micro_batch_size": plan.micro_batch_size,
        # the runtime takes the whole local batch and splits it into n_microbatches along dim 0
        "local_batch_size": plan.micro_batch_size * plan.num_microbatches,
        "stage_to_rank": list(sched.stage_to_rank),
        "stages": [{"stage": st.index, "rank": st.rank, "module_fqns": fqns[st.index],
                    "block_names": list(blocks.names[st.block_start:st.block_end])} for st in plan.stages],
    }
    files = (ExportFile(name=CSV_NAME, text=schedule_csv(sched)),
             ExportFile(name=STAGES_NAME, text=json.dumps(stages, indent=2) + "\n"))
    return ExportResult(target="torch", files=files, warnings=tuple(torch_warnings(plan, blocks)))
