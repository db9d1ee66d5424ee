"""Deterministic per-block weight init, so a rank can materialize only its own blocks.

Every parameter draws from its own CPU ``torch.Generator`` seeded from
``(seed, owner block index, parameter name in the owner block)`` alone, then is copied to
the device. So block ``i`` gets bit-identical weights whether a single process builds the
whole model or a pipeline rank materializes just ``blocks[a:b]``, on any device. A tied
parameter (GPT-2's ``wte.weight`` in the head) is drawn by its owner's rule wherever it lives.

Rules, by the module that directly holds the parameter: Embedding weight ~ N(0, 0.02);
Linear/Conv weight ~ N(0, ``model.init_std``) when the model sets one (GPT-2, Llama, BERT
use 0.02), else U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Linear bound); norm weights 1
(Hugging Face's per-family ``*RMSNorm`` classes count as norms);
every ``*bias`` 0; any other parameter ~ N(0, 0.02). Floating buffers become 0 (1 for
names containing ``var``). A model with a checkpoint (``hf:`` directories with weights) has a
``load_pretrained_(blocks)`` method; :func:`materialize` calls it after drawing, so the
checkpoint's values replace the drawn ones block by block.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from pipetrain.errors import ModelError
from pipetrain.planner.zoo.common import PipelineModel, RMSNorm

__all__ = ["init_block_", "materialize", "tied_parameters", "param_seed"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, RMSNorm)


def param_seed(seed: int, owner_index: int, name: str) -> int:
    """The generator seed of one parameter: a stable hash of (seed, owner block, name)."""
    digest = hashlib.sha256(f"{seed}:{owner_index}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tied_parameters(model: PipelineModel) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """``(name, owner block, user blocks)`` for every parameter held by more than one block.

    The owner is the first block holding it. ``PipelineModel`` guarantees the parameter has
    the same name (relative to the block) in every block holding it.
    """
    where: dict[int, tuple[str, list[int]]] = {}
    order: list[int] = []
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            if id(p) not in where:
                where[id(p)] = (name, [i])
                order.append(id(p))
            elif where[id(p)][1][-1] != i:
                where[id(p)][1].append(i)
    return tuple((where[k][0], where[k][1][0], tuple(where[k][1][1:])) for k in order if len(where[k][1]) > 1)


def _module_of(block: nn.Module, name: str) -> nn.Module:
    mod_name = name.rpartition(".")[0]
    return block.get_submodule(mod_name) if mod_name else block


def _fan_in(t: torch.Tensor) -> int:
    return int(math.prod(t.shape[1:])) if t.dim() > 1 else int(t.shape[0])


def _draw(module: nn.Module, name: str, like: torch.Tensor, gen: torch.Generator, init_std: float | None) -> torch.Tensor:
    leaf = name.rpartition(".")[2]
    out = torch.empty(like.shape, dtype=torch.float32)
    if leaf.endswith("bias"):
        return out.zero_()
    if isinstance(module, _NORMS) or type(module).__name__.endswith("RMSNorm"):  # LlamaRMSNorm, Qwen2RMSNorm, ...
        return out.fill_(1.0)
    if isinstance(module, nn.Embedding):
        return out.normal_(0.0, 0.02, generator=gen)
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        if init_std is not None:
            return out.normal_(0.0, init_std, generator=gen)
        bound = 1.0 / math.sqrt(_fan_in(like))
        return out.uniform_(-bound, bound, generator=gen)
    return out.normal_(0.0, 0.02, generator=gen)


def init_block_(model: PipelineModel, index: int, seed: int) -> None:
    """Fill block ``index``'s parameters (already materialized, e.g. by ``to_empty``)."""
    if not 0 <= index < len(model.blocks):
        raise ModelError(f"block index {index} is out of range 0..{len(model.blocks) - 1}")
    owners = {(u, name): owner for name, owner, users in tied_parameters(model) for u in users}
    block = model.blocks[index]
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.device.type == "meta":
                raise ModelError(f"block {index} parameter {name!r} is still on the meta device: materialize it first")
            owner = owners.get((index, name), index)
            gen = torch.Generator().manual_seed(param_seed(seed, owner, name))
            p.copy_(_draw(_module_of(block, name), name, p, gen, model.init_std).to(p.dtype))
        for name, b in block.named_buffers():
            if b.is_floating_point():
                b.fill_(1.0 if "var" in name.rpartition(".")[2] else 0.0)
            else:
                b.zero_()


def materialize(model: PipelineModel, device: str | torch.device, seed: int,
                blocks: Iterable[int] | None = None) -> PipelineModel:
    """``to_empty`` the given blocks (all by default) onto ``device``, then init them."""
    indices = list(range(len(model.blocks))) if blocks is None else sorted(set(blocks))
    for i in indices:
        if not 0 <= i < len(model.blocks):
            raise ModelError(f"block index {i} is out of range 0..{len(model.blocks) - 1}")
    for i in indices:
        model.blocks[i].to_empty(device=device)
    for i in indices:
        init_block_(model, i, seed)
    load = getattr(model, "load_pretrained_", None)
    if callable(load):
        load(indices)
    return model
