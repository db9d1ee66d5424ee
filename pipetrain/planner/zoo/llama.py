"""Llama 2 (Touvron et al. 2023) as pipeline blocks: RMSNorm, SwiGLU, rotary, GQA.

Public shapes: vocab 32000, context 4096, no biases, untied LM head; 7B d=4096/32 layers/
32 heads/FFN 11008, 13B d=5120/40/40/13824, 70B d=8192/80/64 heads with 8 KV heads/28672.
Rotary position embedding has no parameters; its angles are computed in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipetrain.graph import LayerShape
from pipetrain.planner.zoo import common
from pipetrain.planner.zoo.common import ModelSpec, PipelineModel, RMSNorm, check_divisible

__all__ = ["LlamaConfig", "LlamaEmbedding", "LlamaBlock", "LlamaHead", "build_llama", "llama_spec", "LLAMA_PRESETS",
           "apply_rotary"]


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    vocab_size: int
    n_ctx: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


class LlamaEmbedding(nn.Module):
    kind = "embedding"

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.trace_signature = ("llama-embed", cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ids)


def apply_rotary(x: torch.Tensor, theta: float, seq_dim: int = -2) -> torch.Tensor:
    """Rotate x by position along ``seq_dim`` (Su et al. 2021, RoFormer), pairing the two halves of
    the last dimension: [B, H, T, hd] with ``seq_dim=-2`` (the default), [B, T, H, hd] with -3."""
    if seq_dim not in (-2, -3):
        raise ValueError(f"apply_rotary: seq_dim must be -2 ([B, H, T, hd]) or -3 ([B, T, H, hd]), got {seq_dim}")
    hd = x.size(-1)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    pos = torch.arange(x.size(seq_dim), device=x.device, dtype=torch.float32)
    angles = pos[:, None] * inv_freq[None, :]
    if seq_dim == -3:
        angles = angles.unsqueeze(-2)  # [T, 1, hd/2]: broadcast over the heads
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class LlamaBlock(nn.Module):
    kind = "transformer"

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = check_divisible("llama", cfg.d_model, cfg.n_head)
        if cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"{cfg.n_head} heads are not a multiple of {cfg.n_kv_head} KV heads")
        self.theta = cfg.rope_theta
        kv_dim = cfg.n_kv_head * self.head_dim
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)  # down
        #: checkpoint the attention core (Korthikanti et al. 2023's selective recompute, sec. 4.3): the
        #: executor sets it on the stage's recomputed blocks (``StageModule.set_recompute``)
        self.recompute_attention = False
        self.trace_signature = ("llama-block", cfg)
        self.layer_shape = LayerShape(hidden=cfg.d_model, heads=cfg.n_head, kv_heads=cfg.n_kv_head, ffn_hidden=cfg.ffn_dim,
                                      gated_mlp=True, norm="rmsnorm", rotary=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x)
        # rotary on [B, T, H, hd], then the [B, H, T, hd] view: q and k stay sequence-major, as the
        # projections' outputs and v are; the attention kernels allocate their output like q, so it
        # is sequence-major too and the out-projection's input is a view of it, not a 2sbh copy
        q = apply_rotary(self.wq(h).unflatten(-1, (self.n_head, self.head_dim)), self.theta, -3).transpose(1, 2)
        k = apply_rotary(self.wk(h).unflatten(-1, (self.n_kv_head, self.head_dim)), self.theta, -3).transpose(1, 2)
        v = self.wv(h).unflatten(-1, (self.n_kv_head, self.head_dim)).transpose(1, 2)
        if self.recompute_attention:  # saves q, k, v and redoes the core in the backward
            y = checkpoint(common.causal_attention, q, k, v, True, use_reentrant=False)
        else:
            y = common.causal_attention(q, k, v, True)
        x = x + self.wo(y.transpose(1, 2).flatten(2))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, recompute_attention={self.recompute_attention}"


class LlamaHead(nn.Module):
    kind = "head"

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.trace_signature = ("llama-head", cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x))


def build_llama(cfg: LlamaConfig) -> PipelineModel:
    blocks: list[nn.Module] = [LlamaEmbedding(cfg), *(LlamaBlock(cfg) for _ in range(cfg.n_layer)), LlamaHead(cfg)]
    names = ["embed", *(f"layer.{i}" for i in range(cfg.n_layer)), "head"]
    return PipelineModel(blocks, names, init_std=0.02)


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(vocab_size=32000, n_ctx=4096, d_model=4096, n_layer=32, n_head=32, n_kv_head=32,
                             ffn_dim=11008),
    "llama2-13b": LlamaConfig(vocab_size=32000, n_ctx=4096, d_model=5120, n_layer=40, n_head=40, n_kv_head=40,
                              ffn_dim=13824),
    "llama2-70b": LlamaConfig(vocab_size=32000, n_ctx=4096, d_model=8192, n_layer=80, n_head=64, n_kv_head=8,
                              ffn_dim=28672),
    # byte-level, with grouped-query attention (2 query heads per KV head): small enough for CPU tests
    "tiny-llama": LlamaConfig(vocab_size=256, n_ctx=128, d_model=64, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=128),
}


def llama_spec(name: str) -> ModelSpec:
    cfg = LLAMA_PRESETS[name]
    return ModelSpec(name=name, task="lm", default_seq_len=cfg.n_ctx, vocab_size=cfg.vocab_size,
                     factory=lambda: build_llama(cfg),
                     description=f"Llama 2, {cfg.n_layer} layers, d={cfg.d_model}, {cfg.n_head} heads "
                                 f"({cfg.n_kv_head} KV), SwiGLU {cfg.ffn_dim}, untied head")
