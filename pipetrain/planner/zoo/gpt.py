"""GPT-2 (Radford et al. 2019) and tiny-gpt, written here as pipeline blocks.

Shapes follow the public GPT-2 checkpoints: learned positional embedding, pre-LayerNorm
blocks, GELU MLP of width 4d, biases everywhere, a final LayerNorm and an LM head tied to
the token embedding. The head holds the embedding block's ``wte`` submodule itself, so the
tied weight has the same name (``wte.weight``) in both blocks.

The presets run fused (flash) attention without dropout. A block can instead run GPT-2's and
Megatron-LM's own layer (Radford et al. 2019; Shoeybi et al. 2019): ``attention="math"``
(softmax(QK^T/sqrt(d) + causal mask) stored explicitly) and ``dropout`` on the attention
probabilities, after the attention projection and after the MLP; ``recompute_attention``
checkpoints the attention core, Korthikanti et al. 2023's selective recompute (sec. 4.3). The
activation-memory model of these variants is :mod:`pipetrain.activations`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipetrain.graph import LayerShape
from pipetrain.planner.zoo import common
from pipetrain.planner.zoo.common import ModelSpec, PipelineModel, check_divisible

__all__ = ["GPTConfig", "GPTEmbedding", "GPTBlock", "GPTHead", "attention_core", "build_gpt", "gpt_spec", "GPT_PRESETS"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    vocab_size: int
    n_ctx: int
    d_model: int
    n_layer: int
    n_head: int
    attention: str = "flash"  # "flash" | "math" (see GPTBlock)
    dropout: float = 0.0


class GPTEmbedding(nn.Module):
    """Token ids [B, T] -> hidden [B, T, d]: token plus learned position embedding."""

    kind = "embedding"

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.trace_signature = ("gpt-embed", cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.size(1), device=ids.device)
        return self.wte(ids) + self.wpe(pos)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, attention: str,
                   dropout_p: float, training: bool) -> torch.Tensor:
    """softmax(QK^T/sqrt(d) + mask) V over [B, H, T, hd], the part selective recompute redoes.

    ``flash``: the fused kernel (:func:`common.causal_attention`), which keeps no T x T tensor.
    ``math``: GPT-2's and Megatron's unfused attention: the causal mask is a bool T x T tensor
    made here (``masked_fill`` saves it), softmax saves its output, dropout its bool mask and the
    P.V matmul the dropped probabilities (Korthikanti et al. 2023, sec. 4.1).
    """
    p = dropout_p if training else 0.0
    if attention == "flash":
        return common.causal_attention(q, k, v, causal, p)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if causal:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = common.dropout(torch.softmax(scores, dim=-1), p, True)
    return probs @ v


class GPTBlock(nn.Module):
    """Pre-LN transformer block: x + drop(attn(ln1(x))); x + drop(mlp(ln2(x))). Causal when ``causal``.

    ``attention``, ``dropout`` and ``recompute_attention``: see the module docstring; the defaults
    (flash, no dropout, no recompute) are the presets'.
    """

    kind = "transformer"

    def __init__(self, d_model: int, n_head: int, *, causal: bool = True, name: str = "gpt", attention: str = "flash",
                 dropout: float = 0.0, recompute_attention: bool = False) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = check_divisible(name, d_model, n_head)
        self.causal = causal
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        self.attention = attention
        self.dropout = dropout
        self.recompute_attention = recompute_attention
        self.ln_1 = nn.LayerNorm(d_model)
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)
        self.trace_signature = ("gpt-block", d_model, n_head, causal, attention, dropout, recompute_attention)
        self.layer_shape = LayerShape(hidden=d_model, heads=n_head, kv_heads=n_head, ffn_hidden=4 * d_model, causal=causal,
                                      attention=attention, dropout=dropout > 0.0)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention_core(q, k, v, causal=self.causal, attention=self.attention, dropout_p=self.dropout,
                              training=self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).chunk(3, dim=-1)
        q = q.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        if self.recompute_attention:
            # saves q, k, v (views of the QKV output) and redoes the core, dropout masks included
            y = checkpoint(self._core, q, k, v, use_reentrant=False, preserve_rng_state=True)
        else:
            y = self._core(q, k, v)
        drop = self.dropout if self.training else 0.0
        x = x + common.dropout(self.c_proj(y.transpose(1, 2).flatten(2)), drop, True)
        return x + common.dropout(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")), drop, True)

    def extra_repr(self) -> str:
        return (f"n_head={self.n_head}, causal={self.causal}, attention={self.attention}, dropout={self.dropout}, "
                f"recompute_attention={self.recompute_attention}")


class GPTHead(nn.Module):
    """Hidden [B, T, d] -> logits [B, T, vocab] through ln_f and the tied ``wte`` weight."""

    kind = "head"

    def __init__(self, cfg: GPTConfig, wte: nn.Embedding) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.wte = wte  # the embedding block's module: one Parameter, same name in both blocks
        self.trace_signature = ("gpt-head", cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(x), self.wte.weight)


def build_gpt(cfg: GPTConfig) -> PipelineModel:
    embed = GPTEmbedding(cfg)
    blocks: list[nn.Module] = [embed]
    blocks += [GPTBlock(cfg.d_model, cfg.n_head, attention=cfg.attention, dropout=cfg.dropout) for _ in range(cfg.n_layer)]
    blocks.append(GPTHead(cfg, embed.wte))
    names = ["embed", *(f"layer.{i}" for i in range(cfg.n_layer)), "head"]
    return PipelineModel(blocks, names, init_std=0.02)


GPT_PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(vocab_size=50257, n_ctx=1024, d_model=768, n_layer=12, n_head=12),
    "gpt2-medium": GPTConfig(vocab_size=50257, n_ctx=1024, d_model=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(vocab_size=50257, n_ctx=1024, d_model=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(vocab_size=50257, n_ctx=1024, d_model=1600, n_layer=48, n_head=25),
    # byte-level, small enough to train on one CPU core in seconds
    "tiny-gpt": GPTConfig(vocab_size=256, n_ctx=128, d_model=64, n_layer=4, n_head=4),
}


def gpt_spec(name: str) -> ModelSpec:
    cfg = GPT_PRESETS[name]
    return ModelSpec(name=name, task="lm", default_seq_len=cfg.n_ctx, vocab_size=cfg.vocab_size,
                     factory=lambda: build_gpt(cfg),
                     description=f"GPT-2 style, {cfg.n_layer} layers, d={cfg.d_model}, {cfg.n_head} heads, tied head")
