"""Hardware topology: device types, nodes of devices, and the links between them (torch-free).

A topology is read from YAML (:func:`load_topology`) or built from a preset
(:func:`topology_preset`); :func:`resolve_topology` takes either. The YAML schema::

    name: my-cluster                 # optional
    device_types:                    # optional; built-in a100-80g, h100-sxm, h200-sxm (pipetrain.hardware)
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
        wakeup_s: 0                  # with more ranks than cores: a blocked receiver's wait for a core
                                     # (0: not modelled; `pipetrain calibrate` measures it)
        corun_speed: [1.0, 0.9, 0.68, 0.45]  # optional: each rank's speed while k = 1, 2, .. ranks of
                                     # the node compute at once (default: min(1, cores / k); measured
                                     # by `pipetrain calibrate`)
        resume_s: 0                  # an action after a wait of 1 ms or more needs this much more compute
                                     # (cold caches; 0: not modelled; `pipetrain calibrate` measures it)
        switch_s: 0                  # with more ranks than cores: the same after any wait (its core ran
                                     # another rank meanwhile; `pipetrain calibrate` measures it)
    inter_node: {kind: infiniband, nic_bandwidth_bytes_per_s: 25.0e+9, nics_per_node: 8, latency_s: 5.0e-6}

Numbers may be written as YAML numbers or as strings Python's ``float`` reads ("300e9": YAML
1.1 reads an exponent without a dot as a string). Every bandwidth is per direction.
Any mistake raises :class:`~pipetrain.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from pipetrain.errors import ConfigError
from pipetrain.gemm import GemmConstants

__all__ = [
    "DTYPES", "INTRA_LINK_KINDS", "INTER_LINK_KINDS", "GiB",
    "JITTER_MEAN_TOL", "check_latency_jitter", "DeviceType", "Link", "InterNodeLink", "NodeSpec", "Device", "Topology",
    "load_topology", "topology_preset", "resolve_topology",
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
    #: the shape-aware GEMM model's constants (SM count, tile, best efficiency, cost per kernel);
    #: None: the built-in ones of a known GPU (gemm.GEMM_CONSTANTS), else the flat efficiency
    gemm: GemmConstants | None = None

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


#: how far a latency distribution's mean may be from 1 (its quantiles, renormalized, are stored rounded)
JITTER_MEAN_TOL = 1e-3


def check_latency_jitter(jitter: tuple[float, ...], where: str) -> None:
    """A link's latency distribution: multipliers of its ``latency_s``, each a message's latency
    drawn uniformly among them, so ``latency_s`` stays the mean (they average to 1). Empty: fixed."""
    if not jitter:
        return
    if not isinstance(jitter, tuple) or any(not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 for x in jitter):
        raise ConfigError(f"{where}: latency_jitter must be a tuple of finite numbers >= 0, got {jitter!r}")
    mean = sum(jitter) / len(jitter)
    if abs(mean - 1.0) > JITTER_MEAN_TOL:
        raise ConfigError(f"{where}: latency_jitter must average 1 (latency_s is the mean latency), got a mean of {mean:.4f}")


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
    #: the latency's measured distribution as multipliers of ``latency_s`` (:func:`check_latency_jitter`;
    #: a calibration's); empty: every message takes ``latency_s``
    latency_jitter: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in INTRA_LINK_KINDS + INTER_LINK_KINDS + ("local",):
            raise ConfigError(f"topology: link kind {self.kind!r} is unknown; choose one of {', '.join(INTRA_LINK_KINDS + INTER_LINK_KINDS)}")
        _num(self.bandwidth_bytes_per_s, f"{self.kind} link bandwidth_bytes_per_s", positive=True)
        _num(self.latency_s, f"{self.kind} link latency_s")
        check_latency_jitter(self.latency_jitter, f"{self.kind} link")


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
    #: seconds a rank blocked on a message waits for a core when all ``cores`` compute (0: not modelled)
    wakeup_s: float = 0.0
    #: each rank's share of full speed while ``k`` ranks of the node compute at once, ``k = 1, 2, ..``
    #: (``cores`` > 0 only; empty: the fair share ``min(1, cores / k)``)
    corun_speed: tuple[float, ...] = ()
    #: seconds more an action needs after its rank waited 1 ms or more (``cores`` > 0 only; 0: not modelled)
    resume_s: float = 0.0
    #: with more ranks than cores: seconds more an action needs after its rank waited at all (another
    #: rank ran on its core meanwhile; ``cores`` > 0 only; 0: not modelled)
    switch_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.wakeup_s >= 0:
            raise ConfigError(f"topology: node {self.name!r}: wakeup_s must be >= 0 seconds, got {self.wakeup_s}")
        if not all(0 < v <= 1.5 for v in self.corun_speed):
            raise ConfigError(f"topology: node {self.name!r}: corun_speed entries must be in (0, 1.5] (each rank's share of "
                              f"full speed), got {list(self.corun_speed)}")
        if not (0 <= self.resume_s < 1.0 and 0 <= self.switch_s < 1.0):
            raise ConfigError(f"topology: node {self.name!r}: resume_s and switch_s must be in [0, 1) seconds, got {self.resume_s}, "
                              f"{self.switch_s}")
        if (self.corun_speed or self.resume_s > 0 or self.switch_s > 0) and self.cores <= 0:
            raise ConfigError(f"topology: node {self.name!r}: corun_speed, resume_s and switch_s need cores > 0 (the cores its ranks share)")
        if not self.device_types:
            raise ConfigError(f"topology: node {self.name!r}: devices must list at least one device")
        if self.link.kind not in INTRA_LINK_KINDS:
            raise ConfigError(f"topology: node {self.name!r}: link.kind {self.link.kind!r} is not an intra-node kind; "
                              f"choose one of {', '.join(INTRA_LINK_KINDS)}")
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
        kinds: dict[str, int] = {}
        for d in self.devices:
            kinds[d.type.name] = kinds.get(d.type.name, 0) + 1
        parts = ", ".join(f"{n}x {k}" for k, n in kinds.items())
        return f"{self.name}: {len(self.nodes)} node(s), {parts}"


def topology_preset(name: str) -> Topology:
    """A preset by name, e.g. ``"local-cpu:4"``, ``"dgx-h100:8"``, ``"mixed-a100-h100"`` (see
    :mod:`pipetrain.hardware` for the datasheet constants)."""
    from pipetrain.hardware import preset

    return preset(name)


# ----- YAML ------------------------------------------------------------------------------------
def _device_type_from(name: str, d: Any) -> DeviceType:
    where = f"device_types.{name}"
    d = _mapping(d, where, ("kind", "peak_flops", "memory_bytes", "memory_bandwidth_bytes_per_s", "efficiency", "memory_efficiency", "cores",
                            "gemm"), ("peak_flops", "memory_bytes", "memory_bandwidth_bytes_per_s"))
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
                      cores=_int(d.get("cores", 0), f"{where}.cores"), gemm=_gemm_from(d["gemm"], f"{where}.gemm") if "gemm" in d else None)


def _gemm_from(d: Any, where: str) -> GemmConstants:
    """A device type's own GEMM constants (``gemm:`` in YAML), e.g. fitted to a GPU's measured GEMMs."""
    keys = ("sm_count", "tile_m", "tile_n", "max_efficiency", "kernel_overhead_s", "memory_efficiency", "attention_efficiency")
    d = _mapping(d, where, keys, keys[:5])
    floats = {k: _num(d[k], f"{where}.{k}", positive=k != "kernel_overhead_s") for k in keys[3:] if k in d}
    try:
        return GemmConstants(sm_count=_int(d["sm_count"], f"{where}.sm_count"), tile_m=_int(d["tile_m"], f"{where}.tile_m"),
                             tile_n=_int(d["tile_n"], f"{where}.tile_n"), **floats)
    except ConfigError as exc:
        raise ConfigError(f"topology: {where}: {exc}") from None


def _link_from(d: Any, where: str) -> Link:
    d = _mapping(d, where, ("kind", "bandwidth_bytes_per_s", "latency_s"), ("kind", "bandwidth_bytes_per_s", "latency_s"))
    kind = d["kind"]
    if kind not in INTRA_LINK_KINDS:
        raise ConfigError(f"topology: {where}.kind {kind!r} is unknown; choose one of {', '.join(INTRA_LINK_KINDS)}")
    return Link(kind=kind, bandwidth_bytes_per_s=_num(d["bandwidth_bytes_per_s"], f"{where}.bandwidth_bytes_per_s", positive=True),
                latency_s=_num(d["latency_s"], f"{where}.latency_s"))


def _nodes_from(i: int, d: Any, types: Mapping[str, DeviceType], offset: int) -> list[NodeSpec]:
    where = f"nodes[{i}]"
    d = _mapping(d, where, ("name", "count", "devices", "link", "cores", "wakeup_s", "corun_speed", "resume_s", "switch_s"),
                 ("devices", "link"))
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
    wakeup = _num(d.get("wakeup_s", 0), f"{where}.wakeup_s")
    speed = d.get("corun_speed", [])
    if not isinstance(speed, list):
        raise ConfigError(f"topology: {where}.corun_speed must be a list of numbers (speed with 1, 2, .. ranks computing), got {speed!r}")
    corun = tuple(_num(v, f"{where}.corun_speed[{k}]", positive=True) for k, v in enumerate(speed))
    resume = _num(d.get("resume_s", 0), f"{where}.resume_s")
    switch = _num(d.get("switch_s", 0), f"{where}.switch_s")
    count = _int(d.get("count", 1), f"{where}.count", minimum=1, maximum=16384)
    if "name" not in d:
        node_names = [f"node{offset + k}" for k in range(count)]
    else:
        name = d["name"]
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"topology: {where}.name must be a non-empty string without '/', got {name!r}")
        node_names = [name] if count == 1 else [f"{name}{k}" for k in range(count)]
    return [NodeSpec(name=n, device_types=tuple(names), link=link, cores=cores, wakeup_s=wakeup,
                     corun_speed=corun, resume_s=resume, switch_s=switch) for n in node_names]


def _topology_from(data: Any, default_name: str) -> Topology:
    d = _mapping(data, "top level", ("name", "device_types", "nodes", "inter_node"), ("nodes",))
    from pipetrain.hardware import BUILTIN_DEVICE_TYPES

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
        net = InterNodeLink(kind=nd["kind"],
                            nic_bandwidth_bytes_per_s=_num(nd["nic_bandwidth_bytes_per_s"], "inter_node.nic_bandwidth_bytes_per_s", positive=True),
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
            from pipetrain.hardware import PRESETS

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


def resolve_topology(spec: str | Path, *, world_size: int | None = None) -> Topology:
    """A preset name (``"dgx-h100:2"``) or a YAML file path; ``"local"`` (or empty), which plans
    built without the planner carry, is this machine's CPU with ``world_size`` ranks."""
    s = str(spec)
    if s in ("", "local"):
        if world_size is None:
            raise ConfigError("topology 'local' needs the number of ranks: give a preset such as local-cpu:2")
        s = f"local-cpu:{world_size}"
    if isinstance(spec, Path) or s.endswith((".yaml", ".yml")) or os.sep in s:
        return load_topology(Path(s))
    return topology_preset(s)
