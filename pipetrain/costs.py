"""Cost model: time of a stage's forward (F), backward (B), weight-grad (W) and recompute, and
of transfers, on one device type. torch-free.

One interface (:class:`CostModel`), three grades:

* :class:`AnalyticCostModel` (here): a roofline per layer-graph node;
* :class:`~pipetrain.calibration.profile.ProfiledCostModel`: per-block times measured with torch;
* :class:`~pipetrain.calibration.fit.CalibratedCostModel`: the analytic model with its
  efficiency factors and per-node overheads fitted to profiles (``scipy.optimize``).

Conventions of :class:`StageCost`: ``t_bwd_s`` is the whole backward pass (input gradient and
weight gradient); ``t_wgrad_s`` is the part of it that computes weight gradients, so a
zero-bubble schedule runs B for ``t_bwd_s - t_wgrad_s`` and W for ``t_wgrad_s``;
``t_recompute_s`` is the extra forward before backward when the stage recomputes (else 0).

Formulas (pure functions below, each citing its source):

* roofline: ``t = max(flops / (peak * eff), bytes / (bw * mem_eff))`` (Williams, Waterman,
  Patterson 2009, "Roofline: an insightful visual performance model", CACM 52(4));
* FLOPs are the traced graph's (FlopCounterMode); backward ~ 2x forward, of which the weight
  gradient is half (Narayanan et al. 2021, "Efficient large-scale language model training on
  GPU clusters using Megatron-LM", sec. 5.1; Kaplan et al. 2020 sec. 2.1);
* bytes moved, a stated model: forward reads the parameters and the node's inputs and writes
  its output and the tensors it saves for backward; backward reads the parameters, the saved
  tensors and the output gradient, and writes the input gradient and the parameter gradient;
* point-to-point: ``latency + bytes / bandwidth`` (Hockney 1994, the alpha-beta model);
* ring all-reduce: ``2 (n-1)/n * bytes / bw + 2 (n-1) * latency`` (Patarasuk & Yuan 2009);
* optimizer step: a memory-bound element-wise update, so bytes/param read and written over
  the memory bandwidth (roofline again): AdamW reads w, g, m, v (+ fp32 master) and writes
  w, m, v: 28 B/param in fp32 and in mixed precision; SGD reads w, g and writes w: 12 B/param.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pipetrain.errors import ConfigError
from pipetrain.gemm import GEMM_CONSTANTS, GemmConstants, LayerTimes, layer_times_s, transformer_layer_gemms
from pipetrain.graph import LayerGraph, Node
from pipetrain.memory import node_input_bytes, recomputed_layers
from pipetrain.sharding import collective_time_s
from pipetrain.topology import DeviceType, Link

__all__ = [
    "NodeTimesCostModel",
    "StageCost", "CostModel", "AnalyticParams", "AnalyticCostModel", "NodeTimes",
    "roofline_time_s", "node_fwd_bytes", "node_bwd_bytes", "node_input_bytes", "analytic_node_times",
    "p2p_time_s", "ring_allreduce_time_s", "optimizer_step_time_s", "stage_from_node_times", "attention_core_share",
]


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """Times of one micro-batch through one stage (see module docstring for the conventions)."""

    t_fwd_s: float
    t_bwd_s: float
    t_wgrad_s: float = 0.0
    t_recompute_s: float = 0.0

    def __post_init__(self) -> None:
        for f in ("t_fwd_s", "t_bwd_s", "t_wgrad_s", "t_recompute_s"):
            if not getattr(self, f) >= 0:
                raise ConfigError(f"stage cost {f} must be >= 0, got {getattr(self, f)}")
        if self.t_wgrad_s > self.t_bwd_s * (1 + 1e-9):
            raise ConfigError(f"stage cost t_wgrad_s {self.t_wgrad_s} exceeds t_bwd_s {self.t_bwd_s}: W is part of B")

    @property
    def t_bwd_input_s(self) -> float:
        """Backward without the weight gradient (zero-bubble's B)."""
        return max(0.0, self.t_bwd_s - self.t_wgrad_s)

    @property
    def t_total_s(self) -> float:
        """Forward + recompute + backward of one micro-batch."""
        return self.t_fwd_s + self.t_recompute_s + self.t_bwd_s


@runtime_checkable
class CostModel(Protocol):
    """What the planner and simulator ask of any grade.

    Every grade here also has ``node_times(graph, device_type) -> NodeTimes`` (per-node
    seconds, so a planner can sum O(n^2) ranges with prefix sums) and
    ``allreduce_time_s(nbytes, n, link)``; they are not part of the protocol.
    """

    name: str

    def stage_costs(self, graph: LayerGraph, start: int, end: int, device_type: DeviceType, *, recompute: bool = False) -> StageCost: ...

    def p2p_time_s(self, nbytes: float, link: Link) -> float: ...

    def optimizer_step_time_s(self, param_count: int, device_type: DeviceType, *, optimizer: str = "adamw", dtype: str = "fp32",
                              model: str = "") -> float: ...


# ----- pure formulas ---------------------------------------------------------------------------
def roofline_time_s(flops: float, bytes_moved: float, peak_flops: float, efficiency: float,
                    bandwidth_bytes_per_s: float, memory_efficiency: float) -> float:
    """Roofline (Williams et al. 2009): the slower of compute and memory traffic."""
    return max(flops / (peak_flops * efficiency), bytes_moved / (bandwidth_bytes_per_s * memory_efficiency))


def node_fwd_bytes(node: Node, input_bytes: float) -> float:
    """Forward memory traffic: read params + inputs, write output + saved tensors (stated model)."""
    return node.param_bytes + input_bytes + node.output_bytes + node.saved_bytes


def node_bwd_bytes(node: Node, input_bytes: float) -> float:
    """Backward traffic: read params, saved tensors, output grad; write input grad, param grad."""
    return 2 * node.param_bytes + node.saved_bytes + node.output_bytes + input_bytes


def p2p_time_s(nbytes: float, link: Link) -> float:
    """Point-to-point transfer time, alpha-beta model (Hockney 1994)."""
    if nbytes < 0:
        raise ConfigError(f"transfer size must be >= 0 bytes, got {nbytes}")
    if nbytes == 0:
        return 0.0
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s


def ring_allreduce_time_s(nbytes: float, n: int, link: Link) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks (:func:`pipetrain.sharding.collective_time_s`)."""
    return collective_time_s("all_reduce", nbytes, n, link)


_OPT_BYTES_PER_PARAM = {"adamw": 28, "sgd": 12}


def optimizer_step_time_s(param_count: int, device_type: DeviceType, *, optimizer: str = "adamw", dtype: str = "fp32") -> float:
    """Memory-bound element-wise optimizer update (roofline, Williams et al. 2009)."""
    if optimizer not in _OPT_BYTES_PER_PARAM:
        raise ConfigError(f"optimizer {optimizer!r} is unknown; choose one of {', '.join(_OPT_BYTES_PER_PARAM)}")
    device_type.peak_flops(dtype)  # validates dtype
    return param_count * _OPT_BYTES_PER_PARAM[optimizer] / device_type.achievable_memory_bandwidth_bytes_per_s


# ----- analytic grade --------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AnalyticParams:
    """Tunable factors of the analytic model (defaults: the device type's own).

    ``efficiency_by_kind`` maps a node kind ("block", "embedding", ...) to a compute efficiency
    that replaces ``device_type.efficiency`` (``default_efficiency`` for other kinds when set);
    ``bwd_efficiency_scale`` multiplies it for backward; ``overhead_*_s`` are fixed per-node
    costs (kernel launches, Python dispatch), replaced per node kind by ``overhead_*_by_kind``.
    """

    efficiency_by_kind: Mapping[str, float] = field(default_factory=dict)
    default_efficiency: float | None = None
    bwd_efficiency_scale: float = 1.0
    memory_efficiency: float | None = None
    overhead_fwd_s: float = 0.0
    overhead_bwd_s: float = 0.0
    overhead_fwd_by_kind: Mapping[str, float] = field(default_factory=dict)
    overhead_bwd_by_kind: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        effs = list(self.efficiency_by_kind.values()) + [x for x in (self.default_efficiency, self.memory_efficiency) if x is not None]
        if any(not e > 0 for e in effs) or not self.bwd_efficiency_scale > 0:
            raise ConfigError("analytic model efficiencies must be > 0")
        overheads = [self.overhead_fwd_s, self.overhead_bwd_s, *self.overhead_fwd_by_kind.values(), *self.overhead_bwd_by_kind.values()]
        if any(not o >= 0 for o in overheads):
            raise ConfigError("analytic model overheads must be >= 0")

    def efficiency(self, kind: str, device_type: DeviceType) -> float:
        if kind in self.efficiency_by_kind:
            return self.efficiency_by_kind[kind]
        return self.default_efficiency if self.default_efficiency is not None else device_type.efficiency


@dataclass(frozen=True, kw_only=True)
class NodeTimes:
    """Per-node forward, backward and weight-grad seconds for one micro-batch."""

    fwd_s: tuple[float, ...]
    bwd_s: tuple[float, ...]
    wgrad_s: tuple[float, ...]


def analytic_node_times(graph: LayerGraph, device_type: DeviceType, params: AnalyticParams = AnalyticParams()) -> NodeTimes:
    """Roofline time of each node's forward and backward (module docstring for the formulas).

    The weight-gradient share of backward follows the FLOPs: ``W = B * wgrad_flops / bwd_flops``.
    """
    peak = device_type.peak_flops(graph.dtype)
    bw = device_type.memory_bandwidth_bytes_per_s
    meff = params.memory_efficiency if params.memory_efficiency is not None else device_type.memory_efficiency
    inputs = node_input_bytes(graph)
    fwd, bwd, wg = [], [], []
    gemm = (device_type.gemm or GEMM_CONSTANTS.get(device_type.name)) if graph.dtype in ("bf16", "fp16") else None
    for node, inb in zip(graph.nodes, inputs):
        if gemm is not None and node.layer is not None and node.kind not in params.efficiency_by_kind:
            lt = _shaped_layer_times(graph, node, peak, bw, gemm)
            fwd.append(lt.fwd_s)
            bwd.append(lt.bwd_s)
            wg.append(lt.wgrad_s)
            continue
        eff = params.efficiency(node.kind, device_type)
        of = params.overhead_fwd_by_kind.get(node.kind, params.overhead_fwd_s)
        ob = params.overhead_bwd_by_kind.get(node.kind, params.overhead_bwd_s)
        tf = roofline_time_s(node.fwd_flops, node_fwd_bytes(node, inb), peak, eff, bw, meff) + of
        tb = roofline_time_s(node.bwd_flops, node_bwd_bytes(node, inb), peak, eff * params.bwd_efficiency_scale, bw, meff) + ob
        fwd.append(tf)
        bwd.append(tb)
        wg.append(tb * (node.wgrad_flops / node.bwd_flops) if node.bwd_flops > 0 else 0.0)
    return NodeTimes(fwd_s=tuple(fwd), bwd_s=tuple(bwd), wgrad_s=tuple(wg))


def _shaped_layer_times(graph: LayerGraph, node: Node, peak: float, bw: float, constants: GemmConstants) -> LayerTimes:
    """A transformer layer on a GPU with GEMM constants: the shape-aware model of
    :func:`pipetrain.gemm.layer_times_s` (a flat efficiency would make a micro-batch's cost linear
    in its size). The attention core's FLOPs are what the trace counted beyond the weight GEMMs."""
    layer = node.layer
    assert layer is not None
    tokens = graph.micro_batch_size * graph.seq_len
    kv = layer.hidden // layer.heads * layer.kv_heads
    gemms = transformer_layer_gemms(tokens=tokens, hidden=layer.hidden, tp=graph.tp, ffn_hidden=layer.ffn_hidden, kv_hidden=kv,
                                    gated_mlp=layer.gated_mlp)
    attention = max(0.0, node.fwd_flops - sum(2.0 * m * n * k for m, n, k in gemms))
    return layer_times_s(tokens=tokens, hidden=layer.hidden, kv_hidden=kv, ffn_hidden=layer.ffn_hidden, gated_mlp=layer.gated_mlp,
                         tp=graph.tp, sequence_parallel=graph.sequence_parallel, attention_flops=attention, peak_flops=peak,
                         memory_bandwidth_bytes_per_s=bw, constants=constants, dtype_bytes=2)


def attention_core_share(graph: LayerGraph) -> tuple[float, ...]:
    """Per node, the share of its forward time that selective recompute repeats: the attention
    core (QK^T and P.V, ``4 b s^2 h`` FLOPs of a layer's forward, Narayanan et al. 2021 sec. 5.1;
    softmax and dropout ride along, element-wise) over the node's forward FLOPs, per tensor-parallel
    rank (heads / tp). 0 for nodes without a transformer layer shape."""
    out = []
    b, s = graph.micro_batch_size, graph.seq_len
    for nd in graph.nodes:
        if nd.layer is None or nd.fwd_flops <= 0:
            out.append(0.0)
            continue
        core = 4.0 * b * s * s * nd.layer.hidden / graph.tp
        out.append(min(1.0, core / nd.fwd_flops))
    return tuple(out)


def stage_from_node_times(times: NodeTimes, start: int, end: int, *, recompute: bool, recompute_mode: str = "full",
                          recompute_layers: int = 0, core_share: Sequence[float] | None = None) -> StageCost:
    """A stage's cost as the sum of its nodes' (the nodes run one after another). Recomputing, the
    extra forward is the first ``recompute_layers`` nodes' (all at 0) for "full", and each node's
    attention core (``core_share`` of its forward, :func:`attention_core_share`) for "selective"."""
    if not 0 <= start < end <= len(times.fwd_s):
        raise ConfigError(f"stage range [{start}, {end}) is not within the graph's {len(times.fwd_s)} nodes")
    f = sum(times.fwd_s[start:end])
    rec = 0.0
    if recompute and recompute_mode == "selective":
        if core_share is None:
            raise ConfigError("selective recompute needs each node's attention-core share")
        rec = sum(t * c for t, c in zip(times.fwd_s[start:end], core_share[start:end]))
    elif recompute:
        k = recomputed_layers(start, end, recompute_layers)
        rec = sum(times.fwd_s[start:start + k])
    return StageCost(t_fwd_s=f, t_bwd_s=sum(times.bwd_s[start:end]), t_wgrad_s=sum(times.wgrad_s[start:end]),
                     t_recompute_s=rec)


class _NodeTimeCache:
    """Per-node times per (graph, device type), computed once: the planner asks O(n^2) ranges."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, DeviceType], tuple[LayerGraph, NodeTimes]] = {}

    def get(self, graph: LayerGraph, device_type: DeviceType, compute: Callable[[LayerGraph, DeviceType], NodeTimes]) -> NodeTimes:
        key = (id(graph), device_type)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not graph:
            if len(self._cache) > 256:
                self._cache.clear()
            hit = (graph, compute(graph, device_type))
            self._cache[key] = hit
        return hit[1]


class NodeTimesCostModel:
    """Shared body of every grade: a grade supplies ``node_times``; stages sum node times, and
    transfers, all-reduce and the optimizer step use the analytic formulas above unless a grade
    overrides them."""

    name = "node-times"

    def node_times(self, graph: LayerGraph, device_type: DeviceType) -> NodeTimes:
        raise NotImplementedError

    def stage_costs(self, graph: LayerGraph, start: int, end: int, device_type: DeviceType, *, recompute: bool = False) -> StageCost:
        return stage_from_node_times(self.node_times(graph, device_type), start, end, recompute=recompute)

    def p2p_time_s(self, nbytes: float, link: Link) -> float:
        return p2p_time_s(nbytes, link)

    def allreduce_time_s(self, nbytes: float, n: int, link: Link) -> float:
        return ring_allreduce_time_s(nbytes, n, link)

    def optimizer_step_time_s(self, param_count: int, device_type: DeviceType, *, optimizer: str = "adamw", dtype: str = "fp32",
                              model: str = "") -> float:
        return optimizer_step_time_s(param_count, device_type, optimizer=optimizer, dtype=dtype)

    def block_times(self, graph: LayerGraph, device_type: DeviceType) -> Sequence[tuple[float, float]]:
        """(forward, backward) seconds per node, for reports and calibration."""
        t = self.node_times(graph, device_type)
        return list(zip(t.fwd_s, t.bwd_s))


class AnalyticCostModel(NodeTimesCostModel):
    """Roofline grade: every number from the graph's FLOPs and bytes and the device's datasheet."""

    name = "analytic"

    def __init__(self, params: AnalyticParams | None = None, *, params_by_device: Mapping[str, AnalyticParams] | None = None) -> None:
        self.params = params or AnalyticParams()
        self.params_by_device = dict(params_by_device or {})
        self._cache = _NodeTimeCache()

    def params_for(self, device_type: DeviceType) -> AnalyticParams:
        return self.params_by_device.get(device_type.name, self.params)

    def node_times(self, graph: LayerGraph, device_type: DeviceType) -> NodeTimes:
        return self._cache.get(graph, device_type, lambda g, d: analytic_node_times(g, d, self.params_for(d)))
