"""A shape-aware GEMM time: roofline on arithmetic intensity, with tile and wave quantization, torch-free.

A flat fraction of peak FLOP/s (the analytic model's ``efficiency``) makes a micro-batch's cost
linear in its size, so the smallest micro-batch always looks best. Real GEMMs are not linear:

* **Roofline** (Williams, Waterman & Patterson 2009): a GEMM of (M x K) by (K x N) does 2MNK
  FLOPs and moves at least the two operands and the output through HBM; below the ridge point
  it runs at memory speed.
* **Tile quantization**: cuBLAS/CUTLASS kernels compute the output in tiles (e.g. 128 x 256 on
  H100); a dimension that is not a multiple of the tile computes the padding too.
* **Wave quantization**: the tiles run in waves of one tile per SM; a last, partial wave leaves
  SMs idle (NVIDIA, "Matrix Multiplication Background User's Guide", sections "Tile
  Quantization" and "Wave Quantization").
* **A fixed cost per kernel**: launch and the tail of the previous kernel, a few microseconds.

:func:`gemm_time_s` combines them; :func:`gemm_efficiency` is achieved FLOP/s over peak. The
constants per device (:data:`GEMM_CONSTANTS`) are datasheet SM counts, the tile of the fastest
cuBLAS kernels for bf16 on that architecture, and the best fraction of peak such kernels reach
on large shapes (a calibration can replace them: :class:`GemmConstants` is plain data).
:func:`transformer_layer_gemms` lists the four weight GEMMs of a transformer layer's forward
pass (Megatron's QKV, attention output, MLP up and down; Narayanan et al. 2021, sec. 5.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipetrain.errors import ConfigError

__all__ = ["GemmConstants", "GEMM_CONSTANTS", "gemm_time_s", "gemm_efficiency", "transformer_layer_gemms", "LayerTimes",
           "layer_times_s"]


@dataclass(frozen=True, kw_only=True)
class GemmConstants:
    """What a device's GEMM kernels look like (module docstring)."""

    sm_count: int
    tile_m: int
    tile_n: int
    max_efficiency: float  # achieved / peak FLOP/s of a large, well-shaped GEMM
    kernel_overhead_s: float
    memory_efficiency: float = 0.8  # of datasheet HBM bandwidth
    # FlashAttention's fraction of peak: FA2 reaches about 35-50% on H100 forward, FA3 60-75%
    # (Shah et al. 2024, fig. 1-3); its backward runs about 0.8x as efficiently (Dao 2023, sec. 4)
    attention_efficiency: float = 0.5

    def __post_init__(self) -> None:
        if min(self.sm_count, self.tile_m, self.tile_n) < 1:
            raise ConfigError(f"sm_count and tiles must be >= 1: {self}")
        if not (0 < self.max_efficiency <= 1 and 0 < self.memory_efficiency <= 1):
            raise ConfigError(f"efficiencies must be in (0, 1]: {self}")
        if self.kernel_overhead_s < 0:
            raise ConfigError(f"kernel_overhead_s must be >= 0: {self}")


#: Datasheet SM counts (A100 SXM: 108; H100 and H200 SXM: 132). Tiles: CUTLASS's default bf16
#: tensor-core tile on Ampere is 128 x 128 and on Hopper 128 x 256 (warp-specialized kernels).
#: 0.8 of peak: large bf16 GEMMs reach about 250 of 312 TFLOP/s on A100 and about 750-800 of
#: 989 on H100 in public cuBLAS measurements; 5 us per kernel: launch plus tail.
GEMM_CONSTANTS: dict[str, GemmConstants] = {
    "a100-80g": GemmConstants(sm_count=108, tile_m=128, tile_n=128, max_efficiency=0.8, kernel_overhead_s=5e-6),
    "h100-sxm": GemmConstants(sm_count=132, tile_m=128, tile_n=256, max_efficiency=0.8, kernel_overhead_s=5e-6),
    "h200-sxm": GemmConstants(sm_count=132, tile_m=128, tile_n=256, max_efficiency=0.8, kernel_overhead_s=5e-6),
}


def _quantization(m: int, n: int, c: GemmConstants) -> float:
    """Useful fraction of the tile work: tile padding times the last wave's idle SMs."""
    tiles_m, tiles_n = math.ceil(m / c.tile_m), math.ceil(n / c.tile_n)
    tiles = tiles_m * tiles_n
    tile_q = (m * n) / (tiles_m * c.tile_m * tiles_n * c.tile_n)
    waves = math.ceil(tiles / c.sm_count)
    wave_q = tiles / (waves * c.sm_count)
    return tile_q * wave_q


def gemm_time_s(m: int, n: int, k: int, *, peak_flops: float, memory_bandwidth_bytes_per_s: float, constants: GemmConstants,
                dtype_bytes: int = 2) -> float:
    """Time of one (m x k) @ (k x n) GEMM: the slower of compute (quantized) and memory, plus the kernel overhead."""
    if min(m, n, k, dtype_bytes) < 1:
        raise ConfigError(f"GEMM dimensions and dtype bytes must be >= 1, got m={m} n={n} k={k} bytes={dtype_bytes}")
    if peak_flops <= 0 or memory_bandwidth_bytes_per_s <= 0:
        raise ConfigError("peak FLOP/s and memory bandwidth must be > 0")
    flops = 2.0 * m * n * k
    compute = flops / (peak_flops * constants.max_efficiency * _quantization(m, n, constants))
    memory = dtype_bytes * (m * k + k * n + m * n) / (memory_bandwidth_bytes_per_s * constants.memory_efficiency)
    return max(compute, memory) + constants.kernel_overhead_s


def gemm_efficiency(m: int, n: int, k: int, *, peak_flops: float, memory_bandwidth_bytes_per_s: float,
                    constants: GemmConstants, dtype_bytes: int = 2) -> float:
    """Achieved over peak FLOP/s of :func:`gemm_time_s`."""
    t = gemm_time_s(m, n, k, peak_flops=peak_flops, memory_bandwidth_bytes_per_s=memory_bandwidth_bytes_per_s,
                    constants=constants, dtype_bytes=dtype_bytes)
    return 2.0 * m * n * k / t / peak_flops


def transformer_layer_gemms(*, tokens: int, hidden: int, tp: int = 1, ffn_hidden: int | None = None,
                            kv_hidden: int | None = None, gated_mlp: bool = False) -> tuple[tuple[int, int, int], ...]:
    """(m, n, k) of a layer's forward weight GEMMs on one tensor-parallel rank: QKV and the MLP up
    projection split their output columns over ``tp``, the attention output and MLP down projection
    their input rows (Shoeybi et al. 2019, sec. 3). ``kv_hidden``: the K and V width (GQA), default
    ``hidden``; ``ffn_hidden`` default 4 x ``hidden``; ``gated_mlp`` (SwiGLU) fuses the gate and up
    projections into one GEMM of twice the width, as Megatron's ``--swiglu`` does."""
    ffn = ffn_hidden if ffn_hidden is not None else 4 * hidden
    kv = kv_hidden if kv_hidden is not None else hidden
    if min(tokens, hidden, tp, ffn, kv) < 1 or hidden % tp or kv % tp or ffn % tp:
        raise ConfigError(f"tokens, hidden, ffn and kv widths must be >= 1 and divisible by tp={tp}")
    up = 2 * ffn if gated_mlp else ffn
    return ((tokens, (hidden + 2 * kv) // tp, hidden), (tokens, hidden, hidden // tp),
            (tokens, up // tp, hidden), (tokens, hidden, ffn // tp))


@dataclass(frozen=True, kw_only=True)
class LayerTimes:
    """One transformer layer on one tensor-parallel rank, one micro-batch: seconds of forward,
    of the whole backward, and of the backward's weight-gradient GEMMs."""

    fwd_s: float
    bwd_s: float
    wgrad_s: float


#: Element-wise kernels of a layer's forward (two norms, two residual adds, the activation, rotary
#: or bias adds, softmax statistics...): each pays the kernel overhead; backward runs about twice as many.
_ELEMENTWISE_KERNELS = 8


def layer_times_s(*, tokens: int, hidden: int, kv_hidden: int, ffn_hidden: int, gated_mlp: bool, tp: int,
                  sequence_parallel: bool, attention_flops: float, peak_flops: float, memory_bandwidth_bytes_per_s: float,
                  constants: GemmConstants, dtype_bytes: int = 2) -> LayerTimes:
    """A transformer layer's time from its parts (Narayanan et al. 2021, sec. 5.1, for the parts):

    * the weight GEMMs of :func:`transformer_layer_gemms`, each by :func:`gemm_time_s`; backward
      runs two GEMMs per forward one -- the input gradient (m x n) @ (n x k) and the weight
      gradient (k x m) @ (m x n) -- with their own shapes, so their own quantization;
    * the attention core, ``attention_flops`` (the traced count on this rank: QK^T and PV) at
      FlashAttention's efficiency, backward 2x the FLOPs at 0.8x the efficiency;
    * memory-bound element-wise work by bytes over HBM bandwidth: per token the norms read and
      write h twice (4h), the two residual adds read two and write one (6h), the activation
      reads and writes the MLP width (2 ffn/tp; SwiGLU 3); split over tp along the sequence with
      sequence parallelism; backward twice the bytes;
    * :data:`_ELEMENTWISE_KERNELS` fixed kernel costs forward, twice that backward.
    """
    gemms = transformer_layer_gemms(tokens=tokens, hidden=hidden, tp=tp, ffn_hidden=ffn_hidden, kv_hidden=kv_hidden,
                                    gated_mlp=gated_mlp)
    def t(m: int, n: int, k: int) -> float:
        return gemm_time_s(m, n, k, peak_flops=peak_flops, memory_bandwidth_bytes_per_s=memory_bandwidth_bytes_per_s,
                           constants=constants, dtype_bytes=dtype_bytes)

    fwd_gemm = sum(t(m, n, k) for m, n, k in gemms)
    dgrad = sum(t(m, k, n) for m, n, k in gemms)
    wgrad = sum(t(k, n, m) for m, n, k in gemms)
    attn_f = attention_flops / (peak_flops * constants.attention_efficiency) if attention_flops > 0 else 0.0
    attn_b = 2.0 * attention_flops / (peak_flops * constants.attention_efficiency * 0.8) if attention_flops > 0 else 0.0
    row_tokens = tokens / tp if sequence_parallel else tokens
    elem_bytes = dtype_bytes * (row_tokens * 10 * hidden + tokens * (3 if gated_mlp else 2) * ffn_hidden / tp)
    elem_f = elem_bytes / (memory_bandwidth_bytes_per_s * constants.memory_efficiency) + _ELEMENTWISE_KERNELS * constants.kernel_overhead_s
    return LayerTimes(fwd_s=fwd_gemm + attn_f + elem_f, bwd_s=dgrad + wgrad + attn_b + 2.0 * elem_f, wgrad_s=wgrad)
