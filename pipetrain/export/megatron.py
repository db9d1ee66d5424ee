"""Export to Megatron-LM: the command-line arguments of ``pretrain_gpt.py``.

Argument names and the layout syntax read in NVIDIA/Megatron-LM at commit
d98e8a64ddf34856e74b24714e3bedb2f5a39553 (2026-08-22):

* ``megatron/core/transformer/pipeline_parallel_layer_layout.py`` (``parse_str_to_list``): the
  layout lists the (virtual) stages in global order separated by ``|``; ``E`` embedding, ``t`` a
  transformer decoder layer, ``L`` the loss (final norm and output layer), ``x*n`` repeats; stage
  ``s`` runs on pipeline rank ``s % pp`` and the virtual size is ``stages / pp``. So the layout
  states an uneven split and interleaving at once: ``--num-layers-per-virtual-pipeline-stage`` and
  ``--num-virtual-stages-per-pipeline-rank`` may not be given with it (``arguments.py``).
* ``megatron/training/arguments.py`` (``--pipeline-model-parallel-layout``, ``--use-distributed-optimizer``,
  ``--seq-length``); the dataclass fields turned into flags by ``ArgumentGroupFactory``
  (``--tensor-model-parallel-size``, ``--pipeline-model-parallel-size``, ``--sequence-parallel``,
  ``--bf16``, ``--fp16`` from ``ModelParallelConfig``; ``--num-layers``, ``--recompute-granularity``
  {full, selective}, ``--recompute-method`` {uniform, block}, ``--recompute-num-layers`` from
  ``TransformerConfig``; ``--micro-batch-size``, ``--global-batch-size`` from ``training_config.py``).
* ``TransformerConfig.__post_init__``: full recompute needs a method and a layer count; selective
  takes neither and applies to every layer (``recompute_modules`` default ``core_attn``).
"""

from __future__ import annotations

from pipetrain.export.common import ExportFile, ExportResult, ModelBlocks, warning_lines
from pipetrain.plan import Plan

__all__ = ["ARGS_NAME", "MEGATRON_COMMIT", "layout_string", "megatron_args", "export_megatron"]

ARGS_NAME = "megatron_args.sh"
MEGATRON_COMMIT = "NVIDIA/Megatron-LM@d98e8a64ddf34856e74b24714e3bedb2f5a39553"
_CHAR = {"embedding": "E", "head": "L"}


def _run(ch: str, n: int) -> str:
    return ch if n == 1 else f"{ch}*{n}"


def _stage_chars(plan: Plan, blocks: ModelBlocks) -> list[str]:
    """Each stage's blocks as layout characters; Megatron's GPTModel always has its embedding
    first and its loss last, so stage 0 starts with ``E`` and the last stage ends with ``L``
    whether or not the model has such blocks."""
    out = []
    last = len(plan.stages) - 1
    for st in plan.stages:
        chars = "".join(_CHAR.get(blocks.kinds[b], "t") for b in range(st.block_start, st.block_end))
        if st.index == 0 and not chars.startswith("E"):
            chars = "E" + chars
        if st.index == last and not chars.endswith("L"):
            chars += "L"
        out.append(chars)
    return out


def layout_string(stage_chars: list[str]) -> str:
    """``["Ettt", "tttt", "ttL"]`` -> ``"Et*3|t*4|t*2L"`` (runs of a character as ``x*n``)."""
    parts = []
    for chars in stage_chars:
        s, i = "", 0
        while i < len(chars):
            j = i
            while j < len(chars) and chars[j] == chars[i]:
                j += 1
            s += _run(chars[i], j - i)
            i = j
        parts.append(s)
    return "|".join(parts)


def _recompute(plan: Plan, blocks: ModelBlocks, stage_chars: list[str], warn: list[str]) -> list[str]:
    if plan.recompute == "none":
        return []
    flagged = [st.index for st in plan.stages if st.recompute]
    if plan.recompute == "selective":
        if len(flagged) < len(plan.stages):
            warn.append(f"recompute=selective on stages {flagged} only: Megatron-LM's selective recompute applies to every "
                        "layer of every stage")
        return ["--recompute-granularity selective"]
    # full: Megatron's block method recomputes the first N transformer layers of every (virtual) stage
    layers = []
    for st, chars in zip(plan.stages, stage_chars):
        t = chars.count("t")
        layers.append(min(st.recompute_layers or st.num_blocks, t) if st.recompute else 0)
    all_layers = all(n == chars.count("t") for n, chars in zip(layers, stage_chars))
    if all_layers:  # every layer recomputed: one layer per uniform unit
        return ["--recompute-granularity full", "--recompute-method uniform", "--recompute-num-layers 1"]
    n = max(layers)
    if len(set(layers)) > 1:
        warn.append(f"recompute=full with {layers} layers recomputed per stage: Megatron-LM recomputes the same number "
                    f"in every stage (--recompute-method block --recompute-num-layers {n}); stages with fewer recompute more")
    return ["--recompute-granularity full", "--recompute-method block", f"--recompute-num-layers {n}"]


def megatron_args(plan: Plan, blocks: ModelBlocks) -> tuple[list[str], list[str]]:
    """(arguments, one ``--flag value`` per entry; warnings)."""
    blocks.check(plan)
    warn: list[str] = []
    other = sorted({k for k in blocks.kinds if k not in ("embedding", "transformer", "head")})
    if other:
        warn.append(f"model {plan.model!r} has blocks of kind {', '.join(other)}, which are not Megatron-LM layers: the layout "
                    "counts them as transformer layers 't'; Megatron-LM trains its own GPT model, not this one")
    chars = _stage_chars(plan, blocks)
    args = [f"--tensor-model-parallel-size {plan.tp}", f"--pipeline-model-parallel-size {plan.pp}",
            f"--num-layers {sum(c.count('t') for c in chars)}",
            f'--pipeline-model-parallel-layout "{layout_string(chars)}"',
            f"--micro-batch-size {plan.micro_batch_size}", f"--global-batch-size {plan.global_batch}",
            f"--seq-length {plan.seq_len}"]
    if plan.sequence_parallel:
        args.append("--sequence-parallel")
    if plan.zero >= 1:
        args.append("--use-distributed-optimizer")
    if plan.zero >= 2:
        warn.append(f"zero={plan.zero}: Megatron-LM's distributed optimizer shards the optimizer state only (ZeRO-1, full "
                    "gradient buffers); ZeRO-2/3 is Megatron-FSDP (--use-megatron-fsdp --data-parallel-sharding-strategy "
                    f"{'optim_grads' if plan.zero == 2 else 'optim_grads_params'}) instead")
    if plan.dtype == "bf16":
        args.append("--bf16")
    elif plan.dtype == "fp16":
        args.append("--fp16")
    if plan.precision == "amp-autocast":
        warn.append(f"precision amp-autocast: Megatron-LM keeps {plan.dtype} weights with fp32 main weights and gradients "
                    f"(--{plan.dtype}), not fp32 weights cast per use under autocast")
    args += _recompute(plan, blocks, chars, warn)
    if plan.tp > 1 and not any(blocks.layer_shaped):
        warn.append(f"tp={plan.tp}: model {plan.model!r} declares no transformer layer shape, so it has no tensor-parallel "
                    "plan; Megatron-LM shards only its own layers")
    sched = plan.schedule
    if sched == "gpipe":
        warn.append("schedule gpipe: Megatron-LM has no GPipe; it runs 1F1B (the same losses, fewer activations in flight)")
    elif sched == "zb-h1":
        warn.append("schedule zb-h1: Megatron-LM has no zero-bubble schedule; it runs 1F1B (backward not split into I and W)")
    elif sched in ("zbv", "dualpipev"):
        warn.append(f"schedule {sched}: Megatron-LM has no V placement; the layout keeps the plan's block ranges but runs "
                    f"stage s on rank s % {plan.pp} with the interleaved 1F1B schedule")
    return args, warn


def export_megatron(plan: Plan, blocks: ModelBlocks) -> ExportResult:
    args, warn = megatron_args(plan, blocks)
    lines = [f"# pipetrain plan for {plan.model}: pp={plan.pp} x dp={plan.dp} x tp={plan.tp}, schedule {plan.schedule}"
             + (f" ({plan.chunks} virtual stages per rank)" if plan.chunks > 1 else ""),
             f"# Megatron-LM arguments, names read in {MEGATRON_COMMIT}",
             f"# launch on {plan.world_size} GPUs: Megatron infers data-parallel size {plan.dp} = world / (tp * pp);",
             f"# {plan.num_microbatches} micro-batches per step = global batch / (micro-batch size * dp).",
             "# usage: source megatron_args.sh; torchrun ... pretrain_gpt.py \"${MEGATRON_ARGS[@]}\" <model and data args>"]
    lines += warning_lines(warn, "# ")
    lines.append("MEGATRON_ARGS=(")
    lines += [f"    {a}" for a in args]
    lines.append(")")
    return ExportResult(target="megatron", files=(ExportFile(name=ARGS_NAME, text="\n".join(lines) + "\n"),), warnings=tuple(warn))
