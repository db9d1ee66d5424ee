"""Hardware presets: datasheet constants of GPUs, links and networks, and this machine's CPU.

:func:`preset` builds the topologies that :func:`pipetrain.topology.topology_preset`
names: ``local-cpu:N`` (detected from this machine), ``dgx-a100-80g:NODES``,
``dgx-h100:NODES``, ``h200:NODES`` and the heterogeneous ``mixed-a100-h100``. torch-free.
"""

from __future__ import annotations

import os
from typing import Any

from pipetrain.errors import ConfigError
from pipetrain.topology import DeviceType, GiB, InterNodeLink, Link, NodeSpec, Topology

__all__ = [
    "BUILTIN_DEVICE_TYPES", "NVLINK3", "NVLINK4", "HDR_IB", "NDR_IB", "LOOPBACK", "LOCAL_CPU_FLOPS_PER_CORE",
    "LOCAL_CPU_MEMORY_BANDWIDTH_BYTES_PER_S", "PRESETS", "local_cpu_device_type", "preset", "default_memory_reserve_bytes",
]

# ---------------------------------------------------------------------------------------------
# Datasheet constants. Peak FLOP/s are dense (no 2:4 sparsity). Bandwidths are per direction.
# Default efficiency 0.5 of peak FLOP/s: Narayanan et al. 2021 (Megatron-LM, SC'21) sustain
# 44-52% of A100 peak on GPT models; memory_efficiency 0.8 of datasheet HBM bandwidth is what
# STREAM-like kernels reach. Both are refined by calibration (pipetrain.calibration.fit).
# HBM capacities: datasheets say "80GB"/"141GB"; HBM stacks are binary, so bytes = N * GiB
# (nvidia-smi shows slightly less usable, e.g. 81559 MiB on H100; the planner keeps headroom).
# ---------------------------------------------------------------------------------------------
BUILTIN_DEVICE_TYPES: dict[str, DeviceType] = {
    # NVIDIA A100 80GB SXM datasheet (2021): FP32 19.5 TF, TF32 156 TF, BF16/FP16 312 TF dense,
    # HBM2e 2,039 GB/s. fp32 uses the FP32 rate: PyTorch leaves TF32 matmul off by default.
    "a100-80g": DeviceType(name="a100-80g", kind="gpu", peak_flops_fp32=19.5e12, peak_flops_bf16=312e12,
                           peak_flops_fp16=312e12, memory_bytes=80.0 * GiB, memory_bandwidth_bytes_per_s=2.039e12),
    # NVIDIA H100 SXM5 datasheet: FP32 67 TF, BF16/FP16 989.4 TF dense (1,979 with sparsity),
    # 80 GB HBM3 at 3.35 TB/s.
    "h100-sxm": DeviceType(name="h100-sxm", kind="gpu", peak_flops_fp32=67e12, peak_flops_bf16=989.4e12,
                           peak_flops_fp16=989.4e12, memory_bytes=80.0 * GiB, memory_bandwidth_bytes_per_s=3.35e12),
    # NVIDIA H200 SXM datasheet: same compute as H100 SXM (FP32 67 TF, BF16 989 TF dense),
    # 141 GB HBM3e at 4.8 TB/s.
    "h200-sxm": DeviceType(name="h200-sxm", kind="gpu", peak_flops_fp32=67e12, peak_flops_bf16=989.4e12,
                           peak_flops_fp16=989.4e12, memory_bytes=141.0 * GiB, memory_bandwidth_bytes_per_s=4.8e12),
}

# NVLink3 (A100): 600 GB/s total bidirectional per GPU = 300 GB/s per direction, through
# NVSwitch in DGX A100. NVLink4 (H100/H200): 900 GB/s bidirectional = 450 GB/s per direction.
# Latency: a few microseconds for an NCCL p2p of a small message (stated assumption, not datasheet).
NVLINK3 = Link(kind="nvswitch", bandwidth_bytes_per_s=300e9, latency_s=3e-6)
NVLINK4 = Link(kind="nvswitch", bandwidth_bytes_per_s=450e9, latency_s=3e-6)
# DGX A100: 8x ConnectX-6 HDR InfiniBand 200 Gb/s = 25 GB/s each. DGX H100 / HGX H200:
# 8x ConnectX-7 NDR 400 Gb/s = 50 GB/s each. ~5 us end-to-end small-message latency (assumption).
HDR_IB = InterNodeLink(kind="infiniband", nic_bandwidth_bytes_per_s=25e9, nics_per_node=8, latency_s=5e-6)
NDR_IB = InterNodeLink(kind="infiniband", nic_bandwidth_bytes_per_s=50e9, nics_per_node=8, latency_s=5e-6)

#: Nominal peak FLOP/s of one core of this machine (AMD EPYC Zen 4 class, AVX-512 on two
#: 256-bit FMA pipes: 16 fp32 FMA = 32 FLOP/cycle at ~3 GHz = 96 GFLOP/s; AVX512_BF16 dot
#: products double that for bf16). A nominal figure: calibration fits the real efficiency.
LOCAL_CPU_FLOPS_PER_CORE = {"fp32": 96e9, "bf16": 192e9, "fp16": 96e9}
#: Nominal memory bandwidth of this (virtual) machine, shared by all its ranks.
LOCAL_CPU_MEMORY_BANDWIDTH_BYTES_PER_S = 20e9
#: gloo over TCP loopback: ~2 GB/s and ~50 us per message (nominal, measured order of magnitude).
LOOPBACK = Link(kind="loopback", bandwidth_bytes_per_s=2e9, latency_s=50e-6)


def _mem_total_bytes() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8.0 * GiB  # not Linux: a nominal 8 GiB


def local_cpu_device_type(ranks: int = 1) -> DeviceType:
    """One CPU rank of this machine when ``ranks`` ranks share it.

    Each rank computes on ``max(1, cores // ranks)`` cores (with more ranks than cores they
    share; the node's ``cores`` field lets the simulator model that) and gets an equal share
    of the machine's memory (/proc/meminfo MemTotal) and memory bandwidth.
    """
    cores = os.cpu_count() or 1
    per_rank = max(1, cores // ranks)
    return DeviceType(
        name="local-cpu", kind="cpu",
        peak_flops_fp32=LOCAL_CPU_FLOPS_PER_CORE["fp32"] * per_rank,
        peak_flops_bf16=LOCAL_CPU_FLOPS_PER_CORE["bf16"] * per_rank,
        peak_flops_fp16=LOCAL_CPU_FLOPS_PER_CORE["fp16"] * per_rank,
        memory_bytes=_mem_total_bytes() / ranks,
        memory_bandwidth_bytes_per_s=LOCAL_CPU_MEMORY_BANDWIDTH_BYTES_PER_S / min(ranks, cores),
        efficiency=0.3, memory_efficiency=0.8, cores=per_rank)


def _gpu_cluster(name: str, dtype: str, link: Link, net: InterNodeLink, nodes: int) -> Topology:
    dt = BUILTIN_DEVICE_TYPES[dtype]
    return Topology(name=name, device_types={dt.name: dt},
                    nodes=tuple(NodeSpec(name=f"node{i}", device_types=(dt.name,) * 8, link=link) for i in range(nodes)),
                    inter_node=net)


def _local_cpu(n: int) -> Topology:
    dt = local_cpu_device_type(n)
    return Topology(name=f"local-cpu:{n}", device_types={dt.name: dt},
                    nodes=(NodeSpec(name="node0", device_types=(dt.name,) * n, link=LOOPBACK, cores=os.cpu_count() or 1),))


def _mixed(n: int) -> Topology:
    # Two nodes of one cluster from two GPU generations: node0 2x A100 (NVLink3),
    # node1 2x H100 (NVLink4), joined by HDR InfiniBand (the slower side's NICs).
    a, h = BUILTIN_DEVICE_TYPES["a100-80g"], BUILTIN_DEVICE_TYPES["h100-sxm"]
    nodes = (NodeSpec(name="node0", device_types=(a.name,) * 2, link=NVLINK3),
             NodeSpec(name="node1", device_types=(h.name,) * 2, link=NVLINK4))
    return Topology(name="mixed-a100-h100", device_types={a.name: a, h.name: h}, nodes=nodes, inter_node=HDR_IB)


#: Preset name -> (builder of the count after the colon, default count, what the count means).
PRESETS: dict[str, tuple[Any, int, str]] = {
    "local-cpu": (_local_cpu, 1, "ranks on this machine"),
    "dgx-a100-80g": (lambda n: _gpu_cluster(f"dgx-a100-80g:{n}", "a100-80g", NVLINK3, HDR_IB, n), 1, "nodes of 8 A100 80GB"),
    "dgx-h100": (lambda n: _gpu_cluster(f"dgx-h100:{n}", "h100-sxm", NVLINK4, NDR_IB, n), 1, "nodes of 8 H100 SXM"),
    "h200": (lambda n: _gpu_cluster(f"h200:{n}", "h200-sxm", NVLINK4, NDR_IB, n), 1, "nodes of 8 H200 SXM"),
    "mixed-a100-h100": (_mixed, 1, "fixed: 2x A100 + 2x H100"),
}


def preset(name: str) -> Topology:
    """A preset by name, e.g. ``"local-cpu:4"``, ``"dgx-h100:8"``, ``"mixed-a100-h100"``."""
    base, _, count_text = str(name).partition(":")
    if base not in PRESETS:
        presets = ", ".join(f"{k}:N" if k != "mixed-a100-h100" else k for k in PRESETS)
        raise ConfigError(f"unknown topology preset {name!r}; presets: {presets}, or a YAML file path")
    builder, default, meaning = PRESETS[base]
    if base == "mixed-a100-h100":
        if count_text:
            raise ConfigError(f"topology preset {base!r} takes no count ({meaning}); write {base!r}")
        return builder(1)
    if not count_text:
        count = default
    else:
        try:
            count = int(count_text)
        except ValueError:
            count = 0
        if count < 1:
            raise ConfigError(f"topology preset {name!r}: the count after ':' ({meaning}) must be an integer >= 1")
    return builder(count)


def default_memory_reserve_bytes(device_type: DeviceType) -> float:
    """Memory a plan leaves free on a device by default, for what no model of the training step
    counts: on a GPU the CUDA context and kernels (about 0.5 GiB per process), NCCL's
    communication buffers (``NCCL_BUFFSIZE`` 4 MiB per channel and peer: about 1.5 GiB on a
    busy 3D job) and the caching allocator's fragmentation (about 5% of the device; PyTorch's
    ``expandable_segments`` reduces it); nothing on CPU ranks, whose memory the OS shares.
    ``--memory-reserve`` sets another figure."""
    if device_type.kind != "gpu":
        return 0.0
    return 2.0 * 2**30 + 0.05 * device_type.memory_bytes
