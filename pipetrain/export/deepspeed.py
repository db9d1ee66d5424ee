"""Export to DeepSpeed's pipeline engine: a ``PipelineModule`` partition and the JSON config.

Read in deepspeedai/DeepSpeed at commit edaa7221267243c7be7fb49c5d5f5c4fb97b4641 (2026-08-22):

* ``deepspeed/runtime/pipe/module.py``: ``PipelineModule(layers, num_stages, topology, loss_fn, ...,
  partition_method='parameters', activation_checkpoint_interval=0, ...)``; its
  ``_partition_layers(self, method='uniform')`` sets ``self.parts`` (``num_stages + 1`` layer
  boundaries) and calls ``self._set_bounds(start=parts[stage_id], stop=parts[stage_id + 1])``;
  ``method`` is ``uniform``, ``parameters`` or ``type:REGEX`` (case-insensitive search on each
  layer's class name; matching layers weigh 1, others 0).
* ``deepspeed/runtime/utils.py``: ``partition_uniform`` and ``partition_balanced`` (the linear
  partition by dynamic programming), ported below so the export knows whether a method reproduces
  the plan's split; if none does, the snippet overrides ``_partition_layers`` with the plan's parts.
* ``deepspeed/runtime/pipe/engine.py``: the pipeline engine asserts ZeRO stage < 2.
* ``deepspeed/runtime/pipe/topology.py``: ``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)``.
"""

from __future__ import annotations

import json
import re

from pipetrain.export.common import ExportFile, ExportResult, ModelBlocks, rank_parts, tied_across_stages, warning_lines
from pipetrain.plan import Plan

__all__ = ["CONFIG_NAME", "MODULE_NAME", "DEEPSPEED_COMMIT", "partition_uniform", "partition_balanced", "partition_method",
           "deepspeed_config", "export_deepspeed"]

CONFIG_NAME = "ds_config.json"
MODULE_NAME = "pipeline_module.py"
DEEPSPEED_COMMIT = "deepspeedai/DeepSpeed@edaa7221267243c7be7fb49c5d5f5c4fb97b4641"


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's ``partition_uniform``: equal parts, the first ``num_items % num_parts`` one larger."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    parts = [p * chunk for p in range(num_parts + 1)]
    for i in range(residual):
        for j in range(i + 1, num_parts + 1):
            parts[j] += 1
    return parts


def partition_balanced(weights: list[float], num_parts: int) -> list[int]:
    """DeepSpeed's ``partition_balanced``: minimise (max part - min part) by dynamic programming;
    ties go to the later split point (its ``>=``), which decides where zero-weight layers land."""
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + w
    dp_max[0][0] = 0.0
    dp_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                max_sum = max(dp_max[k][j - 1], part)
                min_sum = min(dp_min[k][j - 1], part)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j] = cost
                    dp_max[i][j] = max_sum
                    dp_min[i][j] = min_sum
                    position[i][j] = k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(position[parts[-1]][j])
    return parts[::-1]


def partition_method(parts: list[int], blocks: ModelBlocks) -> str | None:
    """A ``partition_method`` with which DeepSpeed itself computes ``parts``, or None."""
    n, stages = len(blocks.classes), len(parts) - 1
    if partition_uniform(n, stages) == parts:
        return "uniform"
    for cls in dict.fromkeys(blocks.classes):
        if not re.fullmatch(r"\w+", cls):
            continue
        weights = [1.0 if c.lower() == cls.lower() else 0.0 for c in blocks.classes]
        if partition_balanced(weights, stages) == parts:
            return f"type:^{cls}$"
    return None


def deepspeed_config(plan: Plan) -> dict[str, object]:
    """The JSON config's batch, ZeRO and precision fields (train_batch_size = micro-batch x accumulation x dp)."""
    cfg: dict[str, object] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.num_microbatches,
        "zero_optimization": {"stage": min(plan.zero, 1)},
        "bf16": {"enabled": plan.dtype == "bf16"},
    }
    if plan.dtype == "fp16":
        cfg["fp16"] = {"enabled": True}
    return cfg


def _warnings(plan: Plan, blocks: ModelBlocks) -> list[str]:
    w = []
    if plan.schedule != "1f1b":
        w.append(f"schedule {plan.schedule}: DeepSpeed's pipeline engine runs only its 1F1B TrainSchedule"
                 + (" (backward not split into I and W)" if plan.schedule in ("zb-h1", "zbv", "dualpipev") else ""))
    if len(plan.stages) > plan.pp:
        v = len(plan.stages) // plan.pp
        w.append(f"{v} stages per rank ({plan.schedule}): DeepSpeed runs one contiguous stage per rank; the parts merge "
                 f"each {v} consecutive stages of the plan (cuts {rank_parts(plan)[1:-1]} of {list(plan.boundaries)})")
    if plan.zero >= 2:
        w.append(f"zero={plan.zero}: DeepSpeed's pipeline engine allows ZeRO stage 0 or 1 only "
                 "(\"ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism\"); the config says stage 1")
    if plan.tp > 1:
        w.append(f"tp={plan.tp}: DeepSpeed does not shard layers; the topology reserves {plan.tp} model-parallel ranks, and "
                 "the layers must be tensor-parallel themselves (Megatron-DeepSpeed)"
                 + ("" if any(blocks.layer_shaped) else f"; model {plan.model!r} declares no transformer layer shape, so it has no TP plan"))
    if plan.sequence_parallel:
        w.append("sequence_parallel: DeepSpeed's pipeline engine has no Megatron-style sequence parallelism")
    if plan.recompute == "selective":
        w.append("recompute=selective: DeepSpeed checkpoints whole layers (activation_checkpoint_interval) only; not set")
    elif plan.recompute == "full" and not all(st.recompute and st.recompute_layers in (0, st.num_blocks) for st in plan.stages):
        w.append(f"recompute on stages {[st.index for st in plan.stages if st.recompute]} only: DeepSpeed's "
                 "activation_checkpoint_interval applies to every stage; set to 1 (every layer)")
    if plan.precision == "amp-autocast" and plan.dtype != "fp32":
        w.append(f"precision amp-autocast: DeepSpeed's {plan.dtype} mode keeps {plan.dtype} weights with fp32 master copies, "
                 "not fp32 weights under autocast")
    for name, ranks in tied_across_stages(plan, blocks, rank_parts(plan)):
        w.append(f"tied parameter {name} is held by stages {ranks}: DeepSpeed all-reduces tied weights only for layers "
                 "declared with TiedLayerSpec; plain blocks on different stages train separate copies")
    return w


def _module_text(plan: Plan, blocks: ModelBlocks, parts: list[int], method: str | None, warn: list[str]) -> str:
    interval = 1 if plan.recompute == "full" else 0
    head = [f'"""pipetrain plan for {plan.model}: DeepSpeed PipelineModule with the plan\'s split (generated by pipetrain export).',
            "",
            f"Names read in {DEEPSPEED_COMMIT} (deepspeed/runtime/pipe/module.py).",
            *warning_lines(warn),
            '"""', "", "from deepspeed.pipe import PipelineModule"]
    if plan.tp > 1:
        head.append("from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology")
    head += ["", f"NUM_STAGES = {plan.pp}",
             "#: layer boundaries: stage i builds layers PARTS[i] .. PARTS[i+1]-1 (the model's blocks, in order)",
             f"PARTS = {parts}",
             "#: module FQNs of the PipelineModel per stage, for reference",
             "STAGE_BLOCKS = " + repr([[f"blocks.{b}" for b in range(a, z)] for a, z in zip(parts, parts[1:])])]
    cls = "PipelineModule"
    if method is None:
        cls = "PlannedPipelineModule"
        head += ["", "", "class PlannedPipelineModule(PipelineModule):",
                 '    """PipelineModule whose partition is the plan\'s: no partition_method of DeepSpeed gives it."""', "",
                 "    def _partition_layers(self, method='uniform'):",
                 "        num_stages = self._topo.get_dim('pipe')",
                 "        if num_stages != len(PARTS) - 1:",
                 "            raise ValueError(f'the plan has {len(PARTS) - 1} pipeline stages, the topology {num_stages}')",
                 "        stage_id = self._topo.get_coord(self.global_rank).pipe",
                 "        self.parts = list(PARTS)",
                 "        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])"]
    topo = (f"topology=PipeModelDataParallelTopology(num_pp={plan.pp}, num_mp={plan.tp}, num_dp={plan.dp})"
            if plan.tp > 1 else "num_stages=NUM_STAGES")
    head += ["", "", "def pipeline_module(model, loss_fn, **kwargs):",
             '    """``model``: the pipetrain PipelineModel (its ``blocks`` become the layers); ``loss_fn(output, target)``."""',
             f"    return {cls}(layers=list(model.blocks), {topo}, loss_fn=loss_fn,",
             f"        partition_method={method or 'uniform'!r}, activation_checkpoint_interval={interval}, **kwargs)"]
    return "\n".join(head) + "\n"


def export_deepspeed(plan: Plan, blocks: ModelBlocks) -> ExportResult:
    blocks.check(plan)
    parts = rank_parts(plan)
    method = partition_method(parts, blocks)
    warn = _warnings(plan, blocks)
    files = (ExportFile(name=CONFIG_NAME, text=json.dumps(deepspeed_config(plan), indent=2) + "\n"),
             ExportFile(name=MODULE_NAME, text=_module_text(plan, blocks, parts, method, warn)))
    return ExportResult(target="deepspeed", files=files, warnings=tuple(warn))
