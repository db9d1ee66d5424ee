"""Residual MLP presets: ``resmlp`` (uniform) and ``mlp-uneven`` (deliberately unbalanced).

Both take float features [B, d] (no sequence dimension) and end in a linear head to
``NUM_CLASSES`` classes trained with cross-entropy (task "classification").

- ``resmlp``: 8 pre-LN residual MLP blocks, d=256, hidden 4d=1024, then a linear head:
  the model of the torch.distributed.pipelining comparison (``benchmarks/vs_torch_pipelining.py``).
- ``mlp-uneven``: pre-LN residual MLP blocks at d=128 whose hidden widths differ by up to
  32x (``UNEVEN_HIDDEN``), so per-block compute is uneven and a balanced split is not an
  equal split: for checking the simulator and the planner's partitioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipetrain.planner.zoo.common import ModelSpec, PipelineModel

__all__ = ["ResidualMLPBlock", "LinearHead", "build_resmlp", "build_mlp_uneven", "mlp_spec", "UNEVEN_HIDDEN",
           "NUM_CLASSES", "RESMLP_DIM", "UNEVEN_DIM"]

NUM_CLASSES = 10
RESMLP_DIM = 256
RESMLP_LAYERS = 8
UNEVEN_DIM = 128
UNEVEN_HIDDEN = (256, 1024, 128, 2048, 512, 64, 1536, 384)


class ResidualMLPBlock(nn.Module):
    """x + fc2(gelu(fc1(layernorm(x))))."""

    kind = "mlp"

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.trace_signature = ("resmlp-block", d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class LinearHead(nn.Module):
    kind = "head"

    def __init__(self, d: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, num_classes)
        self.trace_signature = ("linear-head", d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _build(d: int, hidden: tuple[int, ...]) -> PipelineModel:
    blocks: list[nn.Module] = [ResidualMLPBlock(d, h) for h in hidden]
    blocks.append(LinearHead(d, NUM_CLASSES))
    return PipelineModel(blocks, [*(f"block.{i}" for i in range(len(hidden))), "head"])


def build_resmlp() -> PipelineModel:
    return _build(RESMLP_DIM, (4 * RESMLP_DIM,) * RESMLP_LAYERS)


def build_mlp_uneven() -> PipelineModel:
    return _build(UNEVEN_DIM, UNEVEN_HIDDEN)


def mlp_spec(name: str) -> ModelSpec:
    if name == "resmlp":
        return ModelSpec(name=name, task="classification", default_seq_len=1, vocab_size=NUM_CLASSES,
                         factory=build_resmlp, input_kind="features", input_size=(RESMLP_DIM,),
                         description="8 pre-LN residual MLP blocks, d=256, hidden 1024, linear head to 10 classes")
    return ModelSpec(name=name, task="classification", default_seq_len=1, vocab_size=NUM_CLASSES,
                     factory=build_mlp_uneven, input_kind="features", input_size=(UNEVEN_DIM,),
                     description=f"residual MLP blocks at d=128 with hidden widths {list(UNEVEN_HIDDEN)}, 10 classes")
