"""From a layer graph, a topology and a cost model to the planner's matrices and the simulator's input.

:class:`StageTables` precomputes, for one traced graph (one micro-batch size), everything the
inner partitioner needs as ``(n+1) x (n+1)`` range matrices (prefix sums; numpy):

* time of blocks ``[i, j)`` on a device type: ``F + B`` (+ ``F`` again when recomputing), the
  cost model's per-node times summed (:func:`pipetrain.planner.costs.stage_from_node_times`);
* memory of blocks ``[i, j)`` as stage ``s`` with ``in_flight`` micro-batches and ``buffers``
  receive slots, term for term what :func:`pipetrain.planner.memory.stage_memory` returns
  (a test checks equality on every range).

:func:`placement` puts stages on devices (replica ``k``'s pipeline rank ``r`` on device
``k * p + r``: adjacent stages share a node, one pipeline fills nodes before the next) and
:func:`sim_input` turns a chosen split into a :class:`pipetrain.simulator.SimInput` whose
simulated peak memory per stage equals the memory model's. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from pipetrain.errors import InfeasibleError
from pipetrain.planner.costs import AnalyticCostModel, CostModel, stage_from_node_times
from pipetrain.planner.graph import LayerGraph
from pipetrain.planner.memory import (autocast_cast_params_per_node, bytes_per_param, loss_saved_bytes, stage_input_bytes, stage_memory,
                                      stage_output_bytes)
from pipetrain.planner.partition import additive_matrix
from pipetrain.planner.topology import Device, DeviceType, Topology
from pipetrain.schedules import Schedule
from pipetrain.simulator import BoundarySpec, ComputeGroup, DataParallelSpec, Link, SimInput, StageSpec

__all__ = ["StageTables", "Placement", "placement", "sim_input", "rank_caps", "rank_device_type", "held_in_flight", "cut_bytes"]

#: Gradients are all-reduced in fp32 whatever the training dtype: pipetrain's executor keeps fp32
#: master weights under autocast and reduces one flat fp32 buffer per stage after the pipeline
#: flush (hence ``dp_overlap`` False by default), as Megatron-LM does with its default
#: ``accumulate_allreduce_grads_in_fp32`` for bf16 (Narayanan et al. 2021).
_ALLREDUCE_BYTES_PER_PARAM = 4


def _node_times(cost: CostModel, graph: LayerGraph, dt: DeviceType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if hasattr(cost, "node_times"):
        t = cost.node_times(graph, dt)  # type: ignore[attr-defined]
        return np.asarray(t.fwd_s, float), np.asarray(t.bwd_s, float), np.asarray(t.wgrad_s, float)
    n = graph.num_nodes
    f, b, w = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        c = cost.stage_costs(graph, i, i + 1, dt)
        f[i], b[i], w[i] = c.t_fwd_s, c.t_bwd_s, c.t_wgrad_s
    return f, b, w


def cut_bytes(graph: LayerGraph) -> tuple[np.ndarray, tuple[int, ...]]:
    """Bytes crossing every cut position 0..n (0 at the ends) and the legal cut positions.

    The same as ``graph.cut(k).bytes`` for every k (a test checks it) in one pass over the
    edges: source ``u`` crosses the cuts ``u+1 .. (its last consumer)``, once however many
    consumers it has.
    """
    n = graph.num_nodes
    last = {}
    for e in graph.edges:
        last[e.src] = max(last.get(e.src, e.src), e.dst)
    diff = np.zeros(n + 2)
    crossing = np.zeros(n + 2, dtype=int)
    for u, v in last.items():
        diff[u + 1] += graph.nodes[u].output_bytes
        diff[v + 1] -= graph.nodes[u].output_bytes
        crossing[u + 1] += 1
        crossing[v + 1] -= 1
    out = np.cumsum(diff)[: n + 1]
    count = np.cumsum(crossing)[: n + 1]
    out[0] = out[n] = 0.0
    return out, tuple(k for k in range(1, n) if count[k] > 0)


def held_in_flight(schedule: Schedule) -> tuple[int, ...]:
    """Per stage, the micro-batches whose activations the memory model must hold at peak.

    ``peak_in_flight`` (F done, B not); with a split backward also the peak of B done, W not
    (the simulator reports the sum of both peaks, so the planner plans for it).
    """
    from pipetrain import schedules

    held = schedules.peak_in_flight(schedule)
    fn = getattr(schedules, "peak_pending_wgrad", None)
    if schedule.split_backward and fn is not None:
        held = tuple(a + b for a, b in zip(held, fn(schedule)))
    return tuple(held)


class StageTables:
    """Range matrices of one graph for the partitioner (see module docstring)."""

    def __init__(self, graph: LayerGraph, cost: CostModel | None = None, *, optimizer: str = "adamw") -> None:
        self.graph = graph
        self.cost = cost or AnalyticCostModel()
        self.optimizer = optimizer
        self.n = graph.num_nodes
        self.per_param = bytes_per_param(graph.dtype, optimizer)
        self.params = np.array([nd.param_count for nd in graph.nodes], dtype=float)
        self.saved = np.array([nd.saved_bytes for nd in graph.nodes], dtype=float)
        if graph.dtype != "fp32":  # the executor runs half precision as autocast: + each matmul's weight cast
            self.saved += 2.0 * np.array(autocast_cast_params_per_node(graph), dtype=float)
        self.cut_bytes, self.legal_cuts = cut_bytes(graph)
        self.input_bytes = self.cut_bytes.copy()
        self.input_bytes[0] = float(stage_input_bytes(graph, 0))
        self.loss_bytes = float(loss_saved_bytes(graph))
        self._times: dict[tuple[str, bool], np.ndarray] = {}
        self._node_times: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @cached_property
    def _tied_params(self) -> np.ndarray:
        """Parameters of tied weights used in [i, j) but owned outside it."""
        n = self.n
        out = np.zeros((n + 1, n + 1))
        i = np.arange(n + 1)[:, None]
        j = np.arange(n + 1)[None, :]
        for t in self.graph.tied:
            owner_in = (i <= t.owner) & (t.owner < j)
            user_in = np.zeros((n + 1, n + 1), dtype=bool)
            for u in t.users:
                user_in |= (i <= u) & (u < j)
            out += np.where(~owner_in & user_in, float(t.param_count), 0.0)
        return out

    @cached_property
    def model_state(self) -> np.ndarray:
        """Weights + grads + optimizer state (+ tied copies) of [i, j), bytes."""
        return additive_matrix(self.params, scale=self.per_param.total) + self._tied_params * self.per_param.total

    @cached_property
    def activations(self) -> np.ndarray:
        """Saved-for-backward bytes of one micro-batch in [i, j) (+ the loss's on the last stage)."""
        a = additive_matrix(self.saved)
        a[:, self.n] += self.loss_bytes
        return a

    @cached_property
    def stage_params(self) -> np.ndarray:
        return additive_matrix(self.params)

    def node_times(self, dt: DeviceType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if dt.name not in self._node_times:
            self._node_times[dt.name] = _node_times(self.cost, self.graph, dt)
        return self._node_times[dt.name]

    def time_matrix(self, dt: DeviceType, *, recompute: bool) -> np.ndarray:
        """Seconds of one micro-batch's F + B (+ recompute F) through [i, j) on ``dt``."""
        key = (dt.name, recompute)
        if key not in self._times:
            f, b, _ = self.node_times(dt)
            self._times[key] = additive_matrix(f * (2.0 if recompute else 1.0) + b)
        return self._times[key]

    def memory_matrix(self, *, in_flight: int, buffers: int, recompute: bool) -> np.ndarray:
        """Peak bytes of [i, j) as a stage: equals ``memory.stage_memory(...).total_bytes``."""
        recv = buffers * self.cut_bytes[:, None] + self.cut_bytes[None, :]
        if recompute:
            act = in_flight * self.input_bytes[:, None] + self.activations
        else:
            act = in_flight * self.activations
        return self.model_state + act + recv

    def stage_cost(self, dt: DeviceType, start: int, end: int, *, recompute: bool):  # -> StageCost
        f, b, w = self.node_times(dt)
        from pipetrain.planner.costs import NodeTimes

        return stage_from_node_times(NodeTimes(fwd_s=tuple(f), bwd_s=tuple(b), wgrad_s=tuple(w)), start, end, recompute=recompute)


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Pipeline rank ``r`` of replica ``k`` runs on ``devices[k][r]`` (indices into topology.devices)."""

    pp: int
    dp: int
    devices: tuple[tuple[int, ...], ...]

    def rank_devices(self, topology: Topology, rank: int) -> list[Device]:
        return [topology.devices[self.devices[k][rank]] for k in range(self.dp)]


def placement(topology: Topology, pp: int, dp: int) -> Placement:
    """Replica-major, stage-contiguous placement: adjacent stages of a pipeline share a node."""
    need = pp * dp
    if need > topology.num_devices:
        raise InfeasibleError(f"pp={pp} x dp={dp} needs {need} devices but topology {topology.name} has {topology.num_devices}")
    return Placement(pp=pp, dp=dp, devices=tuple(tuple(k * pp + r for r in range(pp)) for k in range(dp)))


def rank_device_type(topology: Topology, place: Placement, rank: int) -> DeviceType:
    """The slowest device type among the replicas of pipeline rank ``rank`` (it sets the pace)."""
    types = [d.type for d in place.rank_devices(topology, rank)]
    return min(types, key=lambda t: (t.achievable_flops("bf16"), t.name))


def rank_caps(topology: Topology, place: Placement, *, max_memory_bytes: float | None = None,
              max_memory_fraction: float | None = None) -> list[float]:
    """Memory cap per pipeline rank: the smallest device among its replicas, after the user's limit."""
    caps = []
    for r in range(place.pp):
        cap = min(d.type.memory_bytes for d in place.rank_devices(topology, r))
        if max_memory_fraction is not None:
            cap *= max_memory_fraction
        if max_memory_bytes is not None:
            cap = min(cap, max_memory_bytes)
        caps.append(float(cap))
    return caps


def _sim_link(topology: Topology, a: int, b: int) -> Link:
    lk = topology.link_between(a, b)
    return Link(name=lk.resource or f"{a}->{b}", latency_s=lk.latency_s, bandwidth_bytes_per_s=lk.bandwidth_bytes_per_s)


def _group_speed(node_speed: tuple[float, ...], ranks: int, used: int) -> tuple[float, ...]:
    """The node's co-run speed table seen from a group of ``ranks`` pipeline ranks when ``used`` of
    the node's ranks run (data-parallel replicas compute in step: ``k`` of the group computing
    means about ``k * used / ranks`` of the node)."""
    if not node_speed:
        return ()
    g = ComputeGroup(ranks=tuple(range(len(node_speed))), speed=node_speed, sharing="time-slice")
    return tuple(g.rate(max(1, round(k * used / ranks))) for k in range(1, ranks + 1))


def _compute_groups(topology: Topology, place: Placement) -> tuple[ComputeGroup, ...]:
    """Pipeline ranks on one CPU node share its cores (only where the node says they share), and
    its caches and memory bandwidth where the node carries a measured ``corun_speed`` (and a
    ``resume_s`` / ``switch_s`` after waits)."""
    groups = []
    by_node: dict[int, list[int]] = {}
    for r in range(place.pp):
        by_node.setdefault(topology.devices[place.devices[0][r]].node, []).append(r)
    for node, ranks in by_node.items():
        spec = topology.nodes[node]
        if spec.cores <= 0 or len(ranks) < 2:
            continue
        per_rank = max(1, topology.devices[place.devices[0][ranks[0]]].type.cores)
        on_node = sum(1 for dev in topology.devices if dev.node == node)
        used = min(on_node, place.pp * place.dp)
        capacity = max(1, int(spec.cores // per_rank * len(ranks) // max(used, 1)))
        speed = _group_speed(spec.corun_speed, len(ranks), used)
        if capacity < len(ranks) or any(v < 1.0 for v in speed) or spec.resume_s > 0 or spec.switch_s > 0:
            groups.append(ComputeGroup(ranks=tuple(ranks), capacity=capacity, wakeup_s=spec.wakeup_s, speed=speed,
                                       resume_s=spec.resume_s, switch_s=spec.switch_s))
    return tuple(groups)


def sim_input(*, tables: StageTables, topology: Topology, place: Placement, schedule: Schedule,
              ranges: Sequence[tuple[int, int]], buffers: Sequence[int], recompute: Sequence[bool],
              in_flight: Sequence[int], dp_overlap: bool = False, clip_sync: bool = False) -> SimInput:
    """The simulator's input for one split; stage ``s`` runs on pipeline rank ``s % pp``.

    ``clip_sync``: the optimizer steps wait for a global gradient-norm all-reduce (as the executor clips).
    """
    g = tables.graph
    stages = []
    peak_flops = min(rank_device_type(topology, place, r).peak_flops(g.dtype) for r in range(place.pp))
    for s, (a, b) in enumerate(ranges):
        r = schedule.stage_to_rank[s]
        dt = rank_device_type(topology, place, r)
        c = tables.stage_cost(dt, a, b, recompute=recompute[s])
        mem = stage_memory(g, a, b, in_flight=max(1, in_flight[s]), buffers=buffers[s], recompute=recompute[s],
                           optimizer=tables.optimizer)
        act_per_mb = mem.activation_bytes / max(1, in_flight[s])
        static = mem.total_bytes - mem.activation_bytes
        params = mem.param_count
        # split backward: a micro-batch's saved tensors stay from its B to its W ("stash"); the
        # held count passed in is peak(F..B) + peak(B..W), which the simulator adds up the same way
        stash = {"wgrad_stash_bytes": act_per_mb} if schedule.split_backward else {}
        stages.append(StageSpec(**stash,
            t_fwd_s=c.t_fwd_s, t_bwd_s=(c.t_bwd_s - c.t_wgrad_s) if schedule.split_backward else c.t_bwd_s,
            t_wgrad_s=c.t_wgrad_s if schedule.split_backward else 0.0, t_recompute_s=c.t_recompute_s,
            recompute=recompute[s], activation_bytes=act_per_mb, static_bytes=static, buffers=buffers[s],
            grad_bytes=float(params * _ALLREDUCE_BYTES_PER_PARAM),
            t_optimizer_s=tables.cost.optimizer_step_time_s(params, dt, optimizer=tables.optimizer, dtype=g.dtype, model=g.model)))
    bounds = []
    for s in range(len(ranges) - 1):
        ra, rb = schedule.stage_to_rank[s], schedule.stage_to_rank[s + 1]
        nbytes = float(stage_output_bytes(g, ranges[s][1]))
        link = _sim_link(topology, place.devices[0][ra], place.devices[0][rb]) if ra != rb else Link(name=f"local{ra}")
        bounds.append(BoundarySpec(fwd_bytes=nbytes, bwd_bytes=nbytes, link=link))
    if place.dp > 1:
        worst = min((_sim_link(topology, place.devices[0][r], place.devices[1][r]) for r in range(place.pp)),
                    key=lambda lk: lk.bandwidth_bytes_per_s)
        dpl = DataParallelSpec(width=place.dp, link=worst, overlap=dp_overlap)
    else:
        dpl = DataParallelSpec(width=1)
    host = getattr(tables.cost, "message_host_s", None)  # a measured cost model: gloo's host CPU per message
    return SimInput(schedule=schedule, stages=tuple(stages), boundaries=tuple(bounds),
                    compute_groups=_compute_groups(topology, place), data_parallel=dpl,
                    t_message_host_s=host(g, rank_device_type(topology, place, 0)) if host is not None else 0.0,
                    micro_batch_size=g.micro_batch_size, seq_len=g.seq_len,
                    model_flops_per_sample=(g.fwd_flops + g.bwd_flops) / g.micro_batch_size,
                    peak_flops_per_device=peak_flops,
                    clip_sync_link=_sim_link(topology, place.devices[0][0], place.devices[0][1] if place.pp > 1 else place.devices[1][0])
                    if clip_sync and place.pp * place.dp > 1 else None)
