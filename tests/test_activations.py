"""Activation memory per layer (pipetrain.activations) against what autograd saves, traced on meta.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (MLSys 2023),
sec. 4, count a GPT layer's saved activations in closed form. Here a GPT block with
unfused ("math") attention and dropout, and the Megatron-LM local shard of it for tensor parallelism
t = 2 and 4 (heads and MLP width split over t; LayerNorm and the residual dropouts replicated, or
split along s with sequence parallelism), run forward on the meta device in fp16 under the same
saved-tensor hooks as ``pipetrain.planner.trace``; the bytes autograd saved must equal the paper's
formula plus the terms it leaves out, each named and computed here.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from pipetrain.activations import (  # noqa: E402
    korthikanti_layer_bytes,
    layer_activation_bytes,
    layer_activation_terms,
    zb_w_held_bytes,
)
from pipetrain.errors import ConfigError  # noqa: E402
from pipetrain.executor.wgrad import SplitLinears, WeightGradQueue  # noqa: E402
from pipetrain.graph import LayerShape  # noqa: E402
from pipetrain.planner.trace import _measure, trace_graph  # noqa: E402
from pipetrain.planner.zoo import ModelSpec, common, get_model_spec  # noqa: E402
from pipetrain.planner.zoo.gpt import GPTBlock, GPTConfig, attention_core, build_gpt  # noqa: E402
from pipetrain.planner.zoo.llama import LlamaBlock, LlamaConfig  # noqa: E402

# s, b, h, a: small, with a s / h = 2 an integer, heads and s divisible by t = 4
S, B, H, A = 16, 2, 32, 4
P = 0.1  # dropout probability (any p in (0, 1): the masks are bool whatever p is)
FP16 = torch.float16


def _saved(module: Any, x: Any) -> int:
    """Bytes autograd saves in one forward of ``module`` on ``x`` (trace.py's hooks: once per
    storage, parameters not counted)."""
    params = list(module.parameters()) if isinstance(module, nn.Module) else []
    cost, _ = _measure(functools.partial(module, x), [x], params)
    return cost.saved_bytes


def _input(seq: int, dtype: Any = FP16, hidden: int = H) -> Any:
    return torch.empty(B, seq, hidden, device="meta", dtype=dtype, requires_grad=True)


def _gpt(**kw: Any) -> GPTBlock:
    with torch.device("meta"):
        return GPTBlock(H, A, **kw).to(FP16)


def ln_stats(seq: int) -> int:
    """Both LayerNorms' mean and rstd, fp32 whatever the input dtype: 2 norms x 2 x 4 bytes x s b."""
    return 2 * 2 * 4 * seq * B


#: the bool s x s causal mask the math path makes and masked_fill saves (not per head or batch)
CAUSAL_MASK = S * S


def paper(t: int = 1, *, sp: bool = False, selective: bool = False) -> int:
    """The paper's per-layer forms, in bytes, written out as printed (fp16, 1-byte masks)."""
    sbh = S * B * H
    core = 5 * A * S * S * B // t  # 5as/(ht) * sbh
    if selective:
        core = 0
    if sp:
        return 34 * sbh // t + core  # sec. 4.2.2; 34sbh/t with selective recompute (sec. 4.3)
    if t == 1:
        return 34 * sbh + core  # sec. 4.1
    return 10 * sbh + 24 * sbh // t + core  # sec. 4.2.1; sbh(10 + 24/t) with selective recompute


# ----- the Megatron-LM local shard of a GPT layer -----------------------------------------------
class _GatherLinear(torch.autograd.Function):
    """Megatron's sequence-parallel column linear (Korthikanti et al. sec. 4.2.2): all-gather the
    s/t shard, multiply, and save only the shard; the backward gathers it again. One rank of t
    emulated: the "gather" repeats the local shard t times (the same shapes)."""

    @staticmethod
    def forward(ctx: Any, shard: Any, weight: Any, bias: Any, t: int) -> Any:
        ctx.save_for_backward(shard, weight)
        ctx.t = t
        return F.linear(torch.cat([shard] * t, dim=1), weight, bias)

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        shard, weight = ctx.saved_tensors
        full = torch.cat([shard] * ctx.t, dim=1)
        dx = (g @ weight).narrow(1, 0, shard.size(1))  # reduce-scatter: this rank's s/t rows
        return dx, g.flatten(0, -2).t() @ full.flatten(0, -2), g.flatten(0, -2).sum(0), None


class MegatronShard(nn.Module):
    """One tensor-parallel rank's part of a GPTBlock (Shoeybi et al. 2019, fig. 3): QKV and fc1
    column-parallel (3h/t, 4h/t outputs), out-projection and fc2 row-parallel; the all-reduce
    (no sp) changes no shape; with ``sp`` the norms and dropouts see s/t, the column inputs are
    all-gathered (``megatron_sp``: saved as the s/t shard; else as DTensor does: the gathered
    tensor, which the matmul saves) and the row outputs reduce-scattered to s/t."""

    def __init__(self, t: int, *, sp: bool = False, megatron_sp: bool = False, attention: str = "math",
                 dropout: float = P, recompute_attention: bool = False) -> None:
        super().__init__()
        self.t, self.sp, self.megatron_sp = t, sp, megatron_sp
        self.heads, self.head_dim = A // t, H // A
        self.attention, self.dropout, self.recompute_attention = attention, dropout, recompute_attention
        self.ln_1, self.ln_2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.c_attn, self.c_proj = nn.Linear(H, 3 * H // t), nn.Linear(H // t, H)
        self.c_fc, self.mlp_proj = nn.Linear(H, 4 * H // t), nn.Linear(4 * H // t, H)

    def _column(self, lin: nn.Linear, x: Any) -> Any:
        if not self.sp:
            return lin(x)  # Megatron's f: identity forward; the replicated input is saved
        if self.megatron_sp:
            return _GatherLinear.apply(x, lin.weight, lin.bias, self.t)
        return lin(torch.cat([x] * self.t, dim=1))  # DTensor: redistribute to Replicate, then the matmul

    def _row(self, y: Any) -> Any:
        return y.narrow(1, 0, y.size(1) // self.t) if self.sp else y  # reduce-scatter / all-reduce

    def _core(self, q: Any, k: Any, v: Any) -> Any:
        return attention_core(q, k, v, causal=True, attention=self.attention, dropout_p=self.dropout, training=True)

    def forward(self, x: Any) -> Any:
        q, k, v = (u.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
                   for u in self._column(self.c_attn, self.ln_1(x)).chunk(3, dim=-1))
        if self.recompute_attention:
            y = checkpoint(self._core, q, k, v, use_reentrant=False, preserve_rng_state=True)
        else:
            y = self._core(q, k, v)
        x = x + common.dropout(self._row(self.c_proj(y.transpose(1, 2).flatten(2))), self.dropout, True)
        hidden = F.gelu(self._column(self.c_fc, self.ln_2(x)), approximate="tanh")
        return x + common.dropout(self._row(self.mlp_proj(hidden)), self.dropout, True)


def _shard(t: int, **kw: Any) -> MegatronShard:
    with torch.device("meta"):
        return MegatronShard(t, **kw).to(FP16)


def _model(t: int = 1, **kw: Any) -> int:
    """layer_activation_bytes of the math + dropout GPT layer at fp16."""
    shape = LayerShape(hidden=H, heads=A, kv_heads=A, ffn_hidden=4 * H, attention="math", dropout=True)
    return layer_activation_bytes(shape, seq_len=S, micro_batch_size=B, dtype_bytes=2, tp=t, **kw)


# ----- (a) no parallelism -------------------------------------------------------------------------
def test_no_parallelism_is_traced_bytes_less_ln_stats_and_causal_mask() -> None:
    traced = _saved(_gpt(attention="math", dropout=P), _input(S))
    assert paper() == korthikanti_layer_bytes(s=S, b=B, h=H, a=A) == 34 * S * B * H + 5 * A * S * S * B == 45_056
    assert traced == paper() + ln_stats(S) + CAUSAL_MASK == _model() == 45_824


def test_trace_graph_of_a_math_dropout_gpt_matches_the_model() -> None:
    """The same through ``trace_graph`` (FLOP counting and all) of a whole GPT built with the options."""
    cfg = GPTConfig(vocab_size=64, n_ctx=S, d_model=H, n_layer=2, n_head=A, attention="math", dropout=P)
    spec = ModelSpec(name="gpt-math", task="lm", default_seq_len=S, vocab_size=64, factory=lambda: build_gpt(cfg))
    g = trace_graph(spec, micro_batch_size=B, dtype="fp16")
    layer = g.nodes[1]
    assert layer.layer == LayerShape(hidden=H, heads=A, kv_heads=A, ffn_hidden=4 * H, attention="math", dropout=True)
    assert layer.saved_bytes == paper() + ln_stats(S) + CAUSAL_MASK == _model()


def test_dropout_saves_a_bool_mask_and_layernorm_fp32_statistics() -> None:
    """The two dtypes the paper's bytes rest on, as autograd saves them on meta."""
    x = _input(S)
    # F.dropout off CUDA multiplies by a scaled noise tensor of x's dtype and saves that; the fused
    # native_dropout (CUDA's path, and common.dropout's on every device) saves a bool mask
    assert _saved(lambda u: F.dropout(u, P, True), x) == 2 * S * B * H
    assert _saved(lambda u: common.dropout(u, P, True), x) == S * B * H
    with torch.device("meta"):
        ln = nn.LayerNorm(H).to(torch.bfloat16)
    assert _saved(ln, _input(S, torch.bfloat16)) == 2 * S * B * H + 2 * 4 * S * B  # input, fp32 mean and rstd


def test_zoo_layer_shapes() -> None:
    """The presets declare what they run: flash attention, no dropout; Llama's RMSNorm, SwiGLU, rotary."""
    assert get_model_spec("gpt2").build().blocks[1].layer_shape == LayerShape(hidden=768, heads=12, kv_heads=12,
                                                                              ffn_hidden=3072)
    assert get_model_spec("llama2-7b").build().blocks[1].layer_shape == LayerShape(
        hidden=4096, heads=32, kv_heads=32, ffn_hidden=11008, gated_mlp=True, norm="rmsnorm", rotary=True)


def test_the_shard_at_t1_is_the_gpt_block() -> None:
    """The test's Megatron shard at t = 1 saves what the zoo's GPTBlock does."""
    assert _saved(_shard(1), _input(S)) == _saved(_gpt(attention="math", dropout=P), _input(S))


# ----- (b) tensor parallelism -------------------------------------------------------------------
@pytest.mark.parametrize("t", [2, 4])
def test_tensor_parallel_shard(t: int) -> None:
    traced = _saved(_shard(t), _input(S))
    assert korthikanti_layer_bytes(s=S, b=B, h=H, a=A, tp=t) == paper(t)
    # the LayerNorms run replicated on the full sequence: their statistics are not split
    assert traced == paper(t) + ln_stats(S) + CAUSAL_MASK == _model(t)


# ----- (c) tensor + sequence parallelism ------------------------------------------------------------
@pytest.mark.parametrize("t", [2, 4])
def test_sequence_parallel_megatron_saves_the_shard_dtensor_the_gathered_ln_output(t: int) -> None:
    assert korthikanti_layer_bytes(s=S, b=B, h=H, a=A, tp=t, sequence_parallel=True) == paper(t, sp=True)
    # the causal mask covers the full (gathered) sequence attention runs on: not split
    megatron = _saved(_shard(t, sp=True, megatron_sp=True), _input(S // t))
    assert megatron == paper(t, sp=True) + ln_stats(S // t) + CAUSAL_MASK == _model(t, sequence_parallel=True,
                                                                                     sp_saves_gathered=False)
    # DTensor keeps both LayerNorm outputs all-gathered (full s) for the column-parallel matmuls,
    # where the paper keeps their s/t shards: 2 x 2sbh(1 - 1/t) more
    gathered_ln_outputs = 2 * 2 * S * B * H * (t - 1) // t
    dtensor = _saved(_shard(t, sp=True), _input(S // t))
    assert dtensor == megatron + gathered_ln_outputs == _model(t, sequence_parallel=True)


# ----- (d) selective recompute ----------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 2, 4])
def test_selective_recompute_drops_the_attention_core(t: int) -> None:
    """The attention core checkpointed: its inputs Q, K, V (6sbh/t) stay, the 5as^2b/t terms and the
    causal mask (made inside the core) go."""
    no_sp = _saved(_shard(t, recompute_attention=True), _input(S))
    assert korthikanti_layer_bytes(s=S, b=B, h=H, a=A, tp=t, recompute="selective") == paper(t, selective=True)
    assert no_sp == paper(t, selective=True) + ln_stats(S) == _model(t, recompute="selective")
    if t == 1:
        assert no_sp == _saved(_gpt(attention="math", dropout=P, recompute_attention=True), _input(S))
        return
    assert paper(t, sp=True, selective=True) == 34 * S * B * H // t
    megatron = _saved(_shard(t, sp=True, megatron_sp=True, recompute_attention=True), _input(S // t))
    assert megatron == paper(t, sp=True, selective=True) + ln_stats(S // t) == korthikanti_layer_bytes(
        s=S, b=B, h=H, a=A, tp=t, sequence_parallel=True, recompute="selective") + ln_stats(S // t)
    dtensor = _saved(_shard(t, sp=True, recompute_attention=True), _input(S // t))
    assert dtensor == megatron + 2 * 2 * S * B * H * (t - 1) // t == _model(t, sequence_parallel=True,
                                                                            recompute="selective")


def test_full_recompute_keeps_the_layer_input() -> None:
    block = _gpt(attention="math", dropout=P)
    # no parameters passed: torch's checkpoint refuses trace.py's second, input-only autograd.grad;
    # the parameters are used inside the checkpoint, whose own hooks (not the counting ones) pack them
    traced = _saved(lambda x: checkpoint(block, x, use_reentrant=False, preserve_rng_state=True), _input(S))
    assert traced == 2 * S * B * H == korthikanti_layer_bytes(s=S, b=B, h=H, a=A, recompute="full") == _model(
        recompute="full")
    assert korthikanti_layer_bytes(s=S, b=B, h=H, a=A, tp=4, sequence_parallel=True, recompute="full") == 2 * S * B * H // 4


# ----- (e) flash attention --------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 2])
def test_flash_attention_drops_exactly_the_named_terms(t: int) -> None:
    math_dropout = _saved(_shard(t), _input(S))
    flash_dropout = _saved(_shard(t, attention="flash"), _input(S))
    flash = _saved(_shard(t, attention="flash", dropout=0.0), _input(S))
    a = A // t
    softmax_output = 2 * a * S * S * B
    attn_dropout_mask = a * S * S * B  # bool
    dropped_probs = 2 * a * S * S * B
    log_sum_exp = 4 * B * a * S  # fp32, per (batch, head, query); flash's output is the out-projection's input
    residual_dropout_masks = 2 * S * B * H  # after the projection and after the MLP, replicated
    assert flash_dropout == math_dropout - softmax_output - attn_dropout_mask - dropped_probs - CAUSAL_MASK + log_sum_exp
    assert flash == flash_dropout - residual_dropout_masks
    shape = LayerShape(hidden=H, heads=A, kv_heads=A, ffn_hidden=4 * H)
    assert flash == layer_activation_bytes(shape, seq_len=S, micro_batch_size=B, dtype_bytes=2, tp=t)
    if t == 1:
        assert flash == _saved(_gpt(), _input(S))


# ----- the zoo's blocks: flash, bf16, no dropout ------------------------------------------------------
@pytest.mark.parametrize("name, seq, mbs", [("gpt2", 128, 1), ("llama2-7b", 64, 1), ("bert-large", 64, 2)])
def test_model_equals_traced_zoo_blocks(name: str, seq: int, mbs: int) -> None:
    """Pre-norm GPT and Llama; BERT is post-norm, bidirectional, with separate Q, K, V projections:
    its norms' inputs and the linears' inputs are tensors of the same sizes."""
    g = trace_graph(name, micro_batch_size=mbs, seq_len=seq, dtype="bf16")
    layer = g.nodes[1]
    assert layer.kind == "transformer" and layer.layer is not None
    assert layer.saved_bytes == layer_activation_bytes(layer.layer, seq_len=seq, micro_batch_size=mbs, dtype_bytes=2)


def _small_llama(kv_heads: int) -> LlamaBlock:
    cfg = LlamaConfig(vocab_size=8, n_ctx=S, d_model=64, n_layer=1, n_head=8, n_kv_head=kv_heads, ffn_dim=96)
    with torch.device("meta"):
        return LlamaBlock(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_model_equals_traced_llama_with_grouped_kv_heads(kv_heads: int) -> None:
    block = _small_llama(kv_heads)
    traced = _saved(block, _input(S, torch.bfloat16, 64))
    terms = layer_activation_terms(block.layer_shape, seq_len=S, micro_batch_size=B, dtype_bytes=2)
    assert traced == terms.total
    assert terms.qkv == S * B * (64 + 2 * kv_heads * 8) * 2
    # RMSNorm as written saves x, rstd, x * rstd; the rotary tables are [s, hd/2] cos and sin, for q and k
    assert terms.norm_stats == 2 * S * B * 2 and terms.norm_normalized == 2 * S * B * 64 * 2
    assert terms.rotary_tables == 2 * 2 * S * (8 // 2) * 2


def test_selective_recompute_of_flash_keeps_q_k_v_only() -> None:
    traced = _saved(_gpt(recompute_attention=True), _input(S))
    shape = LayerShape(hidden=H, heads=A, kv_heads=A, ffn_hidden=4 * H)
    assert traced == layer_activation_bytes(shape, seq_len=S, micro_batch_size=B, dtype_bytes=2, recompute="selective")
    assert traced == _saved(_gpt(), _input(S)) - 4 * B * A * S  # the log-sum-exp only: Q, K, V stay


# ----- zero bubble: what W holds after I ----------------------------------------------------------------
def _w_held(block: nn.Module, x: Any) -> int:
    """Bytes of the distinct storages the executor's W queue holds after B (I): inputs and output grads."""
    split = SplitLinears(block)
    queue = WeightGradQueue()
    with split.capture(queue):
        out = block(x)
    split.backward_input(out, torch.empty_like(out), x, queue)
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for item in queue.items for t in item[2:]}
    return sum(seen.values())


@pytest.mark.parametrize("which", ["gpt", "llama-gqa"])
def test_zb_w_held_bytes_is_what_the_weight_grad_queue_holds(which: str) -> None:
    block: nn.Module = _gpt() if which == "gpt" else _small_llama(2)
    hidden = H if which == "gpt" else 64
    shape = block.layer_shape
    held = _w_held(block, _input(S, FP16 if which == "gpt" else torch.bfloat16, hidden))
    assert held == zb_w_held_bytes(shape, seq_len=S, micro_batch_size=B, dtype_bytes=2)
    if which == "gpt":  # inputs of QKV, out-proj, fc1, fc2: h, h, h, 4h; their output grads 3h, h, 4h, h
        assert held == S * B * ((H + H + H + 4 * H) + (3 * H + H + 4 * H + H)) * 2


def test_zb_w_held_bytes_under_tensor_parallelism() -> None:
    shape = LayerShape(hidden=H, heads=A, kv_heads=A, ffn_hidden=4 * H)
    full = zb_w_held_bytes(shape, seq_len=S, micro_batch_size=B, dtype_bytes=2)
    t2 = zb_w_held_bytes(shape, seq_len=S, micro_batch_size=B, dtype_bytes=2, tp=2)
    # replicated: the QKV and fc1 inputs, the out-projection's and fc2's output grads (4 sbh); the rest halves
    assert full - t2 == (full - 4 * S * B * H * 2) // 2
    megatron_sp = zb_w_held_bytes(shape, seq_len=S, micro_batch_size=B, dtype_bytes=2, tp=2, sequence_parallel=True,
                                  sp_saves_gathered=False)
    assert t2 - megatron_sp == 2 * S * B * H * 2 // 2  # the two column inputs kept as s/2 shards


# ----- the pure functions ---------------------------------------------------------------------------
def test_paper_forms_generalize_to_other_dtypes() -> None:
    """fp32 activations with 1-byte masks: every D-term doubles, the masks stay (e(16D + 2M) + as^2b(2D + M))."""
    e = S * B * H
    assert korthikanti_layer_bytes(s=S, b=B, h=H, a=A, dtype_bytes=4) == e * (16 * 4 + 2) + A * S * S * B * (2 * 4 + 1)
    assert korthikanti_layer_bytes(s=S, b=B, h=H, a=A, tp=2, sequence_parallel=True, mask_bytes=2) == (
        e * (16 * 2 + 2 * 2) + A * S * S * B * (2 * 2 + 2)) // 2


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match="tp 3 must divide heads"):
        korthikanti_layer_bytes(s=S, b=B, h=H, a=A, tp=3)
    with pytest.raises(ConfigError, match="seq_len 15 is not divisible by tp 2"):
        korthikanti_layer_bytes(s=15, b=B, h=H, a=A, tp=2, sequence_parallel=True)
    with pytest.raises(ConfigError, match="recompute must be one of"):
        _model(recompute="attention")
    with pytest.raises(ConfigError, match="kv_heads 3"):
        layer_activation_bytes(LayerShape(hidden=48, heads=6, kv_heads=3, ffn_hidden=96), seq_len=S, micro_batch_size=B,
                               dtype_bytes=2, tp=2)
    with pytest.raises(ConfigError, match="norm must be one of"):
        LayerShape(hidden=H, heads=A, kv_heads=A, ffn_hidden=4 * H, norm="batchnorm")
