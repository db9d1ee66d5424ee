"""Tensor parallelism and ZeRO-1/2/3 of one rank's stages, on PyTorch's own APIs (as torchtitan does).

* **Mesh** (:func:`make_mesh`): ``init_device_mesh`` with dims ``("dp", "pp", "tp")``, tp
  innermost: global rank ``(dp_rank * pp + pp_rank) * tp + tp_rank``. torchtitan orders its
  dims ``pp, dp, tp``; pipetrain keeps dp outermost so that a ``tp == 1`` plan keeps the rank
  layout it always had (replica ``d`` on ranks ``d*pp .. d*pp+pp-1``), which the launcher's
  failure messages, checkpoints and telemetry readers assume.
* **Tensor parallelism** (:func:`parallelize_stage`): ``parallelize_module`` on each block of a
  stage. Transformer blocks (GPT-2, Llama, BERT) take Megatron's split (Shoeybi et al. 2019): the
  attention's q, k and v projections and the MLP's first linear(s) column-parallel, the attention
  output and the MLP's last linear row-parallel, each rank attending over its ``heads / tp`` heads
  (and ``kv_heads / tp`` with GQA). GPT-2's fused ``c_attn`` (rows q | k | v) is permuted once at
  start-up to rows ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (``_t``: tp rank t's heads) so that a
  plain column shard holds one rank's q, k and v heads; :func:`full_state` permutes back. The
  embedding and head are vocabulary-parallel (Narayanan et al. 2021, sec. 2.3; what the planner
  prices, ``program/shard.py``): the token table row-wise (torchtitan's ``RowwiseParallel`` on the
  embedding), the head's projection column-wise with its logits left sharded on the vocabulary, and
  the loss computed under ``loss_parallel`` (:func:`loss_context`). GPT-2's and BERT's heads
  multiply by the embedding's table: one ``Shard(0)`` DTensor held by both blocks (rows =
  vocabulary, which is the head's column split), so the tie stays one Parameter on a rank and each
  tp rank's copy on another pipeline rank is the same shard. With ``sequence_parallel`` the norms
  run on sequence shards (``SequenceParallel``): a stage takes its local sequence slice of the
  (replicated) stage input at its first block unless that is the embedding (which reduce-scatters
  to sequence shards), and all-gathers its last block's output unless that is the head, so tensors
  crossing stages stay plain full tensors. BERT's post-LN blocks split without it only
  (:func:`check_tensor_parallel`).
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

__all__ = ["MESH_DIMS", "uses_mesh", "make_mesh", "check_tensor_parallel", "parallelize_stage", "loss_context", "shard_stage",
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
    from pipetrain.planner.zoo.bert import BertBlock
    from pipetrain.planner.zoo.gpt import GPTBlock
    from pipetrain.planner.zoo.llama import LlamaBlock

    return (GPTBlock, LlamaBlock, BertBlock)


def _vocab_blocks() -> tuple[tuple[type[nn.Module], ...], tuple[type[nn.Module], ...]]:
    """The embedding and head blocks the executor splits over the vocabulary."""
    from pipetrain.planner.zoo.bert import BertEmbedding, BertMLMHead
    from pipetrain.planner.zoo.gpt import GPTEmbedding, GPTHead
    from pipetrain.planner.zoo.llama import LlamaEmbedding, LlamaHead

    return (GPTEmbedding, LlamaEmbedding, BertEmbedding), (GPTHead, LlamaHead, BertMLMHead)


def check_tensor_parallel(model: nn.Module, tp: int, *, sequence_parallel: bool = False) -> None:
    """Refuse ``tp`` for a model whose blocks the executor cannot split tp ways (transformer blocks
    by heads and MLP columns, embedding and head by vocabulary, as the planner prices them)."""
    if tp == 1:
        return
    from pipetrain.planner.zoo.bert import BertBlock
    from pipetrain.planner.zoo.llama import LlamaBlock

    blocks: list[Any] = list(getattr(model, "blocks", []))
    kinds = _tp_blocks()
    embeds, heads_ = _vocab_blocks()
    if not any(isinstance(b, kinds) for b in blocks):
        raise PlanError(f"tp={tp}: the executor splits only GPT-2, Llama and BERT transformer blocks (GPTBlock, LlamaBlock, "
                        "BertBlock) over tensor-parallel ranks and this model has none: re-plan with tp 1")
    for i, b in enumerate(blocks):
        kind = getattr(b, "kind", "")
        if kind == "transformer" and not isinstance(b, kinds):
            raise PlanError(f"tp={tp}: block {i} ({type(b).__name__}) has no tensor-parallel split in the executor "
                            "(GPTBlock, LlamaBlock and BertBlock do): re-plan with tp 1")
        if kind in ("embedding", "head") and not isinstance(b, embeds + heads_):
            raise PlanError(f"tp={tp}: {kind} block {i} ({type(b).__name__}) has no vocabulary-parallel split in the executor "
                            "(the GPT-2, Llama and BERT ones do): re-plan with tp 1")
        if sequence_parallel and isinstance(b, BertBlock):
            # post-LN: the residual stream is the norm's output, which attention and MLP need whole and
            # the residual add sequence-sharded; the split the planner prices (pre-LN) does not exist
            raise PlanError(f"tp={tp} with sequence parallelism: block {i} (BertBlock) is post-LN, which the executor "
                            "splits without it only: re-plan with sequence_parallel off")
        if not isinstance(b, kinds):
            continue
        blk: Any = b  # (isinstance narrowed b to a Module, whose attributes mypy types as Tensor | Module)
        heads = int(blk.n_head)
        kv = int(blk.n_kv_head) if isinstance(b, LlamaBlock) else heads
        ffn = int((blk.w1 if isinstance(b, LlamaBlock) else blk.intermediate if isinstance(b, BertBlock) else blk.c_fc).out_features)
        for what, n in (("attention heads", heads), ("key/value heads", kv), ("MLP width", ffn)):
            if n % tp:
                raise PlanError(f"tp={tp} does not divide block {i}'s {n} {what}: re-plan with a tp that divides it")


def _qkv_permutation(d_model: int, tp: int) -> torch.Tensor:
    """Row order of GPT-2's fused qkv projection that puts tp rank t's q, k and v heads in its shard."""
    c = d_model // tp
    parts = [torch.arange(t * c, (t + 1) * c) + j * d_model for t in range(tp) for j in range(3)]
    return torch.cat(parts)


def _shard_vocab(module: nn.Module, name: str, tp_mesh: Any) -> None:
    """Make ``module.<name>`` (a tied embedding table, or a vocabulary bias) one DTensor sharded on
    dim 0 (the vocabulary) over tp, unless it is one already (its embedding block on this rank
    split it first). Registered on the module both blocks hold, so the tie stays one Parameter.
    ``src_data_rank=None``: every rank holds the same full tensor (same seed, tie broadcast) and
    keeps its own rows, no scatter."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    p = getattr(module, name)
    if isinstance(p, DTensor):
        return
    module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, tp_mesh, [Shard(0)], src_data_rank=None),
                                                 requires_grad=p.requires_grad))


def parallelize_stage(module: nn.Module, tp_mesh: Any, *, sequence_parallel: bool) -> None:
    """Split the blocks of ``module`` (a StageModule) over ``tp_mesh``, in place (module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from pipetrain.planner.zoo.bert import BertBlock, BertMLMHead
    from pipetrain.planner.zoo.gpt import GPTBlock, GPTEmbedding, GPTHead
    from pipetrain.planner.zoo.llama import LlamaBlock, LlamaEmbedding, LlamaHead

    tp = tp_mesh.size()
    kinds = _tp_blocks()
    embeds, heads = _vocab_blocks()
    stage: Any = module
    order = [stage.blocks[str(i)] for i in stage.order]
    sp = sequence_parallel
    # the column-parallel inputs arrive replicated: with sequence parallelism each norm's output is
    # all-gathered once, at the norm (below); the row-parallel outputs are reduce-scattered back to
    # sequence shards
    col = ColwiseParallel()
    row = RowwiseParallel(output_layouts=Shard(1)) if sp else RowwiseParallel()
    # embeddings before heads: a head whose tied table's embedding block is on this rank finds it split
    for b in sorted(order, key=lambda m: not isinstance(m, embeds)):
        if isinstance(b, embeds):
            # vocabulary-parallel (Megatron's VocabParallelEmbedding): each rank looks up its rows and the
            # partial sums are all-reduced, or reduce-scattered to sequence shards under sp
            table = "wte" if isinstance(b, GPTEmbedding) else "tok_embeddings" if isinstance(b, LlamaEmbedding) else "word_embeddings"
            parallelize_module(b, tp_mesh, {table: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate())})
            if sp and isinstance(b, GPTEmbedding):
                # the positional table stays whole; its [T, d] output is added to this rank's sequence slice
                parallelize_module(b.wpe, tp_mesh, PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(0),
                                                                        use_local_output=True))
            continue
        if isinstance(b, heads):
            # vocabulary-parallel head: logits stay sharded on the vocabulary (a DTensor), and the loss runs
            # under loss_parallel (the runtime), which never gathers them
            if isinstance(b, LlamaHead):
                style: dict[str, Any] = {"output": ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                                                                   use_local_output=False)}
                if sp:
                    style["norm"] = SequenceParallel()
                parallelize_module(b, tp_mesh, style)
                continue
            # GPT-2 and BERT: F.linear with the tied table, already Shard(0) over the vocabulary (the
            # column split of the head's weight); its input a replicated DTensor
            if isinstance(b, GPTHead):
                _shard_vocab(b.wte, "weight", tp_mesh)
                norm = "ln_f"
            else:
                assert isinstance(b, BertMLMHead)
                _shard_vocab(b.word_embeddings, "weight", tp_mesh)
                _shard_vocab(b, "decoder_bias", tp_mesh)
                norm = "LayerNorm"
            if sp:
                parallelize_module(b, tp_mesh, {norm: SequenceParallel()})
            parallelize_module(getattr(b, norm), tp_mesh, PrepareModuleOutput(output_layouts=Shard(1) if sp else Replicate(),
                                                                              desired_output_layouts=Replicate(), use_local_output=False))
            continue
        if not isinstance(b, kinds):
            continue
        if isinstance(b, GPTBlock):
            perm = _qkv_permutation(b.c_attn.in_features, tp)
            with torch.no_grad():
                b.c_attn.weight.copy_(b.c_attn.weight[perm])
                b.c_attn.bias.copy_(b.c_attn.bias[perm])
            b.qkv_permutation = perm  # full_state undoes it
            style = {"c_attn": col, "c_proj": row, "c_fc": col, "mlp_proj": row}
            norms: tuple[str, ...] = ("ln_1", "ln_2")
            b.n_head //= tp
        elif isinstance(b, LlamaBlock):
            style = {"wq": col, "wk": col, "wv": col, "wo": row, "w1": col, "w3": col, "w2": row}
            norms = ("attention_norm", "ffn_norm")
            b.n_head //= tp
            b.n_kv_head //= tp
        else:  # BertBlock, without sequence parallelism (check_tensor_parallel): post-LN norms run whole
            assert isinstance(b, BertBlock) and not sp
            style = {"query": col, "key": col, "value": col, "attn_out": row, "intermediate": col, "output": row}
            norms = ()
            b.n_head //= tp
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
    if sp and order:
        # the stage's boundary tensors are full (point-to-point sends them): a stage that does not start
        # with the embedding (which reduce-scatters to sequence shards itself) takes its sequence slice
        # at its first block (no communication; the backward all-gathers the slice gradients), and one
        # that does not end with the head (whose logits go to the loss) all-gathers its last block's output
        if not isinstance(order[0], embeds):
            parallelize_module(order[0], tp_mesh, PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                                     use_local_output=True))
        if not isinstance(order[-1], heads):
            parallelize_module(order[-1], tp_mesh, PrepareModuleOutput(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),),
                                                                       use_local_output=True))


def loss_context(plan: Plan) -> Any:
    """The context the last stage computes its loss and runs its backward in: ``loss_parallel``
    under tensor parallelism (the head's logits are sharded on the vocabulary: each rank's
    cross-entropy reduces its max, sum-exp and target logit over tp, never the logits), else None."""
    if plan.tp == 1:
        return None
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel


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
    """Bring every DTensor gradient to its parameter's placement; return how many moved.

    Under sequence parallelism a norm's weight is replicated but each tp rank sees only its
    sequence slice, so DTensor leaves its gradient ``Partial``: a pending sum over tp. The
    optimizer would reduce it implicitly inside every op; the norm would square the partials.
    Reducing once here (one all-reduce per such parameter) makes every later step plain. The
    vocabulary-parallel embedding's gradient may come back replicated (DTensor's strategy for the
    embedding backward of a sequence-sharded output gradient): its rows are then sliced to the
    parameter's shard (no communication), which the tied-gradient all-reduce and the optimizer
    expect."""
    from torch.distributed.tensor import DTensor

    n = 0
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)
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
