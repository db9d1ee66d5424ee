"""Build one rank's stages: the model on ``meta``, only this rank's blocks materialized.

Blocks are initialized by the zoo from ``(seed, block index)`` alone, so a stage's weights are
bit-identical to the same blocks of the single-device model. A tied parameter (GPT-2's
embedding and head) whose owner block lives on another rank is broadcast from the owner at
start-up (see :mod:`pipetrain.executor.comm`); tied blocks on one rank share the submodule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipetrain.errors import ModelError, PlanError
from pipetrain.plan import Plan, StagePlan, TensorSpec

if TYPE_CHECKING:
    from pipetrain.planner.zoo import ModelSpec, PipelineModel

__all__ = ["StageModule", "load_spec", "build_meta", "materialize_blocks", "retie", "boundary_specs",
           "check_boundaries", "stage_modules", "vocab_size_of", "dtype_name", "microbatch_mean_loss"]


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class StageModule(nn.Module):
    """Blocks ``[start, end)`` of a PipelineModel, keyed by their global index.

    ``state_dict`` keys are ``blocks.{i}.*``, the same as the full model's.
    """

    def __init__(self, blocks: dict[int, nn.Module]) -> None:
        super().__init__()
        self.order = sorted(blocks)
        self.blocks = nn.ModuleDict({str(i): blocks[i] for i in self.order})
        self.full_recompute = frozenset(self.order)  # the blocks forward(recompute=True) checkpoints whole

    def set_recompute(self, mode: str, layers: int = 0) -> None:
        """Recompute the stage's first ``layers`` blocks (0: all of them), as Megatron's
        ``--recompute-method block --recompute-num-layers``: ``full`` checkpoints those blocks
        whole (:meth:`forward` with ``recompute``), ``selective`` only their attention cores
        (the blocks' own ``recompute_attention``: QK^T, softmax, dropout and P.V, Korthikanti et
        al. 2023 sec. 4.3), ``none`` nothing. Blocks without an attention core have nothing to
        recompute selectively. What :func:`pipetrain.memory.stage_memory` counts."""
        if mode not in ("none", "selective", "full"):
            raise PlanError(f"recompute {mode!r} is unknown; choose none, selective or full")
        if not 0 <= layers <= len(self.order):
            raise PlanError(f"recompute_layers {layers} is not in [0, {len(self.order)}] (the stage's blocks)")
        chosen = self.order[:layers or len(self.order)]
        self.full_recompute = frozenset(chosen) if mode == "full" else frozenset()
        for i in self.order:
            blk: Any = self.blocks[str(i)]
            if hasattr(blk, "recompute_attention"):
                blk.recompute_attention = mode == "selective" and i in chosen

    def forward(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """``recompute``: checkpoint each block of :attr:`full_recompute` on its own
        (``torch.utils.checkpoint``, non-reentrant), as Megatron's full recompute does per layer: a
        micro-batch keeps each such block's input, and the backward recomputes one block at a time
        (what :func:`pipetrain.memory.recompute_memory` counts). Called through the stage module
        itself so that wrappers' hooks (FSDP) still run."""
        if recompute and self.full_recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for i in self.order:
                blk = self.blocks[str(i)]
                x = checkpoint(blk, x, use_reentrant=False) if i in self.full_recompute else blk(x)
            return x
        for i in self.order:
            x = self.blocks[str(i)](x)
        return x


def microbatch_mean_loss(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """A step's loss, the mean of its micro-batches' losses (fp32, shape ``[1]``).

    The executor and the single-process reference both reduce through here: a sequential sum and
    ``torch.sum``'s vectorised one differ in the last bit for some losses, and the parity tests
    compare losses bit for bit."""
    return torch.stack([x.reshape(()).float() for x in losses]).sum().reshape(1) / len(losses)


def load_spec(name: str) -> ModelSpec:
    from pipetrain.planner.zoo import get_model_spec

    return get_model_spec(name)


def build_meta(spec: ModelSpec) -> PipelineModel:
    model = spec.build("meta")
    if not hasattr(model, "blocks"):
        raise ModelError(f"model {spec.name!r} has no `blocks`: the executor slices a PipelineModel into stages")
    return model


def ties_of(model: PipelineModel) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    from pipetrain.planner.zoo import tied_parameters

    return tuple((str(n), int(o), tuple(int(u) for u in us)) for n, o, us in tied_parameters(model))


def retie(model: PipelineModel, ties: Iterable[tuple[str, int, tuple[int, ...]]], blocks: Iterable[int]) -> None:
    """Make users of a tied parameter share the owner's submodule when both are materialized here."""
    have = set(blocks)
    for name, owner, users in ties:
        if owner not in have:
            continue
        path, _, leaf = name.rpartition(".")
        src = model.blocks[owner].get_submodule(path) if path else model.blocks[owner]
        for u in users:
            if u not in have:
                continue
            dst_block = model.blocks[u]
            if path:
                parent_path, _, attr = path.rpartition(".")
                parent = dst_block.get_submodule(parent_path) if parent_path else dst_block
                setattr(parent, attr, src)
            else:
                setattr(dst_block, leaf, getattr(src, leaf))


def materialize_blocks(model: PipelineModel, blocks: Iterable[int], device: torch.device | str, seed: int) -> None:
    from pipetrain.planner.zoo import materialize

    idx = sorted(set(blocks))
    materialize(model, device, seed, blocks=idx)
    retie(model, ties_of(model), idx)


def stage_modules(model: PipelineModel, stages: Iterable[StagePlan], recompute: str = "full") -> dict[int, StageModule]:
    """One StageModule per stage; a stage with ``recompute`` set recomputes as the plan's
    ``recompute`` mode says (``full`` or ``selective``) on its first ``recompute_layers`` blocks."""
    out = {}
    for st in stages:
        m = out[st.index] = StageModule({b: model.blocks[b] for b in range(st.block_start, st.block_end)})
        m.set_recompute(recompute if st.recompute else "none", st.recompute_layers if st.recompute else 0)
    return out


def vocab_size_of(spec: Any, model: nn.Module) -> int:
    v = getattr(spec, "vocab_size", None)
    if v:
        return int(v)
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return int(m.num_embeddings)
    return 0


def boundary_specs(spec: ModelSpec, model: PipelineModel, micro_batch_size: int, seq_len: int,
                   boundaries: Iterable[int], dtype: str = "fp32") -> list[TensorSpec]:
    """Shape/dtype of the tensor entering each block in ``boundaries``, by running blocks on meta.

    Under bf16/fp16 autocast, floating boundary tensors travel in that dtype.
    """
    want = set(boundaries)
    x = spec.example_input(micro_batch_size, seq_len, device="meta")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    out: dict[int, TensorSpec] = {}
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            if i in want:
                dt = half if (half is not None and x.is_floating_point()) else x.dtype
                out[i] = TensorSpec(shape=tuple(int(d) for d in x.shape), dtype=dtype_name(dt))
            x = block(x)
        if len(model.blocks) in want:
            out[len(model.blocks)] = TensorSpec(shape=tuple(int(d) for d in x.shape), dtype=dtype_name(x.dtype))
    return [out[b] for b in sorted(want)]


def check_boundaries(plan: Plan, spec: ModelSpec, model: PipelineModel) -> None:
    """The plan's boundary shapes/dtypes must be what the model produces; the error names both."""
    cuts = list(plan.boundaries)
    if not cuts:
        return
    actual = boundary_specs(spec, model, plan.micro_batch_size, plan.seq_len, cuts, plan.dtype)
    for k, (cut, got) in enumerate(zip(cuts, actual)):
        prev, nxt = plan.stages[k], plan.stages[k + 1]
        for side, specs in (("outputs", prev.outputs), ("inputs", nxt.inputs)):
            owner = prev if side == "outputs" else nxt
            if not specs:
                continue
            planned = specs[0]
            if len(specs) != 1 or tuple(planned.shape) != got.shape or planned.dtype != got.dtype:
                raise PlanError(
                    f"stage {owner.index} {side}: the plan says {[(list(s.shape), s.dtype) for s in specs]} at block {cut} "
                    f"but model {plan.model!r} produces [{list(got.shape)}, {got.dtype!r}] there: re-run `pipetrain plan` "
                    "for this model, micro-batch size, seq-len and dtype")
