"""The pieces every preset shares: PipelineModel, ModelSpec, attention and RMSNorm.

A :class:`PipelineModel` is a flat sequence of blocks, each mapping ONE tensor to ONE tensor,
so the executor can run ``blocks[a:b]`` as a pipeline stage. A :class:`ModelSpec` says how
to build it (always on the ``meta`` device first), what one micro-batch of input and target
looks like, and which loss trains it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipetrain.errors import ModelError

__all__ = ["PipelineModel", "ModelSpec", "RMSNorm", "causal_attention", "dropout", "check_divisible", "TASKS", "INPUT_KINDS"]

TASKS = ("lm", "classification")
INPUT_KINDS = ("tokens", "features", "image")


class PipelineModel(nn.Module):
    """Blocks run in order; every block maps one tensor to one tensor.

    ``kinds`` labels each block ("embedding", "transformer", "head", ...); it defaults to
    the block's ``kind`` attribute or its class name. ``init_std``: the standard deviation
    of normal weight init for Linear/Conv weights (GPT/Llama/BERT use 0.02); ``None`` means
    uniform(+-1/sqrt(fan_in)), PyTorch's own default bound for Linear.
    """

    def __init__(self, blocks: Sequence[nn.Module], block_names: Sequence[str] | None = None, *,
                 init_std: float | None = None) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ModelError("a PipelineModel needs at least one block")
        for i, b in enumerate(blocks):
            if not isinstance(b, nn.Module):
                raise ModelError(f"block {i} of the PipelineModel is a {type(b).__name__}, not a torch.nn.Module")
        names = tuple(block_names) if block_names is not None else tuple(f"block.{i}" for i in range(len(blocks)))
        if len(names) != len(blocks):
            raise ModelError(f"PipelineModel got {len(blocks)} blocks but {len(names)} block names")
        if len(set(names)) != len(names):
            raise ModelError("PipelineModel block names must be unique")
        self.blocks = nn.ModuleList(blocks)
        self.block_names: tuple[str, ...] = names
        self.block_kinds: tuple[str, ...] = tuple(str(getattr(b, "kind", type(b).__name__)) for b in blocks)
        self.init_std = init_std
        self._check_ties()

    def _check_ties(self) -> None:
        seen: dict[int, str] = {}
        for i, b in enumerate(self.blocks):
            for name, p in b.named_parameters():
                if id(p) in seen and seen[id(p)] != name:
                    raise ModelError(
                        f"block {i} ({self.block_names[i]}) holds a parameter shared with another block under the name "
                        f"{name!r}, but the other block calls it {seen[id(p)]!r}: share the submodule (same attribute "
                        "name in both blocks), not just the Parameter")
                seen.setdefault(id(p), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A named model: how to build it and what one micro-batch of data looks like.

    ``default_seq_len`` and ``max_seq_len`` are 1 for models without a sequence dimension
    (``input_kind`` "features" [B, *input_size] float or "image" [B, C, H, W] float);
    "tokens" models take int64 ids [B, T]. ``vocab_size`` is the LM vocabulary or the number
    of classes. ``factory`` builds the model; :meth:`build` calls it on the meta device.
    """

    name: str
    task: str
    default_seq_len: int
    vocab_size: int
    factory: Callable[[], PipelineModel] = field(repr=False, compare=False)
    max_seq_len: int = 0  # 0 -> default_seq_len
    input_kind: str = "tokens"
    input_size: tuple[int, ...] = ()
    description: str = ""
    #: whether its tensor-parallel split can shard the norms' regions over the sequence
    #: (Korthikanti et al. 2023): pre-LN blocks, whose residual stream and norm outputs are separate
    #: tensors; not post-LN ones (BERT), whose norm output is the residual stream
    sequence_parallel: bool = True
    #: whether pipetrain's executor splits its blocks over tensor-parallel ranks (the zoo's GPT-2,
    #: Llama and BERT blocks); Hugging Face modules it does not, so the planner gives them tp > 1
    #: only when pinned or for a simulation-only plan (an export or a what-if)
    tensor_parallel: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ModelError(f"model {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if self.input_kind not in INPUT_KINDS:
            raise ModelError(f"model {self.name!r}: input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        if self.default_seq_len < 1 or self.vocab_size < 1:
            raise ModelError(f"model {self.name!r}: default_seq_len and vocab_size must be >= 1")
        if self.max_seq_len == 0:
            object.__setattr__(self, "max_seq_len", self.default_seq_len)
        if self.max_seq_len < self.default_seq_len:
            raise ModelError(f"model {self.name!r}: default_seq_len {self.default_seq_len} exceeds max_seq_len {self.max_seq_len}")
        if self.input_kind != "tokens" and self.max_seq_len != 1:
            raise ModelError(f"model {self.name!r}: a model with {self.input_kind} input has no sequence length; use seq len 1")
        if self.input_kind != "tokens" and not self.input_size:
            raise ModelError(f"model {self.name!r}: {self.input_kind} input needs input_size (per-sample shape)")

    @property
    def is_sequence(self) -> bool:
        return self.input_kind == "tokens"

    def check_shape(self, micro_batch_size: int, seq_len: int | None = None) -> int:
        """Validate a micro-batch shape; return the sequence length to use."""
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ModelError(f"micro-batch size must be an integer >= 1, got {micro_batch_size!r}")
        if seq_len is None:
            return self.default_seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ModelError(f"sequence length must be an integer >= 1, got {seq_len!r}")
        if not self.is_sequence and seq_len != 1:
            raise ModelError(f"model {self.name!r} takes {self.input_kind} input of shape {list(self.input_size)} per sample "
                             "and has no sequence length: drop --seq-len")
        if seq_len > self.max_seq_len:
            raise ModelError(f"sequence length {seq_len} exceeds the context of {self.name!r} ({self.max_seq_len}): "
                             f"use --seq-len {self.max_seq_len} or less")
        return seq_len

    def build(self, device: str | torch.device = "meta", *, seed: int = 0) -> PipelineModel:
        """Build on meta; on any other device, materialize every block from ``seed``."""
        with torch.device("meta"):
            model = self.factory()
        if not isinstance(model, PipelineModel):
            raise ModelError(f"model {self.name!r}: factory returned a {type(model).__name__}, not a PipelineModel")
        if torch.device(device).type != "meta":
            from pipetrain.planner.zoo.init import materialize

            materialize(model, device, seed)
        return model

    def input_shape(self, micro_batch_size: int, seq_len: int | None = None) -> tuple[int, ...]:
        t = self.check_shape(micro_batch_size, seq_len)
        if self.is_sequence:
            return (micro_batch_size, t)
        return (micro_batch_size, *self.input_size)

    def example_input(self, micro_batch_size: int, seq_len: int | None = None, device: str | torch.device = "meta",
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """One micro-batch of input: random token ids or standard-normal features (CPU generator)."""
        shape = self.input_shape(micro_batch_size, seq_len)
        if torch.device(device).type == "meta":
            dtype = torch.int64 if self.is_sequence else torch.float32
            return torch.empty(shape, dtype=dtype, device="meta")
        if self.is_sequence:
            x = torch.randint(0, self.vocab_size, shape, generator=generator)
        else:
            x = torch.randn(shape, generator=generator)
        return x.to(device)

    def target_shape(self, micro_batch_size: int, seq_len: int | None = None) -> tuple[int, ...]:
        t = self.check_shape(micro_batch_size, seq_len)
        return (micro_batch_size, t) if self.task == "lm" else (micro_batch_size,)

    def example_target(self, micro_batch_size: int, seq_len: int | None = None, device: str | torch.device = "meta",
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Random int64 targets: next-token ids [B, T] (lm) or class ids [B] (classification)."""
        shape = self.target_shape(micro_batch_size, seq_len)
        if torch.device(device).type == "meta":
            return torch.empty(shape, dtype=torch.int64, device="meta")
        return torch.randint(0, self.vocab_size, shape, generator=generator).to(device)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy: over all B*T tokens for lm, over the batch for classification."""
        if self.task == "lm":
            return F.cross_entropy(output.flatten(0, -2).float(), target.flatten())
        return F.cross_entropy(output.float(), target)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as in Llama: x / rms(x) * weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention over [B, H, T, hd]; k/v may have fewer (grouped) heads.

    On real devices this is ``F.scaled_dot_product_attention``. On the meta device it calls the
    fused CPU flash kernel directly (what ``F.scaled_dot_product_attention`` itself picks on a
    CPU), because on meta PyTorch falls back to the math path, which materializes the T x T
    score matrix and would make the saved-for-backward bytes unlike any real run. Wrapped for
    torch.fx, so at op granularity attention is one node. ``dropout_p`` drops attention
    probabilities inside the fused kernel (no mask is stored: the flash kernels regenerate it
    from the RNG state; Dao et al. 2022, sec. 3.1); the caller passes 0 outside training.
    """
    if q.device.type == "meta":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, causal)[0]
    if k.size(1) != q.size(1):
        try:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, enable_gqa=True)
        except TypeError:  # torch < 2.5 has no enable_gqa
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that saves a 1-byte bool mask for backward on every device.

    ``F.dropout`` runs the fused ``native_dropout`` (bool mask) only on CUDA-like devices; on the
    CPU and on meta it multiplies by a scaled noise tensor of the input's dtype, which autograd
    saves at 2-4 bytes an element (ATen ``dropout``: ``is_fused_kernel_acceptable``). Calling
    ``native_dropout`` everywhere makes the traced bytes those of a GPU run (Korthikanti et al.
    2023, sec. 4.1, count 1 byte per mask element).
    """
    if not training or p == 0.0:
        return x
    return torch.native_dropout(x, p, True)[0]


torch.fx.wrap("causal_attention")


def check_divisible(name: str, d_model: int, n_head: int) -> int:
    if d_model % n_head:
        raise ModelError(f"{name}: d_model {d_model} is not divisible by {n_head} heads")
    return d_model // n_head
