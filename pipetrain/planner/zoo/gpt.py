"""GPT-2 (Radford et al. 2019) and tiny-gpt, written here as pipeline blocks.

Shapes follow the public GPT-2 checkpoints: learned positional embedding, pre-LayerNorm
blocks, GELU MLP of width 4d, biases everywhere, a final LayerNorm and an LM head tied to
the token embedding. The head holds the embedding block's ``wte`` submodule itself, so the
tied weight has the same name (``wte.weight``) in both blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipetrain.graph import LayerShape
from pipetrain.planner.zoo import common
from pipetrain.planner.zoo.common import ModelSpec, PipelineModel, check_divisible

__all__ = ["GPTConfig", "GPTEmbedding", "GPTBlock", "GPTHead", "build_gpt", "gpt_spec", "GPT_PRESETS"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    vocab_size: int
    n_ctx: int
    d_model: int
    n_layer: int
    n_head: int


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


class GPTBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x)). Causal when ``causal``."""

    kind = "transformer"

    def __init__(self, d_model: int, n_head: int, *, causal: bool = True, name: str = "gpt") -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = check_divisible(name, d_model, n_head)
        self.causal = causal
        self.ln_1 = nn.LayerNorm(d_model)
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)
        self.trace_signature = ("gpt-block", d_model, n_head, causal)
        self.layer_shape = LayerShape(hidden=d_model, heads=n_head, kv_heads=n_head, ffn_hidden=4 * d_model, causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).chunk(3, dim=-1)
        q = q.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        y = common.causal_attention(q, k, v, self.causal)
        x = x + self.c_proj(y.transpose(1, 2).flatten(2))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, causal={self.causal}"


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
    blocks += [GPTBlock(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer)]
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
