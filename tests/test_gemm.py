"""The shape-aware GEMM model: efficiency rises with the hidden size, and per-token time falls with the micro-batch."""

from __future__ import annotations

import pytest

from pipetrain.errors import ConfigError
from pipetrain.gemm import GEMM_CONSTANTS, GemmConstants, gemm_efficiency, gemm_time_s, transformer_layer_gemms
from pipetrain.hardware import BUILTIN_DEVICE_TYPES


def _layer(device: str, tokens: int, hidden: int, tp: int = 1) -> tuple[float, float]:
    """(time, efficiency) of a layer's four forward GEMMs."""
    dt, c = BUILTIN_DEVICE_TYPES[device], GEMM_CONSTANTS[device]
    kw = dict(peak_flops=dt.peak_flops_bf16, memory_bandwidth_bytes_per_s=dt.memory_bandwidth_bytes_per_s, constants=c)
    shapes = transformer_layer_gemms(tokens=tokens, hidden=hidden, tp=tp)
    t = sum(gemm_time_s(m, n, k, **kw) for m, n, k in shapes)  # type: ignore[arg-type]
    flops = sum(2.0 * m * n * k for m, n, k in shapes)
    return t, flops / t / dt.peak_flops_bf16


@pytest.mark.parametrize("device", ["h100-sxm", "a100-80g"])
def test_efficiency_rises_with_hidden_size(device: str) -> None:
    # not monotonic in between: wave quantization (a partial last wave) costs some shapes a few percent
    for tokens in (512, 4096, 16384):
        small, large = _layer(device, tokens, 1024)[1], _layer(device, tokens, 12288)[1]
        assert small < large <= GEMM_CONSTANTS[device].max_efficiency
    # few tokens and a small hidden size: tiles half empty and short kernels dominated by their fixed cost
    assert _layer(device, 512, 1024)[1] < 0.5 * _layer(device, 512, 12288)[1]
    assert _layer(device, 16384, 12288)[1] > 0.75


@pytest.mark.parametrize("device", ["h100-sxm", "a100-80g"])
def test_per_token_time_falls_with_micro_batch_size(device: str) -> None:
    seq, h = 2048, 4096
    per_token = [_layer(device, b * seq, h)[0] / (b * seq) for b in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(per_token, per_token[1:]))
    # at one token per row the GEMMs are memory-bound: far below the large-shape efficiency
    assert _layer(device, 8, h)[1] < 0.05


def test_quantization_exact_cases() -> None:
    c = GemmConstants(sm_count=4, tile_m=128, tile_n=128, max_efficiency=1.0, kernel_overhead_s=0.0, memory_efficiency=1.0)
    big = dict(peak_flops=1e12, memory_bandwidth_bytes_per_s=1e18, constants=c)
    # 4 tiles on 4 SMs: one full wave, no padding: the peak
    assert gemm_efficiency(256, 256, 4096, **big) == pytest.approx(1.0)  # type: ignore[arg-type]
    # 5 tiles: two waves, the second with one tile: 5 / 8 of the SM-time is useful
    assert gemm_efficiency(640, 128, 4096, **big) == pytest.approx(5 / 8)  # type: ignore[arg-type]
    # a 129-row dimension pads to two tiles of 128: 129 / 256 useful, in one wave of 2 of 4 SMs
    assert gemm_efficiency(129, 128, 4096, **big) == pytest.approx(129 / 256 * 2 / 4)  # type: ignore[arg-type]
    # memory-bound: 2 bytes x (m k + k n + m n) at 1 GB/s
    slow = dict(peak_flops=1e15, memory_bandwidth_bytes_per_s=1e9, constants=c)
    assert gemm_time_s(1, 128, 128, **slow) == pytest.approx(2 * (128 + 128 * 128 + 128) / 1e9)  # type: ignore[arg-type]


def test_layer_shapes_split_over_tp_and_bad_shapes() -> None:
    assert transformer_layer_gemms(tokens=10, hidden=64, tp=2) == ((10, 96, 64), (10, 64, 32), (10, 128, 64), (10, 64, 128))
    assert transformer_layer_gemms(tokens=10, hidden=64, kv_hidden=16, ffn_hidden=172)[0] == (10, 96, 64)
    with pytest.raises(ConfigError, match="divisible by tp=3"):
        transformer_layer_gemms(tokens=10, hidden=64, tp=3)


def test_a_device_type_carries_its_own_gemm_constants_from_yaml() -> None:
    """A topology's device type may carry the GEMM model's constants (fitted to its own measured
    GEMMs); they replace the built-in ones of a known GPU in the layer times."""
    from pipetrain.costs import analytic_node_times
    from pipetrain.graph import Edge, LayerGraph, LayerShape, Node
    from pipetrain.topology import load_topology

    h, b, s = 8192, 1, 4096
    shape = LayerShape(hidden=h, heads=64, kv_heads=64, ffn_hidden=4 * h)
    f = 24.0 * b * s * h * h
    g = LayerGraph(model="x", granularity="block", micro_batch_size=b, seq_len=s, dtype="bf16", nodes=tuple(
        Node(name=f"l{i}", kind="transformer", fwd_flops=f, bwd_flops=2 * f, wgrad_flops=f, param_count=12 * h * h,
             param_bytes=24 * h * h, output_bytes=2 * b * s * h, output_shape=(b, s, h), output_dtype="bfloat16",
             saved_bytes=34 * b * s * h, layer=shape) for i in range(2)), edges=(Edge(src=0, dst=1),),
        input_shape=(b, s, h), input_dtype="bfloat16")
    yaml = """
device_types:
  h100-sxm: {peak_flops: {fp32: 67e12, bf16: 989.4e12}, memory_bytes: 80e9, memory_bandwidth_bytes_per_s: 3.35e12%s}
nodes:
  - devices: [h100-sxm]
    link: {kind: nvswitch, bandwidth_bytes_per_s: 450e9, latency_s: 3e-6}
"""
    builtin = load_topology(yaml % "").devices[0].type
    assert builtin.gemm is None  # the built-in constants of a known name apply
    slow = load_topology(yaml % (", gemm: {sm_count: 132, tile_m: 128, tile_n: 256, max_efficiency: 0.4, "
                                 "kernel_overhead_s: 5e-6}")).devices[0].type
    assert slow.gemm is not None and slow.gemm.max_efficiency == 0.4
    t_builtin = analytic_node_times(g, builtin).fwd_s[0]
    t_slow = analytic_node_times(g, slow).fwd_s[0]
    assert t_builtin < t_slow < 2.0 * t_builtin  # the weight GEMMs at half the efficiency, attention as before
    with pytest.raises(ConfigError, match="gemm: unknown key 'tiles'"):
        load_topology(yaml % ", gemm: {sm_count: 132, tiles: 128}")
    with pytest.raises(ConfigError, match="max_efficiency|efficiencies must be in"):
        load_topology(yaml % ", gemm: {sm_count: 132, tile_m: 128, tile_n: 256, max_efficiency: 1.5, kernel_overhead_s: 0}")
