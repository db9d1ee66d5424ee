"""Export to torchtitan: the parallelism, batch and activation-checkpointing fields of its
``Trainer.Config``, as a Python function (torchtitan configures runs in Python now), plus the
schedule CSV.

Field names read in pytorch/torchtitan at commit b5bcd76c66d0acb1a08b176d9639425bc55e0b2a
(2026-08-21), which replaced the TOML job config (``torchtitan/config/job_config.py``) with config
dataclasses and ``--module/--config`` functions:

* ``torchtitan/config/configs.py``: ``ParallelismConfig`` (``pipeline_parallel_degree``,
  ``module_fqns_per_model_part`` (list of FQN lists, one per model part = virtual stage),
  ``pipeline_parallel_schedule``, ``pipeline_parallel_schedule_csv``, ``num_pp_microbatches``,
  ``tensor_parallel_degree``, ``enable_sequence_parallel`` (default True), ``data_parallel_replicate_degree``,
  ``data_parallel_shard_degree``, ``fsdp_reshard_after_forward``); ``TrainingConfig``
  (``num_tokens_per_microbatch_per_dp_rank``, ``num_tokens_per_train_step``, ``max_context_length``,
  ``mixed_precision_param``). The micro-batch is counted in tokens: micro-batch size x sequence length.
* ``torchtitan/trainer.py``: ``Trainer.Config.parallelism``, ``.training``, ``.activation_checkpoint``
  (``SelectiveAC.Config`` by default, ``FullAC.Config``, or None: ``torchtitan/distributed/activation_checkpoint.py``).
* ``torchtitan/distributed/pipeline_parallel.py``: with a CSV the schedule class is torch's
  ``_PipelineScheduleRuntime``; ``pipeline_parallel_schedule`` still picks the stage placement
  (``v`` for ZBVZeroBubble and DualPipeV, else looped), so the export names the schedule with the
  plan's placement and gives the CSV for the exact order.
"""

from __future__ import annotations

from pipetrain.export.common import ExportFile, ExportResult, ModelBlocks, plan_schedule, schedule_csv, stage_fqns, tied_across_stages, warning_lines
from pipetrain.export.torch_pp import CSV_NAME
from pipetrain.plan import Plan

__all__ = ["CONFIG_NAME", "TORCHTITAN_COMMIT", "TORCH_SCHEDULE_NAMES", "torchtitan_fields", "export_torchtitan"]

CONFIG_NAME = "torchtitan_config.py"
TORCHTITAN_COMMIT = "pytorch/torchtitan@b5bcd76c66d0acb1a08b176d9639425bc55e0b2a"
#: torch's ``get_schedule_class`` name with the same stage placement; ZB-H1 has no named schedule
#: in torch (its placement is the looped one of 1F1B, its order comes from the CSV).
TORCH_SCHEDULE_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B", "zb-h1": "1F1B",
                        "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}


def torchtitan_fields(plan: Plan, blocks: ModelBlocks) -> tuple[dict[str, dict[str, object]], str | None, list[str]]:
    """({section: {field: value}}, the activation-checkpoint policy ("full", "selective" or None), warnings)."""
    blocks.check(plan)
    warn = [f"module_fqns_per_model_part names the pipetrain PipelineModel's modules ({plan.model}: blocks.N); a torchtitan "
            "model names its own (tok_embeddings, layers.N, norm, lm_head)"]
    par: dict[str, object] = {
        "pipeline_parallel_degree": plan.pp,
        "pipeline_parallel_schedule": TORCH_SCHEDULE_NAMES[plan.schedule],
        "pipeline_parallel_schedule_csv": CSV_NAME,
        "module_fqns_per_model_part": stage_fqns(plan, blocks),
        "num_pp_microbatches": plan.num_microbatches,
        "tensor_parallel_degree": plan.tp,
        "enable_sequence_parallel": plan.sequence_parallel,
    }
    if plan.schedule == "zb-h1":
        warn.append("schedule zb-h1: torch has no named ZB-H1 schedule; pipeline_parallel_schedule 1F1B sets only the "
                    "placement, the CSV the order (keep pipeline_parallel_schedule_csv)")
    if plan.zero == 0:
        par["data_parallel_replicate_degree"], par["data_parallel_shard_degree"] = plan.dp, 1
    else:
        par["data_parallel_replicate_degree"], par["data_parallel_shard_degree"] = 1, plan.dp
        par["fsdp_reshard_after_forward"] = "default" if plan.zero == 3 else "never"
        if plan.zero < 3:
            warn.append(f"zero={plan.zero}: torchtitan has no ZeRO-{plan.zero}; FSDP2 (data_parallel_shard_degree) shards "
                        "parameters too, and fsdp_reshard_after_forward='never' keeps them gathered through each step")
    if plan.tp > 1 and not any(blocks.layer_shaped):
        warn.append(f"tp={plan.tp}: model {plan.model!r} declares no transformer layer shape, so it has no tensor-parallel "
                    "plan; torchtitan applies TP only to its own models")
    train: dict[str, object] = {
        "num_tokens_per_microbatch_per_dp_rank": plan.micro_batch_size * plan.seq_len,
        "num_tokens_per_train_step": plan.global_batch * plan.seq_len,
        "max_context_length": plan.seq_len,
    }
    if plan.dtype == "fp16":
        train["mixed_precision_param"] = "float32"
        warn.append("dtype fp16: torchtitan's mixed precision is bfloat16 or float32 only; set to float32")
    else:
        train["mixed_precision_param"] = "float32" if plan.dtype == "fp32" else "bfloat16"
        if plan.precision == "amp-autocast":
            warn.append("precision amp-autocast: torchtitan casts parameters through FSDP2's mixed precision "
                        "(autocast only without sharding), keeping fp32 master weights as the plan does")
    ac = None if plan.recompute == "none" else plan.recompute
    if ac is not None:
        partial = [st.index for st in plan.stages if not st.recompute or st.recompute_layers not in (0, st.num_blocks)]
        if partial:
            warn.append(f"recompute={ac}: torchtitan checkpoints every transformer block of every model part; the plan "
                        f"leaves stages {partial} (or some of their blocks) without")
        if ac == "selective":
            warn.append("recompute=selective: torchtitan's SelectiveAC is per-op (saves matmul outputs, recomputes every "
                        "second matmul), not the attention-core recompute the plan's memory model assumes")
    warn += [f"tied parameter {n} is held by ranks {r}: torch's pipeline runtime does not all-reduce tied weights between "
             "stages" for n, r in tied_across_stages(plan, blocks)]
    return {"parallelism": par, "training": train}, ac, warn


def export_torchtitan(plan: Plan, blocks: ModelBlocks) -> ExportResult:
    sections, ac, warn = torchtitan_fields(plan, blocks)
    lines = [f'"""pipetrain plan for {plan.model}: pp={plan.pp} x dp={plan.dp} x tp={plan.tp}, schedule {plan.schedule} '
             "(generated by pipetrain export).", "",
             f"Fields of torchtitan's Trainer.Config, names read in {TORCHTITAN_COMMIT}",
             "(torchtitan/config/configs.py: ParallelismConfig, TrainingConfig; torchtitan/trainer.py).",
             f"Launch on {plan.world_size} GPUs. {CSV_NAME} must be reachable at the path given (relative to the",
             "working directory of the run).", *warning_lines(warn), '"""', "", "",
             "def apply_plan(config):", '    """Set the plan\'s fields on a torchtitan ``Trainer.Config`` and return it."""']
    if ac == "full":
        lines.append("    from torchtitan.distributed.activation_checkpoint import FullAC")
    elif ac == "selective":
        lines.append("    from torchtitan.distributed.activation_checkpoint import SelectiveAC")
    for section, fields in sections.items():
        for name, value in fields.items():
            if isinstance(value, list):
                rows = "".join(f"        {row!r},\n" for row in value)
                lines.append(f"    config.{section}.{name} = [\n{rows}    ]")
            else:
                lines.append(f"    config.{section}.{name} = {value!r}")
    lines.append("    config.activation_checkpoint = " + {"full": "FullAC.Config()", "selective": "SelectiveAC.Config()"}.get(ac or "", "None"))
    lines.append("    return config")
    files = (ExportFile(name=CONFIG_NAME, text="\n".join(lines) + "\n"), ExportFile(name=CSV_NAME, text=schedule_csv(plan_schedule(plan))))
    return ExportResult(target="torchtitan", files=files, warnings=tuple(warn))
