"""BERT-large (Devlin et al. 2019) with its masked-LM head, as pipeline blocks.

Shapes of ``bert-large-uncased``: vocab 30522, 512 positions, 2 token types, d=1024,
24 post-LN layers, 16 heads, FFN 4096, GELU, bidirectional attention. The MLM head
(dense + GELU + LayerNorm, decoder tied to the word embedding, plus a decoder bias) makes
335,174,458 parameters, the count of Hugging Face ``BertForMaskedLM`` for that checkpoint
(``BertModel`` with its pooler instead of the MLM head has 335,141,888). Inputs are token
ids only; every token has type 0. Training target here: predict every input position
(task "lm", cross-entropy over all tokens), enough for cost and pipeline work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipetrain.graph import LayerShape
from pipetrain.planner.zoo import common
from pipetrain.planner.zoo.common import ModelSpec, PipelineModel, check_divisible

__all__ = ["BertConfig", "BertEmbedding", "BertBlock", "BertMLMHead", "build_bert", "bert_spec", "BERT_PRESETS"]


@dataclass(frozen=True, kw_only=True)
class BertConfig:
    vocab_size: int = 30522
    n_ctx: int = 512
    type_vocab_size: int = 2
    d_model: int = 1024
    n_layer: int = 24
    n_head: int = 16
    ffn_dim: int = 4096
    eps: float = 1e-12


class BertEmbedding(nn.Module):
    kind = "embedding"

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embeddings = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.trace_signature = ("bert-embed", cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.size(1), device=ids.device)
        types = torch.zeros_like(ids)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)
                              + self.token_type_embeddings(types))


class BertBlock(nn.Module):
    """Post-LN encoder layer: ln(x + attn(x)); ln(x + ffn(x)), bidirectional attention."""

    kind = "transformer"

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = check_divisible("bert", cfg.d_model, cfg.n_head)
        self.query = nn.Linear(cfg.d_model, cfg.d_model)
        self.key = nn.Linear(cfg.d_model, cfg.d_model)
        self.value = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.intermediate = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.output = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.out_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.trace_signature = ("bert-block", cfg)
        self.layer_shape = LayerShape(hidden=cfg.d_model, heads=cfg.n_head, kv_heads=cfg.n_head, ffn_hidden=cfg.ffn_dim,
                                      causal=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = common.causal_attention(self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x)),
                                    False)
        x = self.attn_norm(x + self.attn_out(y.transpose(1, 2).flatten(2)))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertMLMHead(nn.Module):
    kind = "head"

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.word_embeddings = word_embeddings  # tied decoder weight, same name as in the embedding block
        self.decoder_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.trace_signature = ("bert-head", cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(F.gelu(self.dense(x)))
        return F.linear(h, self.word_embeddings.weight, self.decoder_bias)


def build_bert(cfg: BertConfig) -> PipelineModel:
    embed = BertEmbedding(cfg)
    blocks: list[nn.Module] = [embed, *(BertBlock(cfg) for _ in range(cfg.n_layer)), BertMLMHead(cfg, embed.word_embeddings)]
    names = ["embed", *(f"layer.{i}" for i in range(cfg.n_layer)), "head"]
    return PipelineModel(blocks, names, init_std=0.02)


BERT_PRESETS: dict[str, BertConfig] = {
    "bert-large": BertConfig(),
    # byte-level, small enough for CPU tests (the executor's tensor-parallel split of a post-LN block)
    "tiny-bert": BertConfig(vocab_size=256, n_ctx=128, d_model=64, n_layer=2, n_head=4, ffn_dim=128),
}


def bert_spec(name: str) -> ModelSpec:
    cfg = BERT_PRESETS[name]
    return ModelSpec(name=name, task="lm", default_seq_len=cfg.n_ctx, vocab_size=cfg.vocab_size,
                     factory=lambda: build_bert(cfg), sequence_parallel=False,
                     description=f"BERT encoder, {cfg.n_layer} post-LN layers, d={cfg.d_model}, tied MLM head")
