"""Tensor parallelism and ZeRO-1/2/3 of one rank's stages, on PyTorch's own APIs (as torchtitan does).

* **Mesh** (:func:`make_mesh`): ``init_device_mesh`` with dims ``("dp", "pp", "tp")``, tp
  innermost: global rank ``(dp_rank * pp + pp_rank) * tp + tp_rank``. torchtitan orders its
  dims ``pp, dp, tp``; pipetrain keeps dp outermost so that a ``tp == 1`` plan keeps the rank
  layout it always had (replica ``d`` on ranks ``d*pp .. d*pp+pp-1``), which the launcher's
  failure messages, checkpoints and telemetry readers assume.
* **Tensor parallelism** (:func:`parallelize_stage`): ``parallelize_module`` on each transformer
  block of a stage, Megatron's split (Shoeybi et al. 2019): the attention's q, k and v
  projections and the MLP's first linear(s) column-parallel, the attention output and the MLP's
  last linear row-parallel, each rank attending over its ``heads / tp`` heads (and ``kv_heads /
  tp`` with GQA). GPT-2's fused ``c_attn`` (rows q | k | v) is permuted once at start-up to rows
  ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (``_t``: tp rank t's heads) so that a plain column shard
  holds one rank's q, k and v heads; :func:`full_state` permutes back. With
  ``sequence_parallel`` the norms run on sequence shards (``SequenceParallel``): a stage's first
  block takes its local sequence slice of the (replicated) stage input and its last block
  all-gathers the output, so tensors crossing stages stay plain full tensors. Embedding and head
  blocks stay replicated over tp: every tp rank computes the same values and the same
  gradients, which the gradient norm counts once.
* **ZeRO** (:func:`shard_stage`): FSDP2 ``fully_shard`` of each stage on the dp dim; the
  optimizer updates only this rank's shard and the next forward all-gathers the parameters.
  The reduction is a SUM (the losses are already scaled by ``1/(m*dp)``): FSDP2's default
  averages with ``PREMUL_SUM``, which gloo lacks, hence a divide factor of 1 with sum-only
  collectives. The stages differ in when FSDP2 reduce-scatters and reshards
  (:func:`before_backward`):

  - ZeRO-1: ``reshard_after_forward=False``; gradients accumulate unsharded over the
    micro-batches and are reduce-scattered only in the last micro-batch's backward, after
    which the parameters are resharded: Megatron's distributed optimizer, with the parameters
    also sharded between steps (as torch.distributed.pipelining runs FSDP2);
  - ZeRO-2: ``reshard_after_forward=False``; every micro-batch's backward reduce-scatters its
    gradient into the sharded accumulator, so no rank holds a whole gradient between
    micro-batches; parameters stay gathered until the last backward;
  - ZeRO-3: ``reshard_after_forward=True``; parameters are all-gathered for each forward and
    again for each backward, and resharded after both; gradients as ZeRO-2.

  With ``param_dtype`` (bf16-mixed, :func:`mixed_precision`) FSDP2 keeps the fp32 sharded
  parameters as the optimizer's master weights, all-gathers and computes in bf16 and
  reduce-scatters the gradients in fp32 (torchtitan's ``MixedPrecisionPolicy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipetrain.errors import PlanError
from pipetrain.plan import Plan

if TYPE_CHECKING:
    from pipetrain.executor.comm import RankLayout

__all__ = ["MESH_DIMS", "uses_mesh", "make_mesh", "check_tensor_parallel", "parallelize_stage", "shard_stage",
           "before_backward", "mixed_precision", "reduce_partial_grads", "local", "counts_in_norm", "full_state"]

#: The mesh's dims, outermost first (see module docstring for why dp is outermost).
MESH_DIMS = ("dp", "pp", "tp")


def uses_mesh(plan: Plan) -> bool:
    """Whether the executor runs ``plan`` on a device mesh (tensor parallelism or ZeRO); a plain
    pp x dp plan keeps its explicit process groups, exactly as before the mesh existed."""
    return plan.tp > 1 or plan.zero > 0


def make_mesh(plan: Plan, device_type: str) -> Any:
    """The ``(dp, pp, tp)`` device mesh over all ranks (collective: every rank calls it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (plan.dp, plan.pp, plan.tp), mesh_dim_names=MESH_DIMS)


def _tp_blocks() -> tuple[type[nn.Module], ...]:
    from pipetrain.planner.zoo.gpt import GPTBlock
    from pipetrain.planner.zoo.llama import LlamaBlock

    return (GPTBlock, LlamaBlock)


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Refuse ``tp`` for a model whose transformer blocks the executor cannot split tp ways."""
    if tp == 1:
        return
    from pipetrain.planner.zoo.llama import LlamaBlock

    blocks: list[Any] = list(getattr(model, "blocks", []))
    kinds = _tp_blocks()
    if not any(isinstance(b, kinds) for b in blocks):
        raise PlanError(f"tp={tp}: the executor splits only GPT-2 and Llama transformer blocks (GPTBlock, LlamaBlock) over "
                        "tensor-parallel ranks and this model has none: re-plan with tp 1")
    for i, b in enumerate(blocks):
        if getattr(b, "kind", "") == "transformer" and not isinstance(b, kinds):
            raise PlanError(f"tp={tp}: block {i} ({type(b).__name__}) has no tensor-parallel split in the executor "
                            "(GPTBlock and LlamaBlock do): re-plan with tp 1")
        if not isinstance(b, kinds):
            continue
        llama = isinstance(b, LlamaBlock)
        blk: Any = b  # (isinstance narrowed b to a Module, whose attributes mypy types as Tensor | Module)
        heads = int(blk.n_head)
        kv = int(blk.n_kv_head) if llama else heads
        ffn = int((blk.w1 if llama else blk.c_fc).out_features)
        for what, n in (("attention heads", heads), ("key/value heads", kv), ("MLP width", ffn)):
            if n % tp:
                raise PlanError(f"tp={tp} does not divide block {i}'s {n} {what}: re-plan with a tp that divides it")


def _qkv_permutation(d_model: int, tp: int) -> torch.Tensor:
    """Row order of GPT-2's fused qkv projection that puts tp rank t's q, k and v heads in its shard."""
    c = d_model // tp
    parts = [torch.arange(t * c, (t + 1) * c) + j * d_model for t in range(tp) for j in range(3)]
    return torch.cat(parts)


def parallelize_stage(module: nn.Module, tp_mesh: Any, *, sequence_parallel: bool) -> None:
    """Split every transformer block of ``module`` (a StageModule) over ``tp_mesh``, in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from pipetrain.planner.zoo.gpt import GPTBlock
    from pipetrain.planner.zoo.llama import LlamaBlock

    tp = tp_mesh.size()
    kinds = _tp_blocks()
    blocks = [b for b in module.modules() if isinstance(b, kinds)]
    sp = sequence_parallel
    # the column-parallel inputs arrive replicated: with sequence parallelism each norm's output is
    # all-gathered once, at the norm (below); the row-parallel outputs are reduce-scattered back to
    # sequence shards
    col = ColwiseParallel()
    row = RowwiseParallel(output_layouts=Shard(1)) if sp else RowwiseParallel()
    for b in blocks:
        if isinstance(b, GPTBlock):
            perm = _qkv_permutation(b.c_attn.in_features, tp)
            with torch.no_grad():
                b.c_attn.weight.copy_(b.c_attn.weight[perm])
                b.c_attn.bias.copy_(b.c_attn.bias[perm])
            b.qkv_permutation = perm  # full_state undoes it
            style: dict[str, Any] = {"c_attn": col, "c_proj": row, "c_fc": col, "mlp_proj": row}
            norms = ("ln_1", "ln_2")
            b.n_head //= tp
        elif isinstance(b, LlamaBlock):
            style = {"wq": col, "wk": col, "wv": col, "wo": row, "w1": col, "w3": col, "w2": row}
            norms = ("attention_norm", "ffn_norm")
            b.n_head //= tp
            b.n_kv_head //= tp
        if sp:
            style.update({n: SequenceParallel() for n in norms})
        parallelize_module(b, tp_mesh, style)
        if sp:
            # one all-gather per norm, as torchtitan's PrepareModuleInput on attention and feed-forward:
            # with ColwiseParallel(input_layouts=Shard(1)) every column-parallel linear gathers and its
            # matmul saves its own copy, five a Llama layer (q, k, v, w1, w3) where Megatron's count of
            # collectives and Korthikanti's of activations (``activations.py``) have two
            for n in norms:
                parallelize_module(getattr(b, n), tp_mesh, PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                                                                               use_local_output=False))
    if sp and blocks:
        # the stage's boundary tensors are full: its first block takes its sequence slice (no
        # communication; the backward all-gathers the slice gradients), its last block all-gathers
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                                   use_local_output=True))
        parallelize_module(blocks[-1], tp_mesh, PrepareModuleOutput(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),),
                                                                     use_local_output=True))


def mixed_precision(precision: str) -> Any:
    """FSDP2's policy for a plan's precision: bf16-mixed computes in bf16 and reduces in fp32
    (torchtitan's default); anything else keeps the parameters' own dtype (None)."""
    if precision != "bf16-mixed":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_stage(module: nn.Module, dp_mesh: Any, zero: int = 1, precision: str = "fp32") -> None:
    """ZeRO-``zero`` of one stage: FSDP2 over ``dp_mesh`` (see module docstring), in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if zero not in (1, 2, 3):
        raise PlanError(f"zero={zero}: FSDP2 shards a stage for ZeRO-1, 2 or 3 only")
    mp = mixed_precision(precision) or MixedPrecisionPolicy()
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=zero == 3, mp_policy=mp)
    fsdp: Any = module
    fsdp.set_gradient_divide_factor(1.0)  # losses carry 1/(m*dp): the reduction is a plain sum
    fsdp.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def before_backward(module: nn.Module, zero: int, last: bool) -> None:
    """Before a backward of an FSDP2 stage (``last``: the step's last one for this stage).

    ZeRO-1 reduce-scatters (and reshards) only in the last micro-batch's backward; before it
    gradients accumulate unsharded (as torch.distributed.pipelining). ZeRO-2 and 3 reduce-scatter
    in every backward; ZeRO-2 keeps the parameters gathered until the last one, ZeRO-3 reshards
    after each (its next forward gathers them again)."""
    fsdp: Any = module
    fsdp.set_is_last_backward(last)
    fsdp.set_reshard_after_backward(last or zero == 3)
    fsdp.set_requires_gradient_sync(last or zero >= 2)


def reduce_partial_grads(params: list[nn.Parameter]) -> int:
    """Reduce gradients left as partial sums over tp to their parameter's placement; return how many.

    Under sequence parallelism a norm's weight is replicated but each tp rank sees only its
    sequence slice, so DTensor leaves its gradient ``Partial``: a pending sum over tp. The
    optimizer would reduce it implicitly inside every op; the norm would square the partials.
    Reducing once here (one all-reduce per such parameter) makes every later step plain."""
    from torch.distributed.tensor import DTensor, Partial

    n = 0
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(isinstance(pl, Partial) for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements if isinstance(p, DTensor) else None)
            n += 1
    return n


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def counts_in_norm(grad: torch.Tensor, layout: RankLayout) -> bool:
    """Whether this rank's part of ``grad`` enters the global gradient norm: each element counts
    on exactly one rank. A DTensor counts on every rank of a mesh dim it is sharded on and on
    coordinate 0 of one it is replicated on; a dp or tp dim it does not span (a replicated
    parameter, or dp without ZeRO after the all-reduce) counts at rank 0 of that dim."""
    from torch.distributed.tensor import DTensor, Replicate

    names: tuple[str, ...] = ()
    if isinstance(grad, DTensor):
        mesh = grad.device_mesh
        names = tuple(mesh.mesh_dim_names or ())
        coord = mesh.get_coordinate() or [0] * mesh.ndim
        for i, pl in enumerate(grad.placements):
            if isinstance(pl, Replicate) and coord[i] != 0:
                return False
    if "tp" not in names and layout.tp_rank != 0:
        return False
    return "dp" in names or layout.dp_rank == 0


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as full tensors in the model's own layout (collective over the
    mesh: every rank of the stage calls it): DTensors gathered, GPT-2's qkv rows permuted back."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for k, v in module.state_dict().items():
        out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
    for name, sub in module.named_modules():
        perm = getattr(sub, "qkv_permutation", None)
        if perm is None:
            continue
        inv = torch.argsort(perm)
        for leaf in ("weight", "bias"):
            key = f"{name}.c_attn.{leaf}"
            out[key] = out[key][inv]
    return out
