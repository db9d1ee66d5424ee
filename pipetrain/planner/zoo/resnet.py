"""A small ResNet (He et al. 2016) for 3x32x32 images, written here; its op graph is a real DAG.

Blocks: ``stem`` (3x3 conv, GroupNorm, ReLU), six basic residual blocks (two 3x3 convs
with GroupNorm; the skip is the identity, or a strided 1x1 conv where the width doubles)
in three stages of widths 32/64/128, and ``head`` (global average pool, linear to 10
classes). GroupNorm instead of BatchNorm: no running buffers, and results do not depend on
how a batch is split into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipetrain.planner.zoo.common import ModelSpec, PipelineModel

__all__ = ["Stem", "BasicBlock", "ResNetHead", "build_resnet", "resnet_spec", "RESNET_WIDTHS", "NUM_CLASSES"]

RESNET_WIDTHS = (32, 64, 128)
BLOCKS_PER_STAGE = 2
NUM_CLASSES = 10


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, c)


class Stem(nn.Module):
    kind = "stem"

    def __init__(self, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c_out, 3, padding=1, bias=False)
        self.norm = _norm(c_out)
        self.trace_signature = ("resnet-stem", c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class BasicBlock(nn.Module):
    """relu(norm2(conv2(relu(norm1(conv1(x))))) + skip(x))."""

    kind = "residual"

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.downsample = stride != 1 or c_in != c_out
        if self.downsample:
            self.skip_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.skip_norm = _norm(c_out)
        self.trace_signature = ("resnet-block", c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        skip = self.skip_norm(self.skip_conv(x)) if self.downsample else x
        return F.relu(h + skip)


class ResNetHead(nn.Module):
    kind = "head"

    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, num_classes)
        self.trace_signature = ("resnet-head", c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def build_resnet() -> PipelineModel:
    blocks: list[nn.Module] = [Stem(RESNET_WIDTHS[0])]
    names = ["stem"]
    c_in = RESNET_WIDTHS[0]
    for s, width in enumerate(RESNET_WIDTHS):
        for j in range(BLOCKS_PER_STAGE):
            stride = 2 if (s > 0 and j == 0) else 1
            blocks.append(BasicBlock(c_in, width, stride))
            names.append(f"res{s}.{j}")
            c_in = width
    blocks.append(ResNetHead(c_in, NUM_CLASSES))
    names.append("head")
    return PipelineModel(blocks, names)


def resnet_spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, task="classification", default_seq_len=1, vocab_size=NUM_CLASSES,
                     factory=build_resnet, input_kind="image", input_size=(3, 32, 32),
                     description="ResNet-style CNN, 3x32x32 images, 6 residual blocks, 10 classes")
