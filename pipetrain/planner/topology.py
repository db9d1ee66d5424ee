"""Hardware topology: device types, nodes of devices, and the links between them (torch-free).

A topology is read from YAML (:func:`load_topology`) or built from a preset
(:func:`topology_preset`); :func:`resolve_topology` takes either. The YAML schema::

    name: my-cluster                 # optional
    device_types:                    # optional; built-in types: see BUILTIN_DEVICE_TYPES
      my-gpu:
        kind: gpu                    # gpu | cpu
        peak_flops: {fp32: 19.5e+12, bf16: 312.0e+12, fp16: 312.0e+12}
        memory_bytes: 85899345920
        memory_bandwidth_bytes_per_s: 2.039e+12
        efficiency: 0.5              # achievable fraction of peak FLOP/s (default 0.5)
        memory_efficiency: 0.8       # achievable fraction of memory bandwidth (default 0.8)
        cores: 0                     # CPU cores one device uses (CPU ranks only)
    nodes:
      - name: node                   # optional; with count: N names are node0..node{N-1}
        count: 2                     # optional, default 1: N identical nodes
        devices: {a100-80g: 8}       # or a list of type names, e.g. [a100-80g, h100-sxm]
        link: {kind: nvswitch, bandwidth_bytes_per_s: 300.0e+9, latency_s: 3.0e-6}
        cores: 0                     # CPU cores shared by all devices of the node (0: not shared)
    inter_node: {kind: infiniband, nic_bandwidth_bytes_per_s: 25.0e+9, nics_per_node: 8, latency_s: 5.0e-6}

Numbers may be written as YAML numbers or as strings Python's ``float`` reads ("300e9": YAML
1.1 reads an exponent without a dot as a string). Every bandwidth is per direction.
Any mistake raises :class:`~pipetrain.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipetrain.errors import ConfigError

__all__ = [
    "DTYPES", "INTRA_LINK_KINDS", "INTER_LINK_KINDS", "GiB",
    "DeviceType", "Link", "InterNodeLink", "NodeSpec", "Device", "Topology",
    "BUILTIN_DEVICE_TYPES", "LOCAL_CPU_FLOPS_PER_CORE", "LOCAL_CPU_MEMORY_BANDWIDTH_BYTES_PER_S",
    "PRESETS", "load_topology", "topology_preset", "resolve_topology", "local_cpu_device_type",
]

GiB = 2**30
DTYPES = ("fp32", "bf16", "fp16")
INTRA_LINK_KINDS = ("nvlink", "nvswitch", "pcie", "loopback")
INTER_LINK_KINDS = ("infiniband", "roce", "ethernet")


def _num(value: Any, where: str, *, positive: bool = False, allow_zero: bool = True) -> float:
    """A finite, non-negative number from YAML (number or numeric string)."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"topology: {where} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"topology: {where} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"topology: {where} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"topology: {where} must be finite, got {value!r}")
    if v < 0 or (positive and v == 0) or (not allow_zero and v == 0):
        raise ConfigError(f"topology: {where} must be {'> 0' if positive or not allow_zero else '>= 0'}, got {value!r}")
    return v


def _int(value: Any, where: str, *, minimum: int = 0, maximum: int = 1 << 20) -> int:
    v = _num(value, where)
    if not v.is_integer() or not minimum <= v <= maximum:
        raise ConfigError(f"topology: {where} must be an integer in {minimum}..{maximum}, got {value!r}")
    return int(v)


def _mapping(value: Any, where: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"topology: {where} must be a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ConfigError(f"topology: {where}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
    for key in required:
        if key not in value:
            raise ConfigError(f"topology: {where}: missing key {key!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class DeviceType:
    """One kind of accelerator (or a CPU rank): peak rates, memory and achievable efficiency."""

    name: str
    kind: str  # "gpu" | "cpu"
    peak_flops_fp32: float
    peak_flops_bf16: float
    peak_flops_fp16: float
    memory_bytes: float
    memory_bandwidth_bytes_per_s: float
    efficiency: float = 0.5
    memory_efficiency: float = 0.8
    cores: int = 0  # CPU cores one rank of this type computes on (CPU ranks only)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("topology: device type name must not be empty")
        if self.kind not in ("gpu", "cpu"):
            raise ConfigError(f"topology: device type {self.name!r}: kind must be 'gpu' or 'cpu', got {self.kind!r}")
        for f in ("peak_flops_fp32", "peak_flops_bf16", "peak_flops_fp16", "memory_bytes", "memory_bandwidth_bytes_per_s"):
            _num(getattr(self, f), f"device type {self.name!r}: {f}", positive=True)
        for f in ("efficiency", "memory_efficiency"):
            v = _num(getattr(self, f), f"device type {self.name!r}: {f}", positive=True)
            if v > 1:
                raise ConfigError(f"topology: device type {self.name!r}: {f} must be in (0, 1], got {v}")
        if self.cores < 0:
            raise ConfigError(f"topology: device type {self.name!r}: cores must be >= 0, got {self.cores}")

    def peak_flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype`` ("fp32" | "bf16" | "fp16")."""
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        return float(getattr(self, f"peak_flops_{dtype}"))

    def achievable_flops(self, dtype: str) -> float:
        return self.peak_flops(dtype) * self.efficiency

    @property
    def achievable_memory_bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_bytes_per_s * self.memory_efficiency


@dataclass(frozen=True, kw_only=True)
class Link:
    """A point-to-point path: time for ``b`` bytes is ``latency_s + b / bandwidth_bytes_per_s``.

    ``resource`` names the physical resource the path uses, so a simulator can make transfers
    that share it contend (a PCIe/loopback bus is one resource per node; each NVSwitch pair is
    its own; an inter-node path uses its source node's NIC rail).
    """

    kind: str
    bandwidth_bytes_per_s: float
    latency_s: float
    resource: str = ""

    def __post_init__(self) -> None:
        if self.kind not in INTRA_LINK_KINDS + INTER_LINK_KINDS + ("local",):
            raise ConfigError(f"topology: link kind {self.kind!r} is unknown; choose one of {', '.join(INTRA_LINK_KINDS + INTER_LINK_KINDS)}")
        _num(self.bandwidth_bytes_per_s, f"{self.kind} link bandwidth_bytes_per_s", positive=True)
        _num(self.latency_s, f"{self.kind} link latency_s")


@dataclass(frozen=True, kw_only=True)
class InterNodeLink:
    """The network between nodes: ``nics_per_node`` NICs of ``nic_bandwidth_bytes_per_s`` each."""

    kind: str
    nic_bandwidth_bytes_per_s: float
    nics_per_node: int
    latency_s: float

    def __post_init__(self) -> None:
        if self.kind not in INTER_LINK_KINDS:
            raise ConfigError(f"topology: inter_node.kind {self.kind!r} is unknown; choose one of {', '.join(INTER_LINK_KINDS)}")
        _num(self.nic_bandwidth_bytes_per_s, "inter_node.nic_bandwidth_bytes_per_s", positive=True)
        _num(self.latency_s, "inter_node.latency_s")
        if self.nics_per_node < 1:
            raise ConfigError(f"topology: inter_node.nics_per_node must be >= 1, got {self.nics_per_node}")

    @property
    def node_bandwidth_bytes_per_s(self) -> float:
        return self.nic_bandwidth_bytes_per_s * self.nics_per_node


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """One node: its devices (type names, in local index order) and its intra-node link."""

    name: str
    device_types: tuple[str, ...]
    link: Link
    cores: int = 0  # CPU cores shared by all devices of this node; 0 means devices don't share

    def __post_init__(self) -> None:
        if not self.device_types:
            raise ConfigError(f"topology: node {self.name!r}: devices must list at least one device")
        if self.link.kind not in INTRA_LINK_KINDS:
            raise ConfigError(f"topology: node {self.name!r}: link.kind {self.link.kind!r} is not an intra-node kind; choose one of {', '.join(INTRA_LINK_KINDS)}")
        if self.cores < 0:
            raise ConfigError(f"topology: node {self.name!r}: cores must be >= 0, got {self.cores}")


@dataclass(frozen=True, kw_only=True)
class Device:
    """One device of a topology; ``id`` is global, e.g. ``"node0/gpu3"``."""

    id: str
    node: int
    local_index: int
    type: DeviceType


@dataclass(frozen=True, kw_only=True)
class Topology:
    name: str
    device_types: Mapping[str, DeviceType]
    nodes: tuple[NodeSpec, ...]
    inter_node: InterNodeLink | None = None

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("topology: nodes must list at least one node")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"topology: node name {dup!r} appears twice; node names must be unique")
        for node in self.nodes:
            for t in node.device_types:
                if t not in self.device_types:
                    raise ConfigError(f"topology: node {node.name!r}: unknown device type {t!r}; known types: {', '.join(sorted(self.device_types))}")
        if len(self.nodes) > 1 and self.inter_node is None:
            raise ConfigError("topology: inter_node is missing; a topology with several nodes needs the network between them")

    @cached_property
    def devices(self) -> tuple[Device, ...]:
        """All devices in order: node by node, local index within a node."""
        out = []
        for ni, node in enumerate(self.nodes):
            for li, tname in enumerate(node.device_types):
                dt = self.device_types[tname]
                out.append(Device(id=f"{node.name}/{dt.kind}{li}", node=ni, local_index=li, type=dt))
        return tuple(out)

    @cached_property
    def _by_id(self) -> dict[str, Device]:
        return {d.id: d for d in self.devices}

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def device(self, device: str | int | Device) -> Device:
        """A device by global id ("node0/gpu3"), global index, or the Device itself."""
        if isinstance(device, Device):
            return device
        if isinstance(device, int) and not isinstance(device, bool):
            if not 0 <= device < len(self.devices):
                raise ConfigError(f"device index {device} is out of range 0..{len(self.devices) - 1} of topology {self.name!r}")
            return self.devices[device]
        if device not in self._by_id:
            raise ConfigError(f"device {device!r} is not in topology {self.name!r}; devices are named like {self.devices[0].id!r}")
        return self._by_id[device]

    def device_type_of(self, device: str | int | Device) -> DeviceType:
        return self.device(device).type

    def link_between(self, a: str | int | Device, b: str | int | Device) -> Link:
        """The path a tensor takes from device ``a`` to device ``b``."""
        da, db = self.device(a), self.device(b)
        if da.id == db.id:
            return Link(kind="local", bandwidth_bytes_per_s=da.type.memory_bandwidth_bytes_per_s, latency_s=0.0, resource=da.id)
        if da.node == db.node:
            link = self.nodes[da.node].link
            shared = link.kind in ("pcie", "loopback")
            res = f"{self.nodes[da.node].name}/{link.kind}" if shared else "<->".join(sorted((da.id, db.id)))
            return replace(link, resource=res)
        net = self.inter_node
        assert net is not None  # checked in __post_init__
        rail = da.local_index % net.nics_per_node
        return Link(kind=net.kind, bandwidth_bytes_per_s=net.nic_bandwidth_bytes_per_s, latency_s=net.latency_s,
                    resource=f"{self.nodes[da.node].name}/nic{rail}")

    def node_cores(self, device: str | int | Device) -> int:
        """CPU cores shared by the devices of this device's node (0: devices don't share)."""
        return self.nodes[self.device(device).node].cores

    def describe(self) -> str:
        kinds = {}
        for d in self.devices:
            kinds[d.type.name] = kinds.get(d.type.name, 0) + 1
        parts = ", ".join(f"{n}x {k}" for k, n in kinds.items())
        return f"{self.name}: {len(self.nodes)} node(s), {parts}"


# ---------------------------------------------------------------------------------------------
# Datasheet constants. Peak FLOP/s are dense (no 2:4 sparsity). Bandwidths are per direction.
# Default efficiency 0.5 of peak FLOP/s: Narayanan et al. 2021 (Megatron-LM, SC'21) sustain
# 44-52% of A100 peak on GPT models; memory_efficiency 0.8 of datasheet HBM bandwidth is what
# STREAM-like kernels reach. Both are refined by calibration (pipetrain.planner.calibrate).
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


def topology_preset(name: str) -> Topology:
    """A preset by name, e.g. ``"local-cpu:4"``, ``"dgx-h100:8"``, ``"mixed-a100-h100"``."""
    base, _, count_text = str(name).partition(":")
    if base not in PRESETS:
        raise ConfigError(f"unknown topology preset {name!r}; presets: {', '.join(f'{k}:N' if k != 'mixed-a100-h100' else k for k in PRESETS)}, or a YAML file path")
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


# ----- YAML ------------------------------------------------------------------------------------
def _device_type_from(name: str, d: Any) -> DeviceType:
    where = f"device_types.{name}"
    d = _mapping(d, where, ("kind", "peak_flops", "memory_bytes", "memory_bandwidth_bytes_per_s", "efficiency", "memory_efficiency", "cores"),
                 ("peak_flops", "memory_bytes", "memory_bandwidth_bytes_per_s"))
    pf = d["peak_flops"]
    if isinstance(pf, Mapping):
        pf = _mapping(pf, f"{where}.peak_flops", DTYPES, ("fp32",))
        fp32 = _num(pf["fp32"], f"{where}.peak_flops.fp32", positive=True)
        peaks = {k: _num(pf.get(k, fp32), f"{where}.peak_flops.{k}", positive=True) for k in DTYPES}
    else:
        v = _num(pf, f"{where}.peak_flops", positive=True)
        peaks = {k: v for k in DTYPES}
    kind = d.get("kind", "gpu")
    if kind not in ("gpu", "cpu"):
        raise ConfigError(f"topology: {where}.kind must be 'gpu' or 'cpu', got {kind!r}")
    return DeviceType(name=name, kind=kind, peak_flops_fp32=peaks["fp32"], peak_flops_bf16=peaks["bf16"], peak_flops_fp16=peaks["fp16"],
                      memory_bytes=_num(d["memory_bytes"], f"{where}.memory_bytes", positive=True),
                      memory_bandwidth_bytes_per_s=_num(d["memory_bandwidth_bytes_per_s"], f"{where}.memory_bandwidth_bytes_per_s", positive=True),
                      efficiency=_num(d.get("efficiency", 0.5), f"{where}.efficiency", positive=True),
                      memory_efficiency=_num(d.get("memory_efficiency", 0.8), f"{where}.memory_efficiency", positive=True),
                      cores=_int(d.get("cores", 0), f"{where}.cores"))


def _link_from(d: Any, where: str) -> Link:
    d = _mapping(d, where, ("kind", "bandwidth_bytes_per_s", "latency_s"), ("kind", "bandwidth_bytes_per_s", "latency_s"))
    kind = d["kind"]
    if kind not in INTRA_LINK_KINDS:
        raise ConfigError(f"topology: {where}.kind {kind!r} is unknown; choose one of {', '.join(INTRA_LINK_KINDS)}")
    return Link(kind=kind, bandwidth_bytes_per_s=_num(d["bandwidth_bytes_per_s"], f"{where}.bandwidth_bytes_per_s", positive=True),
                latency_s=_num(d["latency_s"], f"{where}.latency_s"))


def _nodes_from(i: int, d: Any, types: Mapping[str, DeviceType], offset: int) -> list[NodeSpec]:
    where = f"nodes[{i}]"
    d = _mapping(d, where, ("name", "count", "devices", "link", "cores"), ("devices", "link"))
    devs = d["devices"]
    names: list[str] = []
    if isinstance(devs, Mapping):
        for t, n in devs.items():
            names += [str(t)] * _int(n, f"{where}.devices.{t}", minimum=1, maximum=1024)
    elif isinstance(devs, list):
        names = [str(t) if isinstance(t, (str, int, float)) else "" for t in devs]
    else:
        raise ConfigError(f"topology: {where}.devices must be a list of device type names or a mapping type: count")
    if not names:
        raise ConfigError(f"topology: {where}.devices must list at least one device")
    for t in names:
        if t not in types:
            raise ConfigError(f"topology: {where}.devices: unknown device type {t!r}; known types: {', '.join(sorted(types))}")
    link = _link_from(d["link"], f"{where}.link")
    cores = _int(d.get("cores", 0), f"{where}.cores")
    count = _int(d.get("count", 1), f"{where}.count", minimum=1, maximum=16384)
    if "name" not in d:
        return [NodeSpec(name=f"node{offset + k}", device_types=tuple(names), link=link, cores=cores) for k in range(count)]
    name = d["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"topology: {where}.name must be a non-empty string without '/', got {name!r}")
    if count == 1:
        return [NodeSpec(name=name, device_types=tuple(names), link=link, cores=cores)]
    return [NodeSpec(name=f"{name}{k}", device_types=tuple(names), link=link, cores=cores) for k in range(count)]


def _topology_from(data: Any, default_name: str) -> Topology:
    d = _mapping(data, "top level", ("name", "device_types", "nodes", "inter_node"), ("nodes",))
    types = dict(BUILTIN_DEVICE_TYPES)
    user_types = d.get("device_types") or {}
    if not isinstance(user_types, Mapping):
        raise ConfigError("topology: device_types must be a mapping name: {peak_flops, memory_bytes, ...}")
    for tname, td in user_types.items():
        types[str(tname)] = _device_type_from(str(tname), td)
    nodes_d = d["nodes"]
    if not isinstance(nodes_d, list) or not nodes_d:
        raise ConfigError("topology: nodes must be a non-empty list")
    nodes: list[NodeSpec] = []
    for i, nd in enumerate(nodes_d):
        nodes += _nodes_from(i, nd, types, len(nodes))
    net = None
    if d.get("inter_node") is not None:
        nd = _mapping(d["inter_node"], "inter_node", ("kind", "nic_bandwidth_bytes_per_s", "nics_per_node", "latency_s"),
                      ("kind", "nic_bandwidth_bytes_per_s", "latency_s"))
        if nd["kind"] not in INTER_LINK_KINDS:
            raise ConfigError(f"topology: inter_node.kind {nd['kind']!r} is unknown; choose one of {', '.join(INTER_LINK_KINDS)}")
        net = InterNodeLink(kind=nd["kind"], nic_bandwidth_bytes_per_s=_num(nd["nic_bandwidth_bytes_per_s"], "inter_node.nic_bandwidth_bytes_per_s", positive=True),
                            nics_per_node=_int(nd.get("nics_per_node", 1), "inter_node.nics_per_node", minimum=1),
                            latency_s=_num(nd["latency_s"], "inter_node.latency_s"))
    used = {t for n in nodes for t in n.device_types}
    name = d.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"topology: name must be a non-empty string, got {name!r}")
    return Topology(name=name, device_types={k: v for k, v in types.items() if k in used}, nodes=tuple(nodes), inter_node=net)


def load_topology(path_or_text: str | Path) -> Topology:
    """Read a topology from a YAML file path or from YAML text."""
    text: str
    default_name = "topology"
    p = Path(path_or_text) if isinstance(path_or_text, Path) or ("\n" not in str(path_or_text) and str(path_or_text).endswith((".yaml", ".yml"))) else None
    if p is not None:
        if not p.is_file():
            raise ConfigError(f"topology file {str(p)!r} does not exist; give a YAML path or a preset ({', '.join(PRESETS)})")
        text = p.read_text()
        default_name = p.stem
    else:
        text = str(path_or_text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"topology: not valid YAML{at}: {getattr(exc, 'problem', None) or type(exc).__name__}") from None
    except (ValueError, RecursionError) as exc:  # e.g. timestamps/values PyYAML cannot construct
        raise ConfigError(f"topology: not valid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return _topology_from(data, default_name)


def resolve_topology(spec: str | Path) -> Topology:
    """A preset name (``"dgx-h100:2"``) or a YAML file path."""
    s = str(spec)
    if isinstance(spec, Path) or s.endswith((".yaml", ".yml")) or os.sep in s:
        return load_topology(Path(s))
    return topology_preset(s)
