"""Activation memory of one transformer layer under tensor/sequence parallelism and recompute, torch-free.

Two models, both per layer, per micro-batch, on one GPU, in bytes:

* :func:`korthikanti_layer_bytes`: the closed forms of Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models" (MLSys 2023), sec. 4, for a GPT layer with unfused
  ("math") attention and dropout, in the paper's notation (s sequence, b micro-batch, h hidden,
  a heads, t tensor-parallel size).
* :func:`layer_activation_bytes` (and its breakdown :func:`layer_activation_terms`): what pipetrain's
  zoo blocks and executor actually save, from a :class:`~pipetrain.graph.LayerShape`: the paper's
  terms plus those it leaves out (LayerNorm's fp32 statistics, the causal mask the math path
  materializes, FlashAttention's log-sum-exp, grouped KV heads, gated MLPs, RMSNorm,
  rotary tables) and DTensor's sequence parallelism, which keeps the all-gathered norm output.

Plus :func:`zb_w_held_bytes`: what a zero-bubble schedule holds between a layer's input-gradient
pass (I) and its weight-gradient pass (W).

The paper's per-layer accounting (sec. 4.1; 16-bit activations, 1-byte dropout masks), which
:func:`korthikanti_layer_bytes` generalizes with ``D = dtype_bytes`` and ``M = mask_bytes``
(``e = s*b*h`` elements):

=====================================  =================  =====================  ==============
term                                   bytes              paper (D=2, M=1)       with tp (t)
=====================================  =================  =====================  ==============
2 LayerNorm inputs                     2 e D              4 sbh                  replicated
QKV projection input (LN1 output)      e D                2 sbh                  replicated
Q and K (for QK^T)                     2 e D              4 sbh                  / t
softmax output                         a s^2 b D          2 as^2 b               / t
its dropout mask                       a s^2 b M          as^2 b                 / t
dropout output (for P.V)               a s^2 b D          2 as^2 b               / t
V (for P.V)                            e D                2 sbh                  / t
out-projection input                   e D                2 sbh                  / t
dropout mask after the projection      e M                sbh                    replicated
fc1 input (LN2 output)                 e D                2 sbh                  replicated
GELU input (fc1 output, 4h wide)       4 e D              8 sbh                  / t
fc2 input (GELU output)                4 e D              8 sbh                  / t
dropout mask after the MLP             e M                sbh                    replicated
=====================================  =================  =====================  ==============

Sum: ``e(16D + 2M) + as^2b(2D + M)`` = sbh(34 + 5as/h) at D=2, M=1 (sec. 4.1). Tensor parallelism
splits the attention and MLP cores: sbh(10 + 24/t + 5as/(ht)) (sec. 4.2.1); sequence parallelism
splits the replicated LayerNorm and dropout regions along s: sbh(34/t + 5as/(ht)) (sec. 4.2.2);
selective recompute (sec. 4.3) drops the 5as^2b attention-core terms: 34 sbh/t with sp and
sbh(10 + 24/t) without; full recompute keeps only the layer input, 2sbh (/t with sp).

Scope: the activations of a model cast to one dtype, as ``planner.trace`` traces it (and as the
paper counts). Under ``torch.autocast``, how the executor runs bf16, the residual stream stays
fp32 and LayerNorm and softmax run in fp32, so the norm inputs, their outputs and the math path's
probabilities are 4-byte tensors (plus the half-precision casts the matmuls save); not modelled
here, as ``memory.py`` does not model it for traced graphs either.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pipetrain.errors import ConfigError
from pipetrain.graph import LayerShape

__all__ = ["RECOMPUTE_KINDS", "LN_STAT_BYTES", "LayerActivationBytes", "korthikanti_layer_bytes", "layer_activation_terms",
           "layer_activation_bytes", "zb_w_held_bytes"]

#: ``none``; ``selective``: the attention core (QK^T, softmax, dropout, P.V) recomputed in the
#: backward (Korthikanti et al. sec. 4.3); ``full``: the whole layer recomputed from its input.
RECOMPUTE_KINDS = ("none", "selective", "full")
#: LayerNorm keeps its per-token mean and rstd in fp32 for every input dtype: CUDA's
#: ``native_layer_norm`` and its meta function return them in the accumulate type (float for half
#: and bfloat16). The CPU kernel does too when the weights are fp32 (autocast), but keeps them in
#: the input dtype when input and weights are both half precision (a model cast with ``.to``).
LN_STAT_BYTES = 4


def _check_common(*, s: int, b: int, tp: int, dtype_bytes: int, mask_bytes: int, sequence_parallel: bool,
                  recompute: str) -> None:
    if min(s, b, tp, dtype_bytes, mask_bytes) < 1:
        raise ConfigError(f"seq_len {s}, micro_batch_size {b}, tp {tp}, dtype_bytes {dtype_bytes} and mask_bytes "
                          f"{mask_bytes} must all be >= 1")
    if recompute not in RECOMPUTE_KINDS:
        raise ConfigError(f"recompute must be one of {RECOMPUTE_KINDS}, got {recompute!r}")
    if sequence_parallel and s % tp:
        raise ConfigError(f"sequence parallelism splits the sequence over tp: seq_len {s} is not divisible by tp {tp}")


def korthikanti_layer_bytes(*, s: int, b: int, h: int, a: int, tp: int = 1, sequence_parallel: bool = False,
                            recompute: str = "none", dtype_bytes: int = 2, mask_bytes: int = 1) -> int:
    """Activation bytes of one GPT layer, Korthikanti et al. 2023 sec. 4 (see the module table).

    ``dtype_bytes`` D is the activation dtype (the paper's 2), ``mask_bytes`` M a dropout-mask
    element (the paper's 1). Exact integers: ``a`` (hence ``h``) must divide by ``tp``, and ``s``
    too with ``sequence_parallel`` (Megatron's requirements).
    """
    _check_common(s=s, b=b, tp=tp, dtype_bytes=dtype_bytes, mask_bytes=mask_bytes,
                  sequence_parallel=sequence_parallel, recompute=recompute)
    if min(h, a) < 1 or h % a or a % tp:
        raise ConfigError(f"heads {a} must divide hidden {h}, and tp {tp} must divide heads")
    if sequence_parallel and tp == 1:
        sequence_parallel = False  # one rank: nothing to split
    D, M, t = dtype_bytes, mask_bytes, tp
    if recompute == "full":
        # only the layer's input is kept (sec. 4.3: 2sbhL over L layers), its s/t shard with sp
        return (s // t if sequence_parallel else s) * b * h * D
    # the LayerNorm and dropout regions: 2 LN inputs, 2 LN outputs (QKV and fc1 inputs), 2 dropout masks
    replicated = s * b * h * (4 * D + 2 * M)
    # Q, K, V, out-projection input, GELU input, fc2 input: split over heads / the 4h MLP width
    split = s * b * (h // t) * 12 * D
    # softmax output, its dropout mask, the dropped probabilities
    core = (a // t) * s * s * b * (2 * D + M)
    if sequence_parallel:
        replicated = (s // t) * b * h * (4 * D + 2 * M)
    if recompute == "selective":
        core = 0
    return replicated + split + core


@dataclass(frozen=True, kw_only=True)
class LayerActivationBytes:
    """One layer's saved-for-backward bytes on one GPU for one micro-batch, by what saves them.

    ``total`` is their sum. Names say which op's backward needs the tensor; "replicated" terms are
    the same on every tensor-parallel rank unless sequence parallelism splits them.
    """

    layer_input: int = 0  # full recompute: the layer's input, the only thing kept
    norm_inputs: int = 0  # both norms' inputs (LayerNorm and RMSNorm backward need x)
    norm_stats: int = 0  # LayerNorm: fp32 mean and rstd per token; RMSNorm: its rstd, at the activation dtype
    norm_normalized: int = 0  # RMSNorm written out as x * rstd * w: the product x * rstd, for w's gradient
    qkv_input: int = 0  # the first norm's output, the QKV projection's input
    qkv: int = 0  # Q, K, V as the attention core reads them (after rotary)
    rotary_tables: int = 0  # cos and sin, saved by the rotary multiplications
    attn_probs: int = 0  # math: softmax output, and the dropped probabilities when there is dropout
    attn_dropout_mask: int = 0  # math with dropout: the attention-probability dropout mask
    causal_mask: int = 0  # math, causal: the bool s x s mask masked_fill saves
    attn_lse: int = 0  # flash: fp32 log-sum-exp per (batch, head, query)
    proj_input: int = 0  # the attention output, the out-projection's input (flash's backward keeps the same tensor)
    fc_input: int = 0  # the second norm's output, the first MLP matmul(s)' input
    mlp_hidden: int = 0  # GELU: its input and output; gated: gate, its SiLU, up, and their product
    dropout_masks: int = 0  # the dropout masks after the attention projection and after the MLP

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ConfigError(f"activation term {f.name} must be >= 0, got {getattr(self, f.name)}")

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def _local_kv_heads(shape: LayerShape, tp: int) -> int:
    """KV heads on one tensor-parallel rank: split when tp divides them, else each rank holds one
    replicated KV head (Megatron-LM with ``num_query_groups < tp``)."""
    if shape.kv_heads % tp == 0:
        return shape.kv_heads // tp
    if tp % shape.kv_heads == 0:
        return 1
    raise ConfigError(f"tp {tp} and kv_heads {shape.kv_heads}: one must divide the other")


def _check_shape_tp(shape: LayerShape, tp: int) -> None:
    if shape.heads % tp or shape.ffn_hidden % tp:
        raise ConfigError(f"tp {tp} must divide heads {shape.heads} and ffn_hidden {shape.ffn_hidden}")


def layer_activation_terms(shape: LayerShape, *, seq_len: int, micro_batch_size: int, dtype_bytes: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", mask_bytes: int = 1,
                           sp_saves_gathered: bool = True) -> LayerActivationBytes:
    """What autograd saves for one transformer layer: pipetrain's pre-norm GPT and Llama blocks, and
    its post-norm BERT block, whose saved tensors have the same sizes (the block input for Q, K, V,
    each norm's input and the first norm's output for the MLP: four ``s b h`` tensors, as the
    pre-norm layer's two norm inputs and two norm outputs).

    The paper's terms (module table) generalized, and the ones it leaves out:

    * norms: a LayerNorm keeps fp32 mean and rstd (``2 * 4`` bytes a token, :data:`LN_STAT_BYTES`),
      16 sb per layer; the RMSNorm of the zoo (``x * rsqrt(mean(x^2) + eps) * w``, as Llama's
      reference code) keeps x, its rstd (activation dtype) and x * rstd;
    * Q, K, V: ``s b (h + 2 kv_dim)`` with grouped KV heads (Ainslie et al. 2023), kv_dim =
      kv_heads * head_dim; the math path's matmuls copy K and V at full head width;
    * attention: ``math`` keeps softmax(QK^T) (a s^2 b D; the dropped probabilities too with dropout,
      and the bool dropout mask) and, causal, the bool s x s mask (s^2 bytes, not per head or
      batch); ``flash`` keeps none of that (its backward recomputes the probabilities, Dao et al.
      2022) but an fp32 log-sum-exp (4 a s b; CUDA's memory-efficient kernel pads s to a multiple
      of 32) and its output, which is the out-projection's input (the paper's e D term) counted
      once: the flash kernels allocate the output like q (``empty_like``), the zoo keeps q
      sequence-major ([b, s, a, d] in memory), so the [b, s, h] input is a view of the output; a
      head-major q would add a copy, e D. Dropout inside the fused kernel stores no mask (it is
      regenerated from a few bytes of RNG state, not counted);
    * MLP: GELU keeps its input and output (``2 s b f D``, the paper's 8sbh + 8sbh at f = 4h);
      SwiGLU keeps gate, SiLU(gate), up and their product (``4 s b f D``);
    * rotary: the zoo's rotary recomputes cos and sin ([s, head_dim/2], activation dtype) for Q and
      for K, and each multiplication saves them: ``2 s head_dim D``;
    * dropout masks: ``mask_bytes`` an element (1: bool, what ``native_dropout`` saves on GPUs and
      what the zoo's ``common.dropout`` saves everywhere).

    Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) splits heads, KV heads and the MLP width
    over ``tp``; the norms, their outputs, the residual dropouts stay replicated. Sequence
    parallelism (Korthikanti et al. sec. 4.2.2) splits those along s, with one exception that this
    model counts as torch's DTensor does (``sp_saves_gathered``, the default): the paper's Megatron
    keeps only the s/t shard of a norm's output and all-gathers it again in the backward, but
    DTensor's ``SequenceParallel`` + ``ColwiseParallel`` all-gathers the norm output
    (``redistribute`` to ``Replicate``) before the matmul, whose autograd node saves the gathered,
    full-s tensor: ``qkv_input`` and ``fc_input`` are ``s b h D`` each, not ``s b h D / t``, which is
    ``2 s b h D (1 - 1/t)`` above the paper's sbh(34/t + 5as/(ht)). ``sp_saves_gathered=False`` is Megatron's accounting.

    Selective recompute checkpoints the attention core: it keeps the core's inputs Q, K, V (at
    their KV width) and none of its s^2 tensors, mask or log-sum-exp. Full recompute
    keeps the layer input only (the s/t shard with sequence parallelism).
    """
    s, b, t, D, M = seq_len, micro_batch_size, tp, dtype_bytes, mask_bytes
    _check_common(s=s, b=b, tp=t, dtype_bytes=D, mask_bytes=M, sequence_parallel=sequence_parallel, recompute=recompute)
    _check_shape_tp(shape, t)
    sp = sequence_parallel and t > 1
    h, hd = shape.hidden, shape.hidden // shape.heads
    heads, kv, f = shape.heads // t, _local_kv_heads(shape, t), shape.ffn_hidden // t
    s_norm = s // t if sp else s  # the sequence a rank's norm and dropout regions see
    if recompute == "full":
        return LayerActivationBytes(layer_input=s_norm * b * h * D)
    if shape.norm == "layernorm":
        stats, normalized = 2 * 2 * LN_STAT_BYTES * s_norm * b, 0
    else:
        stats, normalized = 2 * s_norm * b * D, 2 * s_norm * b * h * D
    # a column-parallel input is the gathered, full-s tensor under DTensor (see the docstring)
    s_col = s if (not sp or sp_saves_gathered) else s_norm
    core_kept = recompute == "none"
    if shape.attention == "math" and core_kept:
        qkv = s * b * (heads + 2 * heads) * hd * D  # the matmuls' contiguous copies, K and V broadcast to all heads
    else:
        qkv = s * b * (heads + 2 * kv) * hd * D
    probs = mask = causal = lse = 0
    if core_kept and shape.attention == "math":
        probs = heads * s * s * b * D * (2 if shape.dropout else 1)  # softmax output (+ its dropout output)
        mask = heads * s * s * b * M if shape.dropout else 0
        causal = s * s if shape.causal else 0  # bool, broadcast over batch and heads
    elif core_kept:
        lse = 4 * b * heads * s
    return LayerActivationBytes(
        norm_inputs=2 * s_norm * b * h * D, norm_stats=stats, norm_normalized=normalized,
        qkv_input=s_col * b * h * D, qkv=qkv, rotary_tables=2 * s * hd * D if shape.rotary else 0,
        attn_probs=probs, attn_dropout_mask=mask, causal_mask=causal, attn_lse=lse,
        proj_input=s * b * heads * hd * D, fc_input=s_col * b * h * D,
        mlp_hidden=(4 if shape.gated_mlp else 2) * s * b * f * D,
        dropout_masks=2 * s_norm * b * h * M if shape.dropout else 0)


def layer_activation_bytes(shape: LayerShape, *, seq_len: int, micro_batch_size: int, dtype_bytes: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", mask_bytes: int = 1,
                           sp_saves_gathered: bool = True) -> int:
    """Saved-for-backward bytes of one layer on one GPU for one micro-batch: the sum of
    :func:`layer_activation_terms` (see there for each term and its source)."""
    return layer_activation_terms(shape, seq_len=seq_len, micro_batch_size=micro_batch_size, dtype_bytes=dtype_bytes,
                                  tp=tp, sequence_parallel=sequence_parallel, recompute=recompute,
                                  mask_bytes=mask_bytes, sp_saves_gathered=sp_saves_gathered).total


def zb_w_held_bytes(shape: LayerShape, *, seq_len: int, micro_batch_size: int, dtype_bytes: int, tp: int = 1,
                    sequence_parallel: bool = False, sp_saves_gathered: bool = True) -> int:
    """Bytes one layer holds between a zero-bubble schedule's I and W passes, per micro-batch.

    W computes each linear layer's ``dW = g^T x`` (Qi et al. 2024, "Zero Bubble Pipeline
    Parallelism", sec. 2; Megatron-LM's ``WeightGradStore``; ``executor.wgrad.WeightGradQueue``),
    so after I it needs exactly every linear layer's input ``x`` and output gradient ``g``:

    * QKV projection(s): input = the first norm's output, ``s b h`` (one tensor shared by separate
      Q, K, V projections); output gradient ``s b (h + 2 kv_dim) / t``;
    * out-projection: input ``s b h / t`` (row-parallel: split); output gradient ``s b h``
      (replicated: Megatron's g operator is the identity in the backward; with sequence
      parallelism the gradient is all-gathered back to full s before the GEMMs);
    * fc1 (gate and up when gated): input = the second norm's output, ``s b h``; output gradient(s)
      ``s b f / t`` each;
    * fc2: input ``s b f / t``; output gradient ``s b h``;

    all at ``dtype_bytes``. The column-parallel inputs are replicated, and full-s under sequence
    parallelism when DTensor keeps the gathered tensor (``sp_saves_gathered``, see
    :func:`layer_activation_terms`); Megatron keeps the ``s/t`` shard and gathers it again for W.
    """
    s, b, t, D = seq_len, micro_batch_size, tp, dtype_bytes
    _check_common(s=s, b=b, tp=t, dtype_bytes=D, mask_bytes=1, sequence_parallel=sequence_parallel, recompute="none")
    _check_shape_tp(shape, t)
    sp = sequence_parallel and t > 1
    h, hd = shape.hidden, shape.hidden // shape.heads
    heads, kv, f = shape.heads // t, _local_kv_heads(shape, t), shape.ffn_hidden // t
    s_col = s if (not sp or sp_saves_gathered) else s // t
    inputs = s_col * b * h + s * b * heads * hd + s_col * b * h + s * b * f
    grads = s * b * (heads + 2 * kv) * hd + s * b * h + (2 if shape.gated_mlp else 1) * s * b * f + s * b * h
    return (inputs + grads) * D
